"""Config files: a command's options read from YAML (`--config FILE`), and the resolved config written beside
every output (`config.yaml` in a cache and in a distill run), so that `--config DIR/config.yaml` repeats the run.

A file is a mapping of the config's field names to values, a nested config as a nested mapping
(`data: {path: ..., split: ...}`); any key may also be spelled as its flag without the dashes (`seq-len`,
`shard-rows`, `data-config`, `data: FILE`). Lists and schedules may be YAML lists and mappings
(`slstm_at: [0, 2]`, `alpha: {start: 0.8, final: 0.5, delta: 0.05}`). Precedence (cli/options.py): the
command line, then the file, then the defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from tcache.errors import TcacheError
from tcache.writefaults import write_error
from tcache.fields import flag_of

CONFIG_FILE = "config.yaml"
"""The resolved config's name in a cache and in a distill run."""
PER_INVOCATION = ("overwrite", "resume")
"""Fields that say what to do with an existing output, not what the output is: written as false, so rerunning
from a saved config never replaces or resumes anything unless the command line asks."""


def _norm(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("_", "-")


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (Anneal for `Anneal | None`), or None."""
    for h in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(h):
            return h
    return None


def _takes_list(hint: Any) -> bool:
    return any(typing.get_origin(h) in (list, tuple) for h in (hint, *typing.get_args(hint)))


class _Keys:
    """The spellings a file may use for the fields of `cls`: leaves (option values) and nested configs."""

    def __init__(self, cls: type):
        hints = typing.get_type_hints(cls)
        self.leaves: dict[str, tuple[str, Any]] = {}  # spelling -> (field / click parameter name, type hint)
        self.nested: dict[str, type] = {}  # spelling -> nested config class
        self.shown: dict[str, str] = {}  # spelling -> how a suggestion names it
        for f in _cli_fields(cls):
            if f.metadata.get("nested"):
                sub = _Keys(hints[f.name])
                self.nested[_norm(f.name)] = hints[f.name]
                self.shown[_norm(f.name)] = f.name
                # the nested fields' flags, flat as on the command line (data-config, split, data: PATH)
                for g in _cli_fields(hints[f.name]):
                    flag = _norm(flag_of(hints[f.name], g.name))
                    self.leaves[flag] = sub.leaves[flag]
                    self.shown.setdefault(flag, flag)
                continue
            for spelling in (_norm(f.name), _norm(flag_of(cls, f.name))):
                self.leaves[spelling] = (f.name, hints[f.name])
                self.shown.setdefault(spelling, f.name)


def read(path: str | os.PathLike) -> dict:
    """The mapping a config file holds (an empty file: none); a missing file or bad YAML is one line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise TcacheError(f"--config {path}: {reason}; pass a YAML file of options") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise TcacheError(f"{path} is not valid YAML ({where}{problem}); fix the file, one `option: value` a line") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TcacheError(f"{path} holds a YAML {type(raw).__name__}, not a mapping; write one `option: value` a line")
    return raw


def keyed_options(cls: type, raw: Mapping, source: str, command: str) -> dict[str, tuple[str, Any]]:
    """click parameter name -> (the key as the file spelled it, its value), for errors that name the key. A list
    or mapping stays a list or becomes its dataclass (a schedule); scalars are left for click to convert.
    Unknown keys, keys given twice and values of the wrong shape are one-line errors naming the key."""
    values: dict[str, tuple[str, Any]] = {}

    def put(name: str, hint: Any, key: str, value: Any) -> None:
        if name in values:
            raise TcacheError(f"{source}: {key!r} and {values[name][0]!r} set the same option; keep one")
        values[name] = key, _value(hint, value, key, source)

    def walk(keys: _Keys, mapping: Mapping, prefix: str) -> None:
        for key, value in mapping.items():
            k, shown = _norm(key), f"{prefix}{key}"
            if k in keys.nested and isinstance(value, Mapping):
                walk(_Keys(keys.nested[k]), value, f"{shown}.")
            elif k in keys.leaves:
                put(*keys.leaves[k], shown, value)
            elif k in keys.nested:
                raise TcacheError(f"{source}: {shown!r} takes a mapping of its fields "
                                  f"({', '.join(dict.fromkeys(_Keys(keys.nested[k]).shown.values()))}); see {command} --help")
            else:
                close = difflib.get_close_matches(k, list(keys.shown), n=1, cutoff=0.6)
                hint = f"did you mean {keys.shown[close[0]]!r}?" if close else "remove it"
                raise TcacheError(f"{source}: unknown key {shown!r}; {hint} (see {command} --help)")

    walk(_Keys(cls), raw, "")
    return values


def _value(hint: Any, value: Any, key: str, source: str) -> Any:
    if isinstance(value, Mapping):
        dc = _dataclass_in(hint)
        if dc is None:
            raise TcacheError(f"{source}: {key!r} takes one value, not a mapping; write `{key}: VALUE`")
        try:
            return dc(**value)
        except TypeError:
            names = ", ".join(f.name for f in dataclasses.fields(dc))
            raise TcacheError(f"{source}: {key!r} takes the fields {names}, got {', '.join(map(str, value))}; "
                              "fix the mapping") from None
    if isinstance(value, list):
        if not _takes_list(hint):
            raise TcacheError(f"{source}: {key!r} takes one value, not a list; write `{key}: VALUE`")
    return value


def to_plain(cfg: Any) -> dict:
    """Every option of a config as YAML-safe values, nested configs and schedules as mappings; the
    per-invocation fields false."""
    out: dict[str, Any] = {}
    for f in _cli_fields(type(cfg)):
        v = getattr(cfg, f.name)
        if f.name in PER_INVOCATION:
            v = False
        elif f.metadata.get("nested"):
            v = to_plain(v)
        elif dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def write(cfg: Any, path: str | os.PathLike, command: str) -> Path:
    """Write the resolved `cfg` as YAML at `path` (atomically: a temporary file renamed), headed by how to
    repeat the run. Returns the path."""
    path = Path(path)
    header = (f"# The resolved options of this `tcache {command}`. Repeat it with\n"
              f"#   tcache {command} --config THIS_FILE --out OTHER\n"
              f"# (options on the command line override this file; {' and '.join(PER_INVOCATION)} are written false).\n")
    body = yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=None, width=120)
    return write_text(path, header + body)


def write_text(path: Path, text: str) -> Path:
    """Write `text` at `path` atomically (a temporary renamed); a full disk or an unwritable directory is one
    line, and no temporary is left behind."""
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only directory refuses the unlink too
            tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    return path


def _write_error(path: Path, e: OSError) -> TcacheError:
    """One line for a file that could not be written; a caller that can resume adds so itself."""
    return write_error(path, e) or TcacheError(f"cannot write {path} ({e.strerror or e}); make its directory "
                                               "writable, then rerun")

