"""What a run returns: :class:`SandboxResult`, its ``status`` values (``STATUSES``, described in
the package docstring), the ``isolation`` modes a caller may ask for, and
:class:`SandboxUnavailable`. Kept in a module of their own, with no imports from the rest of the
package, so that every other module can use them without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("ok", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error")
ISOLATION_MODES = ("auto", "bwrap", "rlimits")


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
    warning: str | None = None  # set whenever the containment is weaker than documented
    signal: int | None = None  # the signal that ended the program, if any
    cpu_s: float | None = None  # user + system CPU of the program and its waited-for children
    peak_rss_mb: float | None = None  # largest resident set of the program or a waited-for child
    cgroup: str | None = None  # "v1" / "v2": the cgroup version that capped the run; None: none did
    phases: dict[str, float] | None = None  # a session's run: where its time went (forkserver.py)

    @property
    def ok(self) -> bool:
        return self.status == "ok"
