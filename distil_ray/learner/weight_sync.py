"""WeightSync: which engines get which weights after a step, and how they get them.

The rollout workers always load the policy. The teacher follows ``teacher.update``: the policy
itself (``current``), a moving average of it that the teacher keeps and advances with every push
(``ema``), or nothing (``fixed``, the initial policy). The same rule serves the step's sync and a
resume, so the two can never disagree about who gets what; a resumed EMA teacher loads its saved
average instead of averaging the policy in once more.

Transports (``weight_sync.backend``):

* ``object_store``: rank 0's full HF-named weights are put once, in the engines' dtype (bfloat16
  halves the bytes of the float32 master weights), and every engine loads them in place. Any
  engine (vLLM or HF).
* ``collective``: vLLM's weight-transfer protocol. Learner rank 0 and every vLLM engine that
  follows the policy form one group; each sync the learner ranks gather the FSDP2 shards one
  parameter at a time and rank 0 broadcasts them, bucket by bucket, while the engines receive and
  load (learner/transfer.py; gloo on the CPU, vLLM's NCCL engine on GPUs). No full state dict is
  built anywhere. An EMA teacher keeps its own average and still loads it by the object store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import ray

from distil_ray.config import WeightSyncConfig

TEACHER_EMA = "teacher_ema.safetensors"


class WeightSync:
    def __init__(self, learner, rollout_workers: Sequence, teacher=None, cfg: WeightSyncConfig | None = None, *,
                 teacher_update: str = "current", dtype: str = "float32"):
        """``learner``: the LearnerGroup (the weights' source); ``rollout_workers`` and ``teacher``
        (None without one): the actors that hold engines; ``cfg``: the ``weight_sync`` section;
        ``teacher_update``: ``teacher.update``; ``dtype``: the engines' (``model.dtype``), in which
        the weights travel."""
        self.cfg = cfg or WeightSyncConfig()
        self.cfg.check()
        self.learner = learner
        self.rollout_workers = list(rollout_workers)
        self.teacher = teacher
        self.teacher_update = teacher_update
        self.dtype = dtype
        self.collective = self.cfg.backend == "collective"
        self.connected = False

    def _policy_followers(self) -> list:
        """The engines that load the policy itself."""
        followers = list(self.rollout_workers)
        if self.teacher is not None and self.teacher_update == "current":
            followers.append(self.teacher)
        return followers

    def connect(self) -> None:
        """Set the transport up: for ``collective``, the transfer group from learner rank 0 to every
        engine that follows the policy (the object store needs nothing)."""
        if self.collective and not self.connected:
            self.learner.connect_engines(self._policy_followers(), dtype=self.dtype,
                                         bucket_bytes=self.cfg.bucket_mb << 20, timeout_s=self.cfg.timeout_s)
            self.connected = True

    def push(self, version: int) -> float:
        """The learners' weights, as policy ``version``, to every engine that follows the policy
        (and, averaged in, to an EMA teacher); returns the seconds it took."""
        t0 = time.perf_counter()
        if self.collective:
            self._wait(self.learner.send_weights_refs(version), f"broadcasting policy version {version}")
            if self.teacher is not None and self.teacher_update == "ema":
                state_ref = self.learner.weights_ref(self.dtype)
                self._wait([self.teacher.update_weights.remote(state_ref, version)], "averaging the EMA teacher")
            return time.perf_counter() - t0
        state_ref = self.learner.weights_ref(self.dtype)
        targets = list(self.rollout_workers)
        if self.teacher is not None and self.teacher_update != "fixed":
            targets.append(self.teacher)  # an EMA teacher averages the new weights in
        self._wait([t.update_weights.remote(state_ref, version) for t in targets], f"loading policy version {version}")
        return time.perf_counter() - t0

    def save(self, checkpoint_dir: str | Path) -> None:
        """What the engines hold that the learner's checkpoint does not: the EMA teacher's average."""
        if self.teacher is not None and self.teacher_update == "ema":
            self._wait([self.teacher.save_ema.remote(str(Path(checkpoint_dir) / TEACHER_EMA))], "saving the EMA teacher")

    def restore(self, version: int, checkpoint_dir: str | Path) -> None:
        """After the learner loaded a checkpoint: the engines start from its weights, not the base
        model's, and an EMA teacher from its own saved average."""
        loads = []
        if self.collective:
            self._wait(self.learner.send_weights_refs(version), f"restoring version {version} from {checkpoint_dir}")
        else:
            state_ref = self.learner.weights_ref(self.dtype)
            loads = [w.update_weights.remote(state_ref, version) for w in self._policy_followers()]
        if self.teacher is not None and self.teacher_update == "ema":
            loads.append(self.teacher.load_ema.remote(str(Path(checkpoint_dir) / TEACHER_EMA), version))
        self._wait(loads, f"restoring version {version} from {checkpoint_dir}")

    def close(self) -> None:
        """Release the transport (nothing for the object store)."""
        if self.connected:
            self.learner.disconnect_engines()
            self.connected = False

    def _wait(self, refs: list, what: str) -> None:
        """An engine that takes longer than ``weight_sync.timeout_s`` has hung: fail the step
        instead of the run waiting forever."""
        try:
            ray.get(refs, timeout=self.cfg.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"weight sync: {what} did not finish within {self.cfg.timeout_s:.0f} s "
                               "(weight_sync.timeout_s)") from None
