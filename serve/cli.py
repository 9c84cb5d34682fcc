"""``moe-serve``: the OpenAI-compatible server as a Hydra app.

    moe-serve                                   # the embedded default model on 127.0.0.1:8000
    moe-serve server.port=9000 model.path=/ckpt/Qwen3-30B-A3B engine.max_num_seqs=128
    moe-serve --cfg job                         # print the composed config

The config schema is dataclasses registered in Hydra's ConfigStore, so a typo or a wrong type fails at start
with Hydra's message; ``OmegaConf.to_object`` hands the code real dataclasses, whose ``__post_init__`` checks
values. SIGTERM/SIGINT drain: no new requests, in-flight ones get ``server.drain_timeout_s`` to finish and are
then aborted (their streams end cleanly), the engine thread stops, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field

import hydra
import uvicorn
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from serve.config import EngineConfig
from serve.server_config import ServerConfig

log = logging.getLogger("moe-serve")


@dataclass
class ModelConfig:
    """``path``: a Hugging Face checkpoint directory (None: the embedded default model)."""

    path: str | None = None
    tokenizer: str | None = None
    dtype: str = EngineConfig.dtype
    max_model_len: int | None = None
    hypermoe: bool | None = None  # None: as the checkpoint is; true/false: insist it is / is not HyperMoE


@dataclass
class EngineOptions:
    """Scheduling and KV-cache options (see :class:`serve.config.EngineConfig`)."""

    block_size: int = EngineConfig.block_size
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = EngineConfig.kv_cache_bytes
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    max_queued_requests: int = EngineConfig.max_queued_requests
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    seed: int = EngineConfig.seed


@dataclass
class MoEServeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineOptions = field(default_factory=EngineOptions)
    server: ServerConfig = field(default_factory=ServerConfig)


ConfigStore.instance().store(name="moe_serve", node=MoEServeConfig)


def engine_config(cfg: MoEServeConfig) -> EngineConfig:
    m = cfg.model
    return EngineConfig(model=m.path, tokenizer=m.tokenizer, dtype=m.dtype, max_model_len=m.max_model_len,
                        hypermoe=m.hypermoe, **vars(cfg.engine))


class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, told to the application first so it refuses new work and bounds the wait."""

    def __init__(self, config: uvicorn.Config, api) -> None:
        super().__init__(config)
        self.api = api

    async def shutdown(self, sockets=None) -> None:
        self.api.begin_drain(asyncio.get_running_loop())
        await super().shutdown(sockets)


def serve(cfg: MoEServeConfig) -> None:
    """Load the model, start the engine loop and the HTTP server; returns after a drained shutdown."""
    from serve.api import OpenAIServer
    from serve.engine import LLMEngine

    engine = LLMEngine(engine_config(cfg))
    stats = None
    if cfg.server.routing_stats:
        from routing.stats import RoutingStats

        stats = RoutingStats.attach(engine.model, window=cfg.server.routing_window)
    api = OpenAIServer(engine, cfg.server, stats)
    config = uvicorn.Config(api.app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level,
                            timeout_graceful_shutdown=int(cfg.server.drain_timeout_s) + 5, access_log=False)
    log.info("serving %s on http://%s:%d/v1", api.model_name, cfg.server.host, cfg.server.port)
    # uvicorn hands the signal it drained on back to the previous handler once it is done; the process default
    # for SIGTERM would then kill us (exit -15). A drained shutdown is a clean one: exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("drained; exiting"))
    _DrainingServer(config, api).run()


@hydra.main(version_base=None, config_name="moe_serve")
def _hydra_main(dict_cfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(dict_cfg)
        serve(cfg)
    except ValueError as e:
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
