"""expert_parallel (see ../shared/ARCHITECTURE.md)."""
