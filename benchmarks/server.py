"""Start the real ``moe-serve`` (``python -m serve.launch.cli``) on a free loopback port: ``benchmarks.serve_load``'s
server, and the HTTP tests' (tests may import benchmarks; benchmarks never import tests)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

_LABEL = re.compile(r'\w+="(?:[^"\\]|\\.)*"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of the ``/metrics`` samples called ``name`` whose labels include ``labels`` (like
        ``'finished_reason="abort"'``; any others, ``model_name`` say, may differ); 0 when there is none."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        wanted = set(_LABEL.findall(labels))
        total = 0.0
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            sample_name, _, sample_labels = sample.partition("{")
            if sample_name == name and wanted <= set(_LABEL.findall(sample_labels)):
                total += float(value)
        return total

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until no request runs or waits and every KV block is free (the leak check)."""
        deadline = time.monotonic() + timeout
        while True:
            running = self.metric("vllm:num_requests_running")
            waiting = self.metric("vllm:num_requests_waiting")
            free, total = self.metric("moe_serve_kv_cache_free_blocks"), self.metric("moe_serve_kv_cache_blocks")
            if running == 0 and waiting == 0 and free == total:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle: running={running} waiting={waiting} free={free}/{total}")
            time.sleep(0.1)


def wait_healthy(server: RunningServer, timeout: float, poll_s: float = 0.2) -> None:
    """Until ``GET /health`` answers 200; ``RuntimeError`` with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"moe-serve exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"moe-serve did not become healthy:\n{server.log()}")
        time.sleep(poll_s)


@contextmanager
def running_server(*overrides: str, startup_timeout: float = 90.0):
    """``moe-serve`` with Hydra ``overrides``; SIGTERM and a wait on exit (a leaked server fails a test)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="moe-serve-test-")
    log_path = os.path.join(workdir, "server.log")
    cmd = [sys.executable, "-m", "serve.launch.cli", f"server.port={port}", f"hydra.run.dir={workdir}",
           "server.log_level=warning", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_healthy(server, startup_timeout)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
