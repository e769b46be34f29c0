"""Evaluation: reconstruction faithfulness (FVU, L0, density, shrinkage) and LM loss with the SAE spliced in."""

from monoscope.eval.metrics import ReconAccumulator, ReconMetrics
from monoscope.eval.run import EvalResult, evaluate
from monoscope.eval.splice import LMMetrics, Splicer

__all__ = ["EvalResult", "LMMetrics", "ReconAccumulator", "ReconMetrics", "Splicer", "evaluate"]
