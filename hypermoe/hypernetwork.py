"""The hypernetwork shared by all layers: ``[processed selection; layer embedding] -> HyperExpert weights``.

Follows ``adapter_generators.py`` of Bumble666/Hyper_MoE (``ParameterGenerator`` + ``SimpleGenerator``):
``h = relu(linear1([s; layer_embedding[l]]))`` then four linear heads give the adapter's down weight, down
bias, up weight and up bias, initialised "hyper-fan-in" (tiny uniform weights, zero biases) so that the
generated adapter starts near zero.

Layout: our heads' outputs are viewed ``[out, in]`` (``w_down_UAD`` ``[A, D]``, ``w_up_UDA`` ``[D, A]``), the
``F.linear`` layout, where the paper views them ``[in, out]`` for ``x @ W``. Each head is a fresh i.i.d.
initialised linear map, so this is the same model with its head rows permuted.

Shape legend: U selected sets (unique within a batch, or all ``C(E, K)``), P hypernetwork input (processed
selection), Z layer embedding, B bottleneck, A adapter width, D hidden size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hypermoe.config import HyperMoEConfig


class AdapterParams(NamedTuple):
    """Generated HyperExpert weights for U selected sets: ``y = w_up @ relu(w_down @ x + b_down) + b_up``."""

    w_down_UAD: torch.Tensor
    b_down_UA: torch.Tensor
    w_up_UDA: torch.Tensor
    b_up_UD: torch.Tensor


def hyperfanin_init_weight(linear: nn.Linear, hypernet_in: int, mainnet_in: int) -> None:
    """The paper's init for a weight head: ``U(+-1e-3 * sqrt(3 / (hypernet_in * mainnet_in)))``, zero bias."""
    bound = 1e-3 * math.sqrt(3 / (hypernet_in * mainnet_in))
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)


def hyperfanin_init_bias(linear: nn.Linear, hypernet_in: int) -> None:
    """The paper's init for a bias head: ``U(+-1e-3 * sqrt(3 / hypernet_in))``, zero bias."""
    bound = 1e-3 * math.sqrt(3 / hypernet_in)
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)


class HyperNetwork(nn.Module):
    """``HyperNetwork(config, hidden_size, num_layers)(selection_UP, layer_index) -> AdapterParams``.

    One instance serves every HyperMoE layer of a model (see :func:`hypermoe.share_hypernetwork`); the layer
    is told apart by its row of ``layer_embedding`` ``[num_layers, Z]``.
    """

    def __init__(self, config: HyperMoEConfig, hidden_size: int, num_layers: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = D = hidden_size
        self.num_layers = config.num_layers if num_layers is None else num_layers
        A, B = config.adapter_dim, config.bottleneck_dim
        # Default inits where the paper's code leaves them (it builds these after GPT-2's post_init).
        self.layer_embedding = nn.Embedding(self.num_layers, config.layer_embedding_dim)
        self.linear1 = nn.Linear(config.hypernet_input_dim + config.layer_embedding_dim, B)
        self.weight_down = nn.Linear(B, A * D)
        self.bias_down = nn.Linear(B, A)
        self.weight_up = nn.Linear(B, D * A)
        self.bias_up = nn.Linear(B, D)
        hyperfanin_init_weight(self.weight_up, B, A)
        hyperfanin_init_weight(self.weight_down, B, D)
        hyperfanin_init_bias(self.bias_up, B)
        hyperfanin_init_bias(self.bias_down, B)

    @property
    def signature(self) -> tuple[int, ...]:
        """What a layer must agree on to share this hypernetwork."""
        c = self.config
        return (self.hidden_size, c.hypernet_input_dim, c.layer_embedding_dim, c.bottleneck_dim, c.adapter_dim)

    def forward(self, selection_UP: torch.Tensor, layer_index: int) -> AdapterParams:
        U, D, A = selection_UP.shape[0], self.hidden_size, self.config.adapter_dim
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer_index ({layer_index}) must be in [0, num_layers={self.num_layers})")
        layer_UZ = self.layer_embedding.weight[layer_index].expand(U, -1)
        h_UB = F.relu(self.linear1(torch.cat([selection_UP, layer_UZ], dim=-1)))
        return AdapterParams(
            self.weight_down(h_UB).view(U, A, D),
            self.bias_down(h_UB),
            self.weight_up(h_UB).view(U, D, A),
            self.bias_up(h_UB),
        )
