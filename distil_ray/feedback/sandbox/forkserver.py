"""The fork server: the supervisor of a :class:`~.session.SandboxSession`, one sandbox that runs
the same program many times (once per test of a response) without starting a new sandbox, a new
interpreter or a new cgroup each time.

It is started like the supervisor (``python -I -S -c _FORKSERVER <spec as JSON>``, inside bwrap or
in the rlimits-only fallback) and shares its code (:data:`.supervisor._COMMON`). Once, at start, it
becomes a child subreaper and non-dumpable (programs of its own uid cannot read its memory or its
file descriptors through ``/proc``) and runs the *preload* program (trusted imports). A session
may be started that far ahead of time, before its program is known (a spare). Its first request
then loads the program: the server runs the *setup* program (``setup.py``, trusted code of the
caller: it may import modules and compile, never run, the untrusted program) in a namespace, and
compiles the *main* program (``main.py``), both written by the host just before.

Then, per request read from its standard input (a JSON line, then the input's bytes), it forks a
child that takes its own process group, gets the input as standard input (a memfd) and fresh
pipes as stdout/stderr, sets the request's rlimits, switches to a *fresh uid of its own* (when the
server may switch uids, i.e. run by root), joins a fresh session keyring, installs the seccomp
filter and runs the main program as ``__main__`` in a copy of the setup namespace (the fork gives
it that copy). The server waits (pidfd) until the child exits, its wall time runs out or an output
goes past its cap; then it kills the child, its process group and every other descendant (orphans
come to the subreaper, ``setsid()`` or not), wipes the working directories (``/work``, ``/tmp``,
``/dev/shm``) as that uid, and reports on the status pipe: a JSON line (wait status, rusage, why
it killed) followed by the captured stdout and stderr. The next child therefore finds nothing of
the previous one: no process, no file, not even its uid.

Nothing the host compares against (expected outputs) is ever sent here."""

from .supervisor import _COMMON

_FORKSERVER = _COMMON + r"""
import atexit, select, types

PR_SET_DUMPABLE = 4
uid_switch = spec["switch_uid"]
work, clean_dirs, argv = spec["work"], spec["clean"], []

def read_exactly(n, buf):
    while len(buf) < n:
        chunk = os.read(0, max(n - len(buf), 1 << 16))
        if not chunk:
            return None
        buf += chunk
    return buf

inbuf = bytearray()

def next_request():
    # A JSON line, then header["n"] bytes of input; None at end of file (the host is done).
    global inbuf
    while b"\n" not in inbuf:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return None, None
        inbuf += chunk
    line, _, rest = bytes(inbuf).partition(b"\n")
    req = json.loads(line)
    data = read_exactly(req["n"], bytearray(rest))
    if data is None:
        return None, None
    inbuf = bytearray(data[req["n"]:])
    return req, bytes(data[:req["n"]])

def write_all(fd, data):
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]

def fresh_uid():
    return (1 << 30) + int.from_bytes(os.urandom(4), "little") % (1 << 30)

def exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except BaseException:
        pass
    return 1

def finish(code):
    # What the interpreter does at exit that a program can observe: wait for its non-daemon
    # threads, run its atexit handlers, flush its output (a failed flush is exit code 120).
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:
        pass
    try:
        sys.stdout.flush()
    except BaseException:
        code = code or 120
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    return code

def child(req, in_fd, out_w, err_w, ready_w, uid):
    try:
        os.setpgid(0, 0)  # its own process group, killed whole after the test
        os.dup2(in_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        for name, (soft, hard) in req["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # from root to a non-zero uid: all capabilities are dropped
        confine()
        os.chdir(work)
        # Only stdin/stdout/stderr stay open (not the request and status pipes, not ready_w).
        os.closerange(3, 1 << 20)
    except BaseException as exc:
        try:
            os.write(ready_w, repr(exc).encode()[:2000])
        except OSError:
            pass
        os._exit(127)
    sys.argv = list(argv)
    main = types.ModuleType("__main__")
    main.__dict__.update(namespace)
    sys.modules["__main__"] = main
    if main_error is not None:  # as the interpreter reports a program that does not compile
        sys.excepthook(type(main_error), main_error.with_traceback(None), None)
        os._exit(finish(1))
    code = 0
    try:
        exec(main_code, main.__dict__)
    except SystemExit as e:
        code = exit_code(e)
    except BaseException as e:
        # As the interpreter reports an uncaught exception: without this function's frame.
        e.__traceback__ = e.__traceback__.tb_next if e.__traceback__ is not None else None
        try:
            sys.excepthook(type(e), e, e.__traceback__)
        except BaseException:
            pass
        code = 1
    os._exit(finish(code))

def remove_tree_contents(path):
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)  # (the test may have made it unreadable)
                remove_tree_contents(entry.path)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass

def wipe(uid):
    # The next test starts with empty working directories. Only the test's uid owns what it left
    # (the server, root without CAP_DAC_OVERRIDE inside bwrap, may not remove it): a short-lived
    # child of that uid removes it, and only when there is something to remove.
    dirty = []
    for d in clean_dirs:
        try:
            with os.scandir(d) as it:
                if any(True for _ in it):
                    dirty.append(d)
        except OSError:
            pass
    if not dirty:
        return
    pid = os.fork()
    if pid == 0:
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            for d in dirty:
                remove_tree_contents(d)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

def run_one(req, data):
    uid = fresh_uid() if uid_switch else None
    in_fd = os.memfd_create("stdin", 0)
    write_all(in_fd, data)
    os.lseek(in_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    if spec["chown_work"] and uid is not None:
        os.chown(work, uid, uid)
    cap = req["cap"]
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req, in_fd, out_w, err_w, ready_w, uid)
    for fd in (in_fd, out_w, err_w, ready_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    out = {out_r: bytearray(), err_r: bytearray()}
    poller = select.poll()
    for fd in (out_r, err_r, pidfd):
        poller.register(fd, select.POLLIN)
    open_fds = {out_r, err_r}
    deadline = t0 + req["timeout_s"]
    killed_for = None

    def read_from(fd):
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            poller.unregister(fd)
            open_fds.discard(fd)
            return False
        buf = out[fd]
        if len(buf) <= cap:
            buf += chunk[: cap + 1 - len(buf)]
        return True

    exited = False
    while not exited:
        left = deadline - time.monotonic()
        if left <= 0:
            killed_for = "timeout"
            break
        for fd, _ in poller.poll(left * 1000):
            if fd == pidfd:
                exited = True
            else:
                read_from(fd)
                if len(out[fd]) > cap:
                    killed_for = "output_limit"
                    exited = True
    if killed_for is not None:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _, wait_status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    os.close(pidfd)
    # What the program wrote before it ended, then everything it left running is killed (its
    # process group first, then every descendant the subreaper holds), then the rest to EOF.
    for fd in list(open_fds):
        os.set_blocking(fd, False)
        while fd in open_fds and len(out[fd]) <= cap:
            try:
                if not read_from(fd):
                    break
            except BlockingIOError:
                break
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    kill_descendants()
    for fd in list(open_fds):
        os.set_blocking(fd, True)
        while fd in open_fds and len(out[fd]) <= cap and read_from(fd):
            pass
    for fd in (out_r, err_r):
        os.close(fd)
    setup_error = os.read(ready_r, 4096).decode(errors="replace")
    os.close(ready_r)
    wipe(uid)
    stdout, stderr = bytes(out[out_r][: cap + 1]), bytes(out[err_r][: cap + 1])
    head = {"event": "test", "wait_status": wait_status, "maxrss_kb": usage.ru_maxrss,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "killed_for": killed_for,
            "setup_error": setup_error or None, "out": len(stdout), "err": len(stderr)}
    write_all(status_fd, json.dumps(head).encode() + b"\n" + stdout + stderr)

try:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
except OSError:
    pass  # the cgroup (or the PID namespace) still ends every leftover with the session
signal.signal(signal.SIGTERM, on_sigterm)
try:
    prctl(PR_SET_DUMPABLE, 0)
except OSError:
    pass
try:
    # Trusted imports, before any program is known: a spare session is started ahead of time
    # with them, so that loading the program later costs only its compilation.
    exec(compile(spec["preload"], "<preload>", "exec"), {})
except BaseException as exc:
    report(event="setup_failed", error=repr(exc))
    os._exit(127)
report(event="started", pid=os.getpid())
os.set_inheritable(status_fd, False)

def load(req):
    # The first request names the program: setup.py and main.py have been written by now.
    global namespace, main_code, main_error, argv
    argv = req["argv"]
    namespace = {"__name__": "__main__", "__file__": spec["code_file"], "__builtins__": __builtins__}
    with open(spec["setup_file"], encoding="utf-8") as f:
        exec(compile(f.read(), spec["setup_file"], "exec"), namespace)
    with open(spec["code_file"], encoding="utf-8") as f:
        main_source = f.read()
    try:
        main_code, main_error = compile(main_source, spec["code_file"], "exec"), None
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        main_code, main_error = None, e

req, _ = next_request()
if req is None:
    os._exit(0)
try:
    load(req)
except BaseException as exc:
    report(event="setup_failed", error=repr(exc))
    os._exit(127)
while True:
    req, data = next_request()
    if req is None:
        break
    sys.stdout.flush()
    sys.stderr.flush()
    run_one(req, data)
kill_descendants()
"""
