"""serve (see ../shared/ARCHITECTURE.md)."""
