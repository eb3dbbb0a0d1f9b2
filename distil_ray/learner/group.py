"""LearnerGroup: N :class:`~distil_ray.learner.worker.LearnerWorker` ranks as named Ray actors.

The driver talks to the group only; the group splits each batch by prompt group, calls every
rank in parallel (every worker method is collective) and returns rank 0's answer. Records may be
passed as ObjectRefs: they travel to the ranks as references and are fetched there, never in the
driver.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import ray

from distil_ray.config import AlgorithmConfig, LearnerConfig, TeacherConfig
from distil_ray.learner.packing import balanced_split, sequence_length, split_groups
from distil_ray.learner.worker import Rendezvous, free_port
from distil_ray.records import Scored


class LearnerActor:
    """The Ray shell around one rank. Two-phase start: the group first asks rank 0 for an address
    to rendezvous on, then starts every rank at once (``init_process_group`` waits for all)."""

    def __init__(self):
        self.worker = None

    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, model_path: str, cfg, algorithm, rendezvous, options: dict) -> bool:
        from distil_ray.learner.worker import LearnerWorker

        self.worker = LearnerWorker(model_path, cfg, algorithm, rendezvous, **options)
        return True

    def train_step(self, records: list, first_of_batch: bool = True) -> dict:
        return self.worker.train_step(_resolve(records), first_of_batch=first_of_batch)

    def score_teacher(self, records: list, at_ids=None) -> list:
        return self.worker.score_teacher(_resolve(records), at_ids)

    def state_dict_numpy(self):
        return self.worker.state_dict_numpy()

    def weights(self, dtype: str, source: str = "policy"):
        return self.worker.weights(dtype, source)

    def advance_ema(self) -> None:
        self.worker.advance_ema()

    def sequence_logprobs(self, prompt_ids, response_ids):
        return self.worker.sequence_logprobs(prompt_ids, response_ids)

    def connect_engines(self, actors: list, options: dict) -> None:
        self.worker.connect_engines(actors, address=ray.util.get_node_ip_address(), **options)

    def send_weights(self, version: int, source: str = "policy") -> float:
        return self.worker.send_weights(version, source)

    def disconnect_engines(self) -> None:
        self.worker.disconnect_engines()

    def save_checkpoint(self, path: str, extra: dict) -> None:
        return self.worker.save_checkpoint(path, extra)

    def load_checkpoint(self, path: str) -> dict:
        return self.worker.load_checkpoint(path)

    def save_hf(self, path: str) -> None:
        return self.worker.save_hf(path)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _resolve(items: list) -> list[Scored]:
    """Fetch the ObjectRefs among ``items`` (one ``ray.get`` for all); a ref may hold one record
    or a list of them (e.g. a whole prompt group)."""
    refs = [x for x in items if isinstance(x, ray.ObjectRef)]
    fetched = iter(ray.get(refs)) if refs else iter(())
    out: list[Scored] = []
    for x in items:
        value = next(fetched) if isinstance(x, ray.ObjectRef) else x
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


class LearnerGroup:
    """``cfg.world_size`` ranks named ``{name}-{rank}``; ``cfg``: the ``learner`` section,
    ``algorithm``: the ``algorithm`` section; ``temperature``/``seed``/``ema_rate``/``teacher``: see
    :class:`LearnerWorker`."""

    def __init__(
        self,
        model_path: str,
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        ema_rate: float | None = None,
        teacher: TeacherConfig | None = None,
        name: str = "learner",
        setup_timeout_s: float = 600.0,
    ):
        # Fail in the driver, before any actor starts, on a setting every rank would reject.
        cfg.check()
        algorithm.check()
        self.world_size = cfg.world_size
        self.collective_timeout_s = cfg.collective_timeout_s
        self.name = name
        # Every method is collective: each rank must run the calls in the same order. The driver
        # calls from two threads (the main loop, and the producer when it resends weights to a
        # restarted engine), so the calls to all ranks are submitted under one lock; Ray runs a
        # caller's calls on an actor in submission order.
        self._submit_lock = threading.RLock()
        actor_cls = ray.remote(LearnerActor)
        self.placement = self._place(cfg, setup_timeout_s)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.actors = [
            actor_cls.options(name=f"{name}-{rank}", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                              resources=dict(cfg.resources) or None,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  self.placement, placement_group_bundle_index=rank)).remote()
            for rank in range(cfg.world_size)
        ]
        if teacher is not None:
            teacher.check()
        options = {"temperature": temperature, "seed": seed, "ema_rate": ema_rate, "teacher": teacher}
        try:
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=setup_timeout_s)
            ray.get([
                actor.setup.remote(str(model_path), cfg, algorithm,
                                   Rendezvous(rank, cfg.world_size, addr, port), options)
                for rank, actor in enumerate(self.actors)
            ], timeout=setup_timeout_s)
        except BaseException:
            self._kill()
            raise

    @staticmethod
    def _place(cfg: LearnerConfig, timeout_s: float):
        """One placement group for the ranks: all on one node where one node can hold them
        (STRICT_PACK: the collectives stay on the node), else on as few nodes as possible."""
        from ray.util.placement_group import placement_group

        bundle = {"CPU": float(cfg.num_cpus), **({"GPU": float(cfg.num_gpus)} if cfg.num_gpus else {}),
                  **{k: float(v) for k, v in cfg.resources.items()}}
        from ray.util.placement_group import remove_placement_group

        need = {k: v * cfg.world_size for k, v in bundle.items()}
        fits = any(all(node["Resources"].get(k, 0.0) >= v - 1e-9 for k, v in need.items())
                   for node in ray.nodes() if node.get("Alive"))
        # one node can hold them in all, but other actors may hold part of it already: STRICT_PACK
        # gets a short wait, then PACK (as few nodes as possible) the rest of the deadline
        attempts = [("STRICT_PACK", min(30.0, timeout_s))] if fits else []
        attempts.append(("PACK", timeout_s))
        for strategy, wait_s in attempts:
            group = placement_group([bundle] * cfg.world_size, strategy=strategy)
            try:
                ray.get(group.ready(), timeout=wait_s)
                return group
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(group)
        raise TimeoutError(f"learner ranks: no room on the cluster for {cfg.world_size} x {bundle} within "
                           f"{timeout_s:.0f} s (learner.num_cpus / num_gpus / resources)")

    # --------------------------------------------------------------- collective calls

    def _all(self, method: str, *args, timeout_s: float | None = None) -> list:
        """``method`` on every rank; past ``timeout_s`` (default: the collective timeout, after
        which a rank stuck in a collective has failed anyway, plus a margin) a clear error."""
        timeout_s = self.collective_timeout_s + 60.0 if timeout_s is None else timeout_s
        refs = self._submit(method, [args] * len(self.actors))
        try:
            return self._get(refs, timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"learner ranks: {method} did not finish within {timeout_s:.0f} s") from None

    @staticmethod
    def _get(refs: list, timeout_s: float | None):
        """``ray.get(refs)``; when a rank died, its death is the error raised, not a surviving
        rank's failed collective (which fails because its peer is gone)."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise
        except Exception as first:
            for ref in refs:
                try:
                    ray.get(ref, timeout=10)
                except ray.exceptions.RayActorError as dead:
                    raise dead from first
                except Exception:  # noqa: BLE001 - another rank's own failure: keep looking
                    pass
            raise

    def _submit(self, method: str, args_per_rank: Sequence[tuple]) -> list:
        """``method`` on each rank with its own arguments, submitted to all ranks at once."""
        with self._submit_lock:
            return [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_rank)]

    def train_step(self, records: Sequence[Scored] | Sequence[ray.ObjectRef], *,
                   sizes: Sequence[int] | None = None, timeout_s: float | None = None,
                   first_of_batch: bool = True) -> dict:
        """One optimizer step on ``records``; returns the metrics (global, identical on every rank).
        ``first_of_batch``: False for the later updates on one generation batch (what SDPO's
        two-factor IS correction measures from).

        Records are split so that a prompt's records share a rank, balanced by tokens. ObjectRefs
        are not fetched here: each ref is kept whole on one rank, so a ref must hold a whole prompt
        group (a list of records); ``sizes`` (token count per ref) balance the ranks, else each ref
        counts as one. ``timeout_s``: the deadline, past which the late ranks are named.
        """
        records = list(records)
        if records and all(isinstance(r, Scored) for r in records):
            shards = split_groups(records, self.world_size)
        else:
            if sizes is None:
                sizes = [sequence_length(r) if isinstance(r, Scored) else 1 for r in records]
            keys = [str(i) for i in range(len(records))]
            shards = [[records[i] for i in idx] for idx in balanced_split(keys, list(sizes), self.world_size)]
        # A list argument is not resolved by Ray: the refs reach the rank as refs.
        refs = self._submit("train_step", [(shard, first_of_batch) for shard in shards])
        try:
            return self._get(refs, timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            _, late = ray.wait(refs, num_returns=len(refs), timeout=0)
            names = [f"{self.name}-{refs.index(r)}" for r in late]
            raise TimeoutError(f"learner ranks: train_step did not finish within {timeout_s:g} s "
                               f"(trainer.actor_timeout_s); still waiting on {', '.join(names)}") from None

    def score_teacher(self, records: Sequence[Scored], at_ids: Sequence | None = None) -> list[Scored]:
        """``LearnerWorker.score_teacher`` over the ranks (``teacher.backend=learner``): record i on
        rank i mod world size; the records come back in input order. What ``train_step`` does
        itself before its loss; here for inspection and tests."""
        records = list(records)
        shares = [list(range(rank, len(records), self.world_size)) for rank in range(self.world_size)]
        results = ray.get(self._submit("score_teacher", [
            ([records[i] for i in share], None if at_ids is None else [at_ids[i] for i in share]) for share in shares]),
            timeout=self.collective_timeout_s)
        out: list[Scored] = [None] * len(records)  # type: ignore[list-item]
        for share, scored in zip(shares, results):
            for i, r in zip(share, scored):
                out[i] = r
        return out

    def state_dict_ref(self) -> ray.ObjectRef:
        """An ObjectRef to rank 0's full float32 numpy state dict; the dict stays out of the driver."""
        return self._rank0_ref("state_dict_numpy")

    def weights_ref(self, dtype: str, source: str = "policy") -> ray.ObjectRef:
        """An ObjectRef to rank 0's full weights in ``dtype`` (``distil_ray.engines.base.Weights``):
        the policy's, or (``source="ema"``) their moving average."""
        return self._rank0_ref("weights", dtype, source)

    def advance_ema(self) -> None:
        """Move the moving average towards the current weights (``ema_rate`` set)."""
        self._all("advance_ema", timeout_s=self.collective_timeout_s)

    def _rank0_ref(self, method: str, *args) -> ray.ObjectRef:
        refs = self._submit(method, [args] * len(self.actors))
        timeout_s = self.collective_timeout_s + 60.0
        try:
            ray.get(refs[1:], timeout=timeout_s)  # None from the others; waiting surfaces their errors
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"learner ranks: {method} did not finish within {timeout_s:.0f} s") from None
        ready, _ = ray.wait(refs[:1], fetch_local=False, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"learner rank 0: {method} did not finish within {timeout_s:.0f} s")
        return refs[0]

    def sequence_logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        return self._all("sequence_logprobs", list(prompt_ids), list(response_ids))[0]

    def save_checkpoint(self, path: str, extra: dict) -> None:
        self._all("save_checkpoint", str(path), extra)

    def connect_engines(self, actors: Sequence, *, dtype: str, bucket_bytes: int, timeout_s: float,
                        source: str = "policy") -> None:
        """A weight-transfer group from rank 0 to the engines of ``actors``, for the ``source``
        weights (see learner/transfer.py)."""
        options = {"dtype": dtype, "bucket_bytes": int(bucket_bytes), "timeout_s": float(timeout_s), "source": source}
        # A list argument is not resolved by Ray: the handles reach the ranks as handles.
        # the engines' own rendezvous has timeout_s; the margin lets their error arrive first
        self._all("connect_engines", list(actors), options, timeout_s=float(timeout_s) + 60.0)

    def send_weights_refs(self, version: int, source: str = "policy") -> list:
        """Every rank's part of one broadcast of ``source`` to its engines (wait on all of them)."""
        return self._submit("send_weights", [(int(version), source)] * len(self.actors))

    def disconnect_engines(self, timeout_s: float = 60.0) -> None:
        self._all("disconnect_engines", timeout_s=timeout_s)

    def load_checkpoint(self, path: str) -> dict:
        return self._all("load_checkpoint", str(path))[0]

    def save_hf(self, path: str) -> None:
        self._all("save_hf", str(path))

    def shutdown(self) -> None:
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception:  # a dead rank must not keep the others alive
            pass
        self._kill()

    def _kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if getattr(self, "placement", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
            self.placement = None

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
