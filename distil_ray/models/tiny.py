"""Tiny causal LMs and tokenizers built entirely locally.

Tests and the CPU demo need a real Hugging Face checkpoint directory (so that the HF, FSDP and
vLLM code paths are the production ones) but must never reach a model hub.  This module trains a
small byte-level BPE tokenizer on a built-in corpus, initialises a Qwen3 model from a seed, and
saves both with ``save_pretrained`` so that ``Auto*.from_pretrained(dir)`` and ``vllm.LLM(dir)``
load them like any downloaded model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from distil_ray.models.config import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    SUPPORTED_HEAD_DIMS,
    TinyModelConfig,
)


# Qwen-style ChatML.  Every turn is "<|im_start|>role\n...<|im_end|>\n"; the generation prompt
# opens an assistant turn for the model to complete.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The pre-tokenisation regex of Qwen2/Qwen3: digits are split one by one (arithmetic tasks then see
# a stable digit vocabulary), words keep their leading space or punctuation.
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# --------------------------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------------------------

_ENGLISH = """\
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
She sells sea shells by the sea shore, and the shells she sells are surely seashells.
To be, or not to be, that is the question.
It was the best of times, it was the worst of times.
All happy families are alike; each unhappy family is unhappy in its own way.
The model reads the question, thinks step by step, and writes the final answer.
Please answer the following question. Show your reasoning before the answer.
Let's think about this carefully and check each step.
The teacher gives feedback on every token, not just a single reward at the end.
Reinforcement learning from rich feedback uses the teacher's distribution as a target.
The student samples a response, and the teacher scores each token of it.
If the answer is correct, the reward is one; otherwise it is zero.
Water boils at one hundred degrees Celsius at sea level.
The capital of France is Paris, and the capital of Japan is Tokyo.
There are seven days in a week and twelve months in a year.
Photosynthesis converts light energy into chemical energy stored in glucose.
The mitochondria is the powerhouse of the cell.
Alice has three apples. Bob gives her two more. How many apples does Alice have now?
A train leaves the station at noon and travels at sixty miles per hour.
How many minutes are there in two and a half hours?
The rectangle is four meters long and three meters wide. What is its area?
Tom is twice as old as his sister, who is six. How old is Tom?
A shop sells pens for two dollars each. How much do five pens cost?
Hello! How are you today? I'm fine, thank you.
You are a helpful assistant. Answer concisely and correctly.
Summarize the text below in one sentence.
Translate the sentence into French: "The cat is on the table."
I don't know, but I'll find out. We've seen it before; they're sure it's right.
Yes. No. Maybe. Certainly! Of course? Indeed...
Scientists measured the distance between the two stars with great care.
The library opens at nine in the morning and closes at six in the evening.
First, read the problem. Second, write the equation. Third, solve it.
Therefore, the answer is 42.
In conclusion, both approaches give the same result.
"""

_CODE = """\
def add(a, b):
    return a + b

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count

for i in range(10):
    print(f"value {i}: {i * i}")

numbers = [3, 1, 4, 1, 5, 9, 2, 6]
total = sum(x for x in numbers if x % 2 == 0)
result = {"name": "tiny", "layers": 2, "ok": True}
import math
print(math.sqrt(16), math.pi)
while True:
    break
try:
    value = int("12")
except ValueError as err:
    raise RuntimeError("bad value") from err
"""

_LATEX = r"""
The solution is $x = \frac{-b \pm \sqrt{b^2 - 4ac}}{2a}$.
We have $\int_0^1 x^2 \, dx = \frac{1}{3}$.
Therefore $\sum_{i=1}^{n} i = \frac{n(n+1)}{2}$.
The final answer is $\boxed{12}$.
The final answer is \boxed{\frac{3}{4}}.
Let $f(x) = 3x^2 + 2x - 1$. Then $f'(x) = 6x + 2$.
Since $\alpha + \beta = \pi$, we get $\sin \alpha = \sin \beta$.
\begin{align} a^2 + b^2 &= c^2 \\ c &= \sqrt{a^2 + b^2} \end{align}
$\lim_{x \to 0} \frac{\sin x}{x} = 1$ and $e^{i\pi} + 1 = 0$.
The matrix $A = \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$ has $\det A = -2$.
"""

_MULTIPLE_CHOICE = """\
Which planet is closest to the Sun? A) Venus B) Mercury C) Earth D) Mars
Answer: B
What is 7 times 8? A) 54 B) 56 C) 58 D) 64
Answer: B
Which gas do plants absorb? A) Oxygen B) Nitrogen C) Carbon dioxide D) Helium
Answer: C
Who wrote Hamlet? A) Dickens B) Austen C) Tolstoy D) Shakespeare
Answer: D
What is the boiling point of water in Celsius? A) 100 B) 90 C) 80 D) 120
Answer: A
Choose the correct option. (A) true (B) false
The correct choice is (A).
"""

_TAGGED = """\
<think>The question asks for the sum. 2 + 3 = 5.</think>
<answer>5</answer>
<think>First compute 6 * 7 = 42. Then subtract 2 to get 40.</think><answer>40</answer>
<think>
Let me reason step by step.
</think>
<answer>
B
</answer>
<reasoning>Check every option, then pick one.</reasoning>
<answer>The answer is C.</answer>
<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 12"}}</tool_call>
<result>144</result>
"""


def _arithmetic_lines() -> list[str]:
    """A deterministic, varied block of arithmetic, so digits and operators get merges."""
    lines = []
    for a in range(1, 41):
        b = (a * 7) % 13 + 1
        lines.append(f"{a} + {b} = {a + b}")
        lines.append(f"{a} * {b} = {a * b}")
        lines.append(f"What is {a * b} - {b}? The answer is {a * b - b}.")
        if a % 4 == 0:
            lines.append(f"{a * b} / {b} = {a}; {a}^2 = {a * a}; {a}.5 - 0.25 = {a + 0.25}")
    return lines


def tokenizer_corpus(extra: tuple[str, ...] = ()) -> list[str]:
    """The built-in tokenizer training corpus (a few hundred lines) plus ``extra``."""
    blocks = [_ENGLISH, _CODE, _LATEX, _MULTIPLE_CHOICE, _TAGGED]
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    lines += _arithmetic_lines()
    # Chat-formatted samples teach the BPE the newline-after-role pattern around special tokens.
    for q, a in [("What is 2 + 2?", "4"), ("Name a colour.", "Blue."), ("Say hi.", "Hi!")]:
        lines.append(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n")
    lines += list(extra)
    return lines


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def build_tokenizer(config: TinyModelConfig):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No normalizer: encode -> decode must reproduce any input byte for byte.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2, in this order
        # All 256 byte symbols are in the vocabulary whatever the corpus, so nothing is ever <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(config.extra_corpus), trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        # Left padding so a batch of prompts ends at the same position and generation appends.
        padding_side="left",
        # Qwen-instruct convention: a chat turn ends with <|im_end|>; <|endoftext|> pads.
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        # Registered so skip_special_tokens=True also drops it (the name works on v4 and v5).
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=config.max_position_embeddings,
    )


def build_model(config: TinyModelConfig, vocab_size: int, token_ids: dict[str, int]):
    """A float32 ``Qwen3ForCausalLM`` whose weights depend only on ``config.seed``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos_id, pad_id = token_ids[IM_END], token_ids[ENDOFTEXT]
    hf_config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=pad_id,  # as in Qwen: no BOS is prepended, <|endoftext|> nominally
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # HF's own init draws from the global RNG, which other threads may share; fork_rng at least
    # leaves the caller's stream where it was (a cache hit or miss must not change an experiment).
    with torch.random.fork_rng(devices=[]):
        model = Qwen3ForCausalLM(hf_config).to(torch.float32)
    # Then every matrix is redrawn from a private generator, in a fixed (sorted) order, with HF's
    # N(0, initializer_range) init.  1-D parameters are the RMSNorm weights, already all ones.
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.normal_(0.0, hf_config.initializer_range, generator=generator)
        # As HF does: the pad row (padding_idx = pad_token_id) starts at zero; it gets no gradient.
        embed = model.get_input_embeddings()
        if embed.padding_idx is not None:
            embed.weight[embed.padding_idx].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id,
        # Stop on either: the end of a chat turn or the end of a plain document.
        eos_token_id=[eos_id, pad_id],
        pad_token_id=pad_id,
    )
    return model.eval()


def build_tiny_model(config: TinyModelConfig, out_dir: str | os.PathLike) -> Path:
    """Build tokenizer and model for ``config`` and ``save_pretrained`` both into ``out_dir``."""
    config.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(config)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # The embedding matrix covers exactly the tokenizer: every id the model can emit decodes.
    model = build_model(config, len(tokenizer), token_ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_model_config.json").write_text(
        json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)
    )
    return out


def default_cache_root() -> Path:
    env = os.environ.get("DISTIL_RAY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "distil_ray"


def tiny_model_dir(
    config: TinyModelConfig | None = None, cache_root: str | os.PathLike | None = None
) -> Path:
    """A cached build of ``config`` (default: ``TinyModelConfig()``), built only if missing.

    The build goes into a private temp dir that is then renamed into place: rename is atomic, so
    concurrent builders (Ray actors, pytest workers) never see a half-written directory; the
    loser of a race discards its copy and uses the winner's (identical, builds are deterministic).
    """
    config = config or TinyModelConfig()
    config.check()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / "tiny_models" / f"qwen3-tiny-{config.cache_key()}"
    return cached_build(final, lambda out: build_tiny_model(config, out))


def cached_build(final: Path, build) -> Path:
    """``final`` if it exists, else ``build(tmp)`` into a private temp dir renamed into place.

    Rename is atomic, so concurrent builders (Ray actors, pytest workers) never see a half-written
    directory; the loser of a race discards its copy and uses the winner's (builds are
    deterministic, so the copies are the same).
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tiny(path: str | os.PathLike):
    """Load ``(model, tokenizer)`` from a directory with the ``Auto*`` classes, never the hub."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
