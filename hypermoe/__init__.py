"""HyperMoE: a cross-layer hypernetwork turning the *unselected* experts into a per-token adapter.

Enable per layer with ``moe.MoEConfig(..., hypermoe=HyperMoEConfig())``, then call
``share_hypernetwork(model)`` once: all HyperMoE layers then use one hypernetwork (as in the paper) and are
numbered for its layer embedding. Call it before ``load_state_dict``. To skip building a per-layer
hypernetwork that sharing throws away, pass one at construction,
``MoE(cfg, hypernetwork=HyperNetwork(cfg.hypermoe, D, num_layers=L))``, and still call
``share_hypernetwork(model)`` to number the layers.
"""

from hypermoe.config import HyperMoEConfig
from hypermoe.hypernetwork import AdapterParams, HyperNetwork
from hypermoe.layer import HyperMoELayer, share_hypernetwork

__all__ = ["AdapterParams", "HyperMoEConfig", "HyperMoELayer", "HyperNetwork", "share_hypernetwork"]
