"""Fair shares of the running batch between clients (issue 19: no request can stall the others).

A client is one HTTP request: its sub-requests (prompts x ``n``, up to ``server.max_sub_requests_per_request``)
carry the same ``Sequence.client``; a sequence without one is a client of its own. Two rules, both of which
change nothing while no client runs more than one sequence (the offline ``LLM``: first come, first served):

1. admission order: round-robin between clients, the client with the fewest running sequences first, ties in
   queue order (so preempted sequences, re-queued at the front, still come back first);
2. when the batch is full (``max_num_seqs``) and a waiting client runs at least two sequences fewer than the
   client running the most, the newest sequence of the latter is preempted to make room (recomputed later; its
   full blocks stay in the prefix cache). Each waiting client gains at most one seat per step, and no step
   preempts a sequence of a client for another that would then run as many.

Worked example: running a0 a1 a2 (client a) with ``max_num_seqs=3``; waiting, in queue order, a3 a4 b0 c0.
``victims`` -> [a2, a1] (seats for b and c; a keeps a0); preempted, they re-queue at the front: a1 a2 a3 a4 b0 c0;
``admission_order`` -> b0 (b runs 0), c0 (c runs 0), a1 (a runs 1), a2, a3, a4.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator

from serve.engine.sequence import Sequence


def client_of(seq: Sequence) -> object:
    return seq if seq.client is None else seq.client


def admission_order(waiting: Iterable[Sequence], running: Iterable[Sequence]) -> Iterator[Sequence]:
    """``waiting`` in the order to admit them (rule 1); lazy, but takes its snapshot of ``waiting`` at once."""
    if not waiting:  # most decode steps: nothing to order (and no counting of the running batch)
        return iter(())
    counts = Counter(client_of(s) for s in running)
    queues: dict[object, deque[tuple[int, Sequence]]] = {}
    for position, seq in enumerate(waiting):
        queues.setdefault(client_of(seq), deque()).append((position, seq))
    return _round_robin(list(queues.items()), counts)


def _round_robin(queues: list[tuple[object, deque[tuple[int, Sequence]]]], counts: Counter) -> Iterator[Sequence]:
    heap = [(counts[client], q[0][0], i) for i, (client, q) in enumerate(queues)]
    heapq.heapify(heap)
    while heap:
        count, _, i = heapq.heappop(heap)
        q = queues[i][1]
        yield q.popleft()[1]
        if q:  # counted as admitted: the client's next sequence comes after the clients running fewer
            heapq.heappush(heap, (count + 1, q[0][0], i))


def victims(waiting: Iterable[Sequence], running: list[Sequence], max_num_seqs: int,
            waits: Callable[[Sequence], bool]) -> list[Sequence]:
    """Running sequences to preempt so that waiting clients get a seat (rule 2); ``waits(seq)``: ``seq`` cannot be
    admitted yet (it waits for its prefix source)."""
    if not waiting:
        return []
    counts = Counter(client_of(s) for s in running)
    if not counts or max(counts.values()) < 2:
        return []
    free = max_num_seqs - len(running)
    clients: dict[object, int] = {}
    for position, seq in enumerate(waiting):
        if not waits(seq):
            clients.setdefault(client_of(seq), position)
    out: list[Sequence] = []
    for client in sorted(clients, key=lambda c: (counts[c], clients[c])):
        if free > 0:
            free -= 1
        else:
            top = max(counts, key=lambda c: counts[c])
            if counts[top] < counts[client] + 2:
                break
            victim = max((s for s in running if client_of(s) == top and s not in out), key=lambda s: s.arrival)
            out.append(victim)
            counts[top] -= 1
        counts[client] += 1
    return out
