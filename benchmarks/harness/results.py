"""Results on disk and on screen: the results JSON (written whole), markdown tables, number formats, and the one
line a row's process hands its result back on."""

from __future__ import annotations

import json
from pathlib import Path

RESULT = "RESULT "
"""The prefix of the stdout line that carries a row process's result (JSON) back to its parent."""


def write_json(path: Path, doc: dict, indent: int = 2) -> None:
    """Atomically: a parent may stop this process at any moment, and a reader must never see half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent))
    tmp.replace(path)


def read_json_output(path: Path) -> dict:
    """A command's --json output; tolerates log lines before the object (older evals printed kernel builds)."""
    text = Path(path).read_text()
    return json.loads(text[text.index('{\n  "'):])


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v) -> str:
    """A number for a table: thousands separated from 100 up, 3 significant digits below; '-' for none."""
    if not is_number(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def row(cells) -> str:
    """One markdown table line."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header, rows=()) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row of cells."""
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]


def emit(result: dict) -> None:
    """Hand `result` to the parent (a row's process prints it as its last RESULT line)."""
    print(RESULT + json.dumps(result), flush=True)


def error_line(text: str) -> str:
    """The line of a failed command's stderr that says what failed: the last error or traceback line, else the last
    line; at most 300 characters."""
    lines = [x for x in (text or "").splitlines() if x.strip()]
    bad = [x for x in lines if x.startswith(("Error", "RuntimeError", "Traceback")) or "Error:" in x]
    return (bad[-1] if bad else lines[-1] if lines else "?")[:300]


def received(stdout: str, stderr: str) -> dict:
    """The result a row's process handed back (its last RESULT line), or {"error": what its stderr says}."""
    lines = [x for x in (stdout or "").splitlines() if x.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else {"error": error_line(stderr)}


def failure(e: BaseException, limit: int = 200) -> str:
    """An exception as a result records it: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}"
