"""Containment tests for ``distil_ray.feedback.sandbox``.

Every hostile program gets a unique marker string in its argv (``args=[marker]``), so every
process it forks carries the marker in its command line; "no survivors" means no process on the
host still has it. Tests of namespace guarantees are skipped (with bubblewrap's reason) where
bwrap does not work; the destructive ones never run in the rlimits-only mode.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from distil_ray.feedback import sandbox
from distil_ray.feedback.sandbox import SandboxUnavailable, bwrap_status, run_python

pytestmark = pytest.mark.timeout(30)

BWRAP_OK, BWRAP_WHY = bwrap_status()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {BWRAP_WHY}")
REPO = Path(__file__).resolve().parents[2]
MODES = [pytest.param("bwrap", marks=needs_bwrap), "rlimits"]


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
    "x = bytearray(4 * 1024 ** 3)\n",
    "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
    "s = 'y' * (1 << 20)\nparts = []\nwhile True:\n    parts.append(s + str(len(parts)))\n",
], ids=["4GB-bytearray", "growing-list", "growing-strings"])
@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb(mode, code, marker):
    res = run_python(code, timeout_s=10, memory_mb=256, isolation=mode, args=[marker])
    assert res.status == "memory_limit", res
    assert "MemoryError" in res.stderr
    assert res.peak_rss_mb is not None and res.peak_rss_mb <= 256  # the host never lent it more
    assert_no_survivors(marker)


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
def test_fork_bomb_is_contained(code, marker):
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
    # the program's processes (RLIMIT_NPROC) plus bwrap, the namespace's init and the supervisor
    assert 0 < peak[0] <= 32 + 3
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
        # (the repository path may itself lie under /work: inside, that is the sandbox's tmpfs)
        assert "/work ['in_workdir.txt'" in res.stdout
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


# -- the fallback, and clean-up ------------------------------------------------------------------


def test_rlimits_fallback_is_loud(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        res = run_python("print(input())", "hello\n", isolation="rlimits")
        res2 = run_python("print(1)", isolation="rlimits")
    assert res.status == "ok" and res.stdout == "hello\n"
    assert res.isolation == "rlimits-only" and res2.isolation == "rlimits-only"
    assert res.warning and "rlimits only" in res.warning and res2.warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "SANDBOX DEGRADED" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not once per run


def test_auto_falls_back_when_bwrap_is_missing(monkeypatch):
    monkeypatch.setattr(sandbox, "_fallback_warned", False)
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
