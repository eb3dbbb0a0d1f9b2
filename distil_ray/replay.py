"""ReplayQueue: the bounded hand-off between the producers (rollout → feedback → teacher) and the
learners.

It holds ObjectRefs, never the records themselves: a group of ``Scored`` records (all samples of one
prompt) goes into the object store once, the queue keeps its reference and the policy version that
generated it, and the learner ranks ``ray.get`` the records directly. The queue decides three things:

* **back-pressure**: ``put`` waits while ``capacity`` records are queued, so producers running ahead
  of the learner (``max_staleness > 0``) never grow memory without bound;
* **staleness**: ``get`` drops groups generated more than ``max_staleness`` policy versions before the
  learner's current version (``0`` = strictly on-policy) and counts them;
* **accounting**: every record accepted is eventually served once or counted as dropped
  (``accepted == served + dropped + queued`` at all times), so a lost or twice-used sample shows up.

``ReplayBuffer`` is the plain logic (tests drive it directly); ``ReplayQueue`` is the async Ray actor
around it, so ``put`` and ``get`` can wait without blocking each other.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from distil_ray.config import ReplayConfig


@dataclass
class _Entry:
    refs: list[Any]  # ObjectRefs of the records of one group (usually one ref to a list of records)
    num_records: int
    version: int
    num_tokens: int = 0  # prompt + response tokens of the group's records (what balances the learner ranks)


class ReplayBuffer:
    def __init__(self, cfg: ReplayConfig):
        """``cfg``: the ``replay`` section (capacity in records, staleness bound in versions)."""
        cfg.check()
        self.capacity = cfg.capacity
        self.max_staleness = cfg.max_staleness
        self._entries: deque[_Entry] = deque()
        self.queued = 0  # records
        self.accepted = 0
        self.served = 0
        self.dropped = 0

    def has_room(self, num_records: int) -> bool:
        # an entry larger than the whole capacity is still accepted into an empty queue, or it
        # could never be accepted at all
        return self.queued == 0 or self.queued + num_records <= self.capacity

    def put(self, refs: list[Any], num_records: int, version: int, *, num_tokens: int = 0) -> None:
        self._entries.append(_Entry(list(refs), num_records, version, num_tokens))
        self.queued += num_records
        self.accepted += num_records

    def drop_stale(self, current_version: int) -> int:
        """Drop every group older than ``current_version - max_staleness``; returns records dropped."""
        kept, dropped = deque(), 0
        for entry in self._entries:
            if current_version - entry.version > self.max_staleness:
                dropped += entry.num_records
            else:
                kept.append(entry)
        self._entries = kept
        self.queued -= dropped
        self.dropped += dropped
        return dropped

    def ready(self, num_groups: int) -> bool:
        return len(self._entries) >= num_groups

    def take(self, num_groups: int) -> tuple[list[Any], list[int], list[int]]:
        """The oldest ``num_groups`` groups (FIFO: the stalest usable samples are trained on first):
        their refs, and per group its policy version and token count."""
        refs, versions, tokens = [], [], []
        for _ in range(min(num_groups, len(self._entries))):
            entry = self._entries.popleft()
            refs.extend(entry.refs)
            versions.append(entry.version)
            tokens.append(entry.num_tokens)
            self.queued -= entry.num_records
            self.served += entry.num_records
        return refs, versions, tokens

    def stats(self) -> dict[str, int]:
        return {
            "replay/accepted": self.accepted,
            "replay/served": self.served,
            "replay/dropped": self.dropped,
            "replay/queued": self.queued,
            "replay/groups_queued": len(self._entries),
        }


class ReplayQueue:
    """Async Ray actor around ``ReplayBuffer``. Pass refs nested in a list (``put.remote([ref], ...)``)
    so Ray hands the actor the references and never resolves the records into it."""

    def __init__(self, cfg: ReplayConfig):
        self.buffer = ReplayBuffer(cfg)
        self._changed = asyncio.Condition()

    async def put(self, refs: list[Any], num_records: int, version: int, timeout_s: float | None = None, *,
                  num_tokens: int = 0) -> bool:
        """Queue one group; waits while the queue is full. False if ``timeout_s`` ran out first."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.buffer.has_room(num_records)), timeout_s
                )
            except asyncio.TimeoutError:
                return False
            self.buffer.put(refs, num_records, version, num_tokens=num_tokens)
            self._changed.notify_all()
            return True

    async def get(
        self, num_groups: int, current_version: int, timeout_s: float | None = None
    ) -> tuple[list[Any], list[int], list[int]]:
        """The next ``num_groups`` groups usable at ``current_version``; stale ones are dropped first.
        Waits for producers; on timeout returns what there is (possibly nothing)."""
        async with self._changed:

            def usable() -> bool:
                self.buffer.drop_stale(current_version)
                return self.buffer.ready(num_groups)

            try:
                await asyncio.wait_for(self._changed.wait_for(usable), timeout_s)
            except asyncio.TimeoutError:
                pass
            out = self.buffer.take(num_groups)
            self._changed.notify_all()  # room for waiting producers
            return out

    async def stats(self) -> dict[str, int]:
        return self.buffer.stats()

    async def save(self, path: str) -> int:
        """Write every queued group (its records, not references) to ``path``, oldest first, for a
        checkpoint: the rounds generated ahead of the learner are part of an exact resume. Returns
        the number of groups written."""
        import pickle

        async with self._changed:
            entries = list(self.buffer._entries)
            groups = [[await ref for ref in entry.refs] for entry in entries]
            payload = [(g, e.num_records, e.version, e.num_tokens) for g, e in zip(groups, entries)]
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(payload))
        os.replace(tmp, path)  # a reader never sees a half-written file
        return len(payload)

    async def load(self, path: str) -> int:
        """Queue the groups :meth:`save` wrote (before anything new arrives), with their policy
        versions; returns how many."""
        import pickle

        import ray

        payload = pickle.loads(Path(path).read_bytes())
        async with self._changed:
            for records, num_records, version, num_tokens in payload:
                self.buffer.put([ray.put(r) for r in records], num_records, version, num_tokens=num_tokens)
            self._changed.notify_all()
        return len(payload)
