"""speed.py's rows: the models each row builds (random weights at a shape), and what a model reads and holds per
decode step (parameter bytes, KV or recurrent state bytes, compiled or captured graphs)."""

from __future__ import annotations

import torch

SHAPES = {
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=65536,
                         tie_word_embeddings=True, rope_theta=100000.0),
    # 4 layers: v1 gets 2 blocks (one sLSTM, one mLSTM), so the smoke run covers both block types
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
ROWS = ("teacher-static", "teacher-eager", "v2", "hybrid", "v1", "hybrid-joint", "v2-eager", "hybrid-eager",
        "v1-eager")
"""Table order."""
DEFAULT_ROWS = ROWS[:5]
"""--models' default: the two teacher rows and each student as users get it; the -eager student rows (decode.py's
concatenating step, the path before the static one) only when named."""


def count(text: str) -> int:
    """'2k' -> 2048, '512' -> 512."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def label(n: int) -> str:
    """2048 -> '2k', 512 -> '512' (speed.json's context keys)."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def is_teacher(row: str) -> bool:
    return row.startswith("teacher")


def family(row: str) -> str:
    """teacher, v2, hybrid, hybrid-joint (--mix joint) or v1: the model a row builds."""
    return "teacher" if is_teacher(row) else row.removesuffix("-eager")


def build(row: str, shape: dict, device: torch.device, dtype: torch.dtype):
    """The row's model, eval mode: the teacher as transformers' LlamaForCausalLM, a student as the exported class."""
    def make():
        from transformers import LlamaConfig, LlamaForCausalLM

        from tcache.student.training.recipes import _v1_sizes, _v2_sizes
        from tcache.student.inference.hf import to_hf
        from tcache.student.models.hybrid import HybridConfig, HybridStudent
        from tcache.student.models.xlstm import Student, StudentConfig

        torch.manual_seed(0)
        cfg, fam = LlamaConfig(**shape), family(row)
        if fam == "teacher":
            return LlamaForCausalLM(cfg)
        if fam.startswith("hybrid"):
            mix = "joint" if fam == "hybrid-joint" else "gate"
            student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=32, sinks=4, mix=mix))
            student.lm.config._attn_implementation = "sdpa"
        else:
            blocks, heads, slstm_at = {"v1": _v1_sizes, "v2": _v2_sizes}[fam](cfg.num_hidden_layers,
                                                                               cfg.num_attention_heads)
            student = Student(StudentConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_blocks=blocks,
                                            num_heads=heads, slstm_at=slstm_at, context_length=512, recipe=fam))
        return to_hf(student, {"config": {"recipe": fam.removesuffix("-joint")}})

    try:
        with torch.device(device):  # random init where the model runs: on the CPU it takes seconds per model
            model = make()
    except Exception as e:  # something in a constructor that insists on the CPU: build there, then move
        print(f"[{row}] building on {device} failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
        model = make()
    return model.to(device, dtype).eval()


def param_bytes_read(model) -> int:
    """Bytes of the parameters one decode step reads: each tensor once (tied ones share storage), without an input
    embedding table that is not also the output head (a lookup reads B rows of it, not the table)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    skip = set()
    if emb is not None and head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        skip.add(emb.weight.data_ptr())
    seen = {}
    for p in model.parameters():
        if p.data_ptr() not in skip:
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def kv_bytes(model, B: int, positions: int) -> int:
    """Bytes of a transformers KV cache of B x positions for this (Llama-like) model."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize * B * positions


def state_bytes(cache) -> int:
    """Bytes a generation state holds: a student's DecodeState / StaticDecoder count their storage (nbytes()); a
    transformers cache its layers' keys and values."""
    if callable(getattr(cache, "nbytes", None)):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):  # DynamicCache / StaticCache, transformers >= 4.56
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


def graph_count(row: str, model) -> int | None:
    """Compiled or captured graphs so far: torch._dynamo's count for the teacher rows (generate compiles the static
    cache's decode step on CUDA), the static decode path's CUDA-graph captures for a student (None without it)."""
    if is_teacher(row):
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    captures = getattr(model, "static_decode_captures", None)
    return int(captures) if captures is not None else None


def added(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def graph_key(row: str) -> str:
    return "recompiles" if is_teacher(row) else "captures"

