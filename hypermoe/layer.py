"""``HyperMoELayer``: one MoE layer's HyperExpert, generated from the experts the router did *not* select.

Per layer (following ``layers.py`` of Bumble666/Hyper_MoE): expert embeddings ``[E, X]`` and a processing
MLP ``X -> process_dim -> P``. For a token whose selected set is ``S``:

    s = sum_{e not in S} expert_embedding[e]            computed as sum(all) - sum(S): O(K), not O(E - K)
    W = hypernetwork([process(s); layer_embedding[l]])   the shared hypernetwork (hypermoe/hypernetwork.py)
    y = W.up @ relu(W.down @ x + W.b_down) + W.b_up      added, ungated, to the routed experts' output

``W`` depends only on (layer, S), so it is generated once per unique ``S`` in a batch, and, at inference
when ``C(E, K) <= cache_max_selections``, once for every possible ``S`` and reused across steps.

Shape legend: T tokens, D hidden, E experts, K top-k, X expert embedding, P processed selection,
U unique selected sets in the batch, C = C(E, K) possible sets, A adapter width.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from hypermoe.config import HyperMoEConfig
from hypermoe.hypernetwork import AdapterParams, HyperNetwork
from moe.kernels.cpu_gemm import skinny_gemm_available, skinny_gemm_grouped

# The paper's code builds the expert embeddings and processing MLP before GPT-2's ``post_init``, which
# initialises every Embedding and Linear weight as N(0, initializer_range=0.02) and every bias as 0.
EMBEDDING_INIT_STD = 0.02


class HyperMoELayer(nn.Module):
    """``HyperMoELayer(config, num_experts, top_k, hidden_size)(x_TD, ids_TK) -> y_TD``, the adapter output.

    ``hypernetwork``: the shared :class:`HyperNetwork` to use; by default the layer builds its own.
    ``layer_index`` picks this layer's row of the hypernetwork's layer embedding; both are set for a whole
    model by :func:`share_hypernetwork`. Output dtype = the parameters' dtype.
    """

    def __init__(
        self,
        config: HyperMoEConfig,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        hypernetwork: HyperNetwork | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.expert_embedding = nn.Embedding(num_experts, config.expert_embedding_dim)
        self.process = nn.Sequential(
            nn.Linear(config.expert_embedding_dim, config.process_dim),
            nn.ReLU(),
            nn.Linear(config.process_dim, config.hypernet_input_dim),
        )
        for module in (self.expert_embedding, self.process[0], self.process[2]):
            nn.init.normal_(module.weight, std=EMBEDDING_INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if hypernetwork is None:
            hypernetwork = HyperNetwork(config, hidden_size)
        elif hypernetwork.hidden_size != hidden_size:
            raise ValueError(f"hypernetwork hidden_size ({hypernetwork.hidden_size}) != hidden_size ({hidden_size})")
        self.hypernetwork = hypernetwork
        self.layer_index = 0
        num_sets = math.comb(num_experts, top_k)
        self.table_possible = num_sets <= config.cache_max_selections
        self.register_buffer("colex_EK", None, persistent=False)
        self.init_buffers()
        self.clear_cache()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffer; call after materialising a layer built on the meta device.

        ``colex_EK[e, i] = C(e, i + 1)``: a sorted set's colex rank ``sum_i C(s_i, i + 1)`` is a unique int64
        key (a cheap 1-D ``torch.unique``) and its row in the table. Unless C(E, K) overflows: then unique rows.
        """
        E, K = self.num_experts, self.top_k
        if math.comb(E, K) < 2**62:
            device = self.expert_embedding.weight.device
            self.colex_EK = torch.tensor([[math.comb(e, i + 1) for i in range(K)] for e in range(E)], device=device)

    def clear_cache(self) -> None:
        """Drop the cross-step adapter table (it is also rebuilt by itself when any parameter changes)."""
        self._table: AdapterParams | None = None
        self._table_key: tuple | None = None

    def selection_embedding(self, sel_UK: torch.Tensor) -> torch.Tensor:
        """``s_UX``: the sum of the embeddings of the experts *not* in each set, as sum(all) - sum(selected)."""
        emb_EX = self.expert_embedding.weight
        return emb_EX.sum(dim=0) - emb_EX[sel_UK].sum(dim=1)

    def generate(self, sel_UK: torch.Tensor) -> AdapterParams:
        """The HyperExpert weights of U selected sets ``sel_UK`` (expert ids, any order within a row)."""
        return self.hypernetwork(self.process(self.selection_embedding(sel_UK.long())), self.layer_index)

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        T, D, K = x_TD.shape[0], self.hidden_size, self.top_k
        if x_TD.dim() != 2 or x_TD.shape[1] != D or tuple(ids_TK.shape) != (T, K):
            raise ValueError(f"x_TD {tuple(x_TD.shape)} and ids_TK {tuple(ids_TK.shape)} must be [T, {D}] and [T, {K}]")
        # 1. group the tokens by selected set; 2. one adapter per unique set, from the cross-step table or
        # generated for this batch; 3. each token through its set's adapter
        uniq_UK, rank_U, inverse_T, counts_U = self.group_sets(ids_TK)
        if rank_U is not None and self._use_table():
            params = self._adapter_table(x_TD.device)
            if rank_U.shape[0] > 1 and table_gemm_available(x_TD, params):  # one set: one GEMM pair below
                return apply_table_adapters(x_TD, rank_U[inverse_T], params)
            rows = rank_U.tolist()  # NOTE: host sync, as below
        else:
            params, rows = self.generate(uniq_UK), list(range(uniq_UK.shape[0]))
        return apply_adapters(x_TD, inverse_T, counts_U.tolist(), params, rows)  # NOTE: host sync (set sizes)

    def group_sets(self, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(uniq_UK, rank_U, inverse_T, counts_U)``: the U unique selected sets (sorted rows), their colex
        ranks (None when C(E, K) overflows int64), each token's set and each set's token count."""
        sel_TK = ids_TK.long().sort(dim=1).values
        if self.colex_EK is None:
            uniq_UK, inverse_T, counts_U = torch.unique(sel_TK, dim=0, return_inverse=True, return_counts=True)
            return uniq_UK, None, inverse_T, counts_U
        # a 1-D unique of int64 keys is ~10x cheaper than torch.unique(dim=0) at T=512
        rank_T = self.colex_EK.gather(0, sel_TK).sum(dim=1)
        rank_U, inverse_T, counts_U = torch.unique(rank_T, return_inverse=True, return_counts=True)
        token_T = torch.arange(inverse_T.shape[0], device=ids_TK.device)
        first_U = torch.full_like(rank_U, inverse_T.shape[0]).scatter_reduce_(0, inverse_T, token_T, "amin")
        return sel_TK[first_U], rank_U, inverse_T, counts_U

    def _use_table(self) -> bool:
        """The cross-step table holds detached weights: only when autograd would not train through them."""
        if not self.table_possible:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def _fingerprint(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump _version; .to() changes data_ptr/dtype.
        params = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        return (self.layer_index, id(self.hypernetwork), params)

    def _adapter_table(self, device: torch.device) -> AdapterParams:
        """The adapters of all ``C(E, K)`` sets, generated in one batch and kept until a parameter changes."""
        key = self._fingerprint()
        if self._table is None or self._table_key != key:
            with torch.no_grad():
                self._table = self.generate(all_sets_colex(self.num_experts, self.top_k, device))
            self._table_key = key
        return self._table


def all_sets_colex(num_experts: int, top_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Every sorted K-subset of ``range(E)`` in colex order (row r has colex rank r), ``[C(E, K), K]``.

    Example: E=3, K=2 -> ``[[0, 1], [0, 2], [1, 2]]``; ranks ``C(0,1) + C(1,2) = 0``, ``C(0,1) + C(2,2) = 1``,
    ``C(1,1) + C(2,2) = 2``.
    """
    sets = sorted(itertools.combinations(range(num_experts), top_k), key=lambda c: c[::-1])
    return torch.tensor(sets, dtype=torch.long, device=device).view(len(sets), top_k)


def apply_adapter(x_MD: torch.Tensor, params: AdapterParams, row: int) -> torch.Tensor:
    """``y_MD = w_up @ relu(w_down @ x + b_down) + b_up`` with the adapter in ``row`` of ``params``."""
    h_MA = F.relu(F.linear(x_MD, params.w_down_UAD[row], params.b_down_UA[row]))
    return F.linear(h_MA, params.w_up_UDA[row], params.b_up_UD[row])


def apply_adapters(
    x_TD: torch.Tensor, inverse_T: torch.Tensor, counts_U: list[int], params: AdapterParams, rows: list[int]
) -> torch.Tensor:
    """Token ``t`` through adapter ``rows[inverse_T[t]]``: tokens grouped by set, one GEMM pair per set.

    Example: ``inverse_T = [1, 0, 1]``, ``counts_U = [1, 2]``, ``rows = [5, 2]``: token 1 uses adapter 5,
    tokens 0 and 2 use adapter 2.
    """
    x_TD = x_TD.to(params.w_down_UAD.dtype)
    if len(rows) == 1:
        return apply_adapter(x_TD, params, rows[0])
    order_T = torch.argsort(inverse_T, stable=True)
    pieces = [apply_adapter(x_MD, params, row) for x_MD, row in zip(x_TD[order_T].split(counts_U), rows, strict=True)]
    y_sorted_TD = torch.cat(pieces)
    return y_sorted_TD.new_empty(y_sorted_TD.shape).index_copy(0, order_T, y_sorted_TD)


def table_gemm_available(x_TD: torch.Tensor, params: AdapterParams) -> bool:
    """Whether :func:`apply_table_adapters` can run: fp32 on a CPU with the skinny GEMM (AVX2 and a C compiler)."""
    return (x_TD.device.type == "cpu" and params.w_down_UAD.dtype == torch.float32 and not torch.is_grad_enabled()
            and skinny_gemm_available())


def apply_table_adapters(x_TD: torch.Tensor, rank_T: torch.Tensor, params: AdapterParams) -> torch.Tensor:
    """Token ``t`` through adapter ``rank_T[t]`` of the whole table (``C`` adapters): tokens sorted by set, then
    each adapter GEMM as one grouped call over the table (sets with no token are skipped), so the cost does not
    grow with the number of sets in the batch. CPU, fp32, inference; the same math as :func:`apply_adapters`.

    Example: ``rank_T = [3, 0, 3]`` -> sorted order ``[1, 0, 2]``, counts ``[1, 0, 0, 2, 0, ...]``: token 1 uses
    adapter 0, tokens 0 and 2 adapter 3.
    """
    C = params.w_down_UAD.shape[0]
    order_T = torch.argsort(rank_T, stable=True)
    rank_sorted_T = rank_T[order_T]
    counts_C = torch.bincount(rank_T, minlength=C)
    h_TA = skinny_gemm_grouped(x_TD.float()[order_T], params.w_down_UAD, counts_C)
    h_TA = F.relu(h_TA.add_(params.b_down_UA[rank_sorted_T]))
    y_sorted_TD = skinny_gemm_grouped(h_TA, params.w_up_UDA, counts_C).add_(params.b_up_UD[rank_sorted_T])
    return torch.empty_like(y_sorted_TD).index_copy_(0, order_T, y_sorted_TD)


def share_hypernetwork(model: nn.Module) -> int:
    """Make every :class:`HyperMoELayer` of ``model`` use one hypernetwork; number the layers 0, 1, ...

    Layers are numbered in ``model.modules()`` order. The first layer's hypernetwork is kept when its
    layer-embedding table has a row for every layer, else a fresh one with that many rows replaces it.
    Call it after building the model and before loading a checkpoint (``state_dict`` stores the shared
    weights under every layer's name; ``load_state_dict`` writes them all into the one instance).
    Returns the number of HyperMoE layers.
    """
    layers = [m for m in model.modules() if isinstance(m, HyperMoELayer)]
    if not layers:
        return 0
    first = layers[0].hypernetwork
    for i, layer in enumerate(layers):
        if layer.hypernetwork.signature != first.signature:
            raise ValueError(
                f"HyperMoE layer {i} (hidden, P, Z, B, A = {layer.hypernetwork.signature}) cannot share the "
                f"hypernetwork of layer 0 ({first.signature})"
            )
    shared = first if first.num_layers >= len(layers) else HyperNetwork(
        layers[0].config, first.hidden_size, num_layers=len(layers)
    ).to(device=first.linear1.weight.device, dtype=first.linear1.weight.dtype)
    for i, layer in enumerate(layers):
        layer.hypernetwork = shared
        layer.layer_index = i
        layer.clear_cache()
    return len(layers)
