"""Packing Scored records into the learner's tensors, and splitting a batch over ranks and
micro-batches."""

import numpy as np
import pytest
import torch

from distil_ray.learner.forward import response_logprobs
from distil_ray.learner.packing import (
    balanced_split,
    micro_batches,
    pack,
    sequence_length,
    split_groups,
)
from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.records import Scored
from distil_ray.engines.hf import score_topk

PAD = 1


def rec(uid, prompt, response, *, k=2, distill=True, reward=0.0, version=0, index=0):
    T = len(response)
    ids = np.arange(100, 100 + T * k, dtype=np.int32).reshape(T, k)
    return Scored(
        prompt_uid=uid, sample_index=index, response_ids=np.asarray(response, np.int32),
        behaviour_logprobs=-np.arange(1, T + 1, dtype=np.float32) / 10, finish_reason="stop",
        policy_version=version, text="", prompt_ids=np.asarray(prompt, np.int32), reward=reward,
        teacher_topk_ids=ids, teacher_topk_logprobs=-ids.astype(np.float32) / 1000,
        teacher_token_logprobs=-np.arange(1, T + 1, dtype=np.float32), distill_mask=distill,
    )


def test_pack_exact_layout_left_padded():
    records = [
        rec("a", [5, 6, 7], [8, 9], reward=1.0, version=3),
        rec("b", [5], [20, 21, 22], distill=False, reward=0.5, version=2),
        rec("a", [4, 4], [], reward=0.0, version=3),
    ]
    b = pack(records, pad_id=PAD, topk=1)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [PAD, 5, 20, 21, 22], [PAD, PAD, PAD, 4, 4]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    # the teacher's row t sits on the column of response token t; only the first topk columns
    assert b.topk_ids.shape == (3, 5, 1)
    assert b.topk_ids[0, :, 0].tolist() == [0, 0, 0, 100, 102]
    assert b.topk_ids[1, :, 0].tolist() == [0, 0, 100, 102, 104]
    assert b.teacher_topk_logprobs[0, :, 0].tolist() == pytest.approx([0, 0, 0, -0.1, -0.102])
    assert b.teacher_token_logprobs[1].tolist() == [0, 0, -1, -2, -3]
    assert b.behaviour_logprobs[0].tolist() == pytest.approx([0, 0, 0, -0.1, -0.2])
    assert b.rewards.tolist() == [1.0, 0.5, 0.0]
    assert b.group_ids.tolist() == [0, 1, 0]  # by prompt_uid, in order of first appearance
    assert b.policy_versions.tolist() == [3, 2, 3]
    assert b.input_ids.dtype == b.topk_ids.dtype == torch.long
    assert (b.num_loss_tokens, b.num_loss_sequences) == (5, 2)


def test_pack_distill_only_masks_records_without_feedback():
    records = [rec("a", [5, 6], [8, 9]), rec("b", [5], [20, 21, 22], distill=False)]
    b = pack(records, pad_id=PAD, topk=2, distill_only=True)
    assert b.response_mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert b.topk_ids[1].abs().sum() == 0  # nothing of a masked record leaks in
    assert b.topk_ids[0, 2].tolist() == [100, 101]


def test_pack_without_teacher_and_errors():
    b = pack([rec("a", [5], [8])], pad_id=PAD, topk=None)
    assert b.topk_ids is None and b.teacher_topk_logprobs is None
    with pytest.raises(ValueError, match="k>=3"):
        pack([rec("a", [5], [8], k=2)], pad_id=PAD, topk=3)
    with pytest.raises(ValueError, match="empty prompt"):
        pack([rec("a", [], [8])], pad_id=PAD, topk=None)
    bad = rec("a", [5], [8, 9])
    bad.behaviour_logprobs = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        pack([bad], pad_id=PAD, topk=None)


def test_packed_positions_are_where_response_logprobs_reads_labels():
    """The packed batch through ``response_logprobs`` gives, per record, the same log-probs as an
    unpadded one-row forward (``score_topk``) — sampled tokens and top-k ids alike."""
    model, tok = load_tiny(tiny_model_dir())
    rng = np.random.default_rng(0)
    prompts = [[3, 10, 11, 12], [3, 40], [3, 7, 8, 9, 10, 11]]
    responses = [rng.integers(3, len(tok), n).tolist() for n in (5, 2, 3)]
    scores = score_topk(model, prompts, responses, 4)
    records = [rec(f"u{i}", p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
    for r, s in zip(records, scores):
        r.teacher_topk_ids = s.topk_ids.numpy().astype(np.int32)
        r.teacher_topk_logprobs = s.topk_logprobs.numpy()
    b = pack(records, pad_id=tok.pad_token_id, topk=4)
    with torch.no_grad():
        out = response_logprobs(model, b.input_ids, b.attention_mask, b.response_mask, b.topk_ids)
    for i, (r, s) in enumerate(zip(responses, scores)):
        T = len(r)
        torch.testing.assert_close(out.token_logprobs[i, -T:], s.token_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.topk_logprobs[i, -T:], s.topk_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.teacher_topk_logprobs[i, -T:], s.topk_logprobs)


def group_batch():
    # 5 prompts with 1..4 samples of different lengths
    records, lengths = [], {"a": 30, "b": 5, "c": 12, "d": 7, "e": 20}
    sizes = {"a": 3, "b": 4, "c": 2, "d": 1, "e": 2}
    for uid in "abcdeabcdeabcdeabcde":
        if sum(r.prompt_uid == uid for r in records) < sizes[uid]:
            records.append(rec(uid, [5] * 4, [8] * lengths[uid]))
    return records


def test_split_groups_keeps_groups_whole_and_balances_tokens():
    records = group_batch()
    shards = split_groups(records, 2)
    assert sorted(map(id, sum(shards, []))) == sorted(map(id, records))  # a partition
    for uid in "abcde":
        assert sum(any(r.prompt_uid == uid for r in s) for s in shards) == 1, uid
    loads = [sum(sequence_length(r) for r in s) for s in shards]
    # group token totals: a 102, e 48, b 36, c 32, d 11 -> the best split is a+d / b+c+e
    assert sorted(loads) == [113, 116]
    for s in shards:  # input order kept within a rank
        idx = [next(i for i, x in enumerate(records) if x is r) for r in s]
        assert idx == sorted(idx)


def test_split_groups_more_ranks_than_groups():
    records = [rec("a", [5], [8]), rec("a", [5], [9]), rec("b", [5], [8, 8])]
    shards = split_groups(records, 3)
    assert [len(s) for s in shards] == [2, 1, 0]


def test_balanced_split_by_keys():
    assert balanced_split(["x", "y", "x", "z"], [1, 5, 1, 2], 2) == [[1], [0, 2, 3]]
    with pytest.raises(ValueError, match="world_size"):
        balanced_split(["x"], [1], 0)


def test_micro_batches_keep_groups_whole():
    records = group_batch()  # groups of 3, 4, 2, 1, 2 records (in order of first appearance)
    mbs = micro_batches(records, 4)
    assert [len(m) for m in mbs] == [3, 4, 3, 2]
    for m in mbs:
        for uid in {r.prompt_uid for r in m}:
            assert sum(r.prompt_uid == uid for r in m) == sum(r.prompt_uid == uid for r in records)
    # a group larger than the micro-batch size: cut, or kept whole on request
    assert [len(m) for m in micro_batches(records, 2)] == [2, 1, 2, 2, 2, 1, 2]
    assert [len(m) for m in micro_batches(records, 2, split_large_groups=False)] == [3, 4, 2, 1, 2]


def _record(uid: str, index: int, prompt: int, response: int) -> Scored:
    return Scored(prompt_uid=uid, sample_index=index, response_ids=np.ones(response, np.int32),
                  behaviour_logprobs=np.zeros(response, np.float32), finish_reason="stop", policy_version=0,
                  text="", prompt_ids=np.ones(prompt, np.int32))


def test_token_budget_micro_batches_cover_every_record_within_the_budget():
    from distil_ray.learner.packing import sequence_length, token_budget_micro_batches

    rng = np.random.default_rng(0)
    records = [_record(f"g{g}", i, 5, int(rng.integers(1, 60))) for g in range(4) for i in range(8)]
    records.append(_record("long", 0, 5, 200))  # longer than the budget on its own
    parts = token_budget_micro_batches(records, max_tokens=128, max_rows=6)
    assert sorted(id(r) for p in parts for r in p) == sorted(id(r) for r in records)  # each record once
    for part in parts:
        width = max(map(sequence_length, part))
        assert len(part) <= 6 and (len(part) * width <= 128 or len(part) == 1)
    lengths = [sequence_length(r) for p in parts for r in p]
    assert lengths == sorted(lengths, reverse=True)  # longest first: little padding
    assert [sequence_length(r) for r in parts[0]] == [205]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_micro_batches(records, max_tokens=0, max_rows=1)


def test_a_credit_baseline_lands_on_the_response_columns():
    from distil_ray.learner.packing import pack

    records = [_record("g", 0, 2, 3), _record("g", 1, 1, 1)]
    batch = pack(records, pad_id=0, topk=None, credit_baseline=[np.array([1.0, 2.0, 3.0]), np.array([7.0])])
    assert batch.credit_baseline.tolist() == [[0.0, 0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 7.0]]
    assert (batch.credit_baseline != 0).eq(batch.response_mask.bool()).all()
