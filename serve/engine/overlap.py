"""Overlapped steps: the forward pass of step N computes while the engine plans step N+1 and finishes step N's
outputs (SGLang's overlap scheduler, vLLM's async scheduling).

Step N+1 is scheduled before step N's tokens exist: each sequence that samples in a launched step gets a *pending
token* appended, a negative placeholder ``-(j + 1)`` naming its row ``j`` among the step's sampled rows, so the
scheduler and the block manager see the sequence one token further on. When step N's logits arrive the engine
samples them, puts the tokens in place of the placeholders, and writes them into step N+1's input ids
(``model_runner.fill_pending``, or the C step itself) before launching it. A sequence that then stops on that token
(EOS, a stop string) has one wasted row in step N+1, whose token is dropped; one that reaches ``max_tokens`` is not
scheduled again.

What computes concurrently is a step of the fused C decode (``ModelRunner.stage``: laid out while the previous step
computes, launched onto its own C thread, which never needs the GIL); other steps (prefill chunks, the torch path)
are computed when launched, the plan of the next step then simply coming first. Only reads happen out of order: a
step reads K/V that earlier steps wrote, and a block that a stopped or preempted sequence frees while a step still
writes into it is given to another sequence only by a later step, whose writes come after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from serve.engine.model_runner import StepInputs
from serve.engine.sequence import Sequence


@dataclass
class PlannedStep:
    """A scheduled step laid out for the runner: its sequences, their new tokens, host inputs, and the runner's
    staged step (``ModelRunner.stage``: ``launch()`` starts it)."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    inputs: StepInputs
    staged: Any


class LaunchedStep:
    """A planned step whose forward pass was started: ``wait()`` gives ``(logits, seconds computed)``."""

    def __init__(self, step: PlannedStep, pending) -> None:
        self.step, self.pending = step, pending

    def wait(self) -> tuple[torch.Tensor, float]:
        return self.pending.wait()
