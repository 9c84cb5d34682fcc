"""Multi-process ``moe-serve``: 2 expert-parallel CPU ranks through torchrun, the DeepSpeed launcher and Hydra's
submitit launcher (local executor) answer exactly as the single-process server does (greedy), stop together
on SIGTERM with exit 0, and a rank that dies stops the job with an error naming it.

Each test takes 14-22 s on a 2-core CPU (two model loads per job), so none is marked ``slow``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from benchmarks.server import RunningServer, free_port, running_server, wait_healthy

EP2 = ("parallel=ep2", "launcher.master_port=0")
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):",
           "# Sort a list of numbers in place\n" * 3]


def ask(server: RunningServer) -> list[str]:
    """Four prompts of different lengths in one batch (decodes and prefills share steps), n=2 (prefix sharing)."""
    client = OpenAI(base_url=server.v1, api_key="unused", timeout=120)
    out = client.completions.create(model="moe-serve-default", prompt=PROMPTS, max_tokens=20, temperature=0.0, n=2)
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


@pytest.fixture(scope="module")
def single_process_answers() -> list[str]:
    with running_server() as server:
        return ask(server)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_ranks_answer_like_one_process_and_stop_together(launcher, single_process_answers):
    started = time.monotonic()
    with running_server(*EP2, f"launcher={launcher}", startup_timeout=180) as server:
        assert ask(server) == single_process_answers
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    log = server.log()
    assert server.process.returncode == 0, log  # SIGTERM -> rank 0 drains, stops rank 1, both exit 0
    assert "rank 1 of 2 ready: experts [4, 5, 6, 7]" in log and "all 2 ranks stopped" in log, log
    print(f"{launcher}: {time.monotonic() - started:.1f} s")


def test_a_rank_that_dies_stops_the_job(single_process_answers):
    with running_server(*EP2, "launcher=torchrun", startup_timeout=180) as server:
        assert ask(server)[:2] == single_process_answers[:2]
        worker = _rank_pid(server.process.pid, rank=1)
        os.kill(worker, signal.SIGKILL)
        server.process.wait(60)  # no hang: rank 0 notices at once and the launcher stops the rest
    log = server.log()
    assert server.process.returncode != 0
    assert "rank 1 of 2 died (Connection closed by peer" in log, log


def test_submitit_local_runs_two_tasks(single_process_answers, tmp_path):
    with submitit_server(tmp_path, *EP2) as (server, run_dir):
        assert ask(server) == single_process_answers
        os.kill(int((run_dir / "server.pid").read_text()), signal.SIGTERM)  # what scancel does to rank 0
        assert server.process.wait(60) == 0, server.log()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    logs = {p.name: p.read_text() for p in run_dir.glob("moe-serve_rank*.log")}
    assert sorted(logs) == ["moe-serve_rank0.log", "moe-serve_rank1.log"]
    assert "all 2 ranks stopped" in logs["moe-serve_rank0.log"]
    assert "rank 1 of 2 ready: experts [4, 5, 6, 7]" in logs["moe-serve_rank1.log"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_submitter_stops_the_submitit_job(sig, tmp_path):
    """SIGTERM / Ctrl-C to the submitting moe-serve (not to its process group): rank 0 drains, every rank exits,
    the submitter exits 0 (before, it exited alone and the job went on serving)."""
    with submitit_server(tmp_path, *EP2) as (server, run_dir):
        ranks = _task_pids(server.process.pid)
        assert len(ranks) == 2
        server.process.send_signal(sig)
        assert server.process.wait(60) == 0, server.log()
        assert not [pid for pid in ranks if _alive(pid)], server.log()
    assert "all 2 ranks stopped" in (run_dir / "moe-serve_rank0.log").read_text()


def test_a_signal_before_rank0_serves_cancels_the_submitit_job(tmp_path):
    """Stopped while the ranks still load: the job is cancelled, its ranks are gone, exit 128 + SIGTERM."""
    with submitit_server(tmp_path, *EP2, wait=False) as (server, _):
        deadline = time.monotonic() + 60
        while len(ranks := _task_pids(server.process.pid)) < 2:  # both ranks started, rank 0 not serving yet
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()
            time.sleep(0.05)
        assert not (tmp_path / "0" / "server.pid").exists()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 128 + signal.SIGTERM, server.log()
        assert "cancelled submitit job(s)" in server.log()
        assert not [pid for pid in ranks if _alive(pid)], server.log()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def submitit_server(sweep_dir: Path, *overrides: str, startup_timeout: float = 180.0, wait: bool = True):
    """``moe-serve launcher=submitit_local``: Hydra submits one 2-task job and waits for it (``wait``: until it
    serves)."""
    port = free_port()
    log_path = os.path.join(tempfile.mkdtemp(prefix="moe-serve-submitit-"), "submit.log")
    cmd = [sys.executable, "-m", "serve.launch.cli", "launcher=submitit_local", f"server.port={port}",
           f"hydra.sweep.dir={sweep_dir}", "server.log_level=warning", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:  # own session: the cleanup below can reach the tasks too
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        if wait:
            wait_healthy(server, startup_timeout, poll_s=0.5)
        yield server, sweep_dir / "0"
    finally:  # the job too, if it outlived the submitter (its processes stay in the submitter's group)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _descendants(root: int) -> set[int]:
    children = {root}
    for _ in range(4):  # moe-serve -> launcher (or submitit's controller) -> ranks
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in children:
                children.add(pid)
    return children - {root}


def _task_pids(root: int) -> list[int]:
    """The submitit tasks (ranks) under ``root``: SUBMITIT_LOCAL_GLOBALID in their environment."""
    pids = []
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"SUBMITIT_LOCAL_GLOBALID=") for v in env) and _alive(pid):
            pids.append(pid)
    return pids


def _rank_pid(root: int, rank: int) -> int:
    """The pid of ``rank`` among ``root``'s descendants (from /proc: RANK in its environment)."""
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(b"serve.launch.ranks" in a for a in _cmdline(pid)):
            return pid
    raise AssertionError(f"no rank {rank} under pid {root}")


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def test_report_output_dir_gets_the_routing_statistics(tmp_path):
    from routing.stats import RoutingStats

    with running_server(f"report.output_dir={tmp_path}", "report.window=5") as server:
        ask(server)
    assert server.process.returncode == 0
    stats = RoutingStats.load(tmp_path / "routing_stats.json")  # written when the server stopped
    assert stats.window == 5 and stats.steps > 0 and int(stats.cumulative_counts().sum()) > 0
