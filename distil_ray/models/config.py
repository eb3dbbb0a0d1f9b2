"""The tiny model's and the warm start's settings: plain dataclasses without torch, so the run
configuration (``distil_ray.config``) uses them as its ``model.tiny`` and ``warm_start`` sections
and the builders take the very same objects."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import List

# Bump when anything that changes the built artefact changes (corpus, tokenizer pipeline, config
# mapping): it is part of the cache key, so stale cached builds are never reused.
BUILD_VERSION = 1

# Head sizes the vLLM CPU attention backend has kernels for; anything else fails at serve time,
# deep inside vLLM, so it is rejected here with a clear message instead.
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)


@dataclass
class TinyModelConfig:
    """Shape of a tiny Qwen3 model and its tokenizer; its field values key the build cache."""

    # BPE target, special tokens and the 256 byte symbols included.  An upper bound: a corpus
    # with fewer mergeable pairs gives a smaller vocabulary; the model always matches len(tokenizer).
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    # Untied: a random tied model mostly repeats its last input token, which makes greedy outputs
    # (and any comparison between backends built on them) nearly vacuous.
    tie_word_embeddings: bool = False
    seed: int = 0
    # lines of text the tokenizer also trains on (a task's own words tokenise into few tokens)
    extra_corpus: List[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise ValueError naming the first field vLLM or the tokenizer cannot serve."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head_dim={self.head_dim} is not supported: the vLLM CPU attention backend only "
                f"serves head sizes {SUPPORTED_HEAD_DIMS}; pick one of those (32 is the smallest)"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size={self.vocab_size} must be at least {256 + len(SPECIAL_TOKENS)} "
                "(256 byte symbols plus the special tokens)"
            )

    def cache_key(self) -> str:
        payload = json.dumps({"build_version": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class WarmStartConfig:
    """Supervised pre-training of the tiny model on the task's references, so RL starts from a
    policy that sometimes succeeds (a random tiny model never does)."""

    enabled: bool = False
    # Defaults tuned on the toy task with its tiny model (toy_model_config). Copying an answer
    # out of the context forms abruptly, somewhere after 150-400 steps at this rate; 1000 steps
    # leave the margin that makes the self-teacher reliable (~70-85 s on two cores; with 600 it
    # was right on only ~88% of the student's failures, and DistIL then did not learn).
    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    # share of the examples whose user turn is a teacher context (a sibling's solution or feedback):
    # this is where the tiny model learns to read feedback, as a pretrained LLM can
    context_fraction: float = 0.6

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"warm_start.steps={self.steps}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"warm_start.batch_size={self.batch_size}: must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"warm_start.lr={self.lr}: must be > 0")
        if not 0.0 <= self.context_fraction <= 1.0:
            raise ValueError(f"warm_start.context_fraction={self.context_fraction}: must lie in [0, 1]")
