"""Decode forwards replayed from CUDA graphs, one graph per batch size of ``GRAPH_BATCH_SIZES``.

A decode step of B sequences is padded to the next captured size Bp: the padding rows decode token 0 at position
0 through the cache's null block (their K/V go to its null slot, which no sequence reads), and every block
table is ``max_blocks`` wide. The step's tensors then have the same shapes at every step of that size, so one
graph, captured once with its own persistent input buffers, serves them all: a replay copies the new step's
tensors into those buffers and reruns the recorded kernels (as vLLM's and SGLang's CUDA-graph runners do).
What may change between replays is only tensor *contents*: the attention kernels read lengths, slots and block
ids from those tensors (see :mod:`serve.models.triton_attention`).

Not captured, run eagerly: prefill and mixed steps, and decode batches above the largest captured size.
``graph_factory`` makes the graphs; the default records CUDA graphs, tests pass a stand-in that records a
Python call, which exercises the padding and the buffers on any device.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

log = logging.getLogger("moe-serve")

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Graph(Protocol):
    """``capture(fn)`` records ``fn()`` (its result kept as the graph's output buffers); ``replay()`` reruns it."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def replay(self) -> None: ...


class CudaGraph:
    """A ``torch.cuda.CUDAGraph`` in ``pool``, the memory pool shared by every graph of one runner (captured
    largest first, the smaller ones reuse its memory; one is replayed at a time and its output copied out)."""

    def __init__(self, pool) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured sizes for a scheduler of ``max_num_seqs``: every bucket below it and the first at or above.

    Example: ``graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 64]``.
    """
    sizes = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs]
    return sizes + [b for b in GRAPH_BATCH_SIZES if b >= max_num_seqs][:1]


def tensors(obj) -> Iterator[torch.Tensor]:
    """The tensors inside a step's inputs, in a fixed order: dataclass fields, list items, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from tensors(item)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name))


class DecodeGraphs:
    """``forward(inputs)`` for padded decode-only steps; built by ``ModelRunner`` on CUDA with
    ``engine.cuda_graphs``.

    ``run(inputs) -> logits`` is the runner's eager forward over inputs on the device (the function captured);
    ``pad(inputs, size)`` pads a decode step on the host (``ModelRunner.pad_decode``); ``sizes`` the batch sizes.
    ``observers()`` names what the forward calls besides the model (the routing observers): when it changes,
    every graph is captured again (attaching routing statistics after start-up).
    """

    def __init__(self, run: Callable, pad: Callable, sizes: list[int], observers: Callable[[], object] = tuple,
                 graph_factory: Callable[[], Graph] | None = None, device: torch.device | None = None) -> None:
        self.run, self.pad, self.sizes = run, pad, sorted(sizes)
        self.observers = observers
        self.graph_factory = graph_factory or self._cuda_graph
        self._pool = None
        self.device = device
        self.graphs: dict[int, tuple[Graph, object, torch.Tensor]] = {}
        self._captured_with: object = None

    def _cuda_graph(self) -> CudaGraph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return CudaGraph(self._pool)

    def size_for(self, inputs) -> int | None:
        """The captured size that serves this step, or None (not decode-only, or too large)."""
        meta = inputs.attention
        if meta.prefills or len(meta.decodes) != 1:
            return None
        batch = meta.decodes[0].tables_BM.shape[0]
        return next((s for s in self.sizes if s >= batch), None)

    def capture_all(self, example) -> None:
        """Capture every size, largest first, from ``example`` (a one-sequence decode step on the host)."""
        t0 = time.perf_counter()
        for size in reversed(self.sizes):
            self._capture(size, self.pad(example, size))
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.sizes),
                 "/".join(map(str, self.sizes)), time.perf_counter() - t0)

    def _capture(self, size: int, padded) -> None:
        self._captured_with = self.observers()
        static = padded.to(self.device) if self.device is not None else padded
        if static is padded:  # the CPU stand-in: the buffers must not alias the caller's inputs
            static = _clone(padded)
        if static.valid_T is not None:  # the capture's own forwards (warm-up) count no routing: every row invalid
            static.valid_T.zero_()
        graph = self.graph_factory()
        out = graph.capture(lambda: self.run(static))
        self.graphs[size] = (graph, static, out)

    def forward(self, inputs, size: int) -> torch.Tensor:
        """Logits for the step's sampled rows, replayed from the graph of ``size`` (``inputs`` on the host)."""
        padded = self.pad(inputs, size)
        if self.graphs and self.observers() != self._captured_with:
            log.info("the routing observers changed: capturing the decode graphs again")
            self.graphs.clear()
        if size not in self.graphs:
            self._capture(size, padded)
        graph, static, out = self.graphs[size]
        pairs = list(zip(tensors(static), tensors(padded), strict=True))
        for buffer, value in pairs:
            if buffer.shape != value.shape:
                raise RuntimeError(f"decode graph of batch {size}: an input of shape {tuple(value.shape)} does not "
                                   f"fit its buffer {tuple(buffer.shape)}")
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return out[: len(inputs.sampled)].clone()  # the buffer is rewritten by the next replay


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, list):
        return [_clone(item) for item in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _clone(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj
