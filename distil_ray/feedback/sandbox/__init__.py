"""Run untrusted (model-written) Python code, contained.

Entry point::

    from distil_ray.feedback.sandbox import run_python
    res = run_python("print(input()[::-1])", "abc\\n", timeout_s=5, memory_mb=512)
    res.status, res.stdout, res.stderr, res.returncode, res.wall_s, res.isolation, res.cgroup,
    res.warning

``Sandbox`` holds the same options as an object (``Sandbox(timeout_s=5).run(code, stdin)``), in
two frozen records: :class:`SandboxLimits` (time, memory, output, files, processes) and
:class:`SandboxSettings` (isolation, interpreter, environment, cgroup), so a caller can build them
once and share them (``Sandbox(limits, settings)``).
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
  ``perf_event_open``, ``userfaultfd``, ``ptrace``, module loading, ``kexec``, file handles
  (``open_by_handle_at``) and System V IPC and POSIX message queues (``shmget``, ``semget``,
  ``msgget``, ``mq_open`` and the calls that use them: their objects outlive the process in the
  IPC namespace, which the programs a session serves share). ``clone3`` gets ``ENOSYS`` (its flags live in memory, out of a
  filter's reach), so the C library falls back to ``clone`` for threads and ``posix_spawn``.
  Calls through a foreign ABI (i386 ``int 0x80`` or x32 on x86_64) get ``EPERM``. Filters exist
  for x86_64 and aarch64; elsewhere the run goes on without one and ``warning`` says so loudly;
* a cgroup per run (where this process may create one: cgroup v2 with the ``memory`` and
  ``pids`` controllers available to its own cgroup, or the cgroup v1 ``memory`` and ``pids``
  hierarchies; ``result.cgroup`` says which). The launched process joins it (through a
  ``/bin/sh`` that then execs bwrap, or the supervisor, in the same process), so bwrap and
  everything the program starts are inside from the start. It caps the memory of the
  whole run (see "Memory limit") and its task count (``max_processes`` plus the sandbox's own
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

Sessions: one sandbox, many runs, many programs
-----------------------------------------------
``Sandbox.session(code, setup=..., args=...)`` starts the sandbox once (the same layers as above,
with a *fork server* as its supervisor, :mod:`.forkserver`) and runs ``code`` once per
``session.run(stdin, timeout_s=..., max_output_bytes=...)``; each result is classified as a run of
its own would be. The program is loaded into a *response server* forked from the fork server
(the ``setup`` code runs and the program is compiled there, once), and each run is a process
forked ahead of its run (no start-up per run), from the response server's state after the load
(by the run's process before it, while that one waits for its own run: the server itself then
forks almost never, and no page it writes is copied on the runs' path): its own process group,
a *fresh uid of its own* (run by root), the run's rlimits; the seccomp filter and a fresh session
keyring come with the fork. Its wall time is watched through a pidfd and its output capped.
After it, everything it left running is killed (the server is a child subreaper) and ``/work``,
``/tmp`` and ``/dev/shm`` are wiped. ``session.unload()`` ends the program (its response server
exits) and ``session.load(code, ...)`` gives the session the next one, in a fresh response server
that never saw the previous program: the code harness keeps its sandboxes across responses this
way. Shared by the runs (and programs) of a session: the namespaces (the seccomp filter refuses
System V IPC and POSIX message queues, the only objects in them that outlive a process), the
cgroup (its memory and task caps bind one run at a time; per-run peaks are read where cgroup v1
can reset them). ``spare_session()`` starts one before its program is known. A run that kills or
stops a server (it cannot signal it across uids when run by root) leaves the session ``broken``;
the caller starts another.

Memory limit
------------
Two limits apply:

* ``RLIMIT_AS`` caps the address space of each process at ``memory_mb``: an allocation beyond it
  fails inside the program (CPython raises ``MemoryError``);
* the run's cgroup caps the memory of the run as a whole (all its processes, and what it keeps in
  tmpfs files and memfds, which no rlimit counts; swap included) at ``memory_mb`` plus the tmpfs
  budget (3 x ``max_file_mb``: ``/work``, ``/tmp`` and ``/dev/shm``) plus 48 MiB for the
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

from .limits import SandboxLimits, SandboxSettings, split_sandbox_options
from .results import ISOLATION_MODES as ISOLATION_MODES
from .results import STATUSES as STATUSES
from .results import SandboxResult, SandboxUnavailable
from .runner import Sandbox, bwrap_status, run_python
from .session import SandboxSession
from .sweep import sweep_leftovers

__all__ = [
    "run_python",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "SandboxSession",
    "SandboxSettings",
    "SandboxUnavailable",
    "bwrap_status",
    "split_sandbox_options",
    "sweep_leftovers",
]
