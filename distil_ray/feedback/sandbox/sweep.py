"""Sweeping what a killed caller left behind: the run directories and cgroups of sandbox runs
whose calling process died before it could clean up (SIGKILL of a grader mid-run).

Each run's directory and cgroup carry the calling process's pid in their name
(``distil-sandbox-<pid>-…``). A later caller removes those of the same user whose pid no longer
runs, first killing whatever is still inside such a cgroup. A live pid, or one this user may not
signal (another user's process), is left alone: a reused pid only delays a sweep, never removes a
live run's files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from .cgroup import _CGROUP_PREFIX, _Cgroup, _cgroup_layout

log = logging.getLogger(__package__)

RUN_DIR_PREFIX = "distil-sandbox-"
# distil-sandbox-<pid namespace>-<pid>-...: a pid means something only in its own namespace
# (containers may share a /tmp or a cgroup parent), so only names of this one are swept
_OWNED = re.compile(r"distil-sandbox-(\d+)-(\d+)-")


def pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid; 0 where it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_tag() -> str:
    """What a run's directory and cgroup names start with after the prefix: namespace and pid."""
    return f"{pid_namespace()}-{os.getpid()}"


@dataclass
class Swept:
    run_dirs: int = 0
    cgroups: int = 0


def owner_pid(name: str) -> int | None:
    """The calling process's pid in a run directory's or cgroup's name; None for other names and
    for callers in another PID namespace."""
    m = _OWNED.match(name)
    if not m or int(m.group(1)) != pid_namespace():
        return None
    return int(m.group(2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _orphaned(name: str) -> bool:
    pid = owner_pid(name)
    return pid is not None and pid != os.getpid() and not _alive(pid)


def sweep_leftovers(tmp_root: str | None = None) -> Swept:
    """Remove the run directories under ``tmp_root`` (default: the temp dir) and the sandbox
    cgroups of callers that are gone; returns how many of each."""
    swept = Swept()
    root = tmp_root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    for name in names:
        path = os.path.join(root, name)
        try:
            mine = os.lstat(path).st_uid == os.geteuid()
        except OSError:
            continue
        if mine and _orphaned(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            swept.run_dirs += not os.path.exists(path)
    layout = _cgroup_layout()
    if not isinstance(layout, str):
        version, parents = layout
        names = set()
        for parent in parents:
            try:
                names.update(n for n in os.listdir(parent) if n.startswith(_CGROUP_PREFIX))
            except OSError:
                pass
        for name in sorted(names):
            if not _orphaned(name):
                continue
            cgroup = _Cgroup(version, 0)
            cgroup.dirs = [os.path.join(p, name) for p in parents
                           if os.path.isdir(os.path.join(p, name)) and os.stat(os.path.join(p, name)).st_uid == os.geteuid()]
            if not cgroup.dirs:  # gone already (another grader swept it), or not this user's
                continue
            try:
                cgroup.kill(timeout_s=5.0)  # a program still running from the dead caller's run
                cgroup.remove()
            except (OSError, IndexError) as e:  # raced with another sweeper: never fail a grader's start
                log.warning("could not sweep sandbox cgroup %s: %s", name, e)
                continue
            swept.cgroups += 1
    if swept.run_dirs or swept.cgroups:
        log.warning("swept %d run directories and %d cgroups left by sandbox callers that were killed",
                    swept.run_dirs, swept.cgroups)
    return swept
