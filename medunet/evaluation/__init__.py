"""Evaluation: metrics per case and class, summaries, reports, and label statistics.

- :mod:`~medunet.evaluation.metrics`: Dice, IoU, HD95, ASD, NSD, volumes, sensitivity, precision
  (MONAI's implementations, spacing-aware, one empty-mask convention).
- :mod:`~medunet.evaluation.evaluate`: :func:`evaluate` a folder of predictions against a
  datalist's labels (``metrics.csv``, ``summary.json``, report); :func:`evaluate_pair` in memory.
- :mod:`~medunet.evaluation.report`: box plots, worst-case contour pictures, HTML/Markdown report.
- :mod:`~medunet.inference.statistics`: volume and intensity per class (``medunet infer --stats``).
"""

from __future__ import annotations

from medunet.evaluation.evaluate import COLUMNS, EvaluationResult, evaluate, evaluate_pair, summarize
from medunet.evaluation.metrics import METRICS, binary_metrics, dice_per_class

__all__ = [
    "COLUMNS",
    "METRICS",
    "EvaluationResult",
    "binary_metrics",
    "dice_per_class",
    "evaluate",
    "evaluate_pair",
    "summarize",
]
