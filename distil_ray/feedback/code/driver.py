"""The program the sandbox runs for one test: a small driver around the solution.

It prepends the usual competitive-programming imports (:data:`PRELUDE`, as the official
LiveCodeBench harness does), compiles the solution as ``solution.py`` (so tracebacks point at the
solution's own lines; only those frames are shown) and then

* ``stdin`` tests: runs it with ``__name__ == "__main__"`` and the test input as standard input;
  ``SystemExit`` ends the program normally (as in the official harness);
* ``functional`` (LeetCode-style) tests: parses each non-empty input line as JSON (positional
  arguments), calls ``Solution().<func_name>(*args)`` (or a module-level ``<func_name>`` if there
  is no class ``Solution``), and writes the JSON of the result on a line of the real stdout that
  starts with a per-run random marker (anything the solution prints itself is discarded). A
  result that is not JSON-serializable is written as ``marker + "!" + repr(result)``.

A solution that does not compile exits with :data:`COMPILE_ERROR_EXIT`; an exception it raises
leaves its traceback on stderr and exit code 1.

The driver comes in two parts (:func:`build_driver_parts`): the setup (compile the solution,
import the prelude) and the per-test part (run it). One sandbox per test runs both; one sandbox
per response (a session) runs the setup once and forks a process per test for the second.
"""

from __future__ import annotations

import secrets

TESTTYPES = ("stdin", "functional")

# Modules the official harness star-imports and imports before the solution.
_PRELUDE_MODULES = (
    "string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
    "statistics", "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing",
)
PRELUDE = (
    "".join(f"from {m} import *\n" for m in _PRELUDE_MODULES)
    + "".join(f"import {m}\n" for m in _PRELUDE_MODULES if m not in ("builtins", "typing"))
    + "sys.setrecursionlimit(50000)\n"
)

# What a session's fork server runs before it knows any program: the driver's own imports and the
# prelude, into a namespace that each program's setup copies (``_PRELOADED["_PRELUDE_NS"]``), so
# that loading a program costs its compilation only. (``ast`` and ``unicodedata``: what a traceback
# imports when it is first formatted, i.e. in every test process whose program raised.)
PRELOAD = ("import ast, io, json, linecache, traceback, unicodedata\n_PRELUDE_NS = {}\nexec("
           + repr(PRELUDE) + ", _PRELUDE_NS)\n")

COMPILE_ERROR_EXIT = 3
SOLUTION_FILE = "solution.py"

# Everything that does not depend on the test: compiling the solution and importing the prelude.
# In a session (one sandbox per response) it runs once, in the fork server, before any test; it
# never runs the solution (a compile error is reported by the first test's run).
_DRIVER_SETUP = r'''
import sys as _sys, io as _io, json as _json, linecache as _lc, traceback as _tb
_lc.cache[_FILE] = (len(_SRC), None, _SRC.splitlines(True), _FILE)

def _report(exc):
    te = _tb.TracebackException(type(exc), exc, exc.__traceback__)
    te.stack = _tb.StackSummary.from_list([f for f in te.stack if f.filename == _FILE])
    try:
        _sys.stdout.flush()
    except BaseException:
        pass
    _sys.__stderr__.write("".join(te.format()))
    _sys.__stderr__.flush()

try:
    _code, _compile_error = compile(_SRC, _FILE, "exec"), None
except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as _e:
    _code, _compile_error = None, _e

_ns = {"__name__": "__main__" if _MODE == "stdin" else "solution", "__file__": _FILE}
if "_PRELOADED" in globals():  # (a session: the fork server ran the prelude already)
    _ns = {**_PRELOADED["_PRELUDE_NS"], **_ns}
else:
    exec(_PRELUDE, _ns)
'''

# One test: runs the solution (in the test's own process).
_DRIVER_RUN = r'''
if _code is None:
    _report(_compile_error)
    _sys.exit(_COMPILE_EXIT)

if _MODE == "stdin":
    try:
        exec(_code, _ns)
    except SystemExit:
        pass
    except BaseException as _e:
        _report(_e)
        _sys.exit(1)
    try:
        _sys.stdout.flush()
    except BaseException:
        pass
else:
    _args = [_json.loads(_l) for _l in _sys.stdin.read().split("\n") if _l.strip()]
    _real_out = _sys.stdout
    _sys.stdout = _io.StringIO()
    try:
        exec(_code, _ns)
        if isinstance(_ns.get("Solution"), type):
            _fn = getattr(_ns["Solution"](), _FUNC)
        elif _FUNC in _ns:
            _fn = _ns[_FUNC]
        else:
            raise NameError(f"no class Solution and no function {_FUNC!r} defined")
        _res = _fn(*_args)
    except BaseException as _e:
        _report(_e)
        _sys.exit(1)
    try:
        _out = _json.dumps(_res)
    except Exception:
        _out = None
    if _out is None:
        _real_out.write(_MARK + "!" + repr(_res)[:2000] + "\n")
    else:
        _real_out.write(_MARK + _out + "\n")
    _real_out.flush()
'''


def new_marker() -> str:
    """A fresh marker for the result line of functional tests (the solution cannot guess it)."""
    return f"@@result-{secrets.token_hex(8)}@@"


def build_driver(code: str, testtype: str, func_name: str | None, marker: str) -> str:
    """The program the sandbox runs for each test of ``code`` (see the module docstring)."""
    setup, run = build_driver_parts(code, testtype, func_name, marker)
    return setup + run


def build_driver_parts(code: str, testtype: str, func_name: str | None, marker: str) -> tuple[str, str]:
    """The driver as (setup, per-test part): a session runs the setup once, in its fork server,
    and the per-test part in each test's process; :func:`build_driver` is the two together."""
    header = {
        "_SRC": code,
        "_MODE": testtype,
        "_FUNC": func_name or "",
        "_MARK": marker,
        "_FILE": SOLUTION_FILE,
        "_COMPILE_EXIT": COMPILE_ERROR_EXIT,
        "_PRELUDE": PRELUDE,
    }
    return "".join(f"{k} = {v!r}\n" for k, v in header.items()) + _DRIVER_SETUP, _DRIVER_RUN
