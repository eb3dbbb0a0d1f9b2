"""Fault injection on real runs: what a killed driver, a diverging learner, bad data, a config that
cannot be placed and a stopped actor do to a run (real Ray, real actors, real signals).

Every run here is the tiny experiment shrunk to seconds: a random tiny model, HF engines (exact
sampling on any machine, fast start), two prompts of two samples per step.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from distil_ray.config import compose_config
from distil_ray.trainer import RunStopped, Trainer

from tests.shared_data import SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = [
    "+experiment=tiny", "warm_start.enabled=false", "trainer.prompts_per_step=2", "rollout.n_samples=2",
    "rollout.max_new_tokens=8", "eval.max_prompts=4", "learner.lr=1e-2", "rollout.engine=hf", "teacher.backend=hf",
    "teacher.update=current",
]


def main(*overrides, run_dir, timeout=300, **popen):
    return subprocess.run([sys.executable, "-m", "distil_ray.main", *FAST, *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          **popen)


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def safetensors(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "hf_model" / "model.safetensors"))


# ------------------------------------------------------------------ severe rows


def test_a_sigkilled_off_policy_run_resumes_exactly(tmp_path):
    """max_staleness=1: a round is always in flight at a checkpoint. Kill the driver (its whole
    process group: Ray's processes too) after the step-2 checkpoint, resume: the run completes,
    with the uninterrupted run's validation curve and final weights, and each step logged once."""
    common = ["replay.max_staleness=1", "trainer.checkpoint_every=1", "trainer.total_steps=4",
              "trainer.eval_every=2", "trainer.save_hf_at_end=true"]
    straight = tmp_path / "straight"
    proc = main(*common, run_dir=straight)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distil_ray.main", *FAST, *common, f"hydra.run.dir={killed}"]
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        while not (latest.exists() and latest.read_text().strip() >= "step_000002"):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no step-2 checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert not (killed / "hf_model").exists()  # it died before the end

    proc = main(*common, "trainer.resume=auto", run_dir=killed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout

    def curve(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return lines, [(line["step"], line["val/accuracy"]) for line in lines if "val/accuracy" in line]

    straight_lines, straight_curve = curve(straight)
    killed_lines, killed_curve = curve(killed)
    assert killed_curve == straight_curve
    trained = [line["step"] for line in killed_lines if "loss" in line]
    assert trained == [1, 2, 3, 4]  # each step once, though the killed run may have logged step 3
    a, b = safetensors(straight), safetensors(killed)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    # the resumed run trained on the groups saved with the checkpoint: nothing lost, nothing twice
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["replay/dropped"] == 0 and summary["replay/queued"] == 0


def test_a_diverging_learner_stops_the_run_and_never_saves_non_finite_weights(tmp_path):
    """learner.lr=1e30: the first update blows the weights up, every later loss is NaN. Each such
    update is skipped; three in a row stop the run with one line; no weights with a non-finite value
    are checkpointed or exported."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    proc = main("learner.lr=1e30", "trainer.total_steps=8", "trainer.checkpoint_every=1", "trainer.eval_every=0",
                "trainer.save_hf_at_end=true", run_dir=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith("run stopped: 3 steps in a row with a non-finite loss or gradient norm")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "hf_model").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [line["learner/skipped_updates"] for line in lines if "loss" in line]
    assert skipped[-3:] == [1.0, 1.0, 1.0]
    checkpoints = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert checkpoints, "the first (finite) step was checkpointed"
    for ckpt in checkpoints:
        dcp_to_torch_save(str(ckpt / "dcp"), str(tmp_path / "flat.pt"))
        model = torch.load(tmp_path / "flat.pt", weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in model.values()), ckpt


def _sciknoweval_dir(tmp_path, test_lines):
    src = SHARED_DATA / "sciknoweval" / "chemistry"
    root = tmp_path / "ske"
    (root / "chemistry").mkdir(parents=True)
    (root / "chemistry" / "train.jsonl").write_text((src / "train.jsonl").read_text().splitlines()[0] + "\n"
                                                    + (src / "train.jsonl").read_text().splitlines()[1] + "\n")
    (root / "chemistry" / "test.jsonl").write_text("".join(line + "\n" for line in test_lines))
    return root


# the teacher here is an hf engine (FAST): the support SDPO's protocol uses needs the learner teacher
SCIKNOWEVAL = ["task=sciknoweval", "task.kwargs.domains=chemistry", "trainer.prompts_per_step=1", "teacher.support=teacher"]


def test_records_sharing_an_idx_are_refused_when_the_task_loads(tmp_path):
    """Two records with one idx would share a uid (one graded against the other's answer; with two
    records the driver used to hang). Refused at load time, naming file and line, before Ray."""
    good = (SHARED_DATA / "sciknoweval" / "chemistry" / "test.jsonl").read_text().splitlines()[0]
    twin = json.dumps(dict(json.loads(good), answer="A" if json.loads(good)["answer"] != "A" else "B"))
    data = _sciknoweval_dir(tmp_path, [good, twin])
    t0 = time.monotonic()
    proc = main(*SCIKNOWEVAL, f"task.kwargs.data_dir={data}", run_dir=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (f"task 'sciknoweval': {data}/chemistry/test.jsonl:2: idx "
                                      f"{json.loads(good)['idx']!r} is already used on line 1")
    assert "Ray" not in proc.stderr and time.monotonic() - t0 < 60  # no cluster was started


def test_an_empty_validation_split_is_refused_before_training(tmp_path):
    proc = main(*SCIKNOWEVAL, f"task.kwargs.data_dir={_sciknoweval_dir(tmp_path, [])}", run_dir=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no records" in last_line(proc.stderr) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["rollout.num_gpus=1"], "the cluster has 0 GPUs: the actors ask for 1 GPUs (rollout.num_gpus"),
    # ray.num_cpus=null: Ray counts the machine's cores, so only the started cluster can say
    (["ray.num_cpus=null", "learner.num_cpus=64"], "the cluster has "),
], ids=["gpus", "cpus"])
def test_resources_the_cluster_lacks_fail_in_one_line_before_any_actor(tmp_path, overrides, message):
    proc = main(*overrides, run_dir=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith(message), last_line(proc.stderr)
    assert "CPUs" in last_line(proc.stderr) or "GPUs" in last_line(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_missing_model_path_fails_in_one_line_before_ray(tmp_path):
    proc = main(f"model.path={tmp_path / 'nowhere'}", run_dir=tmp_path / "run", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith(f"model.path='{tmp_path / 'nowhere'}': neither a local directory")
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stderr


# ------------------------------------------------------------------ in-process: deadlines and the final checkpoint


def test_a_stopped_grader_is_named_when_its_deadline_passes(ray_cluster, tmp_path):
    cfg = compose_config(FAST + ["trainer.actor_timeout_s=10", "trainer.total_steps=2", "feedback.num_workers=1"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    pid = actor_pid(trainer.feedback.workers[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunStopped, match=r"grading: \d+ of \d+ not done within 10 s \(trainer.actor_timeout_s\); "
                                             r"still waiting on feedback-0"):
            trainer.train_step()
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(pid, signal.SIGCONT)
        trainer.shutdown()


def test_a_failing_final_evaluation_keeps_the_final_checkpoint(ray_cluster, tmp_path):
    cfg = compose_config(FAST + ["trainer.total_steps=1", "trainer.eval_at_start=false", "trainer.eval_every=0"])
    trainer = Trainer(cfg, tmp_path)

    def broken_evaluation():
        raise RuntimeError("the evaluation failed")

    trainer.evaluate = broken_evaluation
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001"


# ------------------------------------------------------------------ actors SIGKILLed mid-run


def _sigkill(actor) -> None:
    os.kill(actor_pid(actor), signal.SIGKILL)


def _kill_on_first_grading(trainer, victim):
    """SIGKILL ``victim``'s process the moment the first sample of the next round reaches the
    graders: mid-round, with that round's work in flight."""
    grade_ref, done = trainer.feedback.grade_ref, []

    def grade_ref_then_kill(*args):
        ref = grade_ref(*args)
        if not done:
            done.append(True)
            _sigkill(victim(trainer))
        return ref

    trainer.feedback.grade_ref = grade_ref_then_kill


def _logprobs_agree(trainer):
    prompt = [int(t) for t in trainer.train_prompts[0].prompt_ids]
    response = prompt[-6:]
    learner = np.array(trainer.learner.sequence_logprobs(prompt, response))
    for engine in trainer.rollout_workers + [trainer.teacher]:
        np.testing.assert_allclose(np.array(ray.get(engine.sequence_logprobs.remote(prompt, response))), learner,
                                   atol=1e-4)


@pytest.mark.parametrize("victim,when", [
    (lambda t: t.rollout_workers[0], "between steps"),
    (lambda t: t.teacher, "between steps"),
    (lambda t: t.feedback.workers[0], "mid-round"),
], ids=["rollout-worker", "teacher", "grader"])
def test_a_sigkilled_engine_or_grader_is_restarted_and_the_run_completes(ray_cluster, tmp_path, victim, when):
    """The dead actor comes back (Ray restarts it). A restarted engine refuses work until it has
    the current weights; the driver sends them and gives the refused work again (the samples of
    the rollout worker's prompts, the teacher's groups). A grader's calls rerun on its restarted
    self. Every prompt of every step is trained on exactly once, and after the run every engine
    agrees with the learner."""
    steps = 3
    cfg = compose_config(FAST + [f"trainer.total_steps={steps}", "trainer.eval_at_start=false", "trainer.eval_every=0",
                                 "feedback.num_workers=1", "trainer.actor_timeout_s=120"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    try:
        trainer.train_step()
        if when == "between steps":
            _sigkill(victim(trainer))
        else:
            _kill_on_first_grading(trainer, victim)
        metrics = [trainer.train_step()[0] for _ in range(steps - 1)]
        for m in metrics:
            assert m["replay/accepted"] == m["replay/served"] + m["replay/dropped"] + m["replay/queued"]
        last = metrics[-1]
        assert last["replay/served"] == steps * 2 * 2 and last["replay/dropped"] == 0
        if when == "between steps":
            assert last["faults/engine_restarts"] == 1
            resubmitted = "faults/resubmitted_samples" if victim(trainer) is not trainer.teacher else "faults/resubmitted_groups"
            assert last[resubmitted] >= 1
        _logprobs_agree(trainer)
    finally:
        summary = trainer.finish()
    assert summary["step"] == steps


@pytest.mark.parametrize("which", ["learner", "replay"])
def test_a_dead_learner_rank_or_replay_queue_stops_the_run_with_the_resume_command(ray_cluster, tmp_path, which):
    cfg = compose_config(FAST + ["trainer.total_steps=3", "trainer.eval_at_start=false", "trainer.eval_every=0",
                                 "trainer.checkpoint_every=1", "trainer.actor_timeout_s=120"])
    trainer = Trainer(cfg, tmp_path)
    steps = iter(range(10))
    real_step = trainer.train_step

    def step_then_kill():
        out = real_step()
        if next(steps) == 1:  # in step 2, after step 1's checkpoint
            _sigkill(trainer.learner.actors[1] if which == "learner" else trainer.replay)
        return out

    trainer.train_step = step_then_kill
    name = "learner-1 (LearnerActor" if which == "learner" else "replay (ReplayQueue"
    with pytest.raises(RunStopped, match=rf"actor {re.escape(name)}, pid \d+\) died: the run cannot go on without it; "
                                         r"resume with trainer.resume=auto \(from .*checkpoints/step_00000[12]\)"):
        trainer.fit()
