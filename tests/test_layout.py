"""The package's shape: one import namespace, the student side reading only the cache's format, files short
enough to read, and every option written once (the config field) and named correctly wherever it is cited."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tcache.cli.main import main
from tcache.fields import field_docs, flag_of

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("tcache", "teachercache", "student", "cli")
# What the student side may read of the cache package: the format, never the build.
STUDENT_MAY_IMPORT = {"schema", "manifest", "reader", "codecs"}


def library_files():
    return [p for d in LIBRARY for p in sorted((ROOT / d).rglob("*.py"))]


def test_no_generic_top_level_package_is_installed(tmp_path):
    """Outside the checkout, only `tcache` is importable: cli, student and teachercache live under it."""
    code = ("import importlib.util as u, json; "
            "print(json.dumps({n: u.find_spec(n) is not None for n in "
            "('tcache', 'tcache.cli', 'tcache.student', 'tcache.teachercache', 'cli', 'student', 'teachercache')}))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    found = __import__("json").loads(out.stdout)
    assert found == {"tcache": True, "tcache.cli": True, "tcache.student": True, "tcache.teachercache": True,
                     "cli": False, "student": False, "teachercache": False}, found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "student").rglob("*.py")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_student_reads_only_the_cache_format_and_the_base(path):
    used = {m.split(".")[2] for m in _imports(path) if m.startswith("tcache.teachercache.")}
    assert used <= STUDENT_MAY_IMPORT, f"{path.name} imports the build side: {sorted(used - STUDENT_MAY_IMPORT)}"
    assert not {m for m in _imports(path) if m.split(".")[0] in ("cli", "student", "teachercache")}


def test_no_library_file_is_long():
    long = {p.relative_to(ROOT).as_posix(): n for p in library_files() if (n := len(p.read_text().splitlines())) > 350}
    assert not long, long


def _commands() -> dict[str, click.Command]:
    return dict(main.commands)


def test_options_come_from_the_config_fields():
    """Each config field is an option of its command with the field's default and docstring, and the
    command has no option of its own beyond presentation (--json)."""
    from tcache.student.training.config import DistillConfig
    from tcache.student.inference.eval import EvalConfig
    from tcache.teachercache.config import BuildConfig
    from tcache.text import DataSpec

    for name, cls in (("build", BuildConfig), ("plan", BuildConfig), ("distill", DistillConfig), ("eval", EvalConfig)):
        params = {p.name: p for p in _commands()[name].params}
        expected = {}
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):  # set by tcache itself (a rank's row offset), never by a user
                continue
            if f.metadata.get("nested"):
                expected.update({g.name: (g, DataSpec) for g in dataclasses.fields(DataSpec)})
            else:
                expected[f.name] = (f, cls)
        # beyond the fields: --json (presentation) and --config (the same fields, read from a file)
        assert set(params) - set(expected) <= {"as_json", "config_file"}, (name, set(params) - set(expected))
        if name == "plan":  # a plan builds nothing: no --overwrite / --resume, and --out is optional
            assert not {"overwrite", "resume"} & set(params)
            assert not params["out"].required and params["out"].default == "cache"
            expected = {k: v for k, v in expected.items() if k not in ("overwrite", "resume", "out")}
        for fname, (f, owner) in expected.items():
            p = params[fname]
            if isinstance(p, click.Argument):
                continue
            assert p.opts[0] == flag_of(owner, fname), (name, fname)
            if f.default is not dataclasses.MISSING:
                assert p.default == f.default, (name, fname, p.default, f.default)
            assert p.help == field_docs(owner)[fname], (name, fname)


def test_every_flag_the_library_and_docs_name_exists_and_every_option_has_help():
    """Error messages, docstrings, the README and docs/ cite options as `--name`: each one must be an option of
    some command; and no option goes without help."""
    known = {o for c in _commands().values() for p in c.params for o in getattr(p, "opts", []) if o.startswith("--")}
    known |= {"--help", "--version"}
    # other tools' flags in README's recipes: lm_eval's --model_args / --batch_size, torchrun's --nproc_per_node
    known |= {"--model", "--tasks", "--batch", "--nproc"}
    no_help = [(n, p.name) for n, c in _commands().items() for p in c.params
               if isinstance(p, click.Option) and not p.help]
    assert not no_help, no_help
    cited: dict[str, str] = {}
    for path in library_files() + [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", path.read_text()):
            cited.setdefault(flag, path.relative_to(ROOT).as_posix())
    unknown = {f: where for f, where in cited.items() if f not in known}
    assert not unknown, unknown


def test_readme_quickstart_numbers_are_the_measured_ones():
    """The perplexities the README promises are those benchmarks/quickstart.py measured running the README's
    own quickstart block (results/quickstart-cpu.md names each command it ran)."""
    import re
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quickstart import quickstart_commands

    measured = (ROOT / "benchmarks" / "results" / "quickstart-cpu.md").read_text()
    assert all(f"| `{cmd}` |" in measured for cmd in quickstart_commands())
    student, teacher = re.findall(r"^Student ([\d.]+), teacher ([\d.]+)", measured, re.M)[0]
    readme = (ROOT / "README.md").read_text()
    assert f"student scores perplexity **{student}**" in readme and f"teacher **{teacher}**" in readme
