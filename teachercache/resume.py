"""Where a build writes and whether it may continue there: the output directory (--overwrite, --resume),
the build's identity, and the state an interrupted build left."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tcache.teachercache import schema
from tcache import outdir
from tcache.errors import TcacheError
from tcache.hf import tokenizer_sha256
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.setup import TeacherSetup
from tcache.teachercache.writer import BuildState


def work_dir(cfg: BuildConfig) -> Path:
    """Where this build writes: --out itself, or (--overwrite of a cache) its staging sibling, swapped in
    when complete. Refuses anything that would delete what tcache did not write (outdir.classify)."""
    out = Path(cfg.out)
    k = outdir.classify(out, "cache")
    if k in ("missing", "empty"):
        if cfg.resume:
            raise TcacheError(f"--resume: --out {out} holds no interrupted build; run without --resume")
        return out
    if k == "build":  # an interrupted build (tcache's marker says so): no valid result to protect
        if cfg.resume:
            return out
        if cfg.overwrite:
            outdir.remove_ours(out)
            return out
        raise TcacheError(f"--out {out} holds an interrupted build; pass --resume (with the same options) to "
                          "continue it, or --overwrite to start over")
    # k == "cache"
    if not cfg.overwrite:
        if cfg.resume:
            raise TcacheError(f"--resume: --out {out} is a complete cache, nothing to resume; "
                              "pass --overwrite to rebuild it")
        raise TcacheError(f"--out {out} is a tcache cache; pass --overwrite to replace it or choose another --out")
    if cfg.resume:
        stage = outdir.staging(out)
        if outdir.kind(stage) != "build":
            raise TcacheError(f"--resume --overwrite: no interrupted replacement of {out} to resume (looked for "
                              f"{stage}); run without --resume")
        outdir.classify(stage, "cache", flag="staging directory")
        return stage
    return outdir.fresh_staging(out, "cache")


def _teacher_fingerprint(name: str) -> str | None:
    """A local teacher directory's config and file sizes (cheap: weights are not read); None for hub ids,
    whose revision identifies them."""
    p = Path(name).expanduser()
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()


def _data_fingerprint(cfg: BuildConfig) -> list | None:
    """Local data files and their sizes (hub datasets are named by their spec)."""
    p = Path(cfg.data.path).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return [[str(f), f.stat().st_size] for f in files] or None


def build_identity(cfg: BuildConfig, ts: TeacherSetup) -> dict:
    """Everything that determines a cache's bytes: a resumed build must match it exactly."""
    return {
        "teacher": cfg.teacher, "revision": cfg.revision or getattr(ts.config, "_commit_hash", None),
        "teacher_files": _teacher_fingerprint(cfg.teacher), "tokenizer_sha256": tokenizer_sha256(ts.tokenizer),
        "data": cfg.data.describe(), "data_files": _data_fingerprint(cfg), "tokens": cfg.tokens,
        "seq_len": cfg.seq_len, "top_k": cfg.top_k, "hidden_groups": cfg.hidden_groups,
        "hidden_dtype": cfg.hidden_dtype, "logprob_dtype": cfg.logprob_dtype, "rows_per_shard": cfg.rows_per_shard,
        "dtype": str(ts.dtype).removeprefix("torch."), "device_type": ts.device.type,
        "schema_version": schema.SCHEMA_VERSION,
        **({"share": [cfg.share_rank, cfg.share_world]} if cfg.share_world > 1 else {}),  # a rank's, under torchrun
    }


def resume_state(cfg: BuildConfig, work: Path, identity: dict) -> BuildState:
    """The interrupted build's state at `work`, refused unless this build is the same one."""
    state = BuildState.load(work)
    diffs = [k for k in sorted(set(identity) | set(state.identity)) if identity.get(k) != state.identity.get(k)]
    if diffs:
        shown = ", ".join(f"{k} ({state.identity.get(k)!r} -> {identity.get(k)!r})" for k in diffs[:3])
        raise TcacheError(f"--resume: this build differs from the interrupted one in {shown}; rerun with the "
                          "original options, or pass --overwrite without --resume to start over")
    if cfg.batch_size and cfg.batch_size != state.batch_size:
        raise TcacheError(f"--resume: --batch-size {cfg.batch_size} differs from the interrupted build's "
                          f"{state.batch_size} (batches shape the bytes); drop --batch-size or pass {state.batch_size}")
    return state
