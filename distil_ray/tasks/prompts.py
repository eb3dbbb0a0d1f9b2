"""From task examples to the prompts the trainer feeds the rollout workers, in a resumable order."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from distil_ray.records import Prompt
from distil_ray.tasks.base import TaskExample


def check_examples(examples: Sequence[TaskExample], split: str) -> list[TaskExample]:
    """The examples of one split, refused when they cannot be trained or evaluated on: an empty
    split, or two examples with one uid (the driver routes every sample to its prompt by uid, so
    two would be graded against each other's answers and their groups merged)."""
    examples = list(examples)
    if not examples:
        raise ValueError(f"{split}: the split has no examples")
    first: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.uid in first:
            raise ValueError(f"{split}: examples {first[ex.uid]} and {i} share the uid {ex.uid!r}; "
                             "every example needs its own (e.g. a unique 'idx' per record)")
        first[ex.uid] = i
    return examples


def to_prompts(examples: Sequence[TaskExample], tokenizer, chat_template_kwargs: dict | None = None,
               special_tokens: bool = True) -> list[Prompt]:
    """Chat-template each example once; the token ids travel from here on, never the text.
    ``chat_template_kwargs``: e.g. ``{"enable_thinking": False}`` (``model.enable_thinking``).
    ``special_tokens=False``: the template's text decoded without its special tokens and tokenised
    again without adding any (``model.train_prompt_special_tokens``: OPSD's student prompts,
    ``"user\n{content}\nassistant\n"`` for Qwen3)."""
    prompts = []
    for ex in examples:
        ids = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, return_dict=False,
                                            **(chat_template_kwargs or {}))
        if not special_tokens:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(ex, np.asarray(ids, dtype=np.int32)))
    return prompts


class PromptStream:
    """Batches of prompts, reshuffled every epoch from ``(seed, epoch)``.

    The whole position is two integers (``state()``), so a resumed run continues with exactly the
    prompts it would have seen had it not stopped.
    """

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, seed: int = 0):
        if not prompts:
            raise ValueError("the training split has no prompts")
        if batch_size > len(prompts):
            raise ValueError(
                f"trainer.prompts_per_step={batch_size}: the training split has only {len(prompts)} prompts"
            )
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int, defer: Sequence[int] = ()) -> list[int]:
        """The epoch's order; prompts in ``defer`` (already in the batch being filled when the
        epoch rolled over) move to the end, so each prompt still comes once per epoch."""
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        deferred = set(defer)
        return [i for i in order if i not in deferred] + [i for i in order if i in deferred]

    def next_batch(self) -> list[Prompt]:
        """The next ``batch_size`` prompts, never one prompt twice: the driver routes samples to
        their group by prompt, so a repeated prompt would merge two groups into one."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch, defer=batch)
            batch.append(self._order[self.position])
            self.position += 1
        return [self.prompts[i] for i in batch]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": list(self._order)}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = [int(i) for i in state["order"]]
