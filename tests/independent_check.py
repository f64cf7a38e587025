"""Checks a cache against transformers using only json, h5py, numpy, safetensors and transformers.

Nothing from tcache is imported here: this re-derives what the cache claims from the raw files.
Also usable as a script on a whole cache:

    python tests/independent_check.py CACHE TEACHER_DIR DATA_JSONL [--rows N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import torch


# QLoRA's NormalFloat-4 levels, copied from the paper's appendix (Dettmers et al. 2023), not from tcache.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def decode_nf4(raw: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(..., D/2) uint8 codes, (..., D/32) scales -> (..., D) float64 values."""
    codes = np.stack([raw & 0x0F, raw >> 4], axis=-1)  # (..., D/2, 2): low nibble is the even index
    values = NF4[codes.reshape(*scale.shape, 32)] * scale.astype(np.float64)[..., None]  # (..., D/32, 32)
    return values.reshape(*raw.shape[:-1], raw.shape[-1] * 2)


def decode_hidden_values(stored: dict, dtype: str) -> np.ndarray:
    """Stored `hidden` (and `hidden_scale`) arrays of a cache's dtype -> the exact values they stand for, in
    float64, shaped like `hidden` with D values: fp16 as is, bf16 through torch's own bfloat16, int8 as
    q * scale, nf4 by the paper's levels (low nibble first). Every product here is exact in float64 (a
    float32 level or an int8 times an fp16 scale), so float32 decoders must equal it cast to float32."""
    raw = stored["hidden"]
    if dtype == "float16":
        return raw.astype(np.float64)
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).double().numpy()
    scale = stored["hidden_scale"].astype(np.float64)
    if dtype == "int8":
        return raw.astype(np.float64) * scale[..., None]
    if dtype == "nf4":
        return decode_nf4(raw, scale)
    raise ValueError(f"unknown hidden dtype {dtype}")


def _check_nf4(raw: np.ndarray, scale: np.ndarray, ref_h: np.ndarray) -> np.ndarray:
    """Decode nf4 (two codes a byte, low nibble first; 32-value blocks, fp16 absmax) and check that every
    code is the level nearest to ref / absmax. Returns the decoded values, shaped like ref_h."""
    codes = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(ref_h.shape)  # (T, G, D)
    blocks = ref_h.reshape(*ref_h.shape[:-1], -1, 32)  # (T, G, D/32, 32)
    scale = scale.astype(np.float64).reshape(blocks.shape[:-1])  # (T, G, D/32)
    absmax = np.abs(blocks).max(-1)
    np.testing.assert_allclose(scale, absmax, rtol=2e-3, atol=1e-6)  # fp16 rounding + recompute noise
    x = blocks / np.where(scale > 0, scale, 1)[..., None]  # (T, G, D/32, 32), in [-1, 1]
    dist = np.abs(x[..., None] - NF4)  # (T, G, D/32, 32, 16)
    chosen = np.take_along_axis(dist, codes.reshape(x.shape)[..., None].astype(np.int64), -1)[..., 0]
    assert np.all(chosen <= dist.min(-1) + 2e-3), "nf4 code is not the nearest level"
    return (NF4[codes.reshape(x.shape)] * scale[..., None]).reshape(ref_h.shape)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_files(got: Path, want: Path) -> None:
    """The shards and teacher files of cache `got` are byte for byte those of cache `want`: the same file names,
    each rehashed from its bytes on disk here (not the digests either manifest recorded)."""
    def files(root: Path) -> dict[str, str]:
        paths = [*root.glob("shard-*"), *(root / "teacher").rglob("*")]
        return {p.relative_to(root).as_posix(): _sha256(p) for p in paths if p.is_file()}

    a, b = files(Path(got)), files(Path(want))
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    assert any(name.startswith("shard-") for name in b)
    differ = [name for name in b if a[name] != b[name]]
    assert not differ, f"files differ from the uninterrupted build's: {differ}"


def read_cache(cache: Path) -> tuple[dict, dict[str, np.ndarray]]:
    manifest = json.loads((cache / "manifest.json").read_text())
    fields: dict[str, list] = {}
    for shard in manifest["shards"]:
        path = cache / shard["file"]
        assert _sha256(path) == shard["sha256"], f"{path}: sha256 differs from the manifest"
        with h5py.File(path, "r") as f:
            assert f["input_ids"].chunks == (1, *f["input_ids"].shape[1:]), "chunks must be one row"
            for name in ("input_ids", "hidden", "hidden_scale", "topk_logprobs", "topk_ids"):
                if name in f:
                    fields.setdefault(name, []).append(f[name][:])
    return manifest, {k: np.concatenate(v) for k, v in fields.items()}


def packed_reference(data_jsonl: Path, tokenizer, seq_len: int, rows: int) -> np.ndarray:
    """Docs in file order, no special tokens, EOS after each, cut into rows (the documented rule)."""
    stream: list[int] = []
    with open(data_jsonl) as f:
        for line in f:
            text = json.loads(line)["text"]
            if text:
                stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(stream) >= rows * seq_len:
                break
    return np.asarray(stream[: rows * seq_len]).reshape(-1, seq_len)


def check_cache(cache: Path, teacher_dir: Path, data_jsonl: Path | None = None, rows: int | None = None,
                hidden_rtol: float = 2e-3, logprob_atol: float = 2e-4) -> dict:
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest, data = read_cache(Path(cache))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    n = len(data["input_ids"]) if rows is None else min(rows, len(data["input_ids"]))
    seq_len, k, groups = manifest["seq_len"], manifest["top_k"], manifest["layer_groups"]
    assert n * seq_len <= manifest["tokens"] and len(data["input_ids"]) * seq_len == manifest["tokens"]

    if data_jsonl is not None:
        ref_ids = packed_reference(Path(data_jsonl), tokenizer, seq_len, n)
        np.testing.assert_array_equal(data["input_ids"][:n].astype(np.int64), ref_ids)

    emb_path = str(Path(cache) / "teacher" / "embeddings.safetensors")
    emb = {k: v.astype(np.float32) for k, v in load_file(emb_path).items()}
    np.testing.assert_allclose(emb["embed_tokens"], model.get_input_embeddings().weight.detach().numpy(), rtol=0, atol=0)
    with safe_open(emb_path, "np") as f:
        tied = (f.metadata() or {}).get("tied_lm_head") == "true"  # caches before schema v3 have no metadata
    assert tied == (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    head = emb["embed_tokens"] if tied else emb["lm_head"]  # a tied head is stored once
    np.testing.assert_allclose(head, model.get_output_embeddings().weight.detach().numpy(), rtol=0, atol=0)

    worst = {"hidden_rel": 0.0, "logprob_abs": 0.0, "tail_abs": 0.0, "id_mismatch_untied": 0}
    assert ("hidden" in data) == (manifest["hidden_groups"] > 0)
    for r in range(n):
        ids = torch.from_numpy(data["input_ids"][r].astype(np.int64))[None]  # (1, T)
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        if groups:
            layers = torch.stack(out.hidden_states[1:])  # (L, 1, T, D)
            ref_h = torch.stack([layers[a:b].mean(0) for a, b in groups], dim=2)[0].numpy()  # (T, G, D)
            kind = manifest["fields"]["hidden"]["dtype"]
            raw = data["hidden"][r]
            if kind == "int8":  # value = q * scale, scale = absmax / 127: error at most half a step
                scale = data["hidden_scale"][r].astype(np.float32).reshape(ref_h.shape[:-1] + (1,))  # (T, G, 1)
                # the scale is the teacher's own absmax / 127 per position (fp16 rounding: 2^-11, plus the
                # recompute noise), not whatever the encoder chose; and the largest value uses the full range
                absmax = np.abs(ref_h.astype(np.float64)).max(-1)  # (T, G)
                np.testing.assert_allclose(scale[..., 0].astype(np.float64), absmax / 127, rtol=2e-3, atol=1e-7,
                                           err_msg="int8 hidden_scale is not absmax / 127 of the teacher's values")
                q_max = np.abs(raw.astype(np.int64).reshape(ref_h.shape)).max(-1)  # (T, G)
                assert np.all(q_max[absmax > 0] == 127), "int8: a position's largest |q| is not 127"
                got_h = raw.astype(np.float32).reshape(ref_h.shape) * scale
                bound = 0.505 * scale + 1e-3 * np.abs(ref_h).max(-1, keepdims=True)
                assert np.all(np.abs(got_h - ref_h) <= bound), "int8 hidden off by more than half a step"
            elif kind == "nf4":
                got_h = _check_nf4(raw, data["hidden_scale"][r], ref_h)
            else:
                got_h = (raw.astype(np.float32) if kind == "float16" else
                         torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()).reshape(ref_h.shape)
                tol = hidden_rtol if kind == "float16" else 8e-3  # bf16 keeps 8 bits of mantissa
                np.testing.assert_allclose(got_h, ref_h, rtol=tol, atol=tol * np.abs(ref_h).max())
            rel = np.abs(got_h - ref_h).max() / np.abs(ref_h).max()
            worst["hidden_rel"] = max(worst["hidden_rel"], float(rel))

        ref_lp = torch.log_softmax(out.logits[0].double(), -1).numpy()  # (T, V) float64
        got_lp, got_ids = data["topk_logprobs"][r].astype(np.float64), data["topk_ids"][r].astype(np.int64)
        assert np.all(np.diff(got_lp, axis=-1) <= 0), "top-k log-probs must be sorted descending"
        assert str(data["topk_logprobs"].dtype) == manifest["fields"]["topk_logprobs"]["dtype"]
        # The cached value at each cached id is the teacher's log-prob of that id ...
        at_ids = np.take_along_axis(ref_lp, got_ids, -1)
        worst["logprob_abs"] = max(worst["logprob_abs"], float(np.abs(at_ids - got_lp).max()))
        lp_tol = logprob_atol + (np.abs(at_ids) * 2**-11 if manifest["fields"]["topk_logprobs"]["dtype"] == "float16" else 0)
        np.testing.assert_array_less(np.abs(got_lp - at_ids), lp_tol + 1e-12)
        # ... and those ids are the k largest: equal to the reference top-k up to ties.
        ref_top = -np.sort(-ref_lp, axis=-1)[:, :k]
        np.testing.assert_array_less(np.abs(got_lp - ref_top), lp_tol + 1e-12)
        ref_ids_top = np.argsort(-ref_lp, axis=-1, kind="stable")[:, :k]
        srt = -np.sort(-ref_lp, axis=-1)  # (T, V)
        ext = np.concatenate([np.full((len(srt), 1), np.inf), srt[:, :k],
                              srt[:, k:k + 1] if k < srt.shape[1] else np.full((len(srt), 1), -np.inf)], -1)
        gaps = np.abs(np.diff(ext, axis=-1))  # (T, k+1): gap before and after each top-k slot
        tie_near = (gaps[:, :-1] < 1e-4) | (gaps[:, 1:] < 1e-4)  # (T, k)
        mismatch = (ref_ids_top != got_ids) & ~tie_near
        worst["id_mismatch_untied"] += int(mismatch.sum())
        assert not mismatch.any(), "top-k ids differ from transformers where there is no tie"
        # Tail mass: 1 - sum(p_topk) equals the teacher's mass outside the cached ids.
        mask = np.ones_like(ref_lp, dtype=bool)
        np.put_along_axis(mask, got_ids, False, -1)
        ref_tail = np.where(mask, np.exp(ref_lp), 0).sum(-1)
        got_tail = 1 - np.exp(got_lp).sum(-1)
        worst["tail_abs"] = max(worst["tail_abs"], float(np.abs(ref_tail - got_tail).max()))
        tail_tol = 1e-4 if manifest["fields"]["topk_logprobs"]["dtype"] == "float32" else 2e-3
        np.testing.assert_allclose(got_tail, ref_tail, atol=tail_tol, rtol=0)
    worst["rows_checked"] = n
    return worst


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cache", type=Path)
    ap.add_argument("teacher", type=Path)
    ap.add_argument("data", type=Path, nargs="?")
    ap.add_argument("--rows", type=int, default=None)
    a = ap.parse_args()
    print(json.dumps(check_cache(a.cache, a.teacher, a.data, a.rows), indent=2))
    print("independent check passed")
