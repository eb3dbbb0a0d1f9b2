"""From ``Scored`` records to the padded tensors the learner computes on, and how a batch is split.

Layout: one row per record, ``prompt_ids + response_ids`` left-padded to the longest row, so every
response ends at the last column. Response token ``t`` of a row of width ``L`` with a response of
length ``T`` sits at column ``L − T + t``; that column is where its label sits for
:func:`~distil_ray.learner.forward.response_logprobs` (it reads the hidden state one column
earlier), so per-token inputs (teacher top-k, behaviour log-probs) go to the same columns.

Splitting keeps the records of one prompt together: group-relative advantages and the
leave-one-out baseline need the whole group in one place.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from distil_ray.records import Scored


@dataclass
class Batch:
    input_ids: Tensor  # [B, L] long, left-padded prompt + response
    attention_mask: Tensor  # [B, L] long, 1 on real tokens
    response_mask: Tensor  # [B, L] long, 1 on response tokens that carry a loss
    topk_ids: Tensor | None  # [B, L, K] long, teacher top-k ids at response positions (0 elsewhere)
    teacher_topk_logprobs: Tensor | None  # [B, L, K] float32
    teacher_token_logprobs: Tensor  # [B, L] float32
    behaviour_logprobs: Tensor  # [B, L] float32
    rewards: Tensor  # [B] float32
    group_ids: Tensor  # [B] long, one id per distinct prompt_uid, in order of first appearance
    policy_versions: Tensor  # [B] long
    # [B, L] float32: a per-token baseline computed over whole groups beforehand (a group split
    # across micro-batches), at the response columns; None when the loss computes its own
    credit_baseline: Tensor | None = None
    # [B, L] float32: log π_old, the policy at the start of the batch's updates (is_mode=two_factor,
    # an update after the first), at the response columns; None otherwise
    old_logprobs: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_loss_sequences(self) -> int:
        return int((self.response_mask.sum(-1) > 0).sum())

    def to(self, device) -> "Batch":
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device)
                        for f in fields(self)})


def sequence_length(record: Scored) -> int:
    return len(record.prompt_ids) + len(record.response_ids)


def pack(records: Sequence[Scored], *, pad_id: int, topk: int | None, distill_only: bool = False,
         credit_baseline: Sequence[np.ndarray] | None = None) -> Batch:
    """Left-pad ``records`` into a :class:`Batch`.

    ``topk``: how many of the teacher's top-k columns to use (the first ``topk``, i.e. the most
    likely ones), or None for algorithms without a teacher. ``distill_only``: the response mask is
    0 for records whose ``distill_mask`` is False (no feedback, so no teacher signal).
    ``credit_baseline``: one ``[T]`` array per record, placed at its response columns.
    """
    if not records:
        raise ValueError("pack needs at least one record")
    B = len(records)
    L = max(sequence_length(r) for r in records)
    input_ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.long)
    teacher_token = torch.zeros(B, L, dtype=torch.float32)
    behaviour = torch.zeros(B, L, dtype=torch.float32)
    topk_ids = teacher_topk = None
    if topk is not None:
        if topk < 1:
            raise ValueError(f"topk={topk!r}: must be >= 1 (or None without a teacher)")
        topk_ids = torch.zeros(B, L, topk, dtype=torch.long)
        teacher_topk = torch.zeros(B, L, topk, dtype=torch.float32)
    group_of: dict[str, int] = {}
    group_ids = torch.empty(B, dtype=torch.long)
    for i, r in enumerate(records):
        P, T = len(r.prompt_ids), len(r.response_ids)
        if P == 0:
            raise ValueError(f"record {r.prompt_uid!r}/{r.sample_index} has an empty prompt: its first "
                             "response token has no state to be predicted from")
        start, resp = L - P - T, L - T  # first real column, first response column
        input_ids[i, start:resp] = torch.from_numpy(np.asarray(r.prompt_ids, dtype=np.int64))
        input_ids[i, resp:] = torch.from_numpy(np.asarray(r.response_ids, dtype=np.int64))
        attention_mask[i, start:] = 1
        if not distill_only or r.distill_mask:
            response_mask[i, resp:] = 1
        behaviour[i, resp:] = _per_token(r.behaviour_logprobs, T, "behaviour_logprobs", r)
        if len(r.teacher_token_logprobs):
            teacher_token[i, resp:] = _per_token(r.teacher_token_logprobs, T, "teacher_token_logprobs", r)
        if topk is not None and (T > 0 and (not distill_only or r.distill_mask)):
            ids, lps = np.asarray(r.teacher_topk_ids), np.asarray(r.teacher_topk_logprobs)
            if ids.ndim != 2 or ids.shape[0] != T or ids.shape[1] < topk or lps.shape != ids.shape:
                raise ValueError(
                    f"record {r.prompt_uid!r}/{r.sample_index}: teacher_topk_ids/logprobs have shapes "
                    f"{ids.shape}/{lps.shape}, need [T={T}, k>={topk}] (is the teacher's k smaller than "
                    f"the learner's topk, or was the record not scored?)")
            topk_ids[i, resp:] = torch.from_numpy(ids[:, :topk].astype(np.int64))
            teacher_topk[i, resp:] = torch.from_numpy(lps[:, :topk].astype(np.float32))
        group_ids[i] = group_of.setdefault(r.prompt_uid, len(group_of))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        topk_ids=topk_ids,
        teacher_topk_logprobs=teacher_topk,
        teacher_token_logprobs=teacher_token,
        behaviour_logprobs=behaviour,
        rewards=torch.tensor([float(r.reward) for r in records], dtype=torch.float32),
        group_ids=group_ids,
        policy_versions=torch.tensor([int(r.policy_version) for r in records], dtype=torch.long),
        credit_baseline=None if credit_baseline is None else at_response_columns(credit_baseline, records, L),
    )


def at_response_columns(values: Sequence[np.ndarray], records: Sequence[Scored], width: int) -> Tensor:
    """One ``[T]`` array per record placed at its response columns of a left-padded ``[B, width]``."""
    out = torch.zeros(len(records), width, dtype=torch.float32)
    for i, (v, r) in enumerate(zip(values, records)):
        T = len(r.response_ids)
        if T:
            out[i, width - T:] = _per_token(v, T, "credit_baseline", r)
    return out


def at_response_columns_ids(values: Sequence[np.ndarray], records: Sequence[Scored], width: int) -> Tensor:
    """One ``[T, K]`` id array per record at its response columns of a left-padded ``[B, width, K]``."""
    ks = {int(np.shape(v)[1]) for v in values}
    if len(ks) != 1:
        raise ValueError(f"at_ids: every record needs the same number of ids per position, got {sorted(ks)}")
    out = torch.zeros(len(records), width, ks.pop(), dtype=torch.long)
    for i, (v, r) in enumerate(zip(values, records)):
        T = len(r.response_ids)
        if np.shape(v)[0] != T:
            raise ValueError(f"at_ids for {r.prompt_uid!r}/{r.sample_index}: {np.shape(v)[0]} rows for {T} tokens")
        out[i, width - T:] = torch.from_numpy(np.asarray(v, dtype=np.int64))
    return out


def _per_token(values, T: int, name: str, r: Scored) -> Tensor:
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape != (T,):
        raise ValueError(f"record {r.prompt_uid!r}/{r.sample_index}: {name} has shape {arr.shape}, "
                         f"the response has {T} tokens")
    return torch.from_numpy(arr)


def _groups(records: Sequence[Scored]) -> list[list[Scored]]:
    """Records grouped by prompt_uid, groups in order of first appearance, records in input order."""
    groups: OrderedDict[str, list[Scored]] = OrderedDict()
    for r in records:
        groups.setdefault(r.prompt_uid, []).append(r)
    return list(groups.values())


def balanced_split(keys: Sequence[str], sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of items split over ``world_size`` parts: items with equal keys stay together,
    parts balanced by summed size.

    Greedy longest-first: each key's items (largest total first) go to the part with the smallest
    total so far (ties: fewest items, then lowest part). Indices keep their input order within a
    part. A part may be empty when there are fewer keys than parts.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be >= 1")
    if len(keys) != len(sizes):
        raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes: one of each per item")
    members: OrderedDict[str, list[int]] = OrderedDict()
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = list(members.values())
    totals = [sum(sizes[i] for i in g) for g in groups]
    load, count = [0] * world_size, [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for g in sorted(range(len(groups)), key=lambda g: (-totals[g], g)):
        part = min(range(world_size), key=lambda k: (load[k], count[k], k))
        parts[part].extend(groups[g])
        load[part] += totals[g]
        count[part] += len(groups[g])
    return [sorted(p) for p in parts]


def split_groups(records: Sequence[Scored], world_size: int) -> list[list[Scored]]:
    """Split a batch over ``world_size`` ranks: whole prompt groups (same ``prompt_uid``),
    balanced by token count (prompt + response) with :func:`balanced_split`."""
    parts = balanced_split([r.prompt_uid for r in records], [sequence_length(r) for r in records], world_size)
    return [[records[i] for i in part] for part in parts]


def token_budget_micro_batches(records: Sequence[Scored], max_tokens: int, max_rows: int) -> list[list[Scored]]:
    """Micro-batches whose padded size (rows × longest row) stays within ``max_tokens``, at most
    ``max_rows`` records each; a record longer than the budget gets one of its own.

    Records are taken longest first, so each micro-batch holds sequences of similar length and
    left padding stays small; groups are split wherever the budget falls (a loss that needs the
    whole group gets its group statistics computed beforehand).
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_tokens={max_tokens!r}, max_rows={max_rows!r}: both must be >= 1")
    order = sorted(range(len(records)), key=lambda i: (-sequence_length(records[i]), i))
    out: list[list[Scored]] = []
    current: list[Scored] = []
    for i in order:
        r = records[i]
        # sorted longest first: the micro-batch's first record sets its width
        width = sequence_length(current[0]) if current else sequence_length(r)
        if current and (len(current) >= max_rows or (len(current) + 1) * width > max_tokens):
            out.append(current)
            current = []
        current.append(r)
    if current:
        out.append(current)
    return out


def micro_batches(
    records: Sequence[Scored], micro_batch_size: int, *, split_large_groups: bool = True
) -> list[list[Scored]]:
    """Consecutive micro-batches of at most ``micro_batch_size`` records made of whole groups.

    A group larger than ``micro_batch_size`` is cut into full micro-batches when
    ``split_large_groups`` (memory first), or kept whole as one oversized micro-batch otherwise
    (for losses whose baseline needs every sibling in the same call).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r}: must be >= 1")
    out: list[list[Scored]] = []
    current: list[Scored] = []
    for group in _groups(records):
        if len(group) > micro_batch_size:
            if current:
                out.append(current)
                current = []
            if split_large_groups:
                out.extend(group[i:i + micro_batch_size] for i in range(0, len(group), micro_batch_size))
            else:
                out.append(list(group))
            continue
        if len(current) + len(group) > micro_batch_size:
            out.append(current)
            current = []
        current.extend(group)
    if current:
        out.append(current)
    return out
