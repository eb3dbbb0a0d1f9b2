"""A sandbox caller SIGKILLed mid-run leaves its run directory and cgroup (and, without a cgroup
to kill it, possibly the program itself); the next caller's sweep removes them, and leaves a live
caller's runs alone."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from distil_ray.feedback.sandbox import sweep_leftovers
from distil_ray.feedback.sandbox.cgroup import _CGROUP_PREFIX, _cgroup_layout
from distil_ray.feedback.sandbox.sweep import owner_pid, owner_tag

pytestmark = pytest.mark.timeout(120)

CALLER = """
import sys
from distil_ray.feedback.sandbox import run_python
print("calling", flush=True)
run_python("import time\\nprint('up', flush=True)\\ntime.sleep(60)", timeout_s=60, tmp_root=sys.argv[1])
"""


def _cgroups_of(pid):
    layout = _cgroup_layout()
    if isinstance(layout, str):
        return []
    return [os.path.join(p, n) for p in layout[1] for n in os.listdir(p)
            if n.startswith(_CGROUP_PREFIX) and owner_pid(n) == pid]


def _run_dirs_of(root, pid):
    return [n for n in os.listdir(root) if owner_pid(n) == pid]


def test_a_killed_callers_run_directory_and_cgroup_are_swept(tmp_path):
    root = str(tmp_path)
    caller = subprocess.Popen([sys.executable, "-c", CALLER, root], stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout.readline().strip() == "calling"
        deadline = time.monotonic() + 30
        while not _run_dirs_of(root, caller.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the program is running inside its sandbox now
        assert _run_dirs_of(root, caller.pid)
        cgroups = _cgroups_of(caller.pid)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    assert _run_dirs_of(root, caller.pid), "the killed caller left its run directory"

    live = tempfile.mkdtemp(prefix=f"distil-sandbox-{owner_tag()}-", dir=root)  # this process's own: kept
    swept = sweep_leftovers(root)
    assert swept.run_dirs == 1 and not _run_dirs_of(root, caller.pid)
    assert os.path.isdir(live)
    assert swept.cgroups == len({os.path.basename(c) for c in cgroups}) and not _cgroups_of(caller.pid)
    assert sweep_leftovers(root).run_dirs == 0  # nothing left the second time
    # a name from another PID namespace (another container sharing /tmp) is never touched, even
    # when its pid means nothing here
    foreign = tempfile.mkdtemp(prefix=f"distil-sandbox-1-{caller.pid}-", dir=root)
    assert owner_pid(os.path.basename(foreign)) is None
    sweep_leftovers(root)
    assert os.path.isdir(foreign)
