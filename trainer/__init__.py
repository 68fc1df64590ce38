"""exitrank trainer: data pipeline, GCN / instruction-tuning / early-exit head training, evaluation."""
