"""``moe-serve``: the OpenAI-compatible server as a Hydra app.

    moe-serve                                   # the embedded default model on 127.0.0.1:8000
    moe-serve server.port=9000 model.path=/ckpt/Qwen3-30B-A3B engine.max_num_seqs=128
    moe-serve /ckpt/Qwen3-30B-A3B               # a bare directory is model.path (as in ``vllm serve DIR``)
    moe-serve parallel=ep2 launcher=torchrun    # 2 expert-parallel ranks through torch's launcher
    moe-serve --cfg job                         # print the composed config

The config is ``configs/config.yaml`` plus one preset per group (model quant parallel server launcher report),
typed by the dataclasses of :mod:`serve.launch.schema`, so a typo or a wrong type fails at start with Hydra's
message; :func:`serve.launch.schema.to_config` hands the code real dataclasses, whose ``__post_init__`` checks
values. A key or preset that does not exist fails with a "did you mean" (:mod:`serve.launch.overrides`); what
the machine must provide (the port, ``report.output_dir``, the checkpoint's expert count for ``parallel.ep_size``,
DeepSpeed's hostfile) is checked before the model loads or any rank starts (:mod:`serve.launch.checks`). Such
errors are one ``moe-serve: error:`` line and exit status 2. SIGTERM/SIGINT drain: no new requests, in-flight
ones get ``server.drain_timeout_s`` to finish and are then aborted (their streams end cleanly), the engine
thread stops, the process exits 0.

``configs/`` is found next to the ``serve`` package (a repository checkout or editable install) or inside it
(``serve/configs``, where a wheel ships it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from serve.launch import launchers
from serve.launch.checks import check_before_start
from serve.launch.overrides import UsageError, rewrite
from serve.launch.ranks import run_rank_or_exit
from serve.launch.schema import MoEServeSchema, register, to_config
from serve.launch.serving import serve

__all__ = ["main", "run"]


def config_dir() -> Path:
    """``configs/`` of the checkout (next to the package) or the copy a wheel ships in ``serve/configs``."""
    package = Path(__file__).resolve().parents[1]  # serve/
    for candidate in (package.parent / "configs", package / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"moe-serve's configs/ is neither at {package.parent / 'configs'} nor "
                            f"{package / 'configs'}")


register()


def run(cfg: MoEServeSchema) -> None:
    """Serve ``cfg`` in this process, as one rank of a submitit job, or through torchrun / DeepSpeed."""
    kind = cfg.launcher.kind
    if launchers.in_submitit_job():  # checked by the submitter (launchers.SubmitCheck)
        launchers.export_submitit_env()
        run_rank_or_exit(cfg, Path(HydraConfig.get().runtime.output_dir))
    elif kind == "local":
        serve(cfg, listener=check_before_start(cfg))  # the port is bound before the model loads
        _exit_now()
    elif kind in launchers.COMMANDS:
        listener = check_before_start(cfg)
        if listener is not None:  # rank 0 binds it again, before it loads the model
            listener.close()
        sys.exit(launchers.launch(cfg, Path(HydraConfig.get().runtime.output_dir)))
    else:  # the submitit presets switch Hydra to multirun, whose launcher starts the tasks
        raise ValueError(f"launcher={kind} runs through Hydra's submitit launcher: do not override hydra.mode")


def _exit_now() -> None:
    """Exit 0 at once after a drained shutdown. The interpreter's own teardown (torch's and every module's
    objects freed one by one) took 1-2 s of an idle server's exit, more on a busy machine, all of it inside the
    supervisor's grace period; nothing is left to run by then (routing statistics are written, the engine thread
    is stopped), so only the log and the standard streams are flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")
def _hydra_main(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
        run(cfg)
    except (ValueError, OmegaConfBaseException) as e:  # bad values, unresolvable interpolations
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    try:
        sys.argv[1:] = rewrite(sys.argv[1:], config_dir())
    except UsageError as e:
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
