"""Promises about the inputs a user hands tcache: config files checked as the command line checks them (5),
a full disk while config.yaml is written (7), plot targets that cannot be written (8) or are not tcache's to
replace (9), a metrics.jsonl that is not UTF-8 (9), a text field of the wrong type (11) and eval told about a
directory that is not a model (12). The faults of the rows in tests/test_reliability.py (ROWS there). Besides the fixtures by name, the faults use case.fixtures["monkeypatch"] (pytest's, undone after
the row) and case.fixtures["finalizers"] (called after the row: unmounts), as tests/test_reliability.py gives."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import text_head
from promises import Case

# -- helpers: the user's files and the faults ---------------------------------------------------------------


def _text(case: Case, name: str = "data.jsonl", chars: int = 2000) -> Path:
    """A small JSONL of held-out text, the user's (tokenising all of valid.jsonl costs ~10 s)."""
    p = text_head(case.fixtures["valid_jsonl"], case.tmp / name, chars)
    case.owned[p] = p.read_bytes()
    return p


def _jsonl(case: Case, name: str, *records) -> Path:
    """A JSONL of these records after one good document (so the data is not merely too short)."""
    good = json.loads(_text(case, "good.jsonl").read_text().splitlines()[0])
    return case.user(name, "".join(json.dumps(r) + "\n" for r in (good, *records)))


def _config(case: Case, text: str) -> list[str]:
    """`build --config c.yaml` with the teacher, data, budget and --out in the file and `text` after them."""
    data = _text(case)
    conf = case.user("c.yaml", f"teacher: {case.fixtures['tiny_teacher']}\ndata: {data}\ntokens: 1k\nseq_len: 32\n"
                               f"device: cpu\nout: {case.tmp / 'c'}\n{text}")
    return ["build", "--config", str(conf)]


def _build_args(case: Case, data: Path) -> list[str]:
    return ["build", "--teacher", str(case.fixtures["tiny_teacher"]), "--data", str(data), "--tokens", "1k",
            "--seq-len", "32", "--device", "cpu", "--out", str(case.tmp / "c")]


def nothing_built(case: Case) -> None:
    assert not (case.tmp / "c").exists(), list((case.tmp / "c").iterdir())


def no_partial(case: Case) -> None:
    left = [p for p in case.tmp.rglob("*.partial")]
    assert not left, left


def _root_mount(case: Case, *args: str) -> None:
    """`mount ARGS...` (root only), undone by the runner's finalizers whatever the command did."""
    subprocess.run(["mount", *args], check=True, capture_output=True)
    case.fixtures["finalizers"].append(lambda: subprocess.run(["umount", "-l", args[-1]], capture_output=True))


def _read_only(case: Case, name: str = "ro", copy: Path | None = None) -> Path:
    """A read-only bind mount (permission bits alone do not stop root) of a fresh directory, holding a copy of
    `copy` when given."""
    src, ro = case.tmp / f"{name}-src", case.tmp / name
    src.mkdir()
    if copy is not None:
        shutil.copytree(copy, src / copy.name)
    ro.mkdir()
    _root_mount(case, "--bind", str(src), str(ro))
    _root_mount(case, "-o", "remount,bind,ro", str(ro))
    return ro


def _no_write_bits(case: Case, name: str = "locked") -> Path:
    """A directory its owner may read but not write (chmod 0500): root ignores the bits, so the row skips."""
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (the read-only mount rows cover root)")
    d = case.tmp / name
    d.mkdir()
    d.chmod(0o500)
    case.fixtures["finalizers"].append(lambda: d.chmod(0o700))  # so pytest can clean up
    return d


class _FullFile:
    """An open file on a full disk: every write fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _disk_full_for(case: Case, name: str) -> None:
    """Files called `name` opened for writing under case.tmp are on a full disk: created, then no byte fits."""
    real = io.open

    def fake(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        p = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
        if p is not None and p.name == name and case.tmp in p.parents and any(m in mode for m in "wax"):
            return _FullFile(f)
        return f

    mp = case.fixtures["monkeypatch"]
    mp.setattr(io, "open", fake)  # pathlib's open()
    mp.setattr(builtins, "open", fake)


def _copy_run(case: Case) -> Path:
    """The distill run, copied (the fixture is shared); its files count as the user's where asked."""
    r = case.tmp / "run"
    shutil.copytree(case.fixtures["run"], r)
    return r


def _tcache_png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return str(im.text.get("Software", "")).startswith("tcache ")


def _foreign_png() -> bytes:
    """A real PNG, written by PIL, not by tcache."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    return buf.getvalue()


# -- 5: a config file's values are checked as the command line checks them -------------------------------


def float_for_int(case: Case) -> list[str]:
    return _config(case, "top_k: 12.7\n")


def float_for_int_as_flag(case: Case) -> list[str]:
    return _config(case, "top-k: 12.7\n")


def bool_for_int(case: Case) -> list[str]:
    return _config(case, "shard-rows: true\n")


def not_a_choice(case: Case) -> list[str]:
    return _config(case, "hidden_dtype: fp7\n")


def number_for_flag(case: Case) -> list[str]:
    return _config(case, "overwrite: 1\n")


def text_for_float(case: Case) -> list[str]:
    conf = case.user("d.yaml", f"cache: {case.fixtures['shared_cache']}\nout: {case.tmp / 's'}\nlr: fast\n")
    return ["distill", "--config", str(conf)]


# -- 7: a full disk while config.yaml is written ---------------------------------------------------------


def config_yaml_disk_full(case: Case) -> list[str]:
    _disk_full_for(case, "config.yaml.partial")
    return _build_args(case, _text(case))


# -- 8: plot targets that cannot be written ----------------------------------------------------------------


def plot_into_locked_dir(case: Case) -> list[str]:
    return ["plot", str(case.fixtures["run"]), "--out", str(_no_write_bits(case) / "curves.png")]


def stats_plot_into_locked_dir(case: Case) -> list[str]:
    return ["stats", str(case.fixtures["shared_cache"]), "--plot", str(_no_write_bits(case) / "cache.png")]


def plot_into_read_only_mount(case: Case) -> list[str]:
    return ["plot", str(case.fixtures["run"]), "--out", str(_read_only(case) / "curves.png")]


def stats_plot_into_read_only_mount(case: Case) -> list[str]:
    return ["stats", str(case.fixtures["shared_cache"]), "--plot", str(_read_only(case) / "cache.png")]


def plot_a_read_only_run(case: Case) -> list[str]:
    """`tcache plot RUN` of a run on a read-only mount: its default target RUN/training.png is unwritable."""
    return ["plot", str(_read_only(case, copy=Path(case.fixtures["run"])) / "run")]


# -- 9: a metrics.jsonl that is not UTF-8; a plot replaces only a PNG tcache wrote --------------------------


def metrics_not_utf8(case: Case) -> list[str]:
    r = _copy_run(case)
    m = r / "metrics.jsonl"
    m.write_bytes(m.read_bytes() + b'{"step": 3, "note": "caf\xe9"}\n')
    case.own_all(r)
    return ["plot", str(r), "--out", str(case.tmp / "curves.png")]


def plot_over_a_users_png(case: Case) -> list[str]:
    return ["plot", str(case.fixtures["run"]), "--out", str(case.user("holiday.png", _foreign_png()))]


def plot_over_a_users_text(case: Case) -> list[str]:
    return ["plot", str(case.fixtures["run"]), "--out", str(case.user("notes.png", "my notes\n"))]


def stats_plot_over_a_users_png(case: Case) -> list[str]:
    return ["stats", str(case.fixtures["shared_cache"]), "--plot", str(case.user("holiday.png", _foreign_png()))]


def plot_over_its_own_png(case: Case) -> list[str]:
    """A PNG tcache drew (distill's training.png, copied out) is tcache's to replace."""
    shutil.copy(Path(case.fixtures["run"]) / "training.png", case.tmp / "curves.png")
    return ["plot", str(case.fixtures["run"]), "--out", str(case.tmp / "curves.png")]


def both_signed(case: Case) -> None:
    assert _tcache_png(Path(case.fixtures["run"]) / "training.png")  # distill's own draw
    assert _tcache_png(case.tmp / "curves.png")


def stats_plot_over_its_own_png(case: Case) -> list[str]:
    shutil.copy(Path(case.fixtures["run"]) / "training.png", case.tmp / "cache.png")
    return ["stats", str(case.fixtures["shared_cache"]), "--sample-rows", "2", "--plot", str(case.tmp / "cache.png")]


def stats_png_signed(case: Case) -> None:
    from PIL import Image

    assert _tcache_png(case.tmp / "cache.png")
    with Image.open(case.tmp / "cache.png") as im:
        assert im.size == (1400, 420)  # the cache's figure replaced the training curves


def plot_run_default_target(case: Case) -> list[str]:
    return ["plot", str(_copy_run(case))]


def default_target_signed(case: Case) -> None:
    assert _tcache_png(case.tmp / "run" / "training.png")


# -- 11: a text field of the wrong type --------------------------------------------------------------------


def text_is_int(case: Case) -> list[str]:
    return _build_args(case, _jsonl(case, "d.jsonl", {"text": 123}))


def text_is_null(case: Case) -> list[str]:
    return _build_args(case, case.user("d.jsonl", '{"text": null}\n{"text": "late"}\n'))


def text_is_missing(case: Case) -> list[str]:
    return _build_args(case, _jsonl(case, "d.jsonl", {"title": "no text"}))


def eval_text_is_list(case: Case) -> list[str]:
    data = _jsonl(case, "d.jsonl", {"text": "fine"}, {"text": ["a", "b"]})
    return ["eval", str(case.fixtures["tiny_teacher"]), "--data", str(data), "--tokens", "64", "--seq-len", "32",
            "--device", "cpu"]


# -- 12: eval of a directory that is not a model -----------------------------------------------------------


def _eval(case: Case, model: str) -> list[str]:
    return ["eval", model, "--data", str(_text(case)), "--tokens", "64", "--seq-len", "32", "--device", "cpu"]


def eval_a_cache(case: Case) -> list[str]:
    return _eval(case, str(case.fixtures["shared_cache"]))


def eval_a_random_dir(case: Case) -> list[str]:
    case.user("stuff/notes.txt")
    return _eval(case, str(case.tmp / "stuff"))


def eval_a_missing_dir(case: Case) -> list[str]:
    return _eval(case, str(case.tmp / "no" / "such"))


def eval_a_missing_hub_id(case: Case) -> list[str]:
    return _eval(case, "no-such-org/no-such-model")
