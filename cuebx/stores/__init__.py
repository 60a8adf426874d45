"""Stores for task states, results and idempotency keys (see `cuebx.stores.base`)."""

from cuebx.stores.base import STORE_SCHEMES, KeyState, StatusWrite, Store, store_for_url

__all__ = ["STORE_SCHEMES", "KeyState", "StatusWrite", "Store", "store_for_url"]
