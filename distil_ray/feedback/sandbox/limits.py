"""The frozen records a run is described by, shared by the runner (which builds them) and the
process code (which launches and classifies a run with them):

* :class:`SandboxLimits`: what the program may use (time, memory, output, files, processes), and
  the rlimits and cgroup caps derived from it;
* :class:`SandboxSettings`: how it is run (isolation mode, interpreter, environment, cgroup);
* :class:`Launch`: one launch of the sandbox's first process (command, environment, stdin) and
  :class:`ReportPipes`, the two pipes it reports on.

Only :mod:`.results` is imported from the rest of the package, so no import cycle can form."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .results import ISOLATION_MODES

# Name of the variable that tags every process of a rlimits-only run, for the final sweep.
RUN_MARKER_VAR = "DISTIL_SANDBOX_RUN"
# Processes of the sandbox itself in a run's cgroup: bwrap's monitor, the namespace's init and the
# supervisor (only the supervisor in the fallback); in a session, instead of the supervisor, the
# fork server, the response server, the next response's server and the next two tests' processes.
SANDBOX_TASKS = 7
# Memory of those processes, on top of the program's budget in the run's cgroup limit.
CGROUP_SLACK_MB = 48


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. Subclasses may refine :meth:`rlimits` (every consumer asks it)."""

    timeout_s: float = 10.0  # wall clock, from launch to exit
    memory_mb: int = 1024  # RLIMIT_AS of the program (and of each child it forks)
    max_output_bytes: int = 1 << 20  # per stream; beyond it the run is killed (output_limit)
    max_file_mb: int = 64  # RLIMIT_FSIZE, and the size of each tmpfs (/work, /tmp, /dev/shm)
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_open_files: int = 1024  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_output_bytes <= 0:
            raise ValueError("timeout_s, memory_mb and max_output_bytes must be positive")

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """``{name: (soft, hard)}`` as the supervisor sets them in the program's process."""
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

    def cgroup_memory_bytes(self) -> int:
        """The run's total: the program's budget, its three tmpfs mounts (in the fallback the same
        budget covers host tmpfs files), and the sandbox's own processes."""
        return (self.memory_mb + 3 * self.max_file_mb + CGROUP_SLACK_MB) << 20

    def cgroup_max_tasks(self) -> int:
        return self.max_processes + SANDBOX_TASKS


@dataclass(frozen=True)
class SandboxSettings:
    """How a run is contained and which interpreter runs the program."""

    isolation: str = "auto"  # "auto" | "bwrap" | "rlimits"
    python: str | None = None  # interpreter to run; default: the base interpreter of this Python
    allow_site_packages: bool = False  # run without -S (only useful with a custom ``python``)
    bwrap: str | None = None  # path of bwrap; default: found on PATH
    tmp_root: str | None = None  # where run directories are made; default: tempfile.gettempdir()
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables for the program
    use_cgroup: bool = True  # cap the run's total memory and tasks with a per-run cgroup, if possible

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, not {self.isolation!r}")
        # a read-only copy: the record is shared by every run of a Sandbox, from any thread
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))

    def __reduce__(self):
        # a mapping proxy does not pickle; the settings must (a task's grader ships them to Ray actors)
        values = [dict(self.env) if f.name == "env" else getattr(self, f.name) for f in fields(self)]
        return (type(self), tuple(values))


def split_sandbox_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``Sandbox(**options)`` keywords as (:class:`SandboxLimits` fields, :class:`SandboxSettings`
    fields); a name that is neither raises ``TypeError`` listing the allowed ones."""
    limit_names = {f.name for f in fields(SandboxLimits)}
    setting_names = {f.name for f in fields(SandboxSettings)}
    unknown = sorted(set(options) - limit_names - setting_names)
    if unknown:
        raise TypeError(f"unknown sandbox option(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(limit_names | setting_names))}")
    return ({k: v for k, v in options.items() if k in limit_names},
            {k: v for k, v in options.items() if k in setting_names})


class ReportPipes:
    """The supervisor's status pipe and, under bwrap, bwrap's info pipe (it names the sandbox's
    init). The write ends go to the launched process; ours must be closed once it has them, or
    the read ends would never report end-of-file. Each end is closed exactly once (a second
    ``close`` of a number could hit a descriptor another thread has opened since)."""

    def __init__(self, *, with_info: bool):
        self._open: set[int] = set()
        self.status_r, self.status_w = self._pipe()
        self.info_r, self.info_w = self._pipe() if with_info else (None, None)

    def _pipe(self) -> tuple[int, int]:
        try:
            r, w = os.pipe()
        except OSError:
            self.close()
            raise
        self._open.update((r, w))
        return r, w

    def child_ends(self) -> list[int]:
        return [fd for fd in (self.status_w, self.info_w) if fd is not None]

    def close_child_ends(self) -> None:
        for fd in self.child_ends():
            self._close(fd)

    def close(self) -> None:
        for fd in list(self._open):
            self._close(fd)

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass(frozen=True)
class Launch:
    """One launch: the sandbox's first process (bwrap, or the supervisor in the fallback)."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # the launched process's whole environment
    cwd: str
    stdin: bytes  # fed to the program
    use_bwrap: bool
    run_id: str  # names the run's cgroup and, in the fallback, tags its processes
    pipes: ReportPipes

    @property
    def isolation(self) -> str:
        return "bwrap" if self.use_bwrap else "rlimits-only"

    @property
    def marker(self) -> bytes:
        """The environment entry every process of a rlimits-only run carries."""
        return f"{RUN_MARKER_VAR}={self.run_id}".encode()
