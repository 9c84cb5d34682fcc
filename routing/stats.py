"""``RoutingStats``: per-layer, per-expert routed-token counts, accumulated on the device during any forward.

Shape legend: L MoE layers, E experts, T tokens, K top-k, W window steps.

``RoutingStats.attach(model)`` hooks every ``moe.MoE`` of a model (layer order = module order) through its
``on_routing`` observer; each forward adds a ``bincount`` of its routed expert ids to a ``[L, E]`` int64
buffer, on the device, with no host synchronisation. ``step()`` closes one step (the serving engine calls it
once per engine step) into a ring of the last ``window`` steps, so the windowed and the cumulative loads can
both be read. Reading (``to_dict``, ``cumulative_counts().tolist()``) is the only host sync.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from torch import nn

FORMAT = "moe-routing-stats/1"


class RoutingStats:
    def __init__(self, num_layers: int, num_experts: int, window: int = 100, layer_names: list[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if num_layers < 1 or num_experts < 1 or window < 1:
            raise ValueError(f"num_layers ({num_layers}), num_experts ({num_experts}) and window ({window}) "
                             "must be >= 1")
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        self.layer_names = layer_names or [str(i) for i in range(num_layers)]
        self.current_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.total_LE = torch.zeros_like(self.current_LE)
        self.ring_WLE = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)
        self.steps = 0
        self._hooked: list[nn.Module] = []
        self._lock = threading.Lock()  # step() vs readers on other threads (a server's /metrics scrape)

    # -- collecting ---------------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, window: int = 100) -> "RoutingStats":
        """Count the routing of every ``moe.MoE`` in ``model``; ``ValueError`` if it has none."""
        from moe.layer import MoE

        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        if not layers:
            raise ValueError(f"model ({type(model).__name__}) has no moe.MoE layers to observe")
        experts = {m.config.num_experts for _, m in layers}
        if len(experts) != 1:
            raise ValueError(f"MoE layers disagree on num_experts ({sorted(experts)})")
        device = next(layers[0][1].parameters()).device
        stats = cls(len(layers), experts.pop(), window, [name for name, _ in layers], device)
        for index, (_, module) in enumerate(layers):
            module.on_routing = _Recorder(stats, index)
            stats._hooked.append(module)
        return stats

    def detach(self) -> None:
        for module in self._hooked:
            module.on_routing = None
        self._hooked = []

    def record(self, layer: int, ids_TK: torch.Tensor, valid_T: torch.Tensor | None = None) -> None:
        """Add one forward's routing of ``layer``; ``valid_T`` (bool) excludes padding tokens."""
        ids = ids_TK if valid_T is None else ids_TK[valid_T]
        self.current_LE[layer] += torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts)

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
        return {"format": FORMAT, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "layer_names": self.layer_names, "steps": self.steps, "window": self.window,
                "cumulative": self.cumulative_counts().tolist(), "windowed": self.window_counts().tolist()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingStats":
        """Rebuild (read-only use: the window ring is summarised into its last slot)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a routing statistics file (format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {FORMAT!r})")
        try:
            L, E = int(data["num_layers"]), int(data["num_experts"])
            stats = cls(L, E, int(data["window"]), list(data["layer_names"]))
            total = torch.tensor(data["cumulative"], dtype=torch.int64)
            windowed = torch.tensor(data["windowed"], dtype=torch.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"routing statistics are malformed: {e}") from None
        for name, t in (("cumulative", total), ("windowed", windowed)):
            if tuple(t.shape) != (L, E) or bool((t < 0).any()):
                raise ValueError(f"routing statistics {name} has shape {tuple(t.shape)} (expected [{L}, {E}]) "
                                 "or negative counts")
        if len(stats.layer_names) != L:
            raise ValueError(f"routing statistics list {len(stats.layer_names)} layer names for {L} layers")
        stats.total_LE.copy_(total)
        stats.ring_WLE[-1].copy_(windowed)
        stats.steps = int(data.get("steps", 0))
        return stats

    @classmethod
    def load(cls, path: str | Path) -> "RoutingStats":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read routing statistics {str(path)!r}: {e}") from None
        return cls.from_dict(data)


class _Recorder:
    """``MoE.on_routing`` callback for one layer (a small object rather than a lambda: picklable, readable)."""

    def __init__(self, stats: RoutingStats, layer: int) -> None:
        self.stats, self.layer = stats, layer

    def __call__(self, routing) -> None:
        self.stats.record(self.layer, routing.ids_TK)
