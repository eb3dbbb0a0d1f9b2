"""Training metrics as Ray gauges, so the Ray dashboard's Metrics view (Prometheus / Grafana)
plots the run beside the cluster's own CPU, memory and object-store curves."""

from __future__ import annotations

from typing import Mapping

# metrics.jsonl key → gauge name (Prometheus names: letters, digits and underscores)
GAUGES = {
    "loss": ("distil_ray_loss", "training loss of the last step"),
    "rollout/reward_mean": ("distil_ray_reward", "mean reward of the last step's rollouts"),
    "rollout/accuracy": ("distil_ray_rollout_accuracy", "fraction of the last step's rollouts that are correct"),
    "val/accuracy": ("distil_ray_val_accuracy", "validation accuracy at the last evaluation"),
    "policy_version": ("distil_ray_policy_version", "optimizer steps taken"),
    "time/step_s": ("distil_ray_step_seconds", "wall time of the last step"),
    "time/sync_s": ("distil_ray_sync_seconds", "weight sync time of the last step"),
    "time/learner_s": ("distil_ray_learner_seconds", "learner time (forward, backward, optimizer) of the last step"),
    "rollout/tokens_per_s": ("distil_ray_rollout_tokens_per_second", "tokens generated per second in the last round"),
    "learner/tokens_per_s": ("distil_ray_learner_tokens_per_second", "tokens trained on per second in the last step"),
    "replay/queued": ("distil_ray_replay_queued", "records waiting in the replay queue"),
    "replay/dropped": ("distil_ray_replay_dropped", "records dropped as too stale, in all"),
    "replay/version_lag": ("distil_ray_staleness", "policy versions the last batch was behind the learner"),
    "rollout/sandbox_errors": ("distil_ray_sandbox_errors", "rollouts of the last step the sandbox could not run"),
    "learner/skipped_updates_total": ("distil_ray_skipped_updates", "updates skipped for a non-finite loss, in all"),
}


class DashboardMetrics:
    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.run = run
        self._gauges = {key: Gauge(name, description=text, tag_keys=("run",)) for key, (name, text) in GAUGES.items()}

    def record(self, metrics: Mapping[str, float]) -> None:
        for key, gauge in self._gauges.items():
            value = metrics.get(key)
            if value is not None:
                gauge.set(float(value), tags={"run": self.run})
