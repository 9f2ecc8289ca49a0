"""Byte-bounded LRU caches keyed by content (no torch; used by LocalBackend and the worker).

``SessionCache`` keeps engine slice sessions (image embeddings plus the
key/value cache of the turns fed so far) keyed by the image digest and the
content keys of the fed turns (see ``protocol.turn_digest``). ``take`` hands a
session out exclusively (it leaves the cache), so two callers never mutate the
same session; ``put`` gives it back under the keys of what it now holds.

``ImageStore`` keeps decoded slices by digest so a client may send an image it
already sent by digest only.

Neither is thread-safe by itself beyond its own lock; callers that mutate a
taken session do so outside the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Sequence, Tuple


def common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LRUBytes:
    """Generic LRU mapping with a byte budget. Items larger than the budget are not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key, default=None):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return default
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key, default=None):
        """The value without touching recency or statistics."""
        with self._lock:
            item = self._items.get(key)
            return default if item is None else item[0]

    def pop(self, key, default=None):
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return default
            self._bytes -= item[1]
            return item[0]

    def put(self, key, value, nbytes: int) -> bool:
        """Insert (most recent); evicts least recent items to fit. False if not kept."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return False
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size
                self.evictions += 1
            return True

    def keys(self):
        with self._lock:
            return list(self._items.keys())

    def clear(self):
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


@dataclass
class CachedSession:
    image_key: str
    turn_keys: Tuple[str, ...]
    session: Any


class SessionCache:
    """LRU of engine sessions; find the one sharing the longest conversation prefix."""

    def __init__(self, max_bytes: int):
        self._lru = LRUBytes(max_bytes)
        self._lock = threading.Lock()
        self._serial = 0
        self.reused_turns = 0
        self.fed_turns = 0

    @property
    def max_bytes(self) -> int:
        return self._lru.max_bytes

    def take(
        self, image_key: str, turn_keys: Sequence[str], *, steal_diverging: bool = True
    ) -> Tuple[Optional[CachedSession], int]:
        """Remove and return the session of ``image_key`` whose fed turns share the
        longest prefix with ``turn_keys``, and that prefix's length.

        A session holding turns beyond the shared prefix (an undo or a branch)
        is returned too when the shared prefix is non-empty, or when
        ``steal_diverging``; the caller truncates it. Returns (None, 0) when no
        session of that image is cached.
        """
        turn_keys = tuple(turn_keys)
        with self._lock:
            best = None
            best_n = -1
            best_extra = 0
            for key in self._lru.keys():
                if key[0] != image_key:
                    continue
                entry: CachedSession = self._lru.peek(key)
                if entry is None:
                    continue
                n = common_prefix(entry.turn_keys, turn_keys)
                extra = len(entry.turn_keys) - n  # turns that would be thrown away
                if n == 0 and extra and not steal_diverging:
                    continue
                if n > best_n or (n == best_n and extra < best_extra):
                    best, best_n, best_extra = key, n, extra
            if best is None:
                self._lru.misses += 1
                return None, 0
            entry = self._lru.pop(best)
            self._lru.hits += 1
            return entry, best_n

    def put(self, image_key: str, turn_keys: Sequence[str], session: Any, nbytes: int) -> bool:
        with self._lock:
            self._serial += 1
            key = (image_key, self._serial)
            return self._lru.put(key, CachedSession(image_key, tuple(turn_keys), session), nbytes)

    def clear(self):
        with self._lock:
            self._lru.clear()

    def stats(self) -> dict:
        s = self._lru.stats()
        s["reused_turns"] = self.reused_turns
        s["fed_turns"] = self.fed_turns
        return s


class ImageStore(LRUBytes):
    """Decoded slices by digest (the worker's by-digest images)."""

    def put_image(self, digest: str, image) -> bool:
        return self.put(digest, image, int(image.nbytes))
