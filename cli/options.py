"""Click options generated from a config dataclass (tcache.fields): the CLI writes no default, choice or help
of its own, so `tcache X --help`, the config and the docs cannot drift apart; and `--config FILE`, which reads
any of them from a YAML file (tcache.configfile)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import click

from tcache import configfile
from tcache.errors import TcacheError
from tcache.fields import field_docs, flag_of

_CLICK_TYPES = {int: int, float: float, str: str}


class _Text(click.ParamType):
    """Text that the config parses (512M, 0.8:0.5, 0,2). A config file may give the same value as a YAML list
    or a schedule's dataclass (tcache.configfile), which pass through unchanged."""

    name = "text"

    def convert(self, value, param, ctx):
        return value if isinstance(value, (list, tuple)) or dataclasses.is_dataclass(value) else str(value)


_TEXT = _Text()


def _base_type(hint: Any) -> Any:
    """int | None -> int; anything that is not a plain int/float/str/bool -> str (the config parses it)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0] if len(args) == 1 else str
    return hint if hint in (int, float, str, bool) else str


def _params(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def config_options(cls: type, *, skip: tuple[str, ...] = (), required: tuple[str, ...] = ()):
    """A decorator adding one click argument or option per field of `cls` (nested dataclasses flattened),
    in field order. `skip` leaves fields out (a command that does not use them); `required` makes a field
    without a default in the config required on this command only."""
    decorators = []
    docs = field_docs(cls)
    for f, hint in _params(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        if meta.get("nested"):
            decorators.append(config_options(hint, skip=skip, required=required))
            continue
        if meta.get("argument"):
            decorators.append(click.argument(f.name, type=click.Path()))
            continue
        flag = flag_of(cls, f.name)
        has_default = f.default is not dataclasses.MISSING
        kw: dict[str, Any] = {"help": docs.get(f.name)}
        base = _base_type(hint)
        if base is bool:
            kw["is_flag"] = True
            kw["default"] = bool(f.default) if has_default else False
        else:
            if meta.get("choices"):
                kw["type"] = click.Choice(list(meta["choices"]))
            else:
                kw["type"] = _TEXT if meta.get("text") else _CLICK_TYPES[base]
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
            if has_default:
                kw["default"] = f.default
                kw["show_default"] = f.default is not None
            else:
                kw["required"] = True
        if f.name in required:
            kw["required"] = True
        decorators.append(click.option(flag, f.name, **kw))

    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def config_from(cls: type, options: dict[str, Any], **overrides: Any):
    """The config of `cls` from the options click parsed (consumed from `options`); nested dataclasses are
    built from their own fields. Validation is the config's own (__post_init__), done once."""
    values: dict[str, Any] = {}
    for f, hint in _params(cls):
        if f.metadata.get("nested"):
            values[f.name] = config_from(hint, options)
        elif f.name in options:
            values[f.name] = options.pop(f.name)
    values.update(overrides)
    return cls(**values)


def config_file_option(cls: type):
    """A decorator adding `--config FILE`: a YAML file of `cls`'s options. Its values become click's default_map,
    so precedence is click's own: an option given on the command line (or by its environment variable) wins,
    then the file, then the field's default; a required option or argument may come from the file alone."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        params = {p.name: p for p in ctx.command.params}
        defaults = dict(ctx.default_map or {})
        try:
            values = configfile.keyed_options(cls, configfile.read(value), value, ctx.command_path)
            for name, (key, v) in values.items():
                # null means the default; a field this command does not take (a plan's --overwrite) is not used
                if v is not None and name in params:
                    defaults[name] = _for_click(params[name], v, ctx, f"{value}: {key}")
        except TcacheError as e:
            raise click.ClickException(str(e)) from None
        ctx.default_map = defaults

    return click.option("--config", "config_file", type=click.Path(dir_okay=False), is_eager=True,
                        expose_value=False, callback=load,
                        help="YAML file of options (keys: the options' field names, e.g. seq_len); options on the "
                             "command line override it. Every output saves its resolved options as config.yaml.")


def _for_click(param: click.Parameter, value: Any, ctx: click.Context, where: str) -> Any:
    """A file's value checked exactly as the command line checks it: converted by the option's own type from the
    text a user would type (click converts a default_map value with int(12.7) = 12, silently; the command line
    refuses '12.7'). A flag takes a YAML boolean; lists and schedules pass as the config parses them."""
    if isinstance(value, (list, tuple)) or dataclasses.is_dataclass(value):
        return value
    if getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise TcacheError(f"{where}: {value!r} is not a boolean; write true or false")
        return value
    try:
        return param.type.convert(_as_typed(param, value), param, ctx)
    except click.BadParameter as e:
        raise TcacheError(f"{where}: {e.message.rstrip('.')}; fix the value") from None


def _as_typed(param: click.Parameter, value: Any) -> str:
    """The text of a YAML scalar. YAML 1.1 reads `off` / `on` as booleans, where a choice is 'off' or 'on'."""
    if isinstance(param.type, click.Choice) and isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
