"""CacheWriter: appends packed rows to HDF5 shards; the manifest is written last and makes the cache real.

Visibility rules (so that nothing half-written ever looks like a cache):
- a shard is written as `shard-NNNNN.h5.partial` and renamed once it is complete and closed;
- manifest.json is written (via a temporary file and an atomic rename) only on a clean exit;
- on any exception inside the `with` block, every file this writer created is removed.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np

from teachercache import schema
from teachercache.schema import FieldSpec, Manifest, ShardInfo


class CacheWriter:
    def __init__(self, out_dir: str | os.PathLike, manifest: Manifest):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.specs: dict[str, FieldSpec] = manifest.field_specs()
        self.rows_per_shard = manifest.rows_per_shard
        self._file: h5py.File | None = None
        self._rows_in_shard = 0
        self._created: list[Path] = []
        self._created_dir = False
        self.bytes_written = 0
        # Hashing a finished shard (GBs) overlaps the writing of the next; hashlib releases the GIL.
        self._hasher = ThreadPoolExecutor(max_workers=2)
        self._hashes: list[Future] = []

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
            self._created_dir = True
        (self.out_dir / schema.TEACHER_DIR).mkdir(exist_ok=True)
        self._created.append(self.out_dir / schema.TEACHER_DIR)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
                self._write_manifest()
        finally:
            self._hasher.shutdown(wait=True)
            if exc_type is not None:
                self._abort()

    # -- rows ------------------------------------------------------------------------------------
    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append a batch of rows: every field of the schema, leading dimension = rows."""
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
                    part = part.view(store)  # int16 bits of uint16 ids (schema.encode_fields)
                self._file[name][lo:hi] = part.astype(store, copy=False)
                self.bytes_written += take * spec.bytes_per_row
            self._rows_in_shard = hi
            start += take
            if self._rows_in_shard == self.rows_per_shard:
                self._close_shard()

    def finish(self) -> None:
        """Close the last shard and wait for every shard's hash (idempotent); the manifest follows on exit."""
        self._close_shard()
        for info, fut in zip(self.manifest.shards, self._hashes):
            info.sha256 = fut.result()

    def add_teacher_file(self, relpath: str) -> Path:
        """Register a file the caller writes under the cache (teacher config, tokenizer, embeddings)."""
        path = self.out_dir / relpath
        self._created.append(path)
        return path

    # -- internals -------------------------------------------------------------------------------
    def _shard_path(self) -> Path:
        return self.out_dir / schema.shard_name(len(self.manifest.shards))

    def _open_shard(self) -> None:
        partial = self._shard_path().with_name(self._shard_path().name + schema.PARTIAL_SUFFIX)
        self._created.append(partial)
        # track_times=False keeps shards byte-identical across identical builds (no timestamps).
        f = h5py.File(partial, "w", track_order=False)
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
        rows = self._rows_in_shard
        for name in self.specs:
            if self._file[name].shape[0] != rows:
                self._file[name].resize(rows, axis=0)
        self._file.close()
        self._file = None
        final = self._shard_path()
        partial = final.with_name(final.name + schema.PARTIAL_SUFFIX)
        os.replace(partial, final)
        self._created.append(final)
        self.manifest.shards.append(ShardInfo(file=final.name, rows=rows, bytes=final.stat().st_size, sha256=""))
        self._hashes.append(self._hasher.submit(schema.sha256_file, final))
        self.manifest.rows += rows
        self.manifest.tokens += rows * self.manifest.seq_len

    def _write_manifest(self) -> None:
        for rel in sorted(self._teacher_relpaths()):
            self.manifest.teacher_files[rel] = schema.sha256_file(self.out_dir / rel)
        tmp = self.out_dir / (schema.MANIFEST_FILE + schema.PARTIAL_SUFFIX)
        tmp.write_text(self.manifest.to_json())
        os.replace(tmp, self.out_dir / schema.MANIFEST_FILE)

    def _teacher_relpaths(self) -> list[str]:
        root = self.out_dir / schema.TEACHER_DIR
        return [p.relative_to(self.out_dir).as_posix() for p in root.rglob("*") if p.is_file()]

    def _abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # the original exception matters more than a close failure
                pass
            self._file = None
        if self._created_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            return
        for path in reversed(self._created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        (self.out_dir / (schema.MANIFEST_FILE + schema.PARTIAL_SUFFIX)).unlink(missing_ok=True)
