"""Lightning callbacks: evaluation metrics (AnomalyMetrics) and heatmap pictures (HeatmapVisualizer)."""

from callbacks.metrics import AnomalyMetrics
from callbacks.visualization import HeatmapVisualizer

__all__ = ["AnomalyMetrics", "HeatmapVisualizer"]
