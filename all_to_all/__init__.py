"""Dispatchers: how routed rows reach their experts and come back (``LocalDispatcher`` is the reference)."""

from all_to_all.dispatcher import Dispatcher, LocalDispatcher, LocalMeta, unpermute_and_sum

__all__ = ["Dispatcher", "LocalDispatcher", "LocalMeta", "unpermute_and_sum"]
