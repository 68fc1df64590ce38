"""What ``make reproduce`` runs on each data set, and the paper's numbers it prints beside ours.

A ``DatasetPlan`` fixes the data (importer, source folder, users kept), the model preset and how many
samples each step uses. ``plans(quick=False)`` is the full run (the small preset, ≤ 90 minutes on 2
cores for all three data sets); ``quick=True`` runs the same code on subsets with the tiny preset
(≤ 10 minutes), which is what the test suite runs. ``plans(model=NAME)``: an installed pretrained
model (``trainer models``) is the LLM of every table and figure, LoRA-tuned on ``PRETRAINED_SIZES``
(TALLRec's 256 samples), and the few-shot table uses it too.

The paper's numbers (Table 2, 3 and 4 of "The Efficiency vs. Accuracy Trade-off: Optimizing
RAG-Enhanced LLM Recommender Systems Using Multi-Head Early Exit", Vicuna-7B, their own splits)
are matched to our data sets by domain: games6k is Amazon Video Games, tallrec-book is
BookCrossing. The tallrec-book test file has published numbers of its own (TALLRec, LLaMA-7B with
LoRA, and sequential baselines; ``shared/data/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trainer.reproduce.fewshot import FewShotPlan

MAX_HISTORY = 15  # the paper's history length, the user's own and each similar user's

# Table 2 (AUC x 100), Table 3 (average vs last layer), Table 4 (AUC, requests/s per A100).
PAPER = {
    "video_games": {
        "table2": {"deepfm": 77.25, "din": 77.03, "sim": 74.75, "gru4rec": 63.20, "llm_no_retrieval": 81.41,
                   "llm_retriever": 83.15, "gcn_retriever": 93.46, "gcn_earlyexit": 97.19},
        "table3": {"mean_1_to_K": 89.77, "last": 85.63},
        "table4": {"none": (81.41, 8.91), "none+early_exit": (82.32, 7.89), "gcn": (89.77, 3.83),
                   "gcn+early_exit": (97.19, 4.57)},
    },
    "bookcrossing": {
        "table2": {"deepfm": 71.15, "din": 71.17, "sim": 68.10, "gru4rec": 60.75, "llm_no_retrieval": 70.74,
                   "llm_retriever": 69.05, "gcn_retriever": 72.51, "gcn_earlyexit": 73.28},
        "table3": {"mean_1_to_K": 72.51, "last": 69.45},
        "table4": {"none": (70.74, 15.77), "none+early_exit": (53.17, 17.85), "gcn": (72.51, 4.66),
                   "gcn+early_exit": (73.28, 5.59)},
    },
}
# Table 2's rows, in order: (model key of the measurements, the label the report prints).
TABLE2 = (("deepfm", "DeepFM"), ("din", "DIN"), ("gru4rec", "GRU4Rec"), ("sasrec", "SASRec"),
          ("lightgcn", "LightGCN score alone (user . item, no LLM)"),
          ("llm_no_retrieval", "LLM, no retrieval (TALLRec)"), ("llm_retriever", "LLM-retriever"),
          ("gcn_retriever", "GCN-retriever"), ("gcn_earlyexit", "GCN-earlyexit"),
          ("gcn_collab", "GCN-retriever + collab tokens (ours)"),
          ("gcn_collab_earlyexit", "GCN-retriever + collab tokens + early exit (ours)"))
# The tallrec-book test file itself (shared/data/README.md): LLaMA-7B + LoRA tuned on 16 / 64 / 256
# samples (TALLRec), and sequential baselines trained on 256.
TALLREC_TEST = {"tallrec_7b_16": 56.36, "tallrec_7b_64": 60.39, "tallrec_7b_256": 64.38,
                "gru4rec_256": 49.86, "sasrec_256": 50.20}


@dataclass(frozen=True)
class DatasetPlan:
    """One data set's run.

    Args:
        name: the report's name for it.
        importer: ``trainer data import`` format, or ``synth``.
        source: folder under the data root (None for synthetic data).
        paper: key of ``PAPER`` for the paper's numbers beside ours (None: none).
        max_users: users kept by the importer (None: all).
        preset: the ranker preset (``trainer.pipeline.PRESETS``).
        train, valid, test: samples used for tuning + heads, for calibration, for evaluation.
        epochs: instruction-tuning epochs; heads_epochs: exit-head epochs.
        speed_samples: test samples timed per requests/s point of the sweeps.
        sweep_samples: test samples of the neighbour sweep (Figure 5), the first of the evaluated ones.
        gcn_epochs: LightGCN epochs.
        max_history: interactions kept of the user and of each similar user (the prompt shows at most
            ``PromptConfig.max_history`` / ``neighbor_history`` of them).
        few_shot: TALLRec's few-shot table on this data set (``trainer.reproduce.fewshot``), or None.
        base_model: an installed model's name or a checkpoint directory to LoRA-tune instead of
            training ``preset`` from scratch; lr, batch_size: tuning's (None: the preset's or
            ``instruction_tune``'s defaults).
    """

    name: str
    importer: str
    source: str | None
    paper: str | None = None
    max_users: int | None = None
    preset: str = "small"
    train: int = 1200
    valid: int = 600
    test: int = 800
    epochs: int = 2
    heads_epochs: int = 3
    speed_samples: int = 96
    sweep_samples: int = 800
    gcn_epochs: int = 40
    max_history: int = MAX_HISTORY
    synth_users: int = 2000
    synth_items: int = 1500
    extra: dict = field(default_factory=dict)
    few_shot: FewShotPlan | None = None
    base_model: str | None = None
    lr: float | None = None
    batch_size: int | None = None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["few_shot"] = self.few_shot.to_json() if self.few_shot is not None else None
        return out


FULL = (
    DatasetPlan("games6k", "games6k", "games6k", paper="video_games", max_users=4000),
    # the whole published test file (2,427); its prompts are the longest (titles with authors), so fewer
    # training samples keep the run within its budget
    DatasetPlan("tallrec-book", "tallrec", "tallrec-book", paper="bookcrossing", test=2427, train=800,
                few_shot=FewShotPlan()),
    DatasetPlan("synthetic", "synth", None),
)

# the quick run checks that every stage, table and figure is produced, not what they say (its tiny models sit
# near chance); its sizes keep it to about a fifth of the test suite's 15 minutes on 2 cores
QUICK_SIZES = {"preset": "tiny", "train": 128, "valid": 80, "test": 100, "epochs": 1, "heads_epochs": 1,
               "speed_samples": 16, "sweep_samples": 50, "gcn_epochs": 5, "synth_users": 300, "synth_items": 240,
               "max_history": 4}
QUICK_MAX_USERS = 400


# the quick run's few-shot table: the same code with the tiny preset from scratch, two shot counts, one seed
QUICK_FEW_SHOT = FewShotPlan(model="tiny", shots=(16, 64), seeds=(0,), valid=60, test=100, lr=None)


# a pretrained model's run: TALLRec's 256 training samples per ranker (k=4 tallrec-book prompts: 2 epochs in
# ~6.5 minutes on 2 bf16 cores, bench/README), fewer test samples (a full-depth pass costs ~0.5 s a prompt
# there), so three data sets and the few-shot table fit the 150-minute budget. lr 1e-3: LoRA's 3e-4 barely
# moved SmolLM2 in 64 steps; chosen on validation AUC (FewShotPlan.lr), never on a test file. The preset then
# only sets what tuning does not take from the base model: tiny's leaves bf16 autocast to the hardware.
PRETRAINED_SIZES = {"preset": "tiny", "train": 256, "valid": 200, "test": 600, "epochs": 2, "heads_epochs": 2,
                    "speed_samples": 24, "sweep_samples": 200, "lr": 1e-3, "batch_size": 8}


def plans(*, quick: bool = False, names: tuple[str, ...] | None = None, model: str | None = None) -> list[DatasetPlan]:
    """The data sets to run, in report order; ``quick``: subsets and the tiny preset; ``model``: an
    installed pretrained model as the LLM (``PRETRAINED_SIZES``, or the quick sizes with ``quick``)."""
    chosen = [p for p in FULL if names is None or p.name in names]
    if model is not None:
        chosen = [replace(p, **PRETRAINED_SIZES, base_model=model,
                          few_shot=replace(p.few_shot, model=model) if p.few_shot is not None else None)
                  for p in chosen]
    if quick:
        few = QUICK_FEW_SHOT if model is None else replace(QUICK_FEW_SHOT, model=model)
        chosen = [replace(p, **QUICK_SIZES, max_users=min(p.max_users or QUICK_MAX_USERS, QUICK_MAX_USERS),
                          few_shot=few if p.few_shot is not None else None) for p in chosen]
    return chosen
