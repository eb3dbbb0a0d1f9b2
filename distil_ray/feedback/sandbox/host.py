"""Facts about the host that a run depends on: which interpreter runs the program and which host
directories must be mounted for it, whether this process is root, and fresh uids to run the
program as. Shared by the runner (bwrap mounts, uid switch) and the cgroup code (path tests)."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from dataclasses import dataclass

# Host directories mirrored read-only (or re-created as the same symlink, e.g. /lib -> usr/lib).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


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


def _fresh_uid() -> int:
    """A uid (and gid) no account uses: the program's processes are then the only ones counted
    by RLIMIT_NPROC, and it can signal nothing it did not start itself."""
    return (1 << 30) + secrets.randbelow(1 << 30)
