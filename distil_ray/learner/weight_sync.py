"""WeightSync: which engines get which weights after a step, and how they get them.

The rollout workers always load the policy. The teacher follows ``teacher.update``: the policy
itself (``current``), a moving average of it (``ema``), or nothing (``fixed``, the initial
policy). The moving average lives on the learner ranks, next to the float32 master weights they
average (exact, sharded like them, and saved in the learner's checkpoint); each push first moves
it a ``teacher.ema_rate`` of the way to the new policy and then sends it to the teacher as a second
weight source. The same rule serves the step's sync and a resume, so the two can never disagree
about who gets what; a resume sends the restored average without moving it.

Transports (``weight_sync.backend``):

* ``object_store``: rank 0's full HF-named weights are put once, in the engines' dtype (bfloat16
  halves the bytes of the float32 master weights), and every engine loads them in place. Any
  engine (vLLM or HF).
* ``collective``: vLLM's weight-transfer protocol. Learner rank 0 and the vLLM engines of one
  weight source form one group (the policy's followers; an EMA teacher its own); each sync the
  learner ranks gather the FSDP2 shards one tensor at a time and rank 0 broadcasts them, bucket by
  bucket, while the engines receive and load (learner/transfer.py; gloo on the CPU, vLLM's NCCL
  engine on GPUs). No full state dict is built anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import ray

from distil_ray.config import WeightSyncConfig
from distil_ray.restarts import call_when_alive


class WeightSync:
    def __init__(self, learner, rollout_workers: Sequence, teacher=None, cfg: WeightSyncConfig | None = None, *,
                 teacher_update: str = "current", dtype: str = "float32", advance_ema: bool | None = None):
        """``learner``: the LearnerGroup (the weights' source); ``rollout_workers`` and ``teacher``
        (None without one, or when the learner ranks run it): the actors that hold engines;
        ``cfg``: the ``weight_sync`` section; ``teacher_update``: ``teacher.update``; ``dtype``: the
        engines' (``model.dtype``), in which the weights travel; ``advance_ema``: whether each push
        moves the learners' moving average (default: when an EMA teacher engine receives it; a
        teacher run on the learner ranks sets it itself)."""
        self.cfg = cfg or WeightSyncConfig()
        self.cfg.check()
        self.learner = learner
        self.rollout_workers = list(rollout_workers)
        self.teacher = teacher
        self.teacher_update = teacher_update
        self.dtype = dtype
        self.collective = self.cfg.backend == "collective"
        self.connected = False
        self.advance_ema = self._ema_teacher if advance_ema is None else bool(advance_ema)
        self.restarted_engines = 0  # engines that died during a sync and got its weights once restarted

    def _policy_followers(self) -> list:
        """The engines that load the policy itself."""
        followers = list(self.rollout_workers)
        if self.teacher is not None and self.teacher_update == "current":
            followers.append(self.teacher)
        return followers

    @property
    def _ema_teacher(self) -> bool:
        return self.teacher is not None and self.teacher_update == "ema"

    def connect(self) -> None:
        """Set the transport up: for ``collective``, a transfer group from learner rank 0 to the
        engines that follow the policy, and one to an EMA teacher (the object store needs nothing)."""
        if self.collective and not self.connected:
            options = {"dtype": self.dtype, "bucket_bytes": self.cfg.bucket_mb << 20, "timeout_s": self.cfg.timeout_s}
            self.learner.connect_engines(self._policy_followers(), **options)
            if self._ema_teacher:
                self.learner.connect_engines([self.teacher], source="ema", **options)
            self.connected = True

    def push(self, version: int) -> float:
        """The learners' weights, as policy ``version``, to every engine that follows the policy,
        and the moving average, first moved towards them, to an EMA teacher; returns the seconds
        it took."""
        t0 = time.perf_counter()
        if self.advance_ema:
            self.learner.advance_ema()
        self._send(version, f"loading policy version {version}")
        return time.perf_counter() - t0

    def restore(self, version: int, checkpoint_dir: str | Path) -> None:
        """After the learner loaded a checkpoint: the engines start from its weights (and an EMA
        teacher from its restored average), not the base model's."""
        self._send(version, f"restoring version {version} from {checkpoint_dir}")

    def _send(self, version: int, what: str) -> None:
        sources = [("policy", self._policy_followers())] + ([("ema", [self.teacher])] if self._ema_teacher else [])
        if self.collective:
            refs = [ref for source, _ in sources for ref in self.learner.send_weights_refs(version, source)]
        else:
            calls = []
            for source, targets in sources:
                state_ref = self.learner.weights_ref(self.dtype, source)
                calls += [(t, state_ref, t.update_weights.remote(state_ref, version)) for t in targets]
            self._wait([ref for _, _, ref in calls], what, retry={ref: (t, s) for t, s, ref in calls}, version=version)
            return
        self._wait(refs, what)

    def source_of(self, engine) -> str:
        """Which weights ``engine`` holds: the moving average for an EMA teacher, else the policy."""
        return "ema" if self._ema_teacher and engine is self.teacher else "policy"

    def resend(self, engine, version: int) -> None:
        """Send one engine the weights it should hold at ``version`` (an engine actor Ray restarted
        starts from the checkpoint's weights). Object store only: a collective group cannot take a
        restarted member back in."""
        if self.collective:
            raise RuntimeError("weight_sync.backend=collective cannot re-admit a restarted engine")
        state_ref = self.learner.weights_ref(self.dtype, self.source_of(engine))
        try:
            call_when_alive(lambda: engine.update_weights.remote(state_ref, version), self.cfg.timeout_s + 60.0)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"weight sync: resending version {version} did not finish within "
                               f"{self.cfg.timeout_s + 60:.0f} s (weight_sync.timeout_s + 60)") from None

    def close(self) -> None:
        """Release the transport (nothing for the object store)."""
        if self.connected:
            self.learner.disconnect_engines()
            self.connected = False

    def _wait(self, refs: list, what: str, retry: dict | None = None, version: int | None = None) -> None:
        """An engine that takes longer than ``weight_sync.timeout_s`` has hung: fail the step
        instead of the run waiting forever. ``retry``: for the object store, the (engine, weights)
        of each call, sent once more to an engine whose actor died during it (Ray restarts it)."""
        try:
            # a margin over the engines' own deadline, so that their error (which names the
            # phase that hung) arrives first
            for ref in refs:
                try:
                    ray.get(ref, timeout=self.cfg.timeout_s + 60.0)
                except ray.exceptions.RayActorError:
                    if not retry or ref not in retry:
                        raise
                    engine, state_ref = retry[ref]  # the restarted actor: the same weights again
                    call_when_alive(lambda: engine.update_weights.remote(state_ref, version), self.cfg.timeout_s + 60.0)
                    self.restarted_engines += 1
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"weight sync: {what} did not finish within {self.cfg.timeout_s + 60:.0f} s "
                               "(weight_sync.timeout_s + 60)") from None
