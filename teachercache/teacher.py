"""The teacher: loading a HF causal LM, and the per-token targets a cache stores."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from teachercache.errors import TcacheError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TcacheError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TcacheError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that has it, fp16 on one that does not (T4), fp32 on CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise TcacheError(f"--dtype {dtype!r} is unknown; use one of auto, {', '.join(DTYPES)}")
    if DTYPES[dtype] is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TcacheError("--dtype bf16 is not supported by this GPU (e.g. a T4); use --dtype fp16")
    return DTYPES[dtype]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def load_config(name: str, revision: str | None = None):
    """The teacher's config alone: cheap, so every argument check runs before weights load."""
    from transformers import AutoConfig

    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise TcacheError(f"--teacher {name}: no such directory; pass a HF model directory or a hub id")
    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise TcacheError(
            f"--teacher {name}: not found or not a HF model ({first}); pass a hub id like "
            "HuggingFaceTB/SmolLM2-360M or a directory with config.json"
        ) from None


def load_teacher(name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None):
    """(model, tokenizer) from a hub id or a local path, in eval mode, on `device`, without grads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise TcacheError(f"--teacher {name}: could not load model or tokenizer ({first})") from None
    if tokenizer.eos_token_id is None:
        raise TcacheError(f"--teacher {name}: tokenizer has no EOS token, which packing needs between documents")
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def text_config(config):
    """The language-model part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(config) -> int:
    return int(text_config(config).num_hidden_layers)


@dataclass
class Targets:
    hidden: torch.Tensor | None  # (B, T, G, D) float32: group means of hidden_states[1:]; None if G = 0
    topk_logprobs: torch.Tensor  # (B, T, k) float32, descending
    topk_ids: torch.Tensor       # (B, T, k) int64


@torch.no_grad()
def teacher_targets(model, input_ids: torch.Tensor, groups: list[tuple[int, int]], top_k: int) -> Targets:
    """One teacher forward: layer-group means of the hidden states and the top-k log-probs at T=1."""
    out = model(input_ids=input_ids, output_hidden_states=bool(groups), use_cache=False)
    hidden = None
    if groups:
        layers = out.hidden_states[1:]  # L tensors (B, T, D); see schema.HIDDEN_SOURCE
        hidden = torch.stack(
            [torch.stack(layers[a:b]).float().mean(0) for a, b in groups], dim=2
        )  # (B, T, G, D)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (B, T, V) fp32: the FULL vocabulary
    top = torch.topk(logprobs, top_k, dim=-1, sorted=True)  # (B, T, k)
    return Targets(hidden=hidden, topk_logprobs=top.values, topk_ids=top.indices)
