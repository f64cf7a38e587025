"""The shape of a reliability promise (tests/test_reliability.py): a command, the fault it meets, the exit code
and the one line it must end with, and the user's files, which must all survive byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from click.testing import CliRunner


@dataclass
class Case:
    """What a fault's setup works with: a fresh directory, the suite's fixtures, and the user's files it makes."""

    tmp: Path
    fixtures: dict
    """Name -> path of a session fixture (tiny_teacher, teacher_dir, valid_jsonl, shared_cache, student, ...)."""
    owned: dict[Path, bytes] = field(default_factory=dict)
    """Every file the user owned before the command, with its bytes."""
    env: dict[str, str] = field(default_factory=dict)

    def user(self, rel: str, data: str | bytes = "the user's own bytes\n") -> Path:
        """Write a file the user owns (the check after the command wants it unchanged)."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        self.owned[p] = p.read_bytes()
        return p

    def check_owned(self) -> None:
        """Every file the user owned before is still there, byte for byte."""
        for path, data in self.owned.items():
            assert path.is_file() and path.read_bytes() == data, f"the user's {path} was changed or deleted"

    def own_all(self, root: Path) -> None:
        """Count every file already under `root` as the user's (a folder they made by other means)."""
        for p in root.rglob("*"):
            if p.is_file():
                self.owned[p] = p.read_bytes()


@dataclass
class Promise:
    """One row of the list of promises."""

    id: str
    """Short name; the issue's case number first where there is one (`21.1-build-overwrite-project-folder`)."""
    fault: Callable[[Case], list[str]]
    """Prepares the fault under case.tmp and returns the command's arguments after `tcache` (str each)."""
    code: int
    """Expected exit status (0: the command must succeed despite the fault, e.g. a refused value capped)."""
    message: str
    """A regular expression the command's one `Error:` line must match (re.search); for code 0, a line of its output."""
    subprocess: bool = False
    """Run `python -m tcache.cli.main` in a child process (signals, locks, environment) instead of click's runner."""
    after: Callable[[Case], None] | None = None
    """Extra checks once the command ended (what tcache itself must have left)."""
    needs_root: bool = False
    """Faults that need root (tmpfs, read-only bind mounts): skipped otherwise."""
    timeout: float = 120.0


@dataclass
class Outcome:
    code: int
    output: str


def invoke(args: list[str], case: Case, in_child: bool, timeout: float) -> Outcome:
    if in_child:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **case.env}
        p = subprocess.run([sys.executable, "-m", "tcache", *args], capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=case.tmp)
        return Outcome(p.returncode, p.stdout + p.stderr)
    from tcache.cli.main import main

    old = dict(os.environ)
    os.environ.update(case.env)
    try:
        r = CliRunner().invoke(main, args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        return Outcome(99, r.output + "Traceback:\n" + "".join(traceback.format_exception(r.exception)))
    return Outcome(r.exit_code, r.output)
