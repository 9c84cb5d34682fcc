"""Starting ``moe-serve``: the Hydra entry (:mod:`serve.launch.cli`), its typed schema, the launchers
(torchrun, DeepSpeed, submitit), the distributed ranks, and the ``moe-report`` CLI."""
