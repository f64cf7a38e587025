"""Reading a cache: CacheReader (random access to rows, trusting only what the manifest lists) and
ShardHasher (the manifest's sha256 checks, run in the background while rows are read)."""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from tcache.teachercache import schema
from tcache.errors import TcacheError
from tcache.teachercache.manifest import Manifest, load_manifest


class CacheReader:
    """Rows by global index across shards. Opens shard files lazily, so it is cheap to create
    in each worker process of a DataLoader (h5py handles must not cross a fork)."""

    def __init__(self, cache_dir: str | os.PathLike, fields: tuple[str, ...] = schema.FIELDS):
        self.root = Path(cache_dir)
        self.manifest: Manifest = load_manifest(self.root)
        self.fields = tuple(f for f in fields if f in self.manifest.fields)
        self._starts = np.cumsum([0] + [s.rows for s in self.manifest.shards]).tolist()
        self._files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return self.manifest.rows

    def _shard(self, i: int) -> h5py.File:
        if i not in self._files:
            self._files[i] = h5py.File(self.root / self.manifest.shards[i].file, "r")
        return self._files[i]

    def _read_error(self, shard: int, e: Exception) -> TcacheError:
        """h5py's OSError / KeyError -> one line that names the shard, the only thing a user can act on."""
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        return TcacheError(
            f"{self.root}: shard {self.manifest.shards[shard].file} cannot be read ({detail}); "
            f"run `tcache verify {self.root}` and rebuild the cache"
        )

    def where(self, row: int) -> str:
        """`shard shard-00001.h5 row 3`: a global row as a user finds it on disk (for error messages)."""
        shard, local = self.locate(row)
        return f"shard {self.manifest.shards[shard].file} row {local}"

    def locate(self, row: int) -> tuple[int, int]:
        """Global row -> (shard index, row within shard)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} rows")
        shard = bisect.bisect_right(self._starts, row) - 1
        return shard, row - self._starts[shard]

    def row(self, row: int) -> dict[str, np.ndarray]:
        shard, local = self.locate(row)
        try:
            f = self._shard(shard)
            return {name: f[name][local] for name in self.fields}
        except (OSError, KeyError) as e:
            raise self._read_error(shard, e) from None

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """A contiguous slice of rows (may span shards)."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.fields}
        row = start
        while row < stop:
            shard, local = self.locate(row)
            take = min(stop - row, self.manifest.shards[shard].rows - local)
            try:
                f = self._shard(shard)
                for name in self.fields:
                    parts[name].append(f[name][local:local + take])
            except (OSError, KeyError) as e:
                raise self._read_error(shard, e) from None
            row += take
        return {name: np.concatenate(p) for name, p in parts.items()}

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest."""
        for shard in self.manifest.shards:
            digest = hash_file(self.root / shard.file)
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


HASH_BLOCK = 1 << 22


def hash_file(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None,
              stop: threading.Event | None = None) -> str | None:
    """sha256 of a file read in 4 MiB blocks; hashlib and file reads release the GIL, so this runs
    alongside Python work in other threads. Returns None when `stop` is set before the end."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_BLOCK):
            if stop is not None and stop.is_set():
                return None
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


class ShardHasher:
    """Checks every shard's sha256 against the manifest in a daemon thread, so that a long run pays no
    start-up time for the check and still learns of a corrupt cache (load_manifest checks sizes and HDF5
    headers, not bytes).

        hasher = ShardHasher(cache_dir, manifest)
        ...  # each step (cheap, never blocks):
        hasher.check()      # raises TcacheError once a shard is found bad
        ...  # at the end:
        hasher.wait()       # blocks until every shard is hashed, then check()
        hasher.close()      # or stop early

    Shards are hashed in manifest order; hashing stops at the first bad one.
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: Manifest | None = None):
        self.root = Path(cache_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.root)
        self.checked = 0  # shards whose sha256 matched
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcache-shard-hasher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for shard in self.manifest.shards:
            try:
                digest = hash_file(self.root / shard.file, stop=self._stop)
            except OSError as e:
                self._error = (f"{self.root}: shard {shard.file} cannot be read ({e.strerror or e}); "
                               f"run `tcache verify {self.root}` and rebuild")
                return
            if digest is None:  # closed
                return
            if digest != shard.sha256:
                self._error = (f"{self.root}: shard {shard.file} fails its sha256 check (the file changed after "
                               f"the build); run `tcache verify {self.root}` and rebuild")
                return
            self.checked += 1

    @property
    def done(self) -> bool:
        """True once the thread has finished: every shard hashed, a bad one found, or closed."""
        return not self._thread.is_alive()

    def check(self) -> None:
        """Raise the TcacheError of the first bad shard, if one has been found yet; never blocks."""
        if self._error is not None:
            raise TcacheError(self._error)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every shard is hashed (or `timeout` seconds pass), then check()."""
        self._thread.join(timeout)
        self.check()

    def close(self) -> None:
        """Stop hashing (within one 4 MiB block) and join the thread; check() still reports what was found."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "ShardHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
