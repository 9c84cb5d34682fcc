"""Dispatchers: how routed rows reach their experts and come back (``LocalDispatcher`` is the reference).

``AllToAllDispatcher`` (exact-size ``all_to_all_single``) and ``AllGatherDispatcher`` (static shapes) run
expert parallelism over a process group wrapped in ``EPComm``; ``cost_model`` predicts their time.
"""

from all_to_all.allgather import AllGatherDispatcher, AllGatherMeta
from all_to_all.alltoall import AllToAllDispatcher, AllToAllMeta
from all_to_all.comm import CollectiveError, CommStats, EPComm
from all_to_all.dispatcher import Dispatcher, LocalDispatcher, LocalMeta, inverse_permutation, weighted_sum
from all_to_all.slots import SlotTable, assign_slots

__all__ = [
    "AllGatherDispatcher", "AllGatherMeta", "AllToAllDispatcher", "AllToAllMeta", "CollectiveError", "CommStats",
    "Dispatcher", "EPComm", "LocalDispatcher", "LocalMeta", "SlotTable", "assign_slots", "inverse_permutation",
    "weighted_sum",
]
