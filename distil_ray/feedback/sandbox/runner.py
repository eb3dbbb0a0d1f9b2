"""The :class:`Sandbox` and the entry points :func:`run_python` and :func:`bwrap_status`: the
options of a run, the choice of isolation (bwrap or the rlimits-only fallback) with its
once-per-process self-checks, and one run end to end: the run directory, the supervisor's spec,
the bwrap command line and the clean-up. The warnings a degraded run carries (and logs once) are
made here too."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Sequence

from .cgroup import _CGROUP_PREFIX, _Cgroup
from .host import _SYSTEM_DIRS, _fresh_uid, _Interpreter, _interpreter, _is_root
from .process import _RUN_MARKER_VAR, _execute
from .results import ISOLATION_MODES, SandboxResult, SandboxUnavailable
from .seccomp import _seccomp_for_host
from .supervisor import _SUPERVISOR

log = logging.getLogger(__package__)  # one logger for the whole sandbox package

# Where the code and its working directory appear inside the bwrap sandbox.
_SANDBOX_CODE = "/sandbox/main.py"
_SANDBOX_WORK = "/work"
# The only parts of /etc the interpreter needs (the dynamic linker's cache, and time zones).
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Processes of the sandbox itself in a run's cgroup: bwrap's monitor, the namespace's init and the
# supervisor (only the supervisor in the fallback).
_SANDBOX_TASKS = 3
# Memory of those processes, on top of the program's budget in the run's cgroup limit.
_CGROUP_SLACK_MB = 32

# Process-wide state: self-check results, and which warnings have been logged already.
_probe_lock = threading.Lock()
_probe_cache: dict[tuple, tuple[bool, str]] = {}
_fallback_warned = False
_log_lock = threading.Lock()  # (not _probe_lock: runs log while a probe holds that one)
_logged_once: set[str] = set()  # warnings this process has logged


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
    use_cgroup: bool = True  # cap the run's total memory and tasks with a per-run cgroup, if possible

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
        root_note = None
        if _is_root() and run_as is None:
            root_note = ("The program ran as root (the interpreter is not reachable by other users), "
                         "where RLIMIT_NPROC does not apply.")
        res.warning = _join_warnings(reason, root_note, res.warning)
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
                        allow_site_packages=self.allow_site_packages, bwrap=self.bwrap, tmp_root=self.tmp_root,
                        use_cgroup=self.use_cgroup)
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

    def _cgroup_memory_bytes(self) -> int:
        """The run's total: the program's budget, its three tmpfs mounts (in the fallback the same
        budget covers host tmpfs files), and the sandbox's own processes."""
        return (self.memory_mb + 3 * self.max_file_mb + _CGROUP_SLACK_MB) << 20

    def _make_cgroup(self, run_id: str) -> tuple[_Cgroup | None, str | None]:
        """The run's cgroup, or None and the warning for the result."""
        if not self.use_cgroup:
            return None, "No cgroup limits this run (use_cgroup=False): " + _NO_CGROUP_EFFECT
        cgroup, why = _Cgroup.create(_CGROUP_PREFIX + run_id, self._cgroup_memory_bytes(),
                                     self.max_processes + _SANDBOX_TASKS)
        if cgroup is None:
            return None, _log_once(f"SANDBOX DEGRADED: no cgroup limits this run ({why}): {_NO_CGROUP_EFFECT}")
        return cgroup, None

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
        run_id = secrets.token_hex(8)
        cgroup = None
        try:
            cgroup, cgroup_warning = self._make_cgroup(run_id)
            abi, seccomp = _seccomp_for_host()
            seccomp_warning = None if abi else _log_once(
                f"SANDBOX DEGRADED: no seccomp filter for this architecture ({os.uname().machine}): the program "
                "may create user namespaces, use kernel keyrings, io_uring, bpf and ptrace.")
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
            spec = {
                "status_fd": status_w,
                "rlimits": self._rlimits(),
                "uid": run_as,
                "gid": run_as,
                "keyctl_nr": abi.nr["keyctl"] if abi else None,
                "seccomp": seccomp,
                "subreaper": not use_bwrap,
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
            res = _execute(argv, launch_env, cwd, child_fds, stdin_bytes, status_r, info_r, self, use_bwrap, run_id,
                           cgroup)
            res.warning = _join_warnings(res.warning, cgroup_warning, seccomp_warning)
            return res
        finally:
            for fd in child_fds + our_fds:
                _close_quietly(fd)
            if cgroup is not None:
                cgroup.kill()  # (a no-op after a normal run; here for an exception on the way)
                cgroup.remove()
            _rmtree(run_dir)

    def _bwrap_argv(self, interp: _Interpreter, code_path: str, env: dict[str, str], info_fd: int, *,
                    root: bool) -> list[str]:
        size = str(self.max_file_mb << 20)
        a = [self._bwrap_path() or "bwrap",
             "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--hostname", "sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
        if root:
            # No user namespace (see the package docstring). bwrap run by root would keep all of
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
    """Run ``code`` (a Python program) on ``stdin`` in a sandbox; see the package docstring.

    ``options`` are the other :class:`Sandbox` fields (``max_file_mb``, ``max_processes``,
    ``python``, ``tmp_root``, ...). ``args`` become ``sys.argv[1:]``.
    """
    sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                      isolation=isolation, **options)
    return sandbox.run(code, stdin, args)


def bwrap_status(**options) -> tuple[bool, str]:
    """(works, reason) for bubblewrap with these :class:`Sandbox` options."""
    return Sandbox(**options).bwrap_check()


_NO_CGROUP_EFFECT = ("the memory of all its processes together, and of its tmpfs files and memfds, is not "
                     "capped (RLIMIT_AS binds each process alone); RLIMIT_NPROC alone bounds its processes.")


def _join_warnings(*parts: str | None) -> str | None:
    return " ".join(p for p in parts if p) or None


def _log_once(msg: str) -> str:
    """``logging.warning(msg)`` the first time this process sees ``msg``; returns ``msg``."""
    with _log_lock:
        first = msg not in _logged_once
        _logged_once.add(msg)
    if first:
        log.warning(msg)
    return msg


def _fallback_warning(reason: str) -> str:
    global _fallback_warned
    msg = (f"SANDBOX DEGRADED: running untrusted code with rlimits only ({reason}). There is no "
           "filesystem, network or process isolation; install bubblewrap (scripts/install_sandbox.sh).")
    with _probe_lock:
        first, _fallback_warned = not _fallback_warned, True
    if first:
        log.warning(msg)
    return msg


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
