"""``moe-serve`` fails before the model loads or any rank starts, with one ``moe-serve: error:`` line naming the
key and exit status 2: a taken port, an unwritable ``report.output_dir``, a ``parallel.ep_size`` that does not
divide the checkpoint's experts, a missing DeepSpeed hostfile, a misspelt key or preset ("did you mean"). A bare
directory is ``model.path``. DeepSpeed's master address is the hostfile's first host.

Each CLI run is one interpreter start (~4 s here), none loads a model, except the one server test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks.server import running_server
from routing.stats import RoutingStats
from serve.engine.config import DEFAULT_MODEL
from serve.launch.checks import bind_listener, hostfile_hosts
from serve.launch.cli import config_dir
from serve.launch.launchers import deepspeed_command, torchrun_command
from serve.launch.schema import to_config


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    return subprocess.run([sys.executable, "-m", "serve.launch.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def assert_one_line_error(out: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2, the message on one ``moe-serve: error:`` line, no traceback, nothing started or loaded."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("moe-serve: error: ") and message in lines[0], out.stderr
    for started in ("serving", "launching", "rank", "Traceback"):
        assert started not in out.stdout + out.stderr, out.stdout + out.stderr


def composed(*overrides: str):
    with initialize_config_dir(str(config_dir()), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# -- before the model loads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", [[], ["parallel=ep2", "launcher=torchrun"]])
def test_a_taken_port_fails_before_loading(taken_port, launcher, tmp_path):
    out = run_cli(f"server.port={taken_port}", f"hydra.run.dir={tmp_path}", *launcher)
    assert_one_line_error(out, f"server.port ({taken_port}) cannot be bound on server.host ('127.0.0.1')")


def test_bind_listener_names_the_key(taken_port):
    with pytest.raises(ValueError, match=rf"server.port \({taken_port}\) cannot be bound"):
        bind_listener("127.0.0.1", taken_port)
    sock = bind_listener("127.0.0.1", 0)  # bound, not listening: a client is refused until the server starts
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sock.getsockname(), timeout=2).close()
    finally:
        sock.close()


def test_an_unwritable_output_dir_fails_before_loading(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = run_cli(f"report.output_dir={blocker}/stats", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(out, f"report.output_dir ('{blocker}/stats') is not a writable directory")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "submitit_local"])
def test_ep_size_must_divide_the_experts_before_any_rank_starts(launcher, tmp_path):
    started = time.monotonic()
    out = run_cli("parallel.ep_size=3", f"launcher={launcher}", "launcher.master_port=0", f"hydra.run.dir={tmp_path}",
                  f"hydra.sweep.dir={tmp_path}/sweep")
    assert_one_line_error(out, "parallel.ep_size (3) must divide the 8 experts of default_model (ep_size can be 2, "
                               "4, 8)")
    assert time.monotonic() - started < 30  # before: 68 s and a traceback per rank
    assert not (tmp_path / "sweep" / ".submitit").exists()  # nothing submitted


def test_a_missing_checkpoint_fails_naming_model_path(tmp_path):
    out = run_cli(f"model.path={tmp_path}", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(out, f"model.path ('{tmp_path}') has no config.json")


def test_a_missing_hostfile_fails_before_deepspeed_starts(tmp_path):
    out = run_cli("parallel=ep2", "launcher=deepspeed", f"launcher.hostfile={tmp_path}/hostfile",
                  f"hydra.run.dir={tmp_path}")
    assert_one_line_error(out, f"launcher.hostfile ('{tmp_path}/hostfile') cannot be read")


# -- DeepSpeed's hosts ---------------------------------------------------------------------------------------------
def test_deepspeed_master_is_the_hostfile_first_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the job's nodes\n\nworker-7 slots=4  # first\nworker-8 slots=4\n")
    overrides = ["parallel=ep8", "launcher=deepspeed", "launcher.nnodes=2", "launcher.nproc_per_node=4",
                 f"launcher.hostfile={hostfile}"]
    cfg = composed(*overrides)
    assert hostfile_hosts(cfg) == ["worker-7", "worker-8"]
    cmd = deepspeed_command(cfg, Path("/run/launch.yaml"))
    assert "--master_addr=worker-7" in cmd and "--master_addr=127.0.0.1" not in cmd
    cmd = deepspeed_command(composed(*overrides, "launcher.master_addr=10.0.0.5"), Path("/run/launch.yaml"))
    assert "--master_addr=10.0.0.5" in cmd
    with pytest.raises(ValueError, match=r"lists 2 host\(s\) .* but launcher.nnodes is 3"):
        hostfile_hosts(composed("parallel.ep_size=12", "launcher=deepspeed", "launcher.nnodes=3",
                                "launcher.nproc_per_node=4", f"launcher.hostfile={hostfile}"))


def test_torchrun_master_address():
    assert "--master-addr=127.0.0.1" in torchrun_command(composed("parallel=ep2", "launcher=torchrun"), Path("x"))
    with pytest.raises(ValueError, match=r"launcher.master_addr .* must be given when launcher.nnodes \(2\) > 1"):
        composed("parallel=ep4", "launcher=torchrun", "launcher.nnodes=2", "launcher.nproc_per_node=2")


# -- the command line ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("engine.max_num_seq=8", "engine.max_num_seq is not a config key: did you mean engine.max_num_seqs?"),
    ("modle.path=/ckpt", "modle.path is not a config key: did you mean model.path?"),
    ("report.outdir=/tmp", "report.outdir is not a config key: did you mean report.output_dir?"),
    ("quant=fp8-blok", "quant=fp8-blok: no such preset in configs/quant (fp8-block, fp8-channel, none): did you "
                       "mean quant=fp8-block?"),
    ("parallel=ep3", "parallel=ep3: no such preset in configs/parallel (ep2, ep4, ep8, single); "
                     "parallel.ep_size=N sets any size"),
    ("no-such-dir", "'no-such-dir' is neither a key=value override nor a checkpoint directory"),
])
def test_typos_get_a_did_you_mean_line(override, message, tmp_path):
    assert_one_line_error(run_cli(override, f"hydra.run.dir={tmp_path}", cwd=tmp_path), message)


def test_a_bare_directory_is_model_path(tmp_path):
    (tmp_path / "My Model").symlink_to(DEFAULT_MODEL)  # a space: quoted for Hydra; a symlink: not resolved
    out = run_cli("--cfg", "job", "My Model", "server.port=9001", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert (cfg.model.path, cfg.server.port) == (str(tmp_path / "My Model"), 9001)


def test_a_bare_missing_path_fails_as_model_path(tmp_path):
    out = run_cli(f"{tmp_path}/no-such-checkpoint", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(out, f"model.path ('{tmp_path}/no-such-checkpoint') is not a directory")


def test_serving_a_bare_directory_names_the_model_and_its_statistics(tmp_path):
    """``moe-serve DIR``: /v1/models and the routing statistics (moe-report's titles) carry DIR's name."""
    (tmp_path / "tiny-qwen").symlink_to(DEFAULT_MODEL)
    with running_server(str(tmp_path / "tiny-qwen"), f"report.output_dir={tmp_path / 'stats'}") as server:
        assert httpx.get(server.v1 + "/models", timeout=10).json()["data"][0]["id"] == "tiny-qwen"
        r = httpx.post(server.v1 + "/completions", json={"prompt": "def f(x):", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(server.v1 + "/moe/routing", timeout=10).json()["model"] == "tiny-qwen"
    assert server.process.returncode == 0, server.log()
    assert RoutingStats.load(tmp_path / "stats" / "routing_stats.json").model == "tiny-qwen"


def test_an_idle_server_exits_within_seconds_of_sigterm():
    """The drain has nothing to wait for: exit 0 well inside a Kubernetes grace period (30 s)."""
    with running_server("server.routing_stats=false") as server:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log()
        assert time.monotonic() - started < 5, server.log()
