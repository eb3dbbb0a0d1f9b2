"""One run as processes: launching the sandbox (inside its cgroup), feeding stdin and reading
capped stdout/stderr plus the supervisor's and bwrap's report pipes from one thread, killing
everything the run started (cgroup, the namespace's init, the process group, the fallback's
marker sweep), and classifying how the run ended into a ``status``."""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import subprocess
import time

from .cgroup import _Cgroup, _CgroupStats
from .limits import Launch, SandboxLimits
from .results import SandboxResult

log = logging.getLogger(__package__)  # one logger for the whole sandbox package

# CPU time is accounted in scheduler ticks; a death by the CPU limit counts as a timeout when the
# reported CPU time is within this much of the limit.
_CPU_SLACK_S = 0.5


def execute(launch: Launch, limits: SandboxLimits, cgroup: _Cgroup | None) -> SandboxResult:
    """Launch, feed and wait for one run (killing all of it at the end) and classify its ending.
    Closes the launch's child pipe ends once the launched process holds them."""
    isolation = launch.isolation
    pipes = launch.pipes
    t0 = time.monotonic()
    try:
        # A new session: the launched process leads its own process group, which is killed whole.
        # It enters the run's cgroup before it execs bwrap (or the supervisor), so everything the
        # run starts is inside from the start.
        argv = list(launch.argv) if cgroup is None else cgroup.launcher(list(launch.argv))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(launch.env), cwd=launch.cwd, pass_fds=pipes.child_ends(),
                                start_new_session=True)
    except OSError as e:
        return SandboxResult("sandbox_error", "", f"could not launch the sandbox: {e}", None,
                             time.monotonic() - t0, isolation)
    pipes.close_child_ends()
    tree = _ProcessTree(proc, launch, cgroup)
    try:
        pump = _StreamPump(proc, launch.stdin, pipes.status_r, pipes.info_r, limits.max_output_bytes)
        killed_for = pump.pump(t0 + limits.timeout_s, tree)
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
    stdout = pump.out[1][: limits.max_output_bytes].decode("utf-8", errors="replace")
    stderr = pump.out[2][: limits.max_output_bytes].decode("utf-8", errors="replace")
    events = _parse_events(pump.status)
    res = SandboxResult("runtime_error", stdout, stderr, None, wall, isolation)
    res.cgroup = cgroup.version if cgroup is not None else None
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
        # The supervisor vanished (the program killed it, the sandbox's init died, or the OOM
        # killer took it).
        res.stderr += "\n[sandbox] the program's supervisor ended before the program did"
    else:
        ws = int(exit_ev["wait_status"])
        if os.WIFSIGNALED(ws):
            res.signal = os.WTERMSIG(ws)
            res.returncode = -res.signal
        else:
            res.returncode = os.waitstatus_to_exitcode(ws)
    res.status = _classify(res, limits, cgroup.stats() if cgroup is not None else None)
    return res


_MEMORY_LINE = re.compile(r"MemoryError|Cannot allocate memory|out of memory|bad_alloc", re.IGNORECASE)
_MEMORY_SIGNALS = (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


def _classify(res: SandboxResult, limits: SandboxLimits, memory: _CgroupStats | None) -> str:
    """The status of a run that ended by itself (see the table in the package docstring). What the
    program controls (its stderr, the signals it sends itself) never decides alone: only the
    kernel's accounting (rusage, cgroup counters) says whether a limit was really reached."""
    if memory is not None and memory.oom_kills:
        return "memory_limit"  # the kernel killed part of this run for its memory
    if res.returncode == 0:
        return "ok"
    if res.returncode is None:
        return "runtime_error"  # the supervisor vanished
    cpu_soft, cpu_hard = limits.rlimits()["RLIMIT_CPU"]
    cpu_s = res.cpu_s or 0.0
    if res.signal == signal.SIGXCPU and cpu_s + _CPU_SLACK_S >= cpu_soft:
        return "timeout"
    if res.signal == signal.SIGKILL and cpu_s + _CPU_SLACK_S >= cpu_hard:
        return "timeout"  # SIGXCPU ignored, then the hard limit
    near_limit = ((res.peak_rss_mb or 0.0) >= 0.8 * limits.memory_mb
                  or (memory is not None and memory.near_limit()))
    if not near_limit:
        return "runtime_error"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if (lines and _MEMORY_LINE.search(lines[-1])) or res.signal in _MEMORY_SIGNALS:
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

    First the run's cgroup, if any: every process of the run is in it, wherever it went. bwrap:
    the launcher process group (bwrap's monitor) and the sandbox's init process, found through
    ``--info-fd`` and held as a pidfd; when init dies the kernel kills every other process of the
    PID namespace and init's exit completes only after they are gone, so waiting for it is
    waiting for the whole tree. Fallback: without a cgroup, the supervisor is first asked
    (SIGTERM) to kill its descendants, which as a child subreaper include every orphan; then the
    process group, plus a sweep for processes whose initial environment carries this run's
    marker."""

    def __init__(self, proc: subprocess.Popen, launch: Launch, cgroup: _Cgroup | None):
        self.proc, self.cgroup = proc, cgroup
        self.use_bwrap, self.marker = launch.use_bwrap, launch.marker
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
        if self.cgroup is not None:
            self.cgroup.kill()
        elif not self.use_bwrap:
            self._stop_supervisor()
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
            _sweep_marked(self.marker)
        self._done = True

    def _stop_supervisor(self, grace_s: float = 2.0) -> None:
        """Fallback without a cgroup: ask the supervisor to kill everything it inherited. (After a
        normal end it has done so already, and exited.)"""
        if self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except (OSError, subprocess.TimeoutExpired):
            pass  # then SIGKILL to the process group, and the sweep


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
