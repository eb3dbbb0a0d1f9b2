"""The report over a multirun sweep root: every job found, each labelled by what sets it apart."""

import json
import subprocess
import sys

import yaml

from distil_ray.telemetry.report import find_runs, labels


def _job(root, name, overrides, accuracies):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = [{"step": 10 * i, "val/accuracy": a} for i, a in enumerate(accuracies)]
    lines += [{"step": 1, "loss": 0.5, "time/step_s": 0.2, "time/learner_s": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_a_sweep_root_reports_every_job_labelled_by_its_overrides(tmp_path):
    jobs = [_job(tmp_path, str(i), ["+experiment=tiny", f"algorithm={a}", "seed=0"], [0.25, acc])
            for i, (a, acc) in enumerate([("distil", 1.0), ("grpo", 0.4), ("ce", 0.9)])]
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    assert find_runs(tmp_path) == jobs
    assert labels(jobs) == ["algorithm=distil", "algorithm=grpo", "algorithm=ce"]
    out = subprocess.run([sys.executable, "-m", "distil_ray.telemetry.report", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("run ") == 3 and "[algorithm=grpo]" in out.stdout
    assert "val/accuracy: 0:0.250  10:0.400" in out.stdout
    # one run alone: labelled by all of its overrides
    assert labels(jobs[:1]) == ["+experiment=tiny algorithm=distil seed=0"]


def test_the_wandb_run_id_survives_a_restart_of_the_run(tmp_path):
    from distil_ray.telemetry.metrics import MetricsLogger

    first = MetricsLogger(tmp_path)
    run_id = first.wandb_run_id()
    first.close()
    again = MetricsLogger(tmp_path, rewind_to=0)  # a resumed run in the same directory
    assert again.wandb_run_id() == run_id and len(run_id) == 16
    again.close()
    assert MetricsLogger(tmp_path / "other").wandb_run_id() != run_id
