"""Multi-process serving: rank 0 serves HTTP and schedules; every rank runs each step's forward with its MoE
layers expert-parallel; rank 0 samples.

Each rank is one process started by torch's launcher, DeepSpeed's, or submitit (see :mod:`serve.launch.launchers`),
with the ``torch.distributed`` environment (``MASTER_ADDR``/``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) set; ``python -m serve.launch.ranks <launch.yaml>`` is the program torchrun and DeepSpeed run.

Every rank builds the same engine (weights, KV-cache pool), then keeps only its experts
(:func:`expert_parallel.token_split.shard_moe_token_split`). Three process groups:

- WORLD (gloo; NCCL added for CUDA tensors when CUDA is available): the MoE layers' all-to-all and all-gather,
  bounded by ``parallel.timeout_s`` (a dead or hung rank -> ``CollectiveError`` naming it).
- control (gloo): per engine step, rank 0 broadcasts the step's inputs (``StepInputs``, host tensors) and KV
  block copies, or STOP. Workers wait for it without a timeout while the server idles; a dead rank 0 closes its
  sockets, which fails that wait at once.
- watch (gloo): rank 0 waits, on one thread per worker, for that worker's goodbye (sent after STOP). A wait
  that fails means the worker died: rank 0 logs which one and stops the job (exit 1) instead of hanging.

Shutdown: SIGTERM/SIGINT reach rank 0 (workers ignore them): it drains, sends STOP, collects the goodbyes,
exits 0, and the workers with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from expert_parallel.token_split import shard_moe_token_split
from moe import MoE
from serve.engine.model_runner import InlineStep, ModelRunner, StepInputs
from serve.launch.checks import bind_listener
from serve.launch.schema import MoEServeSchema, ParallelSchema, to_config
from serve.launch.serving import build_engine, serve

log = logging.getLogger("moe-serve")

_IDLE = timedelta(days=365)  # control/watch groups: workers wait for the next step as long as the server idles
PID_FILE = "server.pid"  # rank 0 writes its pid here (in the run directory) for whoever stops the job


class RankLost(RuntimeError):
    """Another rank died or left without a stop message."""


@dataclasses.dataclass
class Groups:
    rank: int
    world_size: int
    control: dist.ProcessGroup
    watch: dist.ProcessGroup


def init_groups(parallel: ParallelSchema) -> Groups:
    """``init_process_group`` from the environment the launcher set, plus the control and watch groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != parallel.ep_size:
        raise ValueError(f"the launcher started {world} ranks (WORLD_SIZE) but parallel.ep_size is {parallel.ep_size}")
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # the engine's tensors may live on the CPU: gloo carries those, NCCL the CUDA ones
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    # the ranks start together (the model loads afterwards), so the rendezvous gets the collective timeout too
    dist.init_process_group(backend, timeout=timedelta(seconds=parallel.timeout_s))
    control = dist.new_group(backend="gloo", timeout=_IDLE)
    watch = dist.new_group(backend="gloo", timeout=_IDLE)
    return Groups(dist.get_rank(), dist.get_world_size(), control, watch)


def rank_device(spec: str) -> str:
    """A rank's ``engine.device``: its own GPU, ``cuda:LOCAL_RANK``, where ``auto`` or ``cuda`` finds CUDA (the
    launchers start one rank per GPU of a node); anything else as given."""
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return spec


# -- the step protocol ------------------------------------------------------------------------------------------
class StepChannel:
    """Rank 0 -> all: ``send_step(inputs, copies)`` / ``send_stop()``; workers:
    ``recv() -> (inputs, copies) | None``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send_step(self, inputs: StepInputs, copies: list[tuple[int, int]]) -> None:
        self._broadcast(("step", inputs, copies))  # host tensors, as prepare made them (no decode masks yet)

    def send_stop(self) -> None:
        self._broadcast(("stop",))

    def recv(self) -> tuple[StepInputs, list[tuple[int, int]]] | None:
        try:
            message = self._broadcast(None)
        except RuntimeError as err:  # gloo: "Connection closed by peer" as soon as rank 0's process is gone
            raise RankLost(f"rank 0 (the server) is gone without a stop message ({cause(err)})") from err
        if message[0] == "stop":
            return None
        _, inputs, copies = message
        return inputs, copies

    def _broadcast(self, message):
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class DistributedRunner:
    """Rank 0's ``ModelRunner``: every forward first sends the step to the other ranks, which run it too.

    ``on_failure(reason)`` is called when a step fails (a rank died or hung): the job cannot go on.
    """

    def __init__(self, runner: ModelRunner, channel: StepChannel, on_failure: Callable[[str], None]) -> None:
        self.runner = runner
        self.channel = channel
        self.on_failure = on_failure

    def prepare(self, seqs, num_new_tokens) -> StepInputs:
        return self.runner.prepare(seqs, num_new_tokens)

    def forward(self, inputs: StepInputs, copies: list[tuple[int, int]]) -> torch.Tensor:
        try:
            self.channel.send_step(inputs, copies)
            return self.runner.forward(inputs, copies)
        except Exception as err:
            self.on_failure(f"engine step failed across ranks: {err}")
            raise

    def stage(self, inputs: StepInputs, copies: list[tuple[int, int]], overlap: bool = False) -> InlineStep:
        """The step on every rank, computed when launched (the ranks run the torch path in lockstep)."""
        return InlineStep(self.forward, inputs, copies)

    def __getattr__(self, name: str):  # cache, block_size, model: as the wrapped runner's
        return getattr(self.runner, name)


class Watcher:
    """Rank 0: one thread per worker waits for its goodbye; a failed wait (the worker died) calls ``on_death``."""

    def __init__(self, groups: Groups, on_death: Callable[[str], None]) -> None:
        self.groups, self.on_death = groups, on_death
        self.goodbyes = {r: threading.Event() for r in range(1, groups.world_size)}
        self._stopping = False

    def start(self) -> None:
        for rank in self.goodbyes:
            work = dist.irecv(torch.zeros(1), src=rank, group=self.groups.watch)
            threading.Thread(target=self._wait, args=(rank, work), name=f"watch-rank{rank}", daemon=True).start()

    def _wait(self, rank: int, work) -> None:
        try:
            work.wait()
            self.goodbyes[rank].set()
        except RuntimeError as err:
            if not self._stopping:
                self.on_death(f"rank {rank} of {self.groups.world_size} died ({cause(err)})")

    def wait_goodbyes(self, timeout_s: float) -> list[int]:
        """After STOP: the ranks that did not say goodbye within ``timeout_s``."""
        for event in self.goodbyes.values():
            event.wait(timeout_s)
        self._stopping = True
        return [r for r, event in self.goodbyes.items() if not event.is_set()]


# -- the ranks --------------------------------------------------------------------------------------------------
def run_rank(cfg: MoEServeSchema, run_dir: Path) -> None:
    """Run this process's rank until rank 0 stops the job; :class:`RankLost` when another rank died."""
    groups = init_groups(cfg.parallel)
    if groups.rank:  # the server drains on a signal, then stops the workers itself
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # CUDA graphs stay off across ranks: the expert-parallel all-to-all reads its split sizes on the host
    engine_cfg = dataclasses.replace(cfg.engine, device=rank_device(cfg.engine.device),
                                     cuda_graphs=cfg.engine.cuda_graphs and groups.world_size == 1)
    cfg = dataclasses.replace(cfg, engine=engine_cfg)
    # rank 0 takes the HTTP port before the model loads (moe-serve checked it, but it could have been taken since)
    listener = bind_listener(cfg.server.host, cfg.server.port) if groups.rank == 0 else None
    engine = build_engine(cfg)  # every rank: the same weights and KV-cache pool
    shard_moe_token_split(engine.model, dispatcher=cfg.parallel.dispatcher, timeout_s=cfg.parallel.timeout_s)
    dist.monitored_barrier(groups.control, timeout=timedelta(seconds=cfg.parallel.startup_timeout_s),
                           wait_all_ranks=True)  # rank 0 names any rank that failed to start
    channel = StepChannel(groups.control)
    log.info("rank %d of %d ready: experts %s", groups.rank, groups.world_size, _local_experts(engine.model))
    if listener is not None:
        _serve_rank0(cfg, engine, groups, channel, run_dir, listener)
    else:
        _work(engine.runner, channel, groups)
    dist.destroy_process_group()


def _serve_rank0(cfg: MoEServeSchema, engine, groups: Groups, channel: StepChannel, run_dir: Path,
                 listener: socket.socket) -> None:
    failures: list[str] = []
    server_box: list = []

    def fail(reason: str) -> None:
        if not failures:
            log.error("stopping the job: %s", reason)
        failures.append(reason)
        if server_box:
            server_box[0].should_exit = True

    engine.runner = DistributedRunner(engine.runner, channel, fail)
    watcher = Watcher(groups, fail)
    watcher.start()
    (run_dir / PID_FILE).write_text(str(os.getpid()))
    try:
        serve(cfg, engine, on_server=server_box.append, listener=listener)
    finally:
        (run_dir / PID_FILE).unlink(missing_ok=True)
    if failures:
        raise RankLost(failures[0])
    try:
        channel.send_stop()
    except RuntimeError as err:
        raise RankLost(f"could not send STOP to the workers: {str(err).splitlines()[0]}") from err
    silent = watcher.wait_goodbyes(cfg.parallel.timeout_s)
    if silent:
        raise RankLost(f"rank(s) {silent} did not stop within {cfg.parallel.timeout_s:g} s of STOP")
    log.info("all %d ranks stopped", groups.world_size)


def _work(runner: ModelRunner, channel: StepChannel, groups: Groups) -> None:
    while (step := channel.recv()) is not None:
        try:
            runner.forward(*step)
        except RuntimeError as err:  # CollectiveError: a peer died or hung mid-step
            raise RankLost(f"engine step failed: {err}") from err
    dist.send(torch.ones(1), dst=0, group=groups.watch)


def cause(err: BaseException) -> str:
    """gloo's "[/path/pair.cc:553] Connection closed by peer [ip]:port. This is typically ..." -> its first sentence."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:200]


def _local_experts(model) -> list[int]:
    layer = next(m for m in model.modules() if isinstance(m, MoE))
    return list(layer.expert_placement.local_experts(dist.get_rank()))


def main(argv: list[str] | None = None) -> None:
    """``python -m serve.launch.ranks <launch.yaml>``: one rank of a ``moe-serve`` job (the launchers run it)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m serve.launch.ranks <launch.yaml written by moe-serve>")
    path = Path(argv[0])
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][rank {rank}][%(levelname)s] %(message)s")
    cfg = to_config(OmegaConf.load(path))
    run_rank_or_exit(cfg, path.parent)
    # Stopped cleanly (drained, goodbyes said, group destroyed): exit without the interpreter's teardown, in
    # which a gloo thread's destructor once aborted rank 0 ("terminate called without an active exception",
    # exit -6 after "all 2 ranks stopped"). A submitit task returns instead: submitit writes its result.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_rank_or_exit(cfg: MoEServeSchema, run_dir: Path) -> None:
    """:func:`run_rank`; when a rank was lost (exit 1) or a setting is wrong (exit 2, e.g. the port is taken),
    say so in one line and exit at once (a broken gloo group can block the interpreter's shutdown, so no clean-up
    is attempted)."""
    try:
        run_rank(cfg, run_dir)
    except (RankLost, ValueError) as err:
        log.error("%s", err)
        print(f"moe-serve rank {os.environ.get('RANK', '?')}: error: {err}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1 if isinstance(err, RankLost) else 2)


if __name__ == "__main__":
    main()
