"""The :class:`Sandbox` and the entry points :func:`run_python` and :func:`bwrap_status`: the
options of a run, the choice of isolation (bwrap or the rlimits-only fallback) with its
once-per-process self-checks, and one run end to end: the run directory, the supervisor's spec,
the bwrap command line and the clean-up. The warnings a degraded run carries (and logs once) are
made here too."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
from typing import Any, Iterator, Sequence

from .cgroup import _CGROUP_PREFIX, _Cgroup
from .sweep import RUN_DIR_PREFIX, owner_tag
from .host import _SYSTEM_DIRS, _fresh_uid, _Interpreter, _interpreter, _is_root
from .limits import RUN_MARKER_VAR, Launch, ReportPipes, SandboxLimits, SandboxSettings, split_sandbox_options
from .process import execute
from .results import SandboxResult, SandboxUnavailable
from .seccomp import _seccomp_for_host
from .session import SandboxSession
from .forkserver import _FORKSERVER
from .supervisor import _SUPERVISOR

log = logging.getLogger(__package__)  # one logger for the whole sandbox package

# Where the code and its working directory appear inside the bwrap sandbox.
_SANDBOX_CODE = "/sandbox/main.py"
_SANDBOX_WORK = "/work"
# The only parts of /etc the interpreter needs (the dynamic linker's cache, and time zones).
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"

# Process-wide state: self-check results, and which warnings have been logged already.
_probe_lock = threading.Lock()
_probe_cache: dict[tuple, tuple[bool, str]] = {}
_fallback_warned = False
_log_lock = threading.Lock()  # (not _probe_lock: runs log while a probe holds that one)
_logged_once: set[str] = set()  # warnings this process has logged


class Sandbox:
    """The options of a run: ``limits`` (:class:`SandboxLimits`) and ``settings``
    (:class:`SandboxSettings`); :meth:`run` executes one program. Thread-safe: runs are
    independent.

    Any field of either record may also be given by keyword (``Sandbox(timeout_s=5,
    isolation="rlimits")``); it replaces that field of ``limits`` / ``settings`` (or of the
    defaults)."""

    def __init__(self, limits: SandboxLimits | None = None, settings: SandboxSettings | None = None,
                 **options: Any):
        limit_options, setting_options = split_sandbox_options(options)
        limits = limits if limits is not None else SandboxLimits()
        settings = settings if settings is not None else SandboxSettings()
        self.limits = dataclasses.replace(limits, **limit_options) if limit_options else limits
        self.settings = dataclasses.replace(settings, **setting_options) if setting_options else settings

    def __repr__(self) -> str:
        return f"Sandbox(limits={self.limits!r}, settings={self.settings!r})"

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

    def session(self, code: str, setup: str = "", args: Sequence[str] = ()) -> SandboxSession:
        """A sandbox that runs ``code`` (as ``main.py``, ``sys.argv[1:] == args``) once per
        :meth:`SandboxSession.run`, each run contained and classified as by :meth:`run`.
        ``setup`` runs once, before any run, in the program's response server, *not confined*:
        trusted code only (imports, compiling the untrusted program); its globals are the
        program's. :meth:`SandboxSession.unload` and :meth:`SandboxSession.load` replace the
        program (the same sandbox then serves the next one)."""
        session = self.spare_session(args=args)
        session.load(code, setup, args)
        return session

    def spare_session(self, preload: str = "", args: Sequence[str] = ()) -> SandboxSession:
        """A session started now, whose program comes later (:meth:`SandboxSession.load`): the
        sandbox and its interpreter start (and ``preload``, trusted imports, runs) while the
        caller does something else. Nothing runs in it before the load. Under bwrap the session
        dies with the *thread* that started it (``--die-with-parent``): start a session that is to
        outlive its thread from a long-lived one."""
        mode, reason = self._choose_isolation()
        if mode == "bwrap":
            return SandboxSession(self, preload, args, use_bwrap=True, run_as=_fresh_uid() if _is_root() else None,
                                  warning=None)
        run_as = self._fallback_uid()
        root_note = None
        if _is_root() and run_as is None:
            root_note = ("The program ran as root (the interpreter is not reachable by other users), "
                         "where RLIMIT_NPROC does not apply.")
        return SandboxSession(self, preload, args, use_bwrap=False, run_as=run_as,
                              warning=_join_warnings(reason, root_note))

    # -- isolation choice -------------------------------------------------------------------------

    def _bwrap_path(self) -> str | None:
        return self.settings.bwrap or shutil.which("bwrap") or shutil.which("bwrap", path=_BASE_PATH)

    def _choose_isolation(self) -> tuple[str, str | None]:
        if self.settings.isolation == "rlimits":
            return "rlimits", _fallback_warning("rlimits-only isolation was requested")
        ok, why = self.bwrap_check()
        if ok:
            return "bwrap", None
        if self.settings.isolation == "bwrap":
            raise SandboxUnavailable(why)
        return "rlimits", _fallback_warning(why)

    def bwrap_check(self) -> tuple[bool, str]:
        """(works, reason): whether bwrap can run this interpreter here. Probed once per process
        and configuration by running a trivial program through the real code path."""
        path = self._bwrap_path()
        if path is None:
            return False, "bubblewrap (bwrap) is not installed (see scripts/install_sandbox.sh)"
        key = ("bwrap", path, _interpreter(self.settings.python), os.geteuid())
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
        key = ("rlimits-uid", _interpreter(self.settings.python))
        with _probe_lock:
            if key not in _probe_cache:
                _probe_cache[key] = (self._probe(use_bwrap=False, run_as=_fresh_uid()).status == "ok", "")
            works = _probe_cache[key][0]
        return _fresh_uid() if works else None

    def _probe(self, *, use_bwrap: bool, run_as: int | None) -> SandboxResult:
        # The same interpreter and containment, with default limits roomy enough for a start-up.
        limits = SandboxLimits(timeout_s=20.0, memory_mb=max(self.limits.memory_mb, 256))
        probe = Sandbox(limits, dataclasses.replace(self.settings, isolation="auto", env={}))
        res = probe._run("print('sandbox-ok')", "", (), use_bwrap=use_bwrap, run_as=run_as)
        if res.status == "ok" and res.stdout.strip() != "sandbox-ok":
            res.status = "sandbox_error"
        return res

    # -- one run ------------------------------------------------------------------------------

    def _make_cgroup(self, run_id: str) -> tuple[_Cgroup | None, str | None]:
        """The run's cgroup, or None and the warning for the result."""
        if not self.settings.use_cgroup:
            return None, "No cgroup limits this run (use_cgroup=False): " + _NO_CGROUP_EFFECT
        cgroup, why = _Cgroup.create(f"{_CGROUP_PREFIX}{owner_tag()}-{run_id}", self.limits.cgroup_memory_bytes(),
                                     self.limits.cgroup_max_tasks())
        if cgroup is None:
            return None, _log_once(f"SANDBOX DEGRADED: no cgroup limits this run ({why}): {_NO_CGROUP_EFFECT}")
        return cgroup, None

    def _run(self, code: str, stdin: str | bytes, args: Sequence[str], *, use_bwrap: bool,
             run_as: int | None) -> SandboxResult:
        """One execution. ``run_as``: the uid (= gid) the supervisor switches the program to."""
        stdin_bytes = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
        with self._launch(code, stdin_bytes, args, use_bwrap=use_bwrap, run_as=run_as) as (launch, cgroup, warning, _):
            res = execute(launch, self.limits, cgroup)
            res.warning = _join_warnings(res.warning, warning)
            return res

    @contextlib.contextmanager
    def _launch(self, code: str, stdin: bytes, args: Sequence[str], *, use_bwrap: bool, run_as: int | None,
                preload: str | None = None) -> Iterator[tuple[Launch, _Cgroup | None, str | None, str]]:
        """The run directory, cgroup, report pipes and command line of one launch, all removed
        when the context ends: (launch, cgroup, warnings, run directory). ``preload`` not None: a
        session's fork server (:mod:`.forkserver`), whose program is loaded later."""
        interp = _interpreter(self.settings.python)
        flags = ["-I"] if self.settings.allow_site_packages else ["-I", "-S"]
        # the caller's pid in the names: what a later caller sweeps if this one is killed (sweep.py)
        run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{owner_tag()}-", dir=self.settings.tmp_root)
        run_id = secrets.token_hex(8)
        cgroup = pipes = None
        owner = os.getpid()
        try:
            cgroup, cgroup_warning = self._make_cgroup(run_id)
            abi, seccomp = _seccomp_for_host()
            seccomp_warning = None if abi else _log_once(
                f"SANDBOX DEGRADED: no seccomp filter for this architecture ({os.uname().machine}): the program "
                "may create user namespaces, use kernel keyrings, io_uring, bpf and ptrace.")
            pipes = ReportPipes(with_info=use_bwrap)
            code_path = os.path.join(run_dir, "main.py")
            files = {code_path: code} if preload is None else {code_path: "", os.path.join(run_dir, "setup.py"): ""}
            for path, text in files.items():
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(path, 0o644)
            if use_bwrap:
                inner_code, work = _SANDBOX_CODE, _SANDBOX_WORK
            else:
                inner_code, work = code_path, os.path.join(run_dir, "work")
                os.mkdir(work, 0o700)
                if run_as is not None:
                    os.chmod(run_dir, 0o755)
                    os.chown(work, run_as, run_as)
            env = {"PATH": _BASE_PATH, "HOME": work, "LANG": "C.UTF-8", "TMPDIR": "/tmp" if use_bwrap else work,
                   **self.settings.env}
            confinement = {
                "status_fd": pipes.status_w,
                "keyctl_nr": abi.nr["keyctl"] if abi else None,
                "seccomp": seccomp,
            }
            if preload is None:
                spec = {**confinement, "rlimits": self.limits.rlimits(), "uid": run_as, "gid": run_as,
                        "subreaper": not use_bwrap, "argv": [interp.executable, *flags, inner_code, *map(str, args)]}
                program = _SUPERVISOR
            else:
                # (rlimits and time limits come with each request)
                spec = {**confinement, "switch_uid": run_as is not None, "code_file": inner_code,
                        "setup_file": os.path.join(os.path.dirname(inner_code), "setup.py"),
                        "preload": preload, "work": work,
                        "clean": [work, "/tmp", "/dev/shm"] if use_bwrap else [work],
                        "chown_work": not use_bwrap and run_as is not None,
                        "clone_nr": abi.nr["clone"] if abi else None}
                program = _FORKSERVER
            supervisor = [interp.executable, "-I", "-S", "-c", program, json.dumps(spec)]
            if preload is not None:
                # (unused by the server: its forked runs inherit its command line, which then
                # names the program's arguments, as a run of its own does)
                supervisor += map(str, args)
            if use_bwrap:
                argv = self._bwrap_argv(interp, code_path, env, pipes.info_w, root=_is_root(),
                                        session=preload is not None) + supervisor
                # bwrap gets no secrets either: its init process is readable from inside.
                launch_env, cwd = {"PATH": _BASE_PATH, "LANG": "C.UTF-8"}, "/"
            else:
                argv = supervisor
                launch_env, cwd = {**env, RUN_MARKER_VAR: run_id}, work
            launch = Launch(tuple(argv), launch_env, cwd, stdin, use_bwrap, run_id, pipes)
            yield launch, cgroup, _join_warnings(cgroup_warning, seccomp_warning), run_dir
        finally:
            if pipes is not None:
                pipes.close()
            # A forked copy of this process that drops its copy of a session (its garbage
            # collector closes this generator) must leave the session to its owner.
            if os.getpid() == owner:
                if cgroup is not None:
                    cgroup.kill()  # (a no-op after a normal run; here for an exception on the way)
                    cgroup.remove()
                _rmtree(run_dir)

    def _bwrap_argv(self, interp: _Interpreter, code_path: str, env: dict[str, str], info_fd: int, *,
                    root: bool, session: bool = False) -> list[str]:
        size = str(self.limits.max_file_mb << 20)
        a = [self._bwrap_path() or "bwrap",
             "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--hostname", "sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
        if root:
            # No user namespace (see the package docstring). bwrap run by root would keep all of
            # root's capabilities; the supervisor needs exactly the two that switch the program
            # to a fresh uid, and the switch clears them. bwrap also sets no_new_privs, so no
            # setuid or file-capability binary can hand any capability back.
            a += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            if session:
                # A session's fork server gives each test a fresh uid of its own, and must be
                # able to kill what that uid leaves running (kill(2) across uids needs CAP_KILL;
                # in the sandbox's PID namespace it reaches nothing outside).
                a += ["--cap-add", "CAP_KILL"]
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
              *(["--ro-bind", os.path.join(os.path.dirname(code_path), "setup.py"),
                 os.path.join(os.path.dirname(_SANDBOX_CODE), "setup.py")] if session else []),
              "--chdir", _SANDBOX_WORK, "--clearenv"]
        for k, v in env.items():
            a += ["--setenv", k, v]
        return a + ["--"]


def run_python(code: str, stdin: str | bytes = "", *, timeout_s: float = 10.0, memory_mb: int = 1024,
               max_output_bytes: int = 1 << 20, isolation: str = "auto", args: Sequence[str] = (),
               **options) -> SandboxResult:
    """Run ``code`` (a Python program) on ``stdin`` in a sandbox; see the package docstring.

    ``options`` are the other fields of :class:`SandboxLimits` and :class:`SandboxSettings`
    (``max_file_mb``, ``max_processes``, ``python``, ``tmp_root``, ...). ``args`` become
    ``sys.argv[1:]``.
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
