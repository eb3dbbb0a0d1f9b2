"""Containment tests for ``distil_ray.feedback.sandbox``.

Every hostile program gets a unique marker string in its argv (``args=[marker]``), so every
process it forks carries the marker in its command line; "no survivors" means no process on the
host still has it. Tests of namespace guarantees are skipped (with bubblewrap's reason) where
bwrap does not work; the destructive ones never run in the rlimits-only mode. Tests of the per-run
cgroup are skipped (with the reason) where this process cannot create cgroups, and those of the
seccomp filter on an architecture without one.

Every test runs twice: with one sandbox per run (``Sandbox.run``) and through a session's fork
server (``Sandbox.session``, as the code harness runs responses), where each run is a child
forked inside an already started sandbox that has served an earlier program.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from distil_ray.feedback import sandbox
from distil_ray.feedback.sandbox import cgroup as sandbox_cgroup
from distil_ray.feedback.sandbox import runner as sandbox_runner
from distil_ray.feedback.sandbox import seccomp as sandbox_seccomp
from distil_ray.feedback.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxSettings,
    SandboxUnavailable,
    bwrap_status,
    run_python,
)

pytestmark = pytest.mark.timeout(30)

BWRAP_OK, BWRAP_WHY = bwrap_status()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {BWRAP_WHY}")
REPO = Path(__file__).resolve().parents[2]
MODES = [pytest.param("bwrap", marks=needs_bwrap), "rlimits"]
CGROUP_LAYOUT = sandbox_cgroup._cgroup_layout()  # ("v1" | "v2", parent dirs), or why no cgroup can be made
needs_cgroup = pytest.mark.skipif(isinstance(CGROUP_LAYOUT, str),
                                  reason=f"no writable cgroup on this machine: {CGROUP_LAYOUT}")
ABI = sandbox_seccomp._seccomp_for_host()[0]
needs_seccomp = pytest.mark.skipif(ABI is None, reason=f"no seccomp filter for {os.uname().machine}")


def run_in_session(self: Sandbox, code: str, stdin: str | bytes = "", args=()) -> sandbox.SandboxResult:
    # As the code harness runs a response: in a sandbox that served an earlier one.
    with self.session("print('an earlier response')", args=args) as session:
        earlier = session.run("")
        if earlier.status == "sandbox_error":  # (the sandbox did not start: the program would not either)
            return earlier
        assert (earlier.status, earlier.stdout) == ("ok", "an earlier response\n"), earlier
        session.unload()
        session.load(code, args=args)
        return session.run(stdin)


@pytest.fixture(autouse=True, params=["per_test", "per_response"])
def execution(request, monkeypatch) -> str:
    """Each test in both execution modes: ``Sandbox.run`` (and so ``run_python``) goes through a
    session in the second."""
    if request.param == "per_response":
        monkeypatch.setattr(Sandbox, "run", run_in_session)
    return request.param


@pytest.fixture
def marker() -> str:
    return f"sbxmark{uuid.uuid4().hex}"


def survivors(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def assert_no_survivors(marker: str) -> None:
    assert survivors(marker) == []
    time.sleep(0.3)  # nothing may appear late either (e.g. a fork still in flight)
    left = survivors(marker)
    for p in left:  # keep the host clean even when the test fails
        try:
            p.kill()
        except psutil.Error:
            pass
    assert left == []


# -- ordinary programs --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ok_program_with_stdin(mode):
    res = run_python("import sys\nfor line in sys.stdin:\n    print(int(line) * 2)\n", "1\n2\n21\n",
                     timeout_s=10, isolation=mode)
    assert res.status == "ok", res
    assert res.stdout == "2\n4\n42\n"
    assert res.returncode == 0 and res.stderr == ""
    assert res.isolation == ("bwrap" if mode == "bwrap" else "rlimits-only")
    assert res.wall_s > 0


@pytest.mark.parametrize("mode", MODES)
def test_runtime_error_has_traceback(mode):
    res = run_python("print('before')\nraise ValueError('boom')\n", isolation=mode)
    assert res.status == "runtime_error"
    assert res.returncode == 1
    assert res.stdout == "before\n"
    assert "Traceback" in res.stderr and "ValueError: boom" in res.stderr


def test_syntax_error():
    res = run_python("def f(:\n    pass\n")
    assert res.status == "runtime_error"
    assert res.returncode == 1
    assert "SyntaxError" in res.stderr


def test_exit_code_and_args_are_passed():
    res = run_python("import sys\nprint(sys.argv[1:])\nsys.exit(7)\n", args=["a", "b c"])
    assert res.status == "runtime_error" and res.returncode == 7
    assert res.stdout == "['a', 'b c']\n"


def test_large_stdin_and_unread_stdin():
    data = "x" * (3 << 20) + "\n"
    res = run_python("import sys\nprint(len(sys.stdin.read()))\n", data)
    assert res.status == "ok" and res.stdout == f"{len(data)}\n"
    res = run_python("print('ignored stdin')\n", data)  # never reads: must not hang or fail
    assert res.status == "ok" and res.stdout == "ignored stdin\n"


def test_parallel_runs_are_independent():
    code = "import sys, time\ntime.sleep(0.2)\nprint(sys.stdin.read().upper())\n"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: run_python(code, s), ["a", "b", "c", "d"]))
    assert [r.stdout for r in results] == ["A\n", "B\n", "C\n", "D\n"]


# -- time, memory, output ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode, marker):
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", timeout_s=1.0, isolation=mode, args=[marker])
    elapsed = time.monotonic() - t0
    assert res.status == "timeout"
    assert res.returncode is None
    assert 1.0 <= res.wall_s < 2.0 and elapsed < 2.5
    assert_no_survivors(marker)


@pytest.mark.parametrize("code", [
    "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
    "s = 'y' * (1 << 20)\nparts = []\nwhile True:\n    parts.append(s + str(len(parts)))\n",
], ids=["growing-list", "growing-strings"])
@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb(mode, code, marker):
    res = run_python(code, timeout_s=10, memory_mb=256, isolation=mode, args=[marker])
    assert res.status == "memory_limit", res
    assert "MemoryError" in res.stderr
    assert res.peak_rss_mb is not None and res.peak_rss_mb <= 256  # the host never lent it more
    assert_no_survivors(marker)


def test_single_oversized_request_is_a_runtime_error():
    # It fails at once without using memory: nothing but the program's own stderr would say
    # "memory", and that text alone is not trusted.
    res = run_python("x = bytearray(4 * 1024 ** 3)\n", timeout_s=10, memory_mb=256)
    assert res.status == "runtime_error", res
    assert "MemoryError" in res.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped_without_buffering(stream, marker):
    me = psutil.Process()
    rss_before = me.memory_info().rss
    code = f"import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(200):\n    sys.{stream}.write(chunk)\n"
    res = run_python(code, timeout_s=20, max_output_bytes=1 << 20, args=[marker])
    growth = me.memory_info().rss - rss_before
    assert res.status == "output_limit"
    assert len(getattr(res, stream)) <= 1 << 20
    assert growth < 50 << 20, f"parent RSS grew by {growth / 2**20:.1f} MB"
    assert_no_survivors(marker)


# -- processes ---------------------------------------------------------------------------------

FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""

MP_BOMB = """
import multiprocessing as mp, time

def bomb():
    while True:
        try:
            mp.Process(target=bomb).start()
        except OSError:
            time.sleep(0.01)

if __name__ == "__main__":
    bomb()
"""


@needs_bwrap
@pytest.mark.parametrize("code", [FORK_BOMB, MP_BOMB], ids=["os.fork", "multiprocessing"])
def test_fork_bomb_is_contained(code, marker, execution):
    peak, stop = [0], threading.Event()

    def watch():  # the most processes of this run alive at once, sampled
        while not stop.is_set():
            peak[0] = max(peak[0], len(survivors(marker)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = run_python(code, timeout_s=2.0, isolation="bwrap", max_processes=32, args=[marker])
    finally:
        stop.set()
        watcher.join(5)
    assert res.status in ("timeout", "runtime_error"), res
    assert res.wall_s < 4.0
    # the program's processes (RLIMIT_NPROC) plus bwrap, the namespace's init and the supervisor;
    # in a session, for the supervisor: the fork server, the response server and the three forked
    # ahead (the next response's server, the next two tests' processes)
    assert 0 < peak[0] <= 32 + (3 if execution == "per_test" else 7)
    assert_no_survivors(marker)


DETACH = """
import os, subprocess, sys, time
# 1. double fork with setsid: the grandchild belongs to no process group of ours
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
# 2. a new session through subprocess
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]],
                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.3)
print("parent exits")
"""


@pytest.mark.parametrize("mode", MODES)
def test_detached_children_are_killed(mode, marker):
    res = run_python(DETACH, timeout_s=10, isolation=mode, args=[marker])
    assert res.status == "ok", res
    assert res.stdout == "parent exits\n"
    assert res.wall_s < 5  # the sleeping leftovers did not hold the run open
    assert_no_survivors(marker)


@needs_bwrap
def test_cannot_kill_parent_or_host(marker):
    me = os.getpid()
    code = f"""
import os, signal
for name, pid in (("ppid", os.getppid()), ("pytest", {me}), ("init", 1)):
    try:
        os.kill(pid, signal.SIGKILL)
        print("sent", name)
    except OSError as e:
        print("refused", name, type(e).__name__)
os.kill(os.getppid(), signal.SIGKILL)
"""
    res = run_python(code, timeout_s=10, isolation="bwrap", args=[marker])
    assert psutil.pid_exists(me) and psutil.Process(me).status() != psutil.STATUS_ZOMBIE
    assert res.status == "runtime_error", res
    assert "refused ppid PermissionError" in res.stdout
    assert "refused init PermissionError" in res.stdout
    assert "sent pytest" not in res.stdout or me < 10  # the number could only name a sandbox process
    assert "PermissionError" in res.stderr
    assert_no_survivors(marker)


@needs_bwrap
def test_kill_everything_kills_only_the_sandbox(marker):
    victim = psutil.Popen(["sleep", "30"])
    try:
        # kill(-1) signals every process the caller may signal, except itself
        res = run_python("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('after')\n", isolation="bwrap",
                         args=[marker])
        assert res.status == "ok" and res.stdout == "after\n"
        assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE
    finally:
        victim.kill()
        victim.wait()
    assert_no_survivors(marker)


# -- network, filesystem, environment -------------------------------------------------------


@needs_bwrap
def test_no_network_even_to_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.05)
    port = server.getsockname()[1]
    accepted, stop = [], threading.Event()

    def serve():
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except socket.timeout:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        code = f"""
import socket
for host in ("127.0.0.1", "localhost", "::1"):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print("CONNECTED", host)
    except OSError as e:
        print("no connection to", host, type(e).__name__)
"""
        res = run_python(code, timeout_s=10, isolation="bwrap")
        assert res.status == "ok", res
        assert "CONNECTED" not in res.stdout
        assert accepted == []
        # the server was really listening: the test process itself can connect
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        time.sleep(0.2)
        assert len(accepted) == 1
    finally:
        stop.set()
        t.join(5)
        for c in accepted:
            c.close()
        server.close()


@needs_bwrap
def test_writes_outside_workdir_do_not_reach_host(marker):
    host_tmp = Path("/tmp") / marker
    repo_file = REPO / f"{marker}.txt"
    etc_new = Path("/etc") / marker
    passwd_hash = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    code = f"""
import os
for path in ({str(host_tmp)!r}, {str(repo_file)!r}, {str(etc_new)!r}, "/etc/passwd", "/usr/{marker}"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write("pwned")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
with open("in_workdir.txt", "w") as f:
    f.write("fine")
print(os.getcwd(), sorted(os.listdir(".")))
"""
    try:
        res = run_python(code, timeout_s=10, isolation="bwrap")
        assert res.status == "ok", res
        # the program ran in the work dir and could write there (the repository path may itself
        # lie under /work: inside, that is the sandbox's tmpfs, so its top folder may show up too)
        cwd, listing = res.stdout.strip().splitlines()[-1].split(" ", 1)
        assert cwd == "/work" and "'in_workdir.txt'" in listing
        assert "refused /usr/" in res.stdout
        for p in (host_tmp, repo_file, etc_new, Path("/usr") / marker):
            assert not p.exists(), p
        assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd_hash
    finally:
        for p in (host_tmp, repo_file, etc_new):
            if p.exists():
                p.unlink()


@needs_bwrap
def test_parent_environment_secrets_are_invisible(monkeypatch, marker):
    monkeypatch.setenv("DISTIL_SECRET_TOKEN", marker)
    code = """
import os
print(dict(os.environ))
for pid in sorted({"1", str(os.getppid()), "self", *[p for p in os.listdir("/proc") if p.isdigit()]}):
    for what in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                print(pid, what, f.read())
        except OSError as e:
            print(pid, what, type(e).__name__)
"""
    res = run_python(code, timeout_s=10, isolation="bwrap")
    assert res.status == "ok", res
    assert "'HOME': '/work'" in res.stdout
    assert marker not in res.stdout and marker not in res.stderr
    assert "DISTIL_SECRET_TOKEN" not in res.stdout


@needs_bwrap
def test_program_runs_unprivileged():
    code = """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(os.getuid() != 0, os.getgid() != 0, os.getgroups())
print(status["CapEff"].strip(), status["CapPrm"].strip(), status["CapAmb"].strip(), status["NoNewPrivs"].strip())
"""
    res = run_python(code, isolation="bwrap")
    assert res.status == "ok", res
    assert res.stdout.splitlines() == ["True True []", "0000000000000000 0000000000000000 0000000000000000 1"]


# -- options -----------------------------------------------------------------------------------


def test_options_are_frozen_records():
    sb = Sandbox(SandboxLimits(memory_mb=256), timeout_s=5, isolation="rlimits", env={"GREETING": "hi"})
    assert sb.limits == SandboxLimits(timeout_s=5, memory_mb=256)
    assert sb.settings == SandboxSettings(isolation="rlimits", env={"GREETING": "hi"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        sb.limits.timeout_s = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        sb.settings.env["GREETING"] = "changed"  # type: ignore[index]
    assert sb.run("import os\nprint(os.environ['GREETING'])\n").stdout == "hi\n"
    with pytest.raises(TypeError, match="unknown sandbox option\\(s\\) timeout; allowed: "):
        Sandbox(timeout=1)
    with pytest.raises(ValueError, match="isolation must be one of"):
        Sandbox(isolation="docker")
    with pytest.raises(ValueError, match="must be positive"):
        run_python("print(1)", timeout_s=0)


# -- the fallback, and clean-up ------------------------------------------------------------------


def test_rlimits_fallback_is_loud(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_runner, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        res = run_python("print(input())", "hello\n", isolation="rlimits")
        res2 = run_python("print(1)", isolation="rlimits")
    assert res.status == "ok" and res.stdout == "hello\n"
    assert res.isolation == "rlimits-only" and res2.isolation == "rlimits-only"
    assert res.warning and "rlimits only" in res.warning and res2.warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "SANDBOX DEGRADED" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not once per run


def test_auto_falls_back_when_bwrap_is_missing(monkeypatch):
    monkeypatch.setattr(sandbox_runner, "_fallback_warned", False)
    res = run_python("print('still runs')", bwrap="/nonexistent/bwrap")
    assert res.status == "ok" and res.stdout == "still runs\n"
    assert res.isolation == "rlimits-only"
    assert "bubblewrap self-check failed" in res.warning
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)", isolation="bwrap", bwrap="/nonexistent/bwrap")


@pytest.mark.parametrize("mode", MODES)
def test_run_directory_is_removed(mode, tmp_path):
    code = ("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nopen('top', 'w').write('y')\n"
            "os.chmod('a/b', 0)\nos.chmod('a', 0o500)\nprint(os.getcwd())\n")
    res = run_python(code, isolation=mode, tmp_root=str(tmp_path))
    assert res.status == "ok", res
    assert list(tmp_path.iterdir()) == []
    if mode == "rlimits":
        assert not os.path.exists(res.stdout.strip())
    res = run_python("while True: pass", timeout_s=0.5, isolation=mode, tmp_root=str(tmp_path))
    assert res.status == "timeout"
    assert list(tmp_path.iterdir()) == []


# -- seccomp filter and kernel keyrings --------------------------------------------------------

# A program that calls raw system calls through ctypes and prints, as JSON, the errno name each
# one failed with ("ok" if it succeeded). argv: marker, syscall numbers (JSON).
SYSCALL_PROBE = r"""
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
NR = json.loads(sys.argv[2])
L = ctypes.c_long

def call(name, *args):
    r = libc.syscall(L(NR[name]), *[L(a) if isinstance(a, int) else a for a in args])
    if r == 0 and name == "clone":
        os._exit(0)  # (the child of a clone that should not have worked)
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

NEWUSER, NEWNS, NEWNET, NEWPID = 0x10000000, 0x20000, 0x40000000, 0x20000000
out = {
    "unshare(NEWUSER|NEWNS)": call("unshare", NEWUSER | NEWNS),
    "unshare(NEWNET)": call("unshare", NEWNET),
    "clone(NEWUSER)": call("clone", NEWUSER | 17, 0, 0, 0, 0),  # 17: SIGCHLD
    "clone(NEWPID)": call("clone", NEWPID | 17, 0, 0, 0, 0),
    "setns": call("setns", 0, NEWNET),
    "mount": call("mount", b"none", b"/tmp", b"tmpfs", 0, None),
    "fsopen": call("fsopen", b"tmpfs", 0),
    "io_uring_setup": call("io_uring_setup", 1, ctypes.create_string_buffer(120)),
    "bpf": call("bpf", 0, 0, 0),
    "perf_event_open": call("perf_event_open", 0, 0, -1, -1, 0),
    "userfaultfd": call("userfaultfd", 0),
    "ptrace": call("ptrace", 0, 0, 0, 0),  # PTRACE_TRACEME
    "open_by_handle_at": call("open_by_handle_at", -1, 0, 0),
    "keyctl": call("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "clone3": call("clone3", 0, 0),
    "shmget": call("shmget", 0, 4096, 0o1666),  # IPC_PRIVATE, IPC_CREAT | 0666
    "msgget": call("msgget", 0, 0o1666),
    "semget": call("semget", 0, 1, 0o1666),
    "mq_open": call("mq_open", b"q", 0o100 | 2, 0o666, None),  # O_CREAT | O_RDWR
}
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["Seccomp"] = status["Seccomp"].strip()
print(json.dumps(out))
"""


@needs_seccomp
@pytest.mark.parametrize("mode", MODES)
def test_namespace_mount_and_kernel_surface_syscalls_are_refused(mode, marker):
    res = run_python(SYSCALL_PROBE, timeout_s=10, isolation=mode, args=[marker, json.dumps(ABI.nr)])
    assert res.status == "ok", res
    out = json.loads(res.stdout)
    assert out.pop("Seccomp") == "2"  # SECCOMP_MODE_FILTER
    assert out.pop("clone3") == "ENOSYS"  # so that the C library falls back to clone
    assert out == {name: "EPERM" for name in out}, out
    assert_no_survivors(marker)


THREADS_AND_CHILDREN = """
import multiprocessing as mp, subprocess, sys, threading

def square(x):
    return x * x

if __name__ == "__main__":
    out = []
    t = threading.Thread(target=lambda: out.append("thread"))
    t.start()
    t.join()
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            out.append(f"{method}:{sum(pool.map(square, range(10)))}")
    r = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, check=True)
    out.append(f"subprocess:{r.stdout.strip()}")
    print(" ".join(out))
"""


@pytest.mark.parametrize("mode", MODES)
def test_threads_multiprocessing_and_subprocess_still_work(mode, marker):
    res = run_python(THREADS_AND_CHILDREN, timeout_s=20, isolation=mode, args=[marker])
    assert res.status == "ok", res
    assert res.stdout == "thread fork:285 spawn:285 subprocess:42\n"
    assert_no_survivors(marker)


# Run in a child process of the test: gives it a session keyring of its own holding a key named
# after the marker (as root's session keyring holds root's keys), then runs KEY_PROBE in the
# sandbox. argv: marker, isolation mode, the probe.
KEYRING_HOST = r"""
import ctypes, json, sys
from distil_ray.feedback import sandbox
from distil_ray.feedback.sandbox.seccomp import _seccomp_for_host
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
nr = _seccomp_for_host()[0].nr
marker, mode, probe = sys.argv[1:4]
if libc.syscall(L(nr["keyctl"]), L(1), None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
    sys.exit(f"cannot join a session keyring: errno {ctypes.get_errno()}")
if libc.syscall(L(nr["add_key"]), b"user", marker.encode(), b"secret", L(6), L(-3)) < 0:
    sys.exit(f"cannot add a key: errno {ctypes.get_errno()}")
keys_before = open("/proc/keys").read()
res = sandbox.run_python(probe, timeout_s=10, isolation=mode, args=[marker, json.dumps(nr)])
print(json.dumps({"status": res.status, "stdout": res.stdout, "stderr": res.stderr,
                  "key_visible_before": marker in keys_before, "keys_after": open("/proc/keys").read()}))
"""

KEY_PROBE = r"""
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
marker, nr = sys.argv[1], json.loads(sys.argv[2])

def err(r):
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

print(json.dumps({
    "uid": os.getuid(),
    "get_session": err(libc.syscall(L(nr["keyctl"]), L(0), L(-3), L(0))),
    "search": err(libc.syscall(L(nr["keyctl"]), L(10), L(-3), b"user", marker.encode(), L(0))),
    "request_key": err(libc.syscall(L(nr["request_key"]), b"user", marker.encode(), None, L(0))),
    "add_key": err(libc.syscall(L(nr["add_key"]), b"user", f"planted-{marker}".encode(), b"x", L(1), L(-3))),
    "key_listed": marker in open("/proc/keys").read(),
}))
"""


@needs_seccomp
@pytest.mark.parametrize("mode", MODES)
def test_caller_keyring_is_unreachable(mode, marker):
    proc = subprocess.run([sys.executable, "-c", KEYRING_HOST, marker, mode, KEY_PROBE], cwd=REPO,
                          capture_output=True, text=True, timeout=25, check=False)
    if proc.returncode and "cannot join a session keyring" in proc.stderr:
        pytest.skip(f"kernel keyrings unavailable here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    host = json.loads(proc.stdout)
    assert host["key_visible_before"]  # the key really is there for the caller
    assert host["status"] == "ok", host
    probe = json.loads(host["stdout"])
    assert {k: probe[k] for k in ("get_session", "search", "request_key", "add_key")} == dict.fromkeys(
        ("get_session", "search", "request_key", "add_key"), "EPERM")
    if probe["uid"] != os.getuid():  # under another uid, the caller's key is not even listed
        assert not probe["key_listed"]
    assert f"planted-{marker}" not in host["keys_after"]  # nothing was left behind on the host


# -- memory of the run as a whole (cgroup) -----------------------------------------------------

# memfd pages count against no rlimit. Each memfd stays under RLIMIT_FSIZE (max_file_mb = 64);
# 10 x 60 MB is far beyond the run's cgroup limit (128 + 3 * 64 + 32 MB).
MEMFD_BOMB = """
import os
fds = []
for i in range(10):
    fd = os.memfd_create(f"m{i}")
    for _ in range(60):
        os.write(fd, b"x" * (1 << 20))
    fds.append(fd)
    print(i, flush=True)
print("held all", flush=True)
"""

# Each child stays far below RLIMIT_AS; together they are far beyond the cgroup limit.
FORKED_HOGS = """
import os, time
kids = []
for i in range(10):
    pid = os.fork()
    if pid == 0:
        hog = bytearray(60 << 20)  # zero-filled: every page touched
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
print("children:", [os.waitpid(pid, 0)[1] for pid in kids], flush=True)
"""


def shmem_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:")) / 1024


@needs_cgroup
@pytest.mark.parametrize("mode", MODES)
def test_memfd_bomb_is_capped(mode, marker):
    before = shmem_mb()
    res = run_python(MEMFD_BOMB, timeout_s=20, memory_mb=128, isolation=mode, args=[marker])
    assert res.status == "memory_limit", res
    assert "held all" not in res.stdout
    assert res.cgroup == CGROUP_LAYOUT[0]
    assert shmem_mb() < before + 64  # the memfd pages are gone with the run
    assert_no_survivors(marker)


@needs_cgroup
@pytest.mark.parametrize("mode", MODES)
def test_forked_children_memory_is_capped(mode, marker):
    res = run_python(FORKED_HOGS, timeout_s=20, memory_mb=128, isolation=mode, args=[marker])
    assert res.status == "memory_limit", res
    assert_no_survivors(marker)


@pytest.mark.parametrize("code", [
    "import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)\n",
    "raise MemoryError\n",
], ids=["printed", "raised"])
@pytest.mark.parametrize("mode", MODES)
def test_forged_memory_error_is_a_runtime_error(mode, code):
    res = run_python(code, timeout_s=10, memory_mb=256, isolation=mode)
    assert res.status == "runtime_error", res
    assert "MemoryError" in res.stderr


# -- CPU limit -------------------------------------------------------------------------------


class ShortCpuLimit(SandboxLimits):
    """A CPU-time limit (1 s, hard 2 s) well inside the wall-clock one, so that it is really hit."""

    def rlimits(self):
        return {**super().rlimits(), "RLIMIT_CPU": (1, 2)}


@pytest.mark.parametrize("mode", MODES)
def test_self_sent_sigxcpu_is_not_a_timeout(mode):
    res = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)\n", timeout_s=10, isolation=mode)
    assert res.signal == signal.SIGXCPU
    assert res.status == "runtime_error", res


@pytest.mark.parametrize("mode", MODES)
def test_reaching_the_cpu_limit_is_a_timeout(mode):
    res = Sandbox(ShortCpuLimit(timeout_s=10), isolation=mode).run("while True:\n    pass\n")
    assert res.signal == signal.SIGXCPU
    assert res.status == "timeout", res
    assert res.cpu_s is not None and res.cpu_s >= 0.9
    assert res.wall_s < 5


# -- the fallback's process clean-up, and cgroup bookkeeping ------------------------------------

# A child in a session of its own and without the marker environment variable: neither the
# process-group kill nor the marker sweep can find it. argv: marker, "exit" | "spin".
ESCAPEE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]], env={},
                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.3)
print("parent", sys.argv[2], flush=True)
while sys.argv[2] == "spin":
    pass
"""


@pytest.mark.parametrize("ending", ["exit", "spin"])
@pytest.mark.parametrize("use_cgroup", [pytest.param(True, marks=needs_cgroup), False],
                         ids=["cgroup", "subreaper"])
def test_fallback_kills_setsid_escapee_with_empty_env(use_cgroup, ending, marker):
    res = run_python(ESCAPEE, timeout_s=1.5, isolation="rlimits", use_cgroup=use_cgroup, args=[marker, ending])
    assert res.stdout == f"parent {ending}\n", res
    assert res.status == ("ok" if ending == "exit" else "timeout"), res
    assert res.wall_s < 4
    assert res.cgroup == (CGROUP_LAYOUT[0] if use_cgroup else None)
    assert_no_survivors(marker)


@needs_cgroup
def test_no_cgroup_is_left_behind(monkeypatch, marker):
    made = []
    create = sandbox_cgroup._Cgroup.create.__func__

    def recording_create(cls, *args, **kwargs):
        cgroup, why = create(cls, *args, **kwargs)
        if cgroup is not None:
            made.extend(cgroup.dirs)
        return cgroup, why

    monkeypatch.setattr(sandbox_cgroup._Cgroup, "create", classmethod(recording_create))
    parents = CGROUP_LAYOUT[1]
    before = {p: set(os.listdir(p)) for p in parents}
    modes = ["bwrap", "rlimits"] if BWRAP_OK else ["rlimits"]
    for mode in modes:
        assert run_python("print('hi')", isolation=mode).status == "ok"
        assert run_python("while True: pass", timeout_s=0.5, isolation=mode, args=[marker]).status == "timeout"
        assert run_python(FORKED_HOGS, timeout_s=20, memory_mb=128, isolation=mode,
                          args=[marker]).status == "memory_limit"
        assert run_python("print('x' * 100000)", max_output_bytes=1000, isolation=mode).status == "output_limit"
    assert len(made) == len(modes) * 4 * len(parents)
    assert [d for d in made if os.path.exists(d)] == []
    for p in parents:
        new = set(os.listdir(p)) - before[p]
        assert not new & {os.path.basename(d) for d in made}, new
    assert_no_survivors(marker)


def test_without_cgroups_the_run_goes_on_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_cgroup, "_cgroup_layout", lambda: "no cgroup here (test)")
    monkeypatch.setattr(sandbox_runner, "_logged_once", set())
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        results = [run_python("print(1)"), run_python("print(2)")]
    for res in results:
        assert res.status == "ok" and res.cgroup is None
        assert "no cgroup limits this run (no cgroup here (test))" in res.warning
    logged = [r for r in caplog.records if "no cgroup here (test)" in r.getMessage()]
    assert len(logged) == 1  # once per process, not once per run


def test_result_names_the_cgroup_version():
    res = run_python("print(1)")
    assert res.status == "ok"
    assert res.cgroup == (None if isinstance(CGROUP_LAYOUT, str) else CGROUP_LAYOUT[0])
    if res.isolation == "bwrap" and res.cgroup is not None and ABI is not None:
        assert res.warning is None  # every layer in place


# -- the filter itself ---------------------------------------------------------------------------


def run_bpf(program: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """What a classic-BPF seccomp filter returns for a system call (a small interpreter of the
    instructions the sandbox uses)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)  # struct seccomp_data
    code = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # load word
            acc, pc = struct.unpack_from("<I", data, k)[0], pc + 1
        elif op == 0x06:  # return
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)


ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS


@pytest.mark.parametrize("machine", sorted(sandbox_seccomp._SYSCALL_ABIS))
def test_filter_decisions(machine):
    abi = sandbox_seccomp._SYSCALL_ABIS[machine]
    prog = sandbox_seccomp._seccomp_filter(abi)
    getpid = {"x86_64": 39, "aarch64": 172}[machine]
    assert run_bpf(prog, getpid, abi.audit_arch) == ALLOW
    assert run_bpf(prog, getpid, 0x40000003) == EPERM  # i386 entry point (AUDIT_ARCH_I386)
    if abi.x32_bit:
        assert run_bpf(prog, getpid | abi.x32_bit, abi.audit_arch) == EPERM
    for name in sandbox_seccomp._DENIED_SYSCALLS:
        assert run_bpf(prog, abi.nr[name], abi.audit_arch) == EPERM, name
    assert run_bpf(prog, abi.nr["clone3"], abi.audit_arch) == ENOSYS
    thread_flags = 0x3D0F00  # what glibc passes for pthread_create
    assert run_bpf(prog, abi.nr["clone"], abi.audit_arch, thread_flags) == ALLOW
    assert run_bpf(prog, abi.nr["clone"], abi.audit_arch, 17) == ALLOW  # fork
    for flag in (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000, 0x80):
        assert run_bpf(prog, abi.nr["clone"], abi.audit_arch, 17 | flag) == EPERM, hex(flag)


HEADERS = {
    "x86_64": ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"],
    "aarch64": ["/usr/include/asm-generic/unistd.h"],
}


@pytest.mark.parametrize("machine", sorted(sandbox_seccomp._SYSCALL_ABIS))
def test_syscall_numbers_match_kernel_headers(machine):
    header = next((Path(h) for h in HEADERS[machine] if Path(h).exists()), None)
    if header is None:
        pytest.skip(f"no kernel headers for {machine} here")
    defined = {}
    for line in header.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("__NR_") and parts[2].isdigit():
            defined[parts[1][5:]] = int(parts[2])
    table = sandbox_seccomp._SYSCALL_ABIS[machine].nr
    assert {name: defined.get(name) for name in table} == table


@needs_cgroup
def test_program_never_runs_outside_its_cgroup(monkeypatch, tmp_path):
    launcher = sandbox_cgroup._Cgroup.launcher
    bad = str(tmp_path / "missing" / "cgroup.procs")  # joining this one fails
    monkeypatch.setattr(sandbox_cgroup._Cgroup, "launcher", lambda self, argv: launcher(self, argv)[:4] + [bad]
                        + launcher(self, argv)[4:])
    tmp_path.chmod(0o777)  # (the fallback shares the host's filesystem: the program could write here)
    res = run_python(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n", isolation="rlimits")
    assert res.status == "sandbox_error", res
    assert "could not start the program" in res.stderr
    assert not (tmp_path / "ran").exists()


def test_sandbox_and_its_settings_pickle_for_ray_actors():
    import pickle

    sb = Sandbox(SandboxLimits(memory_mb=256), isolation="rlimits", env={"GREETING": "hi"})
    again = pickle.loads(pickle.dumps(sb))
    assert again.limits == sb.limits and again.settings == sb.settings
    with pytest.raises(TypeError):
        again.settings.env["GREETING"] = "changed"  # type: ignore[index]
