"""The cheap check that a cache's manifest describes the files beside it: rows, seq_len and top-k against the
fields, each shard's HDF5 header (datasets, shapes, dtypes) against the manifest, the shard list against the
shard files present, and the teacher files. Metadata only, no row is read: every command that opens a cache
runs it (load_manifest), and `tcache verify` reports the same problems next to its byte and value checks."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tcache.errors import TcacheError
from tcache.teachercache import schema
from tcache.teachercache.manifest import Manifest, ShardInfo

NEEDED_TEACHER_FILES = (f"{schema.TEACHER_DIR}/config.json", schema.EMBEDDINGS_FILE)
"""What every tcache build writes under teacher/ and a student cannot be made without (config, embedding, head)."""
SHARD_GLOB = "shard-*.h5"
MAX_NAMED = 3  # file names listed in one line before "and N more"


def fix(root: Path) -> str:
    """The one thing a user can do about a cache whose files and manifest disagree."""
    return f"run `tcache verify {root}` for the full report, then rebuild the cache"


def _names(names: list[str]) -> str:
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more


def field_problems(m: Manifest) -> list[str]:
    """The manifest against itself: the fields a reader needs are there, and their row shapes are what seq_len
    and top_k make (an edited seq_len or row shape would otherwise be read as rows of another length)."""
    problems = []
    missing = [name for name in (schema.INPUT_IDS, schema.TOPK_LOGPROBS, schema.TOPK_IDS) if name not in m.fields]
    if missing:
        problems.append(f"fields has no {', '.join(missing)}")
    if m.hidden_groups and schema.HIDDEN not in m.fields:
        problems.append(f"fields has no hidden, but hidden_groups is {m.hidden_groups}")
    all_specs = m.field_specs()  # each a dtype and a row shape of positive ints: read_manifest checked them
    specs = {name: all_specs[name] for name in schema.FIELDS if name in all_specs}
    lengths = {spec.row_shape[0] for spec in specs.values()}
    if len(lengths) == 1 and m.seq_len not in lengths:  # seq_len edited (or every field): one problem, not five
        name, spec = next(iter(specs.items()))
        return problems + [f"seq_len is {m.seq_len}, but every field holds rows of {lengths.pop()} tokens "
                           f"({name} row shape {spec.row_shape})"]
    for name, spec in specs.items():
        topk = name in (schema.TOPK_LOGPROBS, schema.TOPK_IDS)
        want = (m.seq_len, m.top_k) if topk else (m.seq_len, *spec.row_shape[1:])
        if spec.row_shape != want:
            made = f"seq_len {m.seq_len} and top_k {m.top_k} make" if topk else f"seq_len {m.seq_len} makes"
            problems.append(f"{name} has row shape {spec.row_shape}, but {made} {want}")
    return problems


def listing_problems(root: Path, m: Manifest) -> list[str]:
    """The shard list against the shard files present, and the total rows against the listed shards'."""
    problems = []
    listed = {s.file for s in m.shards}
    unlisted = sorted(p.name for p in root.glob(SHARD_GLOB) if p.name not in listed)
    if not m.shards:
        held = f", but the directory holds {_names(unlisted)}" if unlisted else ""
        problems.append(f"shards is missing or empty{held}")
    elif unlisted:
        problems.append(f"shards does not list {_names(unlisted)}, in the cache beside it")
    rows = sum(s.rows for s in m.shards)
    if m.rows != rows:
        problems.append(f"rows is {m.rows}, its shards hold {rows}")
    return problems


def manifest_problems(root: Path, m: Manifest) -> list[str]:
    """Everything about the manifest as a whole that `tcache verify` reports beside its per-file checks, each
    worded to follow "manifest.json: " ("rows is 100, its shards hold 62")."""
    return field_problems(m) + listing_problems(root, m)


def teacher_problems(root: Path, m: Manifest, needed: bool = False) -> dict[str, str]:
    """Teacher file -> what is wrong with its presence: listed in the manifest but missing; with `needed`, also
    each NEEDED_TEACHER_FILES entry the manifest does not list (a build of this tcache lists all of them)."""
    problems = {rel: "missing" for rel in sorted(m.teacher_files) if not (root / rel).is_file()}
    for rel in NEEDED_TEACHER_FILES if needed else ():
        if rel not in m.teacher_files:
            there = (root / rel).is_file()
            problems[rel] = "not listed in manifest.json" + ("" if there else ", and missing")
    return problems


def header_problems(f: h5py.File, m: Manifest, shard: ShardInfo) -> tuple[list[str], set[str]]:
    """A shard's datasets against the manifest, from the HDF5 header alone: (problems, fields that passed)."""
    problems, passed = [], set()
    specs = m.field_specs()
    for name in sorted(specs, key=lambda n: (schema.FIELDS + (n,)).index(n)):  # input_ids first, as users read them
        spec = specs[name]
        if name not in f:
            problems.append(f"dataset {name} missing")
            continue
        d = f[name]
        want = (shard.rows, *spec.row_shape)
        if not isinstance(d, h5py.Dataset) or d.shape != want:
            problems.append(f"{name} has shape {getattr(d, 'shape', None)}, manifest says {want}")
        elif d.dtype != np.dtype(spec.storage_dtype):
            problems.append(f"{name} stored as {d.dtype}, manifest says {spec.storage_dtype}")
        else:
            passed.add(name)
    return problems, passed


def check_consistency(root: Path, m: Manifest) -> None:
    """Raise TcacheError naming the first place where the manifest and the files disagree. load_manifest runs it
    after its own presence and size checks of the listed shards; it opens each shard's HDF5 header only (about
    2 ms a shard: a second for a cache of 512M tokens in 1,024-row shards of 512)."""
    for problem in manifest_problems(root, m):
        raise TcacheError(f"{root}: manifest.json: {problem}; {fix(root)}")
    for rel, problem in teacher_problems(root, m).items():
        raise TcacheError(f"{root}: {rel} is {problem} (manifest.json lists it); {fix(root)}")
    for shard in m.shards:
        try:
            with h5py.File(root / shard.file, "r") as f:
                problems = header_problems(f, m, shard)[0]
        except OSError as e:
            problems = [f"does not open as HDF5 ({str(e).splitlines()[0]})"]
        if problems:
            raise TcacheError(f"{root}: shard {shard.file}: {problems[0]}; {fix(root)}")
