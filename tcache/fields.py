"""Config fields that carry their own command-line option: one source for each option's default, choices and
help. A field's help is its docstring (the string under it in the class body, litgpt style); `opt()` adds
what a docstring cannot say: the flag when it differs from the field's name, the choices, and whether the
CLI passes the user's text through for the config to parse (counts like 512M, schedules like 0.8:0.5)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from typing import Any, Iterable


def opt(default: Any = dataclasses.MISSING, *, flag: str | None = None, choices: Iterable[str] | None = None,
        text: bool = False, cli: bool = True, argument: bool = False, nested: bool = False,
        metavar: str | None = None) -> Any:
    """A dataclass field with CLI metadata.

    flag: the option's name when it is not the field's name with dashes; choices: the accepted values (a
    library constant); text: the option takes text that the config parses; cli=False: not an option;
    argument: a positional argument; nested: a dataclass whose own fields are options (e.g. --data, --split
    of a DataSpec)."""
    meta = {"flag": flag, "choices": tuple(choices) if choices is not None else None, "text": text, "cli": cli,
            "argument": argument, "nested": nested, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def flag_of(cls: type, name: str) -> str:
    """The option that sets field `name` of config class `cls` (for error messages that name it)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring, one line, without a trailing note naming the option in parentheses.
    Read from the source with `ast` because Python keeps no attribute docstrings at runtime (the approach
    of simple-parsing and tyro, without adding either as a dependency for this one job)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                text = " ".join(nxt.value.value.split())
                docs[node.target.id] = re.sub(r"\s*\((--[a-z0-9-]+(, )?)+\)\.?$", "", text).rstrip() or text
    return docs
