"""How each hidden dtype is stored: one codec per dtype, in a table that schema.field_specs, encode_fields
and decode_hidden dispatch through.

A codec knows the datasets its dtype stores (row shapes and dtypes, for schema.field_specs), encodes the
teacher's fp32 hidden means with torch on the build's device, and decodes stored arrays with numpy
(readers need no torch). torch is imported inside the encoders only: schema.field_specs reads this table,
and the format side of a cache stays importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tcache.teachercache.schema import (HIDDEN, HIDDEN_SCALE, INPUT_IDS, NF4_BLOCK, NF4_LEVELS, TOPK_IDS,
                                        TOPK_LOGPROBS, FieldSpec)
from tcache.errors import TcacheError

if TYPE_CHECKING:
    import torch


class HiddenCodec:
    """One stored hidden dtype. `positions` is a row's leading shape: (T,) or (T, G)."""

    dtype: str
    """The logical dtype, as recorded in the manifest's fields."""

    def specs(self, positions: tuple[int, ...], hidden_size: int) -> dict[str, FieldSpec]:
        """The datasets this dtype stores: `hidden` and, for scaled dtypes, `hidden_scale`."""
        return {HIDDEN: FieldSpec(self.dtype, (*positions, hidden_size))}

    def encode(self, hidden: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """fp32 hidden means (B, T, G, D) -> the tensors to store, on the same device, G kept."""
        raise NotImplementedError

    def decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        """Stored arrays of one or more rows -> float32 values, the shape of `hidden` with D values."""
        raise NotImplementedError


class Float16Codec(HiddenCodec):
    dtype = "float16"

    def encode(self, hidden):
        import torch

        return {HIDDEN: hidden.to(torch.float16)}  # (B, T, G, D)

    def decode(self, stored):
        return stored[HIDDEN].astype(np.float32)


class BFloat16Codec(HiddenCodec):
    """HDF5 has no bfloat16: the values are stored as their uint16 bit pattern."""

    dtype = "bfloat16"

    def encode(self, hidden):
        import torch

        return {HIDDEN: hidden.to(torch.bfloat16).view(torch.int16)}  # (B, T, G, D) int16 bits, stored as uint16

    def decode(self, stored):
        return (stored[HIDDEN].astype(np.uint32) << 16).view(np.float32)


class Int8Codec(HiddenCodec):
    """Per position and group: scale = absmax / 127 rounded to fp16, values round(h / scale)."""

    dtype = "int8"

    def specs(self, positions, hidden_size):
        return {HIDDEN: FieldSpec("int8", (*positions, hidden_size)), HIDDEN_SCALE: FieldSpec("float16", positions)}

    def encode(self, hidden):
        import torch

        scale = (hidden.abs().amax(-1) / 127).to(torch.float16)  # (B, T, G)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round(hidden / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # (B, T, G, D)
        return {HIDDEN: q, HIDDEN_SCALE: scale}

    def decode(self, stored):
        return stored[HIDDEN].astype(np.float32) * stored[HIDDEN_SCALE].astype(np.float32)[..., None]


_NF4_MIDPOINTS: dict = {}


def _nf4_midpoints(device) -> "torch.Tensor":
    """Decision boundaries between NF4 levels, kept per device: a host-to-device copy per batch would
    make the build wait for the GPU to drain."""
    import torch

    if device not in _NF4_MIDPOINTS:
        _NF4_MIDPOINTS[device] = torch.from_numpy((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).to(device)
    return _NF4_MIDPOINTS[device]


class NF4Codec(HiddenCodec):
    """Per block of 32 values: scale = absmax (fp16), code = nearest NF4 level of h / scale, two a byte
    (the even-indexed value in the low nibble)."""

    dtype = "nf4"

    def specs(self, positions, hidden_size):
        if hidden_size % NF4_BLOCK:
            raise TcacheError(f"--hidden-dtype nf4 needs a hidden size divisible by {NF4_BLOCK} (the teacher "
                              f"has {hidden_size}); use --hidden-dtype int8")
        return {HIDDEN: FieldSpec("nf4", (*positions, hidden_size // 2)),
                HIDDEN_SCALE: FieldSpec("float16", (*positions, hidden_size // NF4_BLOCK))}

    def encode(self, hidden):
        import torch

        B, T, G, D = hidden.shape
        blocks = hidden.reshape(B, T, G, D // NF4_BLOCK, NF4_BLOCK)  # (B, T, G, D/32, 32)
        scale = blocks.abs().amax(-1).to(torch.float16)  # (B, T, G, D/32)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        code = torch.bucketize(blocks / safe.unsqueeze(-1), _nf4_midpoints(hidden.device))  # nearest level, 0..15
        code = code.to(torch.uint8).reshape(B, T, G, D // 2, 2)
        return {HIDDEN: code[..., 0] | (code[..., 1] << 4), HIDDEN_SCALE: scale}  # (B, T, G, D/2), (B, T, G, D/32)

    def decode(self, stored):
        h = stored[HIDDEN]
        code = np.stack([h & 0x0F, h >> 4], axis=-1)  # (..., D/2, 2)
        scale = stored[HIDDEN_SCALE].astype(np.float32)  # (..., D/32)
        values = NF4_LEVELS[code.reshape(*scale.shape, NF4_BLOCK)] * scale[..., None]  # (..., D/32, 32)
        return values.reshape(*h.shape[:-1], h.shape[-1] * 2)


# logical dtype (schema.HIDDEN_DTYPES' values, as recorded in the manifest) -> codec
HIDDEN_CODECS: dict[str, HiddenCodec] = {c.dtype: c for c in (NF4Codec(), Int8Codec(), Float16Codec(), BFloat16Codec())}


def _codec(dtype: str) -> HiddenCodec:
    if dtype not in HIDDEN_CODECS:
        raise ValueError(f"unknown hidden dtype {dtype}")
    return HIDDEN_CODECS[dtype]


def encode_hidden(hidden: "torch.Tensor", dtype: str) -> dict[str, "torch.Tensor"]:
    """fp32 hidden means (B, T, G, D) -> the tensors to store (on the same device), G squeezed when 1.
    bfloat16 comes back as its int16 bit pattern (stored as uint16)."""
    out = _codec(dtype).encode(hidden)
    return {k: v.squeeze(2) for k, v in out.items()} if hidden.shape[2] == 1 else out


def encode_fields(input_ids: "torch.Tensor", hidden: "torch.Tensor | None", topk_logprobs: "torch.Tensor",
                  topk_ids: "torch.Tensor", specs: dict[str, FieldSpec]) -> dict[str, "torch.Tensor"]:
    """One batch of teacher targets -> the tensors a shard stores, in the dtypes of `specs`. Ids are
    narrowed on the device (uint16 storage comes back as int16 with the same bits) so that copies to the
    host move no more bytes than the shard stores."""
    import torch

    def ids(t: "torch.Tensor") -> "torch.Tensor":
        t = t.to(torch.int32)
        return t.to(torch.int16) if specs[INPUT_IDS].storage_dtype == "uint16" else t  # int32 -> int16 wraps

    fields = {
        INPUT_IDS: ids(input_ids),  # (B, T)
        TOPK_LOGPROBS: topk_logprobs.to(getattr(torch, specs[TOPK_LOGPROBS].dtype)),  # (B, T, k)
        TOPK_IDS: ids(topk_ids),  # (B, T, k)
    }
    if HIDDEN in specs:
        fields.update(encode_hidden(hidden, specs[HIDDEN].dtype))  # (B, T, [G,] D)
    return fields


def decode_hidden(row: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """Stored hidden arrays of one or more rows -> float32 values, same shape as `hidden`."""
    return _codec(dtype).decode(row)
