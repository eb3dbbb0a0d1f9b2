"""The per-run cgroup: it caps what rlimits cannot (memory held by many processes, tmpfs and memfd
pages) and the run's task count, and holds every process of the run, so that all of them can be
killed at the end. Also the probe (once per process) of where such cgroups can be made: cgroup v2
with the ``memory`` and ``pids`` controllers, or the cgroup v1 ``memory`` and ``pids`` hierarchies."""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import signal
import threading
import time
from dataclasses import dataclass

from .host import _is_under

log = logging.getLogger(__package__)  # one logger for the whole sandbox package

# Per-run cgroups are named distil-sandbox-<run id>.
_CGROUP_PREFIX = "distil-sandbox-"


@dataclass(frozen=True)
class _CgroupStats:
    limit_bytes: int
    peak_bytes: int | None  # highest usage (None where the kernel does not say)
    limit_hits: int  # times the usage ran into the limit (v1 memory.failcnt, v2 memory.events "max")
    oom_kills: int  # processes the OOM killer killed in the cgroup

    def near_limit(self) -> bool:
        return self.limit_hits > 0 or self.oom_kills > 0 or (self.peak_bytes or 0) >= 0.8 * self.limit_bytes


class _Cgroup:
    """The cgroup of one run: a child of this process's own cgroup (v2: in the unified hierarchy,
    with the ``memory`` and ``pids`` controllers; v1: in the ``memory`` and the ``pids``
    hierarchies), with a memory limit (RAM + swap) and a task limit.

    The launched process joins it before it execs bwrap (or the supervisor): :meth:`launcher`
    prefixes its command with a shell that writes its own pid to ``cgroup.procs`` and then execs
    the command in the same process. So bwrap and every descendant are inside from their first
    instruction, and cannot leave (bwrap shows them no cgroup filesystem; a fresh uid may not
    write to it). A ``preexec_fn`` would do the same but make ``subprocess`` use ``fork()``
    instead of ``vfork()``, which copies the caller's page tables: about 90 ms per run for a
    caller holding 2 GB. :meth:`kill` kills every process in the cgroup, :meth:`stats` tells
    whether the memory limit was reached, :meth:`remove` removes the cgroup."""

    # Moves the shell into each cgroup.procs named before "--", then execs the rest. Exit code
    # 125 (no "started" report follows): the run is a sandbox_error, never run outside.
    _JOIN_SH = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
    _SH = "/bin/sh"

    def __init__(self, version: str, limit_bytes: int):
        self.version = version  # "v1" | "v2"
        self.limit_bytes = limit_bytes
        self.dirs: list[str] = []  # v2: [the cgroup]; v1: [memory cgroup, pids cgroup]
        self._fds: dict[str, int] = {}  # counter files a session reads or resets on every run

    @classmethod
    def create(cls, name: str, memory_bytes: int, max_tasks: int) -> tuple[_Cgroup | None, str | None]:
        """(cgroup, None), or (None, why not)."""
        layout = _cgroup_layout()
        if isinstance(layout, str):
            return None, layout
        version, parents = layout
        if not os.access(cls._SH, os.X_OK):
            return None, f"no {cls._SH} to move the launched process into a cgroup"
        cg = cls(version, memory_bytes)
        try:
            for parent in parents:
                cg.dirs.append(os.path.join(parent, name))
                os.mkdir(cg.dirs[-1])
            memory_dir, pids_dir = cg.dirs[0], cg.dirs[-1]
            if version == "v2":
                _cg_write(memory_dir, "memory.max", memory_bytes)
                _cg_write(memory_dir, "memory.swap.max", 0, optional=True)  # (only with swap accounting)
            else:
                _cg_write(memory_dir, "memory.limit_in_bytes", memory_bytes)
                # RAM + swap; may not be below memory.limit_in_bytes, so it comes second
                _cg_write(memory_dir, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                _cg_write(memory_dir, "memory.oom_control", 0, optional=True)  # OOM killer on (inherited)
            _cg_write(pids_dir, "pids.max", max_tasks)
        except OSError as e:
            cg.remove()
            return None, f"cannot set up a cgroup {version} under {parents[0]}: {e.strerror}"
        return cg, None

    def launcher(self, argv: list[str]) -> list[str]:
        """``argv``, run from inside the cgroup."""
        procs = [os.path.join(d, "cgroup.procs") for d in self.dirs]
        return [self._SH, "-c", self._JOIN_SH, "sh", *procs, "--", *argv]

    def kill(self, timeout_s: float = 10.0) -> None:
        """Kill every process in the cgroup; return once none is left."""
        if self.version == "v2":
            _cg_write(self.dirs[0], "cgroup.kill", 1, optional=True)  # kernel 5.14+; wins against forks
        deadline = time.monotonic() + timeout_s
        while pids := self._members():
            # A pid read from cgroup.procs could be reused by an unrelated process before it is
            # signalled. A pidfd taken first, of a pid still listed afterwards, names the member
            # (or a process that has exited since, and then signals nothing).
            fds: dict[int, int | None] = {}
            for pid in pids:
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass
                except OSError:
                    fds[pid] = None  # no pidfds (kernel < 5.3): by pid, with that small window
            listed = self._members()
            for pid, fd in fds.items():
                try:
                    if pid in listed:
                        if fd is None:
                            os.kill(pid, signal.SIGKILL)
                        else:
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
                finally:
                    if fd is not None:
                        os.close(fd)
            if time.monotonic() > deadline:
                log.error("sandbox cgroup %s: processes %s did not die", self.dirs[0], sorted(pids))
                return
            time.sleep(0.002)

    def _members(self) -> set[int]:
        pids: set[int] = set()
        for d in self.dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                pass
        return pids

    def stats(self) -> _CgroupStats:
        d = self.dirs[0]
        if self.version == "v2":
            events = _cg_read_keyed(d, "memory.events")
            return _CgroupStats(self.limit_bytes, _cg_read_int(d, "memory.peak"),  # (kernel 5.19+)
                                events.get("max", 0), events.get("oom_kill", 0))
        oom = _cg_read_keyed(d, "memory.oom_control")  # ("oom_kill" since kernel 4.13)
        return _CgroupStats(self.limit_bytes, _cg_read_int(d, "memory.max_usage_in_bytes"),
                            _cg_read_int(d, "memory.failcnt") or 0, oom.get("oom_kill", 0))

    def _counter_fd(self, name: str, flags: int) -> int:
        """The file ``name`` of the memory cgroup, opened once (a session reads or resets it on
        every run: a kept descriptor saves the open and close each time)."""
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(os.path.join(self.dirs[0], name), flags | os.O_CLOEXEC)
        return fd

    def oom_kill_count(self) -> int:
        """The OOM killer's kills in the cgroup so far (one file: cheap enough for every run)."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            text = os.pread(self._counter_fd(name, os.O_RDONLY), 4096, 0).decode()
        except OSError:
            return 0
        return _parse_keyed(text).get("oom_kill", 0)

    def reset_counters(self) -> bool:
        """Start the peak usage and the limit hits over (v1: a session's runs each get their
        own). False where that cannot be done (v2): the counters then cover the session so far."""
        if self.version != "v1":
            return False
        try:
            for name in ("memory.max_usage_in_bytes", "memory.failcnt"):
                os.pwrite(self._counter_fd(name, os.O_WRONLY), b"0", 0)
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """Remove the cgroup (empty by now: :meth:`kill` came first). Idempotent."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for d in self.dirs:
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY: a killed process may take a moment to leave.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("could not remove sandbox cgroup %s: %s", d, e)
                        break
                    time.sleep(0.005)


def _cg_write(cgroup_dir: str, name: str, value: int | str, *, optional: bool = False) -> None:
    path = os.path.join(cgroup_dir, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(str(value))


def _cg_read_int(cgroup_dir: str, name: str) -> int | None:
    try:
        with open(os.path.join(cgroup_dir, name)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _cg_read_keyed(cgroup_dir: str, name: str) -> dict[str, int]:
    """A "key value" per line file (memory.events, memory.oom_control)."""
    try:
        with open(os.path.join(cgroup_dir, name)) as f:
            return _parse_keyed(f.read())
    except OSError:
        return {}


def _parse_keyed(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


_cgroup_lock = threading.Lock()
_cgroup_layout_cache: tuple[str, list[str]] | str | None = None


def _cgroup_layout() -> tuple[str, list[str]] | str:
    """Where this process can make per-run cgroups: ("v2", [parent]) or ("v1", [memory parent,
    pids parent]); else the reason why not. Probed once per process (by making and removing a
    cgroup)."""
    global _cgroup_layout_cache
    with _cgroup_lock:
        if _cgroup_layout_cache is None:
            try:
                _cgroup_layout_cache = _find_cgroup_layout()
            except OSError as e:
                _cgroup_layout_cache = f"cannot read this process's cgroups: {e}"
        return _cgroup_layout_cache


def _find_cgroup_layout() -> tuple[str, list[str]] | str:
    mounts = []  # (fstype, super options, root of the mount in its hierarchy, mount point)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                root, point = (_unescape_mountinfo(x) for x in fields[3:5])
                mounts.append((fstype, set(options.split(",")), root, point))
    own = {}  # controller ("" for v2) -> this process's cgroup path
    with open("/proc/self/cgroup") as f:
        for line in f:
            _hid, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path

    def directory(fstype: str, controller: str) -> str | None:
        """This process's cgroup directory in the hierarchy of ``controller``."""
        path = own.get(controller if fstype == "cgroup" else "")
        for fs, options, root, point in mounts:
            if (path is not None and fs == fstype and (fs == "cgroup2" or controller in options)
                    and _is_under(path, root)):
                return os.path.normpath(os.path.join(point, os.path.relpath(path, root)))
        return None

    reasons = []
    v2 = directory("cgroup2", "")
    if v2 is None:
        reasons.append("no cgroup v2 hierarchy")
    else:
        why = _enable_v2_controllers(v2) or _try_mkdir([v2])
        if why is None:
            return "v2", [v2]
        reasons.append(f"cgroup v2 ({v2}): {why}")
    v1 = [directory("cgroup", "memory"), directory("cgroup", "pids")]
    if None in v1:
        reasons.append("no cgroup v1 memory and pids hierarchies")
    else:
        why = _try_mkdir(v1)
        if why is None:
            return "v1", v1
        reasons.append(f"cgroup v1 ({', '.join(v1)}): {why}")
    return "; ".join(reasons)


def _enable_v2_controllers(cgroup_dir: str) -> str | None:
    """Make ``memory`` and ``pids`` available to child cgroups of ``cgroup_dir``; None when done."""
    with open(os.path.join(cgroup_dir, "cgroup.controllers")) as f:
        missing = {"memory", "pids"} - set(f.read().split())
    if missing:
        return f"controller(s) {', '.join(sorted(missing))} not available"
    with open(os.path.join(cgroup_dir, "cgroup.subtree_control")) as f:
        if {"memory", "pids"} <= set(f.read().split()):
            return None
    try:
        _cg_write(cgroup_dir, "cgroup.subtree_control", "+memory +pids")
    except OSError as e:
        # EBUSY: the cgroup holds processes (this one), which v2 forbids for a cgroup that
        # distributes controllers; a cgroup delegated with them enabled must be used instead.
        return f"cannot enable memory and pids for child cgroups: {e.strerror}"
    return None


def _try_mkdir(parents: list[str]) -> str | None:
    """Whether cgroups can be made under each of ``parents`` (None) or why not."""
    name = f"{_CGROUP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
    for parent in parents:
        try:
            os.mkdir(os.path.join(parent, name))
            os.rmdir(os.path.join(parent, name))
        except OSError as e:
            return f"cannot create a cgroup in {parent}: {e.strerror}"
    return None


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
