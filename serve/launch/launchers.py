"""Starting the ranks of a ``moe-serve`` job with existing launchers, never a home-made one.

- ``launcher=torchrun`` / ``launcher=deepspeed``: ``moe-serve`` writes the resolved config to
  ``<run dir>/launch.yaml`` and runs the launcher (``python -m torch.distributed.run`` or
  ``python -m deepspeed.launcher.runner``) as its only child; the launcher starts
  ``python -m serve.launch.ranks <launch.yaml>`` once per rank. The ranks are not Hydra apps, so there is one
  run directory. ``moe-serve`` stays in front of the launcher: SIGTERM/SIGINT go to rank 0 (its pid is in
  ``<run dir>/server.pid``), which drains and stops the others, so a clean stop exits 0 (both launchers
  would turn a signal of their own into exit 1); before rank 0 is up they go to the launcher. If ``moe-serve``
  dies, the launcher gets SIGTERM (``PR_SET_PDEATHSIG``), so no rank outlives it. A rank that dies makes the
  launcher stop the rest; ``moe-serve`` exits with the launcher's status.
- ``launcher=submitit_local`` / ``submitit_slurm``: Hydra's submitit launcher runs the Hydra task once per
  task of one job; :func:`export_submitit_env` sets the ``torch.distributed`` variables from submitit's view
  of the job (SLURM's variables, or the local executor's). A signal to the submitting ``moe-serve`` stops the
  job (:mod:`serve.launch.submitit_stop`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from serve.launch.checks import check_before_start, hostfile_hosts
from serve.launch.ranks import PID_FILE
from serve.launch.schema import MoEServeSchema, to_config
from serve.launch.submitit_stop import stop_job_on_signal

log = logging.getLogger("moe-serve")

LAUNCH_FILE = "launch.yaml"
_PR_SET_PDEATHSIG = 1


def torchrun_command(cfg: MoEServeSchema, config_path: Path) -> list[str]:
    la = cfg.launcher
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={la.nnodes}",
            f"--nproc-per-node={la.nproc_per_node}", f"--node-rank={la.node_rank}",
            f"--master-addr={la.master_addr or '127.0.0.1'}", f"--master-port={_port(cfg)}", "--max-restarts=0",
            *la.extra_args, "-m", "serve.launch.ranks", str(config_path)]


def deepspeed_command(cfg: MoEServeSchema, config_path: Path) -> list[str]:
    """DeepSpeed's runner; with a hostfile, rank 0 (the master) is on its first host unless
    ``launcher.master_addr`` says otherwise (DeepSpeed starts rank 0 on the first host it lists)."""
    la = cfg.launcher
    hosts = []
    if la.hostfile:
        hosts = [f"--hostfile={la.hostfile}", f"--master_addr={la.master_addr or hostfile_hosts(cfg)[0]}"]
    elif la.master_addr:
        hosts = [f"--master_addr={la.master_addr}"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *hosts, f"--num_nodes={la.nnodes}",
            f"--num_gpus={la.nproc_per_node}", f"--master_port={_port(cfg)}", "--no_local_rank", *la.extra_args,
            "--module", "serve.launch.ranks", str(config_path)]


COMMANDS = {"torchrun": torchrun_command, "deepspeed": deepspeed_command}


def launch(cfg: MoEServeSchema, run_dir: Path) -> int:
    """Run ``cfg``'s ranks through ``cfg.launcher.kind`` (torchrun or deepspeed); returns the exit status."""
    config_path = run_dir / LAUNCH_FILE
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    cmd = COMMANDS[cfg.launcher.kind](cfg, config_path)
    log.info("launching %d rank(s): %s", cfg.launcher.nproc_per_node, " ".join(cmd))
    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, _frame) -> None:
        target = _server_pid(run_dir / PID_FILE) or child.pid
        log.info("signal %d: passing SIGTERM to %s", signum, "rank 0" if target != child.pid else "the launcher")
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()


def _server_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _port(cfg: MoEServeSchema) -> int:
    if cfg.launcher.master_port:
        return cfg.launcher.master_port
    if cfg.launcher.nnodes > 1:
        raise ValueError("launcher.master_port (0: pick a free one) must be given when launcher.nnodes > 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the launcher's process, before exec: SIGTERM when ``moe-serve`` dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def in_submitit_job() -> bool:
    """True inside a task that submitit started (SLURM or local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def export_submitit_env() -> None:
    """``MASTER_ADDR`` (the job's first host), ``MASTER_PORT`` (from the job id, unless set), ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` from the SLURM (or local-executor) variables."""
    from submitit.helpers import TorchDistributedEnvironment

    # every task sees all of its node's GPUs and picks cuda:LOCAL_RANK itself
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class SubmitCheck(Callback):
    """Hydra callback (``configs/config.yaml``): before a multirun submits anything (to SLURM), check the config
    where it is typed: the values (a typo fails now, not after a wait in the queue), what this machine can check
    of the job's (:func:`serve.launch.checks.check_before_start`), and that the submitit launcher starts one
    task per rank. It also makes a signal to the submitting process stop the job
    (:mod:`serve.launch.submitit_stop`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            cfg = to_config(config)
            listener = check_before_start(cfg)
            if listener is not None:  # rank 0 binds it again, before it loads the model
                listener.close()
            hl = config.hydra.launcher
            if "tasks_per_node" in hl and hl.nodes * hl.tasks_per_node != cfg.parallel.ep_size:
                raise ValueError(f"hydra.launcher starts {hl.nodes} x {hl.tasks_per_node} tasks but parallel.ep_size "
                                 f"is {cfg.parallel.ep_size}: use launcher=submitit_slurm (or submitit_local), which "
                                 "sets tasks_per_node = gpus_per_node = launcher.nproc_per_node")
            if cfg.launcher.kind.startswith("submitit") and "submitit_folder" in hl:  # "<sweep>/.submitit/%j"
                stop_job_on_signal(cfg.launcher.kind, Path(str(config.hydra.sweep.dir)),
                                   Path(str(hl.submitit_folder)).parent)
        except (ValueError, OmegaConfBaseException) as e:
            # Hydra turns a callback's exception into a warning and goes on to submit: exit instead
            print(f"moe-serve: error: {e}", file=sys.stderr)
            sys.exit(2)
