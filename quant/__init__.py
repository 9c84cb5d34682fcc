"""quant (see ../shared/ARCHITECTURE.md)."""
