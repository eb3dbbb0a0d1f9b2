"""A sandbox kept for many runs: :class:`SandboxSession`.

``Sandbox.session(code, setup=...)`` starts the sandbox once (bwrap or the fallback, cgroup,
seccomp, as :meth:`Sandbox.run` does) with the fork server of :mod:`.forkserver` as its
supervisor; each :meth:`SandboxSession.run` sends one input and gets back a
:class:`~.results.SandboxResult` classified exactly as a run of its own would be. What one run
leaves behind (processes, files in the working directories) is gone before the next starts, and
each run has a fresh uid of its own where the sandbox switches uids (run by root).

A session outlives its program: :meth:`SandboxSession.unload` ends it (its response server
exits, and the fork server forks a fresh one) and :meth:`SandboxSession.load` gives it the next,
so that one sandbox serves many responses without the start-up of a new one. Nothing of one
program reaches the next: neither a process, nor a file, nor its memory. What stays shared is the
sandbox's namespaces (what could carry state across them, System V IPC and POSIX message queues,
the seccomp filter refuses) and its cgroup (its memory and task limits bind one run at a time).

A run whose server dies or stops answering (the program killed it, the OOM killer took it)
leaves the session ``broken``: the caller opens a new one for the runs that are left."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import struct
import subprocess
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from .cgroup import _CgroupStats
from .limits import SandboxLimits
from .process import _classify, _ProcessTree
from .results import SandboxResult

if TYPE_CHECKING:  # (no import cycle: the runner imports this module)
    from .runner import Sandbox

# The host's own deadline for a run, past the run's time limit (the server enforces that one): the
# server needs a moment to kill, wipe and report; its first run also waits for the sandbox to start.
_REPLY_GRACE_S = 2.0
_START_GRACE_S = 20.0
_DIAGNOSTICS_CAP = 1 << 16  # what the server and bwrap themselves write on stdout / stderr


class SandboxSession:
    """One sandbox that runs ``code`` once per :meth:`run` (see the module docstring). Use it as
    a context manager, or call :meth:`close`. Not thread-safe: one run at a time."""

    def __init__(self, sandbox: "Sandbox", preload: str, args: Sequence[str] = (), *, use_bwrap: bool,
                 run_as: int | None, warning: str | None):
        self.limits = sandbox.limits
        self.broken = False
        self._started = False
        self._stack = contextlib.ExitStack()
        self._status = bytearray()
        self._events: list[dict] = []
        self._diag = {1: bytearray(), 2: bytearray()}
        self.proc: subprocess.Popen | None = None
        self.loaded = False
        self.programs = 0  # programs loaded so far
        # Programs one after another only where each test runs as a uid of its own (run by root):
        # elsewhere a program shares its uid with the servers and could disturb the next one's.
        self.reusable = run_as is not None
        self._pending = bytearray()  # the load request, sent with the first run's
        self._oom_base: int | None = None  # the cgroup's OOM kills before the current run
        self._owner = os.getpid()
        try:
            launch, cgroup, launch_warning, run_dir = self._stack.enter_context(
                sandbox._launch("", b"", args, use_bwrap=use_bwrap, run_as=run_as, preload=preload))
            # where main.py appears to the program (runner._SANDBOX_CODE under bwrap)
            self._code_path = os.path.join(run_dir, "main.py")
            self._inner_code = "/sandbox/main.py" if use_bwrap else self._code_path
            self.isolation, self.cgroup = launch.isolation, cgroup
            self.warning = " ".join(w for w in (warning, launch_warning) if w) or None
            argv = list(launch.argv) if cgroup is None else cgroup.launcher(list(launch.argv))
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=dict(launch.env), cwd=launch.cwd,
                                         pass_fds=launch.pipes.child_ends(), start_new_session=True)
            launch.pipes.close_child_ends()
            self._tree = _ProcessTree(self.proc, launch, cgroup)
            self._stack.callback(self._shutdown)
            self._sel = selectors.DefaultSelector()
            self._sel.register(launch.pipes.status_r, selectors.EVENT_READ, "status")
            if launch.pipes.info_r is not None:
                self._info = bytearray()
                self._sel.register(launch.pipes.info_r, selectors.EVENT_READ, "info")
            for tag, f in ((1, self.proc.stdout), (2, self.proc.stderr)):
                self._sel.register(f, selectors.EVENT_READ, tag)
            os.set_blocking(self.proc.stdin.fileno(), False)
        except OSError as e:
            self._stack.close()
            self._start_error = f"could not launch the sandbox: {e}"
            self.broken = True
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "SandboxSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything the session started and remove its cgroup and run directory."""
        if os.getpid() == self._owner:  # (a forked copy of the caller owns none of it)
            self._stack.close()

    @property
    def usable(self) -> bool:
        """Whether a program can be loaded: none is, and its server has not ended, in this process."""
        return (not self.broken and not self.loaded and self.proc is not None and self.proc.poll() is None
                and os.getpid() == self._owner)

    def load(self, code: str, setup: str = "", args: Sequence[str] = ()) -> None:
        """Give the session its program: ``code`` becomes ``main.py`` and ``setup`` runs first, in
        a response server of its own (see :meth:`Sandbox.session`). A failure to load shows as the
        first run's ``sandbox_error``. :meth:`unload` ends it."""
        if self.loaded:
            raise RuntimeError("this session has a program already: unload() it first")
        self.loaded = True
        self.programs += 1
        if self.proc is None or self.broken:
            return
        # The files keep their inodes (truncated and rewritten): the sandbox's read-only bind
        # mounts show the new text.
        for path, text in ((self._code_path, code), (os.path.join(os.path.dirname(self._code_path), "setup.py"), setup)):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        argv = [self._inner_code, *map(str, args)]
        self._pending = bytearray(_frame({"load": True, "argv": argv}))

    def unload(self) -> None:
        """End the current program: its response server exits (its test processes are gone
        already) and the fork server forks a fresh one, which the next :meth:`load` gets."""
        if not self.loaded:
            return
        self._check_owner()
        self.loaded = False
        if self._pending:  # (loaded, never run: its server has not seen it)
            self._pending = bytearray()
            return
        if self.proc is None or self.broken:
            return
        try:
            os.write(self.proc.stdin.fileno(), _frame({"end": True}))  # (the pipe is empty between runs)
        except OSError:
            self.broken = True

    def _shutdown(self) -> None:
        try:
            self._tree.kill()
        finally:
            self._sel.close()
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass

    # -- one run --------------------------------------------------------------------------------

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise RuntimeError("a sandbox session belongs to the process that started it, not to a fork of it")

    def run(self, stdin: str | bytes = "", *, timeout_s: float | None = None,
            max_output_bytes: int | None = None) -> SandboxResult:
        """Run the program once on ``stdin``, under the session's limits (``timeout_s`` and
        ``max_output_bytes`` replace theirs for this run)."""
        self._check_owner()
        try:
            res = self._run(stdin, timeout_s, max_output_bytes)
        except BaseException:
            self.broken = True  # (a frame half sent, or a report half read: the pipes are out of step)
            raise
        return res

    def _run(self, stdin: str | bytes, timeout_s: float | None, max_output_bytes: int | None) -> SandboxResult:
        limits = self.limits
        if timeout_s is not None or max_output_bytes is not None:
            limits = replace(limits, timeout_s=timeout_s if timeout_s is not None else limits.timeout_s,
                             max_output_bytes=max_output_bytes or limits.max_output_bytes)
        if self.proc is None or self.broken:
            why = getattr(self, "_start_error", "the session is broken (a previous run ended its server)")
            return SandboxResult("sandbox_error", "", f"[sandbox] {why}", None, 0.0, getattr(self, "isolation", "?"))
        if not self.loaded:
            raise RuntimeError("load() the program first")
        data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
        head = {"timeout_s": limits.timeout_s, "cap": limits.max_output_bytes, "rlimits": limits.rlimits()}
        request = memoryview(bytes(self._pending) + _frame(head, data))
        self._pending = bytearray()
        base = self._memory_baseline()
        t0 = time.monotonic()
        deadline = t0 + limits.timeout_s + _REPLY_GRACE_S + (0.0 if self._started else _START_GRACE_S)
        try:  # (as a rule the whole request fits in the pipe: no need to wait until it can be written)
            request = request[os.write(self.proc.stdin.fileno(), request):]
        except BlockingIOError:
            pass
        except OSError:  # the server is gone: its status pipe says the rest
            request = request[:0]
        if len(request):
            self._sel.register(self.proc.stdin, selectors.EVENT_WRITE, "request")
        reply = None
        try:
            while reply is None:
                now = time.monotonic()
                if now >= deadline:
                    return self._fail("timeout", limits, t0, base)
                ready = self._sel.select(deadline - now)
                for key, _ in ready:
                    if key.data == "request":
                        try:
                            request = request[os.write(key.fd, request[: 1 << 16]):]
                        except BlockingIOError:
                            continue
                        except OSError:  # the server is gone: its status pipe says the rest
                            request = request[:0]
                        if not len(request):
                            self._sel.unregister(key.fileobj)
                        continue
                    if not self._read(key):
                        return self._fail(None, limits, t0, base)  # the status pipe closed: no server
                reply = self._take_reply()
        finally:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.proc.stdin)
        head, stdout, stderr = reply
        cap = limits.max_output_bytes  # (the server sends one byte more when a stream went past it)
        res = SandboxResult("runtime_error", stdout[:cap].decode("utf-8", errors="replace"),
                            stderr[:cap].decode("utf-8", errors="replace"), None, float(head["wall_s"]), self.isolation)
        res.warning = self.warning
        res.cgroup = self.cgroup.version if self.cgroup is not None else None
        res.cpu_s = float(head["cpu_s"])
        res.peak_rss_mb = float(head["maxrss_kb"]) / 1024.0
        res.phases = {**head.get("phases", {}), "round_trip": time.monotonic() - t0}
        res.forked_by = head.get("forked_by")  # ("server" or "spare": which process forked the run's)
        if head.get("unclean"):  # (the server could not wipe what the program left: it ends)
            self.broken = True
        if head.get("setup_error"):
            self.broken = True  # (whatever failed may fail the next run too: a new sandbox for it)
            res.status = "sandbox_error"
            res.stderr = (res.stderr + "\n" if res.stderr else "") + \
                f"[sandbox] could not start the program: {head['setup_error']}"
            return res
        if head.get("killed_for"):
            res.status = head["killed_for"]
            return res
        ws = int(head["wait_status"])
        if os.WIFSIGNALED(ws):
            res.signal = os.WTERMSIG(ws)
            res.returncode = -res.signal
        else:
            res.returncode = os.waitstatus_to_exitcode(ws)
        res.status = _classify(res, limits, self._memory_since(base, succeeded=res.returncode == 0))
        return res

    def _read(self, key) -> bool:
        """Read one ready pipe; False when the status pipe reached end of file."""
        try:
            data = os.read(key.fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(key.fileobj)
            return key.data != "status"
        if key.data == "status":
            self._status += data
        elif key.data == "info":
            self._info += data[: 1 << 12]
            self._tree.learn_init(self._info)
            if self._tree._learned:
                self._sel.unregister(key.fileobj)
        else:
            buf = self._diag[key.data]
            buf += data[: max(0, _DIAGNOSTICS_CAP - len(buf))]
        return True

    def _take_reply(self) -> tuple[dict, bytes, bytes] | None:
        """The next test report in the status pipe's buffer, once complete (start-up events are
        recorded on the way)."""
        while True:
            nl = self._status.find(b"\n")
            if nl < 0:
                return None
            try:
                head = json.loads(self._status[:nl])
            except ValueError:
                head = {}
            if head.get("event") != "test":
                del self._status[: nl + 1]
                self._events.append(head)
                self._started = self._started or head.get("event") == "started"
                continue
            n_out, n_err = int(head["out"]), int(head["err"])
            if len(self._status) < nl + 1 + n_out + n_err:
                return None
            body = bytes(self._status[nl + 1: nl + 1 + n_out + n_err])
            del self._status[: nl + 1 + n_out + n_err]
            return head, body[:n_out], body[n_out:]

    def _fail(self, killed_for: str | None, limits: SandboxLimits, t0: float,
              base: _CgroupStats | None) -> SandboxResult:
        """The server stopped answering (``killed_for="timeout"``) or is gone (None): end the
        session and say how the run ended."""
        self.broken = True
        memory = self._memory_since(base)
        self._tree.kill()
        for key in list(self._sel.get_map().values()):  # what is left in the pipes
            if key.data in (1, 2, "status"):
                os.set_blocking(key.fd, False)
                with contextlib.suppress(OSError):
                    while self._read(key) and key.fd in (k.fd for k in self._sel.get_map().values()):
                        pass
        self._take_reply()  # (records a late setup_failed)
        stderr = self._diag[2].decode("utf-8", errors="replace")
        res = SandboxResult("runtime_error", "", stderr, None, time.monotonic() - t0, self.isolation)
        res.warning = self.warning
        res.cgroup = self.cgroup.version if self.cgroup is not None else None
        failed = next((e for e in self._events if e.get("event") == "setup_failed"), None)
        if failed is not None or not self._started:
            why = (failed or {}).get("error") or f"launcher exited with {self.proc.poll()}"
            res.status = "sandbox_error"
            res.stderr = (stderr + "\n" if stderr else "") + f"[sandbox] could not start the program: {why}"
        elif memory is not None and memory.oom_kills:
            res.status = "memory_limit"
        elif killed_for is not None:
            res.status = killed_for
        else:
            res.stderr += "\n[sandbox] the program's supervisor ended before the program did"
        return res

    # -- the cgroup's memory counters, per run ----------------------------------------------------

    def _memory_baseline(self) -> _CgroupStats | None:
        """Counters before a run. v1 resets the peak and the limit hits (so only the OOM kills
        need a baseline, the previous run's count); v2 cannot: all its counters are read."""
        if self.cgroup is None:
            return None
        if self.cgroup.reset_counters():
            if self._oom_base is None:
                self._oom_base = self.cgroup.oom_kill_count()
            return _CgroupStats(self.cgroup.limit_bytes, None, 0, self._oom_base)
        return self.cgroup.stats()

    def _memory_since(self, base: _CgroupStats | None, *, succeeded: bool = False) -> _CgroupStats | None:
        """The cgroup's memory counters of this run alone (the session's cgroup lives on). A run
        that succeeded needs only the OOM kills (see ``_classify``): one file read."""
        if self.cgroup is None or base is None:
            return None
        oom = self.cgroup.oom_kill_count()
        self._oom_base = oom
        if succeeded and oom == base.oom_kills:
            return _CgroupStats(base.limit_bytes, None, 0, 0)
        now = self.cgroup.stats()
        return _CgroupStats(now.limit_bytes, now.peak_bytes, now.limit_hits - base.limit_hits,
                            now.oom_kills - base.oom_kills)


def _frame(head: dict, data: bytes = b"") -> bytes:
    """One request as the fork server reads it: the lengths of the JSON header and of the data
    (little-endian u32 each), then both."""
    encoded = json.dumps(head).encode()
    return struct.pack("<II", len(encoded), len(data)) + encoded + data
