"""The run directory and what it holds: where a run writes, what a checkpoint holds (trainable weights, optimizer,
scaler, RNG, counters, config, the cache's identity), resuming from the newest one that loads, and the finished
run's student directory (save_run)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tcache import dist, outdir
from tcache.student.training import shard
from tcache.errors import TcacheError
from tcache.writefaults import write_error
from tcache.student.training.config import RESUMABLE_DIFFS, DistillConfig
from tcache.student.models.io import STUDENT_FILE

CKPT_DIR = "checkpoints"
CONFIG_FILE = "distill_config.json"
RUN_ENTRIES = (CKPT_DIR, CONFIG_FILE, "metrics.jsonl", "config.yaml", "training.png")
"""What a run writes besides the student (listed in tcache's marker when the run claims its directory)."""


@dataclass
class RunState:
    """Where training stands; with the config this is everything a resume needs."""

    micro: int = 0          # micro-batches done, over all epochs
    step: int = 0           # optimizer steps done
    tokens: int = 0         # tokens trained on
    elapsed: float = 0.0    # seconds of training so far


def cache_identity(manifest) -> str:
    """What a resumed run must train on: the cache's shard hashes, fields and teacher (not its path)."""
    key = {"shards": [s.sha256 for s in manifest.shards], "fields": manifest.fields, "seq_len": manifest.seq_len,
           "top_k": manifest.top_k, "tokenizer": manifest.tokenizer.get("sha256"),
           "teacher": [manifest.teacher.get("name_or_path"), manifest.teacher.get("revision")]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / CKPT_DIR).glob("step-*[0-9]")) if (run / CKPT_DIR).is_dir() else []


def run_dir(cfg: DistillConfig) -> Path:
    """Where this run writes: --out itself, or (--overwrite of a finished run) its staging sibling, swapped
    in when the new student is complete. Never deletes what tcache did not write, nor the input cache."""
    out, cache = Path(cfg.out).resolve(), Path(cfg.cache).resolve()
    if out == cache or cache in out.parents:
        raise TcacheError(f"--out {cfg.out} is inside the input cache {cfg.cache}; choose another --out")
    if out in cache.parents:
        raise TcacheError(f"--out {cfg.out} contains the input cache {cfg.cache}; choose another --out")
    out = Path(cfg.out)
    k = outdir.classify(out, "run")  # refuses a file, another kind of output, or anything tcache did not write
    if cfg.resume:
        stage = outdir.staging(out)
        if cfg.overwrite and checkpoints(stage):
            return stage
        if not checkpoints(out):
            raise TcacheError(f"--resume: no checkpoint in {out / CKPT_DIR}; run without --resume (and --ckpt-every N)")
        return out
    if k in ("missing", "empty"):
        return out
    if not cfg.overwrite:
        raise TcacheError(f"--out {out} is not empty; pass --overwrite to replace it, or --resume to continue it")
    if not (out / STUDENT_FILE).exists():  # an unfinished run: no student to protect
        outdir.remove_ours(out)
        return out
    return outdir.fresh_staging(out, "run")


def _check_resume_config(cfg: DistillConfig, ckpt: Path) -> None:
    saved = json.loads((ckpt / CONFIG_FILE).read_text())
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    # another number of ranks continues the run when the global batch (--batch-size x ranks) is the same
    if saved.get("batch_size", 0) * saved.pop("world_size", 1) == now["batch_size"] * dist.world():
        saved["batch_size"] = now["batch_size"]
    if "lora" not in (saved.get("train"), now["train"]):  # LoRA's options change nothing in another run (and a
        # checkpoint from before they existed has none)
        saved, now = ({k: v for k, v in d.items() if not k.startswith("lora_")} for d in (saved, now))
    # a checkpoint from before an option existed trained with its default
    for k, v in (("match_loss", "output"), ("feature_dim", None), ("mlstm_heads", "query"), ("mix", "gate"),
                 ("qk_merge", False), ("init", None)):
        saved.setdefault(k, v)
    diffs = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_DIFFS and saved.get(k) != now.get(k))
    if diffs:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:4])
        raise TcacheError(
            f"--resume: the checkpoint in {ckpt.parent.parent} was trained with another configuration ({shown}); "
            "use the original options or start a new --out"
        )


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # copies: tied weights (a hybrid's embedding and head) are one tensor under two names, which safetensors
    # refuses to store as such
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items() if k not in frozen}


def save_checkpoint(out: Path, cfg: DistillConfig, tr, state: RunState, identity: str = "") -> Path:
    """A checkpoint of trainer `tr` (model, optimizer, scaler, stage): its directory appears only complete
    (written as .partial, then renamed). Only the stage's trainable weights are saved: the rest is the
    cache's teacher, frozen in this stage. Called on every rank: unsharded, the ranks' weights and optimizer
    states are equal and rank 0 writes them once; sharded (FSDP2), every rank writes its shards (shard.DCP_DIR)."""
    from safetensors.torch import save_file

    final = out / CKPT_DIR / f"step-{state.step:07d}"
    main, sharded = dist.is_main(), getattr(tr, "sharded", False)
    if not (main or sharded):
        return final
    tmp = final.with_name(final.name + ".partial")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if main:
            tmp.mkdir(parents=True)
        if sharded:
            dist.barrier()  # the directory exists before any rank writes into it
            shard.save_sharded(tmp / shard.DCP_DIR, tr.model, tr.opt)
        else:
            save_file(_trainable_state(tr.model), str(tmp / "trainable.safetensors"))
        if not main:
            return final
        optimizer = None if sharded else tr.opt.state_dict()  # sharded: in shard.DCP_DIR
        torch.save({"optimizer": optimizer, "scaler": tr.scaler.state_dict(), "rng": _rng_state(),
                    "state": asdict(state), "cache_identity": identity, "stage": tr.stage.index}, tmp / "trainer.pt")
        (tmp / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "world_size": dist.world()}, indent=2))
    except Exception as e:  # a full disk or a read-only run: the partial checkpoint goes, the last one stays
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(out, e, "rerun with --resume" if checkpoints(out) else "rerun")
        if err is None:
            raise
        raise err from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((out / CKPT_DIR).glob("step-*[0-9]"))[:-max(cfg.keep_ckpts, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, tr, identity: str = "") -> RunState:
    """Restore trainer `tr` from `ckpt`: the weights into the stage they were trained in (with its
    optimizer state), then the stage the run continues with (a fresh optimizer when that is the next one)."""
    from safetensors.torch import load_file

    blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    if identity and blob.get("cache_identity", identity) != identity:
        raise TcacheError(f"--resume: the checkpoint in {ckpt.parent.parent} was trained on another cache (other "
                          "shards or fields); pass the cache it was trained on, or start a new --out")
    saved = tr.plan.stages[min(blob.get("stage", 0), len(tr.plan.stages) - 1)]
    opt = tr.begin_stage(saved)
    if (ckpt / shard.DCP_DIR).is_dir():  # a sharded run's (--shard fsdp): onto this run's ranks, sharded or not
        shard.load_sharded(ckpt / shard.DCP_DIR, tr.model, opt)
    elif getattr(tr, "sharded", False):
        raise TcacheError(f"--resume: checkpoint {ckpt} is an unsharded run's; resume it with --shard none")
    else:
        missing, unexpected = tr.model.load_state_dict(load_file(str(ckpt / "trainable.safetensors")), strict=False)
        frozen = {n for n, p in tr.model.named_parameters() if not p.requires_grad}
        if unexpected or set(missing) - frozen:
            raise TcacheError(f"--resume: checkpoint {ckpt} does not fit this student; start a new --out")
        opt.load_state_dict(blob["optimizer"])
    tr.scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    state = RunState(**blob["state"])
    if tr.plan.stage_at(state.micro) is not saved:
        tr.begin_stage(tr.plan.stage_at(state.micro))
    return state


def resume_from(run: Path, cfg: DistillConfig, tr, identity: str, warn: Callable[[str], None]) -> tuple[Path, RunState]:
    """The newest checkpoint that loads; a torn or truncated one (a crash while the disk filled, say) is
    skipped with a warning. A checkpoint of another configuration or cache is refused, not skipped."""
    for ckpt in reversed(checkpoints(run)):
        try:
            _check_resume_config(cfg, ckpt)
            return ckpt, load_checkpoint(ckpt, tr, identity)
        except TcacheError:
            raise
        except Exception as e:  # unreadable files: safetensors, pickle, json, OSError
            warn(f"checkpoint {ckpt.name} does not load ({type(e).__name__}); trying the one before it")
    raise TcacheError(f"--resume: no checkpoint in {run / CKPT_DIR} loads; start a new --out")


def save_run(tr, work: Path, state: RunState, last: dict, identity: str, ckpt: Path | None, hasher,
             warn: Callable[[str], None]) -> dict:
    """The finished run's student directory, student.json last (rank 0; a sharded student is gathered to it first),
    swapped in for --out when the run trained beside it (--overwrite). Returns student.json's run metadata."""
    import tcache
    from tcache.plots import training_plot
    from tcache.student.models import lora
    from tcache.student.models.io import save_student
    from tcache.student.models.merge import teacher_fingerprint
    from tcache.teachercache import schema

    cfg, plan, device, m = tr.cfg, tr.plan, tr.device, tr.manifest
    tr.model.eval()
    meta = {
        "tcache_version": tcache.__version__,
        "cache": {"path": str(cfg.cache), "teacher": m.teacher.get("name_or_path"),
                  "tokenizer_sha256": m.tokenizer["sha256"], "seq_len": m.seq_len,
                  "top_k": m.top_k, "hidden_groups": plan.groups,
                  # what `tcache merge` checks and records (student/models/merge.py)
                  "identity": identity, "teacher_sha256": teacher_fingerprint(m)},
        "trained": {"steps": state.step, "tokens": state.tokens, "seconds": round(state.elapsed, 2)},
        "params": plan.info["params"], "final_metrics": last,
        "kernels": {"mlstm": plan.info["mlstm_kernel"], "slstm": plan.info["slstm_backend"]},
        "online_teacher": cfg.online_teacher,
    }
    if "lora" in plan.info:  # what trained; the saved weights hold the adapters merged in
        meta["lora"] = {**plan.info["lora"], "merged": True}
    if device.type == "cuda":
        meta["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    hasher.wait()
    full = shard.full_state(tr.model) if getattr(tr, "sharded", False) else None  # every rank: a collective
    if not dist.is_main():
        return meta
    training_plot(work, warn, final=True)
    if cfg.train == "lora":  # a plain student on disk, loadable without peft: W + alpha / r * B A
        lora.merge_adapters(tr.model)
    save_student(work, tr.model, meta, Path(cfg.cache) / schema.TEACHER_DIR,
                 "rerun with --resume" if ckpt is not None else "rerun", state=full)
    if work != Path(cfg.out):
        outdir.swap_in(work, Path(cfg.out))
    return meta
