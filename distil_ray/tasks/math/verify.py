"""``math_verify.verify`` under a wall-clock limit that works from any thread.

By default the check runs in a persistent helper process that is killed and restarted on a
timeout (so even a computation stuck inside C code, e.g. ``\\boxed{9^{9^{9^{9}}}}``, cannot hold
the caller), or, with ``isolation="thread"``, in a helper thread that is abandoned on a timeout.
math-verify's own ``signal.alarm`` timeouts are disabled (they only work in the main thread).
When math-verify fails or times out, the string comparison decides (:func:`answers_match`).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distil_ray.tasks.math.answers import normalize_answer

ISOLATION_MODES = ("process", "thread")

class MathVerifyTimeout(TimeoutError):
    """math-verify did not finish within the time limit."""


_SCIENTIFIC = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*[eE]\s*([+-]?\d+)\s*")


def _scientific_to_latex(answer: str) -> str:
    """``4.5e33`` -> ``4.5\\times10^{33}`` (math-verify reads a bare ``e`` as Euler's number)."""
    m = _SCIENTIFIC.fullmatch(answer)
    return f"{m.group(1)}\\times10^{{{m.group(2)}}}" if m else answer


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its own timeouts are off; here the caller enforces the limit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_warning_filter_installed = False


def _quiet_disabled_timeout_warning() -> None:
    global _warning_filter_installed
    if not _warning_filter_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
        _warning_filter_installed = True


def math_verify_equal(gold: str, pred: str) -> bool | None:
    """``verify(parse(gold), parse(pred))`` on boxed answers, without math-verify's signal timeouts.

    Answers in e-notation (Minerva writes ``4.5e33``) are rewritten as powers of ten first.
    ``None`` when either side does not parse (the caller then relies on string comparison).
    """
    from math_verify import parse, verify

    _quiet_disabled_timeout_warning()
    gold_parsed = parse("\\boxed{" + _scientific_to_latex(gold) + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + _scientific_to_latex(pred) + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _Abandoned(BaseException):
    """Raised asynchronously inside a helper thread whose result nobody waits for any more."""


def _run_in_thread(fn, args: tuple, timeout_s: float):
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args)
        except _Abandoned:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="math-verify", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        # Best effort: stops the thread at its next Python bytecode (not inside a long C call).
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Abandoned))
        raise MathVerifyTimeout(f"math-verify took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


_WORKER_CODE = "from distil_ray.tasks.math.verify import _verify_worker_main; _verify_worker_main()"


def _verify_worker_main() -> None:
    """Helper process: one JSON request per stdin line, one JSON reply per stdout line."""
    logging.disable(logging.CRITICAL)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    import math_verify  # noqa: F401 - pay the import before announcing readiness

    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            reply = {"ok": math_verify_equal(req["gold"], req["pred"])}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _VerifyProcess:
    """A persistent helper process running :func:`math_verify_equal`; killed and restarted on timeout.

    One per Python process (shared by all tasks); concurrent callers take turns.
    """

    def __init__(self, startup_timeout_s: float = 120.0):
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def _start(self) -> None:
        package_root = str(Path(__file__).resolve().parents[3])  # the directory holding distil_ray/
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buf = b""
        try:
            ready = self._read_line(self.startup_timeout_s)
        except MathVerifyTimeout:
            self._kill()
            raise RuntimeError("the math-verify helper process did not start") from None
        if json.loads(ready).get("ready") is not True:
            self._kill()
            raise RuntimeError(f"unexpected greeting from the math-verify helper process: {ready!r}")

    def _read_line(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MathVerifyTimeout(f"math-verify took longer than {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self._kill()
                raise RuntimeError("the math-verify helper process exited unexpectedly")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
            self._proc = None

    def call(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    self._kill()
                self._start()
            try:
                self._proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
                self._proc.stdin.flush()
                reply = json.loads(self._read_line(timeout_s))
            except MathVerifyTimeout:
                self._kill()
                self.restarts += 1
                raise
            except (BrokenPipeError, OSError) as e:
                self._kill()
                raise RuntimeError(f"the math-verify helper process failed: {e}") from None
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        with self._lock:
            self._kill()


_process_verifier: _VerifyProcess | None = None
_process_verifier_lock = threading.Lock()


def _get_process_verifier() -> _VerifyProcess:
    global _process_verifier
    with _process_verifier_lock:
        if _process_verifier is None:
            _process_verifier = _VerifyProcess()
            atexit.register(_process_verifier.close)
        return _process_verifier


def answers_match(
    gold: str, pred: str, timeout_s: float = 10.0, isolation: str = "process"
) -> tuple[bool, dict[str, Any]]:
    """Whether ``pred`` is an acceptable final answer for ``gold``, and how that was decided.

    Normalised string equality first (cheap, never wrong when it holds); otherwise math-verify
    under ``timeout_s`` (``isolation``: ``"process"`` or ``"thread"``). The details dict has
    ``method`` (``"string"`` / ``"math_verify"``), ``math_verify`` (its verdict, ``None`` if it
    did not parse or failed), ``timed_out`` and ``error``.
    """
    details: dict[str, Any] = {"method": "string", "math_verify": None, "timed_out": False, "error": None}
    if normalize_answer(gold) == normalize_answer(pred):
        return True, details
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
    try:
        if isolation == "process":
            verdict = _get_process_verifier().call(gold, pred, timeout_s)
        else:
            verdict = _run_in_thread(math_verify_equal, (gold, pred), timeout_s)
    except MathVerifyTimeout:
        details["timed_out"] = True
        return False, details
    except Exception as e:  # noqa: BLE001 - any failure falls back to the string comparison
        details["error"] = f"{type(e).__name__}: {e}"
        return False, details
    details["math_verify"] = verdict
    if verdict is None:
        return False, details
    details["method"] = "math_verify"
    return bool(verdict), details
