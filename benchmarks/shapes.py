"""Random-weight teachers of the seeds' shapes, for speed and memory benchmarks (no hub access needed).

The weights are random, so only shapes matter: the shared teacher's tokenizer is saved beside them (its
ids fit every vocabulary here)."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {
    # a smoke-test shape for CPU runs of the benchmark scripts
    "tiny": dict(arch="llama", vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-360M: the seeds' teacher (Distil-xLSTM v2)
    "smollm2-360m": dict(arch="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         tie_word_embeddings=True, max_position_embeddings=2048),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=32768),
}


def make_teacher(shape: str, path: Path, tokenizer_from: str) -> Path:
    """Write a bf16 random-init teacher of `shape` to `path` (once) and return it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return path
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config_cls(bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5, **spec)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path
