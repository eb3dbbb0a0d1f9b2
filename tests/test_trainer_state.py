"""The driver's own state (counters, data position, best evaluation) round-trips through
``Trainer.state_dict`` / ``load_state_dict``: a restored driver serves exactly the prompts the
original would have served next. No Ray needed."""

import json

import numpy as np

from distil_ray.config import RunConfig
from distil_ray.records import Prompt
from distil_ray.tasks.base import TaskExample
from distil_ray.tasks.prompts import PromptStream
from distil_ray.trainer import Trainer


def _trainer(tmp_path) -> Trainer:
    trainer = Trainer(RunConfig(), tmp_path)
    prompts = [Prompt(TaskExample(f"p{i}", "toy", [], {}), np.zeros(1, np.int32)) for i in range(7)]
    trainer.stream = PromptStream(prompts, batch_size=3, seed=4)
    return trainer


def test_state_dict_round_trip_resumes_the_data_order(tmp_path):
    original = _trainer(tmp_path)
    for _ in range(4):  # past an epoch boundary
        original.stream.next_batch()
    original.step, original.version, original._rounds_started = 4, 4, 5
    original.best = {"val/best_accuracy": 0.5, "val/best_step": 2.0}
    state = json.loads(json.dumps(original.state_dict()))  # plain data, as a checkpoint stores it

    restored = _trainer(tmp_path)
    restored.load_state_dict(state)
    assert (restored.step, restored.version, restored._rounds_started) == (4, 4, 5)
    assert restored.best == original.best
    for _ in range(3):
        assert [p.uid for p in restored.stream.next_batch()] == [p.uid for p in original.stream.next_batch()]
