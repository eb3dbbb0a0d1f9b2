"""The driver: the one place that knows the whole flow (DESIGN §2).

    for each step:
        prompts  ─► RolloutWorkers   n samples per prompt, streamed as each sample finishes
                 ─► FeedbackPool     each sample graded the moment it exists (reward + feedback text)
                 ─► TeacherScorer    each prompt's group, once complete: teacher top-k on the student's tokens
                                     (or only its context, with teacher.backend=learner: the learner scores it)
                 ─► ReplayQueue      the group's records by reference, tagged with the policy version
        LearnerGroup.train_step(batch from the queue)      FSDP2 ranks, the algorithm's loss
        weight sync ─► RolloutWorkers, TeacherScorer       the new policy version (object store or collective)
        evaluate every `eval_every` steps; checkpoint every `checkpoint_every` steps

Records move between actors as ObjectRefs: the driver routes references and reads only the small
routing header each rollout carries (its prompt), never the records. With ``max_staleness = s > 0``
a producer thread generates up to ``s`` rounds ahead of the learner; the queue drops and counts
anything older than ``s`` versions and the losses correct the rest with the behaviour log-probs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from distil_ray.engines import SamplingConfig
from distil_ray.engines.base import EngineRestarted
from distil_ray.evaluation.metrics import aggregate_grades
from distil_ray.feedback.pool import FeedbackPool
from distil_ray.learner.group import LearnerGroup
from distil_ray.learner.transfer import vllm_backend
from distil_ray.learner.weight_sync import WeightSync
from distil_ray.records import Graded, Prompt, Scored
from distil_ray.replay import ReplayQueue
from distil_ray.restarts import call_when_alive
from distil_ray.rollout.worker import RolloutWorker
from distil_ray.tasks.prompts import PromptStream, to_prompts
from distil_ray.teacher.actor import TeacherActor
from distil_ray.telemetry import MetricsLogger, Progress
from distil_ray.telemetry.ray_metrics import DashboardMetrics
from distil_ray.telemetry.reduce import reduce_metrics

log = logging.getLogger("distil_ray.trainer")

CHECKPOINTS = "checkpoints"
REPLAY_FILE = "replay.pkl"  # the groups generated ahead of the learner, in a checkpoint


def _checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory holds (its name, ``step_000040``)."""
    try:
        return int(path.name.rsplit("_", 1)[-1])
    except ValueError:
        from distil_ray.config import ConfigError

        raise ConfigError(f"trainer.resume={str(path)!r}: not a checkpoint directory (step_NNNNNN)") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dead_actor(error: BaseException) -> str:
    """'actor learner-1 (LearnerActor, pid 4949) died', from the fields Ray puts in the message."""
    text = str(error)
    fields = dict(re.findall(r"^\s*(name|class_name|pid): (\S+)\s*$", text, flags=re.M))
    if "name" not in fields:
        return _first_line(error)
    what = ", ".join(x for x in (fields.get("class_name"), f"pid {fields['pid']}" if "pid" in fields else None) if x)
    return f"actor {fields['name']}" + (f" ({what})" if what else "") + " died"


class RunStopped(RuntimeError):
    """The run cannot go on (an actor stopped answering, too many non-finite steps): the message
    is the whole story, one line naming what failed and what to do."""


def wait_all(refs: list, timeout_s: float, what: str, holder=None) -> None:
    """Wait for every ref (not fetching them); past ``timeout_s`` stop the run naming ``what`` and,
    where ``holder(ref)`` can tell, the actors still holding the late ones."""
    if not refs:
        return
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)
    if pending:
        who = sorted({h for h in map(holder, pending) if h}) if holder is not None else []
        raise RunStopped(f"{what}: {len(pending)} of {len(refs)} not done within {timeout_s:g} s "
                         f"(trainer.actor_timeout_s)" + (f"; still waiting on {', '.join(who)}" if who else ""))


@ray.remote(num_cpus=0)
def _gather_group(*records: Graded) -> list[Scored]:
    """Without a teacher (grpo, sft): one ref for a prompt's whole group, so the learner keeps the
    group on one rank; records carry no teacher scores and no distillation signal."""
    return [Scored.from_graded(r) for r in records]


class StageClock:
    """Seconds per stage within one step; what the step took beyond them is driver/Ray overhead."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def timed(self, stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(stage, time.perf_counter() - t0)

    def total(self) -> float:
        return time.perf_counter() - self.start


class Trainer:
    def __init__(self, cfg, run_dir: str | os.PathLike, *, run_name: str | None = None, group: str | None = None):
        """``run_name``/``group``: how wandb names and groups the run (main.py: a sweep's jobs by
        their overrides, grouped by the sweep); default the run directory's name, no group."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_name, self.group = run_name, group
        self.algorithm = cfg.algorithm.spec
        self.version = 0  # policy version = number of weight syncs (one per generation batch trained on)
        self.step = 0
        self.best: dict[str, float] = {}
        self._producer: ThreadPoolExecutor | None = None
        self._rounds: list[Future] = []  # data rounds in flight, oldest first
        self._rounds_started = 0
        self._owns_ray = False
        self._bad_steps = 0  # consecutive steps whose every update was skipped
        self._skipped_total = 0.0
        self._checkpointed_step: int | None = None
        self.timeout_s = float(cfg.trainer.actor_timeout_s)
        # actors Ray restarted and the work given again because of them (logged as faults/*)
        self.faults: dict[str, int] = defaultdict(int)
        self._tokenizer_ref = None
        self._dumps: list[ray.ObjectRef] = []  # rollout dumps being written

    # ------------------------------------------------------------------ the algorithm
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        except ray.exceptions.RayActorError as e:  # a learner rank or the replay queue: not restartable
            self.abort()
            raise RunStopped(f"{_dead_actor(e)}: the run cannot go on without it; resume with trainer.resume=auto "
                             f"(from {self._latest_checkpoint()})") from None
        except BaseException:
            self.abort()
            raise

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        if self.step == 0 and cfg.trainer.eval_at_start:
            self.evaluate()
        progress = Progress(cfg.trainer.total_steps, start_step=self.step)
        while self.step < cfg.trainer.total_steps:
            metrics, stage_seconds = self.train_step()
            if self.step % cfg.logging.console_every == 0 or self.step == cfg.trainer.total_steps:
                progress.print(self.step, metrics, stage_seconds)
            if self.step == cfg.trainer.total_steps:
                self.checkpoint()  # first: a failing final evaluation must not lose the trained weights
            if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0:
                self.evaluate()
            if (cfg.trainer.checkpoint_every and self.step % cfg.trainer.checkpoint_every == 0
                    and self._checkpointed_step != self.step):
                self.checkpoint()
        if not (cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0):
            self.evaluate()  # the final evaluation
        return self.finish()

    def setup(self) -> None:
        self._t_start = time.perf_counter()
        clock = StageClock()
        # the model and the data first: a missing model or a bad record fails before Ray starts
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_logging()
        self.task = self.cfg.task.build()
        model_dir = clock.timed("model", self.prepare_model)  # incl. a warm start that is not cached yet
        clock.timed("data", self.load_prompts, model_dir)
        clock.timed("ray_start", self.start_ray)
        clock.timed("actors", self.start_actors, model_dir)
        clock.timed("resume", self.maybe_resume)
        self.startup_s = clock.total()
        self.metrics.log(self.step, {"time/startup_s": self.startup_s,
                                     **{f"time/startup/{k}_s": v for k, v in clock.seconds.items()}})

    def train_step(self) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step: data for it (produced now, or ahead of time when off-policy), the
        learners' update, and the weight sync that makes the next rollouts on-policy again."""
        cfg = self.cfg
        clock = StageClock()
        # generation runs up to `max_staleness` rounds ahead of the learner (0: strictly on-policy)
        while len(self._rounds) < 1 + cfg.replay.max_staleness and self._rounds_started < cfg.trainer.total_steps:
            self._rounds.append(self.start_round(self.stream.next_batch()))
        for stage, seconds in self._rounds.pop(0).result().items():
            clock.add(stage, seconds)

        batch = clock.timed("queue", self.take_batch)
        train_metrics = clock.timed("learner", self.update_policy, batch)
        self.step += 1
        if train_metrics["learner/skipped_updates"] < 1.0:
            self._bad_steps = 0
            self.version += 1
            clock.timed("sync", self.weight_sync.push, self.version)
        else:  # every update was skipped (non-finite loss or gradient): the weights did not change
            self._bad_steps += 1
            log.warning("step %d: non-finite loss %.4g or gradient norm %.4g, update skipped (%d in a row)",
                        self.step, train_metrics["loss"], train_metrics["grad_norm"], self._bad_steps)
        self._skipped_total += train_metrics["learner/skipped_updates"] * train_metrics["learner/updates"]

        metrics = {**train_metrics, **ray.get(self.replay.stats.remote(), timeout=self.timeout_s)}
        metrics["learner/skipped_updates_total"] = float(self._skipped_total)
        faults = dict(self.faults)
        faults["engine_restarts"] = faults.get("engine_restarts", 0) + self.weight_sync.restarted_engines
        metrics.update({f"faults/{k}": float(v) for k, v in faults.items()})
        metrics["policy_version"] = float(self.version)
        metrics["replay/version_lag"] = float(self._last_lag)
        metrics.update({f"time/{stage}_s": s for stage, s in clock.seconds.items()})
        metrics["time/step_s"] = clock.total()
        if clock.seconds.get("rollout"):
            # response tokens generated per second of the round's generation
            response_tokens = metrics.get("rollout/response_tokens_mean", 0.0) * metrics.get("rollout/num_samples", 0.0)
            metrics["rollout/tokens_per_s"] = response_tokens / clock.seconds["rollout"]
        metrics["time/overhead_s"] = max(0.0, clock.total() - sum(clock.seconds.values()))
        self.metrics.log(self.step, metrics)
        self.dashboard.record(metrics)
        if self._bad_steps >= self.cfg.trainer.max_bad_steps:
            raise RunStopped(
                f"{self._bad_steps} steps in a row with a non-finite loss or gradient norm (trainer.max_bad_steps="
                f"{self.cfg.trainer.max_bad_steps}; last loss {metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}): "
                f"their updates were skipped; lower learner.lr or check the data, then resume from {self._latest_checkpoint()}")
        return metrics, dict(clock.seconds)

    def finish(self) -> dict[str, Any]:
        if self._checkpointed_step != self.step:
            self.checkpoint()
        wait_all(self._dumps, self.timeout_s, "rollout dumps")
        ray.get(self._dumps)  # a failed write is reported
        if self.cfg.trainer.save_hf_at_end:
            self.learner.save_hf(str(self.run_dir / "hf_model"))
        summary = {
            "step": self.step,
            "wall_s": time.perf_counter() - self._t_start,
            "startup_s": self.startup_s,
            **self.best,
            **ray.get(self.replay.stats.remote(), timeout=self.timeout_s),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.shutdown()
        return summary

    # ------------------------------------------------------------------ set-up
    def start_logging(self) -> None:
        cfg = self.cfg
        # a resumed run continues the stopped run's file from its checkpoint: what that run logged
        # after it (steps it then lost) is dropped, so every step appears once
        path = self.resume_path()
        self._start_step = _checkpoint_step(path) if path is not None else 0
        self.metrics = MetricsLogger(
            self.run_dir,
            # auto without a checkpoint: a fresh start, what an earlier attempt logged is dropped
            rewind_to=-1 if path is None and self.cfg.trainer.resume == "auto" else None,
            name=self.run_name,
            group=self.group,
            wandb=cfg.logging.wandb,
            project=cfg.logging.wandb_project,
            mode=cfg.logging.wandb_mode,
            config=cfg,
        )

    def start_ray(self) -> None:
        cfg = self.cfg
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # ray.address, else RAY_ADDRESS (what `ray job submit` sets), else a fresh local cluster
            # of this run's own: never whichever local cluster happened to start last
            address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
            # the cluster's own settings only for a cluster this run starts
            local = {"num_cpus": cfg.ray.num_cpus, "include_dashboard": cfg.ray.include_dashboard,
                     "dashboard_port": cfg.ray.dashboard_port} if address == "local" else {}
            # a namespace of the run's own: runs sharing a cluster never collide on actor names
            self.namespace = cfg.ray.namespace or f"distil_ray-{self.run_dir.name}-{uuid.uuid4().hex[:8]}"
            ray.init(address=address, namespace=self.namespace, log_to_driver=False, **local)
        self._check_cluster_resources()
        self._link_actor_logs()
        self.dashboard = DashboardMetrics(run=self.run_dir.name)

    def _check_cluster_resources(self) -> None:
        """Actors that do not fit would wait for resources forever: fail first, in one line."""
        from distil_ray.config import check_cpu_budget, check_gpu_budget

        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        check_cpu_budget(self.cfg, cpus, f"the cluster has {cpus:g} CPUs")
        check_gpu_budget(self.cfg, gpus, f"the cluster has {gpus:g} GPUs")

    def _link_actor_logs(self) -> None:
        """Every actor's stdout/stderr lives in Ray's session log dir; link it from the run dir."""
        try:
            logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        except Exception:  # a remote cluster: its logs are on its nodes
            return
        link = self.run_dir / "actor_logs"
        if not link.exists() and logs.is_dir():
            link.symlink_to(logs, target_is_directory=True)

    def prepare_model(self) -> str:
        """The policy's starting checkpoint: a hub/local model, or the tiny local model plus the
        task's supervised warm start (both built once and cached by their config)."""
        cfg = self.cfg
        if cfg.model.path is not None:
            check_model_path(str(cfg.model.path))
            return str(cfg.model.path)
        from distil_ray.models.tiny import tiny_model_dir

        task = self.task
        # a task may offer lines of its own text for the tiny tokenizer: its prompts and feedback
        # then tokenise into a few tokens per word, as a real LLM's vocabulary would
        corpus = list(task.tokenizer_corpus()) if hasattr(task, "tokenizer_corpus") else []
        tiny = dataclasses.replace(cfg.model.tiny, extra_corpus=list(cfg.model.tiny.extra_corpus) + corpus)
        model_dir = tiny_model_dir(tiny)
        if cfg.warm_start.enabled:
            from distil_ray.models.warm_start import warm_start_dir

            t0 = time.perf_counter()
            model_dir = warm_start_dir(model_dir, task, cfg.warm_start)
            log.info("warm start ready in %.1f s: %s", time.perf_counter() - t0, model_dir)
        return str(model_dir)

    def load_prompts(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_dir, local_files_only=cfg.model.path is None)
        self.tokenizer = tokenizer  # decodes the samples the logs show
        task = self.task
        from distil_ray.config import ConfigError
        from distil_ray.tasks.prompts import check_examples

        try:
            train = check_examples(task.load(cfg.task.train_split), f"task.train_split={cfg.task.train_split!r}")
            val = check_examples(task.load(cfg.task.val_split), f"task.val_split={cfg.task.val_split!r}")
        except (ValueError, FileNotFoundError) as e:  # DataFormatError names the file and the line
            raise ConfigError(f"task {cfg.task.name!r}: {e}") from None
        if cfg.eval.max_prompts is not None:
            val = val[: cfg.eval.max_prompts]
        template = cfg.model.chat_template_kwargs()
        self.train_prompts = self._within_length(
            to_prompts(train, tokenizer, template, special_tokens=cfg.model.train_prompt_special_tokens), "train")
        self.val_prompts = self._within_length(to_prompts(val, tokenizer, template), "validation")
        self.stream = PromptStream(self.train_prompts, cfg.trainer.prompts_per_step, seed=cfg.seed)
        log.info("%d train prompts, %d validation prompts", len(self.train_prompts), len(self.val_prompts))

    def _within_length(self, prompts: list[Prompt], split: str) -> list[Prompt]:
        # the rollout engine must also have room to generate at least one token after the prompt
        limits = {"task.max_prompt_tokens": self.cfg.task.max_prompt_tokens,
                  "rollout.max_model_len - 1": None if self.cfg.rollout.max_model_len is None
                  else self.cfg.rollout.max_model_len - 1}
        limits = {k: v for k, v in limits.items() if v is not None}
        if not limits:
            return prompts
        key, limit = min(limits.items(), key=lambda kv: kv[1])
        kept = [p for p in prompts if len(p.prompt_ids) <= limit]
        if len(kept) < len(prompts):
            log.warning("%d of %d %s prompts are longer than %s=%d and are left out",
                        len(prompts) - len(kept), len(prompts), split, key, limit)
        self.metrics.log(self._start_step, {f"data/{split}_prompts_too_long": float(len(prompts) - len(kept))})
        return kept

    def start_actors(self, model_dir: str) -> None:
        """Every actor takes its own config section (plus the run's dtype and seed)."""
        cfg = self.cfg
        run = {"dtype": cfg.model.dtype, "seed": cfg.seed}
        # weight_sync.backend=collective: the engines that follow the policy open vLLM's weight transfer
        transfer = {"weight_transfer": vllm_backend(cfg.learner.backend)} if cfg.weight_sync.backend == "collective" else {}
        # Ray restarts a rollout worker, grader or teacher that dies; the driver resends the weights
        # and the work (stream_rollouts, _check_teacher); graders rerun their calls themselves
        restarts = cfg.trainer.max_actor_restarts
        # custom resources (rollout.resources, ...) put each kind of actor on the nodes that offer them
        rollout_actor = ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                   resources=dict(cfg.rollout.resources) or None, max_restarts=restarts)(RolloutWorker)
        self.rollout_workers = [rollout_actor.options(name=f"rollout-{i}").remote(model_dir, cfg.rollout, **run, **transfer)
                                for i in range(cfg.rollout.num_workers)]
        self.feedback = FeedbackPool(cfg.task, cfg.feedback, max_restarts=restarts)
        self.teacher = None
        on_learner = cfg.teacher.backend == "learner"  # the learner ranks run the teacher's forward
        if self.algorithm.needs_teacher:
            # groups are scored in batches: whatever is queued when the engine is next free; with
            # the teacher on the learner this actor only builds the contexts (no engine, no GPU)
            teacher_actor = ray.remote(num_cpus=cfg.teacher.num_cpus, num_gpus=0 if on_learner else cfg.teacher.num_gpus,
                                       resources=dict(cfg.teacher.resources) or None,
                                       max_restarts=restarts)(TeacherActor)
            follows = transfer if cfg.teacher.follows_policy else {}  # the policy, or its average
            self.teacher = teacher_actor.options(name="teacher").remote(
                model_dir, cfg.teacher, **run, **follows, chat_template_kwargs=cfg.model.chat_template_kwargs())
        self.replay = ray.remote(num_cpus=0)(ReplayQueue).options(name="replay").remote(cfg.replay)
        # the learner scores the sampled tokens at the temperature they were sampled at
        # an EMA teacher's weights are a moving average the learner ranks keep of their own
        ema_rate = cfg.teacher.ema_rate if self.teacher is not None and cfg.teacher.update == "ema" else None
        self.learner = LearnerGroup(model_dir, cfg.learner, cfg.algorithm, temperature=cfg.rollout.temperature,
                                    seed=cfg.seed, ema_rate=ema_rate,
                                    teacher=cfg.teacher if self.teacher is not None and on_learner else None)
        self.weight_sync = WeightSync(self.learner, self.rollout_workers, None if on_learner else self.teacher,
                                      cfg.weight_sync, teacher_update=cfg.teacher.update, dtype=cfg.model.dtype,
                                      advance_ema=ema_rate is not None)
        self.weight_sync.connect()
        # each prompt, with its reference data (answer keys, tests), goes into the object store once
        self.prompt_refs = {p.uid: ray.put(p) for p in self.train_prompts + self.val_prompts}
        self._producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="producer")

    # ------------------------------------------------------------------ one round of data
    def start_round(self, prompts: list[Prompt]) -> Future:
        self._rounds_started += 1
        seed = self.cfg.seed * 1_000_003 + self._rounds_started  # a resumed run samples what it would have
        return self._producer.submit(self.produce, prompts, seed)

    def stream_rollouts(self, prompts: list[Prompt], sampling: SamplingConfig, version: int):
        """``(prompt uid, token count, Rollout ref)`` in completion order across all rollout workers.

        A worker whose actor dies (Ray restarts it) is sent the current weights and its prompts
        whose groups were not complete are generated again; for each such prompt a
        ``(uid, 0, None)`` comes first: forget the samples received for it so far."""
        workers = self.rollout_workers
        streams: dict = {}  # stream -> (worker index, its prompts, samples received per uid)

        def start(i: int, chunk: list[Prompt]) -> None:
            stream = workers[i].stream.options(num_returns="streaming").remote(chunk, sampling, version)
            streams[stream] = (i, chunk, defaultdict(int))

        for i in range(len(workers)):
            chunk = [p.without_reference() for p in prompts[i :: len(workers)]]
            if chunk:
                start(i, chunk)
        while streams:
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise RunStopped(f"rollout workers: no sample from {len(streams)} of them within {self.timeout_s:g} s "
                                 "(trainer.actor_timeout_s)")
            stream = ready[0]
            i, chunk, received = streams[stream]
            try:
                header_ref = next(stream)
                # each rollout is preceded by a small header naming its prompt and its length: the
                # driver routes by it and never pulls the record itself
                uid, num_tokens = ray.get(header_ref)
                rollout_ref = next(stream)
            except StopIteration:
                del streams[stream]
                continue
            except (ray.exceptions.RayActorError, EngineRestarted) as e:
                del streams[stream]
                lost = [p for p in chunk if received[p.uid] < sampling.n]
                self._restore_engine(workers[i], f"rollout-{i}", e)
                self.faults["resubmitted_samples"] += len(lost) * sampling.n
                for p in lost:
                    yield p.uid, 0, None
                if lost:
                    start(i, lost)
                continue
            received[uid] += 1
            yield uid, num_tokens, rollout_ref

    def _restore_engine(self, engine, name: str, error: BaseException) -> None:
        """``engine``'s actor died (or came back restarted): once Ray has restarted it, send it the
        weights it should hold; stop the run where that cannot be done."""
        restarts = self.cfg.trainer.max_actor_restarts
        # a fixed teacher, or one that only builds contexts (teacher.backend=learner), holds no policy weights
        needs_weights = engine is not self.teacher or self.cfg.teacher.follows_policy
        if needs_weights and self.cfg.weight_sync.backend == "collective":
            raise RunStopped(f"{name} died ({_first_line(error)}); weight_sync.backend=collective cannot take a "
                             f"restarted engine back: resume with trainer.resume=auto from {self._latest_checkpoint()}")
        try:
            call_when_alive(engine.version.remote, self.timeout_s)  # waits for the restart
            if needs_weights:
                self.weight_sync.resend(engine, self.version)
        except ray.exceptions.GetTimeoutError:
            raise RunStopped(f"{name} did not come back within {self.timeout_s:g} s (trainer.actor_timeout_s)") from None
        except ray.exceptions.RayActorError as e:
            raise RunStopped(f"{name} died and was not restarted (trainer.max_actor_restarts={restarts}): "
                             f"{_first_line(e)}; resume with trainer.resume=auto from {self._latest_checkpoint()}") from None
        self.faults["engine_restarts"] += 1
        log.warning("%s was restarted (%s); it holds policy version %d again", name, _first_line(error), self.version)

    def _score_group(self, uid: str, graded: list) -> tuple[ray.ObjectRef | None, ray.ObjectRef]:
        """(a small header ref, the group's records ref): the teacher's scores, or (no teacher)
        the graded records gathered under one ref."""
        if self.teacher is None:
            return None, _gather_group.remote(*graded)
        header, records = self.teacher.score_group_with_header.options(num_returns=2).remote(
            self.prompt_refs[uid], *graded)
        return header, records

    def produce(self, prompts: list[Prompt], seed: int) -> dict[str, float]:
        """Generate, grade and score one round; the finished groups go into the replay queue.
        Returns the seconds each stage took."""
        t0 = time.perf_counter()
        version = self.version  # the weights this round samples with (the last sync finished before it)
        sampling = self.cfg.rollout_sampling(seed=seed)
        groups: dict[str, list[ray.ObjectRef]] = defaultdict(list)
        group_tokens: dict[str, int] = defaultdict(int)
        # per complete group: its uid, graded refs, header ref (None without a teacher), records ref, tokens
        scored: list[list] = []
        graded_all: list[ray.ObjectRef] = []
        for uid, num_tokens, rollout_ref in self.stream_rollouts(prompts, sampling, version):
            if rollout_ref is None:  # its worker died: the prompt's samples come again
                groups.pop(uid, None)
                group_tokens.pop(uid, None)
                continue
            graded_ref = self.feedback.grade_ref(self.prompt_refs[uid], rollout_ref)
            graded_all.append(graded_ref)
            groups[uid].append(graded_ref)
            group_tokens[uid] += num_tokens
            if len(groups[uid]) == sampling.n:  # the group is complete: on to the teacher
                scored.append([uid, groups[uid], *self._score_group(uid, groups[uid]), group_tokens[uid]])
        t_rollout = time.perf_counter()
        wait_all(graded_all, self.timeout_s, "grading", holder=self.feedback.holder)
        t_feedback = time.perf_counter()
        wait_all([records for _, _, _, records, _ in scored], self.timeout_s,
                 "teacher" if self.teacher is not None else "grouping")
        if self.teacher is not None:
            self._check_teacher(scored)
        t_teacher = time.perf_counter()
        puts = [self.replay.put.remote([records], sampling.n, version, self.timeout_s, num_tokens=tokens)
                for _, _, _, records, tokens in scored]
        wait_all(puts, self.timeout_s + 60.0, "replay queue")
        if not all(ray.get(puts)):
            raise RunStopped(f"replay queue: full for {self.timeout_s:g} s (trainer.actor_timeout_s); "
                             "is replay.capacity below what max_staleness needs?")
        return {
            "rollout": t_rollout - t0,
            "feedback": t_feedback - t_rollout,
            # without a teacher this is the gathering of each group under one ref
            ("teacher" if self.teacher is not None else "group"): t_teacher - t_feedback,
        }

    def _check_teacher(self, scored: list[list]) -> None:
        """Every group's header: a group whose call failed because the teacher died, or came back
        restarted without its weights, is scored again once the teacher has them."""
        for _attempt in range(self.cfg.trainer.max_actor_restarts + 1):
            failed = []
            for item in scored:
                try:
                    ray.get(item[2], timeout=self.timeout_s)
                except (ray.exceptions.RayActorError, EngineRestarted) as e:
                    failed.append((item, e))
            if not failed:
                return
            self._restore_engine(self.teacher, "teacher", failed[0][1])
            for item, _ in failed:
                item[2], item[3] = self._score_group(item[0], item[1])
            self.faults["resubmitted_groups"] += len(failed)
            wait_all([item[3] for item, _ in failed], self.timeout_s, "teacher")
        raise RunStopped(f"teacher: groups kept failing after {self.cfg.trainer.max_actor_restarts} restarts")

    def log_generations(self, prompts: list[Prompt], grades: list[list]) -> None:
        """The first ``logging.log_generations`` validation samples, with the context the teacher
        would have had, to ``RUN_DIR/generations/`` and wandb."""
        from distil_ray.telemetry.generations import sample_row, write_rows

        rows, budget = [], self.cfg.logging.log_generations
        for prompt, group in zip(prompts, grades):
            if len(rows) >= budget:
                break
            contexts = [None] * len(group)
            if self.teacher is not None:
                contexts = ray.get(self.teacher.context_ids.remote(self.prompt_refs[prompt.uid], group),
                                   timeout=self.timeout_s)
            rows += [sample_row(self.step, g, self.tokenizer, c) for g, c in zip(group, contexts)][: budget - len(rows)]
        write_rows(self.run_dir / "generations" / f"step_{self.step:06d}.jsonl", rows)
        self.metrics.log_table("val/generations", rows, self.step)

    def take_batch(self) -> tuple[list[ray.ObjectRef], list[int]]:
        """One ref per prompt group, and each group's token count."""
        refs, versions, tokens = ray.get(
            self.replay.get.remote(self.cfg.trainer.prompts_per_step, self.version, self.timeout_s),
            timeout=self.timeout_s + 60.0)
        if refs and self.cfg.logging.rollout_dump:  # written next to the records, by a task
            from distil_ray.telemetry.generations import dump_rollouts

            if self._tokenizer_ref is None:
                self._tokenizer_ref = ray.put(self.tokenizer)
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            path = self.run_dir / "rollouts" / f"step_{self.step + 1:06d}.jsonl"
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # the run dir's disk
            self._dumps.append(dump_rollouts.options(scheduling_strategy=here).remote(
                str(path), self._tokenizer_ref, self.step + 1, *refs))
        if not refs:
            raise RunStopped(f"the replay queue served no data within {self.timeout_s:g} s: every group was too stale "
                             "or none arrived")
        assert len(refs) == len(tokens), "one ref per group: the producer puts each group under one ref"
        # how many policy versions behind the learner the batch was sampled (0 when on-policy)
        self._last_lag = sum(self.version - v for v in versions) / len(versions)
        return refs, tokens

    def update_policy(self, batch: tuple[list[ray.ObjectRef], list[int]]) -> dict[str, float]:
        """``learner.updates_per_batch`` optimizer steps, each on its own share of the batch's groups,
        spread over the learner ranks by token count."""
        refs, tokens = batch
        k = self.cfg.learner.updates_per_batch
        out = reduce_metrics(self.learner.train_step(refs[i::k], sizes=tokens[i::k], timeout_s=self.timeout_s,
                                                     first_of_batch=i == 0)
                             for i in range(k))
        out["learner/updates"] = float(k)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        prompts = self.val_prompts
        sampling = self.cfg.eval_sampling(seed=self.cfg.seed)
        graded_refs: dict[str, list[ray.ObjectRef]] = defaultdict(list)
        for uid, _, rollout_ref in self.stream_rollouts(prompts, sampling, self.version):
            if rollout_ref is None:  # its worker died: the prompt's samples come again
                graded_refs.pop(uid, None)
                continue
            graded_refs[uid].append(self.feedback.grade_ref(self.prompt_refs[uid], rollout_ref))
        wait_all([r for refs in graded_refs.values() for r in refs], self.timeout_s, "grading (evaluation)",
                 holder=self.feedback.holder)
        grades = []
        for p in prompts:
            group = sorted(ray.get(graded_refs[p.uid]), key=lambda g: g.sample_index)
            grades.append(group)
        if self.cfg.logging.log_generations:
            self.log_generations(prompts, grades)
        domains = [p.meta.get("domain") for p in prompts]
        metrics = aggregate_grades(grades, groups=domains if all(domains) else None)
        metrics = {f"val/{k}": v for k, v in metrics.items()}
        # a task may add metrics of its own over the graded samples (e.g. which answer format was chosen)
        task_metrics = getattr(self.task, "eval_metrics", None)
        if callable(task_metrics):
            metrics.update({f"val/task/{k}": v for k, v in task_metrics(grades).items()})
        metrics["time/eval_s"] = time.perf_counter() - t0
        if self.cfg.eval.keep_best and metrics["val/accuracy"] > self.best.get("val/best_accuracy", -1.0):
            self.best = {"val/best_accuracy": metrics["val/accuracy"], "val/best_step": float(self.step)}
            if self.cfg.eval.save_best:
                self.learner.save_hf(str(self.run_dir / "best_model"))
        metrics.update(self.best)
        self.metrics.log(self.step, metrics)
        self.dashboard.record(metrics)
        print(
            f"eval step {self.step}: val/accuracy {metrics['val/accuracy']:.3f} "
            f"({len(prompts)} prompts × {sampling.n}, {metrics['time/eval_s']:.1f} s)",
            flush=True,
        )
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What the driver itself must restore for an exact resume (the learners and engines keep
        the rest): counters, the data position, the best evaluation so far, and how many rounds
        were generated ahead of the learner (their groups are saved beside, see checkpoint)."""
        return {"step": self.step, "version": self.version, "data": self.stream.state(), "best": dict(self.best),
                "rounds_started": self._rounds_started, "rounds_in_flight": len(self._rounds),
                "bad_steps": self._bad_steps, "skipped_updates": self._skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.version = int(state["step"]), int(state["version"])
        self.stream.load_state(state["data"])
        self.best = dict(state.get("best", {}))
        self._rounds_started = int(state.get("rounds_started", self.step))
        self._bad_steps = int(state.get("bad_steps", 0))
        self._skipped_total = float(state.get("skipped_updates", 0.0))

    def checkpoint(self) -> None:
        """The learners' state, the driver's, and the rounds generated ahead of the learner: with
        ``max_staleness > 0`` those were sampled by weights no checkpoint holds, so their groups
        are saved as they are (``replay.pkl``) and queued again on resume, with their versions."""
        path = self.run_dir / CHECKPOINTS / f"step_{self.step:06d}"
        t0 = time.perf_counter()
        for round_ in self._rounds:  # finish what is in flight: its groups go into the queue
            round_.result(timeout=4 * self.timeout_s)
        self.learner.save_checkpoint(str(path), self.state_dict())  # with the EMA teacher's average
        ray.get(self.replay.save.remote(str(path / REPLAY_FILE)), timeout=self.timeout_s)
        (path.parent / "latest").write_text(path.name)
        self._checkpointed_step = self.step
        self._prune_checkpoints(keep=path)
        self.metrics.log(self.step, {"time/checkpoint_s": time.perf_counter() - t0})

    def _prune_checkpoints(self, keep: Path) -> None:
        """``trainer.keep_checkpoints=K``: only the newest K step directories stay (the one just
        written always among them); 0 keeps every one."""
        k = self.cfg.trainer.keep_checkpoints
        if not k:
            return
        steps = sorted(p for p in keep.parent.glob("step_*") if p.is_dir() and p != keep)
        for old in steps[: max(0, len(steps) - (k - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def _latest_checkpoint(self) -> str:
        latest = self.run_dir / CHECKPOINTS / "latest"
        return str(latest.parent / latest.read_text().strip()) if latest.exists() else "the start (no checkpoint yet)"

    def resume_path(self) -> Path | None:
        """The checkpoint ``trainer.resume`` names (``auto``: the run dir's latest), or None."""
        resume = self.cfg.trainer.resume
        if resume == "never":
            return None
        if resume == "auto":
            latest = self.run_dir / CHECKPOINTS / "latest"
            if not latest.exists():
                return None
            return latest.parent / latest.read_text().strip()
        return Path(resume)

    def maybe_resume(self) -> None:
        path = self.resume_path()
        if path is None:
            if self.cfg.trainer.resume == "auto":
                log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
            return
        state = self.learner.load_checkpoint(str(path))
        self.load_state_dict(state)
        # what the stopped run logged after this checkpoint: redone now, so dropped (only once the
        # checkpoint has loaded: a wrong path must not cost the history)
        self.metrics.rewind(self.step)
        self.weight_sync.restore(self.version, path)
        # the rounds that were ahead of the learner: their saved groups, each round a finished future
        in_flight = int(state.get("rounds_in_flight", 0))
        if in_flight:
            ray.get(self.replay.load.remote(str(path / REPLAY_FILE)), timeout=self.timeout_s)
            for _ in range(in_flight):
                done: Future = Future()
                done.set_result({})
                self._rounds.append(done)
        self._checkpointed_step = self.step
        print(f"resumed from {path} at step {self.step}", flush=True)

    def abort(self) -> None:
        """After a failure: stop every actor this run started (what it checkpointed stays), so a
        caller sharing the cluster is not left with them; errors here must not hide the first."""
        producer, self._producer = self._producer, None
        if producer is not None:  # a round in flight fails fast once its actors are gone
            producer.shutdown(wait=False, cancel_futures=True)
        try:
            self.shutdown()
        except Exception as e:  # noqa: BLE001
            log.warning("cleaning up after the failure failed too: %s", e)
        if producer is not None:
            producer.shutdown(wait=True)

    def shutdown(self) -> None:
        """Stop the producer and every actor (whichever of them were started)."""
        if self._producer is not None:
            self._producer.shutdown(wait=True, cancel_futures=True)
            self._producer = None
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "weight_sync", None) is not None:
            try:
                self.weight_sync.close()
            except Exception as e:  # noqa: BLE001 - a dead engine must not keep the other actors alive
                log.warning("closing the weight sync failed (%s); shutting the actors down anyway", e)
            self.weight_sync = None
        if getattr(self, "learner", None) is not None:
            self.learner.shutdown()
            self.learner = None
        if getattr(self, "feedback", None) is not None:
            self.feedback.shutdown()
            self.feedback = None
        actors = list(getattr(self, "rollout_workers", [])) + [getattr(self, "teacher", None), getattr(self, "replay", None)]
        for actor in actors:
            if actor is not None:
                ray.kill(actor)
        self.rollout_workers, self.teacher, self.replay = [], None, None
        if self._owns_ray and ray.is_initialized():  # a multirun's next job starts a clean cluster
            ray.shutdown()


def check_model_path(path: str) -> None:
    """``model.path`` must be a model directory or a model id the Hugging Face hub (or its local
    cache) knows: a bad path fails here, in one line, before Ray or any actor starts."""
    from distil_ray.config import ConfigError

    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.path={path!r}: the directory has no config.json (not a Hugging Face model)")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path={path!r}: neither a local directory nor a model the Hugging Face hub or its "
                          f"cache has ({reason})") from None
