"""Online targets: the build's own teacher pass run on each training batch instead of reading the cache, for
comparison runs (`tcache distill --online-teacher`). The CLI builds it and hands it to the training loop as
its `targets=`; the student side never imports the teacher."""

from __future__ import annotations

from typing import Callable

import torch

from tcache.device import resolve_dtype
from tcache.errors import TcacheError
from tcache.hf import load_teacher, tokenizer_sha256
from tcache.teachercache import schema
from tcache.teachercache.teacher import TeacherPass


def online_targets(name: str, manifest, device: torch.device) -> Callable[[torch.Tensor], dict]:
    """ids (B, T) -> the fields a cache row of `manifest` holds for them (same top-k, same layer groups),
    computed now by the teacher `name`, which must share the cache's tokenizer."""
    model, tokenizer = load_teacher(name, device, resolve_dtype("auto", device))
    if tokenizer_sha256(tokenizer) != manifest.tokenizer["sha256"]:
        raise TcacheError(f"--online-teacher {name}: its tokenizer differs from the cache's; "
                          "pass the teacher the cache was built with")
    teacher = TeacherPass(model, list(manifest.layer_groups), manifest.top_k)
    with_hidden = schema.HIDDEN in manifest.fields

    def targets(ids: torch.Tensor) -> dict:
        tgt = teacher(ids)
        out = {schema.TOPK_LOGPROBS: tgt.topk_logprobs, schema.TOPK_IDS: tgt.topk_ids}  # (B, T, k) x2
        if with_hidden:
            out[schema.HIDDEN] = tgt.hidden  # (B, T, G, D)
        return out

    return targets
