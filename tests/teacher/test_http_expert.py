"""The black-box expert (teacher.backend=http) against a real vLLM OpenAI-compatible server of the
warm-started tiny model, started here on 127.0.0.1: its top-k equals a float64 forward of the
same weights, a different tokenizer or a dead endpoint is refused with a clear message, and the
tiny run learns with the expert as its teacher."""

import os
import subprocess
import sys
import time

import pytest
import requests
import torch

from distil_ray.config import ConfigError, HttpConfig, compose_config
from distil_ray.engines.http import ExpertError, HTTPEngine
from distil_ray.models import TinyModelConfig, build_tiny_model, load_tiny
from distil_ray.telemetry.metrics import read_metrics
from distil_ray.trainer import Trainer

from ..learner.test_worker import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = ["+experiment=tiny"]


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    """The tiny experiment's warm-started model (built, or taken from the cache)."""
    trainer = Trainer(compose_config(TINY), tmp_path_factory.mktemp("prepare"))
    trainer.task = trainer.cfg.task.build()  # what setup() does before it prepares the model
    return trainer.prepare_model()


@pytest.fixture(scope="module")
def server(warm_model, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "vllm_serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", warm_model,
         "--served-model-name", "expert", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "1024", "--kv-cache-memory-bytes", str(128 << 20), "--max-logprobs", "20",
         "--enforce-eager", "--no-enable-chunked-prefill"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if requests.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not come up in 400 s; see {log.name}")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_expert_top_k_equals_a_float64_forward(server, warm_model):
    engine = HTTPEngine(warm_model, HttpConfig(base_url=server))
    assert engine.model == "expert"  # the first served model
    model, tok = load_tiny(warm_model)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in (6, 11, 3)]
    responses = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in (9, 4, 12)]
    k = 5
    for prompt, response, s in zip(prompts, responses, engine.score_topk(prompts, responses, k)):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0], -1)
        rows = logp[len(prompt) - 1:len(prompt) - 1 + len(response)]
        ref_lp, _ = rows.topk(k, -1)
        torch.testing.assert_close(s.topk_logprobs.double(), ref_lp, rtol=0, atol=1e-4)
        # the expert's ids carry those log-probs under the same weights (ties may swap ids)
        torch.testing.assert_close(rows.gather(-1, s.topk_ids), ref_lp, rtol=0, atol=1e-4)
        torch.testing.assert_close(s.token_logprobs.double(), rows.gather(-1, torch.tensor(response)[:, None])[:, 0],
                                   rtol=0, atol=1e-4)
    assert engine.score_topk([[5]], [[]], k)[0].topk_ids.shape == (0, k)


def test_an_expert_with_another_tokenizer_is_refused(server, tmp_path):
    other = build_tiny_model(TinyModelConfig(extra_corpus=["zyzzyva quixotic " * 50, "flummox jinx " * 50]),
                             tmp_path / "other")
    with pytest.raises(ExpertError, match="tokenises differently"):
        HTTPEngine(str(other), HttpConfig(base_url=server))


def test_a_dead_endpoint_is_a_clear_error(warm_model):
    cfg = HttpConfig(base_url=f"http://127.0.0.1:{free_port()}", startup_timeout_s=2.0)
    with pytest.raises(ExpertError, match="did not answer /v1/models within 2 s"):
        HTTPEngine(warm_model, cfg)


def test_http_needs_a_url_and_a_fixed_teacher():
    from distil_ray.config import validate

    with pytest.raises(ConfigError, match="teacher.http.base_url: the expert's URL is required"):
        validate(compose_config(TINY + ["teacher.backend=http", "teacher.update=fixed"]))
    with pytest.raises(ConfigError, match="needs teacher.update=fixed"):
        validate(compose_config(TINY + ["teacher.backend=http", "teacher.http.base_url=http://x:1"]))


def test_the_tiny_run_learns_from_the_expert(ray_cluster, server, tmp_path):
    cfg = compose_config(TINY + ["teacher.backend=http", "teacher.update=fixed", f"teacher.http.base_url={server}"])
    Trainer(cfg, tmp_path).fit()
    curve = [(line["step"], line["val/accuracy"]) for line in read_metrics(tmp_path) if "val/accuracy" in line]
    print("val/accuracy with the http expert:", curve)
    assert curve[-1][1] - curve[0][1] >= 0.25, curve
