"""What the trainer's libraries print: only what concerns the run.

- DeepSpeed: ``transformers``' ``save_pretrained`` unwraps the model through ``accelerate``, which
  imports ``deepspeed`` whenever it is installed, and DeepSpeed's accelerator probe then logs
  "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
  The trainer never runs DeepSpeed (only ``ranker-svc --engine deepspeed`` and ``make bench-gpu``
  do, and they do not call this), so that line is dropped in the trainer's process; every other
  DeepSpeed record passes.
- ``progress=False`` (``--no-progress``) also turns off the progress bars of ``transformers`` and
  ``huggingface_hub`` ("Loading weights", "Writing model shards"); the stages log a line per epoch.
"""

from __future__ import annotations

import logging
import os
import sys

DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger (its own handler, propagate off)
CPU_PROBE = "Setting accelerator to CPU"


class _DropCpuProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CPU_PROBE)


def quiet_libraries(*, progress: bool = True) -> None:
    """Installs the filter (once; before or after ``deepspeed`` is imported) and, without
    ``progress``, turns the libraries' progress bars off."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropCpuProbe) for f in logger.filters):
        logger.addFilter(_DropCpuProbe())  # deepspeed's create_logger keeps a logger's filters
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging  # noqa: PLC0415 - already imported

            hf_logging.disable_progress_bar()
