"""LearnerWorker in one process (world size 1, a real gloo group, real FSDP2): the gradient
accumulated over micro-batches with global normalisation equals one loss over the whole batch.

The optimizer uses a large Adam ``eps`` so that the first step is ``lr · g / (|g| + eps)``: linear
in the gradient to first order, so comparing parameters compares gradients (with the default eps
Adam's first step is ``lr · sign(g)`` and would hide any rescaling of the gradient).
"""

import socket

import numpy as np
import pytest

from distil_ray.config import AlgorithmConfig, LearnerConfig
from distil_ray.learner.worker import LearnerWorker, Rendezvous
from distil_ray.models import load_tiny, tiny_model_dir

from .learner_data import make_records, reference_step

STEP = dict(lr=1e-2, eps=1.0, weight_decay=0.01, grad_clip=1.0)


def new_worker(path, algorithm, loss_kwargs=None, advantage_kwargs=None, **learner):
    cfg = LearnerConfig(lr=STEP["lr"], adam_eps=STEP["eps"], weight_decay=STEP["weight_decay"],
                        grad_clip=STEP["grad_clip"], world_size=1, **learner)
    algo = AlgorithmConfig(algorithm, dict(loss_kwargs or {}), dict(advantage_kwargs or {}))
    return LearnerWorker(str(path), cfg, algo, Rendezvous(0, 1, "127.0.0.1", free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup():
    path = tiny_model_dir()
    model, tok = load_tiny(path)
    # 5 prompts x 3 samples; record 1 has no feedback (distill_mask False)
    return path, tok, make_records(model, tok, n_prompts=5, samples=3, seed=1)


ONE_SEQUENCE = {"max_tokens_per_micro_batch": 1}  # a token budget that splits every group into single records
CASES = [
    ("distil", {"baseline": "group"}, None, {}),  # groups kept whole across micro-batches
    ("distil", {"baseline": "group", "gamma": 0.9}, None, ONE_SEQUENCE),  # the group baseline computed first
    ("ce", {"loss_agg": "seq-sum"}, None, {}),  # a sequence-count denominator
    ("sdpo", {"alpha": 0.5}, None, {}),
    ("sdpo", {"alpha": 0.5}, None, ONE_SEQUENCE),
    # SDPO as run: every sample counts in the mean, those without teacher signal (record 1) as 0
    ("sdpo", {"alpha": 0.5, "loss_agg": "seq-mean-token-mean-all"}, None, {}),
    ("sdpo", {"alpha": 0.5, "loss_agg": "seq-mean-token-mean-all"}, None, ONE_SEQUENCE),
    ("opsd", {}, None, {}),
    ("grpo", {"clip_ratio_c": 3.0}, {"normalize_std": True}, {}),
    ("grpo", {"clip_ratio_c": 3.0}, {"normalize_std": True}, ONE_SEQUENCE),
    ("sft", {"loss_agg": "seq-mean-token-mean"}, None, {}),
    # packed forwards (no padded position computed), with and without a budget that splits groups
    ("distil", {"baseline": "group"}, None, {"packed_sequences": True}),
    ("distil", {"baseline": "group"}, None, {"packed_sequences": True, "max_tokens_per_micro_batch": 64}),
    ("grpo", {}, {"normalize_std": True}, {"packed_sequences": True}),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algorithm,loss_kwargs,advantage_kwargs,learner", CASES,
                         ids=[c[0] + "".join(f"-{k}" for k in c[3]) for c in CASES])
def test_micro_batched_step_equals_one_full_batch_step(setup, algorithm, loss_kwargs, advantage_kwargs, learner):
    path, tok, records = setup
    worker = new_worker(path, algorithm, loss_kwargs, advantage_kwargs, micro_batch_size=2, **learner)
    try:
        metrics = worker.train_step(records)
        state = worker.state_dict_numpy()
    finally:
        worker.close()
    assert metrics["num_micro_batches"] >= 2  # really accumulated
    if learner == ONE_SEQUENCE:  # one record per micro-batch: every group was split
        assert metrics["num_micro_batches"] == metrics["num_sequences"]
    if learner:  # one sequence per micro-batch, or packed: no padded position computed
        assert metrics["learner/padding_fraction"] == 0
    reference, _ = load_tiny(path)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_loss, ref_norm = reference_step(reference, records, algorithm=algorithm, loss_kwargs=loss_kwargs,
                                        advantage_kwargs=advantage_kwargs, pad_id=tok.pad_token_id, **STEP)
    after = reference.state_dict()
    assert set(state) == set(after)
    moved = max(float((after[k] - before[k]).abs().max()) for k in after)
    assert moved > 1e-4  # the step is large enough for the comparison to mean something
    for k in after:
        np.testing.assert_allclose(state[k], after[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert np.isfinite(metrics["loss"]) and metrics["lr"] == STEP["lr"]


@pytest.mark.parametrize("section,key,value,name", [("algorithm", "name", "ppo", "algorithm.name"),
                                                    ("learner", "backend", "mpi", "learner.backend"),
                                                    ("learner", "dtype", "float8", "learner.dtype")])
def test_bad_settings_name_the_key(section, key, value, name):
    cfg, algo = LearnerConfig(world_size=1), AlgorithmConfig("distil")
    setattr(cfg if section == "learner" else algo, key, value)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LearnerWorker(str(tiny_model_dir()), cfg, algo, Rendezvous(0, 1, "127.0.0.1", 1))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algorithm,loss_kwargs", [("distil", {"baseline": "group"}), ("grpo", {})])
def test_activation_checkpointing_takes_the_same_step(setup, algorithm, loss_kwargs):
    """Recomputing each layer in the backward changes memory, never the gradient."""
    path, tok, records = setup
    results = {}
    for checkpointing in (False, True):
        worker = new_worker(path, algorithm, loss_kwargs, micro_batch_size=2, activation_checkpointing=checkpointing)
        try:
            assert worker.model.is_gradient_checkpointing == checkpointing
            results[checkpointing] = worker.train_step(records), worker.state_dict_numpy()
        finally:
            worker.close()
    (m_off, s_off), (m_on, s_on) = results[False], results[True]
    assert m_on["loss"] == pytest.approx(m_off["loss"], rel=1e-6) and m_on["grad_norm"] == pytest.approx(m_off["grad_norm"], rel=1e-6)
    for k in s_off:
        np.testing.assert_allclose(s_on[k], s_off[k], rtol=0, atol=1e-7, err_msg=k)


def test_step_metrics_describe_memory_padding_and_throughput(setup):
    path, tok, records = setup
    worker = new_worker(path, "ce", micro_batch_size=4)
    try:
        m = worker.train_step(records)
    finally:
        worker.close()
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in records if r.distill_mask and len(r.response_ids)]
    assert 0.0 <= m["learner/padding_fraction"] < 1.0 and m["learner/peak_memory_mb"] > 100
    assert m["learner/max_micro_batch_tokens"] <= 4 * max(lengths)
    assert m["learner/tokens_per_s"] == pytest.approx(sum(lengths) / m["time_s"], rel=1e-6)


@pytest.mark.timeout(240)
def test_bfloat16_compute_keeps_float32_master_weights(setup):
    path, tok, records = setup
    results = {}
    for dtype in ("float32", "bfloat16"):
        worker = new_worker(path, "ce", micro_batch_size=8, dtype=dtype)
        try:
            results[dtype] = worker.train_step(records), worker.state_dict_numpy()
        finally:
            worker.close()
    (m32, s32), (m16, s16) = results["float32"], results["bfloat16"]
    assert all(v.dtype == np.float32 for v in s16.values())
    assert m16["loss"] == pytest.approx(m32["loss"], rel=2e-2)  # bf16 logits, same loss
    # the weights took the same step, up to the bf16 rounding of the gradient
    initial = {k: v.numpy() for k, v in load_tiny(path)[0].state_dict().items()}
    d32 = np.concatenate([(s32[k] - initial[k]).ravel() for k in initial])
    d16 = np.concatenate([(s16[k] - initial[k]).ravel() for k in initial])
    assert np.linalg.norm(d32) > 1e-3
    assert np.linalg.norm(d16 - d32) < 0.1 * np.linalg.norm(d32)


@pytest.mark.timeout(240)
def test_the_ema_is_exact_on_the_shards_and_survives_a_checkpoint(setup, tmp_path):
    """θ_T ← (1 − r)·θ_T + r·θ after each step, from the starting weights, against float64 numpy;
    a checkpoint brings the average back exactly."""
    path, tok, records = setup
    rate = 0.3
    cfg = LearnerConfig(lr=1e-2, world_size=1, micro_batch_size=4)  # Adam steps of ~lr: the weights move
    worker = LearnerWorker(str(path), cfg, AlgorithmConfig("ce"), Rendezvous(0, 1, "127.0.0.1", free_port()),
                           ema_rate=rate)
    try:
        expected = {k: v.astype(np.float64) for k, v in worker.state_dict_numpy().items()}
        for _ in range(3):
            worker.train_step(records)
            worker.advance_ema()
            policy = worker.state_dict_numpy()
            expected = {k: (1 - rate) * v + rate * policy[k] for k, v in expected.items()}
        ema = worker.weights("float32", "ema").arrays
        assert ema.keys() <= expected.keys()
        assert max(np.abs(ema[k] - policy[k]).max() for k in ema) > 1e-4  # the average lags the policy
        for k in ema:
            np.testing.assert_allclose(ema[k], expected[k], rtol=0, atol=1e-6, err_msg=k)
        worker.save_checkpoint(str(tmp_path / "ckpt"), {})
        worker.advance_ema()  # moved after the save: the load must undo it
        worker.load_checkpoint(str(tmp_path / "ckpt"))
        for k, v in worker.weights("float32", "ema").arrays.items():
            np.testing.assert_array_equal(v, ema[k])
    finally:
        worker.close()
    with pytest.raises(ValueError, match="ema_rate"):
        LearnerWorker(str(path), cfg, AlgorithmConfig("ce"), Rendezvous(0, 1, "127.0.0.1", 1), ema_rate=0.0)


@pytest.mark.timeout(240)
def test_two_factor_updates_after_the_first_measure_from_the_batch_start_policy(setup):
    """is_mode=two_factor: the second update on a batch gets π_old = the weights before the first
    update (SDPO recomputes it before its mini-batches), the first gets none (π_old = π_θ)."""
    import dataclasses
    import functools

    import torch

    from distil_ray.learner.forward import response_logprobs
    from distil_ray.learner.packing import pack

    path, tok, records = setup
    worker = new_worker(path, "sdpo", {"is_mode": "two_factor", "is_clip": 2.0}, micro_batch_size=16)
    seen = []
    real = worker.algorithm.loss_fn

    @functools.wraps(real)
    def spy(*args, **kwargs):
        seen.append(kwargs.get("old_logprobs"))
        return real(*args, **kwargs)

    worker.algorithm = dataclasses.replace(worker.algorithm, loss_fn=spy)
    first, second = records[:6], records[6:]
    try:
        worker.train_step(first, first_of_batch=True)
        worker.train_step(second, first_of_batch=False)
    finally:
        worker.close()
    assert seen[0] is None and seen[1] is not None
    start, _ = load_tiny(path)  # the batch-start policy: the starting weights
    kept = [r for r in second if r.distill_mask]
    batch = pack(kept, pad_id=tok.pad_token_id, topk=None, distill_only=True)
    with torch.no_grad():
        want = response_logprobs(start.eval(), batch.input_ids, batch.attention_mask, batch.response_mask, None).token_logprobs
    got = seen[1][seen[1] != 0].numpy()  # the response columns of the worker's own layout
    want = want[batch.response_mask.bool()].numpy()
    assert got.size == want.size
    # the rows may come in another order: compare the values as sets
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=0, atol=2e-5)
