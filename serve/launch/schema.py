"""The ``moe-serve`` config schema: one dataclass per Hydra group, registered in the ConfigStore.

``configs/config.yaml`` picks one preset per group (``configs/<group>/<preset>.yaml``); every preset extends
its group's schema (``defaults: [schema]``) and the root schema types every key again, so a typo or a wrong
type fails at start with Hydra's message. Values are checked by ``__post_init__`` (``ValueError`` naming the
key), which runs when :func:`to_config` converts the composed config into these dataclasses.

| group      | schema            | presets                                                        |
|------------|-------------------|----------------------------------------------------------------|
| ``model``  | :class:`ModelSchema`    | ``default`` (embedded model), ``qwen3_30b_a3b`` (an HF checkpoint) |
| ``quant``  | :class:`QuantSchema`    | ``none``, ``fp8-channel``, ``fp8-block``                 |
| ``parallel`` | :class:`ParallelSchema` | ``single``, ``ep2``, ``ep4``, ``ep8``                  |
| ``server`` | :class:`serve.http.config.ServerConfig` | ``default``                        |
| ``launcher`` | :class:`LauncherSchema` | ``local``, ``torchrun``, ``deepspeed``, ``submitit_local``,             |
|              |                         | ``submitit_slurm``                                                      |
| ``report`` | :class:`ReportSchema`   | ``default``                                              |

``engine`` (scheduling and KV-cache options) is a typed node without presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from serve.engine.config import EngineConfig
from serve.http.config import ServerConfig

QUANT_SCHEMES = ("none", "fp8-channel", "fp8-block")
DISPATCHERS = ("all_to_all", "all_gather")
BACKENDS = ("auto", "gloo", "nccl")
LAUNCHERS = ("local", "torchrun", "deepspeed", "submitit_local", "submitit_slurm")


@dataclass
class ModelSchema:
    """``path``: a Hugging Face checkpoint directory (None: the embedded default model)."""

    path: str | None = None
    tokenizer: str | None = None
    dtype: str = EngineConfig.dtype
    max_model_len: int | None = None
    hypermoe: bool | None = None  # None: as the checkpoint is; true/false: insist it is / is not HyperMoE


@dataclass
class EngineSchema:
    """Scheduling and KV-cache options (see :class:`serve.engine.config.EngineConfig`)."""

    block_size: int = EngineConfig.block_size
    device: str = EngineConfig.device
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization
    cuda_graphs: bool = EngineConfig.cuda_graphs
    attention_backend: str = EngineConfig.attention_backend
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    max_queued_requests: int = EngineConfig.max_queued_requests
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    seed: int = EngineConfig.seed
    async_scheduling: bool | None = None  # None: on for the CPU when a core is left for the host work


@dataclass
class QuantSchema:
    """``scheme``: FP8 (e4m3) routed-expert weights with per-output-channel or 128x128 block scales."""

    scheme: str = "none"

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant.scheme ({self.scheme!r}) is not one of: {', '.join(QUANT_SCHEMES)}")


@dataclass
class ParallelSchema:
    """Expert parallelism over ``ep_size`` ranks (one process per rank; ``1``: one process, no parallelism).

    Every rank holds the attention and router weights and the KV cache; the routed experts are split over the
    ranks (``expert_parallel.shard_moe``) and each rank routes ``1/ep_size`` of a step's tokens through them.
    ``backend``: ``auto`` is NCCL when the model runs on CUDA, gloo otherwise. ``timeout_s``: a collective that
    a dead or hung rank never completes fails within this long, naming the rank. ``startup_timeout_s``: how
    long rank 0 waits for every rank to have loaded its model.
    """

    ep_size: int = 1
    dispatcher: str = "all_to_all"
    backend: str = "auto"
    timeout_s: float = 60.0
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise ValueError(f"parallel.ep_size ({self.ep_size!r}) must be a positive integer")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"parallel.dispatcher ({self.dispatcher!r}) is not one of: {', '.join(DISPATCHERS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend ({self.backend!r}) is not one of: {', '.join(BACKENDS)}")
        for name in ("timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"parallel.{name} ({getattr(self, name)!r}) must be > 0")


@dataclass
class LauncherSchema:
    """How the ``parallel.ep_size`` ranks are started: ``nnodes x nproc_per_node`` processes.

    ``local``: this process (``ep_size`` 1 only). ``torchrun`` / ``deepspeed``: torch's or DeepSpeed's launcher,
    started by ``moe-serve`` on this node (run it on every node with its ``node_rank`` for torchrun; DeepSpeed
    reaches the other nodes of ``hostfile`` itself). ``submitit_local`` / ``submitit_slurm``: Hydra's submitit
    launcher (``hydra.launcher.*``), one task per rank. ``master_addr``: rank 0's host (None: ``127.0.0.1`` for
    torchrun, the first host of ``hostfile`` for DeepSpeed). ``master_port``: 0 picks a free port (one node only).
    ``extra_args``: passed to the launcher before the program.
    """

    kind: str = "local"
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    hostfile: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ValueError(f"launcher.kind ({self.kind!r}) is not one of: {', '.join(LAUNCHERS)}")
        for name in ("nnodes", "nproc_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"launcher.{name} ({getattr(self, name)!r}) must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"launcher.node_rank ({self.node_rank}) must be in [0, nnodes ({self.nnodes}))")
        if not 0 <= self.master_port <= 65535:
            raise ValueError(f"launcher.master_port ({self.master_port}) must be in [0, 65535]")


@dataclass
class ReportSchema:
    """Routing statistics for ``moe-report`` (collected when ``server.routing_stats``).

    ``window``: engine steps in the windowed counts (``server.routing_window`` follows it). ``output_dir``:
    where rank 0 writes ``routing_stats.json`` when the server stops and, if ``save_interval_s > 0``, that
    often while it runs (None: no file; ``GET /v1/moe/routing`` serves them live either way).
    """

    window: int = 100
    output_dir: str | None = None
    save_interval_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"report.window ({self.window!r}) must be a positive integer")
        if self.save_interval_s < 0:
            raise ValueError(f"report.save_interval_s ({self.save_interval_s!r}) must be >= 0")


@dataclass
class MoEServeSchema:
    model: ModelSchema = field(default_factory=ModelSchema)
    engine: EngineSchema = field(default_factory=EngineSchema)
    quant: QuantSchema = field(default_factory=QuantSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    server: ServerConfig = field(default_factory=ServerConfig)
    launcher: LauncherSchema = field(default_factory=LauncherSchema)
    report: ReportSchema = field(default_factory=ReportSchema)

    def __post_init__(self) -> None:
        la, world = self.launcher, self.parallel.ep_size
        if la.kind == "local" and world > 1:
            raise ValueError(f"parallel.ep_size ({world}) needs one process per rank: pick launcher=torchrun, "
                             "deepspeed, submitit_local or submitit_slurm (launcher=local runs one process)")
        if la.nnodes * la.nproc_per_node != world:
            raise ValueError(f"launcher.nnodes ({la.nnodes}) x launcher.nproc_per_node ({la.nproc_per_node}) must "
                             f"equal parallel.ep_size ({world})")
        if la.kind == "torchrun" and la.nnodes > 1 and not la.master_addr:
            raise ValueError(f"launcher.master_addr (node 0's address) must be given when launcher.nnodes "
                             f"({la.nnodes}) > 1 with launcher=torchrun")


GROUPS = {"model": ModelSchema, "quant": QuantSchema, "parallel": ParallelSchema, "server": ServerConfig,
          "launcher": LauncherSchema, "report": ReportSchema}


def register() -> None:
    """Store the root schema (``moe_serve``) and each group's (``<group>/schema``) in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="moe_serve", node=MoEServeSchema)
    for group, schema in GROUPS.items():
        cs.store(group=group, name="schema", node=schema)


def to_config(cfg: Any) -> MoEServeSchema:
    """A composed config (``DictConfig``, or a plain dict / YAML-loaded one) -> checked :class:`MoEServeSchema`.

    ``hydra`` keys, if present, are dropped; interpolations are resolved against the given config.
    """
    if OmegaConf.is_config(cfg) and "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if not (OmegaConf.is_config(cfg) and OmegaConf.get_type(cfg) is MoEServeSchema):
        cfg = OmegaConf.merge(OmegaConf.structured(MoEServeSchema), cfg)  # a plain dict / YAML: type it
    return OmegaConf.to_object(cfg)
