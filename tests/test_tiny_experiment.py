"""The embedded default, exactly as a user starts it: `python -m distil_ray.main +experiment=tiny`.

It must learn: the toy task's validation accuracy rises by at least 0.25 from step 0 (the run's
wall time is measured by benchmarks/bench_tiny_run.py, not asserted here)."""

import subprocess
import sys

import pytest
import yaml

from distil_ray.telemetry.metrics import read_metrics

pytestmark = pytest.mark.timeout(900)


def run_tiny(run_dir, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "distil_ray.main", "+experiment=tiny", f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = read_metrics(run_dir)
    curve = [(line["step"], line["val/accuracy"]) for line in lines if "val/accuracy" in line]
    assert [step for step, _ in curve] == [0, 10, 20, 30, 40]
    return proc, lines, curve


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return (run_dir, *run_tiny(run_dir))


def test_tiny_experiment_learns(default_run):
    run_dir, proc, lines, curve = default_run
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


@pytest.mark.slow
def test_the_teacher_on_the_learner_ranks_learns_as_the_vllm_teacher_does(default_run, tmp_path):
    """teacher.backend=learner: no teacher engine; the learner ranks score each record's teacher
    context inside the step, with the EMA they keep. The same weights as the vLLM teacher's, so
    the same run up to float rounding."""
    _, _, _, default_curve = default_run
    _, lines, curve = run_tiny(tmp_path / "run", "teacher.backend=learner")
    assert curve[-1][1] - curve[0][1] >= 0.25, curve
    assert max(abs(a - b) for (_, a), (_, b) in zip(curve, default_curve)) <= 0.1, (curve, default_curve)
    train = [line for line in lines if "loss" in line]
    assert all(line["distil/num_tokens"] > 0 for line in train)  # every step distilled
