"""Every code block of README.md runs, at the shapes the README shows, on a CPU machine.

What "runs" means for each kind of block:

- ```python blocks are executed in README order, each in a fresh namespace (``__name__ == "readme"``), with
  these substitutions, and nothing else changed:
  - ``/path/to/hf_checkpoint`` -> a tiny random Mixtral checkpoint (``tests/serve/checkpoints.py``'s
    ``hf_model``/``save``: config.json + safetensors, no tokenizer), saved once per module;
  - ``http://127.0.0.1:8000/v1`` -> the ``/v1`` of a real ``moe-serve`` on the embedded default model, started
    on a free port by ``benchmarks.server.running_server`` for the block that needs it;
  - ``ds_moe`` (the one name a block uses without defining: an existing DeepSpeed layer) is put into that
    block's namespace: a small ``deepspeed.moe.layer.MoE`` with ``drop_tokens=False`` on a one-rank gloo group.
    Without deepspeed that block is skipped.
  A block that calls ``dist.init_process_group("gloo")`` gets the environment torchrun would give one rank
  (``RANK=0``, ``WORLD_SIZE=1``, a free ``MASTER_PORT``); the group is destroyed afterwards. ``CHECKS`` then
  asserts what each block claims (output shapes, devices, counts).
- ```bash blocks are composed, not run: they start servers, multi-node jobs and installs. Each ``moe-serve ...``
  command (``\\`` continuations joined, ``#`` comments dropped) runs as ``moe-serve ... --cfg all`` unless it
  already asks for ``--cfg``: ``serve.launch.cli.main`` (the script's entry point, checked against
  pyproject.toml) called with that argv, all commands in one fresh interpreter so torch is imported once. Each
  must exit 0, its job config must pass ``serve.launch.schema.to_config`` (the dataclasses' ``__post_init__``
  checks), and each ``key=value`` override must show in the printed config (a ``group=preset`` one in
  ``hydra.runtime.choices``). Paths in those commands (``/ckpt/...``, ``/job/hostfile``) are only composed, never
  opened. ``make TARGET`` runs as ``make -n TARGET`` (the target exists; nothing is installed or served).
- Inline ``python -m benchmarks.NAME`` and ``make TARGET`` mentions in the prose name real modules and targets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
SERVER_URL = "http://127.0.0.1:8000/v1"
CHECKPOINT = "/path/to/hf_checkpoint"


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README) if kind == lang]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_openai(ns, out):
    assert ns["chunk"].choices[0].finish_reason is not None and out.strip()


def _check_layer(ns, out):
    assert ns["y"].shape == (4, 17, 1024) and torch.isfinite(ns["y"]).all()
    w13 = ns["layer"].experts.w13_E2FD
    assert w13.device.type == "meta" and w13.shape == (256, 2 * 2048, 7168)


def _check_drop_in(ns, out):
    from moe import MoE

    assert ns["n"] == ns["model"].config.num_hidden_layers
    assert all(isinstance(layer.mlp, MoE) for layer in ns["model"].model.layers)
    assert isinstance(ns["layer"], MoE)


def _check_offline(ns, out):
    assert 0 < len(ns["out"][0].token_ids) <= 32 and ns["out"][0].text in out
    assert ns["llm"].engine.model.config.num_layers == 2  # the tiny checkpoint, not the default model


def _check_expert_parallel(ns, out):
    from quant import Fp8Experts

    assert isinstance(ns["model"].layers[0].mlp.experts, Fp8Experts)
    assert isinstance(ns["layer"].experts, Fp8Experts)
    assert ns["model"].layers[0].mlp.expert_placement.num_ranks == 1
    assert ns["placement"].num_ranks == 8 and len(ns["placement"].phy2log) == 256 + 8
    assert ns["cfg"].hypermoe is not None


# A distinctive line of each python block -> what the block must have produced (namespace, printed text).
CHECKS = {
    "client = OpenAI(": _check_openai,
    "layer = moe.MoE(moe.MoEConfig(hidden_size=1024": _check_layer,
    "n = moe.patch_hf(model)": _check_drop_in,
    "llm = serve.LLM()": _check_offline,
    "expert_parallel.shard_moe(model": _check_expert_parallel,
}


def test_every_python_block_has_its_check():
    found = [[key for key in CHECKS if key in block] for block in blocks("python")]
    assert found == [[key] for key in CHECKS], "a README python block was added, removed or reordered"


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from tests.serve.checkpoints import hf_model, save

    return save(hf_model("mixtral"), tmp_path_factory.mktemp("readme") / "mixtral")


@pytest.fixture
def torchrun_env(monkeypatch):
    """One rank's torchrun environment; destroys the default process group the block made."""
    import torch.distributed as dist

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_layer():
    """A ``deepspeed.moe.layer.MoE`` (D=64, 8 experts, k=2, dropless, no random 2nd expert) on a one-rank gloo group."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install '.[deepspeed]')")
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from torch import nn

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    expert = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    return DeepSpeedMoE(64, expert, num_experts=8, ep_size=1, k=2, drop_tokens=False,
                        top2_2nd_expert_sampling=False)


@pytest.mark.parametrize("index", range(len(blocks("python"))), ids=lambda i: f"python{i}")
def test_python_block(index, hf_checkpoint, torchrun_env, capsys):
    source = blocks("python")[index].replace(CHECKPOINT, hf_checkpoint)
    ns = {"__name__": "readme"}
    if "ds_moe" in source:
        ns["ds_moe"] = deepspeed_layer()
    if SERVER_URL in source:
        from benchmarks.server import running_server

        with running_server() as server:
            exec(compile(source.replace(SERVER_URL, server.v1), f"README.md python block {index}", "exec"), ns)
    else:
        exec(compile(source, f"README.md python block {index}", "exec"), ns)
    (check,) = [fn for key, fn in CHECKS.items() if key in source]
    check(ns, capsys.readouterr().out)


def shell_commands() -> list[list[str]]:
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def test_moe_serve_is_serve_launch_cli():
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the package supports 3.10
    assert re.search(r'^moe-serve = "serve\.launch\.cli:main"$', pyproject, re.M)


# Runs moe-serve's main() once per command in one fresh interpreter (torch is imported once, not per command):
# argv in, (exit code, stdout) out, as JSON.
COMPOSER = """
import contextlib, io, json, sys
from serve.launch.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    sys.argv, out, code = argv, io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out):
            main()
    except SystemExit as e:
        code = e.code
    results.append((code, out.getvalue()))
print(json.dumps(results))
"""


def compose(commands: list[list[str]]) -> list[tuple[int, str]]:
    """``moe-serve ARGS --cfg all`` (or ``--cfg`` as given) for each command: ``[(exit code, printed config)]``."""
    argvs = [c + ([] if "--cfg" in c else ["--cfg", "all"]) for c in commands]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", COMPOSER], input=json.dumps(argvs), capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(r) for r in json.loads(result.stdout.splitlines()[-1])]


def test_shell_blocks_compose():
    from serve.launch.schema import to_config

    commands = shell_commands()
    assert {c[0] for c in commands} <= {"make", "moe-serve"}, "a README bash block runs a new kind of command"
    for argv in (c for c in commands if c[0] == "make"):
        result = subprocess.run(["make", "-n", *argv[1:]], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, (argv, result.stderr)
    serve_commands = [c for c in commands if c[0] == "moe-serve"]
    results = compose(serve_commands)
    assert serve_commands and len(results) == len(serve_commands)
    for argv, (code, printed) in zip(serve_commands, results, strict=True):
        assert code == 0, argv
        cfg = OmegaConf.create(printed)
        to_config(cfg)  # types and __post_init__ checks
        for key, value in (a.split("=", 1) for a in argv if "=" in a):
            if "." in key:
                assert OmegaConf.select(cfg, key) == yaml.safe_load(value), (argv, key)
            else:  # a preset of a config group
                assert OmegaConf.select(cfg, f"hydra.runtime.choices.{key}") == value, (argv, key)


def test_prose_names_real_benchmarks_and_targets():
    modules = set(re.findall(r"`python -m (benchmarks\.\w+)", README))
    assert modules, "the README no longer says how to run a benchmark"
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for target in set(re.findall(r"`make ([\w-]+)`", README)):
        assert subprocess.run(["make", "-n", target], capture_output=True, cwd=ROOT).returncode == 0, target
