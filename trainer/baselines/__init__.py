"""Classic CTR baselines of the paper's Table 2, trained and scored on the LLM ranker's own examples.

``DeepFM`` (feature interactions), ``DIN`` (target attention over the history), ``GRU4Rec`` (a GRU over
the history) and ``SASRec`` (causal self-attention over the history), one file each, read the id
features of ``exitrank.types.RankExample`` rows (``features.py``) and share one training recipe
(``fit.py``)::

    from trainer.baselines import BASELINES, fit_baseline

    baseline = fit_baseline("din", train_examples, valid_examples, seed=0)
    ctr = baseline.predict(test_examples)   # np.ndarray of click probabilities
"""

from trainer.baselines.deepfm import DeepFM
from trainer.baselines.din import DIN
from trainer.baselines.features import Batch, FeatureSpace, Vocab
from trainer.baselines.fit import BASELINES, Baseline, FitConfig, fit_baseline
from trainer.baselines.gru4rec import GRU4Rec
from trainer.baselines.sasrec import SASRec

__all__ = ["BASELINES", "Baseline", "Batch", "DIN", "DeepFM", "FeatureSpace", "FitConfig", "GRU4Rec", "SASRec",
           "Vocab", "fit_baseline"]
