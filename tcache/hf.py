"""HF loaders: a causal LM's config, tokenizer and model from a hub id or a local directory."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from tcache.errors import TcacheError


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (HF_HUB_OFFLINE, or no TCP connection within 3 s), or None. One probe per
    process: without it transformers spends ~27 s in retries before it says the hub is unreachable."""
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return None
    except OSError:
        return f"{host} is unreachable (offline?)"


def _offline(name: str) -> bool:
    """A hub id read from the local HF cache only, when the hub cannot be reached (no retries)."""
    return not _looks_local(name) and hub_unreachable() is not None


def _named(who: str, name: str) -> str:
    """How an error names the model: by its flag (`--teacher X`), or alone where it is an argument (eval's)."""
    return f"{who} {name}" if who else name


def load_config(name: str, revision: str | None = None, who: str = "--teacher", fix: str | None = None):
    """The teacher's config alone: cheap, so every argument check runs before weights load. `who` and `fix`
    word the errors for a command whose model is not a --teacher (eval's MODEL, which may be a student too)."""
    from transformers import AutoConfig

    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise TcacheError(f"{_named(who, name)}: no such directory; {fix or 'pass a HF model directory or a hub id'}")
    if not _looks_local(name):
        try:  # a hub id already in the local HF cache needs no network
            return AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
        except (OSError, ValueError):
            pass
        why = hub_unreachable()
        if why:
            raise TcacheError(f"{_named(who, name)}: not found in the local HF cache and {why}; pass a local model "
                              "directory, or connect and retry")
    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        fix = fix or "pass a hub id like HuggingFaceTB/SmolLM2-360M or a directory with config.json"
        raise TcacheError(f"{_named(who, name)}: not found or not a HF model ({first}); {fix}") from None


def load_tokenizer(name: str, revision: str | None = None, who: str = "--teacher"):
    """The teacher's tokenizer alone; it must have an EOS token, which packing puts between documents."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=_offline(name))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise TcacheError(f"{_named(who, name)}: could not load the tokenizer ({first})") from None
    if tokenizer.eos_token_id is None:
        raise TcacheError(f"{_named(who, name)}: tokenizer has no EOS token, which packing needs between documents")
    return tokenizer


def load_model(name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
               who: str = "--teacher"):
    """The teacher model, in eval mode, on `device`, without grads."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype,
                                                     local_files_only=_offline(name))
    except Exception as e:  # OSError, ValueError, and safetensors' own error for a damaged weight file
        from safetensors import SafetensorError

        if not isinstance(e, (OSError, ValueError, SafetensorError)):
            raise
        first = str(e).splitlines()[0][:160]
        bad = _damaged_weights(name) if isinstance(e, SafetensorError) else None
        if bad is not None:
            raise TcacheError(f"{_named(who, name)}: its weight file {bad[0]} is damaged ({bad[1]}); download or copy "
                              "the model again") from None
        raise TcacheError(f"{_named(who, name)}: could not load model ({first})") from None
    return model.to(device).eval().requires_grad_(False)


def _damaged_weights(name: str) -> tuple[str, str] | None:
    """(file name, why) of the first local *.safetensors whose header does not open (a truncated download or copy:
    safetensors checks that the header covers the whole file), or None."""
    from safetensors import SafetensorError, safe_open

    d = Path(name)
    for f in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f.name, str(e).splitlines()[0][:120]
    return None


def load_teacher(name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
                 who: str = "--teacher"):
    """(model, tokenizer) from a hub id or a local path."""
    tokenizer = load_tokenizer(name, revision, who)
    return load_model(name, device, dtype, revision, who), tokenizer


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
