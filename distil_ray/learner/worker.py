"""One learner rank: a Hugging Face causal LM sharded with FSDP2, trained on ``Scored`` records.

A plain class (tests drive it in one process; :class:`~distil_ray.learner.group.LearnerGroup`
wraps it in a Ray actor). Every method that touches the model is *collective*: all ranks of the
process group must call it, in the same order.

How the pieces fit:

* **Sharding.** Each decoder layer is its own FSDP2 unit; the root unit is :class:`_PolicyCompute`,
  a module whose ``forward`` runs an arbitrary function of the policy. The embedding, the final
  norm and the LM head therefore belong to the root unit, and every computation (the chunked
  log-prob gathering reads the LM-head *weight* directly, outside the HF model's own forward) runs
  inside the root's forward, where FSDP has all-gathered those parameters; its backward hooks sit
  on the returned loss, so the head's gradient is reduce-scattered like any other.
* **One loss over the global batch.** Each micro-batch's loss is its sum divided by a *global*
  denominator (tokens or sequences, summed over all ranks and micro-batches), and multiplied by
  the world size because FSDP averages gradients over ranks. The accumulated gradient is then
  the gradient of one loss over the whole batch, whatever the split.
* **Equal collective counts.** Every forward/backward all-gathers and reduce-scatters, so all
  ranks run the same number of micro-batches; a rank with fewer pads with a zero-weighted one.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import pickle
import random
import shutil
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distil_ray.algorithms.advantages import group_relative_advantages
from distil_ray.config import COMPUTE_DTYPES, AlgorithmConfig, LearnerConfig, TeacherConfig
from distil_ray.engines.base import Weights
from distil_ray.learner.attention import register as register_packed_attention
from distil_ray.learner.forward import response_logprobs
from distil_ray.learner.loading import empty_causal_lm, materialise_and_load
from distil_ray.algorithms.losses import distil_returns
from distil_ray.learner.packing import (Batch, at_response_columns, at_response_columns_ids, micro_batches, pack,
                                        token_budget_micro_batches)
from distil_ray.records import Scored
from distil_ray.telemetry.reduce import MetricsSum

# The compute dtypes ``learner.dtype`` may name.
DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


def process_group_backend(backend: str) -> str:
    """What ``init_process_group`` is given for ``learner.backend``.

    NCCL serves CUDA tensors only, while a step's bookkeeping (token and sequence counts, timings,
    metric sums, pickled metrics) is a handful of CPU numbers. Under NCCL the group therefore pairs
    it with gloo for CPU tensors: those collectives need no device copy and no stream sync, and the
    model's collectives (FSDP's all-gathers and reduce-scatters on CUDA tensors) go to NCCL. Gloo
    alone serves both devices.
    """
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated since the last reset; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def free_port() -> int:
    """A TCP port free now (a process group's store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where this rank sits in the process group and how it finds the others."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


class _PolicyCompute(nn.Module):
    """The FSDP root: ``forward(fn, *args)`` returns ``fn(policy, *args)``.

    Running the whole loss computation as this module's forward is what makes FSDP unshard the
    root-level parameters (embedding, norm, LM head) for code that reads them directly.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn: Callable, *args):
        return fn(self.policy, *args)


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class LearnerWorker:
    def __init__(
        self,
        model_path: str,
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        rendezvous: Rendezvous,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        ema_rate: float | None = None,
        teacher: TeacherConfig | None = None,
    ):
        """``cfg``: the ``learner`` section; ``algorithm``: the ``algorithm`` section (loss and
        advantage settings); ``temperature``: the rollouts' sampling temperature, at which the
        learner scores the same tokens; ``ema_rate``: keep a moving average of the weights at this
        rate (``teacher.update=ema``: the EMA teacher's weights), None for none; ``teacher``: the
        ``teacher`` section when these ranks run the teacher themselves (``teacher.backend=learner``,
        see :meth:`score_teacher`), else None."""
        # Validate everything before joining the process group: a bad value must fail fast on
        # every rank instead of leaving the others waiting in init_process_group.
        cfg.check()
        algorithm.check()
        rank, world_size = rendezvous.rank, rendezvous.world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if ema_rate is not None and not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"ema_rate={ema_rate!r}: must lie in (0, 1]")
        if teacher is not None:
            teacher.check()
            if teacher.update == "ema" and ema_rate is None:
                raise ValueError("teacher.update=ema on the learner needs ema_rate (the average it scores with)")
        self.teacher_cfg = teacher
        self.cfg = cfg
        self.algorithm = algorithm.spec
        self.rank, self.world_size = rank, world_size
        self.model_path = str(model_path)
        self.loss_kwargs = algorithm.loss_kwargs()
        self.advantage_kwargs = dict(algorithm.advantages)
        self.temperature = temperature
        self.step = 0
        # The global denominator follows the loss's aggregation: tokens for token-mean, sequences
        # (with at least one loss token) for the per-sequence modes.
        self.per_token_denominator = self.loss_kwargs.get("loss_agg", "token-mean") == "token-mean"
        # SDPO's as-run mean: the samples without teacher signal count in the denominator too
        self.counts_unsignalled = self.loss_kwargs.get("loss_agg") == "seq-mean-token-mean-all"
        # SDPO's two-factor IS correction: later updates on a batch need π_old, the batch-start policy
        self.two_factor = self.loss_kwargs.get("is_mode") == "two_factor"
        self._batch_start: dict[str, torch.Tensor] | None = None
        # The leave-one-out baseline compares siblings: without a token budget groups stay whole in
        # one micro-batch; with one they are split and the baseline is computed over the group first.
        self.whole_groups = self.loss_kwargs.get("baseline", "none") == "group"
        # (ce switches future credit off: its loss never reads the baseline)
        future_credit = self.loss_kwargs.get("future_credit_coef", 0.0) != 0.0
        self.splits_groups = self.whole_groups and future_credit and cfg.max_tokens_per_micro_batch is not None

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        backend = cfg.backend
        if backend == "nccl":
            # Ray (or the launcher) exposes this rank's GPU as the only visible one.
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(
            process_group_backend(backend), rank=rank, world_size=world_size,
            init_method=f"tcp://{rendezvous.master_addr}:{rendezvous.master_port}",
            timeout=timedelta(seconds=cfg.collective_timeout_s),
        )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        self.mesh = init_device_mesh(self.device.type, (world_size,))
        # Master weights and optimizer state stay float32; a lower dtype is the compute dtype only.
        # Built without parameters, sharded, then filled shard by shard: see learner/loading.py.
        model = empty_causal_lm(self.model_path)
        model.train()
        if cfg.packed_sequences:
            # attention within each packed row by its boundaries: flash varlen on GPU, exact per-row
            # SDPA on CPU, never transformers' dense N × N mask over the pack (learner/attention.py)
            model.set_attn_implementation(register_packed_attention())
        if cfg.activation_checkpointing:
            # Each decoder layer keeps only its input and recomputes the rest in the backward; set
            # before fully_shard, so the recompute re-gathers that layer's shards like its forward.
            # The non-reentrant form keeps the gradient exact (tests compare it to 1e-6).
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        compute = DTYPES[cfg.dtype]
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=self.mesh,
                        mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32))
        self.root = _PolicyCompute(model)
        # The root's inputs are the loss inputs (teacher log-probs, advantages): they must keep
        # float32, so the root does not cast its forward arguments to the compute dtype.
        fully_shard(self.root, mesh=self.mesh, mp_policy=MixedPrecisionPolicy(
            param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False))
        # A rank whose micro-batch leaves some parameter without a gradient must still take part
        # in that parameter's reduce-scatter, or the ranks' collectives no longer match.
        self.root.set_reduce_scatter_unused_params(True)
        materialise_and_load(self.root, model, self.model_path, self.device)
        self.model = model
        self._channels: dict[str, Any] = {}  # weight-transfer groups to engines, by weight source
        # The EMA teacher's weights, kept here on each rank's float32 shards (exact, and no rank
        # ever holds the whole average): θ_T ← θ_T + rate·(θ − θ_T) at every advance_ema.
        self.ema_rate = ema_rate
        self.ema = {name: p.detach().clone() for name, p in model.named_parameters()} if ema_rate else None
        # A fixed teacher scored here keeps the starting weights the same way (never advanced).
        fixed_here = teacher is not None and teacher.update == "fixed"
        self.initial = {name: p.detach().clone() for name, p in model.named_parameters()} if fixed_here else None
        self.pad_id = self._pad_id(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)

    @staticmethod
    def _pad_id(model) -> int:
        pad = model.config.pad_token_id
        if pad is None:
            eos = model.config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        return int(pad or 0)

    # ------------------------------------------------------------------ training

    def train_step(self, records: Sequence[Scored], first_of_batch: bool = True) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch (see the module docstring).
        ``first_of_batch=False``: a later update on the same generation batch; with
        ``is_mode=two_factor`` its π_old is the policy as it was at the batch's first update."""
        t0 = time.perf_counter()
        algo = self.algorithm
        records = list(records)
        if self.two_factor:
            if first_of_batch:  # π_old of every later update on this batch: the weights as they are now
                self._batch_start = {name: _local(p.detach()).clone() for name, p in self.model.named_parameters()}
            elif self._batch_start is None:
                raise RuntimeError("train_step(first_of_batch=False) before a first update of the batch")
        rollout_sums = self._rollout_sums(records)
        if algo.train_on == "successful":
            records = [r for r in records if r.correct]
        advantages: dict[int, float] = {}
        if algo.needs_advantages and records:
            # Over the whole local batch, before any filtering: the group mean needs every sibling.
            uid_index: dict[str, int] = {}
            gids = [uid_index.setdefault(r.prompt_uid, len(uid_index)) for r in records]
            adv = group_relative_advantages([float(r.reward) for r in records], gids, **self.advantage_kwargs)
            advantages = {id(r): float(a) for r, a in zip(records, adv)}
        distill_only = algo.needs_teacher
        n_responses = sum(1 for r in records if len(r.response_ids))  # with or without a teacher signal
        # Records without loss tokens add nothing to the loss (nor, but with *-all, to its
        # denominator): skip their compute.
        records = [r for r in records if len(r.response_ids) and (not distill_only or r.distill_mask)]
        if self.teacher_cfg is not None and algo.needs_teacher:  # teacher.backend=learner: the teacher runs here
            # teacher.support=student: the teacher is scored at the policy's own top-k (SDPO's support)
            at = self.student_topk_ids(records) if self.teacher_cfg.support == "student" else None
            records = self.score_teacher(records, at_ids=at)
        topk = self._topk(records) if algo.needs_teacher else None
        parts = self._micro_batch_records(records)
        # Collective bookkeeping is CPU tensors: see process_group_backend.
        n_micro_t = torch.tensor([len(parts)], dtype=torch.long)
        dist.all_reduce(n_micro_t, op=dist.ReduceOp.MAX)
        n_micro = int(n_micro_t)
        # A budget may split a prompt's group; the leave-one-out baseline then comes from a pass
        # over every sibling first, so the loss is the whole group's all the same.
        batches = [
            (pack(mb, pad_id=self.pad_id, topk=topk, distill_only=distill_only).to(self.device),
             torch.tensor([advantages.get(id(r), 0.0) for r in mb], dtype=torch.float32, device=self.device))
            for mb in parts
        ]
        if self.two_factor and not first_of_batch:
            kept = [r for mb in parts for r in mb]
            old = self._score_sequences(kept, None, 0, self.temperature, self._swapped(self._batch_start))
            old_of = {id(r): token_lp.float().numpy() for r, (token_lp, _, _) in zip(kept, old)}
            for mb, (batch, _) in zip(parts, batches):
                batch.old_logprobs = at_response_columns([old_of[id(r)] for r in mb], mb,
                                                         batch.input_ids.shape[1]).to(self.device)
        if self.splits_groups:
            baselines = self._group_baselines(parts, [b for b, _ in batches], n_micro)
            for mb, (batch, _) in zip(parts, batches):
                width = batch.input_ids.shape[1]
                batch.credit_baseline = at_response_columns([baselines[id(r)] for r in mb], mb, width).to(self.device)
        real = [int(b.attention_mask.sum()) for b, _ in batches]
        # positions the forward computes: every padded one, or (packed) the real tokens only
        computed = real if self.cfg.packed_sequences else [b.input_ids.numel() for b, _ in batches]
        counts = torch.tensor([sum(b.num_loss_tokens for b, _ in batches),
                               sum(b.num_loss_sequences for b, _ in batches), sum(computed), sum(real),
                               n_responses], dtype=torch.float64)
        dist.all_reduce(counts)
        largest = torch.tensor([max(computed, default=0)], dtype=torch.long)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        max_micro_tokens = int(largest)
        global_tokens, global_seqs = float(counts[0]), float(counts[1])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        denominator = global_tokens if self.per_token_denominator else global_seqs
        if self.counts_unsignalled:
            denominator = float(counts[4])

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        loss_metrics = MetricsSum()  # the loss's own metrics, weighted by each micro-batch's tokens
        for i in range(n_micro):
            if i < len(batches):
                batch, adv = batches[i]
                loss, metrics = self.root(self._micro_batch_loss, batch, adv, denominator)
                loss_metrics.add(metrics, weight=float(batch.num_loss_tokens))
            else:
                loss = self.root(self._idle_loss)
            # FSDP averages gradients over ranks; the loss is already normalised globally.
            (loss * self.world_size).backward()
            loss_sum += float(loss.detach())

        loss_total = torch.tensor([loss_sum], dtype=torch.float64)
        dist.all_reduce(loss_total)
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        # A non-finite loss or gradient norm (both global: every rank decides alike) skips the
        # update: no optimizer or scheduler step, the weights stay as they were.
        skipped = not (math.isfinite(float(loss_total[0])) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self._check_finite_weights()
        self.optimizer.zero_grad(set_to_none=True)

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the optimizer's kernels are part of the step's time
        slowest = torch.tensor([time.perf_counter() - t0, peak_memory_mb(self.device)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        elapsed = float(slowest[0])
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, loss_metrics)
        positions, real_tokens = float(counts[2]), float(counts[3])
        out = {"loss": float(loss_total[0]), "grad_norm": grad_norm, "lr": float(lr),
               "num_tokens": global_tokens, "num_sequences": global_seqs,
               "num_micro_batches": float(n_micro), "time_s": elapsed,
               "learner/skipped_updates": float(skipped),
               "learner/peak_memory_mb": float(slowest[1]),
               # left padding: positions computed that hold no token
               "learner/padding_fraction": 1.0 - real_tokens / positions if positions else 0.0,
               "learner/max_micro_batch_tokens": float(max_micro_tokens),
               "learner/tokens_per_s": real_tokens / elapsed if elapsed > 0 else 0.0}
        out.update(MetricsSum().merge(gathered).result())
        out.update(self._rollout_metrics(rollout_sums))
        return out

    # What the batch looked like before any filtering: the rollouts' rewards, lengths and how many
    # carried a distillation signal. Summed here and divided after the all-reduce, so the numbers
    # are over the global batch.
    _ROLLOUT_FIELDS = ("reward", "correct", "response_tokens", "distill", "truncated", "sandbox_error")

    @staticmethod
    def _rollout_sums(records: Sequence[Scored]) -> torch.Tensor:
        sums = torch.zeros(len(LearnerWorker._ROLLOUT_FIELDS) + 1, dtype=torch.float64)
        for r in records:
            sums += torch.tensor([
                float(r.reward), float(r.correct), float(len(r.response_ids)),
                float(getattr(r, "distill_mask", False)), float(r.finish_reason == "length"),
                float(getattr(r, "sandbox_error", False)), 1.0,
            ], dtype=torch.float64)
        return sums

    def _rollout_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        dist.all_reduce(sums)
        n = max(float(sums[-1]), 1.0)
        names = ("reward_mean", "accuracy", "response_tokens_mean", "distill_fraction", "truncated_fraction",
                 "sandbox_error_fraction")
        out = {f"rollout/{name}": float(v) / n for name, v in zip(names, sums[:-1])}
        out["rollout/num_tokens"] = float(sums[2])
        out["rollout/sandbox_errors"] = float(sums[5])  # the grader could not run the program
        out["rollout/num_samples"] = float(sums[-1])
        return out

    @staticmethod
    def _topk(records: Sequence[Scored]) -> int:
        ks = {int(np.shape(r.teacher_topk_ids)[1]) for r in records if np.ndim(r.teacher_topk_ids) == 2}
        # Ranks must agree on K only through the records; the smallest common K is always valid.
        return min(ks) if ks else 1

    def _micro_batch_records(self, records: Sequence[Scored]) -> list[list[Scored]]:
        budget = self.cfg.max_tokens_per_micro_batch
        if budget is not None:
            return token_budget_micro_batches(records, budget, self.cfg.micro_batch_size)
        return micro_batches(records, self.cfg.micro_batch_size, split_large_groups=not self.whole_groups)

    def _group_baselines(self, parts: Sequence[Sequence[Scored]], batches: Sequence[Batch],
                         n_micro: int) -> dict[int, np.ndarray]:
        """Each record's leave-one-out future-credit baseline over its whole group (its siblings
        may sit in other micro-batches): a no-grad pass at the current weights gives every
        record's returns, as the loss would compute them (collective: ranks pad to ``n_micro``)."""
        from distil_ray.algorithms.advantages import group_loo_baseline

        returns: dict[int, torch.Tensor] = {}
        for i in range(n_micro):
            if i >= len(parts):
                self._inference(self._idle_loss)
                continue
            G = self._inference(self._returns, batches[i]).double().cpu()
            width = G.shape[1]
            for row, r in enumerate(parts[i]):
                returns[id(r)] = G[row, width - len(r.response_ids):]
        records = [r for part in parts for r in part]
        if not records:
            return {}
        lengths = [len(r.response_ids) for r in records]
        values = torch.zeros(len(records), max(lengths), dtype=torch.float64)
        mask = torch.zeros_like(values)
        for row, (r, T) in enumerate(zip(records, lengths)):
            values[row, :T], mask[row, :T] = returns[id(r)], 1.0
        uid_index: dict[str, int] = {}
        groups = torch.tensor([uid_index.setdefault(r.prompt_uid, len(uid_index)) for r in records])
        loo = group_loo_baseline(values, mask, groups)
        return {id(r): loo[row, :T].numpy() for row, (r, T) in enumerate(zip(records, lengths))}

    def _returns(self, policy, batch: Batch) -> torch.Tensor:
        out = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_mask, batch.topk_ids,
                                temperature=self.temperature, chunk_size=self.cfg.logprob_chunk_size,
                                packed=self.cfg.packed_sequences)
        return distil_returns(out.topk_logprobs, batch.teacher_topk_logprobs, batch.response_mask,
                              gamma=self.loss_kwargs.get("gamma", 1.0),
                              topk_norm=self.loss_kwargs.get("topk_norm", "renorm"))

    def _micro_batch_loss(self, policy, batch: Batch, advantages: torch.Tensor, denominator: float):
        algo = self.algorithm
        out = response_logprobs(
            policy, batch.input_ids, batch.attention_mask, batch.response_mask, batch.topk_ids,
            temperature=self.temperature, chunk_size=self.cfg.logprob_chunk_size, packed=self.cfg.packed_sequences,
        )
        fn, mask = algo.loss_fn, batch.response_mask
        kwargs = dict(self.loss_kwargs)
        kwargs["denominator"] = denominator
        if _accepts(fn, "entropy"):
            kwargs["entropy"] = out.entropy
        if algo.needs_teacher:
            if _accepts(fn, "group_ids"):
                kwargs["group_ids"] = batch.group_ids
            if _accepts(fn, "behaviour_logprobs"):
                kwargs["behaviour_logprobs"] = batch.behaviour_logprobs
            if batch.old_logprobs is not None and _accepts(fn, "old_logprobs"):
                kwargs["old_logprobs"] = batch.old_logprobs
            if batch.credit_baseline is not None:
                kwargs["credit_baseline_values"] = batch.credit_baseline
            return fn(out.token_logprobs, out.topk_logprobs, batch.teacher_topk_logprobs, mask, **kwargs)
        if algo.needs_advantages:
            return fn(out.token_logprobs, mask, advantages, old_logprobs=batch.behaviour_logprobs, **kwargs)
        return fn(out.token_logprobs, mask, **kwargs)

    def _idle_loss(self, policy):
        """A zero-weighted forward/backward on two pad tokens: it runs the same collectives as a
        real micro-batch and touches every parameter, adding exactly zero to every gradient."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.tensor([[0, 1]], device=self.device)
        out = response_logprobs(policy, ids, torch.ones_like(ids), mask,
                                temperature=self.temperature, chunk_size=self.cfg.logprob_chunk_size)
        return out.token_logprobs.sum() * 0.0

    def _check_finite_weights(self) -> None:
        """Fail the step (every rank) if an update left a non-finite weight: such weights must
        never reach an engine, a checkpoint or a saved model."""
        bad = torch.tensor([0], dtype=torch.long)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                local = _local(p.detach())
                if local.numel() and not bool(torch.isfinite(local).all()):
                    bad[0] = 1
                    break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad):
            raise FloatingPointError(
                f"learner: update {self.step} left non-finite weights (learner.lr={self.cfg.lr:g}); "
                "nothing was synced or saved from it: lower learner.lr and resume from the last checkpoint")

    def _clip_gradients(self) -> float:
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the per-shard norms combined into the global norm
        if self.cfg.grad_clip > 0:  # 0: report the norm, clip nothing
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, total)
        return float(total)

    # ------------------------------------------------------------------ the teacher on the learner

    @property
    def teacher_temperature(self) -> float:
        """``teacher.temperature``; None is 1 — an engine teacher's (vLLM's prompt log-probs are
        those of the raw logits), so both backends score alike by default."""
        t = self.teacher_cfg.temperature if self.teacher_cfg is not None else None
        return 1.0 if t is None else float(t)

    def score_teacher(self, records: Sequence[Scored], at_ids: Sequence[np.ndarray] | None = None) -> list[Scored]:
        """The teacher's log-probs for ``records``, computed on these ranks (collective).

        Each record with ``distill_mask`` and a ``teacher_prompt_ids`` context (what the teacher
        actor built) is scored by a no-grad forward over ``teacher_prompt_ids + response_ids``
        with the teacher's weights: the current policy, the moving average (``teacher.update=ema``)
        or the starting weights (``fixed``). Without ``at_ids`` each record gets the teacher's own
        top-``teacher.topk`` ids and log-probs, as an engine teacher returns them; with ``at_ids``
        (one ``[T, K]`` id array per record) it gets the log-probs at exactly those ids (e.g. the
        student's own top-k). Every record also gets log π_T at its sampled tokens. Records without
        a signal come back unchanged. Ranks pad to the same number of forwards.
        """
        if self.teacher_cfg is None:
            raise RuntimeError("score_teacher: this learner was built without a teacher section")
        records = list(records)
        problem = None  # checked on every rank first: a rank that raised alone would leave the others waiting
        if at_ids is not None and len(at_ids) != len(records):
            problem = f"at_ids has {len(at_ids)} entries for {len(records)} records"
        todo = [i for i, r in enumerate(records) if r.distill_mask and len(r.teacher_prompt_ids) and len(r.response_ids)]
        missing = [r for r in records if r.distill_mask and len(r.response_ids) and not len(r.teacher_prompt_ids)]
        if missing:
            r = missing[0]
            problem = (f"record {r.prompt_uid!r}/{r.sample_index} has distill_mask but no teacher_prompt_ids: "
                       "teacher.backend=learner needs the teacher actor's contexts")
        if at_ids is not None and problem is None:
            for i in todo:
                if np.ndim(at_ids[i]) != 2 or np.shape(at_ids[i])[0] != len(records[i].response_ids):
                    problem = f"at_ids[{i}] has shape {np.shape(at_ids[i])}, need [{len(records[i].response_ids)}, K]"
                    break
            if problem is None and len({np.shape(at_ids[i])[1] for i in todo}) > 1:
                problem = "at_ids: every record needs the same number of ids per position"
        failed = torch.tensor([int(problem is not None)], dtype=torch.long)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if int(failed):
            raise ValueError(problem or "score_teacher: another rank's records were refused (see its error)")
        # the teacher's sequences: its context in place of the student's prompt, the same response
        views = [dataclasses.replace(records[i], prompt_ids=records[i].teacher_prompt_ids) for i in todo]
        scores = self._score_sequences(views, None if at_ids is None else [at_ids[i] for i in todo],
                                       self._topk_size(), self.teacher_temperature, self._teacher_weights())
        out = list(records)
        for i, (token_lp, top_ids, top_lp) in zip(todo, scores):
            out[i] = dataclasses.replace(records[i], teacher_topk_ids=top_ids.numpy().astype(np.int32),
                                         teacher_topk_logprobs=top_lp.float().numpy(),
                                         teacher_token_logprobs=token_lp.float().numpy())
        return out

    def student_topk_ids(self, records: Sequence[Scored]) -> list[np.ndarray]:
        """The current policy's own top-``teacher.topk`` ids at every response position of each
        record (on its own prompt, at the learner's temperature; collective): the support SDPO
        distils over (``teacher.support=student``). Records without a signal get ``[T, 0]``."""
        todo = [i for i, r in enumerate(records) if r.distill_mask and len(r.response_ids)]
        scores = self._score_sequences([records[i] for i in todo], None, self._topk_size(), self.temperature,
                                       nullcontext())
        out = [np.zeros((len(r.response_ids), 0), np.int32) for r in records]
        for i, (_, top_ids, _) in zip(todo, scores):
            out[i] = top_ids.numpy().astype(np.int32)
        return out

    def _topk_size(self) -> int:
        # a top-k beyond the vocabulary is the whole vocabulary (teacher.topk=1000000: "all")
        return min(int(self.teacher_cfg.topk), int(self.model.config.vocab_size))

    def _score_sequences(self, views: Sequence[Scored], at_ids, k: int, temperature: float, weights):
        """No-grad forwards over ``views`` under ``weights`` (a context manager), packed and
        micro-batched like training, every rank the same number of forwards: per view, (token
        log-probs, ids, log-probs) at its response columns — its top-``k``, or the log-probs at
        ``at_ids[j]``."""
        position = {id(v): j for j, v in enumerate(views)}
        budget = self.cfg.max_tokens_per_micro_batch
        parts = (token_budget_micro_batches(views, budget, self.cfg.micro_batch_size) if budget is not None
                 else micro_batches(views, self.cfg.micro_batch_size, split_large_groups=True)) if views else []
        n_micro_t = torch.tensor([len(parts)], dtype=torch.long)
        dist.all_reduce(n_micro_t, op=dist.ReduceOp.MAX)
        out: list = [None] * len(views)
        was_training = self.model.training
        self.model.eval()
        try:
            with weights:
                for m in range(int(n_micro_t)):
                    if m >= len(parts):
                        self._inference(self._idle_loss)
                        continue
                    part = parts[m]
                    batch = pack(part, pad_id=self.pad_id, topk=None).to(self.device)
                    ids = None
                    if at_ids is not None:
                        ids = at_response_columns_ids([at_ids[position[id(v)]] for v in part], part,
                                                      batch.input_ids.shape[1]).to(self.device)
                    scores = self._inference(self._teacher_forward, batch, ids, 0 if ids is not None else k,
                                             temperature)
                    width = batch.input_ids.shape[1]
                    for row, v in enumerate(part):
                        cols = slice(width - len(v.response_ids), width)
                        out[position[id(v)]] = tuple(None if t is None else t[row, cols].cpu() for t in scores)
        finally:
            self.model.train(was_training)
        return out

    def _teacher_forward(self, policy, batch: Batch, ids: torch.Tensor | None, own_topk: int, temperature: float):
        """(token log-probs, top-k ids, top-k log-probs) at the response columns: the model's own
        top-``own_topk``, or the log-probs at ``ids``."""
        out = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_mask, ids,
                                temperature=temperature, chunk_size=self.cfg.logprob_chunk_size,
                                packed=self.cfg.packed_sequences, own_topk=own_topk)
        if ids is not None:
            return out.token_logprobs, ids, out.topk_logprobs
        return out.token_logprobs, out.own_topk_ids, out.own_topk_logprobs

    @contextmanager
    def _teacher_weights(self):
        """The teacher's weights in the model's own shards for the duration: swapped in place with
        the moving average or the starting weights (one parameter's copy at a time, exact), then
        swapped back. The current policy needs no swap."""
        source = {"current": None, "ema": self.ema, "fixed": self.initial}[self.teacher_cfg.update]
        with self._swapped(source):
            yield

    @contextmanager
    def _swapped(self, source: dict | None):
        """``source`` (full-name → local shard) in the model's own shards for the duration, swapped
        in place one parameter's copy at a time and swapped back exactly; None: no swap."""
        if source is None:
            yield
            return
        pairs = [(_local(p.detach()), _local(source[name])) for name, p in self.model.named_parameters()]

        def swap():
            with torch.no_grad():
                for a, b in pairs:
                    held = a.clone()
                    a.copy_(b)
                    b.copy_(held)

        swap()
        try:
            yield
        finally:
            swap()

    # ------------------------------------------------------------------ inference helpers

    def _inference(self, fn: Callable, *args):
        with torch.no_grad():
            result = self.root(fn, *args)
        # Without a backward the root keeps its all-gathered parameters after forward; put the
        # shards back so state dicts and checkpoints see the sharded model.
        self.root.reshard()
        return result

    def sequence_logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """Log π(response token t | prompt, response_<t) for each t, under the current weights."""
        P = len(prompt_ids)
        if P == 0:
            raise ValueError("prompt_ids is empty: the first response token has no state")
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        mask[0, P:] = 1

        def fn(policy):
            return response_logprobs(policy, ids, torch.ones_like(ids), mask,
                                     temperature=self.temperature, chunk_size=self.cfg.logprob_chunk_size).token_logprobs

        was_training = self.model.training
        self.model.eval()
        try:
            lp = self._inference(fn)
        finally:
            self.model.train(was_training)
        return lp[0, P:].double().cpu().tolist()

    # ------------------------------------------------------------------ weights and checkpoints

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """All-gathered float32 CPU tensors on rank 0, {} elsewhere (collective)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict_numpy(self) -> dict[str, np.ndarray] | None:
        """The full HF-named state dict as float32 numpy on rank 0, None on the others (collective)."""
        weights = self.weights("float32")
        return None if weights is None else weights.arrays

    def weights(self, dtype: str, source: str = "policy") -> Weights | None:
        """The full HF-named weights in ``dtype`` (the engines') on rank 0, None on the others
        (collective): what a weight sync puts in the object store. ``source``: ``policy`` or
        ``ema`` (the moving average, see :meth:`advance_ema`). In the engines' own float32 and
        with one rank the arrays may share memory with the live weights (no copy is made):
        returned through Ray they are serialised at once; in-process callers copy them to keep."""
        if source == "ema":
            state = {}
            for name, t in self._ema_tensors().items():
                full = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective: every rank
                if self.rank == 0:  # only rank 0 keeps a host copy
                    state[name] = full.cpu()
        elif source == "policy":
            state = self._full_state_dict()
        else:
            raise ValueError(f"weight source {source!r}: 'policy' or 'ema'")
        return Weights.from_tensors(state, dtype) if self.rank == 0 else None

    def advance_ema(self) -> None:
        """Move the moving average a ``ema_rate`` of the way to the current weights (each rank its
        own shards; no communication)."""
        ema = self._ema_tensors()
        local = [_local(t) for t in ema.values()]
        current = [_local(p.detach()) for _, p in self.model.named_parameters()]
        with torch.no_grad():
            torch._foreach_lerp_(local, current, self.ema_rate)

    def _ema_tensors(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            raise RuntimeError("this learner keeps no moving average (ema_rate is None)")
        return self.ema

    def _named_weights(self, source: str):
        """What a weight source iterates: (HF name, sharded float32 tensor) pairs."""
        if source == "ema":
            return lambda: self._ema_tensors().items()
        return lambda: ((name, p) for name, p in self.model.named_parameters())

    def connect_engines(self, actors: Sequence, *, dtype: str, bucket_bytes: int, timeout_s: float,
                        source: str = "policy", address: str = "127.0.0.1") -> None:
        """Open a weight-transfer group to the engines of ``actors`` that will receive ``source``
        (``policy`` or ``ema``) with ``weight_sync.backend=collective``; collective over the
        learner ranks, rank 0 at ``address``. See learner/transfer.py."""
        from distil_ray.learner.transfer import Channel

        if source in self._channels:
            raise RuntimeError(f"the learner already sends {source!r} weights to engines; disconnect first")
        self._channels[source] = Channel(self._named_weights(source), DTYPES[dtype], rank=self.rank,
                                         learner_backend=self.cfg.backend, actors=actors,
                                         bucket_bytes=bucket_bytes, timeout_s=timeout_s, address=address)

    def send_weights(self, version: int, source: str = "policy") -> float:
        """The ``source`` weights, as ``version``, to the engines connected for them (collective);
        returns the seconds it took."""
        if source not in self._channels:
            raise RuntimeError(f"send_weights({source!r}) before connect_engines for it")
        t0 = time.perf_counter()
        self._channels[source].send(version)
        return time.perf_counter() - t0

    def disconnect_engines(self) -> None:
        """Close every weight-transfer channel; one that fails (a dead engine) does not keep the
        others open."""
        channels, self._channels = self._channels, {}
        errors = []
        for source, channel in channels.items():
            try:
                channel.close()
            except Exception as e:  # noqa: BLE001 - reported below, after the rest are closed
                errors.append(f"{source}: {e}")
        if errors:
            raise RuntimeError("closing weight-transfer channels: " + "; ".join(errors))

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        state = {"model": get_model_state_dict(self.model),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if self.ema is not None:
            state["ema"] = self.ema  # loaded in place like the model's shards
        if self.initial is not None:
            state["initial"] = self.initial  # a fixed teacher scored on the learner
        return state

    def save_checkpoint(self, path: str, extra: dict) -> None:
        """Sharded model + optimizer state (DCP, one file per rank), scheduler, per-rank RNG, and
        ``extra`` (the trainer's own state) written by rank 0 (collective)."""
        import torch.distributed.checkpoint as dcp

        root = Path(path)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dcp.save(self._sharded_state(), checkpoint_id=str(root / "dcp"))
        (root / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), root / "rng" / f"rank{self.rank}.pt")
        if self.rank == 0:
            # model_path: where the model's config and tokenizer are (python -m distil_ray.export)
            meta = {"extra": extra, "scheduler": self.scheduler.state_dict(), "step": self.step,
                    "world_size": self.world_size, "model_path": self.model_path}
            tmp = root / "learner_state.pkl.tmp"
            tmp.write_bytes(pickle.dumps(meta))
            os.replace(tmp, root / "learner_state.pkl")  # a reader never sees a half-written file
        dist.barrier()

    def load_checkpoint(self, path: str) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; returns its ``extra`` (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        root = Path(path)
        if not (root / "learner_state.pkl").is_file():
            raise FileNotFoundError(f"no learner checkpoint at {root} (missing learner_state.pkl)")
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(root / "dcp"))  # in place, into this rank's shards
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        meta = pickle.loads((root / "learner_state.pkl").read_bytes())
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = int(meta["step"])
        rng = root / "rng" / f"rank{self.rank}.pt"
        if rng.is_file() and meta.get("world_size") == self.world_size:
            _set_rng_state(torch.load(rng, weights_only=False))
        dist.barrier()
        return meta["extra"]

    def save_hf(self, path: str) -> None:
        """A ``save_pretrained`` directory (weights, config, tokenizer from ``model_path``) written
        by rank 0 (collective)."""
        state = self._full_state_dict()
        if self.rank == 0:
            out = Path(path)
            out.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(out, state_dict=state)
            copy_model_files(self.model_path, out)
        dist.barrier()

    def close(self) -> None:
        try:
            self.disconnect_engines()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def copy_model_files(model_path: str, out: Path) -> None:
    """What a saved model needs beside its weights and config: the tokenizer of ``model_path``
    (none there: nothing copied, rather than fail the save) and the tiny model's own config."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_path, local_files_only=True).save_pretrained(out)
    except (OSError, ValueError):
        pass
    for name in ("tiny_model_config.json",):
        src = Path(model_path) / name
        if src.is_file():
            shutil.copy(src, out / name)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor, sharing its storage."""
    return t.to_local() if hasattr(t, "to_local") else t


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


__all__ = ["DTYPES", "LearnerWorker", "Rendezvous"]
