"""hypermoe (see ../shared/ARCHITECTURE.md)."""
