"""One serving process from a composed config: build the engine (in an engine core process of its own by default),
attach routing statistics, run the server.

Used by the ``moe-serve`` entry (``launcher=local``) and by rank 0 of a multi-process job
(:mod:`serve.launch.ranks`), which builds its engine first and passes it in.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn

from routing.stats import RoutingStats
from serve.engine import EngineConfig, LLMEngine
from serve.engine.config import DEFAULT_MODEL
from serve.engine.core_process import CoreSetup, EngineCoreClient, EngineCoreError
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
    """Serve ``cfg`` on ``listener`` (a socket bound to ``server.host:server.port`` before the model loaded; None:
    bound now); returns after a drained shutdown. The model is loaded in an engine core process of its own
    (``server.engine_process``), else in this process; ``engine``: serve this one, already loaded here."""
    if engine is None and cfg.server.engine_process:
        _serve_with_core(cfg, on_server, listener)
        return
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


def _serve_with_core(cfg: MoEServeSchema, on_server, listener: socket.socket | None) -> None:
    try:
        core = EngineCoreClient(functools.partial(build_core, cfg), logging.getLogger().getEffectiveLevel())
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    log.info("%s", core.summary)
    try:
        run_server(core, cfg.server, _CoreRoutingStats(core) if cfg.server.routing_stats else None, on_server,
                   listener)
    finally:
        core.shutdown()  # the server stopped it already, unless it failed to start


def build_core(cfg: MoEServeSchema) -> CoreSetup:
    """In the engine core process: the engine for ``cfg``, warmed up, with its routing statistics (kept and
    saved there, read by the server through ``calls``). On the CPU the core takes every core but one for its
    intra-op threads (the serving process works on that one), unless ``OMP_NUM_THREADS`` says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    start = time.perf_counter()
    engine = build_engine(cfg)
    loaded_s = time.perf_counter() - start
    summary = (f"{startup_summary(cfg, engine, loaded_s, engine.warm_up())}; engine core pid {os.getpid()}, "
               f"{torch.get_num_threads()} intra-op thread(s)")
    if not cfg.server.routing_stats:
        return CoreSetup(engine, summary)
    stats = RoutingStats.attach(engine.model, window=cfg.server.routing_window, name=served_name(cfg, engine))
    saver = _RoutingSaver(stats, cfg.report) if cfg.report.output_dir else None
    return CoreSetup(engine, summary, {"routing_dict": stats.to_dict, "routing_counts": stats.cumulative_counts},
                     after_step=stats.step, close=saver.stop if saver is not None else None)


class _CoreRoutingStats:
    """The routing statistics of an engine core, read across the pipe (the core updates them)."""

    def __init__(self, core: EngineCoreClient, timeout_s: float = 30.0) -> None:
        self.core, self.timeout_s = core, timeout_s

    def to_dict(self) -> dict:
        return self.core.call("routing_dict").result(self.timeout_s)

    def cumulative_counts(self) -> torch.Tensor:
        """Per layer and expert; empty when the core no longer answers (``/metrics`` still renders the rest)."""
        try:
            return self.core.call("routing_counts").result(self.timeout_s)
        except (EngineCoreError, TimeoutError):
            return torch.zeros(0, 0)


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
