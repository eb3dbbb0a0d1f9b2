"""Two runs submitted to one existing Ray cluster (`ray start --head`, then the job submission
API, as `ray job submit` does): both attach to it (no num_cpus passed to a cluster they did not
start), each in a namespace of its own (the actor names would collide otherwise), both succeed."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN = ["+experiment=tiny", "warm_start.enabled=false", "trainer.total_steps=2", "trainer.prompts_per_step=2",
       "rollout.n_samples=2", "rollout.max_new_tokens=8", "eval.max_prompts=4", "rollout.engine=hf",
       "teacher.backend=hf", "teacher.update=current"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_concurrent_jobs_share_one_cluster(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"ray-jobs-{os.getpid()}"  # short: Ray's socket paths have a length limit
    # --block keeps the head in the foreground: killing its process group stops this cluster only
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
                             "--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        client = None
        deadline = time.monotonic() + 60
        while client is None:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
            except Exception:  # the dashboard is still starting
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        jobs = [client.submit_job(entrypoint=" ".join([sys.executable, "-m", "distil_ray.main", *RUN,
                                                       f"hydra.run.dir={tmp_path / f'run{i}'}"]),
                                  runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
                for i in range(2)]
        deadline = time.monotonic() + 420
        while True:
            statuses = [client.get_job_status(job) for job in jobs]
            if all(s in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} for s in statuses):
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(2)
        for job, status in zip(jobs, statuses):
            assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
        for i in range(2):
            assert (tmp_path / f"run{i}" / "summary.json").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
