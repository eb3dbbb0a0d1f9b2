"""The embedded default, exactly as a user starts it: `python -m distil_ray.main +experiment=tiny`.

It must learn: the toy task's validation accuracy rises by at least 0.25 from step 0 (the run's
wall time is measured by benchmarks/bench_tiny_run.py, not asserted here)."""

import subprocess
import sys

import pytest
import yaml

from distil_ray.telemetry.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_tiny_experiment_learns(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "distil_ray.main", "+experiment=tiny", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = read_metrics(run_dir)
    curve = [(line["step"], line["val/accuracy"]) for line in lines if "val/accuracy" in line]
    assert [step for step, _ in curve] == [0, 10, 20, 30, 40]
    assert curve[-1][1] - curve[0][1] >= 0.25, curve
    # one progress line per step on the console
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == 40
    # the run directory a user gets
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    assert resolved["algorithm"]["name"] == "distil" and resolved["task"]["name"] == "toy"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000040"
    assert (run_dir / "actor_logs").is_dir()
    train = [line for line in lines if "loss" in line]
    assert len(train) == 40
    assert train[-1]["replay/served"] == 40 * 8 * 4 and train[-1]["replay/dropped"] == 0
