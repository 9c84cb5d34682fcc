"""``RoutingStats``: per-layer, per-expert routed-token counts, accumulated on the device during any forward.

Shape legend: L MoE layers, E experts, T tokens, K top-k, W window steps.

``RoutingStats.attach(model)`` hooks every ``moe.MoE`` of a model (layer order = module order) through its
``on_routing`` observer; each forward adds its routed expert ids to a ``[L, E]`` int64 buffer with
``index_add_``, on the device, with no host synchronisation (``torch.bincount`` would sync on CUDA: it reads
the largest id to size its output). ``step()`` closes one step (the serving engine calls it once per engine
step) into a ring of the last ``window`` steps, so the windowed and the cumulative loads can both be read.
Reading (``to_dict``, ``cumulative_counts().tolist()``) is the only host sync.

Padding: a forward whose batch holds rows that are not tokens (a decode step padded to a CUDA-graph size) runs
inside ``counting_only(valid_T)``; the observers then count only the rows where ``valid_T`` is True. A graph
captured there keeps reading that mask tensor, so its replays count right when the mask's contents change.

Example: 1 layer, E=4, window=2; steps routing experts ``[0]``, ``[1]``, ``[2]`` (3 tokens each, K=1) ->
cumulative ``[[3, 3, 3, 0]]``, windowed ``[[0, 3, 3, 0]]`` (step 0 fell out of the window).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "moe-routing-stats/1"
_VALID_T: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("routing_valid_T", default=None)


@contextlib.contextmanager
def counting_only(valid_T: torch.Tensor | None) -> Iterator[None]:
    """Within: routing observers count only the token rows where ``valid_T`` (bool ``[T]``) is True (None:
    every row)."""
    token = _VALID_T.set(valid_T)
    try:
        yield
    finally:
        _VALID_T.reset(token)


class RoutingStats:
    """Token counts ``[L, E]`` (int64, on the model's device): cumulative and over the last ``window`` steps.

    ``expert_bytes`` (weight bytes of one routed expert as stored, e.g. ``3*D*F*4`` for an fp32 SwiGLU expert),
    ``top_k`` and ``model`` are optional facts for reports; ``attach`` fills the first two from the model.
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 100, layer_names: list[str] | None = None,
                 device: torch.device | str = "cpu", model: str | None = None) -> None:
        if num_layers < 1 or num_experts < 1 or window < 1:
            raise ValueError(f"num_layers ({num_layers}), num_experts ({num_experts}) and window ({window}) "
                             "must be >= 1")
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        self.layer_names = layer_names or [str(i) for i in range(num_layers)]
        if len(self.layer_names) != num_layers:
            raise ValueError(f"layer_names has {len(self.layer_names)} names for num_layers ({num_layers})")
        self.model = model
        self.top_k: int | None = None
        self.expert_bytes: int | None = None
        self.current_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.total_LE = torch.zeros_like(self.current_LE)
        self.ring_WLE = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)
        self.steps = 0
        self._hooked: list[Any] = []  # the moe.MoE layers observed (found by their on_routing slot)
        self._lock = threading.RLock()  # step() vs readers on other threads (a server's /metrics scrape)

    # -- collecting ---------------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, window: int = 100, name: str | None = None) -> RoutingStats:
        """Count the routing of every ``moe.MoE`` in ``model`` (a layer, a serving model, a patched HF model);
        ``ValueError`` if it has none. A layer's previous observer is replaced.

        An MoE layer is found by its observer slot, ``on_routing`` (``moe.MoE`` calls it with every
        :class:`routing.Routing` it computes), so this ground-floor package needs nothing from ``moe``."""
        layers = [(layer_name, m) for layer_name, m in model.named_modules() if hasattr(m, "on_routing")]
        if not layers:
            raise ValueError(f"model ({type(model).__name__}) has no moe.MoE layers to observe")
        experts = {m.config.num_experts for _, m in layers}
        if len(experts) != 1:
            raise ValueError(f"MoE layers disagree on num_experts ({sorted(experts)})")
        first = layers[0][1]
        device = first.router.weight.device
        stats = cls(len(layers), experts.pop(), window, [n or "0" for n, _ in layers], device, name)
        top_ks = {m.config.top_k for _, m in layers}
        stats.top_k = top_ks.pop() if len(top_ks) == 1 else None
        stats.expert_bytes = expert_weight_bytes(first)
        for index, (_, module) in enumerate(layers):
            module.on_routing = _Recorder(stats, index)
            stats._hooked.append(module)
        return stats

    def detach(self) -> None:
        """Stop counting (only the observers this object installed are removed)."""
        for module in self._hooked:
            if isinstance(module.on_routing, _Recorder) and module.on_routing.stats is self:
                module.on_routing = None
        self._hooked = []

    def record(self, layer: int, ids_TK: torch.Tensor, valid_T: torch.Tensor | None = None) -> None:
        """Add one forward's routing of ``layer``; ``valid_T`` (bool ``[T]``) excludes padding tokens.

        No host sync: a masked ``index_add_`` (padding adds 0) instead of boolean indexing or ``bincount``.
        """
        ids_N = ids_TK.reshape(-1).long()
        if valid_T is None:
            ones_N = torch.ones(ids_N.shape, dtype=torch.int64, device=ids_N.device)
        else:
            ones_N = valid_T.to(torch.int64)[:, None].expand(ids_TK.shape).reshape(-1)
        self.current_LE[layer].index_add_(0, ids_N, ones_N)

    def step(self) -> None:
        """Close the current step: it enters the cumulative counts and the window ring."""
        with self._lock:
            self.total_LE += self.current_LE
            self.ring_WLE[self.steps % self.window].copy_(self.current_LE)
            self.current_LE.zero_()
            self.steps += 1

    # -- reading ------------------------------------------------------------------------------------------------
    def cumulative_counts(self) -> torch.Tensor:
        """``[L, E]`` tokens per expert since attaching (closed steps plus the open one)."""
        with self._lock:
            return self.total_LE + self.current_LE

    def window_counts(self) -> torch.Tensor:
        """``[L, E]`` tokens per expert over the last ``window`` closed steps."""
        with self._lock:
            return self.ring_WLE.sum(dim=0)

    def to_dict(self) -> dict:
        """JSON-able snapshot (what ``GET /v1/moe/routing`` serves and ``save`` writes)."""
        with self._lock:  # one consistent snapshot: counts and steps of the same instant
            # NOTE: host sync: reading the counts (to_dict) is the one sync of the statistics
            cumulative, windowed, steps = self.cumulative_counts().tolist(), self.window_counts().tolist(), self.steps
        return {"format": FORMAT, "model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "layer_names": list(self.layer_names),
                "expert_bytes": self.expert_bytes, "steps": steps, "window": self.window,
                "window_steps": min(steps, self.window), "cumulative": cumulative, "windowed": windowed}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict) -> RoutingStats:
        """Rebuild from ``to_dict`` output (read-only use: the window ring is summarised into one slot).
        Any inconsistency raises a one-line ``ValueError``."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a routing statistics file (format {found!r}, expected {FORMAT!r})")
        try:
            L, E = int(data["num_layers"]), int(data["num_experts"])
            stats = cls(L, E, int(data["window"]), [str(n) for n in data["layer_names"]], model=data.get("model"))
            total = torch.tensor(data["cumulative"], dtype=torch.int64)
            windowed = torch.tensor(data["windowed"], dtype=torch.int64)
            stats.steps = int(data.get("steps", 0))
            stats.top_k = None if data.get("top_k") is None else int(data["top_k"])
            stats.expert_bytes = None if data.get("expert_bytes") is None else int(data["expert_bytes"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise ValueError(f"routing statistics are malformed: {detail}") from None
        for name, t in (("cumulative", total), ("windowed", windowed)):
            if tuple(t.shape) != (L, E):
                raise ValueError(f"routing statistics {name} has shape {tuple(t.shape)}, expected ({L}, {E}) "
                                 "from num_layers and num_experts")
            if bool((t < 0).any()):  # NOTE: host sync (loading a saved file, not a step)
                raise ValueError(f"routing statistics {name} has negative counts")
        if bool((windowed > total).any()):  # NOTE: host sync (loading, as above)
            raise ValueError("routing statistics windowed counts exceed the cumulative counts")
        stats.total_LE.copy_(total)
        stats.ring_WLE[-1].copy_(windowed)
        return stats

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read routing statistics {str(path)!r}: {e}") from None
        return cls.from_dict(data)


def expert_weight_bytes(layer: Any) -> int:
    """Bytes of one routed expert of an ``moe.MoE`` as stored: its parameters and buffers (weights, biases, FP8
    scales) over its local experts. For a SwiGLU expert without biases that is ``3*D*F*element_size``."""
    experts = layer.experts
    tensors = list(experts.parameters()) + list(experts.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) // experts.num_experts


class _Recorder:
    """``MoE.on_routing`` callback for one layer (a small object rather than a lambda: picklable, readable)."""

    def __init__(self, stats: RoutingStats, layer: int) -> None:
        self.stats, self.layer = stats, layer

    def __call__(self, routing) -> None:
        self.stats.record(self.layer, routing.ids_TK, _VALID_T.get())
