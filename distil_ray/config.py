"""The run configuration: one structured (dataclass) schema, composed by Hydra, validated at start-up.

``conf/`` holds the Hydra tree (``config.yaml`` + the ``algorithm``, ``task``, ``model`` and
``experiment`` groups); the dataclasses below are its schema, registered in Hydra's ConfigStore as
``run_config_schema`` so that composition itself rejects an unknown key or a value of the wrong
type.

**Sections are the interface.** Each actor, and the plain class inside it, takes its own section
(``cfg.learner``, ``cfg.rollout``, ``cfg.teacher``, ...) plus the few runtime values it needs. Each
section checks its own fields in ``check()`` (its allowed values in one ``CHOICES`` table), so an
actor built outside a run (a test, a script) fails the same way; :func:`validate` runs every
section's check, then the checks that span sections. A wrong key or value fails before any actor
starts, with a :class:`ConfigError` naming the dotted key and the allowed values.

``compose_config(["+experiment=tiny", "rollout.n_samples=2"])`` gives a validated
:class:`RunConfig` without going through ``main`` (tests, notebooks, scripts).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence

from distil_ray.feedback.templates import RepromptConfig
from distil_ray.models.config import TinyModelConfig, WarmStartConfig

SCHEMA_NAME = "run_config_schema"

# Allowed values that more than one section (and the code behind them) share.
ENGINE_BACKENDS = ("vllm", "hf")
# float16 is left out on purpose: it would need loss scaling, which bfloat16 does not.
COMPUTE_DTYPES = ("float32", "bfloat16")

# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A configuration key or value that cannot run; the message names the dotted key."""


def _schema_keys(path: Sequence[str]) -> Optional[List[str]]:
    """Field names of the schema node at ``path`` (None where the schema is a free-form dict)."""
    node: Any = RunConfig
    for part in path:
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        default = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        node = default() if default is not None else None
        node = type(node) if dataclasses.is_dataclass(node) else None
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return None


def _unknown_key_message(full_key: str, present: Optional[Sequence[str]] = None) -> str:
    parent = full_key.rpartition(".")[0]
    allowed = _schema_keys(parent.split(".") if parent else [])
    where = f"under '{parent}'" if parent else "at the top level"
    if allowed is not None:
        return f"{full_key}: unknown key; allowed keys {where} are {', '.join(allowed)}"
    hint = f"; keys present {where}: {', '.join(present)}" if present else ""
    return f"{full_key}: unknown key{hint} (add a new one with +{full_key}=VALUE)"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def config_error_from_exception(exc: BaseException) -> Optional[ConfigError]:
    """Turn a Hydra / OmegaConf composition error into a one-line :class:`ConfigError`
    naming the full key; ``None`` for an exception that is not about the configuration."""
    from hydra.errors import (
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
    )

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, MissingConfigException):
        group = exc.missing_cfg_file or ""
        options = exc.options
        if options is not None and "/" in group:
            grp, _, name = group.rpartition("/")
            return ConfigError(f"{grp}={name}: no such config; allowed values are {_fmt_allowed(sorted(options))}")
        return ConfigError(_one_line(exc))
    if isinstance(exc, OverrideParseException):
        return ConfigError(f"{exc.override}: {_one_line(exc)}" if getattr(exc, "override", None) else _one_line(exc))
    # Hydra wraps the OmegaConf error that names the key; the innermost one is the informative one.
    omega = exc if isinstance(exc, OmegaConfBaseException) else None
    cause = exc.__cause__ or exc.__context__
    depth = 0
    while omega is None and cause is not None and depth < 8:
        if isinstance(cause, OmegaConfBaseException):
            omega = cause
        cause = cause.__cause__ or cause.__context__
        depth += 1
    if omega is not None:
        full_key = getattr(omega, "full_key", None) or ""
        msg = getattr(omega, "msg", None) or str(omega)
        msg = _one_line(msg.split("\n    full_key:")[0])
        if isinstance(omega, (ConfigKeyError, ConfigAttributeError)) and full_key:
            parent = getattr(omega, "parent_node", None)
            present = None
            try:
                present = [str(k) for k in parent] if parent is not None else None
            except Exception:
                present = None
            if "not in struct" in msg or "not in" in msg or "Missing key" in msg:
                return ConfigError(_unknown_key_message(full_key, present))
        return ConfigError(f"{full_key}: {msg}" if full_key else msg)
    if isinstance(exc, HydraException):
        return ConfigError(_one_line(exc))
    return None


# --------------------------------------------------------------------------- field checks


def _fmt_allowed(values: Sequence) -> str:
    return ", ".join(repr(v) for v in values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(key: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed values are {_fmt_allowed(allowed)}")


def check_at_least(key: str, value, low, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_number(value) or not value >= low:
        raise ConfigError(f"{key}={value!r}: must be >= {low}" + (" (or null)" if optional else ""))


def check_positive(key: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{key}={value!r}: must be > 0" + (" (or null)" if optional else ""))


def check_probability(key: str, value) -> None:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{key}={value!r}: must lie in (0, 1]")


def check_finite(key: str, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be finite")


class Section:
    """A config section that checks its own fields. ``KEY`` is its dotted place in the run config
    (what error messages name); ``CHOICES`` maps a field to its allowed values."""

    KEY: ClassVar[str] = ""
    CHOICES: ClassVar[Dict[str, tuple]] = {}

    def check(self) -> None:
        """Raise :class:`ConfigError` on the first field that cannot run."""
        self.check_choices()
        self.check_values()

    def check_choices(self) -> None:
        for name, allowed in self.CHOICES.items():
            check_choice(self.key(name), getattr(self, name), allowed)

    def check_values(self) -> None:
        """Ranges and formats (the sections override this)."""

    def key(self, name: str) -> str:
        return f"{self.KEY}.{name}"

    def at_least(self, name: str, low, *, optional: bool = False) -> None:
        check_at_least(self.key(name), getattr(self, name), low, optional=optional)

    def custom_resources(self, name: str = "resources") -> None:
        """A mapping of custom Ray resource names to positive amounts (CPUs and GPUs have their
        own keys)."""
        for resource, amount in (getattr(self, name) or {}).items():
            if resource in ("CPU", "GPU") or not str(resource).strip():
                raise ConfigError(f"{self.key(name)}: {resource!r} is not a custom resource name "
                                  "(use num_cpus / num_gpus for CPUs and GPUs)")
            if not isinstance(amount, (int, float)) or amount <= 0:
                raise ConfigError(f"{self.key(name)}.{resource}={amount!r}: must be a positive number")

    def positive(self, name: str, *, optional: bool = False) -> None:
        check_positive(self.key(name), getattr(self, name), optional=optional)

    def probability(self, name: str) -> None:
        check_probability(self.key(name), getattr(self, name))

    def nested(self, name: str) -> None:
        """Check a sub-section that is a plain class of its own module (it raises ValueError
        naming its field; the message gains this section's dotted prefix)."""
        try:
            getattr(self, name).check()
        except ValueError as e:
            raise ConfigError(f"{self.key(name)}.{_one_line(e)}") from None


# --------------------------------------------------------------------------- schema


@dataclass
class RayConfig(Section):
    KEY: ClassVar[str] = "ray"

    # None: $RAY_ADDRESS when set (ray job submit), else a fresh local cluster of the run's own;
    # "auto" or "ray://host:port" to join one
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # a fresh local cluster only; None lets Ray count the cores
    include_dashboard: bool = False
    dashboard_port: int = 8265  # a fresh local cluster only
    # None: one of the run's own (distil_ray-<run dir>-<random>), so runs can share a cluster
    namespace: Optional[str] = None

    def check_values(self) -> None:
        self.positive("num_cpus", optional=True)
        self.positive("dashboard_port")
        if self.namespace is not None and not self.namespace:
            raise ConfigError("ray.namespace='': a non-empty name, or null for one of the run's own")


@dataclass
class ModelConfig(Section):
    KEY: ClassVar[str] = "model"
    CHOICES: ClassVar[Dict[str, tuple]] = {"dtype": COMPUTE_DTYPES}

    path: Optional[str] = None  # HF directory or hub id; None builds the tiny model locally
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # float32 | bfloat16
    tokenizer: Optional[str] = None  # None: the model's own
    # The chat template's thinking switch (Qwen3: false gives an empty <think></think> block), for the
    # student's prompts and the teacher's contexts alike (SDPO runs Qwen3 with false for both);
    # None: the template's own default
    enable_thinking: Optional[bool] = None
    # False: the training prompts are the chat template's *text* with its special tokens
    # (<|im_start|>, <|im_end|>) dropped and re-tokenised, as OPSD samples and trains its student
    # (opsd_trainer.py:856-859, :975-990); validation prompts and the teacher's contexts keep them
    train_prompt_special_tokens: bool = True

    def chat_template_kwargs(self) -> Dict[str, Any]:
        """What every ``apply_chat_template`` of the run is given besides the messages."""
        return {} if self.enable_thinking is None else {"enable_thinking": bool(self.enable_thinking)}

    def check_values(self) -> None:
        if self.path is None:
            self.nested("tiny")  # what vLLM and the tokenizer need (head_dim, vocab size, GQA ratio)


@dataclass
class TaskConfig(Section):
    KEY: ClassVar[str] = "task"

    name: str = "toy"
    # the task's own typed section (its class's ``config_class``), given as a mapping
    kwargs: Dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "test"
    # prompts longer than this many tokens (chat template included) are left out, and counted
    max_prompt_tokens: Optional[int] = None

    def check_choices(self) -> None:
        from distil_ray.tasks import TASKS

        check_choice("task.name", self.name, sorted(TASKS))

    def check_values(self) -> None:
        from distil_ray.tasks import task_class

        # The class is resolved (imported), never built: building a task may load data.
        section = task_class(self.name).config_class
        allowed = [f.name for f in dataclasses.fields(section)]
        for key in self.kwargs:
            if key not in allowed:
                raise ConfigError(
                    f"task.kwargs.{key}: unknown key for task {self.name!r}; allowed keys are {', '.join(allowed)}"
                )
        try:
            section(**dict(self.kwargs))
        except ValueError as e:  # the section's own check: its message starts with the field
            raise ConfigError(f"task.kwargs.{_one_line(e)}") from None
        except TypeError as e:  # a value of the wrong type, met by a comparison in that check
            raise ConfigError(
                f"task.kwargs: a value of the wrong type for task {self.name!r} ({_one_line(e)}); "
                f"the fields and their types are in {section.__module__}.{section.__name__}"
            ) from None
        for name in ("train_split", "val_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"task.{name}={getattr(self, name)!r}: must be a non-empty split name")
        self.at_least("max_prompt_tokens", 1, optional=True)

    def build(self):
        """The task this section describes."""
        from distil_ray.tasks import get_task

        return get_task(self.name, **dict(self.kwargs))


@dataclass
class AlgorithmConfig(Section):
    KEY: ClassVar[str] = "algorithm"

    name: str = "distil"
    # the loss function's hyper-parameters: its typed section (distil_ray.algorithms.Algorithm.loss_config)
    loss: Dict[str, Any] = field(default_factory=dict)
    advantages: Dict[str, Any] = field(default_factory=dict)  # of group_relative_advantages

    def check_choices(self) -> None:
        from distil_ray.algorithms import ALGORITHMS

        check_choice("algorithm.name", self.name, tuple(ALGORITHMS))

    def check_values(self) -> None:
        _check_loss(self)
        _check_advantages(self)

    @property
    def spec(self):
        """The registry entry: loss function and what it needs fed."""
        from distil_ray.algorithms import get_algorithm

        return get_algorithm(self.name)

    def loss_kwargs(self) -> Dict[str, Any]:
        """Every hyper-parameter of the loss, defaults filled in from its typed section."""
        return dataclasses.asdict(self.spec.loss_config(**dict(self.loss)))


class SamplingSection(Section):
    """What a request samples (``n_samples``, ``temperature``, ``top_p``): the fields rollout and
    evaluation share, declared by each (their defaults differ), checked and turned into the
    engines' sampling parameters here."""

    n_samples: int
    temperature: float
    top_p: float

    def check_values(self) -> None:
        self.at_least("n_samples", 1)
        self.at_least("temperature", 0.0)
        check_finite(self.key("temperature"), self.temperature)
        self.probability("top_p")

    def sampling(self, *, max_new_tokens: int, stop: Sequence[str] = (), seed: int | None = None):
        """The engines' per-call sampling parameters (``distil_ray.engines.SamplingConfig``)."""
        from distil_ray.engines.base import SamplingConfig

        return SamplingConfig(n=self.n_samples, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed)


@dataclass
class RolloutConfig(SamplingSection):
    KEY: ClassVar[str] = "rollout"
    CHOICES: ClassVar[Dict[str, tuple]] = {"engine": ENGINE_BACKENDS}

    engine: str = "vllm"  # vllm | hf
    num_workers: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0  # per worker; 1 on a GPU node
    n_samples: int = 4  # rollouts per prompt (a group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: List[str] = field(default_factory=list)
    kv_cache_memory_bytes: int = 64 * 2**20
    max_num_seqs: int = 64
    # vLLM: the longest prompt + response an engine serves (None: the model's own limit), and
    # whether it runs without CUDA graphs (None: eagerly on the CPU only)
    max_model_len: Optional[int] = None
    enforce_eager: Optional[bool] = None
    # custom Ray resources each worker needs (+rollout.resources.NAME=AMOUNT): it runs only on the
    # nodes that offer them
    resources: Dict[str, float] = field(default_factory=dict)

    def check_values(self) -> None:
        self.custom_resources()
        self.at_least("num_workers", 1)
        self.positive("num_cpus")
        self.at_least("num_gpus", 0.0)
        super().check_values()
        self.at_least("max_new_tokens", 1)
        self.positive("kv_cache_memory_bytes")
        self.at_least("max_num_seqs", 1)
        self.at_least("max_model_len", 2, optional=True)


@dataclass
class FeedbackConfig(Section):
    KEY: ClassVar[str] = "feedback"

    num_workers: int = 1
    num_cpus: float = 0.25
    resources: Dict[str, float] = field(default_factory=dict)  # per grader, as rollout.resources

    def check_values(self) -> None:
        self.custom_resources()
        self.at_least("num_workers", 1)
        self.positive("num_cpus")


@dataclass
class HttpConfig(Section):
    """``teacher.http``: the black-box expert behind an OpenAI-compatible completions endpoint."""

    KEY: ClassVar[str] = "teacher.http"

    base_url: Optional[str] = None  # e.g. http://10.0.0.5:8000 (with or without /v1)
    model: Optional[str] = None  # the served model's name; None: the first of /v1/models
    api_key_env: Optional[str] = None  # the environment variable holding a bearer token, if any
    timeout_s: float = 600.0  # per request
    max_retries: int = 5  # on connection errors, timeouts, 429 and 5xx
    backoff_s: float = 1.0  # the first retry waits this long, each next one twice as long
    max_concurrency: int = 8  # requests in flight at once
    startup_timeout_s: float = 60.0  # how long to wait for the server at start-up

    def check_values(self) -> None:
        if not self.base_url:
            raise ConfigError(f"{self.key('base_url')}: the expert's URL is required with teacher.backend=http "
                              "(e.g. teacher.http.base_url=http://127.0.0.1:8000)")
        if not str(self.base_url).startswith(("http://", "https://")):
            raise ConfigError(f"{self.key('base_url')}={self.base_url!r}: must start with http:// or https://")
        for name in ("timeout_s", "backoff_s", "startup_timeout_s"):
            self.positive(name)
        self.at_least("max_retries", 0)
        self.at_least("max_concurrency", 1)
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ConfigError(f"{self.key('api_key_env')}={self.api_key_env!r}: that environment variable is not set")


@dataclass
class TeacherConfig(Section):
    KEY: ClassVar[str] = "teacher"
    CHOICES: ClassVar[Dict[str, tuple]] = {
        # an in-process engine; http: a black-box expert behind an OpenAI-compatible server; learner:
        # the learner ranks run the teacher's forward inside the training step (no engine, no GPU)
        "backend": ENGINE_BACKENDS + ("http", "learner"),
        # reprompt (feedback / successful sibling) | reference_solution (OPSD)
        "context": ("reprompt", "reference_solution"),
        # the teacher's weights: current (the policy, synced each step) | ema (a moving average of
        # the policy, SDPO's teacher_update_rate) | fixed (the initial policy, OPSD's --fixed_teacher)
        "update": ("current", "ema", "fixed"),
        # the ids a distillation loss compares student and teacher at: the teacher's own top-k, or
        # the student's (SDPO's; the teacher is then scored at those ids: needs backend=learner)
        "support": ("teacher", "student"),
    }

    backend: str = "vllm"  # vllm | hf | http | learner
    context: str = "reprompt"
    topk: int = 20
    num_cpus: float = 0.25
    kv_cache_memory_bytes: int = 64 * 2**20
    num_gpus: float = 0.0  # ignored with backend=learner (its actor only builds contexts)
    resources: Dict[str, float] = field(default_factory=dict)  # as rollout.resources
    # teacher context + response beyond this many tokens is not scored (no signal, counted);
    # None: the model's max_position_embeddings
    max_context_tokens: Optional[int] = None
    update: str = "current"
    support: str = "teacher"
    # the teacher's logits divided by this before its log-probs (OPSD: 1.1 for student and teacher);
    # None: 1, what an engine's prompt log-probs are (vLLM ignores a sampling temperature there)
    temperature: Optional[float] = None
    # with update=ema: θ_T ← (1 − rate)·θ_T + rate·θ at each sync (kept on the learner ranks)
    ema_rate: float = 0.05
    # vLLM backend: as rollout.max_model_len / rollout.enforce_eager (None: the model's limit; eager
    # on the CPU only); the teacher's context + response must fit in max_model_len
    max_model_len: Optional[int] = None
    enforce_eager: Optional[bool] = None
    reprompt: RepromptConfig = field(default_factory=RepromptConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    @property
    def follows_policy(self) -> bool:
        """Whether a weight sync sends this teacher's engine weights (the policy or its average):
        not when fixed, and not when the learner ranks run it (they hold the weights)."""
        return self.update != "fixed" and self.backend != "learner"

    def check_values(self) -> None:
        self.custom_resources()
        if self.backend == "http":
            if self.update != "fixed":
                raise ConfigError(f"teacher.update={self.update!r}: an http expert's weights are its own; "
                                  "teacher.backend=http needs teacher.update=fixed")
            self.http.check_values()
        self.at_least("topk", 1)
        self.positive("temperature", optional=True)
        if self.backend != "learner":
            if self.support == "student":
                raise ConfigError("teacher.support=student: the teacher must be scored at the student's own ids, "
                                  "which only the learner ranks can do; use teacher.backend=learner")
            if self.temperature not in (None, 1.0):
                raise ConfigError(f"teacher.temperature={self.temperature}: an engine teacher's prompt log-probs "
                                  "are at temperature 1; scaling them needs teacher.backend=learner")
        self.positive("num_cpus")
        self.at_least("num_gpus", 0.0)
        self.positive("kv_cache_memory_bytes")
        self.probability("ema_rate")
        if self.update == "ema":
            self.positive("ema_rate")  # 0 would be a fixed teacher: say teacher.update=fixed
        self.at_least("max_context_tokens", 2, optional=True)
        self.at_least("max_model_len", 2, optional=True)
        self.nested("reprompt")


@dataclass
class WeightSyncConfig(Section):
    KEY: ClassVar[str] = "weight_sync"
    CHOICES: ClassVar[Dict[str, tuple]] = {
        # object_store: rank 0's full weights put once in the engines' dtype, every engine loads them
        # (any engine). collective: vLLM's weight-transfer protocol, learner rank 0 broadcasting
        # bucket by bucket to every vLLM engine (gloo on the CPU, vLLM's NCCL engine on GPUs)
        "backend": ("object_store", "collective"),
    }

    backend: str = "object_store"
    # collective: the most bytes one broadcast carries (32 MB: faster than 256 on the CPU and a tenth
    # of the memory, benchmarks/bench_weight_sync.py)
    bucket_mb: int = 32
    timeout_s: float = 1800.0  # an engine that takes longer to load a version has hung

    def check_values(self) -> None:
        self.at_least("bucket_mb", 1)
        self.positive("timeout_s")


@dataclass
class ReplayConfig(Section):
    KEY: ClassVar[str] = "replay"

    capacity: int = 4096  # samples held at most
    max_staleness: int = 0  # 0: strictly on-policy

    def check_values(self) -> None:
        self.at_least("max_staleness", 0)
        self.at_least("capacity", 1)


@dataclass
class LearnerConfig(Section):
    KEY: ClassVar[str] = "learner"
    CHOICES: ClassVar[Dict[str, tuple]] = {"backend": ("gloo", "nccl"), "dtype": COMPUTE_DTYPES}

    world_size: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0  # per rank; 1 for NCCL training
    # per rank, as rollout.resources; the ranks go into one placement group, on one node where
    # they fit (STRICT_PACK), else packed onto as few as possible (PACK)
    resources: Dict[str, float] = field(default_factory=dict)
    backend: str = "gloo"  # gloo | nccl
    dtype: str = "float32"  # float32 | bfloat16: the compute dtype (master weights stay float32)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    micro_batch_size: int = 8  # records per micro-batch at most
    # padded positions per micro-batch (rows × longest row) at most; records then go longest first
    # (little padding) and a prompt's group may be split, with its group statistics computed over
    # the whole group first. None: micro_batch_size records of whole groups
    max_tokens_per_micro_batch: Optional[int] = None
    # run each micro-batch's forward on its real tokens only, the rows concatenated with position ids
    # restarting per row: no padded position is computed. Attention stays within each row by its
    # boundaries (learner/attention.py): torch's varlen flash kernel on CUDA in bf16, one causal
    # SDPA per row elsewhere; no N×N mask
    packed_sequences: bool = False
    logprob_chunk_size: int = 256
    # recompute each decoder layer's activations in the backward instead of keeping them (about a
    # third more compute, a fraction of the memory); None: on for a model given by model.path, off
    # for the tiny model built locally (where memory is no concern and it only costs time)
    activation_checkpointing: Optional[bool] = None
    # optimizer steps per generation batch, each on its own share of the prompt groups (SDPO's
    # LiveCodeBench runs take 32); the later ones are slightly off-policy and IS-corrected
    updates_per_batch: int = 1
    # a collective that waits longer than this fails the step instead of hanging the run
    collective_timeout_s: float = 1800.0

    def check_values(self) -> None:
        self.custom_resources()
        self.at_least("world_size", 1)
        self.positive("num_cpus")
        self.at_least("num_gpus", 0.0)
        self.positive("lr")
        check_finite("learner.lr", self.lr)
        self.at_least("weight_decay", 0.0)
        betas = list(self.betas)
        if len(betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"learner.betas={betas!r}: must be two numbers in [0, 1)")
        self.positive("adam_eps")
        self.at_least("warmup_steps", 0)
        self.at_least("grad_clip", 0.0)
        self.at_least("micro_batch_size", 1)
        self.at_least("max_tokens_per_micro_batch", 1, optional=True)
        self.at_least("updates_per_batch", 1)
        self.at_least("logprob_chunk_size", 1)
        self.positive("collective_timeout_s")
        if self.backend == "nccl" and self.num_gpus < 1:
            raise ConfigError("learner.backend='nccl' needs learner.num_gpus >= 1 (one GPU per rank)")


@dataclass
class TrainerConfig(Section):
    KEY: ClassVar[str] = "trainer"
    RESUME_MODES: ClassVar[tuple] = ("never", "auto")

    total_steps: int = 40
    prompts_per_step: int = 8
    eval_every: int = 10  # 0: never during training
    eval_at_start: bool = True
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # the newest K checkpoints stay, older ones are deleted; 0 keeps all
    resume: str = "never"  # never | auto | <checkpoint directory>
    save_hf_at_end: bool = False
    # the longest the driver waits on any actor's stage (rollouts, grading, the teacher, the replay
    # queue, a learner step) before it stops the run naming what it waited on
    actor_timeout_s: float = 1800.0
    # this many steps in a row whose every update had a non-finite loss or gradient norm (each
    # skipped: no optimizer step, no sync) end the run
    max_bad_steps: int = 3
    # how often Ray restarts a rollout worker, grader or teacher whose process died; the work it
    # held is resubmitted and a restarted engine gets the current weights (0: a dead actor ends the run)
    max_actor_restarts: int = 3

    def check_values(self) -> None:
        self.positive("actor_timeout_s")
        self.at_least("max_bad_steps", 1)
        self.at_least("max_actor_restarts", 0)
        self.at_least("total_steps", 1)
        self.at_least("prompts_per_step", 1)
        self.at_least("eval_every", 0)
        self.at_least("checkpoint_every", 0)
        self.at_least("keep_checkpoints", 0)
        resume = self.resume
        if resume in self.RESUME_MODES:
            return
        if not isinstance(resume, str) or not resume or not Path(resume).expanduser().is_dir():
            raise ConfigError(
                f"trainer.resume={resume!r}: allowed values are 'never', 'auto' or an existing checkpoint directory"
            )


@dataclass
class EvalConfig(SamplingSection):
    KEY: ClassVar[str] = "eval"

    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_prompts: Optional[int] = None  # None: the whole validation split
    max_new_tokens: Optional[int] = None  # None: rollout.max_new_tokens
    keep_best: bool = True  # track the best val/accuracy and its step (logged as val/best_*)
    save_best: bool = False  # also save the best policy as a HF model in RUN_DIR/best_model

    def check_values(self) -> None:
        super().check_values()
        self.at_least("max_prompts", 1, optional=True)
        self.at_least("max_new_tokens", 1, optional=True)


@dataclass
class LoggingConfig(Section):
    KEY: ClassVar[str] = "logging"
    CHOICES: ClassVar[Dict[str, tuple]] = {"wandb_mode": ("offline", "online", "disabled")}

    wandb: bool = False
    wandb_project: str = "distil_ray"
    wandb_mode: str = "offline"  # offline | online | disabled
    console_every: int = 1
    # the first N validation samples of each evaluation to RUN_DIR/generations/ (and wandb); 0: none
    log_generations: int = 0
    # every training batch's records to RUN_DIR/rollouts/
    rollout_dump: bool = False

    def check_values(self) -> None:
        self.at_least("console_every", 1)
        self.at_least("log_generations", 0)


@dataclass
class RunConfig:
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def rollout_sampling(self, *, seed: int | None = None):
        """Training requests: the rollout section's sampling, length and stop strings."""
        return self.rollout.sampling(max_new_tokens=self.rollout.max_new_tokens, stop=self.rollout.stop, seed=seed)

    def eval_sampling(self, *, seed: int | None = None):
        """Evaluation requests: the eval section's sampling with the rollout's stop strings and,
        unless the eval section sets its own, the rollout's length."""
        return self.eval.sampling(max_new_tokens=self.eval.max_new_tokens or self.rollout.max_new_tokens,
                                  stop=self.rollout.stop, seed=seed)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


# --------------------------------------------------------------------------- the algorithm section


def _check_loss(algorithm: AlgorithmConfig) -> None:
    """Keys against the loss's typed section; values by running the loss once (each loss owns
    its value checks, so the config cannot drift from what the loss accepts)."""
    spec = algorithm.spec
    loss_kwargs = dict(algorithm.loss)
    if spec.name == "ce" and "future_credit_coef" in loss_kwargs:
        raise ConfigError("algorithm.loss.future_credit_coef: 'ce' is DistIL without future credit; use algorithm=distil")
    allowed = [f.name for f in dataclasses.fields(spec.loss_config)]
    for key in loss_kwargs:
        if key not in allowed:
            raise ConfigError(
                f"algorithm.loss.{key}: unknown key for algorithm {algorithm.name!r}; "
                f"allowed keys are {', '.join(allowed)}"
            )
    hints = typing.get_type_hints(spec.loss_config)
    for key, value in loss_kwargs.items():  # the types: a string where a number belongs fails here
        _check_type(f"algorithm.loss.{key}", value, hints[key])
    try:
        _dry_run_loss(spec, loss_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(_loss_value_message(spec, loss_kwargs, e)) from None


def _check_type(key: str, value, hint) -> None:
    """``value`` against a plain annotation (``float``, ``int``, ``str``, ``bool``, ``Optional[...]``).
    Hand-written rather than OmegaConf's, so a learner rank checks its section with torch alone."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        (hint,) = [a for a in args if a is not type(None)]
    allowed = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}.get(hint, (object,))
    if isinstance(value, bool) and hint is not bool or not isinstance(value, allowed):
        raise ConfigError(f"{key}={value!r}: must be {'a number' if hint is float else hint.__name__}"
                          + (" (or null)" if args else ""))


def _check_advantages(algorithm: AlgorithmConfig) -> None:
    from distil_ray.algorithms.advantages import group_relative_advantages

    adv_params = {
        n for n, p in inspect.signature(group_relative_advantages).parameters.items() if p.kind is p.KEYWORD_ONLY
    }
    for key in algorithm.advantages:
        if key not in adv_params:
            raise ConfigError(f"algorithm.advantages.{key}: unknown key; allowed keys are {', '.join(sorted(adv_params))}")
    if algorithm.advantages and not algorithm.spec.needs_advantages:
        raise ConfigError(
            f"algorithm.advantages: algorithm {algorithm.name!r} uses no advantages; remove the section"
        )


def _dry_run_loss(algorithm, loss_kwargs: Dict[str, Any]) -> None:
    """Call the loss once on a tiny random batch so that a bad value (``baseline='x'``,
    ``loss_agg='sum'``, ``gamma=2``) fails now, with the loss function's own message."""
    import torch

    from distil_ray.algorithms.advantages import group_relative_advantages

    gen = torch.Generator().manual_seed(0)
    B, T, K = 2, 3, 2
    logp = torch.log_softmax(torch.randn(B, T, K + 2, generator=gen, dtype=torch.float64), -1)
    mask = torch.ones(B, T)
    group_ids = torch.tensor([0, 0])
    params = inspect.signature(algorithm.loss_fn).parameters
    accepts = lambda name: name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if algorithm.needs_teacher:
        teacher = torch.log_softmax(torch.randn(B, T, K + 2, generator=gen, dtype=torch.float64), -1)[..., :K]
        args = (logp[..., 0], logp[..., :K], teacher, mask)
        extra = {"group_ids": group_ids} if accepts("group_ids") else {}
        if accepts("behaviour_logprobs"):
            # exercises is_clip too
            extra["behaviour_logprobs"] = logp[..., 1]
    elif algorithm.needs_advantages:
        args, extra = (logp[..., 0], mask, group_relative_advantages(torch.tensor([1.0, 0.0]), group_ids)), {}
        if accepts("old_logprobs"):
            extra["old_logprobs"] = logp[..., 1]
    else:
        args, extra = (logp[..., 0], mask), {}
    loss, _ = algorithm.loss_fn(*args, **loss_kwargs, **extra)
    if not torch.isfinite(loss):
        raise ValueError(f"the loss is not finite on a test batch with {loss_kwargs}")


def _loss_value_message(algorithm, loss_kwargs: Dict[str, Any], error: Exception) -> str:
    """Name the key behind a loss's ValueError. The loss may word it after an inner argument
    (opsd's ``beta`` is ``alpha`` of the JSD), so the culprit is the key whose removal alone
    makes the test batch pass."""
    msg = _one_line(error)
    head = msg.split("=", 1)[0]
    if head in loss_kwargs:
        return f"algorithm.loss.{msg}"
    for key in loss_kwargs:
        rest = {k: v for k, v in loss_kwargs.items() if k != key}
        try:
            _dry_run_loss(algorithm, rest)
        except (ValueError, TypeError):
            continue
        return f"algorithm.loss.{key}={loss_kwargs[key]!r}: rejected by {algorithm.loss_fn.__name__} ({msg})"
    return f"algorithm.loss: rejected by {algorithm.loss_fn.__name__} with {loss_kwargs} ({msg})"


# --------------------------------------------------------------------------- validation


def check_cpu_budget(cfg: "RunConfig", available: float, where: str) -> None:
    """Fail unless the actors' CPU shares fit in ``available`` CPUs (``where`` names the limit).

    Ray would otherwise queue the actors that do not fit and the run would wait forever. The shares
    are scheduling tokens, not threads.
    """
    demand = {
        "rollout.num_cpus * rollout.num_workers": cfg.rollout.num_cpus * cfg.rollout.num_workers,
        "feedback.num_cpus * feedback.num_workers": cfg.feedback.num_cpus * cfg.feedback.num_workers,
        "learner.num_cpus * learner.world_size": cfg.learner.num_cpus * cfg.learner.world_size,
    }
    if cfg.algorithm.spec.needs_teacher:
        demand["teacher.num_cpus"] = cfg.teacher.num_cpus
    total = sum(demand.values())
    if total > available + 1e-9:
        parts = ", ".join(f"{k} = {v:g}" for k, v in demand.items())
        raise ConfigError(
            f"{where}: the actors ask for {total:g} CPUs ({parts}); lower those shares or add CPUs"
        )


def check_gpu_budget(cfg: "RunConfig", available: float, where: str) -> None:
    """Fail unless the actors' GPU shares fit in ``available`` GPUs: Ray would queue the actors
    that do not fit and the run would wait forever."""
    demand = {
        "rollout.num_gpus * rollout.num_workers": cfg.rollout.num_gpus * cfg.rollout.num_workers,
        "learner.num_gpus * learner.world_size": cfg.learner.num_gpus * cfg.learner.world_size,
    }
    if cfg.algorithm.spec.needs_teacher and cfg.teacher.backend != "learner":
        demand["teacher.num_gpus"] = cfg.teacher.num_gpus
    total = sum(demand.values())
    if total > available + 1e-9:
        parts = ", ".join(f"{k} = {v:g}" for k, v in demand.items() if v)
        raise ConfigError(f"{where}: the actors ask for {total:g} GPUs ({parts}); set those to 0 on a machine "
                          "without GPUs, or run on a cluster that has them")


def validate(cfg) -> RunConfig:
    """Check every key and value that a type cannot; return the config as a :class:`RunConfig`.

    Accepts a ``RunConfig``, an OmegaConf ``DictConfig`` or a plain dict (merged onto the schema,
    so unknown keys fail here too). Runs every section's allowed-value check first, then each
    section's range checks with the checks that span sections where they belong; raises
    :class:`ConfigError` on the first problem found.
    """
    cfg = to_run_config(cfg)
    sections = [cfg.ray, cfg.model, cfg.task, cfg.algorithm, cfg.rollout, cfg.feedback, cfg.teacher,
                cfg.replay, cfg.learner, cfg.weight_sync, cfg.trainer, cfg.eval, cfg.logging]
    for section in sections:  # a misspelt choice is the commonest error: it is named first
        section.check_choices()
    cfg.ray.check_values()
    cfg.model.check_values()
    if cfg.learner.activation_checkpointing is None:  # resolved here, so the run's config shows it
        cfg.learner.activation_checkpointing = cfg.model.path is not None
    if cfg.model.path is None and cfg.teacher.topk > cfg.model.tiny.vocab_size:
        raise ConfigError(f"teacher.topk={cfg.teacher.topk}: must be <= model.tiny.vocab_size={cfg.model.tiny.vocab_size}")
    if cfg.warm_start.enabled:
        try:
            cfg.warm_start.check()
        except ValueError as e:
            raise ConfigError(_one_line(e)) from None
    cfg.task.check_values()
    cfg.algorithm.check_values()
    if cfg.algorithm.spec.needs_advantages and cfg.rollout.n_samples < 2:
        raise ConfigError(
            f"rollout.n_samples={cfg.rollout.n_samples}: algorithm {cfg.algorithm.name!r} needs >= 2 "
            "(group-relative advantages of a single rollout are 0)"
        )
    for section in (cfg.rollout, cfg.feedback, cfg.teacher, cfg.replay, cfg.learner, cfg.weight_sync, cfg.trainer,
                    cfg.eval, cfg.logging):
        section.check_values()
    _check_weight_sync(cfg)
    per_step = cfg.trainer.prompts_per_step * cfg.rollout.n_samples
    # with max_staleness = s, up to s rounds wait in the queue while the learner checkpoints
    if cfg.replay.capacity < max(1, cfg.replay.max_staleness) * per_step:
        raise ConfigError(
            f"replay.capacity={cfg.replay.capacity}: must be >= max(1, replay.max_staleness) * trainer.prompts_per_step "
            f"* rollout.n_samples = {max(1, cfg.replay.max_staleness) * per_step} (the rounds generated ahead)"
        )
    if cfg.ray.num_cpus is not None and cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        check_cpu_budget(cfg, cfg.ray.num_cpus, f"ray.num_cpus={cfg.ray.num_cpus}")
    if cfg.learner.updates_per_batch > cfg.trainer.prompts_per_step:
        raise ConfigError(
            f"learner.updates_per_batch={cfg.learner.updates_per_batch}: at most trainer.prompts_per_step="
            f"{cfg.trainer.prompts_per_step} (each update needs at least one prompt's group)"
        )
    return cfg


def _check_weight_sync(cfg: RunConfig) -> None:
    if cfg.weight_sync.backend != "collective":
        return
    engines = [("rollout.engine", cfg.rollout.engine)]
    if cfg.algorithm.spec.needs_teacher and cfg.teacher.follows_policy:  # it receives the policy or its average
        engines.append(("teacher.backend", cfg.teacher.backend))
    for key, engine in engines:
        if engine != "vllm":
            raise ConfigError(f"weight_sync.backend=collective: {key}={engine!r} has no weight-transfer API; "
                              "use vllm engines or weight_sync.backend=object_store")
    if cfg.learner.backend == "nccl":  # vLLM's NCCL engine: every receiving engine on a GPU of its own
        gpus = [("rollout.num_gpus", cfg.rollout.num_gpus)]
        if len(engines) > 1:
            gpus.append(("teacher.num_gpus", cfg.teacher.num_gpus))
        for key, n in gpus:
            if n < 1:
                raise ConfigError(f"{key}={n}: weight_sync.backend=collective with learner.backend=nccl sends "
                                  "over NCCL, so each engine needs a whole GPU (or use weight_sync.backend=object_store)")
    if cfg.weight_sync.timeout_s > cfg.learner.collective_timeout_s:
        raise ConfigError(f"weight_sync.timeout_s={cfg.weight_sync.timeout_s}: at most learner.collective_timeout_s="
                          f"{cfg.learner.collective_timeout_s} (the other learner ranks wait in the gathers meanwhile)")


# --------------------------------------------------------------------------- conversion and composition


def to_run_config(cfg) -> RunConfig:
    """A :class:`RunConfig` from a ``RunConfig``, ``DictConfig`` or dict (unknown keys → ConfigError)."""
    if isinstance(cfg, RunConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        # A key added with Hydra's `+` lands in a typed node without complaint, and to_object
        # would then drop it silently: check every key against the schema first.
        _check_keys(OmegaConf.to_container(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg, resolve=False), RunConfig, "")
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise config_error_from_exception(e) from None
    assert isinstance(obj, RunConfig)
    return obj


def _check_keys(values, schema, prefix: str) -> None:
    if not isinstance(values, dict):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in values.items():
        full_key = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(_unknown_key_message(full_key))
        sub = hints.get(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            _check_keys(value, sub, f"{full_key}.")


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """Plain nested dict of a config (for JSON, wandb)."""
    return dataclasses.asdict(cfg)


def config_dir() -> Path:
    """The Hydra tree: ``$DISTIL_RAY_CONF`` if set, else ``conf/`` beside the package."""
    env = os.environ.get("DISTIL_RAY_CONF")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = (), *, conf_dir: Optional[str | Path] = None) -> RunConfig:
    """Compose ``config.yaml`` with Hydra ``overrides`` and validate it (no Ray, no run dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    directory = str(Path(conf_dir).resolve() if conf_dir is not None else config_dir())
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=directory, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as e:
        err = config_error_from_exception(e)
        if err is None:
            raise
        raise err from None
    return validate(cfg)


__all__ = [
    "AlgorithmConfig",
    "ConfigError",
    "EvalConfig",
    "FeedbackConfig",
    "LearnerConfig",
    "LoggingConfig",
    "ModelConfig",
    "RayConfig",
    "ReplayConfig",
    "RepromptConfig",
    "RolloutConfig",
    "RunConfig",
    "SamplingSection",
    "Section",
    "TaskConfig",
    "TeacherConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "WarmStartConfig",
    "compose_config",
    "config_dir",
    "config_error_from_exception",
    "register_configs",
    "to_dict",
    "to_run_config",
    "validate",
]
