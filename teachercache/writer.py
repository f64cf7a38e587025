"""CacheWriter: appends packed rows to HDF5 shards; it owns the build state and the manifest, written last.

Visibility rules (nothing half-written ever looks like a cache, and no complete shard is ever lost):
- a shard is written as `shard-NNNNN.h5.partial`, flushed to disk, and renamed once complete;
- `build-state.json` (atomic rewrite) lists every complete shard as soon as it is renamed: an
  interrupted build (an exception, Ctrl-C, SIGTERM, kill -9, a full disk) leaves the complete shards
  and this state, which `tcache build --resume` continues from; a shard file it does not list is redone;
- manifest.json is written (via a temporary file and an atomic rename) only on a clean exit; the build
  state is removed after it. Only a directory with manifest.json is a cache.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from tcache.teachercache import schema
from tcache import ownership
from tcache.errors import TcacheError
from tcache.writefaults import is_disk_full
from tcache.outdir import BUILD_STATE, free_bytes, fsync_dir
from tcache.teachercache.manifest import Manifest, ShardInfo
from tcache.teachercache.reader import hash_file
from tcache.teachercache.schema import FieldSpec

STATE_FORMAT = "tcache-build-state"
CACHE_ENTRIES = (schema.MANIFEST_FILE, BUILD_STATE, "config.yaml", schema.TEACHER_DIR)
"""The entries of a cache besides its shards (listed in tcache's marker when a build claims its directory)."""


@dataclass
class BuildState:
    """What a resumed build must match (identity) and what an interrupted one already wrote (shards)."""

    identity: dict[str, Any]
    """The options, teacher and data that determine the shards' bytes; a resume must match all of them."""
    batch_size: int
    """Rows per teacher forward, as resolved (an automatic choice is kept: batches shape the bytes)."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Complete shards in order, as ShardInfo dicts (sha256 "" until hashed)."""
    format: str = STATE_FORMAT

    def save(self, out_dir: Path) -> None:
        tmp = out_dir / (BUILD_STATE + schema.PARTIAL_SUFFIX)
        with open(tmp, "w") as f:
            f.write(json.dumps(asdict(self), indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / BUILD_STATE)

    @classmethod
    def load(cls, out_dir: Path) -> "BuildState":
        path = out_dir / BUILD_STATE
        try:
            raw = json.loads(path.read_text())
            state = cls(**raw)
        except (OSError, ValueError, TypeError) as e:
            raise TcacheError(f"{path} is unreadable ({type(e).__name__}); start over with --overwrite") from None
        if state.format != STATE_FORMAT:
            raise TcacheError(f"{path} is not a tcache build state; start over with --overwrite")
        return state


def _quiet_hdf5_disk_full() -> None:
    """h5py reports a failed flush while freeing a dataset or file as an 'Exception ignored in ...
    __dealloc__' traceback per object (119 of them were seen for one full disk); the writer raises one
    clear error for the full disk, so these echoes are dropped. Other unraisable errors pass through."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_tcache", False):
        return

    def hook(unraisable) -> None:
        if is_disk_full(unraisable.exc_value) and "h5py" in repr(unraisable.object) + str(unraisable.err_msg):
            return
        previous(unraisable)

    hook._tcache = True
    sys.unraisablehook = hook


class CacheWriter:
    def __init__(self, out_dir: str | os.PathLike, manifest: Manifest, state: BuildState):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.state = state
        self.specs: dict[str, FieldSpec] = manifest.field_specs()
        self.rows_per_shard = manifest.rows_per_shard
        self._file: h5py.File | None = None
        self._unclosed = False  # an HDF5 file that a full disk kept from closing
        self._rows_in_shard = 0
        self.bytes_written = 0
        self._state_lock = threading.Lock()
        # Hashing a finished shard (GBs) overlaps the writing of the next; hashlib releases the GIL.
        self._hasher = ThreadPoolExecutor(max_workers=2)
        self._hashes: list[Future] = []

    @property
    def rows_done(self) -> int:
        """Rows in complete shards (a resumed build starts after them)."""
        return self.manifest.rows

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        _quiet_hdf5_disk_full()
        ownership.claim(self.out_dir, "cache", CACHE_ENTRIES)
        (self.out_dir / schema.TEACHER_DIR).mkdir(exist_ok=True)
        self._adopt_complete_shards()
        self._save_state()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
                self._write_manifest()
                (self.out_dir / BUILD_STATE).unlink(missing_ok=True)
                ownership.seal(self.out_dir)
        finally:
            self._hasher.shutdown(wait=True)
            if exc_type is not None:
                self._abort()

    # -- rows ------------------------------------------------------------------------------------
    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append a batch of rows: every field of the schema, leading dimension = rows."""
        try:
            self._add(batch)
        except OSError as e:
            if is_disk_full(e):
                self._discard_open_shard()
                raise self.disk_full_error() from None
            raise

    def disk_full_error(self) -> TcacheError:
        e = TcacheError(
            f"--out {self.out_dir}: the disk is full ({free_bytes(self.out_dir) / 2**20:.0f} MiB free) after "
            f"{len(self.manifest.shards)} complete shard(s), which are kept; free space, then rerun with --resume")
        # An HDF5 file that could not be closed is flushed again at interpreter exit, which crashed the
        # process (segmentation fault): the CLI then ends the process at once, after its one line.
        e.hdf5_unclosed = self._unclosed
        return e

    def _add(self, batch: Mapping[str, np.ndarray]) -> None:
        n = len(batch[schema.INPUT_IDS])
        for name, spec in self.specs.items():
            arr = batch[name]
            if arr.shape != (n, *spec.row_shape):
                raise ValueError(f"field {name}: got shape {arr.shape}, schema wants {(n, *spec.row_shape)}")
        start = 0
        while start < n:
            if self._file is None:
                self._open_shard()
            take = min(n - start, self.rows_per_shard - self._rows_in_shard)
            lo, hi = self._rows_in_shard, self._rows_in_shard + take
            for name, spec in self.specs.items():
                part = batch[name][start:start + take]
                store = np.dtype(spec.storage_dtype)
                if part.dtype != store and part.dtype.kind in "iu" and part.dtype.itemsize == store.itemsize:
                    part = part.view(store)  # int16 bits of uint16 ids (codecs.encode_fields)
                self._file[name][lo:hi] = part.astype(store, copy=False)
                self.bytes_written += take * spec.bytes_per_row
            self._rows_in_shard = hi
            start += take
            if self._rows_in_shard == self.rows_per_shard:
                self._close_shard()

    def finish(self) -> None:
        """Close the last shard and wait for every shard's hash (idempotent); the manifest follows on exit."""
        try:
            self._close_shard()
        except OSError as e:
            if is_disk_full(e):
                self._discard_open_shard()
                raise self.disk_full_error() from None
            raise
        for fut in self._hashes:
            fut.result()
        for info in self.manifest.shards:
            if not info.sha256:  # adopted from a resumed state before its hash was recorded
                info.sha256 = hash_file(self.out_dir / info.file)

    def add_teacher_file(self, relpath: str) -> Path:
        """Where the caller writes a teacher file under the cache (config, tokenizer, embeddings)."""
        return self.out_dir / relpath

    # -- internals -------------------------------------------------------------------------------
    def _adopt_complete_shards(self) -> None:
        """Resume: keep the shards the state lists (present, of the recorded size, and rehashed: of the recorded
        sha256, or hashed now where the stop came before its hash was recorded); remove every other shard
        file (an unlisted one was renamed but not recorded before the stop: it is redone)."""
        listed = {s["file"] for s in self.state.shards}
        for p in self.out_dir.glob("shard-*.h5*"):
            if p.name not in listed:
                p.unlink()
        for s in self.state.shards:
            path = self.out_dir / s["file"]
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                raise TcacheError(f"--resume: {path} is missing or changed since it was written; "
                                  "start over with --overwrite")
            digest = hash_file(path)
            if s["sha256"] and digest != s["sha256"]:
                raise TcacheError(f"--resume: shard {path} changed since it was written (its sha256 differs from "
                                  "the build state's); start over with --overwrite")
            s = {**s, "sha256": digest}  # the manifest records what was checked here
            self.manifest.shards.append(ShardInfo(**s))
            self.manifest.rows += s["rows"]
            self.manifest.tokens += s["rows"] * self.manifest.seq_len

    def _save_state(self) -> None:
        with self._state_lock:
            self.state.shards = [asdict(s) for s in self.manifest.shards]
            self.state.save(self.out_dir)

    def _shard_path(self) -> Path:
        return self.out_dir / schema.shard_name(len(self.manifest.shards))

    def _open_shard(self) -> None:
        # A shard is only started with room for all of it: HDF5 handles ENOSPC badly (errors from every
        # dataset's dealloc, a crash at exit), so another writer filling the disk is caught here instead.
        need = int(self.rows_per_shard * sum(s.bytes_per_row for s in self.specs.values()) * 1.02) + 2**20
        if free_bytes(self.out_dir) < need and os.environ.get("TCACHE_NO_SPACE_CHECK") != "1":
            raise self.disk_full_error()
        partial = self._shard_path().with_name(self._shard_path().name + schema.PARTIAL_SUFFIX)
        ownership.register(self.out_dir, self._shard_path().name)  # listed before it exists
        # track_times=False keeps shards byte-identical across identical builds (no timestamps).
        # No chunk cache (rows are written once, in order): a write that meets a full disk then fails in the
        # write call, not later while h5py frees the dataset, where the error cannot be caught.
        f = h5py.File(partial, "w", track_order=False, rdcc_nbytes=0)
        for name, spec in self.specs.items():
            f.create_dataset(
                name,
                shape=(self.rows_per_shard, *spec.row_shape),
                maxshape=(None, *spec.row_shape),
                dtype=spec.storage_dtype,
                chunks=spec.chunks,
                track_times=False,
            )
        f.attrs["format"] = schema.FORMAT_NAME
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        self._file = f
        self._rows_in_shard = 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        f = self._file
        rows = self._rows_in_shard
        for name in self.specs:
            if f[name].shape[0] != rows:
                f[name].resize(rows, axis=0)
        f.close()
        self._file = None
        final = self._shard_path()
        partial = final.with_name(final.name + schema.PARTIAL_SUFFIX)
        with open(partial, "rb") as fh:  # on disk before it is listed: a power loss cannot list a torn shard
            os.fsync(fh.fileno())
        os.replace(partial, final)
        fsync_dir(self.out_dir)
        info = ShardInfo(file=final.name, rows=rows, bytes=final.stat().st_size, sha256="")
        self.manifest.shards.append(info)
        self.manifest.rows += rows
        self.manifest.tokens += rows * self.manifest.seq_len
        self._save_state()
        self._hashes.append(self._hasher.submit(self._hash, info))

    def _hash(self, info: ShardInfo) -> None:
        info.sha256 = hash_file(self.out_dir / info.file)
        self._save_state()

    def _write_manifest(self) -> None:
        for rel in sorted(self._teacher_relpaths()):
            self.manifest.teacher_files[rel] = hash_file(self.out_dir / rel)
        tmp = self.out_dir / (schema.MANIFEST_FILE + schema.PARTIAL_SUFFIX)
        tmp.write_text(self.manifest.to_json())
        os.replace(tmp, self.out_dir / schema.MANIFEST_FILE)
        fsync_dir(self.out_dir)

    def _teacher_relpaths(self) -> list[str]:
        root = self.out_dir / schema.TEACHER_DIR
        return [p.relative_to(self.out_dir).as_posix() for p in root.rglob("*") if p.is_file()]

    def _discard_open_shard(self) -> None:
        """Close the incomplete shard after a full disk. HDF5 cannot close a file whose metadata it cannot
        flush, and retries at every later dealloc and at exit, where it crashed the process (segmentation
        fault, "Exception ignored in h5py ... __dealloc__"). Emptying the file first frees its space, so the
        close (a few KiB of metadata) succeeds; the file is then deleted."""
        f, self._file = self._file, None
        if f is None:
            return
        partial = self._shard_path().with_name(self._shard_path().name + schema.PARTIAL_SUFFIX)
        try:
            os.truncate(partial, 0)
        except OSError:
            pass
        try:
            f.close()
        except Exception:  # the disk-full error already on its way matters more
            self._unclosed = True
        partial.unlink(missing_ok=True)

    def _abort(self) -> None:
        """Keep what is resumable (complete shards, the state, teacher/); drop the incomplete shard."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # the original exception matters more than a close failure
                self._file = f
                self._discard_open_shard()
        for p in self.out_dir.glob(f"shard-*.h5{schema.PARTIAL_SUFFIX}"):
            p.unlink(missing_ok=True)
        (self.out_dir / (schema.MANIFEST_FILE + schema.PARTIAL_SUFFIX)).unlink(missing_ok=True)
