"""``python -m distil_ray.export``: a HF model from a training checkpoint (sharded DCP), whose
weights and log-probs are the learner's at that step."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from distil_ray.config import AlgorithmConfig, LearnerConfig
from distil_ray.engines.hf import forward_logprobs
from distil_ray.learner.worker import LearnerWorker, Rendezvous
from distil_ray.models import load_tiny, tiny_model_dir

from .learner_data import make_records
from .test_worker import free_port

pytestmark = pytest.mark.timeout(300)


def test_an_exported_checkpoint_is_the_learners_model(tmp_path):
    path = tiny_model_dir()
    model, tok = load_tiny(path)
    records = make_records(model, tok, n_prompts=3, samples=2, seed=4)
    worker = LearnerWorker(str(path), LearnerConfig(world_size=1, lr=1e-2), AlgorithmConfig("distil"),
                           Rendezvous(0, 1, "127.0.0.1", free_port()))
    try:
        worker.train_step(records)
        worker.save_checkpoint(str(tmp_path / "step_000001"), {"step": 1})
        learner_state = {k: v.copy() for k, v in worker.state_dict_numpy().items()}  # no view of live weights
        prompt, response = records[0].prompt_ids.tolist(), records[0].response_ids.tolist()
        learner_lp = np.array(worker.sequence_logprobs(prompt, response))
        worker.train_step(records)  # the learner moves on: the export is of the checkpoint's step
    finally:
        worker.close()
    proc = subprocess.run([sys.executable, "-m", "distil_ray.export", str(tmp_path / "step_000001"), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, exported_tok = load_tiny(tmp_path / "hf")  # AutoModelForCausalLM / AutoTokenizer
    assert exported_tok.get_vocab() == tok.get_vocab()
    state = exported.state_dict()
    for k, v in learner_state.items():
        np.testing.assert_array_equal(state[k].numpy(), v, err_msg=k)
    np.testing.assert_allclose(forward_logprobs(exported, prompt, response), learner_lp, rtol=0, atol=1e-5)
    start = {k: v.numpy() for k, v in model.state_dict().items()}
    assert max(float(np.abs(start[k] - learner_state[k]).max()) for k in learner_state) > 1e-4  # it trained

    bad = subprocess.run([sys.executable, "-m", "distil_ray.export", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a training checkpoint" in bad.stderr and "Traceback" not in bad.stderr
