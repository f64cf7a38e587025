"""HF loaders: a causal LM's config, tokenizer and model from a hub id or a local directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tcache.errors import TcacheError


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


def load_tokenizer(name: str, revision: str | None = None):
    """The teacher's tokenizer alone; it must have an EOS token, which packing puts between documents."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise TcacheError(f"--teacher {name}: could not load the tokenizer ({first})") from None
    if tokenizer.eos_token_id is None:
        raise TcacheError(f"--teacher {name}: tokenizer has no EOS token, which packing needs between documents")
    return tokenizer


def load_model(name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None):
    """The teacher model, in eval mode, on `device`, without grads."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise TcacheError(f"--teacher {name}: could not load model ({first})") from None
    return model.to(device).eval().requires_grad_(False)


def load_teacher(name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None):
    """(model, tokenizer) from a hub id or a local path."""
    tokenizer = load_tokenizer(name, revision)
    return load_model(name, device, dtype, revision), tokenizer


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


def check_seq_len(config, seq_len: int) -> None:
    """Refuse windows longer than the model's positions (its RoPE or position table was never made for them:
    the shared teacher scores 286 at 4096 tokens)."""
    max_pos = getattr(text_config(config), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise TcacheError(f"--seq-len {seq_len} exceeds the teacher's max_position_embeddings {max_pos}; "
                          f"use at most {max_pos}")
