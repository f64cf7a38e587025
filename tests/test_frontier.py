"""benchmarks/frontier.py's state bytes equal what generation really holds: the static decode state of a real hybrid
student (StaticDecoder.nbytes, every branch choice and dtype) and, for a full-attention layer, transformers' own KV
cache after a prefill of the same length."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from frontier import state_bytes  # noqa: E402


def teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("branches, fdim, heads", [("hybrid", None, "query"), ("window", None, "query"),
                                                   ("mlstm", None, "query"), ("hybrid", 16, "query"),
                                                   ("hybrid", 48, "query"), ("hybrid", 16, "kv")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_static_decode_state(branches, fdim, heads, dtype):
    from tcache.student.inference import prefill
    from tcache.student.models.hybrid import HybridConfig, HybridStudent
    from tcache.student.inference.decode import StaticDecoder

    lm = teacher()
    model = HybridStudent(lm, HybridConfig(window=8, sinks=2, branches=branches, feature_dim=fdim,
                                                 mlstm_heads=heads)).to(dtype).eval()
    model.set_kernel(torch.device("cpu"))
    with torch.no_grad():
        _, state = prefill.prefill(model, torch.randint(0, 97, (3, 30)))
    got = StaticDecoder(model, state, capture=False).nbytes() - 8  # less its position counter (one int64)
    assert got == state_bytes(lm.config, 8, 2, branches, dtype_bytes=dtype.itemsize, batch=3, feature_dim=fdim,
                               mlstm_heads=heads)


def test_a_full_attention_layer_counts_transformers_kv_cache():
    lm = teacher().eval()
    T = 50
    with torch.no_grad():
        cache = lm(torch.randint(0, 97, (2, T)), use_cache=True).past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    per_layer = kv // lm.config.num_hidden_layers
    with_one = state_bytes(lm.config, 8, 2, full_attention_layers=1, context=T, dtype_bytes=4, batch=2)
    without = state_bytes(lm.config, 8, 2, full_attention_layers=0, context=T, dtype_bytes=4, batch=2)
    converted = without // lm.config.num_hidden_layers
    assert with_one == without - converted + per_layer


def test_points_read_a_quality_json():
    """frontier.points takes quality.py's rows: a hybrid row by its flags, a window cut as window-only and untrained,
    non-hybrid and stage-I-only rows left out."""
    from frontier import points

    cfg = teacher().config
    sets = {"valid": {"vs_teacher": 1.1}, "pydocs": {"vs_teacher": 1.5}}
    quality = {"runs": {
        "hybrid-w64": {"recipe": "hybrid", "flags": ["--window", "64"], "sets": sets},
        "cut-w64": {"recipe": "window-cut", "flags": ["--window", "64", "--sinks", "4"], "sets": sets},
        "hybrid-full": {"recipe": "hybrid", "flags": ["--window", "32", "--full-attention-layers", "0,2"], "sets": sets},
        "hybrid-stage1-only": {"recipe": "hybrid", "flags": ["--window", "32", "--stage", "1"], "sets": sets},
        "v2": {"recipe": "v2", "flags": [], "sets": sets}}}
    got = {p["name"]: p for p in points(quality, cfg)}
    assert sorted(got) == ["cut-w64", "hybrid-full", "hybrid-w64"]
    assert got["hybrid-w64"]["state_bytes"] == state_bytes(cfg, 64, 4, "hybrid")
    assert got["cut-w64"]["state_bytes"] == state_bytes(cfg, 64, 4, "window") and not got["cut-w64"]["trained"]
    assert got["hybrid-full"]["state_bytes"] == state_bytes(cfg, 32, 4, "hybrid", full_attention_layers=2)
    assert got["hybrid-w64"]["x_teacher"] == {"valid": 1.1, "pydocs": 1.5}
