"""``ModelRunner``: turns a scheduled step into one forward pass over the paged KV cache.

Shape legend: T tokens of the step, B sequences, M blocks per decoding sequence (padded), V vocabulary.
Layout of the step's tokens: the one-token sequences (decodes) first, longest context first, then each longer
chunk contiguously. ``prepare`` builds the step on the host (from Python lists; the ranks of a distributed job
receive it from rank 0 as it is), ``forward`` moves it to the device once and runs it: replayed from a CUDA
graph for decode-only steps where :mod:`serve.engine.cuda_graphs` captured one, eagerly otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from routing.stats import counting_only
from serve.engine.cuda_graphs import DecodeGraphs, Graph, graph_batch_sizes
from serve.engine.sequence import Sequence
from serve.models import MoEDecoder
from serve.models.attention import AttentionMetadata, DecodeGroup, PrefillChunk, kv_cache_class
from serve.models.attention_backends import select_attention_backend
from serve.models.cpu_attention import CpuAttention
from serve.models.cpu_decode import FusedDecode, LaunchedDecode, StagedDecode, unsupported

log = logging.getLogger("moe-serve")


@dataclasses.dataclass
class StepInputs:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    attention: AttentionMetadata
    last_rows: torch.Tensor  # rows of the step whose logits are sampled
    sampled: list[int]  # the sequences (indices into the scheduled list) those rows belong to
    valid_T: torch.Tensor | None = None  # bool, False on padding rows (a padded decode step); None: no padding

    def to(self, device: torch.device) -> StepInputs:
        """The same step with its tensors on ``device``."""
        if device.type == "cpu":
            return self
        ids, positions, rows = (t.to(device, non_blocking=True) for t in
                                (self.input_ids_T, self.positions_T, self.last_rows))
        valid = None if self.valid_T is None else self.valid_T.to(device, non_blocking=True)
        return StepInputs(ids, positions, self.attention.to(device), rows, self.sampled, valid)


class ModelRunner:
    """``prepare(seqs, num_new_tokens) -> StepInputs``; ``forward(inputs, copies) -> logits``.

    ``attention_backend``: see :func:`serve.models.attention_backends.select_attention_backend`.
    ``cuda_graphs``: replay decode steps of up to ``max_num_seqs`` sequences from CUDA graphs (CUDA only;
    ``graph_factory`` replaces the CUDA graph, for tests). ``max_model_len`` bounds the graphs' block tables.
    """

    def __init__(self, model: MoEDecoder, num_blocks: int, block_size: int, device: torch.device | None = None,
                 attention_backend: str = "auto", cuda_graphs: bool = False, max_num_seqs: int = 64,
                 max_model_len: int | None = None, graph_factory: type[Graph] | None = None) -> None:
        self.model = model
        self.block_size = block_size
        weight = next(model.parameters())
        self.device = weight.device if device is None else torch.device(device)
        self.cache = kv_cache_class(model.config)(model.config, num_blocks, block_size, weight.dtype, self.device)
        mla = model.config.mla
        self.attention = select_attention_backend(attention_backend, self.device, weight.dtype,
                                                  sparse_mla=mla is not None and mla.indexer is not None)
        # MLA models attend through the latent cache: the backend's MLA step, chosen once
        self._step = self.attention.step if model.config.mla is None else self.attention.mla_step
        max_len = max_model_len or model.config.max_position_embeddings
        self.max_blocks = -(-max_len // block_size)  # block-table width of a graph's decode step
        self._moe_layers = [m for m in model.modules() if hasattr(m, "on_routing")]
        self.fused = self._build_fused()
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and (self.device.type == "cuda" or graph_factory is not None):
            self.graphs = DecodeGraphs(self._forward, self.pad_decode, graph_batch_sizes(max_num_seqs),
                                       self._observers, graph_factory, self.device)

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> StepInputs:
        """Lay out the step's tokens (decodes first, longest context first) with their slots and block tables, as
        host tensors (``forward`` moves them to the device)."""
        decodes = sorted((i for i, n in enumerate(num_new_tokens) if n == 1), key=lambda i: -seqs[i].num_tokens)
        ids, positions_B, slots_B, tables_BW, sampled = self._decodes([seqs[i] for i in decodes])
        last_rows = [r for r in range(len(decodes)) if sampled[r]]
        sampled_ids = [decodes[r] for r in last_rows]
        positions, slots, prefills = [positions_B], [slots_B], []
        bs = self.block_size
        for i, n in enumerate(num_new_tokens):
            if n == 1:
                continue
            seq = seqs[i]
            start, end = seq.num_computed, seq.num_computed + n
            table = seq.block_table
            table_M = _host_int64(table[:-(-end // bs)])  # host tensors, as every one of prepare's
            prefills.append(PrefillChunk(len(ids), n, start, table_M))
            ids += seq.token_ids[start:end]
            positions.append(np.arange(start, end))
            slots.append(np.fromiter((table[p // bs] * bs + p % bs for p in range(start, end)), np.int64, n))
            if end == seq.num_tokens:
                last_rows.append(len(ids) - 1)
                sampled_ids.append(i)
        lens = (positions_B + 1).tolist()  # NOTE: host sync: none, a numpy array
        # the C and Triton kernels read each sequence's own keys: one group; the torch path pads a group to its
        # longest, so it splits them by length
        one_group = self.attention.one_decode_group or (self.graphs is not None and not prefills)
        bounds = (([0] if lens else []) if one_group else split_by_length(lens)) + [len(lens)]
        groups = [DecodeGroup(a, torch.from_numpy(np.ascontiguousarray(tables_BW[a:b, :-(-lens[a] // bs)])),
                              torch.from_numpy(positions_B[a:b] + 1), bs)
                  for a, b in zip(bounds, bounds[1:], strict=False)]
        # host tensors: forward moves the whole step to the device at once (non-blocking)
        meta = self.attention.metadata(torch.from_numpy(np.concatenate(slots)), groups, prefills)
        # (torch.tensor from a list costs ~10x numpy's array + from_numpy at these sizes)
        return StepInputs(_host_int64(ids), torch.from_numpy(np.concatenate(positions)), meta, _host_int64(last_rows),
                          sampled_ids)

    def _decodes(self, seqs: list[Sequence]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, list[bool]]:
        """The one-token sequences of a step as arrays (token ids, positions ``[B]``, slots ``[B]``, block tables
        ``[B, W]`` padded with block 0, whether each one samples): numpy fills them ~3x faster than torch.tensor
        builds them from Python lists."""
        B, bs = len(seqs), self.block_size
        positions_B = np.fromiter((s.num_computed for s in seqs), np.int64, B)
        W = -(-(int(positions_B.max()) + 1) // bs) if B else 0  # NOTE: host sync: none, numpy
        tables_BW = np.zeros((B, W), dtype=np.int64)
        for row, seq in zip(tables_BW, seqs, strict=True):
            table = seq.block_table[:W]
            row[:len(table)] = table
        slots_B = tables_BW[np.arange(B), positions_B // bs] * bs + positions_B % bs
        ids = [s.token_ids[s.num_computed] for s in seqs]
        return ids, positions_B, slots_B, tables_BW, [s.num_computed + 1 == s.num_tokens for s in seqs]

    def pad_decode(self, inputs: StepInputs, size: int) -> StepInputs:
        """A decode-only step padded to ``size`` sequences with ``max_blocks``-wide tables (host tensors): the
        padding rows decode token 0 at position 0 into the cache's null slot, reading only the null block."""
        group = inputs.attention.decodes[0]
        (B, M), pad = group.tables_BM.shape, size - group.tables_BM.shape[0]
        tables_BM = F.pad(group.tables_BM, (0, self.max_blocks - M))  # 0: a block never read (past each length)
        tables_BM = torch.cat([tables_BM, torch.full((pad, self.max_blocks), self.cache.null_block)])
        padded = DecodeGroup(0, tables_BM, torch.cat([group.lens_B, torch.ones(pad, dtype=torch.long)]),
                             self.block_size)
        slots = torch.cat([inputs.attention.slot_mapping_T, torch.full((pad,), self.cache.null_slot)])
        meta = self.attention.metadata(slots, [padded], [])
        zeros = torch.zeros(pad, dtype=torch.long)
        return StepInputs(torch.cat([inputs.input_ids_T, zeros]), torch.cat([inputs.positions_T, zeros]), meta,
                          torch.cat([inputs.last_rows, torch.arange(B, size)]), inputs.sampled,
                          torch.arange(size) < B)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, copies: list[tuple[int, int]]) -> torch.Tensor:
        """Run the model over the step; returns logits ``[len(inputs.sampled), V]`` (fp32, on the device)."""
        self.cache.copy_blocks(copies)
        size = self.graphs.size_for(inputs) if self.graphs is not None else None
        if size is not None:
            return self.graphs.forward(inputs, size)
        return self._forward(inputs.to(self.device))

    def stage(self, inputs: StepInputs, copies: list[tuple[int, int]], overlap: bool = False):
        """The step ready to start; its ``launch()`` returns what ``wait()`` gives ``(logits, seconds computed)``
        from. With ``overlap``, a step the fused C decode computes is laid out now and launched onto its worker
        thread (``launch`` returns at once; the caller waits for it before launching another); every other step
        is computed by its ``launch``, as ``forward``."""
        group = self._fused_group(inputs) if overlap and self.graphs is None else None
        if group is None:
            return InlineStep(self.forward, inputs, copies)
        staged = self.fused.stage(inputs.input_ids_T, inputs.positions_T, inputs.attention.slot_mapping_T,
                                  group.tables_BM, group.lens_B, inputs.last_rows)
        return FusedStep(self.cache, copies, staged)

    def capture_graphs(self) -> None:
        """Capture every decode graph now (the engine calls it at start, as vLLM does, so that no request waits
        for a capture); a no-op without ``cuda_graphs``."""
        if self.graphs is None:
            return
        table = [self.cache.null_block]
        null_slot = torch.full((1,), self.cache.null_slot)  # a host step, as prepare makes them
        example = StepInputs(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                             self.attention.metadata(null_slot,
                                                     [DecodeGroup.build(0, [table], [1], self.block_size)], []),
                             torch.zeros(1, dtype=torch.long), [0])
        with torch.inference_mode():
            self.graphs.capture_all(example)

    def _build_fused(self) -> FusedDecode | None:
        """Decode-only steps in one C call where it computes this model (the CPU backend's models: fp32, CPU)."""
        if not isinstance(self.attention, CpuAttention) or unsupported(self.model, self.cache) is not None:
            return None
        return FusedDecode(self.model, self.cache)

    def _fused_group(self, inputs: StepInputs) -> DecodeGroup | None:
        """The decode group of a step the fused C decode computes (decodes only, one group); None otherwise."""
        if self.fused is not None and not self.fused.current():  # the model changed (expert parallelism sharded it)
            self.fused = self._build_fused()
        meta = inputs.attention
        return meta.decodes[0] if self.fused is not None and not meta.prefills and len(meta.decodes) == 1 else None

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.attention
        group = self._fused_group(inputs)
        if group is not None:
            return self.fused(inputs.input_ids_T, inputs.positions_T, meta.slot_mapping_T, group.tables_BM,
                              group.lens_B, inputs.last_rows)
        step = self._step(self.cache, meta)
        with counting_only(inputs.valid_T):  # routing statistics skip the padding rows
            hidden_TD = self.model(inputs.input_ids_T, inputs.positions_T, step)
        return self.model.logits(hidden_TD[inputs.last_rows])

    def _observers(self) -> tuple[int, ...]:
        """Who watches the MoE layers' routing (``on_routing``): a graph captured before a change would keep
        calling the old observers, so a change means a new capture."""
        return tuple(id(layer.on_routing) for layer in self._moe_layers)


class Computed:
    """A step computed where it was launched: ``wait()`` gives ``(logits, seconds)`` at once; no greedy tokens
    computed with it (``greedy_S``, as a fused step's)."""

    greedy_S = None

    def __init__(self, logits: torch.Tensor, seconds: float) -> None:
        self.logits, self.seconds = logits, seconds

    def wait(self) -> tuple[torch.Tensor, float]:
        return self.logits, self.seconds


class InlineStep:
    """A staged step that ``launch(tokens_S)`` computes there and then (``forward(inputs, copies)``), its pending
    ids (``serve.engine.overlap``) first filled from ``tokens_S``."""

    def __init__(self, forward, inputs: StepInputs, copies: list[tuple[int, int]]) -> None:
        self.forward, self.inputs, self.copies = forward, inputs, copies

    def launch(self, tokens_S: np.ndarray | None) -> Computed:
        if tokens_S is not None:
            fill_pending(self.inputs.input_ids_T, tokens_S)
        start = time.perf_counter()
        logits = self.forward(self.inputs, self.copies)
        return Computed(logits, time.perf_counter() - start)


class FusedStep:
    """A staged fused decode step: ``launch(tokens_S)`` makes the step's block copies (the previous step is done
    by then), then starts the C step on its worker thread, which takes its pending ids from ``tokens_S``."""

    def __init__(self, cache, copies: list[tuple[int, int]], staged: StagedDecode) -> None:
        self.cache, self.copies, self.staged = cache, copies, staged

    def launch(self, tokens_S: np.ndarray | None) -> LaunchedDecode:
        if self.copies:
            self.cache.copy_blocks(self.copies)
        return self.staged.launch(tokens_S)


def pending_token(row: int) -> int:
    """The placeholder id of the token a launched step samples in its ``row``-th sampled row (overlapped steps:
    :mod:`serve.engine.overlap`)."""
    return -(row + 1)


def fill_pending(ids_T: torch.Tensor, tokens_S: np.ndarray) -> None:
    """Replace the placeholders among a planned step's host input ids by the previous step's sampled tokens."""
    ids = ids_T.numpy()  # NOTE: host sync: none, the planned step's host ids (prepare made them on the host)
    pending = ids < 0
    if pending.any():
        ids[pending] = tokens_S[-ids[pending] - 1]


def _host_int64(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))


def split_by_length(lens: list[int], min_saving: int = 1536) -> list[int]:
    """Group starts for decode context lengths sorted longest first. Each group is padded to its longest; a new
    group costs a few more ops per layer, so one starts only where the padded key slots it could save exceed
    ``min_saving`` (tuned on the default model on a 2-core CPU: 1-2k beat both 256 and 4k, and no grouping).

    Example (``min_saving=250``): ``[900, 850, 400, 380, 120]`` -> ``[0, 2, 4]``.
    """
    starts = [0] if lens else []
    for i in range(1, len(lens)):
        if (lens[starts[-1]] - lens[i]) * (len(lens) - i) > min_saving:
            starts.append(i)
    return starts
