"""One serving process from a composed config: build the engine, attach routing statistics, run the server.

Used by the ``moe-serve`` entry (``launcher=local``) and by rank 0 of a multi-process job
(:mod:`serve.launch.ranks`), which builds its engine first and passes it in.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from routing.stats import RoutingStats
from serve.engine import EngineConfig, LLMEngine
from serve.engine.config import DEFAULT_MODEL
from serve.http import run_server
from serve.launch.schema import MoEServeSchema, ReportSchema

log = logging.getLogger("moe-serve")


def engine_config(cfg: MoEServeSchema) -> EngineConfig:
    m = cfg.model
    return EngineConfig(model=m.path, tokenizer=m.tokenizer, dtype=m.dtype, max_model_len=m.max_model_len,
                        hypermoe=m.hypermoe, quantization=None if cfg.quant.scheme == "none" else cfg.quant.scheme,
                        **vars(cfg.engine))


def build_engine(cfg: MoEServeSchema) -> LLMEngine:
    """The engine for ``cfg``: model loaded (FP8 experts per ``quant``, quantised while loading), KV cache,
    scheduler."""
    return LLMEngine(engine_config(cfg))


def serve(cfg: MoEServeSchema, engine: LLMEngine | None = None,
          on_server: Callable[[uvicorn.Server], None] | None = None, listener: socket.socket | None = None) -> None:
    """Serve ``cfg`` (loading the model unless ``engine`` is given) on ``listener`` (a socket bound to
    ``server.host:server.port`` before the model loaded; None: bound now); returns after a drained shutdown."""
    try:
        start = time.perf_counter()
        engine = build_engine(cfg) if engine is None else engine
        loaded_s = time.perf_counter() - start
        log.info("%s", startup_summary(cfg, engine, loaded_s, engine.warm_up()))
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    stats = None
    if cfg.server.routing_stats:
        stats = RoutingStats.attach(engine.model, window=cfg.server.routing_window, name=served_name(cfg, engine))
    saver = _RoutingSaver(stats, cfg.report) if stats is not None and cfg.report.output_dir else None
    try:
        run_server(engine, cfg.server, stats, on_server, listener)
    finally:
        if saver is not None:
            saver.stop()


def startup_summary(cfg: MoEServeSchema, engine: LLMEngine, loaded_s: float, warm_up_s: float) -> str:
    """The one line ``moe-serve`` logs before it serves: what runs where, with how much cache, how fast it came."""
    mc, ec = engine.model.config, engine.config
    blocks = engine.blocks.num_blocks
    return (f"{served_name(cfg, engine)} ({mc.architecture}, {mc.num_layers} layers): {ec.dtype} on {engine.device}, "
            f"quantization {ec.quantization or 'none'}, attention {engine.runner.attention.name}, KV cache {blocks} "
            f"blocks x {ec.block_size} tokens, max_model_len {engine.max_model_len}; loaded in {loaded_s:.1f} s, "
            f"warmed up in {warm_up_s:.1f} s")


def served_name(cfg: MoEServeSchema, engine: LLMEngine) -> str:
    """The name clients use (``server.served_model_name``, else the checkpoint directory's), as ``/v1/models``
    says it; the routing statistics and ``moe-report``'s titles carry it."""
    if cfg.server.served_model_name:
        return cfg.server.served_model_name
    path = str(engine.config.model)
    return "moe-serve-default" if path == str(DEFAULT_MODEL) else Path(path).name


class _RoutingSaver:
    """Writes ``<report.output_dir>/routing_stats.json`` every ``save_interval_s`` (if > 0) and at the end."""

    def __init__(self, stats: RoutingStats, report: ReportSchema) -> None:
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
