"""The plain oracle for HyperMoE: the paper's equations token by token, in fp64, with explicit sums.

Readable rather than fast. Tests compare :class:`hypermoe.HyperMoELayer` (per-set dedup, cross-step table,
sum(all) - sum(selected)) to these functions; nothing else re-implements them.

Shape legend: T tokens, D hidden, E experts, K top-k, X expert embedding, A adapter width.
"""

from __future__ import annotations

import torch

from hypermoe.layer import HyperMoELayer


def reference_unselected_sum(emb_EX: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """``s_TX[t] = sum of emb_EX[e] over the experts e that token t did not select`` (explicit loop)."""
    E, X = emb_EX.shape
    rows = []
    for chosen in ids_TK.tolist():
        s_X = torch.zeros(X, dtype=emb_EX.dtype, device=emb_EX.device)
        for e in range(E):
            if e not in chosen:
                s_X = s_X + emb_EX[e]
        rows.append(s_X)
    return torch.stack(rows) if rows else emb_EX.new_zeros(0, X)


def reference_hypermoe(layer: HyperMoELayer, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """The HyperExpert output of every token, generated per token from the layer's own weights; fp64.

    ``y_t = Wu_t relu(Wd_t x_t + bd_t) + bu_t`` with ``[Wd_t, bd_t, Wu_t, bu_t] = heads(relu(W1 [process(s_t);
    z_l] + b1))``, ``s_t`` the sum of the unselected experts' embeddings and ``z_l`` the layer embedding.
    """
    p = {name: t.detach().double() for name, t in layer.named_parameters()}
    D, A = layer.hidden_size, layer.config.adapter_dim
    s_TX = reference_unselected_sum(p["expert_embedding.weight"], ids_TK)
    z_Z = p["hypernetwork.layer_embedding.weight"][layer.layer_index]
    ys = []
    for t in range(x_TD.shape[0]):
        h = torch.relu(p["process.0.weight"] @ s_TX[t] + p["process.0.bias"])
        processed = p["process.2.weight"] @ h + p["process.2.bias"]
        hn_input = torch.cat([processed, z_Z])
        hidden = torch.relu(p["hypernetwork.linear1.weight"] @ hn_input + p["hypernetwork.linear1.bias"])

        def head(name: str, hidden: torch.Tensor = hidden) -> torch.Tensor:
            return p[f"hypernetwork.{name}.weight"] @ hidden + p[f"hypernetwork.{name}.bias"]

        w_down_AD, b_down_A = head("weight_down").view(A, D), head("bias_down")
        w_up_DA, b_up_D = head("weight_up").view(D, A), head("bias_up")
        ys.append(w_up_DA @ torch.relu(w_down_AD @ x_TD[t].double() + b_down_A) + b_up_D)
    return torch.stack(ys) if ys else x_TD.new_zeros(0, D, dtype=torch.float64)
