"""Stopping a submitit job from the ``moe-serve`` that submitted it (``launcher=submitit_local`` / ``submitit_slurm``).

Hydra's submitit launcher submits the job and waits for it; by default a SIGTERM or SIGINT to that process
ends only the waiting, and the job goes on serving. :func:`stop_job_on_signal` (installed by
:class:`serve.launch.launchers.SubmitCheck` before the job is submitted) makes a signal stop the job:

- local, rank 0 serving (its pid in ``<sweep dir>/<job>/server.pid``): SIGTERM to rank 0, which drains and stops
  the other ranks; the job ends, the submitter returns as usual and exits 0;
- local, before rank 0 serves, or a second signal: the job is cancelled (SIGINT to submitit's job controller,
  what ``LocalJob.cancel`` sends: it interrupts the tasks and kills them a second later); exit ``128 + signal``;
- SLURM: the job is cancelled (``scancel`` through ``submitit.SlurmJob.cancel``: SLURM sends SIGTERM to every
  task, rank 0 drains); exit ``128 + signal``.

The jobs are found in the submitit folder (``<sweep dir>/.submitit/<job id>/``): Hydra's launcher keeps the
``Job`` objects to itself. A local job's id is its controller's pid, a child of this process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from serve.launch.ranks import PID_FILE

log = logging.getLogger("moe-serve")


def stop_job_on_signal(kind: str, sweep_dir: Path, submitit_dir: Path) -> None:
    """Install SIGTERM/SIGINT handlers in the submitting process (see the module docstring)."""
    signals: list[int] = []

    def handle(signum, _frame) -> None:
        signals.append(signum)
        rank0 = _rank0_pid(sweep_dir) if kind == "submitit_local" else None
        if rank0 is not None and len(signals) == 1:
            log.info("signal %d: passing SIGTERM to rank 0 (pid %d); it drains and stops the job", signum, rank0)
            _kill(rank0, signal.SIGTERM)
            return
        jobs = job_ids(submitit_dir)
        for job_id in jobs:
            cancel(kind, submitit_dir, job_id)
        print(f"moe-serve: signal {signum}: cancelled submitit job(s) {', '.join(jobs) or '(none submitted yet)'}",
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def job_ids(submitit_dir: Path) -> list[str]:
    """The ids of the jobs submitted into ``submitit_dir`` (``12345``, or ``12345_0`` for an array task)."""
    if not submitit_dir.is_dir():
        return []
    return sorted(p.name for p in submitit_dir.iterdir() if p.is_dir() and p.name.split("_")[0].isdigit())


def cancel(kind: str, submitit_dir: Path, job_id: str, wait_s: float = 10.0) -> None:
    """Cancel one job; a local one is waited for (up to ``wait_s``) until its tasks are gone."""
    if kind == "submitit_slurm":
        import submitit

        submitit.SlurmJob(submitit_dir / job_id, job_id).cancel(check=False)
        return
    controller = int(job_id)
    _kill(controller, signal.SIGINT)  # LocalJob.cancel: the controller interrupts, then kills, its tasks
    deadline = time.monotonic() + wait_s
    while _running(controller) and time.monotonic() < deadline:
        time.sleep(0.1)


def _rank0_pid(sweep_dir: Path) -> int | None:
    for path in sorted(sweep_dir.glob(f"*/{PID_FILE}")):
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (the controller is our child: submitit reaps it later)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
