"""``configs/``: every preset of every group composes into a checked ``MoEServeSchema``; typos, wrong types and
bad values fail at start; the user-facing surface (keys and presets) is pinned; the launchers get the commands
and the torch.distributed environment they need (SLURM's sbatch script is checked without a cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from serve.engine.config import DEFAULT_MODEL
from serve.launch.cli import config_dir
from serve.launch.launchers import deepspeed_command, export_submitit_env, torchrun_command
from serve.launch.schema import GROUPS, MoEServeSchema, to_config

CONFIGS = config_dir()
PRESETS = {
    "model": ["default", "qwen3_30b_a3b"],
    "quant": ["fp8-block", "fp8-channel", "none"],
    "parallel": ["ep2", "ep4", "ep8", "single"],
    "server": ["default"],
    "launcher": ["deepspeed", "local", "submitit_local", "submitit_slurm", "torchrun"],
    "report": ["default"],
}
# The user-facing config: a change here is a change to every deployment's command lines. Update deliberately.
SURFACE = [
    "engine.async_scheduling", "engine.attention_backend", "engine.block_size", "engine.cuda_graphs", "engine.device",
    "engine.enable_prefix_caching", "engine.gpu_memory_utilization", "engine.kv_cache_bytes",
    "engine.max_num_batched_tokens", "engine.max_num_seqs", "engine.max_queued_requests", "engine.num_kv_blocks",
    "engine.seed",
    "launcher.extra_args", "launcher.hostfile", "launcher.kind", "launcher.master_addr", "launcher.master_port",
    "launcher.nnodes", "launcher.node_rank", "launcher.nproc_per_node",
    "model.dtype", "model.hypermoe", "model.max_model_len", "model.path", "model.tokenizer",
    "parallel.backend", "parallel.dispatcher", "parallel.ep_size", "parallel.startup_timeout_s", "parallel.timeout_s",
    "quant.scheme",
    "report.output_dir", "report.save_interval_s", "report.window",
    "server.api_key", "server.body_timeout_s", "server.cors_allowed_origins", "server.drain_timeout_s",
    "server.engine_process", "server.header_timeout_s", "server.host", "server.limit_concurrency", "server.log_level",
    "server.max_expert_series", "server.max_request_bytes", "server.max_sub_requests_per_request", "server.port",
    "server.routing_stats", "server.routing_window", "server.served_model_name", "server.stall_s",
]


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def dotted_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        keys += dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]
    return keys


def test_config_surface_snapshot():
    cfg = composed()
    assert sorted(dotted_keys(OmegaConf.to_container(cfg))) == SURFACE
    presets = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in GROUPS}
    assert presets == PRESETS


def test_defaults_are_the_single_process_server():
    cfg = to_config(composed())
    assert isinstance(cfg, MoEServeSchema)
    assert (cfg.model.path, cfg.quant.scheme, cfg.parallel.ep_size, cfg.launcher.kind) == (None, "none", 1, "local")
    assert (cfg.server.host, cfg.server.port, cfg.server.routing_window) == ("127.0.0.1", 8000, cfg.report.window)


@pytest.mark.parametrize("group,preset", [(g, p) for g, ps in PRESETS.items() for p in ps])
def test_every_preset_composes(group, preset):
    extra = {"parallel": ["launcher=torchrun"], "launcher": ["parallel=ep2"] if preset != "local" else []}
    cfg = to_config(composed(f"{group}={preset}", *extra.get(group, [])))
    assert type(getattr(cfg, group)) is GROUPS[group]
    if group == "quant":
        assert cfg.quant.scheme == preset
    if group == "parallel":
        assert cfg.parallel.ep_size == (1 if preset == "single" else int(preset[2:]))
        assert cfg.launcher.nproc_per_node == cfg.parallel.ep_size
    if group == "launcher":
        assert cfg.launcher.kind == preset
        assert cfg.launcher.nproc_per_node == cfg.parallel.ep_size
    if group == "model" and preset != "default":
        assert cfg.model.path.endswith("/Qwen3-30B-A3B") and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("kind", ["submitit_local", "submitit_slurm"])
def test_submitit_presets_start_one_task_per_rank(kind):
    cfg = composed(f"launcher={kind}", "parallel=ep8", "launcher.nnodes=2", "launcher.nproc_per_node=4", hydra=True)
    hl = cfg.hydra.launcher
    assert cfg.hydra.mode.name == "MULTIRUN" and hl._target_.endswith("SlurmLauncher" if "slurm" in kind else
                                                                         "LocalLauncher")
    assert (hl.nodes, hl.tasks_per_node) == (2, 4)
    if kind == "submitit_slurm":
        assert hl.gpus_per_node == hl.tasks_per_node


@pytest.mark.parametrize("override,error,message", [
    ("modle.path=x", ConfigCompositionException, "modle.path"),  # a typo in a key
    ("server.port=abc", ConfigCompositionException, "server.port=abc"),  # a wrong type
    ("parallel.ep_size=two", ConfigCompositionException, "parallel.ep_size=two"),
    ("parallel=ep3", MissingConfigException, "parallel/ep3"),  # a preset that does not exist
    ("quant=fp8-blok", MissingConfigException, "quant/fp8-blok"),
])
def test_typos_and_wrong_types_fail_in_hydra(override, error, message):
    with pytest.raises(error, match=message):
        composed(override)


@pytest.mark.parametrize("overrides,message", [
    (["quant.scheme=fp8"], r"quant.scheme \('fp8'\) is not one of: none, fp8-channel, fp8-block"),
    (["launcher.kind=mpirun"], r"launcher.kind \('mpirun'\) is not one of"),
    (["parallel=ep2"], r"parallel.ep_size \(2\) needs one process per rank"),
    (["parallel=ep8", "launcher=torchrun", "launcher.nnodes=2"],
     r"launcher.nnodes \(2\) x launcher.nproc_per_node \(8\) must equal parallel.ep_size \(8\)"),
    (["parallel.dispatcher=nccl_a2a"], r"parallel.dispatcher \('nccl_a2a'\)"),
    (["report.window=0"], r"routing_window \(0\) must be a positive integer"),  # server's window follows report's
    (["server.port=70000"], r"server.port \(70000\)"),
])
def test_bad_values_fail_with_the_key_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        to_config(composed(*overrides))


def test_report_window_drives_the_server_window():
    assert to_config(composed("report.window=7")).server.routing_window == 7
    assert to_config(composed("report.window=7", "server.routing_window=3")).server.routing_window == 3


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.launch.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_cli_prints_the_composed_config_and_refuses_a_typo(tmp_path):
    shown = run_cli("--cfg", "job", "parallel=ep4", "launcher=torchrun")
    assert shown.returncode == 0, shown.stderr
    assert to_config(OmegaConf.create(shown.stdout)).parallel.ep_size == 4
    typo = run_cli("modle.path=/ckpt", f"hydra.run.dir={tmp_path}")
    assert typo.returncode == 2 and "moe-serve: error: modle.path is not a config key: did you mean model.path?" \
        in typo.stderr, typo.stderr
    bad = run_cli("parallel=ep2", f"hydra.run.dir={tmp_path}")
    assert bad.returncode == 2 and "moe-serve: error: parallel.ep_size (2) needs" in bad.stderr, bad.stderr


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    """``srun`` (submitit's probe) and an ``sbatch`` that refuses, leaving the script submitit wrote."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", "echo 'sbatch: no cluster here' >&2; exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_submitit_slurm_writes_one_task_per_gpu(tmp_path, fake_slurm):
    sweep, model = tmp_path / "sweep", tmp_path / "model"  # a checkpoint whose 16 experts ep_size 16 divides
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**json.loads((DEFAULT_MODEL / "config.json").read_text()),
                                                   "num_experts": 16}))
    run_cli("launcher=submitit_slurm", "parallel.ep_size=16", "launcher.nnodes=2", "launcher.nproc_per_node=8",
            f"model.path={model}", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={sweep}", env=fake_slurm)
    [script] = (sweep / ".submitit").glob(".submission_file_*.sh")
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "export SLURM_KILL_BAD_EXIT=1", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in text, text


def test_multirun_checks_the_config_before_submitting(tmp_path, fake_slurm):
    """``-m hydra/launcher=submitit_slurm`` alone starts 1 task per node: refused before anything is queued."""
    out = run_cli("-m", "hydra/launcher=submitit_slurm", "parallel=ep2", "launcher=torchrun",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", env=fake_slurm)
    assert out.returncode == 2 and "hydra.launcher starts 1 x 1 tasks but parallel.ep_size is 2" in out.stderr
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_torch_distributed_environment_from_slurm(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "13", "SLURM_LOCALID": "5"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    export_submitit_env()
    got = {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert got == {"MASTER_ADDR": "gpu07", "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000  # derived from the job id: equal on every task


def test_launcher_commands(tmp_path):
    cfg = to_config(composed("parallel=ep8", "launcher=torchrun", "launcher.nnodes=2", "launcher.nproc_per_node=4",
                             "launcher.node_rank=1", "launcher.master_addr=node0", "launcher.master_port=29600"))
    cmd = torchrun_command(cfg, Path("/run/launch.yaml"))
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-3:] == ["-m", "serve.launch.ranks", "/run/launch.yaml"]
    for flag in ("--nnodes=2", "--nproc-per-node=4", "--node-rank=1", "--master-addr=node0", "--master-port=29600"):
        assert flag in cmd
    hostfile = tmp_path / "hosts.ds"
    hostfile.write_text("node0 slots=4\nnode1 slots=4\n")
    cfg = to_config(composed("parallel=ep8", "launcher=deepspeed", "launcher.nnodes=2", "launcher.nproc_per_node=4",
                             f"launcher.hostfile={hostfile}", "launcher.master_port=29600"))
    cmd = deepspeed_command(cfg, Path("/run/launch.yaml"))
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and cmd[-3:] == ["--module", "serve.launch.ranks",
                                                                            "/run/launch.yaml"]
    for flag in (f"--hostfile={hostfile}", "--master_addr=node0", "--num_nodes=2", "--num_gpus=4", "--no_local_rank"):
        assert flag in cmd
