"""Checks ``moe-serve`` makes before any model loads or any rank starts, so that a wrong setting fails in a
second with one line naming the key (``ValueError``), not after the load with a traceback per rank.

- ``server.port`` on ``server.host`` can be bound (:func:`bind_listener` binds it and hands the socket on);
- ``report.output_dir`` is a writable directory (created if missing);
- ``model.path`` is a checkpoint directory and ``parallel.ep_size`` divides its number of experts;
- ``launcher.hostfile`` (DeepSpeed) exists and lists at least ``launcher.nnodes`` hosts.

The schema's ``__post_init__`` checks the values; these look at the machine, so they run in ``moe-serve``
(:func:`check_before_start`), never in the config classes.
"""

from __future__ import annotations

import logging
import re
import socket
import tempfile
from pathlib import Path

from serve.engine.config import DEFAULT_MODEL
from serve.launch.schema import MoEServeSchema
from serve.models.loader import read_config

log = logging.getLogger("moe-serve")

_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # DeepSpeed's hostfile format: "worker-1 slots=8"


def check_before_start(cfg: MoEServeSchema) -> socket.socket | None:
    """Everything this module checks that ``cfg``'s launcher lets this machine see; returns the listening socket,
    bound, when rank 0 serves on this machine (the caller hands it to the server or closes it), else None.

    SLURM jobs run elsewhere: their port is not checked, nor paths this host does not see (a warning says so).
    """
    remote = cfg.launcher.kind == "submitit_slurm"
    check_output_dir(cfg, remote)
    check_experts(cfg, remote)
    if cfg.launcher.kind == "deepspeed" and cfg.launcher.hostfile:
        hostfile_hosts(cfg)
    return bind_listener(cfg.server.host, cfg.server.port) if serves_here(cfg) else None


def serves_here(cfg: MoEServeSchema) -> bool:
    """Whether rank 0 (the HTTP server) runs on this machine."""
    la = cfg.launcher
    if la.kind == "torchrun":
        return la.node_rank == 0
    if la.kind == "deepspeed":
        return la.nnodes == 1
    return la.kind != "submitit_slurm"


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (not yet listening: clients are refused, not queued, until the
    server starts); ``ValueError`` naming ``server.port`` when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not block it
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"server.port ({port}) cannot be bound on server.host ({host!r}): "
                         f"{e.strerror or e}") from None
    return sock


def check_output_dir(cfg: MoEServeSchema, remote: bool = False) -> None:
    """``report.output_dir`` exists (or is created) and a file can be written in it."""
    out = cfg.report.output_dir
    if out is None:
        return
    if remote and not Path(out).exists():
        log.warning("report.output_dir (%r) is not visible here: not checked before submitting", out)
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".moe-serve-check-"):
            pass
    except OSError as e:
        raise ValueError(f"report.output_dir ({out!r}) is not a writable directory: {e.strerror or e}") from None


def check_experts(cfg: MoEServeSchema, remote: bool = False) -> None:
    """``model.path`` has a ``config.json`` and ``parallel.ep_size`` divides its ``num_experts``."""
    path = Path(cfg.model.path) if cfg.model.path is not None else DEFAULT_MODEL
    if not (path / "config.json").is_file():
        if remote and not path.exists():
            log.warning("model.path (%r) is not visible here: not checked before submitting", str(path))
            return
        what = "is not a directory" if not path.is_dir() else "has no config.json"
        raise ValueError(f"model.path ({cfg.model.path!r}) {what}: expected a Hugging Face checkpoint directory")
    ep = cfg.parallel.ep_size
    if ep == 1:
        return
    num_experts = read_config(path)[2].num_experts
    if num_experts % ep:
        fits = [w for w in range(2, num_experts + 1) if num_experts % w == 0]
        raise ValueError(f"parallel.ep_size ({ep}) must divide the {num_experts} experts of {path.name} "
                         f"(ep_size can be {', '.join(map(str, fits))})")


def hostfile_hosts(cfg: MoEServeSchema) -> list[str]:
    """The hosts of ``launcher.hostfile`` in order (``host slots=N`` lines; ``#`` comments), at least
    ``launcher.nnodes`` of them."""
    la = cfg.launcher
    try:
        text = Path(la.hostfile).read_text()
    except OSError as e:
        raise ValueError(f"launcher.hostfile ({la.hostfile!r}) cannot be read: {e.strerror or e}") from None
    hosts = [m.group(1) for line in text.splitlines()
             if (m := _HOST_LINE.match(line.split("#", 1)[0].strip()))]
    if len(hosts) < la.nnodes:
        raise ValueError(f"launcher.hostfile ({la.hostfile!r}) lists {len(hosts)} host(s) (\"host slots=N\" "
                         f"lines) but launcher.nnodes is {la.nnodes}")
    return hosts
