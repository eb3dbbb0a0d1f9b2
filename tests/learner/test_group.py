"""LearnerGroup on a real local Ray cluster: two FSDP2 ranks (gloo) as named actors.

One step on a real batch must equal one step of a plain single-process model on ONE loss over
the whole batch (that proves the sharding, the LM head used outside the HF forward, and the global
normalisation over ranks and micro-batches); checkpoints must resume to the identical next step.
"""

import dataclasses

import numpy as np
import pytest
import ray
import torch

from distil_ray.config import AlgorithmConfig, LearnerConfig
from distil_ray.learner.group import LearnerGroup
from distil_ray.learner.packing import sequence_length, split_groups
from distil_ray.models import load_tiny, tiny_model_dir

from .learner_data import make_records, reference_step

WARMUP = 2  # the first step runs at lr / 2: a resumed run must restore the scheduler to match
STEP = dict(lr=1e-2, eps=1.0, weight_decay=0.01, grad_clip=1.0)
ALGO = dict(algorithm="distil", loss_kwargs={"baseline": "group", "loss_agg": "token-mean"})


@pytest.fixture(scope="module")
def data():
    path = tiny_model_dir()
    model, tok = load_tiny(path)
    # 6 prompts x 3 samples of uneven lengths: the ranks get different token counts
    first = make_records(model, tok, n_prompts=6, samples=3, seed=2, no_signal=(4,))
    second = make_records(model, tok, n_prompts=6, samples=3, seed=3, no_signal=())
    return path, tok, first, second


def learner_config(**kwargs) -> LearnerConfig:
    return LearnerConfig(world_size=2, num_cpus=0.5, micro_batch_size=2, lr=STEP["lr"], adam_eps=STEP["eps"],
                         weight_decay=STEP["weight_decay"], grad_clip=STEP["grad_clip"], **kwargs)


def algorithm_config(algorithm, loss_kwargs, advantage_kwargs=None) -> AlgorithmConfig:
    return AlgorithmConfig(algorithm, dict(loss_kwargs), dict(advantage_kwargs or {}))


def new_group(path, name):
    return LearnerGroup(str(path), learner_config(warmup_steps=WARMUP), algorithm_config(**ALGO), name=name)


@pytest.fixture(scope="module")
def group(ray_cluster, data):
    g = new_group(data[0], "learner-test")
    yield g
    g.shutdown()


@pytest.mark.timeout(300)
def test_step_matches_single_process_reference(group, data):
    path, tok, records, _ = data
    loads = [sum(map(sequence_length, s)) for s in split_groups(records, 2)]
    assert loads[0] != loads[1]  # uneven shards: a per-rank normalisation would be caught

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert {"learner-test-0", "learner-test-1"} <= names
    probe_prompt, probe_response = records[0].prompt_ids.tolist(), records[0].response_ids.tolist()
    lp_before = group.sequence_logprobs(probe_prompt, probe_response)
    before = ray.get(group.state_dict_ref())

    metrics = group.train_step(records)
    ref = ray.get(group.state_dict_ref())

    reference, _ = load_tiny(path)
    assert {k: v.numpy() for k, v in reference.state_dict().items()}.keys() == before.keys()
    for k, v in reference.state_dict().items():
        np.testing.assert_array_equal(before[k], v.numpy(), err_msg=k)
    ref_loss, ref_norm = reference_step(reference, records, **ALGO, pad_id=tok.pad_token_id,
                                        **dict(STEP, lr=STEP["lr"] / WARMUP))
    expected = reference.state_dict()
    assert ref.keys() == expected.keys()
    assert max(float(np.abs(ref[k] - before[k]).max()) for k in ref) > 1e-4  # weights changed
    for k, v in expected.items():
        assert ref[k].dtype == np.float32
        np.testing.assert_allclose(ref[k], v.numpy(), rtol=0, atol=1e-5, err_msg=k)
    assert np.isfinite(metrics["loss"])
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert metrics["lr"] == pytest.approx(STEP["lr"] / WARMUP)
    n_tokens = sum(len(r.response_ids) for r in records if r.distill_mask)
    assert metrics["num_tokens"] == n_tokens == metrics["distil/num_tokens"]

    lp_after = group.sequence_logprobs(probe_prompt, probe_response)
    assert len(lp_after) == len(probe_response)
    assert max(abs(a - b) for a, b in zip(lp_after, lp_before)) > 1e-4
    # the policy's log-probs are those of the reference model with the same weights
    with torch.no_grad():
        ids = torch.tensor([probe_prompt + probe_response])
        logp = torch.log_softmax(reference.eval()(ids).logits[0, :-1].float(), -1)
        want = logp[len(probe_prompt) - 1:].gather(-1, ids[0, len(probe_prompt):, None])[:, 0]
    np.testing.assert_allclose(lp_after, want.numpy(), atol=1e-4)


@pytest.mark.timeout(300)
def test_checkpoint_resume_gives_the_identical_next_step(group, data, tmp_path):
    path, tok, records, second = data
    ckpt = tmp_path / "ckpt"
    extra = {"step": 1, "data_position": 18, "rng": np.random.default_rng(0).bit_generator.state}
    group.save_checkpoint(str(ckpt), extra)
    assert (ckpt / "learner_state.pkl").is_file() and (ckpt / "dcp").is_dir()

    # the uninterrupted run; its batch goes as ObjectRefs, one per prompt group
    groups = {}
    for r in second:
        groups.setdefault(r.prompt_uid, []).append(r)
    refs = [ray.put(g) for g in groups.values()]
    m_cont = group.train_step(refs, sizes=[sum(map(sequence_length, g)) for g in groups.values()])
    continued = ray.get(group.state_dict_ref())

    resumed_group = new_group(path, "learner-resumed")
    try:
        assert resumed_group.load_checkpoint(str(ckpt)) == extra
        m_res = resumed_group.train_step(second)
        resumed = ray.get(resumed_group.state_dict_ref())
        hf_dir = tmp_path / "hf"
        resumed_group.save_hf(str(hf_dir))
    finally:
        resumed_group.shutdown()
    assert m_res["lr"] == m_cont["lr"] == pytest.approx(STEP["lr"])  # the scheduler came back
    assert m_res["loss"] == pytest.approx(m_cont["loss"], rel=1e-6)
    for k in continued:
        np.testing.assert_allclose(resumed[k], continued[k], rtol=0, atol=1e-6, err_msg=k)

    # the Hugging Face export loads with the Auto classes and holds the same weights
    model, tokenizer = load_tiny(hf_dir)
    assert tokenizer.pad_token == tok.pad_token
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), resumed[k], err_msg=k)


IDLE_RANK_CASES = [
    # GRPO, old log-probs from the behaviour policy, std-normalised group advantages
    (dict(algorithm="grpo", loss_kwargs={"clip_eps_low": 0.2}, advantage_kwargs={"normalize_std": True}), {}, 2),
    # DistIL's group baseline with a budget of one sequence: the baseline pre-pass and the step,
    # each with rank 1's idle forwards
    (dict(algorithm="distil", loss_kwargs={"baseline": "group"}), {"max_tokens_per_micro_batch": 1}, 3),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algo,learner,n_micro", IDLE_RANK_CASES, ids=["grpo", "distil-group-budget"])
def test_rank_without_records_joins_with_idle_micro_batches(ray_cluster, data, algo, learner, n_micro):
    """One prompt group: rank 1 gets nothing and must still run the collectives of rank 0's
    micro-batches (zero-weighted); the step equals the single-process reference."""
    path, tok, records, _ = data
    one_group = [dataclasses.replace(r, reward=float(i == 0)) for i, r in enumerate(records)
                 if r.prompt_uid == records[0].prompt_uid]  # one success: a non-zero advantage
    assert [len(s) for s in split_groups(one_group, 2)] == [3, 0]
    # with activation checkpointing: the recompute re-gathers each layer's shards on both ranks
    g = LearnerGroup(str(path), learner_config(activation_checkpointing=True, **learner), algorithm_config(**algo),
                     name=f"learner-idle-{algo['algorithm']}")
    try:
        metrics = g.train_step(one_group)
        state = ray.get(g.state_dict_ref())
    finally:
        g.shutdown()
    reference, _ = load_tiny(path)
    ref_loss, ref_norm = reference_step(reference, one_group, **algo, pad_id=tok.pad_token_id, **STEP)
    assert metrics["num_micro_batches"] == n_micro
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5) and ref_norm > 0
    for k, v in reference.state_dict().items():
        np.testing.assert_allclose(state[k], v.numpy(), rtol=0, atol=1e-5, err_msg=k)


def test_bad_settings_fail_in_the_driver_before_any_actor_starts():
    with pytest.raises(ValueError, match=r"algorithm\.name"):
        LearnerGroup("unused", LearnerConfig(), AlgorithmConfig("ppo"))
    with pytest.raises(ValueError, match=r"learner\.dtype"):
        LearnerGroup("unused", LearnerConfig(dtype="float16"), AlgorithmConfig("sft"))
    with pytest.raises(ValueError, match=r"learner\.world_size"):
        LearnerGroup("unused", LearnerConfig(world_size=0), AlgorithmConfig("sft"))
