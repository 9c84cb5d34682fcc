"""The embedded default model (HF format) and the script that trains it: ``python -m serve.default_model.train``."""
