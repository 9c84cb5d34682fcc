"""``HyperMoEConfig``: the sizes of HyperMoE's embeddings, hypernetwork and generated adapter.

Defaults are the paper's (Zhao et al., ACL 2024; Bumble666/Hyper_MoE ``run_clm_hmoe.sh``): expert
embeddings of 128, a 128 -> 128 -> 128 processing MLP, a layer embedding of 10, a hypernetwork bottleneck
of 128 and a HyperExpert adapter of width 64.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HyperMoEConfig:
    """Enable with ``MoEConfig(..., hypermoe=HyperMoEConfig())``.

    ``num_layers`` sizes the shared hypernetwork's layer-embedding table; :func:`hypermoe.share_hypernetwork`
    grows it to the model's number of HyperMoE layers when it is smaller. ``cache_max_selections``: when
    the number of possible selected sets, ``C(E, K)``, is at most this, inference (no autograd) generates the
    adapters of every set once and reuses them across steps until a parameter changes (Mixtral's E=8, K=2:
    28 sets); 0 turns that cache off. Adapters are always generated once per unique set within a batch.
    """

    expert_embedding_dim: int = 128
    process_dim: int = 128  # hidden width of the per-layer processing MLP
    hypernet_input_dim: int = 128  # output of the processing MLP, the hypernetwork's selection input
    layer_embedding_dim: int = 10
    bottleneck_dim: int = 128  # the hypernetwork's hidden width
    adapter_dim: int = 64  # the generated HyperExpert: D -> adapter_dim -> D
    num_layers: int = 1
    cache_max_selections: int = 64

    def __post_init__(self) -> None:
        for name in (
            "expert_embedding_dim", "process_dim", "hypernet_input_dim", "layer_embedding_dim",
            "bottleneck_dim", "adapter_dim", "num_layers",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        value = self.cache_max_selections
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"cache_max_selections ({value!r}) must be a non-negative integer")
