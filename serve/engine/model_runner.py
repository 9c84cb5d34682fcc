"""``ModelRunner``: turns a scheduled step into one forward pass over the paged KV cache.

Shape legend: T tokens of the step, B sequences, M blocks per decoding sequence (padded), V vocabulary.
Layout of the step's tokens: the one-token sequences (decodes) first, longest context first, then each longer
chunk contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.engine.sequence import Sequence
from serve.models import MoEDecoder
from serve.models.attention import DecodeGroup, PagedAttention, PagedKVCache, PrefillChunk


@dataclass
class StepInputs:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    slot_mapping_T: torch.Tensor
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    last_rows: torch.Tensor  # rows of the step whose logits are sampled
    sampled: list[int]  # the sequences (indices into the scheduled list) those rows belong to


class ModelRunner:
    def __init__(self, model: MoEDecoder, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        dtype = next(model.parameters()).dtype
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype)

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> StepInputs:
        """Lay out the step's tokens (decodes first, longest context first) with their slots and block tables."""
        decodes = sorted((i for i, n in enumerate(num_new_tokens) if n == 1), key=lambda i: -seqs[i].num_tokens)
        order = decodes + [i for i, n in enumerate(num_new_tokens) if n > 1]
        ids, positions, slots, prefills, last_rows, sampled = [], [], [], [], [], []
        bs = self.block_size
        for rank, i in enumerate(order):
            seq, n = seqs[i], num_new_tokens[i]
            start, end = seq.num_computed, seq.num_computed + n
            table = seq.block_table
            if rank >= len(decodes):
                prefills.append(PrefillChunk(len(ids), n, start, torch.tensor(table[:-(-end // bs)])))
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if end == seq.num_tokens:
                last_rows.append(len(ids) - 1)
                sampled.append(i)
        lens = [seqs[i].num_computed + 1 for i in decodes]
        # the C kernel reads each sequence's own keys: one group; the torch path pads a group to its longest
        bounds = (([0] if lens else []) if self.cache.c_decode else split_by_length(lens)) + [len(lens)]
        groups = [DecodeGroup.build(a, [seqs[i].block_table for i in decodes[a:b]], lens[a:b], bs)
                  for a, b in zip(bounds, bounds[1:], strict=False)]
        return StepInputs(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), groups, prefills,
                          torch.tensor(last_rows, dtype=torch.long), sampled)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, copies: list[tuple[int, int]]) -> torch.Tensor:
        """Run the model over the step; returns logits ``[len(inputs.sampled), V]`` (fp32)."""
        self.cache.copy_blocks(copies)
        backend = PagedAttention(self.cache, inputs.slot_mapping_T, inputs.decodes, inputs.prefills)
        hidden_TD = self.model(inputs.input_ids_T, inputs.positions_T, backend)
        return self.model.logits(hidden_TD[inputs.last_rows])


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
