"""One sandbox per response (the default) against one sandbox per test: the same verdicts on the
same workloads, a clean slate between the tests of a response and between responses, and the
two exploits of an in-process harness (reading the expected output off the grader's stack,
swallowing its time-out) graded as failures in both modes."""

from __future__ import annotations

import dataclasses
import os

import pytest

from distil_ray.feedback.code import ExecutionLimits, check_program, run_tests
from distil_ray.feedback.code import harness as code_harness
from distil_ray.feedback.sandbox import SandboxLimits, bwrap_status
from distil_ray.feedback.sandbox import runner as sandbox_runner
from distil_ray.feedback.sandbox import session as sandbox_session

pytestmark = pytest.mark.timeout(120)

BWRAP_OK, BWRAP_WHY = bwrap_status()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {BWRAP_WHY}")
# A sandbox serves several responses only where each test runs as a fresh uid (run by root).
needs_reuse = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes are reused across responses only when run by root")
MODES = ("per_response", "per_test")
LIMITS = ExecutionLimits(timeout_s=5.0, sandbox=SandboxLimits(memory_mb=512))

SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_TESTS = [{"input": f"{i} {i}\n", "output": f"{2 * i}\n"} for i in range(1, 4)]

FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""
# Sets `others`: the processes a program sees that are not the sandbox's own (its ancestors: init,
# then the supervisor, or the fork server and the response server; and their forks waiting for the
# next test or response).
OTHER_PROCESSES = """
import os
def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None
own, pid = {1}, os.getpid()
while pid > 1:
    own.add(pid)
    with open(f"/proc/{pid}/stat") as f:
        pid = int(f.read().rsplit(")", 1)[1].split()[1])
sandbox = {cmdline(p) for p in own}  # (its servers' forks, waiting for the next test or response)
others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in own and cmdline(p) not in sandbox]
"""

# Test 1 leaves a detached process and files behind; the later tests print what they can see
# of them (OTHER_PROCESSES, and files).
LEFTOVERS = """
import os, subprocess, sys, time
if input() == "1":
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    open("left.txt", "w").write("x")
    open("/tmp/left.txt", "w").write("x")
    time.sleep(0.2)
""" + OTHER_PROCESSES + """
print(len(others), sorted(os.listdir(".")), sorted(os.listdir("/tmp")))
"""
LEFTOVER_TESTS = [{"input": f"{i}\n", "output": "0 [] []\n"} for i in (1, 2, 3)]

# Test 1 leaves a tree of directories deeper than a path may be long (4096 bytes), unreadable, in
# /tmp and in its working directory; the later tests see neither.
DEEP_TREES = """
import os
if input() == "1":
    for top in (".", "/tmp"):
        os.chdir(top)
        for _ in range(20):
            os.mkdir("d" * 250)
            os.chdir("d" * 250)
        open("leaf", "w").write("x")
        os.chmod(".", 0)
        os.chdir("/work" if top == "." else "/tmp")
print(os.listdir("."), os.listdir("/tmp"))
"""
DEEP_TESTS = [{"input": f"{i}\n", "output": "[] []\n"} for i in (1, 2, 3)]

FUNCTIONAL = "class Solution:\n    def add(self, a, b):\n        return a + b if a != 2 else -1\n"
FUNCTIONAL_TESTS = [{"input": "1\n2", "output": "3"}, {"input": "2\n2", "output": "4"}]

WORKLOADS = {
    "correct": (SUM, SUM_TESTS, {}, ["passed"] * 3),
    "wrong answer": ("a, b = map(int, input().split())\nprint(a * b)\n", SUM_TESTS, {},
                     ["wrong_answer", "passed", "wrong_answer"]),
    "runtime error": ("a, b = map(int, input().split())\nprint(a // (b - b))\n", SUM_TESTS[:2], {},
                      ["runtime_error"] * 2),
    "compile error": ("def f(:\n", SUM_TESTS, {}, ["compile_error", "skipped", "skipped"]),
    "timeout": ("while True:\n    pass\n", SUM_TESTS[:1], {"timeout_s": 1.0}, ["timeout"]),
    "memory": ("a = []\nwhile True:\n    a.append(bytearray(8 << 20))\n", SUM_TESTS[:1], {}, ["memory_limit"]),
    "output flood": ("while True:\n    print('x' * 1000)\n", SUM_TESTS[:1], {"max_output_bytes": 10_000},
                     ["output_limit"]),
    "fork bomb": (FORK_BOMB, SUM_TESTS[:1], {"timeout_s": 1.0}, ["timeout"]),
    "leftover processes and files": (LEFTOVERS, LEFTOVER_TESTS, {}, ["wrong_answer", "passed", "passed"]),
    "leftover deep trees": (DEEP_TREES, DEEP_TESTS, {}, ["wrong_answer", "passed", "passed"]),
    "functional": (FUNCTIONAL, FUNCTIONAL_TESTS, {}, ["passed", "wrong_answer"]),
}


def limits_for(execution: str, **overrides) -> ExecutionLimits:
    sandbox = dataclasses.replace(LIMITS.sandbox, max_processes=16)
    return dataclasses.replace(LIMITS, sandbox=sandbox, execution=execution, **overrides)


@needs_bwrap
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_both_modes_give_the_same_verdicts(name):
    code, tests, overrides, expected = WORKLOADS[name]
    testtype, func = ("functional", "add") if name == "functional" else ("stdin", None)
    verdicts = {m: check_program(code, tests, testtype=testtype, func_name=func, limits=limits_for(m, **overrides))
                for m in MODES}
    for mode, v in verdicts.items():
        assert v.statuses == expected, (mode, v.feedback)
    if name in ("correct", "wrong answer", "runtime error", "compile error", "timeout", "functional"):
        assert verdicts["per_response"].feedback == verdicts["per_test"].feedback


# -- the exploits of an in-process harness -------------------------------------------------------

# Looks for the grader's expected output in its own process: up the stack and through every
# object the garbage collector knows; prints it when found (else nothing).
STACK_WALK = """
import gc, sys
data = sys.stdin.read()
def candidates():
    f = sys._getframe()
    while f is not None:
        yield from list(f.f_locals.values())
        f = f.f_back
    yield from list(gc.get_objects())
for o in candidates():
    if isinstance(o, dict) and o.get("input") == data and isinstance(o.get("output"), str):
        print(o["output"], end="")
        break
    if isinstance(o, (list, tuple)):
        for t in o:
            if isinstance(t, dict) and t.get("input") == data and isinstance(t.get("output"), str):
                print(t["output"], end="")
                raise SystemExit
"""
# Swallows whatever ends its slow path (an exception raised by a time-out, the signals a time
# limit sends), throws away what it printed so far and then answers.
SWALLOW_TIMEOUT = """
import io, signal, sys
for s in (signal.SIGALRM, signal.SIGXCPU, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
data = sys.stdin.read()
print("partial")
try:
    while True:
        pass
except BaseException:
    pass
try:
    sys.stdout.seek(0)
    sys.stdout.truncate(0)
except Exception:
    pass
a, b = map(int, data.split())
print(a + b)
"""


def in_process_grade(code: str, tests: list[dict]) -> list[bool]:
    """What an in-process harness does: the tests (with their outputs) in a local of the frame
    that runs the program, stdout captured in a StringIO."""
    import contextlib
    import io
    import sys

    passed = []
    for test in tests:
        out = io.StringIO()
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(test["input"])
        try:
            with contextlib.redirect_stdout(out):
                try:
                    exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
                except SystemExit:
                    pass
        finally:
            sys.stdin = old_stdin
        passed.append(out.getvalue().strip() == test["output"].strip())
    return passed


def test_the_stack_walk_reads_an_in_process_harness_but_not_the_sandbox():
    tests = [{"input": "7 8\n", "output": "secret-15\n"}]
    assert in_process_grade(STACK_WALK, tests) == [True]  # the exploit is real
    for mode in MODES:
        v = check_program(STACK_WALK, tests, limits=limits_for(mode))
        assert v.statuses == ["wrong_answer"], (mode, v.feedback)
        assert v.results[0].actual == ""  # nothing of the expected output was found


def test_a_swallowed_timeout_is_still_a_timeout():
    for mode in MODES:
        v = check_program(SWALLOW_TIMEOUT, SUM_TESTS[:1], limits=limits_for(mode, timeout_s=1.0))
        assert v.statuses == ["timeout"], (mode, v.feedback)


# -- per response: clean slate, early stop, parallel tests, recovery ----------------------------

def test_stop_on_first_failure_and_parallel_tests_match_a_serial_full_run():
    tests = [{"input": f"{i} {i}\n", "output": f"{2 * i}\n"} for i in range(12)]
    wrong_on_5 = "a, b = map(int, input().split())\nprint(a + b + (a == 5))\n"
    full = run_tests(wrong_on_5, tests, limits=limits_for("per_response"))
    assert [r.status for r in full] == ["passed"] * 5 + ["wrong_answer"] + ["passed"] * 6
    for parallel in (1, 3):
        both = run_tests(wrong_on_5, tests, limits=limits_for("per_response", parallel_tests=parallel))
        assert [r.status for r in both] == [r.status for r in full]
        stop = run_tests(wrong_on_5, tests, limits=limits_for("per_response", parallel_tests=parallel,
                                                               stop_on_first_failure=True))
        assert [r.status for r in stop] == ["passed"] * 5 + ["wrong_answer"] + ["skipped"] * 6
        assert {r.error for r in stop[6:]} == {"stopped at the first failure"}


def test_sandboxes_outlive_the_worker_threads_that_used_them():
    # bwrap dies with the *thread* that started it: a sandbox used by a parallel_tests worker
    # thread, which ends with its response, must still serve the next response
    limits = limits_for("per_response", parallel_tests=2)
    for _ in range(8):
        v = check_program(SUM, SUM_TESTS, limits=limits)
        assert v.statuses == ["passed"] * 3, v.feedback


def test_a_test_that_breaks_its_sandbox_does_not_take_the_others_down(monkeypatch):
    # The host stops waiting for an answer before the server gives one: that session is ended,
    # the run counted as a time-out, and the next test gets a new sandbox.
    monkeypatch.setattr(sandbox_session, "_REPLY_GRACE_S", -0.8)
    code = "import time\na, b = map(int, input().split())\nif a == 2:\n    time.sleep(0.5)\nprint(a + b)\n"
    v = check_program(code, SUM_TESTS, limits=limits_for("per_response", timeout_s=1.0))
    assert v.statuses == ["passed", "timeout", "passed"], v.feedback


# Response 1 leaves all it can behind: a secret in its memory, a detached process listening on an
# abstract unix socket, files in every writable directory; it tries a System V shared memory
# segment (which would outlive it in the sandbox's IPC namespace: refused).
FIRST_RESPONSE = r"""
import ctypes, os, subprocess, sys, time
SECRET = "response-one-" + "secret"
libc = ctypes.CDLL(None, use_errno=True)
print("shmget", libc.shmget(0, 4096, 0o1666), ctypes.get_errno())
listener = "import socket, time; s = socket.socket(socket.AF_UNIX); s.bind(b'\\0left'); s.listen(); time.sleep(60)"
subprocess.Popen([sys.executable, "-c", listener], start_new_session=True)
for d in (".", "/tmp", "/dev/shm"):
    open(os.path.join(d, "left.txt"), "w").write(SECRET)
time.sleep(0.3)
"""
# Response 2, in the same sandbox, looks for all of it.
SECOND_RESPONSE = """
import gc, os, socket
""" + OTHER_PROCESSES + """
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(b"\\0left")
    reached = True
except OSError:
    reached = False
secret = any(isinstance(o, dict) and o.get("SECRET") == "response-one-secret" for o in gc.get_objects())
print(len(others), os.listdir("."), os.listdir("/tmp"), os.listdir("/dev/shm"), reached, secret)
"""


@needs_bwrap
@needs_reuse
def test_nothing_of_one_response_reaches_the_next():
    # Both responses are served by the same sandbox (the one the first gave back), each by a
    # response server of its own.
    code_harness.close_idle_sandboxes()
    limits = limits_for("per_response")
    first = check_program(FIRST_RESPONSE, [{"input": "", "output": "shmget -1 1\n"}], limits=limits)
    assert first.statuses == ["passed"], first.feedback  # (errno 1: EPERM)
    [sandbox] = [s for pool in code_harness._idle.values() for s in pool]
    second = check_program(SECOND_RESPONSE, [{"input": "", "output": "0 [] [] [] False False\n"}], limits=limits)
    assert second.statuses == ["passed"], second.feedback
    assert [s for pool in code_harness._idle.values() for s in pool] == [sandbox]
    assert sandbox.programs == 2


@needs_bwrap
def test_the_wipe_reaches_trees_deeper_than_a_path(monkeypatch):
    # (What the wipe cannot remove ends the sandbox: the next test would get a new one. Here
    # the wipe removes it all: one sandbox serves the three tests.)
    taken = []
    take = code_harness._take_session
    monkeypatch.setattr(code_harness, "_take_session", lambda *a: taken.append(1) or take(*a))
    v = check_program(DEEP_TREES, DEEP_TESTS, limits=limits_for("per_response"))
    assert v.statuses == ["wrong_answer", "passed", "passed"], v.feedback
    assert len(taken) == 1


@needs_reuse
def test_a_forked_copy_of_the_grader_leaves_its_sandboxes_alone():
    # A library that forks the grading process (multiprocessing, as LiveCodeBench's harness does)
    # gives the child copies of the idle sandboxes; dropping them there must not end them.
    import gc

    code_harness.close_idle_sandboxes()
    limits = limits_for("per_response")
    assert check_program(SUM, SUM_TESTS, limits=limits).statuses == ["passed"] * 3
    [sandbox] = [s for pool in code_harness._idle.values() for s in pool]
    pid = os.fork()
    if pid == 0:  # (the fork cleared the child's pool: its copies are garbage once this one goes)
        del sandbox
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    assert check_program(SUM, SUM_TESTS, limits=limits).statuses == ["passed"] * 3
    assert [s for pool in code_harness._idle.values() for s in pool] == [sandbox]
    assert sandbox.programs == 2


def test_execution_settings_are_checked():
    with pytest.raises(ValueError, match="^execution='threads'"):
        ExecutionLimits(execution="threads")
    with pytest.raises(ValueError, match="^parallel_tests=0"):
        ExecutionLimits(parallel_tests=0)


def test_livecodebench_grading_is_the_same_in_both_modes():
    import json

    from distil_ray.tasks.livecodebench import LiveCodeBenchConfig, LiveCodeBenchTask, example_from_record
    from tests.shared_data import SHARED_DATA

    records = SHARED_DATA / "samples" / "livecodebench_records.jsonl"
    if not records.exists():
        pytest.skip(f"LiveCodeBench sample records not found under {records.parent}")
    example = example_from_record(json.loads(records.read_text().splitlines()[0]), "test")
    right = "t = int(input())\nfor _ in range(t):\n    s = input().strip()\n    print('YES' if sum(a != b for a, b in zip(s, 'abc')) != 3 else 'NO')\n"
    wrong = "t = int(input())\nfor _ in range(t):\n    input()\n    print('YES')\n"
    grades = {}
    for mode in MODES:
        task = LiveCodeBenchTask(LiveCodeBenchConfig(execution=mode))
        grades[mode] = [task.grade(example, f"```python\n{code}```") for code in (right, wrong)]
    (right_a, wrong_a), (right_b, wrong_b) = grades["per_response"], grades["per_test"]
    assert right_a.details["statuses"] == right_b.details["statuses"] == ["passed"] * 5
    assert wrong_a.details["statuses"] == wrong_b.details["statuses"] == ["wrong_answer", "passed", "passed",
                                                                          "wrong_answer", "passed"]
    assert (right_a.feedback, wrong_a.feedback) == (right_b.feedback, wrong_b.feedback)
    with pytest.raises(ValueError, match="^execution="):
        LiveCodeBenchConfig(execution="threads")


def patch_server(monkeypatch, old: str, new: str) -> None:
    """The fork server's text with ``old`` (found exactly once) replaced by ``new``."""
    server = sandbox_runner._FORKSERVER
    assert server.count(old) == 1, old
    monkeypatch.setattr(sandbox_runner, "_FORKSERVER", server.replace(old, new))


def record_forked_by(monkeypatch) -> list:
    """Which process forked each test's process ("server" or "spare"), in the order graded."""
    forked_by, grade = [], code_harness.result_of_run
    monkeypatch.setattr(code_harness, "result_of_run",
                        lambda res, *a, **k: forked_by.append(getattr(res, "forked_by", None)) or grade(res, *a, **k))
    return forked_by


# What a test's process looks like from inside, whichever process forked it (the first of a
# response comes from the response server, the next ones each from the one before).
FRESH_PROCESS = """
import os, resource, signal, threading, time
try:
    os.waitpid(-1, os.WNOHANG)
    child = "a child"
except ChildProcessError:
    child = "no child"
with open("/proc/self/oom_score_adj") as f:
    oom = f.read().strip()
fds = []
for fd in range(64):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
# (the C library's own record of the thread's id, which the CPU clock of a pthread is made of)
clock = time.clock_gettime(time.pthread_getcpuclockid(threading.get_ident())) > 0
print(child, oom, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, clock, fds,
      resource.getrlimit(resource.RLIMIT_NPROC), os.getcwd() == os.environ["HOME"], os.getuid() != 0)
print(os.getpgid(0) == os.getpid(), os.getuid())
"""


@pytest.mark.parametrize("forker", ["the process before", "the server"])
def test_every_test_process_starts_alike(forker, monkeypatch):
    # No child (none of the processes forked ahead is its child), the OOM killer's first pick, the
    # default action of SIGTERM, its thread's id where the C library keeps it, only the standard
    # streams open, the test's rlimits, its working directory, a uid of its own, and (one sandbox
    # per response) a process group of its own. Whether each is forked by the test process before
    # it (the rule) or by the server (where the C library gives no clone with CLONE_PARENT).
    if forker == "the server":
        patch_server(monkeypatch, "sibling_forking_with = sibling_forking()", "sibling_forking_with = None")
    forked_by = record_forked_by(monkeypatch)
    expected = "no child 1000 True True [0, 1, 2] (16, 16) True True\n"
    code_harness.close_idle_sandboxes()  # (sandboxes of the other server)
    try:
        for mode in MODES:
            for _ in range(2):
                forked_by.clear()
                results = run_tests(FRESH_PROCESS, [{"input": "", "output": "?"}] * 6, limits=limits_for(mode))
                firsts = {r.actual.split("\n")[0] + "\n" for r in results}
                if os.geteuid() == 0:
                    assert firsts == {expected}, (mode, [r.actual or r.error for r in results])
                else:  # (oom_score_adj may not be raised in an unprivileged user namespace)
                    (first,) = firsts
                    got, want = first.split(), expected.split()
                    assert got[:2] + got[3:] == want[:2] + want[3:], results
                groups_and_uids = [r.actual.split("\n")[1].split() for r in results]
                if os.geteuid() == 0:  # (a fresh uid each where the sandbox switches uids)
                    assert len({uid for _, uid in groups_and_uids}) == 6
                if mode == "per_response":
                    assert {own_group for own_group, _ in groups_and_uids} == {"True"}
                    chained = ["spare"] * 4 if forker == "the process before" else ["server"] * 4
                    assert forked_by == ["server", "server", *chained]
    finally:
        code_harness.close_idle_sandboxes()


# Faults of the fork server's own processes, injected into its text: each must leave the
# verdicts as they are (the server forks the next test's process itself, or the root carries on).
SERVER_FAULTS = {
    # the spare forked by the one before it dies before it hands itself over
    "a forked spare dies": ('                if not send_word([token, b"h", word], server_ends):',
                            '                os._exit(1)\n                if not send_word([token, b"h", word], server_ends):'),
    # ... or takes longer than the server waits for it
    "a forked spare is too slow": ('                if not send_word([token, b"h", word], server_ends):',
                                   '                time.sleep(0.6)\n                if not send_word([token, b"h", word], server_ends):'),
    # the spare asked to fork the one after it cannot fork
    "a spare cannot fork": ("        pid = fork_sibling()",
                            "        pid = (_ for _ in ()).throw(OSError(11, 'injected'))"),
    # the root looks at a response server only after the next one has served a whole response
    "the root is late": ("    status = reaped.pop(current[0], None)",
                         "    time.sleep(0.2)\n    status = reaped.pop(current[0], None)"),
}


@needs_bwrap
@pytest.mark.parametrize("fault", list(SERVER_FAULTS))
def test_faults_of_the_servers_own_processes_change_no_verdict(fault, monkeypatch):
    patch_server(monkeypatch, *SERVER_FAULTS[fault])
    forked_by, sessions = record_forked_by(monkeypatch), []
    start = sandbox_session.SandboxSession.__init__
    monkeypatch.setattr(sandbox_session.SandboxSession, "__init__",
                        lambda self, *a, **k: sessions.append(self) or start(self, *a, **k))
    tests = [{"input": f"{i} {i}\n", "output": f"{2 * i}\n"} for i in range(8)]
    wrong_on_5 = "a, b = map(int, input().split())\nprint(a + b + (a == 5))\n"
    code_harness.close_idle_sandboxes()  # (sandboxes of the usual server)
    try:
        for _ in range(2):  # (one sandbox for all four responses, where run by root)
            assert run_tests(SUM, tests[:1], limits=limits_for("per_response"))[0].status == "passed"
            statuses = [r.status for r in run_tests(wrong_on_5, tests, limits=limits_for("per_response"))]
            assert statuses == ["passed"] * 5 + ["wrong_answer"] + ["passed"] * 2, fault
    finally:
        code_harness.close_idle_sandboxes()
    if fault in ("a forked spare dies", "a forked spare is too slow", "a spare cannot fork"):  # (the fault did happen)
        assert set(forked_by) == {"server"}
    if os.geteuid() == 0:  # (the root carried on, late or not: no sandbox was lost)
        assert len(sessions) == 1
