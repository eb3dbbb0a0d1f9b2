"""Run untrusted (model-written) Python code, contained.

Entry point::

    from distil_ray.feedback.sandbox import run_python
    res = run_python("print(input()[::-1])", "abc\\n", timeout_s=5, memory_mb=512)
    res.status, res.stdout, res.stderr, res.returncode, res.wall_s, res.isolation, res.warning

``Sandbox`` holds the same options as an object (``Sandbox(timeout_s=5).run(code, stdin)``).
``run_python`` never raises because of what the code does; every outcome is a ``status``:

==================  ==========================================================================
``ok``              exited with code 0
``runtime_error``   non-zero exit code, or killed by a signal that is not one of the below
                    (a Python exception leaves its traceback in ``stderr``; a syntax error is
                    a runtime error with exit code 1)
``timeout``         still running after ``timeout_s`` of wall-clock time (killed), or killed by
                    the CPU-time limit (SIGXCPU)
``memory_limit``    see "Memory limit" below
``output_limit``    stdout or stderr went past ``max_output_bytes`` (killed at that moment)
``sandbox_error``   the sandbox itself could not start the program (the reason is in ``stderr``)
==================  ==========================================================================

Layers of containment
---------------------
``isolation == "bwrap"`` (bubblewrap, Linux namespaces), used whenever ``bwrap`` is installed and
passes a one-time self-check in this process:

* new PID, network, IPC, UTS (and, where possible, cgroup) namespaces: the code sees only its
  own processes, has only an unconfigured loopback interface (no route anywhere, not even to the
  host's 127.0.0.1), and cannot signal anything outside the sandbox;
* a new mount namespace built from scratch: ``/usr`` (and the ``/bin``, ``/lib*`` links),
  the dynamic-linker files of ``/etc`` and the interpreter's installation prefix, all read-only;
  a fresh ``/proc``, a minimal ``/dev``; size-limited tmpfs at ``/work`` (the working directory
  and ``HOME``), ``/tmp`` and ``/dev/shm``. Nothing else of the host is visible: not the
  repository, not ``/root``, not the rest of ``/etc``. The code itself is bind-mounted
  read-only at ``/sandbox/main.py``;
* an empty environment plus ``PATH``, ``HOME``, ``LANG`` and ``TMPDIR`` (bwrap itself is also
  started with a minimal environment, so not even the sandbox's init process carries the
  caller's secrets);
* an unprivileged user. When the caller is root, bwrap runs without a user namespace and a
  small supervisor inside the sandbox switches the program to a *fresh random uid/gid* (no
  capabilities, no supplementary groups) after setting the rlimits. A user namespace would map
  the sandbox user back to host uid 0, and the kernel never enforces ``RLIMIT_NPROC`` for uid 0,
  so a fork bomb would be unbounded; a fresh uid gets its own process count. When the caller is
  not root, bwrap creates a user namespace (``--unshare-user --disable-userns``) and the
  process limit applies per namespace;
* rlimits, set in the program's process right before ``exec``: address space (``memory_mb``),
  CPU time (``timeout_s`` rounded up + 1 s), file size (``max_file_mb``), process count
  (``max_processes``), open files, no core dumps;
* end of run: the namespace's init process is killed (through a pidfd, so a recycled pid is
  never hit) and the kernel then kills every process left in the PID namespace, including ones
  that called ``setsid()`` or double-forked. ``run_python`` returns only after they are gone.
  ``--die-with-parent`` covers the case where the calling process itself dies.

``isolation == "rlimits-only"`` (the fallback when bwrap is missing or fails its self-check, or
when asked for with ``isolation="rlimits"``): the same rlimits, a fresh temporary working
directory, the scrubbed environment and, at the end, a kill of the process group plus a sweep
for any process still carrying this run's marker environment variable. There is **no** network,
filesystem or process isolation: the code can read and write whatever the calling user can,
open sockets and signal other processes. Run by root, the program is switched to a fresh uid as
above when such a uid can run the interpreter (probed once); otherwise it keeps root's powers and
``RLIMIT_NPROC`` does not bind (the ``warning`` says so). The fallback is logged with
``logging.warning`` once per process and repeated in every result's ``warning``.

``isolation`` may be ``"auto"`` (default: bwrap if it works, else the fallback), ``"bwrap"``
(raise :class:`SandboxUnavailable` if it does not work) or ``"rlimits"`` (force the fallback).

Memory limit
------------
``RLIMIT_AS`` caps the address space at ``memory_mb``, so an allocation beyond it fails inside
the program. The result is ``memory_limit`` when the program did not succeed and either

* the last line of ``stderr`` reports a ``MemoryError`` / "Cannot allocate memory" / "out of
  memory" (the usual outcome: CPython raises ``MemoryError``), or
* it died of SIGKILL, SIGSEGV, SIGBUS or SIGABRT (what a failed allocation in C code, or the
  kernel's OOM killer, looks like) and its peak resident memory reached 80 % of ``memory_mb``.

Otherwise such a death is a ``runtime_error`` (e.g. a segfault from very deep recursion).

Interpreter
-----------
By default the sandbox runs the *base* interpreter of the running Python (the one a virtualenv
was made from) with ``-I -S``: no site-packages, no user site, ``PYTHON*`` variables ignored,
so neither the project's virtualenv nor anything else is needed inside. ``python=`` picks
another interpreter (its installation prefix, taken as the parent of its ``bin`` directory, is
mounted read-only); ``allow_site_packages=True`` drops ``-S``. bubblewrap 0.8 or newer is
required (for sized tmpfs mounts); older versions fail the self-check and fall back.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["run_python", "Sandbox", "SandboxResult", "SandboxUnavailable", "bwrap_status"]

log = logging.getLogger(__name__)

STATUSES = ("ok", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error")
ISOLATION_MODES = ("auto", "bwrap", "rlimits")

# Where the code and its working directory appear inside the bwrap sandbox.
_SANDBOX_CODE = "/sandbox/main.py"
_SANDBOX_WORK = "/work"
# Host directories mirrored read-only (or re-created as the same symlink, e.g. /lib -> usr/lib).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The only parts of /etc the interpreter needs (the dynamic linker's cache, and time zones).
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Name of the variable that tags every process of a rlimits-only run, for the final sweep.
_RUN_MARKER_VAR = "DISTIL_SANDBOX_RUN"


class SandboxUnavailable(RuntimeError):
    """``isolation="bwrap"`` was requested but bubblewrap does not work on this host."""


@dataclass
class SandboxResult:
    status: str
    stdout: str
    stderr: str
    returncode: int | None  # exit code, or -signal; None when the sandbox killed the run
    wall_s: float
    isolation: str  # "bwrap" | "rlimits-only"
    warning: str | None = None  # set whenever the isolation is weaker than bwrap
    signal: int | None = None  # the signal that ended the program, if any
    cpu_s: float | None = None  # user + system CPU of the program and its waited-for children
    peak_rss_mb: float | None = None  # largest resident set of the program or a waited-for child

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------
# The supervisor: runs first in the sandbox (or directly, in the fallback), forks the program,
# waits for it and reports how it ended on a private pipe. Being the program's parent is what
# gives an exact wait status (bwrap itself would fold a signal into an exit code 128+n) and the
# peak memory (rusage) used to recognise memory-limit deaths. It also applies the rlimits and the
# uid switch in the child right before exec, so the supervisor itself is never limited by them.
# ---------------------------------------------------------------------------------------------

_SUPERVISOR = r"""
import json, os, resource, sys
spec = json.loads(sys.argv[1])
status_fd = spec["status_fd"]
os.set_inheritable(status_fd, False)

def report(**fields):
    try:
        os.write(status_fd, (json.dumps(fields) + "\n").encode())
    except OSError:
        pass

pid = os.fork()
if pid == 0:
    try:
        # Only stdin/stdout/stderr reach the program (the status pipe is close-on-exec).
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 1 << 20)
        for name, (soft, hard) in spec["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])  # from root to a non-zero uid: all capabilities are dropped
        os.execv(spec["argv"][0], spec["argv"])
    except BaseException as exc:
        report(event="setup_failed", error=repr(exc))
    os._exit(127)
report(event="started", pid=pid)
while True:
    try:
        _, wait_status, usage = os.wait4(pid, 0)
        break
    except InterruptedError:
        pass
report(event="exit", wait_status=wait_status, maxrss_kb=usage.ru_maxrss,
       cpu_s=usage.ru_utime + usage.ru_stime)
"""


# ---------------------------------------------------------------------------------------------
# Host facts: interpreter, bwrap availability (probed once per process)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Interpreter:
    executable: str  # resolved path of the interpreter binary
    mounts: tuple[str, ...]  # host directories to mount read-only (outside /usr)


def _interpreter(python: str | None) -> _Interpreter:
    if python is None:
        # A virtualenv's python is only a link to the base interpreter; run the base one so the
        # sandbox needs the installation prefix only, never the venv (or the project) itself.
        exe = getattr(sys, "_base_executable", None) or sys.executable
        prefixes = [sys.base_prefix]
    else:
        exe = shutil.which(python) or python
        prefixes = []
    exe = os.path.realpath(exe)
    prefixes.append(os.path.dirname(os.path.dirname(exe)))  # <prefix>/bin/python3.x
    mounts: list[str] = []
    for p in map(os.path.realpath, prefixes):
        if p in ("/", "") or _under_system_dirs(p) or any(_is_under(p, m) for m in mounts):
            continue
        mounts = [m for m in mounts if not _is_under(m, p)] + [p]
    return _Interpreter(exe, tuple(mounts))


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _under_system_dirs(path: str) -> bool:
    return any(_is_under(path, os.path.realpath(d)) for d in _SYSTEM_DIRS if os.path.isdir(d))


def _is_root() -> bool:
    return os.geteuid() == 0


_probe_lock = threading.Lock()
_probe_cache: dict[tuple, tuple[bool, str]] = {}
_fallback_warned = False


def _fresh_uid() -> int:
    """A uid (and gid) no account uses: the program's processes are then the only ones counted
    by RLIMIT_NPROC, and it can signal nothing it did not start itself."""
    return (1 << 30) + secrets.randbelow(1 << 30)


# ---------------------------------------------------------------------------------------------
# Sandbox
# ---------------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """Options of a run; :meth:`run` executes one program. Thread-safe: runs are independent."""

    timeout_s: float = 10.0  # wall clock, from launch to exit
    memory_mb: int = 1024  # RLIMIT_AS of the program (and of each child it forks)
    max_output_bytes: int = 1 << 20  # per stream; beyond it the run is killed (output_limit)
    max_file_mb: int = 64  # RLIMIT_FSIZE, and the size of each tmpfs (/work, /tmp, /dev/shm)
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_open_files: int = 1024  # RLIMIT_NOFILE
    isolation: str = "auto"  # "auto" | "bwrap" | "rlimits"
    python: str | None = None  # interpreter to run; default: the base interpreter of this Python
    allow_site_packages: bool = False  # run without -S (only useful with a custom ``python``)
    bwrap: str | None = None  # path of bwrap; default: found on PATH
    tmp_root: str | None = None  # where run directories are made; default: tempfile.gettempdir()
    env: dict[str, str] = field(default_factory=dict)  # extra variables for the program

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, not {self.isolation!r}")
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_output_bytes <= 0:
            raise ValueError("timeout_s, memory_mb and max_output_bytes must be positive")

    # -- public ---------------------------------------------------------------------------------

    def run(self, code: str, stdin: str | bytes = "", args: Sequence[str] = ()) -> SandboxResult:
        """Run ``code`` as ``main.py`` with ``stdin`` and ``sys.argv[1:] == args``."""
        mode, reason = self._choose_isolation()
        if mode == "bwrap":
            return self._run(code, stdin, args, use_bwrap=True, run_as=_fresh_uid() if _is_root() else None)
        run_as = self._fallback_uid()
        res = self._run(code, stdin, args, use_bwrap=False, run_as=run_as)
        res.warning = reason
        if _is_root() and run_as is None:
            res.warning += (" The program ran as root (the interpreter is not reachable by other users), "
                            "where RLIMIT_NPROC does not apply.")
        return res

    # -- isolation choice -------------------------------------------------------------------------

    def _bwrap_path(self) -> str | None:
        return self.bwrap or shutil.which("bwrap") or shutil.which("bwrap", path=_BASE_PATH)

    def _choose_isolation(self) -> tuple[str, str | None]:
        if self.isolation == "rlimits":
            return "rlimits", _fallback_warning("rlimits-only isolation was requested")
        ok, why = self.bwrap_check()
        if ok:
            return "bwrap", None
        if self.isolation == "bwrap":
            raise SandboxUnavailable(why)
        return "rlimits", _fallback_warning(why)

    def bwrap_check(self) -> tuple[bool, str]:
        """(works, reason): whether bwrap can run this interpreter here. Probed once per process
        and configuration by running a trivial program through the real code path."""
        path = self._bwrap_path()
        if path is None:
            return False, "bubblewrap (bwrap) is not installed (see scripts/install_sandbox.sh)"
        key = ("bwrap", path, _interpreter(self.python), os.geteuid())
        with _probe_lock:
            if key not in _probe_cache:
                res = self._probe(use_bwrap=True, run_as=_fresh_uid() if _is_root() else None)
                if res.status == "ok":
                    _probe_cache[key] = (True, "")
                else:
                    detail = (res.stderr.strip() or res.status)[-500:]
                    _probe_cache[key] = (False, f"bubblewrap self-check failed ({path}): {detail}")
            return _probe_cache[key]

    def _fallback_uid(self) -> int | None:
        """A fresh uid for a rlimits-only run by root, if such a uid can run the interpreter
        (probed once per process: e.g. not when it lives under root's 0700 home)."""
        if not _is_root():
            return None
        key = ("rlimits-uid", _interpreter(self.python))
        with _probe_lock:
            if key not in _probe_cache:
                _probe_cache[key] = (self._probe(use_bwrap=False, run_as=_fresh_uid()).status == "ok", "")
            works = _probe_cache[key][0]
        return _fresh_uid() if works else None

    def _probe(self, *, use_bwrap: bool, run_as: int | None) -> SandboxResult:
        probe = Sandbox(timeout_s=20.0, memory_mb=max(self.memory_mb, 256), python=self.python,
                        allow_site_packages=self.allow_site_packages, bwrap=self.bwrap, tmp_root=self.tmp_root)
        res = probe._run("print('sandbox-ok')", "", (), use_bwrap=use_bwrap, run_as=run_as)
        if res.status == "ok" and res.stdout.strip() != "sandbox-ok":
            res.status = "sandbox_error"
        return res

    # -- one run ------------------------------------------------------------------------------

    def _rlimits(self) -> dict[str, tuple[int, int]]:
        cpu = math.ceil(self.timeout_s) + 1  # the wall clock normally fires first
        mb = 1 << 20
        return {
            "RLIMIT_AS": (self.memory_mb * mb,) * 2,
            "RLIMIT_CPU": (cpu, cpu + 1),  # soft: SIGXCPU, hard: SIGKILL
            "RLIMIT_FSIZE": (self.max_file_mb * mb,) * 2,
            "RLIMIT_NPROC": (self.max_processes,) * 2,
            "RLIMIT_NOFILE": (self.max_open_files,) * 2,
            "RLIMIT_CORE": (0, 0),
        }

    def _run(self, code: str, stdin: str | bytes, args: Sequence[str], *, use_bwrap: bool,
             run_as: int | None) -> SandboxResult:
        """One execution. ``run_as``: the uid (= gid) the supervisor switches the program to."""
        interp = _interpreter(self.python)
        flags = ["-I"] if self.allow_site_packages else ["-I", "-S"]
        stdin_bytes = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
        run_dir = tempfile.mkdtemp(prefix="distil-sandbox-", dir=self.tmp_root)
        # Write ends for the child: _execute closes (and removes) them once it has launched it,
        # since our copies would keep the pipes from ever reporting end-of-file.
        child_fds: list[int] = []
        our_fds: list[int] = []
        try:
            # The supervisor's status pipe, and bwrap's info pipe (it names the sandbox's init).
            status_r, status_w = os.pipe()
            our_fds.append(status_r)
            child_fds.append(status_w)
            info_r = info_w = None
            if use_bwrap:
                info_r, info_w = os.pipe()
                our_fds.append(info_r)
                child_fds.append(info_w)
            code_path = os.path.join(run_dir, "main.py")
            with open(code_path, "w", encoding="utf-8") as f:
                f.write(code)
            os.chmod(code_path, 0o644)
            if use_bwrap:
                inner_code, work = _SANDBOX_CODE, _SANDBOX_WORK
            else:
                inner_code, work = code_path, os.path.join(run_dir, "work")
                os.mkdir(work, 0o700)
                if run_as is not None:
                    os.chmod(run_dir, 0o755)
                    os.chown(work, run_as, run_as)
            env = {"PATH": _BASE_PATH, "HOME": work, "LANG": "C.UTF-8", "TMPDIR": "/tmp" if use_bwrap else work,
                   **self.env}
            run_id = secrets.token_hex(8)
            spec = {
                "status_fd": status_w,
                "rlimits": self._rlimits(),
                "uid": run_as,
                "gid": run_as,
                "argv": [interp.executable, *flags, inner_code, *map(str, args)],
            }
            supervisor = [interp.executable, "-I", "-S", "-c", _SUPERVISOR, json.dumps(spec)]
            if use_bwrap:
                argv = self._bwrap_argv(interp, code_path, env, info_w, root=_is_root()) + supervisor
                # bwrap gets no secrets either: its init process is readable from inside.
                launch_env, cwd = {"PATH": _BASE_PATH, "LANG": "C.UTF-8"}, "/"
            else:
                argv = supervisor
                launch_env, cwd = {**env, _RUN_MARKER_VAR: run_id}, work
            return _execute(argv, launch_env, cwd, child_fds, stdin_bytes, status_r, info_r, self, use_bwrap, run_id)
        finally:
            for fd in child_fds + our_fds:
                _close_quietly(fd)
            _rmtree(run_dir)

    def _bwrap_argv(self, interp: _Interpreter, code_path: str, env: dict[str, str], info_fd: int, *,
                    root: bool) -> list[str]:
        size = str(self.max_file_mb << 20)
        a = [self._bwrap_path() or "bwrap",
             "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--hostname", "sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
        if root:
            # No user namespace (see the module docstring). bwrap run by root would keep all of
            # root's capabilities; the supervisor needs exactly the two that switch the program
            # to a fresh uid, and the switch clears them. bwrap also sets no_new_privs, so no
            # setuid or file-capability binary can hand any capability back.
            a += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            a += ["--unshare-user", "--disable-userns"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        a += ["--perms", "0755", "--dir", "/etc"]
        for f in _ETC_FILES:
            a += ["--ro-bind-try", f, f]
        made = {"/"}
        for m in interp.mounts:
            # bwrap creates missing parents as 0700 root: make them traversable for the program.
            parents = []
            p = os.path.dirname(m)
            while p not in made:
                parents.append(p)
                p = os.path.dirname(p)
            for p in reversed(parents):
                a += ["--perms", "0755", "--dir", p]
                made.add(p)
            a += ["--ro-bind", m, m]
        a += ["--proc", "/proc", "--dev", "/dev",
              "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
              "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
              "--perms", "0777", "--size", size, "--tmpfs", _SANDBOX_WORK,
              "--perms", "0755", "--dir", os.path.dirname(_SANDBOX_CODE),
              "--ro-bind", code_path, _SANDBOX_CODE,
              "--chdir", _SANDBOX_WORK, "--clearenv"]
        for k, v in env.items():
            a += ["--setenv", k, v]
        return a + ["--"]


def run_python(code: str, stdin: str | bytes = "", *, timeout_s: float = 10.0, memory_mb: int = 1024,
               max_output_bytes: int = 1 << 20, isolation: str = "auto", args: Sequence[str] = (),
               **options) -> SandboxResult:
    """Run ``code`` (a Python program) on ``stdin`` in a sandbox; see the module docstring.

    ``options`` are the other :class:`Sandbox` fields (``max_file_mb``, ``max_processes``,
    ``python``, ``tmp_root``, ...). ``args`` become ``sys.argv[1:]``.
    """
    sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                      isolation=isolation, **options)
    return sandbox.run(code, stdin, args)


def bwrap_status(**options) -> tuple[bool, str]:
    """(works, reason) for bubblewrap with these :class:`Sandbox` options."""
    return Sandbox(**options).bwrap_check()


def _fallback_warning(reason: str) -> str:
    global _fallback_warned
    msg = (f"SANDBOX DEGRADED: running untrusted code with rlimits only ({reason}). There is no "
           "filesystem, network or process isolation; install bubblewrap (scripts/install_sandbox.sh).")
    with _probe_lock:
        first, _fallback_warned = not _fallback_warned, True
    if first:
        log.warning(msg)
    return msg


# ---------------------------------------------------------------------------------------------
# Process handling
# ---------------------------------------------------------------------------------------------


def _execute(argv: list[str], launch_env: dict[str, str], cwd: str, child_fds: list[int], stdin_bytes: bytes,
             status_r: int, info_r: int | None, cfg: Sandbox, use_bwrap: bool, run_id: str) -> SandboxResult:
    isolation = "bwrap" if use_bwrap else "rlimits-only"
    t0 = time.monotonic()
    try:
        # A new session: the launched process leads its own process group, which is killed whole.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=launch_env, cwd=cwd, pass_fds=child_fds, start_new_session=True)
    except OSError as e:
        return SandboxResult("sandbox_error", "", f"could not launch the sandbox: {e}", None,
                             time.monotonic() - t0, isolation)
    while child_fds:
        os.close(child_fds.pop())
    tree = _ProcessTree(proc, use_bwrap, run_id)
    try:
        pump = _StreamPump(proc, stdin_bytes, status_r, info_r, cfg.max_output_bytes)
        killed_for = pump.pump(t0 + cfg.timeout_s, tree)
        tree.kill()
        pump.drain()
    finally:
        tree.kill()  # idempotent; here for an exception (e.g. KeyboardInterrupt) in the loop
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
    wall = time.monotonic() - t0
    stdout = pump.out[1][: cfg.max_output_bytes].decode("utf-8", errors="replace")
    stderr = pump.out[2][: cfg.max_output_bytes].decode("utf-8", errors="replace")
    events = _parse_events(pump.status)
    res = SandboxResult("runtime_error", stdout, stderr, None, wall, isolation)
    exit_ev = events.get("exit")
    if exit_ev is not None:
        res.cpu_s = float(exit_ev.get("cpu_s", 0.0))
        res.peak_rss_mb = float(exit_ev.get("maxrss_kb", 0)) / 1024.0
    if killed_for:
        res.status = killed_for
        return res
    if "setup_failed" in events or "started" not in events:
        res.status = "sandbox_error"
        why = events.get("setup_failed", {}).get("error") or f"launcher exited with {proc.returncode}"
        res.stderr = (stderr + "\n" if stderr else "") + f"[sandbox] could not start the program: {why}"
        return res
    if exit_ev is None:
        # The supervisor vanished (the program killed it, or the sandbox's init died).
        res.stderr += "\n[sandbox] the program's supervisor ended before the program did"
        return res
    ws = int(exit_ev["wait_status"])
    if os.WIFSIGNALED(ws):
        res.signal = os.WTERMSIG(ws)
        res.returncode = -res.signal
    else:
        res.returncode = os.waitstatus_to_exitcode(ws)
    res.status = _classify(res, cfg.memory_mb)
    return res


_MEMORY_LINE = re.compile(r"MemoryError|Cannot allocate memory|out of memory|bad_alloc", re.IGNORECASE)


def _classify(res: SandboxResult, memory_mb: int) -> str:
    if res.returncode == 0:
        return "ok"
    if res.signal == signal.SIGXCPU:
        return "timeout"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if lines and _MEMORY_LINE.search(lines[-1]):
        return "memory_limit"
    memory_signals = (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
    if res.signal in memory_signals and (res.peak_rss_mb or 0.0) >= 0.8 * memory_mb:
        return "memory_limit"
    return "runtime_error"


def _parse_events(raw: bytes) -> dict[str, dict]:
    events: dict[str, dict] = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("event"), str):
            events.setdefault(ev["event"], ev)
    return events


class _StreamPump:
    """Feeds stdin and reads stdout/stderr (each capped), the supervisor's status pipe and bwrap's
    info pipe, all from one thread with a selector, until everything is closed, the deadline
    passes or an output cap is exceeded. Never holds more than cap + one read per stream."""

    _CHUNK = 1 << 16

    def __init__(self, proc: subprocess.Popen, stdin_bytes: bytes, status_r: int, info_r: int | None,
                 cap: int):
        self.proc, self.cap = proc, cap
        self.out = {1: bytearray(), 2: bytearray()}
        self.status = bytearray()
        self.info = bytearray()
        self._stdin = memoryview(stdin_bytes)
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ, 1)
        self.sel.register(proc.stderr, selectors.EVENT_READ, 2)
        self.sel.register(status_r, selectors.EVENT_READ, "status")
        if info_r is not None:
            self.sel.register(info_r, selectors.EVENT_READ, "info")
        if len(self._stdin):
            os.set_blocking(proc.stdin.fileno(), False)
            self.sel.register(proc.stdin, selectors.EVENT_WRITE, 0)
        else:
            proc.stdin.close()

    def pump(self, deadline: float, tree: "_ProcessTree") -> str | None:
        """Returns "timeout" / "output_limit" when the run must be killed for that, else None."""
        exited_at = None
        try:
            while self.sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return "timeout"
                if exited_at is None and self.proc.poll() is not None:
                    exited_at = now
                # After the launcher exits only leftovers (possible in the fallback) can keep
                # the pipes open: give them a moment to flush, then stop waiting.
                if exited_at is not None and now - exited_at > 0.25:
                    return None
                for key, _ in self.sel.select(min(deadline - now, 0.1)):
                    if self._handle(key, tree) == "output_limit":
                        return "output_limit"
            return None
        finally:
            if not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

    def _handle(self, key, tree: "_ProcessTree") -> str | None:
        tag = key.data
        if tag == 0:
            try:
                n = os.write(key.fd, self._stdin[: self._CHUNK])
                self._stdin = self._stdin[n:]
            except BlockingIOError:
                return None
            except OSError:  # the program closed its stdin: what it did not read is dropped
                self._stdin = self._stdin[:0]
            if not len(self._stdin):
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
            return None
        try:
            data = os.read(key.fd, self._CHUNK)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(key.fileobj)
            return None
        if tag == "status":
            self.status += data[: 1 << 16]
        elif tag == "info":
            self.info += data[: 1 << 12]
            tree.learn_init(self.info)
        else:
            buf = self.out[tag]
            buf += data[: self.cap + 1 - len(buf)] if len(buf) <= self.cap else b""
            if len(buf) > self.cap:
                return "output_limit"
        return None

    def drain(self) -> None:
        """After the kill: collect what is still buffered in the pipes (the status report in
        particular), without ever blocking."""
        for key in list(self.sel.get_map().values()):
            if key.data == 0:
                continue
            os.set_blocking(key.fd, False)
            for _ in range(64):
                try:
                    data = os.read(key.fd, self._CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if key.data == "status":
                    self.status += data[: 1 << 16]
                elif key.data in (1, 2) and len(self.out[key.data]) <= self.cap:
                    self.out[key.data] += data[: self.cap + 1 - len(self.out[key.data])]
        self.sel.close()


class _ProcessTree:
    """Everything a run started, and how to kill all of it.

    bwrap: the launcher process group (bwrap's monitor) and the sandbox's init process, found
    through ``--info-fd`` and held as a pidfd; when init dies the kernel kills every other
    process of the PID namespace and init's exit completes only after they are gone, so waiting
    for it is waiting for the whole tree. Fallback: the process group, plus a sweep for processes
    whose initial environment carries this run's marker (catches ``setsid()`` escapees)."""

    def __init__(self, proc: subprocess.Popen, use_bwrap: bool, run_id: str):
        self.proc, self.use_bwrap, self.run_id = proc, use_bwrap, run_id
        self.init_pidfd: int | None = None
        self._learned = False
        self._done = False

    def learn_init(self, info: bytes) -> None:
        if self._learned:
            return
        try:
            pid = int(json.loads(info.decode())["child-pid"])
        except (ValueError, KeyError, TypeError):
            return  # incomplete JSON so far
        self._learned = True
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return  # no pidfd support: --die-with-parent still takes init down with bwrap
        # Only trust it while it is still bwrap's child (it is, unless it already exited).
        if _parent_pid(pid) == self.proc.pid:
            self.init_pidfd = fd
        else:
            os.close(fd)

    def kill(self) -> None:
        """Kill everything and return once it is gone. Idempotent."""
        if self._done:
            return
        if self.init_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except (OSError, AttributeError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL cannot stop
            log.error("sandbox launcher %d did not die", self.proc.pid)
        if self.init_pidfd is not None:
            _wait_readable(self.init_pidfd, 10.0)  # readable once the process has exited
            os.close(self.init_pidfd)
            self.init_pidfd = None
        if not self.use_bwrap:
            _sweep_marked(f"{_RUN_MARKER_VAR}={self.run_id}".encode())
        self._done = True


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _wait_readable(fd: int, timeout: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        sel.select(timeout)


def _sweep_marked(marker: bytes, rounds: int = 20) -> None:
    """Kill every process whose initial environment contains ``marker`` (fallback mode only),
    repeating until none is left, since a survivor could still be forking."""
    me = os.getpid()
    for _ in range(rounds):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                os.kill(int(name), signal.SIGKILL)
                found = True
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.02)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _rmtree(path: str) -> None:
    """Remove a run directory even if the program made parts of it unreadable (same uid)."""

    def fix(func, p, exc_info):
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
            try:
                os.chmod(os.path.dirname(p), 0o700)
                if os.path.isdir(p) and not os.path.islink(p):
                    os.chmod(p, 0o700)
                    shutil.rmtree(p, onerror=fix)
                else:
                    os.unlink(p)
                return
            except OSError:
                pass
        log.warning("could not remove sandbox path %s: %s", p, exc)

    shutil.rmtree(path, onerror=fix)
