"""The trainer's data layer: the canonical data set, CTR samples, importers and a synthetic generator."""

from trainer.data.dataset import (
    Dataset,
    DataFormatError,
    data_hash,
    graph_interactions,
    graph_pairs,
    load_dataset,
    write_dataset,
)
from trainer.data.rows import DatasetMeta, InteractionRow, Item
from trainer.data.samples import SampleRule, build_samples

__all__ = [
    "Dataset", "DataFormatError", "DatasetMeta", "InteractionRow", "Item", "SampleRule", "build_samples",
    "data_hash", "graph_interactions", "graph_pairs", "load_dataset", "write_dataset",
]
