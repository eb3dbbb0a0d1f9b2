"""Tiny local models: deterministic builds, offline reload, chat template, cache, vLLM parity.

Run as a script (``python test_tiny.py MODEL_DIR OUT_JSON``) this file serves the model with vLLM
and writes what it generated; the vLLM test does that in a subprocess because an in-process vLLM
CPU engine re-binds the threads of the process that hosts it, which would leak into other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from distil_ray.models import tiny
from distil_ray.models.tiny import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    TinyModelConfig,
    build_tiny_model,
    load_tiny,
    tiny_model_dir,
)

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tindented\r\n",
    r"$\frac{-b \pm \sqrt{b^2 - 4ac}}{2a}$ and \boxed{\frac{3}{4}}",
    "ünïcödé, 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽, zero-width\u200bspace",
    "Question? A) 12 B) 13 C) 14 D) 15\n<think>2+2=4</think><answer>4</answer>",
    "   leading and trailing spaces   \n\n\n",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline hub mode and an empty HF home, so any attempted download fails loudly."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # huggingface_hub reads the variable once at import; patch the value it actually consults.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_tiny(model_dir)


def _chat_prompt_ids(tok) -> list[int]:
    out = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def _state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_config_builds_identical_artefacts(model_dir, tmp_path):
    import torch

    again = build_tiny_model(TinyModelConfig(), tmp_path / "again")
    a, b = _state_dict(model_dir), _state_dict(again)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.float32
        assert torch.equal(a[name], b[name]), name
    # The trained tokenizer (vocabulary, merges, pipeline) is the same file, byte for byte.
    assert (model_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    _, tok_a = load_tiny(model_dir)
    _, tok_b = load_tiny(again)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    for text in ROUND_TRIP_TEXTS:
        assert tok_a.encode(text) == tok_b.encode(text)


def test_different_seed_gives_different_weights(model_dir, tmp_path):
    import torch

    other = build_tiny_model(TinyModelConfig(seed=1), tmp_path / "seed1")
    a, b = _state_dict(model_dir), _state_dict(other)
    matrices = [name for name in a if a[name].dim() >= 2]
    assert matrices and all(not torch.equal(a[n], b[n]) for n in matrices)
    # The seed only drives the weights: the tokenizer does not change.
    assert (model_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_untouched():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tok = tiny.build_tokenizer(TinyModelConfig())
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tiny.build_model(TinyModelConfig(), len(tok), ids)
    assert torch.equal(torch.rand(3), expected)


def test_extra_corpus_changes_tokenizer():
    base = tiny.build_tokenizer(TinyModelConfig(vocab_size=400))
    extra = tiny.build_tokenizer(
        TinyModelConfig(vocab_size=400, extra_corpus=("zyzzyva quux " * 50,) * 20)
    )
    assert len(extra.encode(" zyzzyva")) < len(base.encode(" zyzzyva"))


# ---------------------------------------------------------------------------------------------
# Offline reload, tokenizer, chat template
# ---------------------------------------------------------------------------------------------


def test_reload_offline_with_auto_classes(model_dir, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert tok.padding_side == "left"
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert model.config.eos_token_id == ids[IM_END]
    assert model.config.pad_token_id == ids[ENDOFTEXT] == model.config.bos_token_id
    assert set(model.generation_config.eos_token_id) == {ids[IM_END], ids[ENDOFTEXT]}
    assert model.generation_config.pad_token_id == ids[ENDOFTEXT]


def test_tokenizer_round_trips_text(loaded):
    _, tok = loaded
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text
    # Byte-level BPE: nothing is ever unknown.
    assert tok.unk_token_id is None


def test_special_tokens_are_single_ids(loaded):
    _, tok = loaded
    for token in SPECIAL_TOKENS:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [token]
        # Also inside text, with no spaces around.
        ids = tok.encode(f"a{token}b", add_special_tokens=False)
        assert tok.convert_tokens_to_ids(token) in ids
    assert sorted(tok.all_special_ids) == sorted(tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    text = f"{IM_START}user\nhi{IM_END}"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user\nhi"


def test_chat_template(loaded):
    _, tok = loaded
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text[: -len("<|im_start|>assistant\n")]

    ids = _chat_prompt_ids(tok)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 2


def test_left_padding_batch(loaded):
    _, tok = loaded
    batch = tok(["hi", "a longer prompt here"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id
    assert batch["attention_mask"][0, 0].item() == 0 and batch["attention_mask"][0, -1].item() == 1


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_forward_and_generate(loaded):
    import torch

    model, tok = loaded
    batch = tok(["2 + 2 =", "def f(x):"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert isinstance(tok.batch_decode(out[:, -4:]), list)


@pytest.mark.parametrize("head_dim", [16, 48])
def test_unsupported_head_dim_is_rejected(head_dim):
    with pytest.raises(ValueError, match=rf"head_dim={head_dim} is not supported.*vLLM CPU"):
        TinyModelConfig(head_dim=head_dim).check()


def test_other_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyModelConfig(num_heads=3, num_kv_heads=2).check()
    with pytest.raises(ValueError, match="vocab_size"):
        TinyModelConfig(vocab_size=100).check()


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def build_counter(monkeypatch):
    calls = []
    real = tiny.build_tiny_model

    def counting(config, out_dir):
        calls.append(config)
        return real(config, out_dir)

    monkeypatch.setattr(tiny, "build_tiny_model", counting)
    return calls


def test_cache_builds_once(tmp_path, build_counter):
    first = tiny_model_dir(TinyModelConfig(), cache_root=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = tiny_model_dir(TinyModelConfig(), cache_root=tmp_path)
    assert first == second and first.is_relative_to(tmp_path)
    assert len(build_counter) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    # A different config is a different entry; no temp dirs are left behind.
    other = tiny_model_dir(TinyModelConfig(seed=7), cache_root=tmp_path)
    assert other != first and len(build_counter) == 2
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, other.name])


def test_cache_root_from_env(tmp_path, monkeypatch, build_counter):
    monkeypatch.setenv("DISTIL_RAY_CACHE", str(tmp_path / "envcache"))
    path = tiny_model_dir()
    assert path.is_relative_to(tmp_path / "envcache") and (path / "config.json").exists()


def test_cache_lost_race_uses_winner(tmp_path, monkeypatch):
    """Another builder finishes first: ours is discarded, the winner's dir is returned."""
    config = TinyModelConfig()
    real = tiny.build_tiny_model
    final = tmp_path / "tiny_models" / f"qwen3-tiny-{config.cache_key()}"

    def racing(cfg, out_dir):
        real(cfg, final)  # the competitor lands first
        return real(cfg, out_dir)

    monkeypatch.setattr(tiny, "build_tiny_model", racing)
    assert tiny_model_dir(config, cache_root=tmp_path) == final
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_cache_concurrent_builders(tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(tiny_model_dir(TinyModelConfig(), cache_root=tmp_path))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]
    load_tiny(results[0])


# ---------------------------------------------------------------------------------------------
# vLLM parity (CPU build), in a subprocess
# ---------------------------------------------------------------------------------------------

_VLLM_UNAVAILABLE = 3  # exit code of the script when vllm cannot be imported
_GEN_TOKENS = 8


def _serve_with_vllm(model_dir: str, out_json: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: simpler, faster
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from vllm import LLM, SamplingParams
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        Path(out_json).write_text(json.dumps({"import_error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(_VLLM_UNAVAILABLE)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = _chat_prompt_ids(tok)
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=64 * 2**20,
        seed=0,
    )
    greedy = dict(temperature=0.0, max_tokens=_GEN_TOKENS, logprobs=0)
    stop, fixed = llm.generate(
        [{"prompt_token_ids": prompt}] * 2,
        [SamplingParams(**greedy), SamplingParams(**greedy, ignore_eos=True)],
        use_tqdm=False,
    )
    sequence = prompt + list(fixed.outputs[0].token_ids)
    (scored,) = llm.generate(
        [{"prompt_token_ids": sequence}],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    result = {
        "prompt": prompt,
        "stop_tokens": list(stop.outputs[0].token_ids),
        "fixed_tokens": list(fixed.outputs[0].token_ids),
        "fixed_logprobs": [
            lp[t].logprob for lp, t in zip(fixed.outputs[0].logprobs, fixed.outputs[0].token_ids)
        ],
        "sequence": sequence,
        # Position 0 has no log-prob; the others hold the actual token's log-prob (plus top-0).
        "prompt_logprobs": [
            lp[t].logprob for lp, t in zip(scored.prompt_logprobs[1:], sequence[1:])
        ],
    }
    Path(out_json).write_text(json.dumps(result))


def _vllm_cache_dir(pytestconfig, tmp_path: Path) -> Path:
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("vllm") if cache is not None else tmp_path / "vllm_cache"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_matches_hf(model_dir, loaded, tmp_path, pytestconfig):
    import torch

    out_json = tmp_path / "vllm.json"
    repo_root = str(Path(tiny.__file__).resolve().parents[2])
    env = {
        **os.environ,
        # vLLM caches its model inspection there (about 10 s per run saved); keep it out of
        # $HOME but persistent, in pytest's cache dir, unless the user chose a location.
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT")
        or str(_vllm_cache_dir(pytestconfig, tmp_path)),
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(model_dir), str(out_json)],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    # installed but not importable is a broken environment (e.g. a torchvision that does not match
    # CPU torch), not a reason to skip
    if proc.returncode == _VLLM_UNAVAILABLE:
        pytest.fail(f"vllm is installed but not importable: {json.loads(out_json.read_text())['import_error']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(out_json.read_text())

    model, tok = loaded
    prompt = got["prompt"]
    assert prompt == _chat_prompt_ids(tok)
    with torch.no_grad():
        # HF greedy with its own stopping rule (generation_config eos ids) must agree with vLLM's.
        hf_stop = model.generate(
            torch.tensor([prompt]), max_new_tokens=_GEN_TOKENS, do_sample=False
        )
        assert hf_stop[0, len(prompt):].tolist() == got["stop_tokens"]
        # Fixed-length greedy decode, no stopping, by plain argmax over full forwards.
        seq = list(prompt)
        for _ in range(_GEN_TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(prompt):] == got["fixed_tokens"]

        sequence = torch.tensor([got["sequence"]])
        logprobs = torch.log_softmax(model(sequence).logits[0, :-1].double(), dim=-1)
        hf_lp = logprobs.gather(-1, sequence[0, 1:, None])[:, 0]
    vllm_prompt_lp = torch.tensor(got["prompt_logprobs"], dtype=torch.float64)
    torch.testing.assert_close(vllm_prompt_lp, hf_lp, atol=1e-4, rtol=0)
    # The sampled tokens' log-probs agree as well (they are the tail of the scored sequence).
    vllm_sample_lp = torch.tensor(got["fixed_logprobs"], dtype=torch.float64)
    torch.testing.assert_close(vllm_sample_lp, hf_lp[len(prompt) - 1 :], atol=1e-4, rtol=0)


if __name__ == "__main__":
    _serve_with_vllm(sys.argv[1], sys.argv[2])
