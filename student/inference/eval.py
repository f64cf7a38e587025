"""Perplexity of a student directory or any HF causal LM, on the same windows for both.

Windows are the build's packed rows (tcache.text.pack_rows: documents + EOS, cut into
`seq_len` tokens), so a student and its teacher are scored on identical tokens. Each window is
scored independently (no carried state); the first token of a window has no prediction, so a window
scores seq_len - 1 tokens. Perplexity = exp(total NLL / tokens scored).

A student runs at any seq_len, shorter or longer than it was trained at; its result also records the
mLSTM kernel and sLSTM backend that ran ("kernels") and its training length ("trained_seq_len").
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tcache.student.models.io import is_student_dir, load_student
from tcache.fields import opt
from tcache.text import DEFAULT_SEQ_LEN, DataSpec, iter_texts, pack_rows
from tcache.units import parse_count
from tcache.errors import TcacheError
from tcache.hf import check_seq_len, load_config, load_teacher, tokenizer_sha256
from tcache import dist, outdir
from tcache.device import PRECISIONS, resolve_device, resolve_dtype


@dataclass
class EvalConfig:
    model: str = opt(argument=True)
    """A `tcache distill` output directory, or a HF causal LM id / directory."""
    data: DataSpec = opt(nested=True)
    """Held-out text."""
    tokens: int = opt(200_000, text=True)
    """Token budget (e.g. 200k), rounded down to whole windows."""
    seq_len: int = DEFAULT_SEQ_LEN
    """Window length; each window is scored alone."""
    batch_size: int = 8
    """Windows per forward."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    dtype: str = opt("auto", choices=PRECISIONS)
    """auto (bf16 GPU, fp32 CPU), fp32, fp16, bf16."""

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens, "--tokens")
        if self.seq_len < 2:
            raise TcacheError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.tokens < self.seq_len:
            raise TcacheError(f"--tokens {self.tokens} is less than one window of --seq-len {self.seq_len}")
        if self.batch_size < 1:
            raise TcacheError(f"--batch-size must be at least 1, got {self.batch_size}")


NOT_A_MODEL_FIX = "pass a student (the --out of tcache distill) or a HF model directory or hub id"


def refuse_non_model(model: str) -> None:
    """A local directory that is neither a student nor a HF model, refused by what it is: a cache (whose teacher/
    is only the teacher's parts), an unfinished build or distill run, or a folder without config.json."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return  # a hub id, or a missing path: load_config says which
    k = outdir.kind(path)
    if k in ("cache", "build"):
        raise TcacheError(f"{model} is {outdir.describe(k)}, not a model; {NOT_A_MODEL_FIX}")
    if k == "run":
        raise TcacheError(f"{model} is a tcache distill run without its student.json (not finished); finish it with "
                          f"tcache distill --resume, or {NOT_A_MODEL_FIX}")
    if not (path / "config.json").is_file():
        raise TcacheError(f"{model}: neither a tcache student nor a HF model (no student.json or config.json); "
                          f"{NOT_A_MODEL_FIX}")


def load_model(name: str, seq_len: int, device: torch.device, dtype: torch.dtype):
    """(logits_fn, tokenizer, kind, model, extra) of a student or HF causal LM that will run windows of seq_len
    tokens: logits_fn maps ids (B, T) to logits (B, T, V); extra holds what a result reports about the model beyond
    the common keys."""
    from transformers import AutoTokenizer

    if is_student_dir(name):
        # Built for the window length, not the training length: the kernel is chosen for --seq-len
        # (parallel up to 1024 tokens, chunkwise beyond), and the parallel kernel's mask fits the window.
        model, doc = load_student(name, device, context_length=seq_len)
        tokenizer = AutoTokenizer.from_pretrained(name)
        extra = {"kernels": dict(model.kernels), "trained_seq_len": doc["cache"]["seq_len"]}
        return (lambda ids: model(ids)[0]), tokenizer, "tcache-student", model, extra
    refuse_non_model(name)
    # a clear error for a path or id that is not a model, too: in eval's words, as MODEL is no --teacher
    check_seq_len(load_config(name, who="", fix=NOT_A_MODEL_FIX), seq_len)
    model, tokenizer = load_teacher(name, device, dtype, who="")
    return (lambda ids: model(input_ids=ids, use_cache=False).logits), tokenizer, "hf", model, {}


@torch.no_grad()
def perplexity(cfg: EvalConfig, on_progress=None) -> dict:
    device = dist.init(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    logits_fn, tokenizer, kind, model, extra = load_model(cfg.model, cfg.seq_len, device, dtype)
    n_windows = cfg.tokens // cfg.seq_len
    rows = itertools.islice(pack_rows(iter_texts(cfg.data), tokenizer, cfg.seq_len, tokenizer.eos_token_id),
                            n_windows)
    nll, scored, windows = 0.0, 0, 0
    autocast = device.type == "cuda" and dtype is not torch.float32
    for i, batch in enumerate(iter(lambda: list(itertools.islice(rows, cfg.batch_size)), [])):
        if i % dist.world() != dist.rank():  # under torchrun: batches dealt out to the ranks in turn
            continue
        ids = torch.from_numpy(np.stack(batch)).to(device=device, dtype=torch.long)  # (B, T)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = logits_fn(ids)  # (B, T, V)
        V = logits.shape[-1]
        nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum"))
        scored += ids[:, 1:].numel()
        windows += len(batch)
        if on_progress:
            on_progress(windows * cfg.seq_len, n_windows * cfg.seq_len)
    nll, scored, windows = dist.sum_([nll, scored, windows], device)
    if windows == 0:
        raise TcacheError(f"--data {cfg.data.path} holds fewer than {cfg.seq_len} tokens; nothing to evaluate")
    return {
        "model": cfg.model, "kind": kind, "perplexity": math.exp(nll / scored), "nll_per_token": nll / scored,
        "tokens_scored": scored, "windows": windows, "seq_len": cfg.seq_len,
        "data": cfg.data.describe(), "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "device": str(device), "ranks": dist.world(), "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()), **extra,
    }
