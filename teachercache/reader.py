"""CacheReader: random access to the rows of a cache, trusting only what the manifest lists."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import h5py
import numpy as np

from teachercache import schema
from teachercache.errors import TcacheError
from teachercache.schema import Manifest


class CacheReader:
    """Rows by global index across shards. Opens shard files lazily, so it is cheap to create
    in each worker process of a DataLoader (h5py handles must not cross a fork)."""

    def __init__(self, cache_dir: str | os.PathLike, fields: tuple[str, ...] = schema.FIELDS):
        self.root = Path(cache_dir)
        self.manifest: Manifest = schema.load_manifest(self.root)
        self.fields = tuple(f for f in fields if f in self.manifest.fields)
        self._starts = np.cumsum([0] + [s.rows for s in self.manifest.shards]).tolist()
        self._files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return self.manifest.rows

    def _shard(self, i: int) -> h5py.File:
        if i not in self._files:
            self._files[i] = h5py.File(self.root / self.manifest.shards[i].file, "r")
        return self._files[i]

    def locate(self, row: int) -> tuple[int, int]:
        """Global row -> (shard index, row within shard)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} rows")
        shard = bisect.bisect_right(self._starts, row) - 1
        return shard, row - self._starts[shard]

    def row(self, row: int) -> dict[str, np.ndarray]:
        shard, local = self.locate(row)
        f = self._shard(shard)
        return {name: f[name][local] for name in self.fields}

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """A contiguous slice of rows (may span shards)."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.fields}
        row = start
        while row < stop:
            shard, local = self.locate(row)
            take = min(stop - row, self.manifest.shards[shard].rows - local)
            f = self._shard(shard)
            for name in self.fields:
                parts[name].append(f[name][local:local + take])
            row += take
        return {name: np.concatenate(p) for name, p in parts.items()}

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest."""
        for shard in self.manifest.shards:
            digest = schema.sha256_file(self.root / shard.file)
            if digest != shard.sha256:
                raise TcacheError(f"{self.root}: shard {shard.file} fails its sha256 check; rebuild the cache")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # pickled into DataLoader workers without open handles
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
