"""``moe-serve``: the OpenAI-compatible server as a Hydra app.

    moe-serve                                   # the embedded default model on 127.0.0.1:8000
    moe-serve server.port=9000 model.path=/ckpt/Qwen3-30B-A3B engine.max_num_seqs=128
    moe-serve parallel=ep2 launcher=torchrun    # 2 expert-parallel ranks through torch's launcher
    moe-serve --cfg job                         # print the composed config

The config is ``configs/config.yaml`` plus one preset per group (model quant parallel server launcher report),
typed by the dataclasses of :mod:`serve.config_schema`, so a typo or a wrong type fails at start with Hydra's
message; :func:`serve.config_schema.to_config` hands the code real dataclasses, whose ``__post_init__`` checks
values. SIGTERM/SIGINT drain: no new requests, in-flight ones get ``server.drain_timeout_s`` to finish and are
then aborted (their streams end cleanly), the engine thread stops, the process exits 0.

``configs/`` is found next to the ``serve`` package (a repository checkout or editable install) or inside it
(``serve/configs``, where a wheel ships it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import hydra
import uvicorn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from serve.config import EngineConfig
from serve.config_schema import EngineOptions, ModelConfig, MoEServeConfig, ReportConfig, register, to_config

__all__ = ["EngineOptions", "ModelConfig", "MoEServeConfig", "build_engine", "engine_config", "main", "serve"]

log = logging.getLogger("moe-serve")


def config_dir() -> Path:
    """``configs/`` of the checkout (next to the package) or the copy a wheel ships in ``serve/configs``."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "configs", package / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"moe-serve's configs/ is neither at {package.parent / 'configs'} nor {package / 'configs'}")


register()


def engine_config(cfg: MoEServeConfig) -> EngineConfig:
    m = cfg.model
    return EngineConfig(model=m.path, tokenizer=m.tokenizer, dtype=m.dtype, max_model_len=m.max_model_len,
                        hypermoe=m.hypermoe, quantization=None if cfg.quant.scheme == "none" else cfg.quant.scheme,
                        **vars(cfg.engine))


def build_engine(cfg: MoEServeConfig):
    """The engine for ``cfg``: model loaded (FP8 experts per ``quant``, quantised while loading), KV cache,
    scheduler."""
    from serve.engine import LLMEngine

    return LLMEngine(engine_config(cfg))


class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, told to the application first so it refuses new work and bounds the wait."""

    def __init__(self, config: uvicorn.Config, api) -> None:
        super().__init__(config)
        self.api = api

    async def shutdown(self, sockets=None) -> None:
        self.api.begin_drain(asyncio.get_running_loop())
        await super().shutdown(sockets)


def serve(cfg: MoEServeConfig, engine=None, on_server: Callable[[uvicorn.Server], None] | None = None) -> None:
    """Start the engine loop and the HTTP server (loading the model unless ``engine`` is given); returns after a
    drained shutdown. ``on_server`` gets the server before it starts (setting its ``should_exit`` stops it)."""
    from serve.api import OpenAIServer

    engine = build_engine(cfg) if engine is None else engine
    stats = None
    if cfg.server.routing_stats:
        from routing.stats import RoutingStats

        stats = RoutingStats.attach(engine.model, window=cfg.server.routing_window)
    api = OpenAIServer(engine, cfg.server, stats)
    config = uvicorn.Config(api.app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level,
                            timeout_graceful_shutdown=int(cfg.server.drain_timeout_s) + 5, access_log=False)
    server = _DrainingServer(config, api)
    if on_server is not None:
        on_server(server)
    log.info("serving %s on http://%s:%d/v1", api.model_name, cfg.server.host, cfg.server.port)
    # uvicorn hands the signal it drained on back to the previous handler once it is done; the process default
    # for SIGTERM would then kill us (exit -15). A drained shutdown is a clean one: exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("drained; exiting"))
    saver = _RoutingSaver(stats, cfg.report) if stats is not None and cfg.report.output_dir else None
    try:
        server.run()
    finally:
        if saver is not None:
            saver.stop()


class _RoutingSaver:
    """Writes ``<report.output_dir>/routing_stats.json`` every ``save_interval_s`` (if > 0) and at the end."""

    def __init__(self, stats, report: ReportConfig) -> None:
        self.stats, self.path = stats, Path(report.output_dir) / "routing_stats.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread = None
        if report.save_interval_s > 0:
            self._thread = threading.Thread(target=self._run, args=(report.save_interval_s,), daemon=True,
                                            name="routing-saver")
            self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        self.stats.save(tmp)
        tmp.replace(self.path)  # readers never see a half-written file

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.save()
        log.info("routing statistics written to %s", self.path)


def run(cfg: MoEServeConfig) -> None:
    """Serve ``cfg`` in this process, as one rank of a submitit job, or through torchrun / DeepSpeed."""
    from serve import launchers

    kind = cfg.launcher.kind
    if launchers.in_submitit_job():
        from serve.distributed import run_rank_or_exit

        launchers.export_submitit_env()
        run_rank_or_exit(cfg, Path(HydraConfig.get().runtime.output_dir))
    elif kind == "local":
        serve(cfg)
    elif kind in launchers.COMMANDS:
        sys.exit(launchers.launch(cfg, Path(HydraConfig.get().runtime.output_dir)))
    else:  # the submitit presets switch Hydra to multirun, whose launcher starts the tasks
        raise ValueError(f"launcher={kind} runs through Hydra's submitit launcher: do not override hydra.mode")


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")
def _hydra_main(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
        run(cfg)
    except (ValueError, OmegaConfBaseException) as e:  # bad values, unresolvable interpolations
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
