"""Exact, streaming anomaly-detection metrics (see ``docs/metrics.md``).

``Evaluator`` accumulates batches of maps and masks; ``evaluate_predictions`` scores a predictions
folder in the submission layout. Both return
``{"protocol", "categories": {name: {metric: value}}, "mean": {metric: value}}``.
"""

from threecad.metrics.evaluator import METRICS, PROTOCOLS, Evaluator
from threecad.metrics.predictions import evaluate_predictions, format_table

__all__ = ["METRICS", "PROTOCOLS", "Evaluator", "evaluate_predictions", "format_table"]
