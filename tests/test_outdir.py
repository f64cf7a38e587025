"""What --overwrite removes (tcache/outdir.py remove_ours): the entries tcache's marker lists (tcache/ownership.py) and
nothing else. A name proves nothing (users keep a config.yaml or a training.png too), so the marker's list decides;
a user's file that appears inside an old output while an --overwrite builds its replacement survives byte for byte,
and the next --overwrite names it rather than touch it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import build_cache, text_head
from promises import Case
from tcache import outdir, ownership
from tcache.errors import TcacheError
from tcache.teachercache.manifest import load_manifest


def test_remove_ours_removes_exactly_what_the_marker_lists(tmp_path):
    out = tmp_path / "run"
    ownership.claim(out, "run", ("student.json", "model.safetensors", "checkpoints", "metrics.jsonl"))
    # tcache's entries as a run leaves them: a listed folder is tcache's as a whole, a listed name covers its
    # .partial temporary; metrics.jsonl is listed but was never written
    (out / "student.json").write_text('{"format": "tcache-student"}')
    (out / "model.safetensors.partial").write_bytes(b"cut short")
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "trainable.safetensors").write_bytes(b"weights")
    user = Case(tmp_path, {})  # then the user's, among them names tcache 0.1.0 wrote in a run (unlisted here)
    for rel in ("config.yaml", "training.png", "tokenizer.json", "notes/todo.txt", ".hidden", "shard-00000.h5"):
        user.user(f"run/{rel}", f"the user's {rel}\n")
    theirs = {Path(p).relative_to(out).parts[0] for p in user.owned}
    assert {p.name for p in out.iterdir()} == theirs | {"student.json", "model.safetensors.partial", "checkpoints",
                                                        ownership.MARKER}
    outdir.remove_ours(out)
    assert {p.name for p in out.iterdir()} == theirs  # the marker too is gone, the directory stays (not empty)
    user.check_owned()
    with pytest.raises(TcacheError, match="not tcache's output; nothing there was removed"):  # no marker now
        outdir.remove_ours(out)
    user.check_owned()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_file_put_into_the_old_cache_during_an_overwrite_survives(tmp_path, tiny_teacher, valid_jsonl,
                                                                     monkeypatch, exchange):
    """--overwrite of a cache (its marker written long ago, the replacement's written at the start of the build):
    files the user puts into the old cache while the teacher runs are not in its marker, so the swap's removal of
    the old cache leaves them, byte for byte, in the directory the old cache was moved to (the staging sibling
    with renameat2's exchange, .cache.tcache-old where it is missing), and only them; the next --overwrite
    refuses that directory, naming them, before the teacher runs (not once its replacement is built)."""
    import tcache.teachercache.build as build_mod

    text = text_head(valid_jsonl, tmp_path / "t.jsonl", 4000, docs=1)
    out = tmp_path / "cache"
    kw = dict(seq_len=32, batch_size=4, rows_per_shard=2)
    build_cache(out, tiny_teacher, text, tokens=4 * 32, top_k=8, **kw)
    listed = set(ownership.read(out)["files"])
    user = Case(tmp_path, {})
    real = build_mod.TeacherPass.__call__

    def user_writes_meanwhile(self, *a, **k):
        if not user.owned:
            assert ownership.read(outdir.staging(out)) is not None  # the replacement is claimed and being built
            user.user("cache/notes.txt")
            user.user("cache/results/eval.json", b'{"ppl": 12.5}')
            user.user("cache/shard-00007.h5", b"a name a cache uses, not in its marker")
        return real(self, *a, **k)

    monkeypatch.setattr(build_mod.TeacherPass, "__call__", user_writes_meanwhile)
    if not exchange:  # a filesystem without RENAME_EXCHANGE: the old output is renamed aside, then removed
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    build_cache(out, tiny_teacher, text, tokens=4 * 32, top_k=4, overwrite=True, **kw)
    assert user.owned and load_manifest(out).top_k == 4  # the replacement is live
    assert not {"notes.txt", "results", "shard-00007.h5"} & {p.name for p in out.iterdir()}
    left = [d for d in (outdir.staging(out), out.parent / ".cache.tcache-old") if d.exists()]
    assert left == [out.parent / (".cache.tcache-new" if exchange else ".cache.tcache-old")], left
    # only the user's: nothing of the old cache, whose marker listed all of it
    assert listed >= {"manifest.json", "teacher", "shard-00000.h5", "shard-00001.h5"}
    assert {p.name for p in left[0].iterdir()} == {"notes.txt", "results", "shard-00007.h5"}
    for path, data in user.owned.items():
        assert (left[0] / path.relative_to(out)).read_bytes() == data
    batches = []

    def counted(self, *a, **k):
        batches.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(build_mod.TeacherPass, "__call__", counted)
    with pytest.raises(TcacheError, match=re.escape(f"{left[0].name} holds files tcache did not write (notes.txt, "
                                                    "results, shard-00007.h5)")):
        build_cache(out, tiny_teacher, text, tokens=4 * 32, top_k=8, overwrite=True, **kw)
    assert not batches  # refused up front
    assert {p.name for p in left[0].iterdir()} == {"notes.txt", "results", "shard-00007.h5"}
    for path, data in user.owned.items():
        assert (left[0] / path.relative_to(out)).read_bytes() == data
    assert load_manifest(out).top_k == 4
