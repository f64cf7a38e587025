"""The teacher side of a build (and of a plan): load and check the teacher, start the tokenizer workers,
choose the batch size, and save the parts of the teacher that the student reuses."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tcache import outdir
from tcache.teachercache import schema
from tcache.errors import TcacheError
from tcache.text import TokenizerPool
from tcache.hf import check_seq_len, load_config, load_model, load_tokenizer, num_layers, text_config
from tcache.device import resolve_device, resolve_dtype
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.writer import CacheWriter


def auto_batch_size(device: torch.device, seq_len: int, vocab_size: int, hidden_size: int) -> int:
    """8 rows on CPU; on a GPU, as many rows (up to 64) as fit a quarter of its free memory, counting the
    bf16 logits and their fp32 chunk copies plus the fp32 hidden accumulator."""
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_row = seq_len * (vocab_size * 2 + hidden_size * 16)
    return int(max(1, min(64, free // 4 // per_row)))


@dataclass
class TeacherSetup:
    """A checked, loaded teacher and what a build derives from it (shared by build and plan)."""

    device: torch.device
    dtype: torch.dtype
    config: object
    groups: list[tuple[int, int]]
    model: torch.nn.Module
    tokenizer: object
    vocab_size: int
    hidden_size: int
    specs: dict[str, schema.FieldSpec]


def _check_against_teacher(cfg: BuildConfig, config) -> None:
    vocab_size = int(text_config(config).vocab_size)
    if cfg.top_k > vocab_size:
        raise TcacheError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary of {vocab_size}; use 1..{vocab_size}")
    check_seq_len(config, cfg.seq_len)


def setup_teacher(cfg: BuildConfig, before_weights: Callable[[object, torch.device], None] | None = None
                  ) -> TeacherSetup:
    """Every argument check against the teacher's config runs before its weights load;
    `before_weights(tokenizer, device)` runs between loading the tokenizer and the weights."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    config = load_config(cfg.teacher, cfg.revision)
    _check_against_teacher(cfg, config)
    groups = schema.layer_groups(num_layers(config), cfg.hidden_groups)
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision)
    if before_weights is not None:
        before_weights(tokenizer, device)
    model = load_model(cfg.teacher, device, dtype, cfg.revision)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])  # logits width, may pad the tokenizer's
    hidden_size = int(model.get_input_embeddings().weight.shape[1])
    specs = schema.field_specs(cfg.seq_len, hidden_size, cfg.hidden_groups, cfg.top_k, vocab_size,
                               cfg.hidden_dtype, cfg.logprob_dtype)
    return TeacherSetup(device, dtype, config, groups, model, tokenizer, vocab_size, hidden_size, specs)


def tokenizer_workers(cfg: BuildConfig, tokenizer, device: torch.device) -> int:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return 0  # a slow (Python) tokenizer cannot be shipped to the workers cheaply
    if cfg.tokenizer_workers >= 0:
        return cfg.tokenizer_workers
    return min(8, (os.cpu_count() or 2) // 2) if device.type == "cuda" else 0


@contextlib.contextmanager
def teacher_and_pool(cfg: BuildConfig) -> Iterator[tuple[TeacherSetup, TokenizerPool | None]]:
    """The loaded teacher and the tokenizer worker pool of --tokenizer-workers (None: tokenise in a thread);
    the workers start while the weights load, and are stopped on exit."""
    pools: list[TokenizerPool] = []

    def start_pool(tokenizer, device: torch.device) -> None:  # worker start-up overlaps loading the weights
        if n := tokenizer_workers(cfg, tokenizer, device):
            pools.append(TokenizerPool(tokenizer, n))

    try:
        ts = setup_teacher(cfg, before_weights=start_pool)
        yield ts, pools[0] if pools else None
    finally:
        for p in pools:
            p.close()


def weights_dtype(model, config) -> torch.dtype:
    """The dtype the teacher's full weights are stored in: the checkpoint's own (config.dtype), so a CPU build
    that computed in fp32 stores an fp16 teacher in fp16, its exact values; the compute dtype otherwise."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else next(model.parameters()).dtype


def full_weights_bytes(model, config) -> int:
    """Bytes of the teacher's full weights as stored (tied tensors once)."""
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    return sum(unique.values()) * torch.empty((), dtype=weights_dtype(model, config)).element_size()


def tied_head(model) -> bool:
    """Whether the LM head is the input embedding (one tensor, stored once)."""
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def save_teacher_parts(model, tokenizer, config, writer: CacheWriter) -> None:
    """What the students reuse, so distillation never loads the teacher: the full weights (model.safetensors
    and config: the hybrid recipe starts from the whole teacher), and for the xLSTM recipes the embedding and
    head (embeddings.safetensors, in the same dtype; a tied head is stored once), and the tokenizer."""
    from safetensors.torch import save_file

    tdir = writer.out_dir / schema.TEACHER_DIR
    dtype = weights_dtype(model, config)
    converted: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor, so they are stored once
    state = {k: converted.setdefault(v.data_ptr(), v.detach().to("cpu", dtype)) for k, v in model.state_dict().items()}
    model.save_pretrained(tdir, state_dict=state)
    config.save_pretrained(tdir)
    tokenizer.save_pretrained(tdir)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = tied_head(model)

    def part(t: torch.Tensor) -> torch.Tensor:  # clone(): safetensors refuses views of shared storage
        return t.detach().to("cpu", dtype).clone()

    tensors = {"embed_tokens": part(embed.weight)}  # (V, D)
    if not tied:
        tensors["lm_head"] = part(head.weight)  # (V, D)
    if getattr(head, "bias", None) is not None:
        tensors["lm_head_bias"] = part(head.bias)  # (V,)
    norm = getattr(model.base_model, "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        tensors["final_norm"] = part(norm.weight)  # (D,)
    save_file(tensors, str(writer.add_teacher_file(schema.EMBEDDINGS_FILE)),
              metadata={schema.TIED_HEAD_KEY: "true" if tied else "false"})
    outdir.share_like_open(tdir)
