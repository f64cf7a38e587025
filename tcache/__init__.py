"""tcache: offline teacher-cache distillation. This package is the shared base (errors, devices, units, HF
loaders, text, output directories, signals); `tcache.teachercache` builds and reads caches, `tcache.student`
trains and scores students from them, `tcache.cli` is the command line."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Installed, pyproject's package-dir maps tcache.cli, tcache.student and tcache.teachercache to the
# checkout's top-level cli/, student/ and teachercache/. Run from a checkout without installing
# (PYTHONPATH=checkout, as on the GPU machines), the same folders are found beside this one.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "teachercache" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)
