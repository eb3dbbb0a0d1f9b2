"""Run untrusted (model-written) Python code, contained.

Entry point::

    from distil_ray.feedback.sandbox import run_python
    res = run_python("print(input()[::-1])", "abc\\n", timeout_s=5, memory_mb=512)
    res.status, res.stdout, res.stderr, res.returncode, res.wall_s, res.isolation, res.cgroup,
    res.warning

``Sandbox`` holds the same options as an object (``Sandbox(timeout_s=5).run(code, stdin)``).
``run_python`` never raises because of what the code does; every outcome is a ``status``:

==================  ==========================================================================
``ok``              exited with code 0
``runtime_error``   non-zero exit code, or killed by a signal that is not one of the below
                    (a Python exception leaves its traceback in ``stderr``; a syntax error is
                    a runtime error with exit code 1)
``timeout``         still running after ``timeout_s`` of wall-clock time (killed), or killed by
                    the CPU-time limit (SIGXCPU, or SIGKILL at the hard limit) once its CPU time
                    had really reached that limit
``memory_limit``    see "Memory limit" below
``output_limit``    stdout or stderr went past ``max_output_bytes`` (killed at that moment)
``sandbox_error``   the sandbox itself could not start the program (the reason is in ``stderr``)
==================  ==========================================================================

The program cannot choose its own classification: a SIGXCPU it sends itself, or a "MemoryError"
it prints, is a ``runtime_error`` unless the CPU time or the memory use really reached the limit.

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
* a fresh, empty session keyring (kernel keys are not namespaced: the program would otherwise
  inherit the caller's session keyring, e.g. root's, and could read its keys or leave new ones
  behind on the host);
* a seccomp filter, installed (with ``no_new_privs``) right before ``exec`` and inherited by
  every process the program starts. It returns ``EPERM`` for the system calls that would reopen
  kernel surface the other layers close: creating or joining namespaces (``unshare``,
  ``setns``, ``clone`` with a ``CLONE_NEW*`` flag; inside a new user namespace the program could
  mount an unsized tmpfs or build new network namespaces), mounting (old and new mount API),
  kernel keys (``keyctl``, ``add_key``, ``request_key``), ``io_uring``, ``bpf``,
  ``perf_event_open``, ``userfaultfd``, ``ptrace``, module loading, ``kexec`` and file handles
  (``open_by_handle_at``). ``clone3`` gets ``ENOSYS`` (its flags live in memory, out of a
  filter's reach), so the C library falls back to ``clone`` for threads and ``posix_spawn``.
  Calls through a foreign ABI (i386 ``int 0x80`` or x32 on x86_64) get ``EPERM``. Filters exist
  for x86_64 and aarch64; elsewhere the run goes on without one and ``warning`` says so loudly;
* a cgroup per run (where this process may create one: cgroup v2 with the ``memory`` and
  ``pids`` controllers available to its own cgroup, or the cgroup v1 ``memory`` and ``pids``
  hierarchies; ``result.cgroup`` says which). The launched process joins it (through a
  ``/bin/sh`` that then execs bwrap, or the supervisor, in the same process), so bwrap and
  everything the program starts are inside from the start. It caps the memory of the
  whole run (see "Memory limit") and its task count (``max_processes`` plus the sandbox's three
  processes, threads included), and it is how the end of a run kills everything. Where no cgroup
  can be made the run goes on without one, and ``warning`` says so;
* end of run: every process in the run's cgroup is killed (v2 ``cgroup.kill``; v1 each member,
  until none is left) and the cgroup removed; the namespace's init process is killed (through a
  pidfd, so a recycled pid is never hit) and the kernel then kills every process left in the PID
  namespace, including ones that called ``setsid()`` or double-forked. ``run_python`` returns
  only after they are gone. ``--die-with-parent`` covers the case where the calling process
  itself dies.

``isolation == "rlimits-only"`` (the fallback when bwrap is missing or fails its self-check, or
when asked for with ``isolation="rlimits"``): the same rlimits, keyring, seccomp filter and
cgroup, a fresh temporary working directory, the scrubbed environment and, at the end, the
cgroup kill, a kill of the process group, and a sweep for any process still carrying this run's
marker environment variable. The supervisor is a *child subreaper*: orphans of the program (even
after ``setsid()`` with an empty environment) are re-parented to it, and it kills all of them
before it exits (on a timeout it is asked to, with SIGTERM, before it is killed), which matters
where no cgroup can be made. There is **no** network, filesystem or process isolation: the code
can read and write whatever the calling user can, open sockets and signal other processes. Run by
root, the program is switched to a fresh uid as above when such a uid can run the interpreter
(probed once); otherwise it keeps root's powers (it could then leave its cgroup, for instance)
and ``RLIMIT_NPROC`` does not bind (the ``warning`` says so). The fallback is logged with
``logging.warning`` once per process and repeated in every result's ``warning``.

``isolation`` may be ``"auto"`` (default: bwrap if it works, else the fallback), ``"bwrap"``
(raise :class:`SandboxUnavailable` if it does not work) or ``"rlimits"`` (force the fallback).
``use_cgroup=False`` turns the per-run cgroup off.

Memory limit
------------
Two limits apply:

* ``RLIMIT_AS`` caps the address space of each process at ``memory_mb``: an allocation beyond it
  fails inside the program (CPython raises ``MemoryError``);
* the run's cgroup caps the memory of the run as a whole (all its processes, and what it keeps in
  tmpfs files and memfds, which no rlimit counts; swap included) at ``memory_mb`` plus the tmpfs
  budget (3 x ``max_file_mb``: ``/work``, ``/tmp`` and ``/dev/shm``) plus 32 MiB for the
  sandbox's own processes. It is the larger of the two on purpose: a plain big allocation still
  fails at ``RLIMIT_AS`` with a readable ``MemoryError``, while many processes, memfds or tmpfs
  files together meet the kernel's OOM killer. The program's processes get ``oom_score_adj``
  1000, so they go before the supervisor that reports how the run ended. Without a cgroup only
  ``RLIMIT_AS`` applies (per process) and ``warning`` says so.

The result is ``memory_limit`` when

* the OOM killer killed any process of the run's cgroup (whatever the exit status), or
* the program did not succeed, its memory use really came near the limit (its peak resident set,
  or that of a child it waited for, reached 80 % of ``memory_mb``; or the cgroup's usage hit its
  limit or peaked above 80 % of it), and either the last line of ``stderr`` reports a
  ``MemoryError`` / "Cannot allocate memory" / "out of memory" (the usual outcome: CPython raises
  ``MemoryError``), or it died of SIGKILL, SIGSEGV, SIGBUS or SIGABRT (what a failed allocation
  in C code, or the OOM killer, looks like).

Otherwise such an ending is a ``runtime_error`` (e.g. a segfault from very deep recursion). The
program writes its own ``stderr``, so the text alone never decides; a consequence is that a single
request larger than the whole limit (``bytearray(10**12)``), which fails at once without using
any memory, is a ``runtime_error`` with the ``MemoryError`` in ``stderr``.

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
import functools
import json
import logging
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import struct
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
# Processes of the sandbox itself in a run's cgroup: bwrap's monitor, the namespace's init and the
# supervisor (only the supervisor in the fallback).
_SANDBOX_TASKS = 3
# Memory of those processes, on top of the program's budget in the run's cgroup limit.
_CGROUP_SLACK_MB = 32
# Per-run cgroups are named distil-sandbox-<run id>.
_CGROUP_PREFIX = "distil-sandbox-"
# CPU time is accounted in scheduler ticks; a death by the CPU limit counts as a timeout when the
# reported CPU time is within this much of the limit.
_CPU_SLACK_S = 0.5


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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------
# The supervisor: runs first in the sandbox (or directly, in the fallback), forks the program,
# waits for it and reports how it ended on a private pipe. Being the program's parent is what
# gives an exact wait status (bwrap itself would fold a signal into an exit code 128+n) and the
# peak memory (rusage) used to recognise memory-limit deaths. It also applies the rlimits, the
# uid switch, a fresh session keyring and the seccomp filter in the child right before exec, so
# the supervisor itself is never limited by them. In the fallback it is a child subreaper: it
# inherits the program's orphans and kills all of them before it exits (in bwrap, the end of the
# PID namespace does that).
# ---------------------------------------------------------------------------------------------

_SUPERVISOR = r"""
import ctypes, errno, json, os, resource, signal, sys, time
spec = json.loads(sys.argv[1])
status_fd = spec["status_fd"]
os.set_inheritable(status_fd, False)
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 22, 36, 38
SECCOMP_MODE_FILTER, KEYCTL_JOIN_SESSION_KEYRING = 2, 1
ulong = ctypes.c_ulong

def report(**fields):
    try:
        os.write(status_fd, (json.dumps(fields) + "\n").encode())
    except OSError:
        pass

def prctl(option, arg2, arg3=ulong(0)):
    if libc.prctl(ctypes.c_int(option), ulong(arg2), arg3, ulong(0), ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")

class SockFprog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

def confine():
    # A new, empty session keyring: the caller's one (root's links root's user keyring) would
    # otherwise be inherited. ENOSYS: a kernel without keys; EPERM: an outer seccomp policy (a
    # container's) already refuses keyctl, and it binds the program as well.
    if spec["keyctl_nr"] is not None:
        if libc.syscall(ctypes.c_long(spec["keyctl_nr"]), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING),
                        ctypes.c_long(0)) < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                raise OSError(err, f"KEYCTL_JOIN_SESSION_KEYRING: {os.strerror(err)}")
    if spec["seccomp"]:
        code = bytes.fromhex(spec["seccomp"])
        prog = SockFprog(len(code) // 8, code)  # 8 bytes per struct sock_filter
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # (bwrap sets it already; the fallback needs it)
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog))

def children(me):
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:  # single-threaded: all the children
            return [int(p) for p in f.read().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN
        found = []
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
        return found

def kill_descendants():
    # Every orphan of the program, even one that called setsid() or double-forked, is
    # re-parented to this process (a child subreaper), so killing its children until none is
    # left kills everything the program started. A child's pid cannot be reused before it is
    # reaped here, so signalling by pid is safe.
    me, deadline = os.getpid(), time.monotonic() + 5
    while time.monotonic() < deadline:
        for pid in children(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.002)

def on_sigterm(signum, frame):  # the host's request to end the run (fallback without a cgroup)
    kill_descendants()
    os._exit(128 + signum)

if spec["subreaper"]:
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass  # the cgroup and the marker sweep still find the leftovers
    signal.signal(signal.SIGTERM, on_sigterm)

pid = os.fork()
if pid == 0:
    try:
        # Only stdin/stdout/stderr reach the program (the status pipe is close-on-exec).
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 1 << 20)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # When the run's cgroup runs out of memory, the OOM killer picks the program's
        # processes, not the supervisor that reports how it ended (raising needs no privilege).
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        for name, (soft, hard) in spec["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])  # from root to a non-zero uid: all capabilities are dropped
        confine()
        os.execv(spec["argv"][0], spec["argv"])
    except BaseException as exc:
        report(event="setup_failed", error=repr(exc))
    os._exit(127)
report(event="started", pid=pid)
while True:
    # (As a subreaper, it also reaps the orphans it inherits as they die: their zombies would
    # count against the process limits.)
    wpid, wait_status, usage = os.wait4(-1, 0)
    if wpid == pid:
        break
report(event="exit", wait_status=wait_status, maxrss_kb=usage.ru_maxrss,
       cpu_s=usage.ru_utime + usage.ru_stime)
if spec["subreaper"]:
    kill_descendants()
"""


# ---------------------------------------------------------------------------------------------
# The seccomp filter: a classic-BPF program over struct seccomp_data (linux/seccomp.h), built
# here and handed to the supervisor hex-encoded.
# ---------------------------------------------------------------------------------------------

# Refused with EPERM (see "Layers of containment" in the module docstring).
_DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount2", "pivot_root",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd", "ptrace",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at",
)
# clone() flags that create namespaces: NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
# and NEWTIME.
_CLONE_NEW_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                    | 0x40000000 | 0x00000080)


@dataclass(frozen=True)
class _SyscallABI:
    audit_arch: int  # seccomp_data.arch of this ABI (AUDIT_ARCH_*)
    x32_bit: int | None  # syscall numbers with this bit belong to the x32 ABI (x86_64 only)
    nr: dict[str, int]  # syscall numbers


_SYSCALL_ABIS = {
    "x86_64": _SyscallABI(0xC000003E, 0x40000000, {
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "keyctl": 250, "add_key": 248, "request_key": 249,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "ptrace": 101, "kexec_load": 246,
        "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "clone": 56, "clone3": 435}),
    "aarch64": _SyscallABI(0xC00000B7, None, {
        "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "keyctl": 219, "add_key": 217, "request_key": 218,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "ptrace": 117, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "clone": 220, "clone3": 435}),
}

# Classic BPF opcodes (linux/filter.h) and seccomp return values.
_BPF_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the 32-bit word at offset k of seccomp_data
_BPF_JEQ, _BPF_JGE, _BPF_JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_{JEQ,JGE,JSET} | BPF_K
_BPF_RET = 0x06  # BPF_RET | BPF_K
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000  # | errno
# Offsets in struct seccomp_data: nr, arch, and the low 32 bits of args[0] (both ABIs above are
# little-endian).
_DATA_NR, _DATA_ARCH, _DATA_ARG0_LOW = 0, 4, 16


def _seccomp_filter(abi: _SyscallABI) -> bytes:
    """The filter as packed ``struct sock_filter`` entries (see "Layers of containment")."""
    code: list[tuple[int, str | None, str | None, int]] = []  # (op, jump-if-true, -if-false, k)
    labels: dict[str, int] = {}

    def op(opcode: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        code.append((opcode, jt, jf, k))  # a jump target is a label; None: the next instruction

    op(_BPF_LD_ABS, _DATA_ARCH)
    op(_BPF_JEQ, abi.audit_arch, jf="eperm")  # i386 (int 0x80) entry points on x86_64
    op(_BPF_LD_ABS, _DATA_NR)
    if abi.x32_bit is not None:
        op(_BPF_JGE, abi.x32_bit, jt="eperm")  # x32 syscall numbers
    op(_BPF_JEQ, abi.nr["clone"], jt="clone")
    op(_BPF_JEQ, abi.nr["clone3"], jt="enosys")
    for name in _DENIED_SYSCALLS:
        op(_BPF_JEQ, abi.nr[name], jt="eperm")
    op(_BPF_RET, _SECCOMP_RET_ALLOW)
    labels["clone"] = len(code)  # clone(flags, ...): no namespace flag
    op(_BPF_LD_ABS, _DATA_ARG0_LOW)
    op(_BPF_JSET, _CLONE_NEW_FLAGS, jt="eperm")
    op(_BPF_RET, _SECCOMP_RET_ALLOW)
    labels["eperm"] = len(code)
    op(_BPF_RET, _SECCOMP_RET_ERRNO | errno.EPERM)
    labels["enosys"] = len(code)
    op(_BPF_RET, _SECCOMP_RET_ERRNO | errno.ENOSYS)

    def offset(pc: int, label: str | None) -> int:  # jumps are relative to the next instruction
        return 0 if label is None else labels[label] - pc - 1

    return b"".join(struct.pack("HBBI", opcode, offset(pc, jt), offset(pc, jf), k)
                    for pc, (opcode, jt, jf, k) in enumerate(code))


@functools.cache
def _seccomp_for_host() -> tuple[_SyscallABI | None, str | None]:
    """(ABI, filter as hex) for this machine, or (None, None) where no filter is defined."""
    abi = _SYSCALL_ABIS.get(os.uname().machine)
    return (abi, _seccomp_filter(abi).hex()) if abi else (None, None)


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
_log_lock = threading.Lock()  # (not _probe_lock: runs log while a probe holds that one)
_logged_once: set[str] = set()  # warnings this process has logged


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


# ---------------------------------------------------------------------------------------------
# cgroups: a per-run cgroup caps what rlimits cannot (memory held by many processes, tmpfs and
# memfd pages) and holds every process of the run, so that all of them can be killed.
# ---------------------------------------------------------------------------------------------


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

    def remove(self) -> None:
        """Remove the cgroup (empty by now: :meth:`kill` came first). Idempotent."""
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
    out: dict[str, int] = {}
    try:
        with open(os.path.join(cgroup_dir, name)) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
    except OSError:
        pass
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


# ---------------------------------------------------------------------------------------------
# Process handling
# ---------------------------------------------------------------------------------------------


def _execute(argv: list[str], launch_env: dict[str, str], cwd: str, child_fds: list[int], stdin_bytes: bytes,
             status_r: int, info_r: int | None, cfg: Sandbox, use_bwrap: bool, run_id: str,
             cgroup: _Cgroup | None) -> SandboxResult:
    isolation = "bwrap" if use_bwrap else "rlimits-only"
    t0 = time.monotonic()
    try:
        # A new session: the launched process leads its own process group, which is killed whole.
        # It enters the run's cgroup before it execs bwrap (or the supervisor), so everything the
        # run starts is inside from the start.
        if cgroup is not None:
            argv = cgroup.launcher(argv)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=launch_env, cwd=cwd, pass_fds=child_fds, start_new_session=True)
    except OSError as e:
        return SandboxResult("sandbox_error", "", f"could not launch the sandbox: {e}", None,
                             time.monotonic() - t0, isolation)
    while child_fds:
        os.close(child_fds.pop())
    tree = _ProcessTree(proc, use_bwrap, run_id, cgroup)
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
    res.status = _classify(res, cfg, cgroup.stats() if cgroup is not None else None)
    return res


_MEMORY_LINE = re.compile(r"MemoryError|Cannot allocate memory|out of memory|bad_alloc", re.IGNORECASE)
_MEMORY_SIGNALS = (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


def _classify(res: SandboxResult, cfg: Sandbox, memory: _CgroupStats | None) -> str:
    """The status of a run that ended by itself (see the table in the module docstring). What the
    program controls (its stderr, the signals it sends itself) never decides alone: only the
    kernel's accounting (rusage, cgroup counters) says whether a limit was really reached."""
    if memory is not None and memory.oom_kills:
        return "memory_limit"  # the kernel killed part of this run for its memory
    if res.returncode == 0:
        return "ok"
    if res.returncode is None:
        return "runtime_error"  # the supervisor vanished
    cpu_soft, cpu_hard = cfg._rlimits()["RLIMIT_CPU"]
    cpu_s = res.cpu_s or 0.0
    if res.signal == signal.SIGXCPU and cpu_s + _CPU_SLACK_S >= cpu_soft:
        return "timeout"
    if res.signal == signal.SIGKILL and cpu_s + _CPU_SLACK_S >= cpu_hard:
        return "timeout"  # SIGXCPU ignored, then the hard limit
    near_limit = ((res.peak_rss_mb or 0.0) >= 0.8 * cfg.memory_mb
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

    def __init__(self, proc: subprocess.Popen, use_bwrap: bool, run_id: str, cgroup: _Cgroup | None):
        self.proc, self.use_bwrap, self.run_id, self.cgroup = proc, use_bwrap, run_id, cgroup
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
            _sweep_marked(f"{_RUN_MARKER_VAR}={self.run_id}".encode())
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
