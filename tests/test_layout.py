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


# The import contract: what each room may import of tcache's own packages (anything else of tcache is refused;
# third-party imports are free). A rule is a set of module prefixes; "tcache.<base>" is every module of tcache/.
BASE = {f"tcache.{p.stem}" for p in (ROOT / "tcache").glob("*.py") if p.stem != "__init__"}
CACHE_FORMAT = {f"tcache.teachercache.{m}" for m in STUDENT_MAY_IMPORT}
CONTRACT = {
    "tcache": BASE,  # the base imports only itself (its __main__ is the one door to the CLI, below)
    "tcache.teachercache": BASE | {"tcache.teachercache"},
    "tcache.student.models": BASE | CACHE_FORMAT | {"tcache.student.models"},
    "tcache.student.training": BASE | CACHE_FORMAT | {"tcache.student.models", "tcache.student.training"},
    "tcache.student.inference": BASE | CACHE_FORMAT | {"tcache.student.models", "tcache.student.inference"},
    "tcache.student": BASE | {"tcache.student"},  # student/__init__ and hf.py, the exports' stable import
    "tcache.cli": BASE | {"tcache.teachercache", "tcache.student", "tcache.cli"},
}
EXCEPTIONS = {("tcache.__main__", "tcache.cli.entry")}  # `python -m tcache` runs the CLI


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "tcache":
        parts.insert(0, "tcache")
    return ".".join(p for p in parts if p != "__init__")


def room_of(module: str) -> str:
    """The longest CONTRACT key that `module` lies in; a module directly in student/ other than its __init__ and
    hf.py (the exports' stable import) is in no room, so it may import nothing of tcache."""
    if module.startswith("tcache.student.") and module.count(".") == 2 and module != "tcache.student.hf":
        return module
    return max((r for r in CONTRACT if module == r or module.startswith(r + ".")), key=len)


def violations(module: str, imports: set[str]) -> list[str]:
    """The tcache imports of `module` its room may not make, as "module -> import" (`from P import m` is judged
    as P.m and as P; the bare namespace `tcache` is everyone's)."""
    allowed = CONTRACT.get(room_of(module), set())
    return [f"{module} -> {imp}" for imp in sorted(imports)
            if imp.startswith("tcache.") and not any(module == m and (imp == e or imp.startswith(e + "."))
                                                     for m, e in EXCEPTIONS)
            and not any(imp == a or imp.startswith(a + ".") for a in allowed)]


PACKAGES = {"tcache.teachercache", "tcache.student", "tcache.cli"} | {f"tcache.student.{p.name}" for p in
                                                                      (ROOT / "student").iterdir() if p.is_dir()}


def _tcache_imports(path: Path) -> set[str]:
    """Every tcache name `path` imports (top-level, in functions, under TYPE_CHECKING); `from PACKAGE import m` is
    judged by its module PACKAGE.m alone."""
    return {n for n in _imports(path) if n.startswith("tcache.") and n not in PACKAGES}


@pytest.mark.parametrize("path", library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_import_keeps_the_contract(path):
    """models import neither training nor inference; training and inference import models, never each other;
    student/ reads the cache's format, never its build side; the base imports nothing above it."""
    assert not violations(module_name(path), _tcache_imports(path))
    assert not {m for m in _imports(path) if m.split(".")[0] in ("cli", "student", "teachercache")}


@pytest.mark.parametrize("module, imported", [
    ("tcache.student.models.mixer", "tcache.student.inference.prefill"),  # a model that knows how it is run
    ("tcache.student.models.mixer", "tcache.student.training.config"),
    ("tcache.student.training.train", "tcache.student.inference.eval"),
    ("tcache.student.inference.hf", "tcache.student.training.config"),
    ("tcache.student.training.data", "tcache.teachercache.build"),  # the cache's build side
    ("tcache.student.inference.eval", "tcache.teachercache.writer"),
    ("tcache.student.loose", "tcache.student.models.hybrid"),  # a module in no room
    ("tcache.errors", "tcache.student.models.io"),  # the base importing a product package
    ("tcache.teachercache.build", "tcache.student.training.config"),
])
def test_the_contract_refuses_what_it_forbids(module, imported):
    """The check above can fail: each forbidden edge is reported, and its allowed mirror image is not."""
    assert violations(module, {imported}) == [f"{module} -> {imported}"]


def test_the_contract_allows_the_designed_edges():
    for module, imported in [("tcache.student.training.train", "tcache.student.models.io"),
                             ("tcache.student.inference.decode", "tcache.student.models.mixer"),
                             ("tcache.student.training.data", "tcache.teachercache.reader"),
                             ("tcache.student.hf", "tcache.student.inference.hf"),
                             ("tcache.cli.distill", "tcache.student.training.train"),
                             ("tcache.__main__", "tcache.cli.entry")]:
        assert violations(module, {imported}) == [], (module, imported)


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
    from tcache.student.inference.probe import ProbeConfig
    from tcache.teachercache.config import BuildConfig
    from tcache.text import DataSpec

    for name, cls in (("build", BuildConfig), ("plan", BuildConfig), ("distill", DistillConfig), ("eval", EvalConfig),
                      ("probe", ProbeConfig)):
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
