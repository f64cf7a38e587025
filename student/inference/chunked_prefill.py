"""Chunked prefill for xLSTM students (v1, v2): `prefill.prefill` over a long prompt, `chunk` tokens at a time.

`prefill.prefill` runs the chunkwise mLSTM kernel once over the whole prompt. At long T x batch that call fails
inside mlstm_kernels' Triton kernel (H200, batch 8, 32k tokens: "Triton Error [CUDA]: invalid argument", a grid
dimension limit). Here the prompt runs in chunks of at most `chunk` tokens, each starting from the state the last
one left, so the final state and every position's logits are the one-shot prefill's (up to float rounding:
tests/test_chunked_prefill.py):

    chunk 0     prefill.prefill itself
    chunk k>0   each block continues from its DecodeState entry:
      mLSTM     xlstm's mLSTMLayer.forward takes no initial state, so its pieces run here in its order (proj_up,
                the causal conv given its last inputs, the cell with the mLSTM state as the kernel's c/n/m_initial,
                skip, output gate, proj_down); the cell itself (gates, outnorm) is xlstm's, its backend_fn swapped
                for the call, as prefill.prefill swaps it
      sLSTM     xlstm's sLSTMLayer.forward takes conv_state / slstm_state and returns the last states: called so
      block     xLSTMBlock.forward's pre-norm, residual and FFN, mirrored (its forward cannot pass the states)

Between chunks the state is kept in xlstm's step convention (so after any chunk it is a usable DecodeState):
    mlstm_state  C (B, NH, DH, DH), n (B, NH, DH, 1), m (B, NH, 1, 1): xlstm's step scales k by DH^-1/2 where
                 mlstm_kernels scales q, so C and n are the kernel's times DH^-1/2 (prefill._keep_mlstm_state);
                 divided back when handed to the kernel
    conv_state   (the last kernel_size conv inputs (B, ks, F),): xlstm's conv step rolls it and overwrites the
                 oldest, so the parallel conv needs only its last ks - 1 (CausalConv1d.forward's conv_state)
    slstm_state  the sLSTM cell's state, as its forward takes and returns it
"""

from __future__ import annotations

import torch

from tcache.errors import TcacheError
from tcache.student.inference import prefill
from tcache.student.inference import slstm_cuda
@torch.no_grad()
def chunked_prefill(model, ids: torch.Tensor, keep: int = 0,
                    chunk: int = 8192) -> tuple[torch.Tensor, prefill.DecodeState]:
    """prefill.prefill's contract, run `chunk` tokens at a time: logits (B, keep or T, V) of the prompt ids (B, T)
    (of its last `keep` positions if keep > 0) and the state after its last token, for the decoder. A prompt of at
    most `chunk` tokens is prefill.prefill's. Take chunk a multiple of 64: the first chunk runs prefill.prefill, whose
    kernel adapter splits it into gcd(chunk, 64)-token kernel chunks (16 for chunk 1000: slower, and mlstm_kernels
    warns)."""
    if getattr(model, "family", None) == "hybrid":
        raise TcacheError("chunked_prefill is built for xLSTM students (v1, v2); a hybrid student prefills with "
                          "prefill.prefill")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    T = ids.shape[1]
    if T <= chunk:
        return prefill.prefill(model, ids, keep)
    # xlstm's CUDA sLSTM cells for every chunk where they run (v1 on a GPU with nvcc): the vanilla cell's Python loop
    # prefills ~0.5k tokens/s at the seeds' shape, so a 32k prompt took a minute (prefill.prefill swaps them for chunk
    # 0 by itself; inside this block its own swap finds the twins in place and leaves them)
    with slstm_cuda.cuda_cells(model, ids.device, model.embed.weight.dtype):
        return _chunked(model, ids, keep, chunk)


def _chunked(model, ids: torch.Tensor, keep: int, chunk: int) -> tuple[torch.Tensor, prefill.DecodeState]:
    T = ids.shape[1]
    first = 0 if keep <= 0 else T - min(keep, T)  # first position whose logits are returned
    # chunk 0: prefill.prefill; keep=1 when none of its logits are wanted (keep=0 would return all of them)
    want = max(0, chunk - first)
    logits0, state = prefill.prefill(model, ids[:, :chunk], keep=want or 1)
    outs = [logits0] if want else []
    kernel = _kernel_name(ids.device)
    for a in range(chunk, T, chunk):
        b = min(a + chunk, T)
        x = _continue(model, ids[:, a:b], state, kernel)  # (B, b - a, D), after the final norm
        need = b - max(a, first)
        if need > 0:
            outs.append(model.head(x[:, -need:]))  # (B, need, V)
    return torch.cat(outs, 1), state  # (B, keep or T, V)


def _kernel_name(device: torch.device) -> str:
    from tcache.student.models.hybrid import resolve_mlstm_kernel

    return resolve_mlstm_kernel("auto", device)  # the kernel prefill.prefill picks


def _continue(model, ids: torch.Tensor, state: prefill.DecodeState, kernel: str) -> torch.Tensor:
    """Student.features (no group means) over ids (B, S), every block starting from, and updating, its state."""
    x = model.embed(ids)  # (B, S, D)
    for blk, st in zip(model.blocks.blocks, state.layers):
        h = blk.xlstm_norm(x)
        layer = blk.xlstm
        y = _mlstm_layer(layer, h, st, kernel) if hasattr(layer, "mlstm_cell") else _slstm_layer(layer, h, st)
        x = x + y  # xLSTMBlock.forward
        if blk.ffn is not None:
            x = x + blk.ffn(blk.ffn_norm(x))
    state.pos += ids.shape[1]
    return model.norm(x)  # (B, S, D)


def _conv(conv, x: torch.Tensor, st: dict) -> torch.Tensor:
    """The causal conv over x (B, S, F) after the inputs kept in st; keeps the last ks inputs for the next call."""
    ks = conv.config.kernel_size
    if ks == 0:
        return x
    prev = st["conv_state"][0]  # (B, ks, F)
    y = conv(x, conv_state=prev)  # (B, S, F): CausalConv1d.forward prepends prev and drops its outputs
    st["conv_state"] = _last_inputs(prev, x, ks)
    return y


def _last_inputs(prev: torch.Tensor, x: torch.Tensor, ks: int) -> tuple[torch.Tensor]:
    """xlstm's step conv_state after the inputs x (B, S, F) followed those kept in prev (B, ks, F): the last ks,
    a copy (not a view of x)."""
    return (torch.cat([prev, x[:, -ks:]], 1)[:, -ks:].clone(),)  # (B, ks, F)


def _mlstm_layer(layer, x: torch.Tensor, st: dict, kernel: str) -> torch.Tensor:
    """xlstm's mLSTMLayer.forward (x (B, S, D) -> (B, S, D)) from the state in st, which it updates."""
    x_inner = layer.proj_up(x)
    x_mlstm, z = torch.split(x_inner, split_size_or_sections=layer.config._inner_embedding_dim, dim=-1)
    conv_act = layer.conv_act_fn(_conv(layer.conv1d, x_mlstm, st))
    q, k, v = layer.q_proj(conv_act), layer.k_proj(conv_act), layer.v_proj(x_mlstm)
    cell = layer.mlstm_cell
    fn = cell.backend_fn
    cell.backend_fn = _mlstm_from_state(st, kernel)
    try:
        h_tilde = cell(q=q, k=k, v=v)  # (B, S, H): xlstm's gates and outnorm around the kernel
    finally:
        cell.backend_fn = fn
    h = (h_tilde + layer.learnable_skip * conv_act) * layer.ogate_act_fn(z)
    return layer.dropout(layer.proj_down(h))


def _slstm_layer(layer, x: torch.Tensor, st: dict) -> torch.Tensor:
    """xlstm's sLSTMLayer.forward from the state in st, which it updates (the layer takes the states itself)."""
    ks = layer.config.conv1d_kernel_size
    prev = st["conv_state"][0] if ks > 0 else None  # (B, ks, F): the forward uses its last ks - 1
    out, new = layer(x, conv_state=prev, slstm_state=st["slstm_state"], return_last_state=True)
    if ks > 0:
        st["conv_state"] = _last_inputs(prev, x, ks)
    st["slstm_state"] = new["slstm_state"].clone()  # the cell's final state may view all S steps' states
    return out


def _mlstm_from_state(st: dict, name: str, chunk_size: int = 64, eps: float = 1e-6):
    """The mLSTM cell's backend for one chunk: mlstm_kernel.mlstm_kernel_fn's kernel call (fp32, eps, chunk size 64, end
    padding), from st's mLSTM state as the kernel's initial state; leaves the last state in st."""
    from mlstm_kernels.torch import get_mlstm_kernel

    from tcache.student.models.mlstm_kernel import pad_end, padded_length

    kernel = get_mlstm_kernel(name)

    def fn(queries, keys, values, igate_preact, fgate_preact, **_):
        # (B, NH, S, DH) x3, (B, NH, S, 1) x2 -> (B, NH, S, DH)
        S, dtype = queries.shape[2], queries.dtype
        scale = queries.shape[-1] ** -0.5
        c, n, m = st["mlstm_state"]  # xlstm's step convention: C, n scaled by DH^-1/2
        c0 = (c.float() / scale).contiguous()  # (B, NH, DH, DH)
        n0 = (n.float().squeeze(-1) / scale).contiguous()  # (B, NH, DH)
        m0 = m.float().reshape(m.shape[0], m.shape[1], 1).contiguous()  # (B, NH, 1)
        q, k, v = (t.float() for t in (queries, keys, values))
        i, f = igate_preact.squeeze(-1).float(), fgate_preact.squeeze(-1).float()  # (B, NH, S) x2
        # A chunk's tail can have any length; the Triton kernel takes only 16, 32, 64 or multiples of 64 (with
        # chunk_size 64; mlstm_kernels' select_heuristic_xl_chunk_kernel_params asserts it), so the end is padded
        # to one, as _mlstm_kernel_fn pads (mlstm_kernel.pad_end: a no-op on the outputs < S and on the last state)
        L = padded_length(S, chunk_size)
        pad, cs = L - S, min(chunk_size, L)
        if pad:
            q, k, v, i, f = pad_end(q, k, v, i, f, pad)  # (B, NH, L, DH) x3, (B, NH, L) x2
        h, (c1, n1, m1) = kernel(q=q, k=k, v=v, i=i, f=f, c_initial=c0, n_initial=n0, m_initial=m0,
                                 chunk_size=cs, autocast_kernel_dtype=torch.float32, eps=eps,
                                 return_last_states=True)
        st["mlstm_state"] = ((c1 * scale).to(dtype),  # (B, NH, DH, DH)
                             (n1 * scale).unsqueeze(-1).to(dtype),  # (B, NH, DH, 1)
                             m1.reshape(m1.shape[0], m1.shape[1], 1, 1).to(dtype, copy=True))  # (B, NH, 1, 1)
        return h[:, :, :S].to(dtype)  # (B, NH, S, DH)

    return fn
