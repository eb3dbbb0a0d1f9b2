"""The fork server: the supervisor of a :class:`~.session.SandboxSession`, one sandbox that runs
many responses' programs, one after another, and each of them many times (once per test),
without starting a new sandbox, a new interpreter or a new cgroup for either.

It is started like the supervisor (``python -I -S -c _FORKSERVER <spec as JSON>``, inside bwrap or
in the rlimits-only fallback) and shares its code (:data:`.supervisor._COMMON`). Once, at start, it
becomes a child subreaper and non-dumpable (programs of its own uid cannot read its memory or its
file descriptors through ``/proc``) and runs the *preload* program (trusted imports). It never
loads a program itself: for each response it forks a *response server*, ahead of time, which
waits for the response's first request. Three processes deep, then:

* the **root server** forks a response server, and the next one ahead of time; it waits until
  the first ends, kills whatever is left of it (its orphans come to the root, a subreaper too)
  and lets the next one start. It never reads a request: the response servers read exactly their
  own (length-prefixed frames) off the shared request pipe;
* the **response server** reads its response's first request, which loads the program: it runs
  the *setup* program (``setup.py``, trusted code of the caller: it may import modules and
  compile, never run, the untrusted program) and compiles the *main* program (``main.py``), both
  written by the host just before, into the program's ``__main__`` module (the root confined
  itself once, at start: the seccomp filter and a fresh session keyring come with every fork). Per
  test request (a JSON header, then the input's bytes) it starts one test process, and at the
  response's end request (or the end of the request pipe) it exits;
* a **test process** is forked *before* its test is known, while the previous test runs (the
  fork and the interpreter's after-fork work leave the test's critical path), and as a rule not
  by the response server but by the test process before it, while that one still waited for its
  own test (a copy of the server as it was after the load, then: nothing of a program has run in
  it). So the response server, which keeps writing its memory, shares it with no fork of its own
  once its first test has run: on this side of the fork no page is copied on the tests' path. A
  test process takes its own process group, its standard streams (stdin a memfd the server fills
  when the request comes, fresh pipes for stdout and stderr) and ``oom_score_adj`` 1000; then,
  when the server asks, it forks the test process after it (clone with ``CLONE_PARENT``: the
  server's child, not its own) and says its pid on a control socket, which it closes before its
  own test; the new process hands itself over on it (the server's ends of its streams) once it
  is set up. Then it waits. The server sets its rlimits (``prlimit``) and gives the word: it
  switches to a *fresh uid of its own* (when the server may switch uids, i.e. run by root),
  enters the working directory and runs the main program as ``__main__``.

The response server waits (pidfd) until the test process exits, its wall time runs out or an
output goes past its cap; then it kills the process, its process group and every other
descendant (orphans come to the subreaper, ``setsid()`` or not), wipes the working directories
(``/work``, ``/tmp``, ``/dev/shm``) as that uid and reports on the status pipe (a JSON line: wait
status, rusage, why it killed, where the time went, whether anything is left; then the captured
stdout and stderr). The next test therefore finds nothing of the previous one: no process, no
file, not even its uid; and the next response finds nothing of this one either, not even its
program in memory (its server is a fresh fork of the root, which never held a program). What the
wipe cannot remove ends the sandbox (the host starts another). What the namespaces could carry
from one process to another beyond that (System V IPC, POSIX message queues) the seccomp filter
refuses. The host gives a sandbox a next program only where each test runs as a uid of its own
(run by root): elsewhere the program shares its uid with the servers.

Nothing the host compares against (expected outputs) is ever sent here."""

from .supervisor import _COMMON

_FORKSERVER = _COMMON + r"""
import atexit, select, socket, struct, types

PR_SET_DUMPABLE = 4
END_OF_REQUESTS = 3  # a response server's exit code when the host closed the request pipe
uid_switch = spec["switch_uid"]
work, clean_dirs = spec["work"], spec["clean"]
clean_modes = {d: os.stat(d).st_mode & 0o7777 for d in clean_dirs}

def read_exactly(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)

def next_request():
    # A frame: the lengths of its JSON header and of its input (two little-endian u32), then both.
    # Read exactly, never past its end: what follows belongs to the next response's server.
    # (None, None) at the end of the pipe (the host is done).
    sizes = read_exactly(8)
    if sizes is None:
        return None, None
    n_head, n_data = struct.unpack("<II", sizes)
    body = read_exactly(n_head + n_data)
    if body is None:
        return None, None
    return json.loads(body[:n_head]), body[n_head:]

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

def new_streams():
    # A test process's streams: (the server's ends, the process's own ends). Its stdin is a memfd
    # the server fills when the request comes.
    made = [os.memfd_create("stdin", 0)]
    try:
        for _ in range(4):
            made += os.pipe()
    except OSError:
        close_all(made)
        raise
    in_fd, out_r, out_w, err_r, err_w, ready_r, ready_w, go_r, go_w = made
    return (in_fd, out_r, err_r, ready_r, go_w), (in_fd, out_w, err_w, go_r, ready_w)

def close_all(fds):
    for fd in fds:
        os.close(fd)

def close_all_but(keep):
    # Every descriptor from 3 up but those in `keep`.
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)

class Spare:
    # A test process forked before its test is known, and the server's ends of its streams. It is
    # forked either by this server (the first of a response, or when the chain broke) or by the
    # spare before it, while that one still waits for its own test (see `prepare_next`): that way
    # this server forks almost never, and its memory, which it keeps writing, is shared with no
    # other process (each page it writes while a fork of it lives is a page copied, on the tests'
    # path).
    def __init__(self, pid, uid, server_ends, fork_s, pidfd=None, forked_by="spare"):
        self.pid, self.uid, self.fork_s, self.forked_by = pid, uid, fork_s, forked_by
        self.in_fd, self.out_r, self.err_r, self.ready_r, self.go_w = server_ends
        self.pidfd = pidfd if pidfd is not None else os.pidfd_open(pid)
        self.prepared = False

    @classmethod
    def fork(cls):
        # Forked here (the server).
        t0 = time.monotonic()
        uid = fresh_uid() if uid_switch else None
        server_ends, own_ends = new_streams()
        try:
            pid = os.fork()
        except OSError:
            close_all(server_ends + own_ends[1:])
            raise
        if pid == 0:
            spare_life(own_ends, uid)  # (what it holds of this server's descriptors its set-up closes)
        close_all(own_ends[1:])
        return cls(pid, uid, server_ends, time.monotonic() - t0, forked_by="server")

    def prepare(self, token):
        # Ask it to fork the spare after it now (it has not run anything yet): the answer comes on
        # the control socket (see `receive_prepared`).
        os.write(self.go_w, b"p" + token)
        self.prepared = True

    def start(self, req, data):
        # Give it its input and its limits: it runs at once. False: it is gone (the previous
        # test's program, of the same uid in the fallback, killed it).
        if spec["chown_work"] and self.uid is not None:
            os.chown(work, self.uid, self.uid)  # (emptied by now: wipe() ran)
        write_all(self.in_fd, data)
        os.lseek(self.in_fd, 0, os.SEEK_SET)
        os.close(self.in_fd)
        self.in_fd = None
        try:
            for name, (soft, hard) in req["rlimits"].items():
                resource.prlimit(self.pid, getattr(resource, name), (soft, hard))
            os.write(self.go_w, b"g")
        except OSError:  # (gone; or, in the fallback, the previous test's program lowered its hard limits)
            return False
        os.close(self.go_w)
        self.go_w = None
        return True

    def close_fds(self):
        for name in ("in_fd", "go_w", "out_r", "err_r", "ready_r", "pidfd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def discard(self):
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError:
            pass
        if reaped.pop(self.pid, None) is None:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:  # (not this server's child yet: its zombie comes here later)
                pass
        self.close_fds()

# A spare forks the spare after it with clone(2)'s CLONE_PARENT: the copy's parent is then the
# server (as for a spare the server forked), not the spare, whose program would otherwise find a
# child it never started (and an os.wait() that never returns). os.fork() takes no clone flags:
# fork_sibling() is os.fork() (the interpreter's own before- and after-fork work, around the
# system call, with the GIL held throughout) with that flag, and with CLONE_CHILD_SETTID on the
# thread descriptor's tid (and CLEARTID), as the C library's fork() does (the field's offset from
# glibc's description of it for debuggers, checked here). What else that fork() does in the child
# (its pthread_atfork handlers, the robust-futex list, its internal locks reset) matters to
# threads and C libraries that this single-threaded server, its preload (the standard library)
# and a program's setup do not start or load before the fork. None where that cannot be done
# (another C library, another architecture): the server forks each test's process itself.
CLONE_PARENT, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID, SIGCHLD_NR = 0x00008000, 0x00200000, 0x01000000, 17

def sibling_forking():
    if spec["clone_nr"] is None:
        return None
    try:
        libc_gil = ctypes.PyDLL(None, use_errno=True)  # (its calls keep the GIL, as os.fork's)
        tid_field = (ctypes.c_uint32 * 3).in_dll(libc_gil, "_thread_db_pthread_tid")  # bits, count, offset
        libc_gil.pthread_self.restype = ctypes.c_void_p
        libc_gil.syscall.restype = ctypes.c_long
        for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Child", "PyOS_AfterFork_Parent"):
            getattr(ctypes.pythonapi, name).restype = None
    except (OSError, ValueError, AttributeError):
        return None
    if tuple(tid_field[:2]) != (32, 1):
        return None
    tid_address = libc_gil.pthread_self() + tid_field[2]
    if ctypes.c_int.from_address(tid_address).value != os.getpid():  # (the main thread's tid is the pid)
        return None
    return libc_gil, tid_address

def fork_sibling():
    libc_gil, tid_address = sibling_forking_with
    # (the child's tid pointer is the 4th argument on x86_64, the 5th on aarch64, whose 4th, the
    # TLS, is ignored without CLONE_SETTLS: both get it)
    flags = CLONE_PARENT | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD_NR
    args = [ctypes.c_long(spec["clone_nr"]), ctypes.c_ulong(flags), ctypes.c_ulong(0), ctypes.c_ulong(0),
            ctypes.c_ulong(tid_address), ctypes.c_ulong(tid_address)]
    pid = -1
    ctypes.pythonapi.PyOS_BeforeFork()
    try:
        pid = libc_gil.syscall(*args)
        err = ctypes.get_errno()
    finally:
        if pid == 0:
            ctypes.pythonapi.PyOS_AfterFork_Child()
        else:
            ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid

def send_word(parts, fds=()):
    # False: the server is gone.
    try:
        if fds:
            ctl.sendmsg(parts, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            ctl.sendmsg(parts)
    except OSError:
        return False
    return True

def prepare_next(token):
    # Fork the spare after this one (fork_sibling), a copy of this process as it is now (it has
    # run nothing of a program). In the copy: its own streams and uid, and what it hands itself
    # over to the server with once its set-up is done (it goes round spare_life's loop). Here:
    # None (and, if the fork failed, word of it to the server). As little as possible runs here
    # after the fork: each page this process writes then is a page copied.
    t0 = time.monotonic()
    uid = fresh_uid() if uid_switch else None
    try:
        server_ends, own = new_streams()
    except OSError:
        send_word([token, b"f"])
        return None
    try:
        pid = fork_sibling()
    except OSError:
        pid = None
        send_word([token, b"f"])
    if pid == 0:
        return own, uid, (token, server_ends, t0)
    if pid is not None:
        send_word([token, b"c", struct.pack("<i", pid)])
    close_all(server_ends + own[1:])
    return None

def spare_life(own, uid, handover=None):
    # A test process, from its fork to its test. Before the request, everything that does not
    # depend on it; then, if told to, it forks the spare after it (a copy of this process as it is
    # now: it has run nothing of the program), and waits for its test. The spare after it goes
    # round the same loop (no deeper call stack from one generation to the next), inherits what
    # this one set up for the whole process (SIGTERM's action, oom_score_adj), and hands itself
    # over to the server (`handover`: the token, the server's ends of its streams) only once it is
    # in its own process group and holds nothing of this one's descriptors.
    forked_by_the_server = True
    while True:
        in_fd, out_w, err_w, go_r, ready_w = own
        try:
            os.setpgid(0, 0)  # its own process group, killed whole after the test
            os.dup2(in_fd, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            # only these and the standard streams stay open (and, until it is handed over, the
            # server's ends of its streams)
            close_all_but({go_r, ready_w, ctl.fileno(), *(handover[1] if handover else ())})
            if handover is not None:
                token, server_ends, t0 = handover
                handover = None
                word = struct.pack("<qid", -1 if uid is None else uid, os.getpid(), time.monotonic() - t0)
                if not send_word([token, b"h", word], server_ends):
                    os._exit(0)
                close_all(server_ends)
            if forked_by_the_server:
                forked_by_the_server = False
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                try:
                    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                    try:
                        os.write(fd, b"1000")
                    finally:
                        os.close(fd)
                except OSError:
                    pass
            if not spec["seccomp"]:  # (nothing refuses keyctl: a keyring of its own, not the server's)
                join_fresh_keyring()
        except BaseException as exc:
            try:
                os.write(ready_w, repr(exc).encode()[:2000])
            except OSError:
                pass
            os._exit(127)
        word = os.read(go_r, 5)
        if word[:1] == b"p":
            successor = prepare_next(word[1:5])
            if successor is not None:  # (this is the spare after it: round the loop with its own streams)
                own, uid, handover = successor
                continue
            word = os.read(go_r, 1)
        ctl.close()  # (before its test: the program never holds the control socket)
        break
    # Its test: the server has set its rlimits (prlimit) and filled its stdin by now.
    if word != b"g":  # discarded before its test
        os._exit(0)
    try:
        if uid is not None:  # (after the rlimits: root may raise a hard limit, the fresh uid not)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # from root to a non-zero uid: all capabilities are dropped
        os.chdir(work)  # (its own now)
        os.write(ready_w, b"k")
        os.close(go_r)
        os.close(ready_w)
    except BaseException as exc:
        try:
            os.write(ready_w, repr(exc).encode()[:2000])
        except OSError:
            pass
        os._exit(127)
    if main_error is not None:  # as the interpreter reports a program that does not compile
        sys.excepthook(type(main_error), main_error.with_traceback(None), None)
        os._exit(finish(1))
    code = 0
    try:
        exec(main_code, main_globals)
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

def remove_tree_contents(dir_fd):
    # Everything under the directory open as `dir_fd`, through directory descriptors (no path
    # gets too long, however deep the tree), depth first without recursion.
    stack = [(dir_fd, None)]
    while stack:
        fd, name_in_parent = stack[-1]
        try:
            entries = list(os.scandir(fd))
        except OSError:
            entries = []
        sub = None
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    os.chmod(entry.name, 0o700, dir_fd=fd)  # (the test may have made it unreadable)
                    sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    stack.append((sub, entry.name))
                    break
                os.unlink(entry.name, dir_fd=fd)
            except OSError:
                pass
        if sub is not None:
            continue
        stack.pop()  # (emptied, as far as it can be)
        if name_in_parent is not None:
            os.close(fd)
            try:
                os.rmdir(name_in_parent, dir_fd=stack[-1][0])
            except OSError:
                pass

def is_empty(d):
    try:
        with os.scandir(d) as it:
            return not any(True for _ in it)
    except OSError:  # (unreadable: it may hold anything)
        return False

def wipe(uid):
    # The next test starts with empty working directories. Only the test's uid owns what it left
    # (the server, root without CAP_DAC_OVERRIDE inside bwrap, may not remove it): a short-lived
    # child of that uid removes it, and only when there is something to remove. Where the
    # directories themselves are the test's (no uid switch) their modes are restored first.
    # False: something is left (the sandbox must not serve another response).
    dirty = [d for d in clean_dirs if not is_empty(d)]
    if not dirty:
        return True
    pid = os.fork()
    if pid == 0:
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            for d in dirty:
                try:
                    os.chmod(d, clean_modes[d])
                except OSError:
                    pass
                try:
                    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    continue
                remove_tree_contents(fd)
                os.close(fd)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return all(is_empty(d) for d in dirty)

spares = []  # the next tests' processes, in order: forked ahead, each (mostly) by the one before
# The spare asked to fork the one after it, until that one is handed over: {"token", "asker", and
# "pid" and "pidfd" of the spare it forks once it has said so}.
pending = None
# How long the server waits for the spare being forked, at a test's start and at its end: well
# within the host's grace past a test's time limit (session._REPLY_GRACE_S), so that a stalled
# spare costs the server a fork of its own, never the test its result.
PREPARE_WAIT_S = 0.5

def ask_to_prepare(sp):
    global pending, last_token
    last_token = (last_token + 1) & 0xFFFFFFFF
    token = last_token.to_bytes(4, "little")
    sp.prepare(token)
    pending = {"token": token, "asker": sp, "pid": None, "pidfd": None}

def receive_prepared(wait_s, until="handover"):
    # The words on the control socket about the spare being forked: its pid from the spare that
    # forks it, right after the fork ("c"), then the spare itself, once it is set up ("h": the
    # server's ends of its streams), which joins the queue; or word that the fork failed ("f").
    # Waits `wait_s` at most (0: takes what came) until the handover, or `until="pid"` only until
    # the pid is known (enough to tell the spare from a test's leftovers). A spare too slow to
    # answer in `wait_s`, or whose asker died, is given up on (the next test's process is then
    # forked by this server); an answer to an earlier request (late) is dropped, its spare with it
    # (it reads the end of its request pipe and exits).
    global pending
    deadline = time.monotonic() + wait_s
    while pending is not None and not (until == "pid" and pending["pid"] is not None):
        if pending["asker"].pidfd is None:  # (discarded: the program killed it)
            give_up_on_pending(discard_asker=False)
            return
        poller = select.poll()
        poller.register(ctl_srv, select.POLLIN)
        poller.register(pending["asker"].pidfd, select.POLLIN)
        if pending["pidfd"] is not None:
            poller.register(pending["pidfd"], select.POLLIN)
        left = deadline - time.monotonic()
        events = dict(poller.poll(max(0.0, left) * 1000))
        if not events:
            if wait_s > 0:  # (too slow: it may be forking still, and must not get its test meanwhile)
                give_up_on_pending(discard_asker=True)
            return
        if ctl_srv.fileno() not in events:
            # The asker died, or the spare it forked did (the asker is as good as any other spare).
            give_up_on_pending(discard_asker=pending["asker"].pidfd in events)
            return
        msg, fds, _, _ = socket.recv_fds(ctl_srv, 64, 5)
        kind = msg[4:5]
        if msg[:4] != pending["token"] or (kind == b"h") != (len(fds) == 5) or kind not in (b"c", b"f", b"h"):
            close_all(fds)  # (an earlier request's)
            continue
        if kind == b"c":
            pending["pid"] = struct.unpack("<i", msg[5:9])[0]
            try:
                pending["pidfd"] = os.pidfd_open(pending["pid"])
            except OSError:  # (gone already)
                give_up_on_pending(discard_asker=False)
        elif kind == b"f":
            give_up_on_pending(discard_asker=False)
        else:
            uid, pid, fork_s = struct.unpack("<qid", msg[5:25])
            if pending["pid"] not in (None, pid):  # (not the process the asker forked)
                close_all(fds)
                give_up_on_pending(discard_asker=True)
                return
            pidfd, pending = pending["pidfd"], None  # (its pidfd goes to the Spare)
            try:
                # (its pidfd, if its pid came first; else by pid, safe: none but this server reaps it)
                spares.append(Spare(pid, None if uid < 0 else uid, fds, fork_s, pidfd=pidfd))
            except OSError:  # (gone already)
                close_all(fds)

def forget_pending():
    global pending
    if pending["pidfd"] is not None:
        os.close(pending["pidfd"])
    pending = None

def give_up_on_pending(discard_asker):
    # No spare after the asker this time (the next test's process is forked by this server).
    asker, pid, pidfd = pending["asker"], pending["pid"], pending["pidfd"]
    if pidfd is not None:  # (this server's child)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (OSError, ChildProcessError):  # (reaped already)
            pass
    forget_pending()
    if discard_asker and asker in spares:
        spares.remove(asker)
        asker.discard()

def keep_spares():
    # The pids of this server's children that are no test's leftovers.
    keep = {sp.pid for sp in spares}
    if pending is not None and pending["pid"] is not None:
        keep.add(pending["pid"])
    return keep

def run_one(req, data):
    t_request = time.monotonic()
    if pending is not None:
        receive_prepared(PREPARE_WAIT_S)
    s = spares.pop(0) if spares else None
    if s is None or not s.start(req, data):
        if s is not None:
            s.discard()
        s = Spare.fork()
        if not s.start(req, data):
            raise RuntimeError("a test's process ended before its test")
    t0 = time.monotonic()
    # The next test's process is ready (it forked while the previous test ran); it now forks the
    # one after it, while this test runs. It is of another uid (run by root), or non-dumpable and
    # of no use to the program (the fallback); one the program killed is replaced at its test.
    try:
        if not spares:  # (the chain broke, or the response's first test: this server forks)
            spares.append(Spare.fork())
        if not spares[0].prepared and pending is None and sibling_forking_with is not None:
            ask_to_prepare(spares[0])
    except OSError:  # (the program holds every task the cgroup allows: the next test forks its own)
        pass
    cap = req["cap"]
    out = {s.out_r: bytearray(), s.err_r: bytearray()}
    poller = select.poll()
    for fd in (s.out_r, s.err_r, s.pidfd):
        poller.register(fd, select.POLLIN)
    if pending is not None:
        poller.register(ctl_srv, select.POLLIN)
    open_fds = {s.out_r, s.err_r}
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
            if fd == s.pidfd:
                exited = True
            elif fd == ctl_srv.fileno():  # (word of the spare being forked)
                receive_prepared(0)
                if pending is None:
                    poller.unregister(fd)
            else:
                read_from(fd)
                if len(out[fd]) > cap:
                    killed_for = "output_limit"
                    exited = True
    if killed_for is not None:
        signal.pidfd_send_signal(s.pidfd, signal.SIGKILL)
    _, wait_status, usage = os.wait4(s.pid, 0)
    t_exit = time.monotonic()
    if pending is not None:
        # (the spare being forked while this test ran is this server's child: not a leftover)
        receive_prepared(PREPARE_WAIT_S, until="pid")
    # What the program wrote before it ended.
    for fd in list(open_fds):
        os.set_blocking(fd, False)
        while fd in open_fds and len(out[fd]) <= cap:
            try:
                if not read_from(fd):
                    break
            except BlockingIOError:
                break
    # Anything it left running (its orphans come to this subreaper: no child of this process but
    # the next test's means no process of the test is left) is killed, then the rest of its
    # output read to EOF.
    keep = keep_spares()
    leftovers = bool(open_fds) or any(pid not in keep for pid in children(os.getpid()))
    if leftovers:
        try:
            os.killpg(s.pid, signal.SIGKILL)
        except OSError:
            pass
        reaped.clear()  # (only this sweep's: a pid reaped earlier may be a spare's by now)
        kill_descendants(keep=keep)
        for sp in [sp for sp in spares if sp.pid in reaped]:  # (the program killed it)
            if pending is not None and pending["asker"] is sp:
                give_up_on_pending(discard_asker=False)
            spares.remove(sp)
            sp.discard()
        for fd in list(open_fds):
            os.set_blocking(fd, True)
            while fd in open_fds and len(out[fd]) <= cap and read_from(fd):
                pass
    ready = os.read(s.ready_r, 4096)
    s.close_fds()
    setup_error = None if ready == b"k" else ready.decode(errors="replace") or "the test's process ended before its program"
    stdout, stderr = (bytes(buf[: cap + 1]) for buf in out.values())
    clean = wipe(s.uid)  # (a few directory reads; a process to remove files only when there are some)
    head = {"event": "test", "unclean": not clean, "forked_by": s.forked_by, "wait_status": wait_status, "maxrss_kb": usage.ru_maxrss,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": t_exit - t0, "killed_for": killed_for,
            "setup_error": setup_error, "out": len(stdout), "err": len(stderr),
            # where the test's time went, from the request's arrival (for the grading benchmark)
            "phases": {"dispatch": t0 - t_request, "run": t_exit - t0,
                       "collect": time.monotonic() - t_exit, "fork": s.fork_s, **phases_ahead}}
    phases_ahead.clear()
    write_all(status_fd, json.dumps(head).encode() + b"\n" + stdout + stderr)
    return clean

def load(req):
    # The first request names the program: setup.py and main.py have been written by now. The
    # program's __main__ module and sys.argv are set up here, once, so that a test's process
    # touches as little of this one's memory as it can (each page it writes is copied).
    global main_globals, main_code, main_error
    main = types.ModuleType("__main__")
    main_globals = main.__dict__
    main_globals.update(__file__=spec["code_file"], __builtins__=__builtins__, _PRELOADED=preloaded)
    with open(spec["setup_file"], encoding="utf-8") as f:
        exec(compile(f.read(), spec["setup_file"], "exec"), main_globals)
    with open(spec["code_file"], encoding="utf-8") as f:
        main_source = f.read()
    try:
        main_code, main_error = compile(main_source, spec["code_file"], "exec"), None
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        main_code, main_error = None, e
    sys.argv = list(req["argv"])
    sys.modules["__main__"] = main

phases_ahead = {}  # (the load's time, reported with the first test)

def serve_one_response(handover_w):
    # The response server (a fresh fork of the root): load, the tests, exit. At the response's
    # end it kills the test processes it had ready and tells the root at once that it reads
    # no more requests (the next response's server may start while this one exits).
    global ctl_srv, ctl, last_token
    reaped.clear()  # (the root's)
    # The control socket on which a spare hands over the spare it forked (its pid and the server's
    # ends of its streams): `ctl` is the spares' end (each closes it before its test), `ctl_srv`
    # this server's.
    ctl_srv, ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    last_token = 0
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass
    req, _ = next_request()
    if req is None:
        os._exit(END_OF_REQUESTS)
    t_load = time.monotonic()
    try:
        load(req)
    except BaseException as exc:
        report(event="setup_failed", error=repr(exc))
        os._exit(127)
    phases_ahead["load"] = time.monotonic() - t_load
    while True:
        req, data = next_request()
        if req is None or req.get("end"):
            break
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            clean = run_one(req, data)
        except Exception as exc:  # (a fork failed, say): the test is the sandbox's failure, not the program's
            report(event="test", unclean=True, setup_error=f"the sandbox's server failed: {exc!r}", wait_status=0,
                   maxrss_kb=0, cpu_s=0.0, wall_s=0.0, killed_for=None, out=0, err=0)
            clean = False
        if not clean:  # (files it could not remove: no further test or response runs here)
            kill_descendants()
            os._exit(127)
    if req is None:
        kill_descendants()  # (the spares)
        os._exit(END_OF_REQUESTS)
    for sp in spares:
        try:
            signal.pidfd_send_signal(sp.pidfd, signal.SIGKILL)  # (reaped by the root)
        except OSError:
            pass
    os.write(handover_w, b"d")
    os._exit(0)

try:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
except OSError:
    pass  # the cgroup (or the PID namespace) still ends every leftover with the session
signal.signal(signal.SIGTERM, on_sigterm)
try:
    prctl(PR_SET_DUMPABLE, 0)
except OSError:
    pass
sibling_forking_with = sibling_forking()
preloaded = {}  # (each program's setup sees it as _PRELOADED)
try:
    # Trusted imports, before any program is known: a session is started ahead of time with them,
    # so that loading a program later costs only its compilation. Then the confinement every
    # process from here on shares (the seccomp filter, a fresh session keyring: a fork inherits
    # both), set up once.
    exec(compile(spec["preload"], "<preload>", "exec"), preloaded)
    confine()
except BaseException as exc:
    report(event="setup_failed", error=repr(exc))
    os._exit(127)
report(event="started", pid=os.getpid())
os.set_inheritable(status_fd, False)

def fork_response_server():
    # Forked ahead of its response (while the previous one is served): it waits for the root's
    # word that the previous server reads no more requests before it reads one. (pid, the
    # word's pipe, the pipe on which it says it is done)
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(done_r)
        if os.read(go_r, 1) != b"g":  # (the root ended)
            os._exit(END_OF_REQUESTS)
        os.close(go_r)
        serve_one_response(done_w)
    os.close(go_r)
    os.close(done_w)
    return pid, go_w, done_r

def start_response_server(server):
    # The response server `server` may read requests now; False: it is gone.
    try:
        os.write(server[1], b"g")
        return True
    except BrokenPipeError:
        return False
    finally:
        os.close(server[1])

def fork_retrying():
    # (A test of the current response may hold every task the cgroup allows for a moment.)
    for attempt in range(100):
        try:
            return fork_response_server()
        except OSError:
            time.sleep(0.05)
    return fork_response_server()

current = fork_retrying()
start_response_server(current)
while True:
    following = fork_retrying()
    handed_over = os.read(current[2], 1) == b"d"  # (else it ended without a word)
    os.close(current[2])
    if handed_over and not start_response_server(following):
        # (it died before it was told to start: it read nothing; one more)
        os.close(following[2])
        following = fork_retrying()
        handed_over = start_response_server(following)
    status = reaped.pop(current[0], None)  # (reaped last round already: see below)
    if status is None:
        _, status = os.waitpid(current[0], 0)
    reaped.clear()
    kill_descendants(keep={following[0]})  # whatever the response left (its killed spares)
    ended = reaped.get(following[0])
    if ended is not None:
        # It ended already. After a whole response of its own (exit code 0: it handed over, and
        # the next round reads its word and takes its status from `reaped`), or not.
        reaped.clear()
        reaped[following[0]] = ended
        if handed_over and not (os.WIFEXITED(ended) and os.WEXITSTATUS(ended) == 0):
            handed_over = False  # (it died after it started: it may have read requests)
            status = ended
    if handed_over:
        current = following
        continue
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == END_OF_REQUESTS):
        # (it failed to load, or was killed: the host sees the status pipe close)
        report(event="lost", wait_status=status)
    break
kill_descendants()
"""
