"""xlstm's vanilla sLSTM step made capturable: its pointwise step decides one branch on the host, which a CUDA graph
cannot hold, so while the static decoder steps (student/inference/decode.py) the cells use the same equations with the
choice made on the device."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _slstm_pointwise(Wx, Ry, b, states, constants):
    """xlstm's vanilla sLSTM pointwise step (xlstm/blocks/slstm/src/vanilla/slstm.py) without its host branch:
    `if torch.all(n == 0.0)` reads a value on the host, which a CUDA graph cannot hold, so the same choice is made
    on the device with torch.where. Same equations, same dtypes; tests/test_static_decode.py holds the v1 step to
    decode.py's (xlstm's own cell)."""
    from torch.nn.functional import logsigmoid

    raw = Wx + Ry + b  # (B, 4H)
    y, c, n, m = torch.unbind(states.view(4, states.shape[1], -1), dim=0)  # (B, H) each
    iraw, fraw, zraw, oraw = torch.unbind(raw.view(raw.shape[0], 4, -1), dim=1)
    logfplusm = m + logsigmoid(fraw)
    mnew = torch.where((n == 0.0).all(), iraw, torch.max(iraw, logfplusm))
    ogate = torch.sigmoid(oraw)
    igate = torch.minimum(torch.exp(iraw - mnew), torch.ones_like(iraw))
    fgate = torch.minimum(torch.exp(logfplusm - mnew), torch.ones_like(iraw))
    cnew = fgate * c + igate * torch.tanh(zraw)
    nnew = fgate * n + igate
    ynew = ogate * cnew / nnew
    return torch.stack((ynew, cnew, nnew, mnew), dim=0), torch.stack((igate, fgate, zraw, ogate), dim=0)


@contextmanager
def branch_free_slstm(model):
    """While inside: every vanilla sLSTM cell of the model uses _slstm_pointwise (its own function restored on exit)."""
    cells = [c for blk in getattr(getattr(model, "blocks", None), "blocks", [])
             if (c := getattr(blk.xlstm, "slstm_cell", None)) is not None and hasattr(c, "pointwise")]
    saved = [c.pointwise for c in cells]
    for c in cells:
        c.pointwise = _slstm_pointwise
    try:
        yield
    finally:
        for c, fn in zip(cells, saved):
            c.pointwise = fn
