"""The replication command: which runs it plans, the tables it computes from finished runs
(mean ± std over seeds, at step budgets and at equal wall-clock, checked by hand), that it never
reruns a finished run, and — once, through the whole pipeline — that it runs the claims experiment."""

import json
import math
import subprocess
import sys

import pytest

from distil_ray.replicate import RunSpec, composed, plan, summarise, training_curve


def test_plan_runs_every_algorithm_and_seed_then_the_topk_ablation_without_a_duplicate():
    runs = plan(["distil", "ce"], [0, 1], [1, 20, "all"], [0], default_topk=20)
    assert [r.name for r in runs] == ["distil-s0", "distil-s1", "ce-s0", "ce-s1", "distil-k1-s0", "distil-kall-s0"]
    assert [r.name for r in plan(["ce", "ce"], [0, 0], [1, 1], [0], default_topk=20)] == ["ce-s0", "distil-k1-s0"]
    assert RunSpec("distil", 2, "all").overrides("claims", 512) == [
        "+experiment=claims", "algorithm=distil", "seed=2", "teacher.topk=512"]


def test_the_claims_experiment_selects_each_algorithms_protocol_by_algorithm_alone():
    distil, opsd = composed("claims", []), composed("claims", ["algorithm=opsd"])
    assert distil["task"]["name"] == "two_formats" and distil["teacher"]["context"] == "reprompt"
    assert distil["teacher"]["reprompt"]["include_solution"] is False
    assert distil["teacher"]["update"] == "fixed" and distil["teacher"]["backend"] == "learner"
    assert opsd["algorithm"]["name"] == "opsd" and opsd["teacher"]["context"] == "reference_solution"
    # other tasks have no protocol file: nothing changes for them
    assert composed("tiny", ["algorithm=opsd"])["teacher"]["context"] == "reprompt"


def _run(root, name, accuracies, step_s, finished=True, overrides=None):
    run = root / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    if overrides is not None:
        import yaml

        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = [{"step": 0, "time/startup_s": 30.0}]
    for i, acc in enumerate(accuracies):
        if i:
            lines += [{"step": 10 * i - 5, "time/step_s": 5 * step_s}, {"step": 10 * i, "time/step_s": 5 * step_s}]
        lines.append({"step": 10 * i, "val/accuracy": acc, "time/eval_s": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if finished:
        (run / "summary.json").write_text("{}")
    return run


def test_tables_are_means_and_sample_stds_over_seeds(tmp_path):
    _run(tmp_path, "distil-s0", [0.1, 0.5, 0.9], step_s=1.0)
    _run(tmp_path, "distil-s1", [0.1, 0.3, 0.7], step_s=1.0)
    _run(tmp_path, "ce-s0", [0.1, 0.4, 0.5], step_s=0.5)
    _run(tmp_path, "ce-s1", [0.1, 0.2, 0.3], step_s=0.5)
    _run(tmp_path, "grpo-s0", [0.1, 0.1, 0.2], step_s=0.5)
    _run(tmp_path, "distil-k1-s0", [0.1, 0.2, 0.4], step_s=1.0)
    _run(tmp_path, "grpo-s1", [0.1, 0.9], step_s=0.5, finished=False)  # died: left out, and said so
    specs = plan(["distil", "ce", "grpo"], [0, 1], [1, 20], [0], default_topk=20)
    # the wall-clock of an evaluation is when it started: steps and evaluations before it
    assert training_curve(tmp_path / "runs" / "distil-s0") == ([0, 10, 20], [0.0, 11.0, 22.0], [0.1, 0.5, 0.9])
    result = summarise(tmp_path, specs, default_topk=20)  # grpo-s1 did not finish: n=1
    md = (tmp_path / "results.md").read_text()
    std = math.sqrt(((0.9 - 0.8) ** 2 + (0.7 - 0.8) ** 2) / 1)
    assert f"| distil (n=2) | 0.100 ± 0.000 | 0.400 ± {std:.3f} | 0.800 ± {std:.3f} |" in md
    assert "| grpo (n=1) | 0.100 (n=1) | 0.100 (n=1) | 0.200 (n=1) |" in md
    assert result["left_out"] == ["grpo-s1"] and "Left out (unfinished, failed or never evaluated): grpo-s1" in md
    # equal wall-clock: budgets are fractions of the fastest algorithm's run (ce: 2 x 6 s)
    assert result["wall_budgets_s"] == [3.0, 6.0, 9.0, 12.0]
    # at 12 s distil has reached its step-10 evaluation (at 11 s), ce its step-20 one (at 12 s)
    assert "| distil | 22.0 | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.400 ± " in md
    assert "| ce | 12.0 | 0.100 ± 0.000 | 0.300 ± " in md
    assert result["checks"]["distil_minus_ce"] == pytest.approx(0.8 - 0.4)
    assert result["checks"]["distil_ge_grpo_every_step"] is True
    assert "| 1 | 1 | 0.400 (n=1) |" in md and "| 20 | 2 | 0.800 ± " in md
    for png in ("distil_vs_ce.png", "all_algorithms.png", "topk_ablation.png"):
        assert (tmp_path / png).stat().st_size > 10000


def test_a_finished_run_is_not_run_again_and_a_bad_experiment_exits_2(tmp_path):
    _run(tmp_path, "distil-s0", [0.1, 0.5], step_s=1.0, overrides=["+experiment=claims", "algorithm=distil", "seed=0"])
    proc = subprocess.run([sys.executable, "-m", "distil_ray.replicate", "claims", "--seeds", "0", "--algorithms",
                           "distil", "--topk", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[1/1] distil-s0        done" in proc.stdout and "| distil (n=1) |" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "distil_ray.replicate", "no_such_experiment", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot compose +experiment=no_such_experiment" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_claims_experiment_runs_through_the_pipeline(tmp_path):
    """One short OPSD run of the claims experiment, started by the replication command: the task,
    its protocol (the reference solution as context, scored by the fixed teacher on the learner
    ranks), its format metrics and the tables all work end to end. (The claim itself takes 18 runs:
    ``python -m distil_ray.replicate claims``; its numbers are in the README.)"""
    proc = subprocess.run(
        [sys.executable, "-m", "distil_ray.replicate", "claims", "--seeds", "0", "--algorithms", "opsd", "--topk",
         "--out", str(tmp_path), "--", "trainer.total_steps=4", "trainer.eval_every=2", "warm_start.steps=60"],
        capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from distil_ray.telemetry.metrics import read_metrics

    lines = read_metrics(tmp_path / "runs" / "opsd-s0")
    val = [line for line in lines if "val/accuracy" in line]
    assert [line["step"] for line in val] == [0, 2, 4]
    for line in val:
        shares = line["val/task/format_a"] + line["val/task/format_b"] + line["val/task/malformed"]
        assert shares == pytest.approx(1.0)
    train = [line for line in lines if "loss" in line]
    assert len(train) == 4 and all(line["opsd/num_tokens"] > 0 for line in train)  # every step distilled
    assert "| opsd (n=1) |" in (tmp_path / "results.md").read_text()
