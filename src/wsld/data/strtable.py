"""A compact, fork-friendly table of strings.

A list of a million Python strings is a million refcounted objects: every DataLoader worker that
touches them dirties the copy-on-write pages it inherited, and memory grows with the number of
workers. One bytes blob plus a numpy offset array has no per-item objects at all.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class StringTable:
    """Immutable sequence of strings stored as one UTF-8 blob (undecodable names round-trip)."""

    def __init__(self, strings: Iterable[str]):
        enc = [s.encode("utf-8", "surrogateescape") for s in strings]
        self._blob = b"".join(enc)
        self._offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        if enc:
            np.cumsum([len(e) for e in enc], out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, i: int) -> bytes:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self._blob[int(self._offsets[i]) : int(self._offsets[i + 1])]

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode("utf-8", "surrogateescape")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
