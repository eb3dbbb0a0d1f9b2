"""The black-box expert: any OpenAI-compatible ``/v1/completions`` endpoint that returns prompt
log-probs (vLLM's server: ``vllm serve MODEL``) scores the student's responses as the teacher.

A request sends ``teacher context + response`` as token ids with ``max_tokens=1`` and
``prompt_logprobs=k``; vLLM answers, for every prompt position, a dict of token id → log-prob
holding the top-k and the token actually there. The response rows become the teacher's
``[T, k]`` top-k, as the in-process engines return them. Requests run concurrently (at most
``max_concurrency`` in flight), each with a timeout and retries with exponential back-off on
connection errors, timeouts, 429 and 5xx.

Distillation compares the teacher's and the student's log-probs token by token, so the expert
must use the student's tokenizer: at start-up the server tokenises a probe text set and its answer
must equal the local tokenizer's, id for id, or the engine refuses to start.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from distil_ray.config import HttpConfig
from distil_ray.engines.base import TeacherScores, check_pairs, empty_scores

# what the tokenizer check sends: plain words, digits, code, whitespace runs, non-Latin scripts and
# the chat template's own special tokens (added by the caller)
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: pass",
    "Größe, naïve café — «quotes» 日本語のテキスト 中文 Ελληνικά русский",
    "   leading spaces and trailing   ",
)


class ExpertError(RuntimeError):
    """The expert endpoint is down, refused a request, or does not return prompt log-probs."""


class HTTPEngine:
    """The teacher half of the engine interface (``score_topk``, ``sequence_logprobs``) over HTTP.
    The expert's weights are its own: there is nothing to load."""

    def __init__(self, model_path: str, cfg: HttpConfig):
        import requests
        from transformers import AutoTokenizer

        cfg.check()
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/").removesuffix("/v1")
        self.session = requests.Session()
        # as many pooled connections as requests in flight (requests keeps 10 by default)
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=cfg.max_concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if cfg.api_key_env:
            self.session.headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.vocab_size = len(self.tokenizer)
        served = self._served_models()
        self.model = cfg.model or served[0]["id"]
        card = next((m for m in served if m["id"] == self.model), None)
        if card is None:
            raise ExpertError(f"teacher.http.model={self.model!r}: the expert at {self.url} serves "
                              f"{', '.join(repr(m['id']) for m in served)}")
        # the longest context + response the server takes (vLLM reports it): the scorer leaves
        # longer ones unscored instead of the server refusing them
        self.max_model_len = card.get("max_model_len")
        self._check_tokenizer()
        self.pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="expert")

    # ------------------------------------------------------------------ requests

    def _request(self, method: str, path: str, payload: dict | None = None, *, retries: int | None = None,
                 timeout_s: float | None = None) -> dict:
        import requests

        retries = self.cfg.max_retries if retries is None else retries
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.request(method, self.url + path, json=payload,
                                                 timeout=timeout_s or self.cfg.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:  # a client error does not improve with retries
                raise ExpertError(f"the expert at {self.url}{path} refused the request: HTTP "
                                  f"{response.status_code}: {response.text[:300]}")
            return response.json()
        raise ExpertError(f"the expert at {self.url}{path} did not answer after {retries + 1} attempts "
                          f"({last}); is teacher.http.base_url right and the server up?")

    def _served_models(self) -> list[dict]:
        """``/v1/models``, waiting up to ``startup_timeout_s`` for a server that is still starting
        (connection refused, 5xx); a client error (401, 404) fails at once."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            try:
                models = self._request("GET", "/v1/models", retries=0, timeout_s=10.0)["data"]
                break
            except ExpertError as e:
                if "refused the request" in str(e):
                    raise
                if time.monotonic() > deadline:
                    raise ExpertError(f"the expert at {self.url} did not answer /v1/models within "
                                      f"{self.cfg.startup_timeout_s:.0f} s (teacher.http.startup_timeout_s); "
                                      "is the server up?") from None
                time.sleep(1.0)
        if not models:
            raise ExpertError(f"the expert at {self.url} serves no model")
        return models

    def _check_tokenizer(self) -> None:
        """The server must tokenise like the student: probe texts (and the chat template's special
        tokens) compared id for id through vLLM's ``/tokenize``."""
        specials = " ".join(t for t in self.tokenizer.all_special_tokens if t)
        for text in (*PROBE_TEXTS, specials):
            local = self.tokenizer.encode(text, add_special_tokens=False)
            remote = self._request("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                        "add_special_tokens": False})["tokens"]
            if list(remote) != list(local):
                raise ExpertError(
                    f"the expert {self.model!r} at {self.url} tokenises differently from the student "
                    f"({len(remote)} vs {len(local)} tokens for {text[:40]!r}): distillation needs the "
                    "same tokenizer; serve a model of the student's family")

    # ------------------------------------------------------------------ the engine interface

    def score_topk(self, prompt_ids: list[list[int]], response_ids: list[list[int]], k: int) -> list[TeacherScores]:
        check_pairs(prompt_ids, response_ids)
        futures = [self.pool.submit(self._score_one, list(p), list(r), k) for p, r in zip(prompt_ids, response_ids)]
        return [f.result() for f in futures]

    def _score_one(self, prompt: list[int], response: list[int], k: int) -> TeacherScores:
        if not response:
            return empty_scores(k)
        answer = self._request("POST", "/v1/completions", {
            "model": self.model, "prompt": prompt + response, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": k,
        })
        rows = (answer.get("choices") or [{}])[0].get("prompt_logprobs")
        if rows is None:
            raise ExpertError(f"the expert at {self.url} returned no prompt_logprobs: it must be an "
                              "OpenAI-compatible server that supports them (vLLM's `vllm serve`)")
        rows = rows[len(prompt):len(prompt) + len(response)]
        if len(rows) != len(response):
            raise ExpertError(f"the expert returned {len(rows)} prompt log-prob rows for {len(response)} response tokens")
        T = len(response)
        ids = np.zeros((T, k), np.int64)
        lps = np.full((T, k), -np.inf, np.float32)
        token = np.zeros(T, np.float32)
        for t, (row, y) in enumerate(zip(rows, response)):
            entries = sorted(((e["rank"], int(i), e["logprob"]) for i, e in row.items()), key=lambda e: (e[0], e[1]))
            top = [e for e in entries if e[0] <= k][:k]
            if len(top) < min(k, self.vocab_size):
                raise ExpertError(f"the expert returned {len(top)} of the top-{k} log-probs at a response position")
            ids[t, :len(top)] = [i for _, i, _ in top]
            lps[t, :len(top)] = [lp for _, _, lp in top]
            if str(y) not in row:
                raise ExpertError("the expert's prompt_logprobs lack the log-prob of the token actually there "
                                  "(vLLM's server includes it): not a server this backend can use")
            token[t] = row[str(y)]["logprob"]
        if ids.max(initial=0) >= self.vocab_size:
            raise ExpertError(f"the expert returned token id {int(ids.max())} outside the student's vocabulary "
                              f"({self.vocab_size}): not the same tokenizer")
        return TeacherScores(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(token))

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        return self._score_one(list(prompt), list(response), 1).token_logprobs.double().tolist()

    def generate(self, *args, **kwargs):
        raise NotImplementedError("the http backend is a teacher only (teacher.backend=http)")

    def load_weights(self, named_tensors: Sequence) -> None:
        raise NotImplementedError("the expert's weights are its own: teacher.backend=http needs teacher.update=fixed")
