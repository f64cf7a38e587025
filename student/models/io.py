"""A saved student directory: student.json (written last), model.safetensors, the teacher's tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from tcache.student.models.xlstm import Student, StudentConfig, resolve_kernels
from tcache.teachercache import schema
from tcache import outdir, ownership
from tcache.errors import TcacheError
from tcache.writefaults import write_error

STUDENT_FILE = "student.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "tcache-student"


def is_student_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / STUDENT_FILE).is_file()


def save_student(out: str | os.PathLike, model: Student, meta: dict, tokenizer_dir: str | os.PathLike,
                 then: str = "rerun", state: dict | None = None) -> None:
    """Weights and tokenizer first, student.json last (atomic), so a partial save is not a student. A full disk
    or a read-only `out` is one line ending in `then` (how to get the student once the disk is fixed). `state`:
    the model's full state dict when the model itself is sharded (FSDP2 under torchrun: its own holds shards)."""
    from safetensors.torch import save_model

    out = Path(out)
    tokenizer = [f for f in Path(tokenizer_dir).iterdir()
                 if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt")]
    # listed in tcache's marker (the run claimed `out`) before they are written
    ownership.register(out, WEIGHTS_FILE, STUDENT_FILE, *(f.name for f in tokenizer),
                       *(["config.json"] if model.family == "hybrid" else []))
    doc = {"format": FORMAT, "family": model.family, "config": model.cfg.to_dict(), **meta}
    tmp = out / (STUDENT_FILE + ".partial")
    try:
        _save_weights(model, out / WEIGHTS_FILE, state)
        for f in tokenizer:
            shutil.copy2(f, out / f.name)
        if model.family == "hybrid":  # the converted teacher's own architecture, to rebuild it on load
            model.lm.config.save_pretrained(out)
        outdir.share_like_open(out / WEIGHTS_FILE)
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    except Exception as e:  # a full disk: no half-written weights left to look like a student
        for name in (WEIGHTS_FILE, tmp.name):
            (out / name).unlink(missing_ok=True)
        err = write_error(out, e, then)
        if err is None:
            raise
        raise err from None
    os.replace(tmp, out / STUDENT_FILE)
    ownership.seal(out)


def _save_weights(model: torch.nn.Module, path: Path, state: dict | None) -> None:
    """safetensors' save_model, of `state` when given: tied weights (a hybrid's embedding and head) are stored once
    under the name save_model keeps, so the file is the one an unsharded model writes."""
    from safetensors.torch import _remove_duplicate_names, save_file, save_model

    if state is None:
        return save_model(model, str(path))
    state = dict(state)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():  # a full state dict holds each name's own copy: share them again
        for name in group[1:]:
            state[name] = state[group[0]]
    metadata = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata.setdefault(name, kept)
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)


def load_student(path: str | os.PathLike, device: torch.device,
                 context_length: int | None = None) -> tuple[Student, dict]:
    """(model in eval mode, student.json). `context_length`: the length it will run at (eval's --seq-len);
    the kernel is picked for that length by `resolve_kernels`, as training picks it for the training
    length (default). doc["config"]["context_length"] stays the training length."""
    path = Path(path)
    try:
        doc = json.loads((path / STUDENT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise TcacheError(f"{path} is not a tcache student (no readable {STUDENT_FILE}); pass the --out of `tcache distill`") from None
    if doc.get("format") != FORMAT:
        raise TcacheError(f"{path}/{STUDENT_FILE} is not a tcache student file; pass the --out of `tcache distill`")
    if context_length is not None and context_length < 1:
        raise TcacheError(f"a student runs at 1 token or more, not {context_length}; pass a positive length")
    if doc.get("family", "xlstm") == "hybrid":
        return _load_hybrid(path, doc, device), doc
    cfg = StudentConfig(**doc["config"])
    if context_length is not None:
        cfg = dataclasses.replace(cfg, context_length=context_length)
    mk, sb = resolve_kernels(cfg, device)
    model = Student(cfg, mlstm_kernel=mk, slstm_backend=sb)
    load_weights(model, path)
    return model.to(device).eval(), doc


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """model.safetensors into `model`; a missing, truncated or mismatched file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    f = path / WEIGHTS_FILE
    try:
        load_model(model, str(f), strict=True)
    except FileNotFoundError:
        raise TcacheError(f"{f} is missing: the student is incomplete; re-run `tcache distill` with this --out "
                          "(--resume continues from its last checkpoint)") from None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise TcacheError(f"{f} is unreadable or truncated ({str(e).splitlines()[0][:100]}); re-run `tcache "
                          "distill` with this --out (--resume continues from its last checkpoint)") from None


def _load_hybrid(path: Path, doc: dict, device: torch.device):
    """A hybrid student: the teacher's architecture from its config.json, converted, then its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tcache.student.models.hybrid import HybridConfig, HybridStudent

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        raise TcacheError(f"{path}/config.json (the hybrid student's architecture) is missing or unreadable; "
                          "re-run `tcache distill` with this --out") from None
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = HybridStudent(lm, HybridConfig(**doc["config"]))
    load_weights(model, path)
    model.set_kernel(device)
    return model.to(device).eval()


def load_teacher_parts(cache_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    path = Path(cache_dir) / schema.EMBEDDINGS_FILE
    if not path.is_file():  # load_manifest checks the files the manifest lists; this one even when it lists none
        raise TcacheError(f"{cache_dir}: {schema.EMBEDDINGS_FILE} is missing (the student's embedding and head come "
                          f"from it); run `tcache verify {cache_dir}` for the full report, then rebuild the cache")
    with safe_open(str(path), "pt") as f:
        tied = (f.metadata() or {}).get(schema.TIED_HEAD_KEY) == "true"
        # fp32 for the student's frozen copies: exact for the fp16 / bf16 weights the cache stores
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    if tied:  # stored once; caches before schema 3's tied flag hold both names
        tensors["lm_head"] = tensors["embed_tokens"]
    return tensors
