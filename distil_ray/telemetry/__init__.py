"""What a user watches: console progress, JSONL metrics (and wandb when installed)."""

from distil_ray.telemetry.console import Progress, format_eta, format_table
from distil_ray.telemetry.metrics import (
    METRICS_FILE,
    MetricsLogger,
    read_metrics,
    to_float,
)

__all__ = ["METRICS_FILE", "MetricsLogger", "Progress", "format_eta", "format_table", "read_metrics", "to_float"]
