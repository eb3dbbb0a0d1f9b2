"""Calls to an actor that Ray may be restarting (``max_restarts``): while it restarts, a call
fails with ``ActorUnavailableError`` and may be made again; once its restarts are used up it fails
with ``ActorDiedError`` for good."""

from __future__ import annotations

import time
from typing import Callable

import ray


def call_when_alive(make_call: Callable[[], ray.ObjectRef], timeout_s: float):
    """``ray.get(make_call())``, making the call again while the actor is restarting, up to
    ``timeout_s`` in all (``GetTimeoutError`` then); a dead actor's ``ActorDiedError`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(make_call(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise ray.exceptions.GetTimeoutError(f"the actor was still restarting after {timeout_s:g} s") from None
            time.sleep(0.2)
