"""Lightning callbacks: evaluation metrics (AnomalyMetrics) and test panels (AnomalyPanels)."""

from callbacks.metrics import AnomalyMetrics
from callbacks.panels import AnomalyPanels

__all__ = ["AnomalyMetrics", "AnomalyPanels"]
