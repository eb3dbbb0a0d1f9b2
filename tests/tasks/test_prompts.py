import numpy as np

from distil_ray.records import Prompt
from distil_ray.tasks.base import TaskExample
from distil_ray.tasks.prompts import PromptStream


def _prompts(n):
    return [Prompt(TaskExample(f"p{i}", "toy", [], {}), np.zeros(1, np.int32)) for i in range(n)]


def test_every_prompt_once_per_epoch_and_reshuffled():
    stream = PromptStream(_prompts(6), batch_size=3, seed=1)
    epoch0 = [p.uid for _ in range(2) for p in stream.next_batch()]
    epoch1 = [p.uid for _ in range(2) for p in stream.next_batch()]
    assert sorted(epoch0) == sorted(epoch1) == [f"p{i}" for i in range(6)]
    assert epoch0 != epoch1  # a new order each epoch (seeded)


def test_batches_cross_epoch_boundaries():
    stream = PromptStream(_prompts(5), batch_size=3, seed=0)
    seen = [p.uid for _ in range(5) for p in stream.next_batch()]
    assert len(seen) == 15 and all(seen.count(f"p{i}") == 3 for i in range(5))


def test_resume_continues_exactly():
    a = PromptStream(_prompts(7), batch_size=3, seed=4)
    for _ in range(4):
        a.next_batch()
    state = a.state()
    expected = [[p.uid for p in a.next_batch()] for _ in range(5)]
    b = PromptStream(_prompts(7), batch_size=3, seed=4)
    b.load_state(state)
    assert [[p.uid for p in b.next_batch()] for _ in range(5)] == expected


def test_no_prompt_twice_in_a_batch_across_epochs():
    stream = PromptStream(_prompts(5), batch_size=4, seed=3)
    counts = {f"p{i}": 0 for i in range(5)}
    for _ in range(25):
        batch = [p.uid for p in stream.next_batch()]
        assert len(set(batch)) == len(batch)
        for uid in batch:
            counts[uid] += 1
    assert set(counts.values()) == {20}  # still once per epoch: 100 draws over 5 prompts


def test_batch_larger_than_the_split_is_refused():
    import pytest

    with pytest.raises(ValueError, match="trainer.prompts_per_step=6"):
        PromptStream(_prompts(5), batch_size=6)
