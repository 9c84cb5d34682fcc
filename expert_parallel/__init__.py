"""Expert parallelism: placement of logical experts on ranks (linear, round-robin, EPLB) and ``shard_moe``."""

from expert_parallel.placement import ExpertPlacement
from expert_parallel.shard import local_experts, shard_moe

__all__ = ["ExpertPlacement", "local_experts", "shard_moe"]
