"""Proof of what tcache wrote: the marker `.tcache-output.json` in every output directory tcache makes.

The marker names the kind of output (cache, run, export), the tcache version, and every top-level entry tcache
wrote there. It is written first, when tcache claims a directory (missing, empty, or already its own), and an
entry is listed *before* it is created, so an output interrupted at any point lists everything it holds of
tcache's; a listed name covers its `NAME.partial` temporary, and a listed folder (teacher/, checkpoints/) is
tcache's as a whole. `--overwrite` replaces only a marked directory and removes only what the marker lists;
a file name alone proves nothing (users also keep a `config.yaml` or a `metrics.jsonl`).

Outputs of tcache 0.1.0 before the marker (one-time migration): recognised by content only tcache writes (a
manifest, build state or student.json whose `format` is tcache's, a distill_config.json of a run, an export's
modeling file), and their tcache-written entries by the names that release wrote. Claiming one writes its marker.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import tcache
from tcache.errors import TcacheError

MARKER = ".tcache-output.json"
FORMAT = "tcache-output"
KINDS = ("cache", "run", "export")
PARTIAL = ".partial"

MANIFEST = "manifest.json"
BUILD_STATE = "build-state.json"
STUDENT = "student.json"

# What tcache 0.1.0 wrote, by kind: only ever consulted for an unmarked output proven to be tcache's by content.
_LEGACY = {
    "cache": re.compile(r"(manifest\.json|build-state\.json|config\.yaml|shard-\d{5}\.h5)(\.partial)?|teacher|\.rank-\d+"),
    "run": re.compile(r"(student\.json|model\.safetensors|metrics\.jsonl|training\.png|distill_config\.json"
                      r"|config\.(json|yaml))(\.partial)?"
                      r"|checkpoints|tokenizer[\w.-]*|special_tokens_map\.json|vocab\.json|merges\.txt"
                      r"|added_tokens\.json|chat_template\.\w+"),
    "export": re.compile(r"(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors"
                         r"|model\.safetensors\.index\.json|modeling_tcache\.py)(\.partial)?"
                         r"|tokenizer[\w.-]*|special_tokens_map\.json|vocab\.json|merges\.txt|added_tokens\.json"
                         r"|chat_template\.\w+"),
}


def read(path: Path) -> dict | None:
    """The marker of directory `path`, or None (absent, unreadable, or not tcache's)."""
    try:
        doc = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("kind") in KINDS
    return doc if ok and isinstance(doc.get("files"), list) else None


def _json_format(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc.get("format") if isinstance(doc, dict) else None


def _legacy_run_config(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"recipe", "cache", "out"} <= set(doc)


def legacy_kind(path: Path) -> str | None:
    """The kind of an unmarked tcache 0.1.0 output, proven by content tcache writes; None for anything else."""
    if _json_format(path / MANIFEST) == "tcache" or _json_format(path / BUILD_STATE) == "tcache-build-state":
        return "cache"
    if _json_format(path / STUDENT) == "tcache-student" or _legacy_run_config(path / "distill_config.json"):
        return "run"
    try:
        modeling = (path / "modeling_tcache.py").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return "export" if "exported by `tcache export`" in modeling else None


def owner(path: Path) -> tuple[str | None, dict | None]:
    """(kind, marker) of directory `path`: the marker's kind, a legacy output's kind (marker None), or (None, None)."""
    doc = read(path)
    if doc is not None:
        return doc["kind"], doc
    return legacy_kind(path), None


def listed(name: str, kind: str, doc: dict | None) -> bool:
    """Whether tcache wrote the top-level entry `name` of an output of `kind` with marker `doc`."""
    if name in (MARKER, MARKER + PARTIAL):  # the marker and its temporary (a kill -9 mid-rewrite leaves one)
        return True
    if doc is None:
        return bool(_LEGACY[kind].fullmatch(name))
    files = set(doc["files"])
    return name in files or (name.endswith(PARTIAL) and name[: -len(PARTIAL)] in files)


def foreign(path: Path) -> list[str]:
    """Entries of directory `path` that tcache did not write (all of them in a directory that is not tcache's, but
    for a marker's temporary: a claim cut short by kill -9 leaves only that)."""
    kind, doc = owner(path)
    return sorted(p.name for p in path.iterdir()
                  if p.name != MARKER + PARTIAL and (kind is None or not listed(p.name, kind, doc)))


def _write(path: Path, doc: dict) -> None:
    tmp = path / (MARKER + PARTIAL)
    try:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, path / MARKER)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TcacheError(f"{path}: cannot write tcache's {MARKER} ({e.strerror}); free space or choose another "
                          "--out, then rerun") from None


def claim(path: Path, kind: str, names: tuple[str, ...] = ()) -> None:
    """Make `path` a marked output of `kind` listing `names` (created if missing). It must be missing, empty,
    or already tcache's of this kind (a legacy one is migrated: its tcache-written entries are listed)."""
    path.mkdir(parents=True, exist_ok=True)
    found, doc = owner(path)
    entries = [p.name for p in path.iterdir() if p.name not in (MARKER, MARKER + PARTIAL)]
    if found is None and entries:
        raise TcacheError(f"{path} holds files tcache did not write ({', '.join(sorted(entries)[:3])}); "
                          "move them away or choose another --out")
    if found not in (None, kind):
        raise TcacheError(f"{path} is a tcache {found}, not a {kind}; choose another --out")
    if doc is None:
        doc = {"format": FORMAT, "kind": kind, "tcache_version": tcache.__version__,
               "files": sorted(n for n in entries if listed(n, kind, None))}
    register_in(path, doc, names)


def register(path: Path, *names: str) -> None:
    """List `names` in the marker of `path` (claimed before): call it before creating them."""
    doc = read(path)
    if doc is None:
        raise TcacheError(f"{path} lost its {MARKER} while tcache was writing it; rerun with another --out")
    register_in(path, doc, names)


def register_in(path: Path, doc: dict, names) -> None:
    new = [n for n in names if n not in doc["files"]]
    if new or not (path / MARKER).exists():
        doc["files"] = sorted({*doc["files"], *new})
        _write(path, doc)


def seal(path: Path) -> None:
    """Last, when an output is complete: the marker lists exactly the entries tcache wrote that exist."""
    doc = read(path)
    if doc is None:
        raise TcacheError(f"{path} lost its {MARKER} while tcache was writing it; rerun with another --out")
    present = {p.name for p in path.iterdir()}
    doc["files"] = sorted(n for n in doc["files"] if n in present)
    _write(path, doc)


def write_unlisted(path: Path, write) -> None:
    """Run `write(dir)` for a writer whose file names are its own (transformers' save_pretrained): it writes into
    a listed temporary folder, then each name is listed and moved up, so nothing unlisted is ever in `path`."""
    import shutil

    tmp = path / ".tcache-tmp"
    register(path, tmp.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    names = [p.name for p in tmp.iterdir()]
    register(path, *names)
    for n in names:
        os.replace(tmp / n, path / n)
    tmp.rmdir()
