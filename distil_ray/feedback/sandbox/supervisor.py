"""The supervisor: the Python program that runs first in the sandbox (or directly, in the
rlimits-only fallback), started by the runner as ``python -I -S -c _SUPERVISOR <spec as JSON>``.

It forks the program, waits for it and reports how it ended on a private pipe. Being the
program's parent is what gives an exact wait status (bwrap itself would fold a signal into an exit
code 128+n) and the peak memory (rusage) used to recognise memory-limit deaths. It also applies the
rlimits, the uid switch, a fresh session keyring and the seccomp filter in the child right before
exec, so the supervisor itself is never limited by them. In the fallback it is a child subreaper:
it inherits the program's orphans and kills all of them before it exits (in bwrap, the end of the
PID namespace does that).

The program is kept as text (it runs under the sandbox's interpreter, not this one); its report
events ("started", "setup_failed", "exit") are read by :mod:`.process`."""

# What both programs share: the spec, the report pipe, prctl, the confinement of a child right
# before it runs the program, and the subreaper's sweep of every descendant.
_COMMON = r"""
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

def join_fresh_keyring():
    # A new, empty session keyring: the caller's one (root's links root's user keyring) would
    # otherwise be inherited. ENOSYS: a kernel without keys; EPERM: an outer seccomp policy (a
    # container's, or ours) already refuses keyctl, and it binds the program as well.
    if spec["keyctl_nr"] is not None:
        if libc.syscall(ctypes.c_long(spec["keyctl_nr"]), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING),
                        ctypes.c_long(0)) < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                raise OSError(err, f"KEYCTL_JOIN_SESSION_KEYRING: {os.strerror(err)}")

def confine():
    join_fresh_keyring()
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

reaped = {}  # pid -> wait status of the children kill_descendants reaped

def kill_descendants(keep=None):
    # Every orphan of the program, even one that called setsid() or double-forked, is
    # re-parented to this process (a child subreaper), so killing its children until none is
    # left kills everything the program started. A child's pid cannot be reused before it is
    # reaped here, so signalling by pid is safe. `keep`: the pids of children spared (the fork
    # server's next test processes), reaped only if they died.
    me, deadline, pause, keep = os.getpid(), time.monotonic() + 5, 0.0001, keep or ()
    while time.monotonic() < deadline:
        others = [pid for pid in children(me) if pid not in keep]
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                reaped[pid] = status
        except ChildProcessError:
            return
        if not others:
            return
        time.sleep(pause)  # (a killed process is gone a moment later)
        pause = min(2 * pause, 0.002)

def on_sigterm(signum, frame):  # the host's request to end the run (fallback without a cgroup)
    kill_descendants()
    os._exit(128 + signum)
"""

_SUPERVISOR = _COMMON + r"""

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
