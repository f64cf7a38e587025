"""`tcache export` and `tcache generate` as library calls: their configs, and text generation from a student (a
`tcache distill` output or its export) through transformers' generate() with the recurrent state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tcache.device import resolve_device
from tcache.errors import TcacheError
from tcache.fields import opt


@dataclass
class ExportConfig:
    student: str = opt(argument=True)
    """A `tcache distill` output directory."""
    out: str = opt()
    """The HF model directory to write (config.json, model.safetensors, modeling file, tokenizer)."""
    overwrite: bool = False
    """Replace an existing export at --out."""


@dataclass
class GenerateConfig:
    model: str = opt(argument=True)
    """A `tcache distill` output directory or a `tcache export` directory."""
    prompt: str = "The"
    """Text to continue."""
    max_new_tokens: int = 64
    """Tokens to generate."""
    temperature: float = 0.0
    """0: greedy; above 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (with --temperature above 0)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise TcacheError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise TcacheError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TcacheError(f"--top-p must be in (0, 1], got {self.top_p}")


def load_hf_student(path: str | Path, device: torch.device):
    """(transformers model, tokenizer) from a `tcache distill` output or a `tcache export` directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tcache.student.hf import MODEL_TYPE, to_hf
    from tcache.student.io import is_student_dir, load_student

    path = Path(path)
    if is_student_dir(path):
        model, doc = load_student(path, torch.device("cpu"))
        hf = to_hf(model, doc)
    else:
        try:
            is_export = AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == MODEL_TYPE
        except (OSError, ValueError):
            is_export = False
        if not is_export:
            raise TcacheError(f"{path} is neither a `tcache distill` output nor a `tcache export`; pass one of them")
        hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    return hf.to(device).eval(), AutoTokenizer.from_pretrained(path)


def generate(cfg: GenerateConfig) -> dict:
    """The prompt's continuation, with the tokens/s of the decode."""
    device = resolve_device(cfg.device)
    model, tok = load_hf_student(cfg.model, device)
    ids = tok(cfg.prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
    if ids.shape[1] == 0:
        raise TcacheError("--prompt tokenises to nothing; pass some text")
    sample = cfg.temperature > 0
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                         temperature=cfg.temperature if sample else None, top_p=cfg.top_p if sample else None,
                         top_k=None, pad_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {"prompt": cfg.prompt, "text": tok.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "seconds": round(seconds, 3), "tokens_per_s": round(new.numel() / max(seconds, 1e-9), 1),
            "device": str(device)}


def export(cfg: ExportConfig) -> Path:
    from tcache.student.hf import export_student

    return export_student(cfg.student, cfg.out, cfg.overwrite)
