"""``trainer reproduce`` / ``make reproduce``: the paper's section 6 experiments on the real data.

Tables 2-4 and Figures 2-5 of the paper on games6k, tallrec-book and synthetic data, through
resumable stages (``stages.py``), with the plan of each data set in ``plan.py``, the measurements in
``experiments.py``, and the report (``report.md``, ``report.json``, PNG figures) in ``report.py``.

    .venv/bin/python -m trainer reproduce --data-root ../shared/data --out reports/reproduce
    .venv/bin/python -m trainer reproduce --data-root ../shared/data --out runs/quick --quick
"""

from trainer.reproduce.run import ReproduceConfig, reproduce

__all__ = ["ReproduceConfig", "reproduce"]
