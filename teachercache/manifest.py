"""manifest.json: the record of what a cache holds (Manifest, ShardInfo), and its validated loading.

Only teachercache.writer writes a manifest (last, via a temporary file and an atomic rename); everything
that reads a cache starts with load_manifest (`tcache verify` with read_manifest, to report every problem).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tcache.errors import TcacheError
from tcache.teachercache.schema import (FORMAT_NAME, HIDDEN_SOURCE, MANIFEST_FILE, READABLE_VERSIONS,
                                        SCHEMA_VERSION, FieldSpec)


def fields_record(specs: dict[str, FieldSpec]) -> dict[str, dict[str, Any]]:
    """The manifest's `fields` entry for these specs (Manifest.field_specs reads it back)."""
    return {name: {"dtype": s.dtype, "row_shape": list(s.row_shape)} for name, s in specs.items()}


@dataclass
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Everything a reader needs to trust and interpret a cache. Serialised as manifest.json."""

    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    # One source: its DataSpec.describe() (path, config, split, text_field). A mixture (several --data):
    # {"mixture": [{path, config, split, text_field, weight, tokens}, ...]} in --data order, weight its share of
    # the budget (sum 1), tokens how many of the cache's tokens are its (sum = tokens; null if built by torchrun).
    dataset: dict[str, Any]
    vocab_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    top_k: int
    hidden_groups: int
    layer_groups: list[tuple[int, int]]
    rows_per_shard: int
    tokens_requested: int
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    teacher_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    tokens: int = 0
    rows: int = 0
    data_exhausted: bool = False
    build: dict[str, Any] = field(default_factory=dict)
    hidden_source: str = HIDDEN_SOURCE
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME

    def field_specs(self) -> dict[str, FieldSpec]:
        return {name: FieldSpec(f["dtype"], tuple(f["row_shape"])) for name, f in self.fields.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        d["layer_groups"] = [tuple(g) for g in d["layer_groups"]]
        return cls(**d)


def read_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """Read and validate manifest.json itself, trusting nothing it says about the files beside it (`tcache verify`
    starts here, to report those one by one); every failure is a one-line TcacheError that says what to do."""
    path = Path(cache_dir)
    if not path.is_dir():
        raise TcacheError(f"{path} is not a directory; pass the --out directory of a `tcache build`")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise TcacheError(
            f"{path} is not a tcache cache (no {MANIFEST_FILE}; an interrupted build leaves none); "
            "run `tcache build` to create one"
        )
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TcacheError(f"{mpath} is not valid JSON ({e.msg}); rebuild the cache with `tcache build`") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise TcacheError(f"{mpath} is not a tcache manifest; point at a directory made by `tcache build`")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise TcacheError(
            f"{path} has cache schema version {version}, this tcache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
            "rebuild the cache with this version's `tcache build` (or install the tcache that wrote it)"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (TypeError, KeyError) as e:
        raise TcacheError(f"{mpath} is incomplete or corrupt ({e}); rebuild the cache with `tcache build`") from None
    _check_types(mpath, manifest)
    return manifest


_COUNTS = ("vocab_size", "hidden_size", "num_layers", "seq_len", "top_k", "hidden_groups", "rows_per_shard", "rows",
           "tokens")


def _check_types(mpath: Path, m: Manifest) -> None:
    """Every count the readers compute with is an integer, every shard a file name, every field a dtype and a
    row shape (an edited "64" would otherwise end in a TypeError far from here)."""
    values = [(k, getattr(m, k)) for k in _COUNTS]
    values += [(f"shards[{i}].{k}", getattr(s, k)) for i, s in enumerate(m.shards) for k in ("rows", "bytes")]
    for key, v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise TcacheError(f"{mpath}: {key} is {v!r}, not a count; run `tcache verify {mpath.parent}`, "
                              "then rebuild the cache")
    for i, s in enumerate(m.shards):
        if not isinstance(s.file, str) or "/" in s.file:
            raise TcacheError(f"{mpath}: shards[{i}].file is {s.file!r}, not a shard file name; "
                              f"run `tcache verify {mpath.parent}`, then rebuild the cache")
    for name, f in m.fields.items():
        shape = f.get("row_shape") if isinstance(f, dict) else None
        if not (isinstance(shape, list) and all(isinstance(n, int) and n > 0 for n in shape)
                and isinstance(f.get("dtype"), str)):
            raise TcacheError(f"{mpath}: fields.{name} is {f!r}, not a dtype and a row_shape; "
                              f"run `tcache verify {mpath.parent}`, then rebuild the cache")


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """The manifest of a cache whose files it describes: read_manifest, then every listed shard present at its
    size, and the manifest consistent with the shards' HDF5 headers and the files present
    (teachercache.consistency, metadata only). Every failure is one line naming the file and what to do."""
    path = Path(cache_dir)
    manifest = read_manifest(path)
    for shard in manifest.shards:
        spath = path / shard.file
        if not spath.is_file():
            raise TcacheError(f"{path}: shard {shard.file} listed in the manifest is missing; rebuild the cache")
        if spath.stat().st_size != shard.bytes:
            raise TcacheError(
                f"{path}: shard {shard.file} has {spath.stat().st_size} bytes, the manifest says {shard.bytes}; "
                "the cache was modified or truncated, rebuild it"
            )
    # imported here: consistency builds on Manifest (and h5py is needed only once a cache is opened)
    from tcache.teachercache.consistency import check_consistency

    check_consistency(path, manifest)
    return manifest
