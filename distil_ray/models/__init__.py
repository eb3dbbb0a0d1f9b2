"""Model factories: tiny local models for tests and the CPU demo."""

from distil_ray.models.tiny import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    SUPPORTED_HEAD_DIMS,
    TinyModelConfig,
    build_model,
    build_tiny_model,
    build_tokenizer,
    default_cache_root,
    load_tiny,
    tiny_model_dir,
    tokenizer_corpus,
)

__all__ = [
    "CHAT_TEMPLATE",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "SPECIAL_TOKENS",
    "SUPPORTED_HEAD_DIMS",
    "TinyModelConfig",
    "build_model",
    "build_tiny_model",
    "build_tokenizer",
    "default_cache_root",
    "load_tiny",
    "tiny_model_dir",
    "tokenizer_corpus",
]
