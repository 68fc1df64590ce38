"""The trainer's own failure, beside the input errors (``ValueError``, ``FileNotFoundError``, the
artifact errors) that the CLI prints as one line with exit status 2:

- :class:`TrainingFailed`: a stage ran but produced a model that ranks nothing (exit status 3).
"""


class TrainingFailed(RuntimeError):
    """The tuned model ranks nothing (``trainer.stats.collapse_reason``); no artifact was written."""
