"""LoRA for the hybrid's stage II (`--train lora`, LoLCATs' stage 2): peft's adapters on the converted teacher's
linear projections, the teacher's weights frozen, merged into those weights when the student is saved.

    y = W x + alpha / r * B (A dropout(x))          W frozen; A (r, d_in), B (d_out, r) train; B = 0 at init

Where the adapters go: peft replaces each targeted nn.Linear of `student.lm.model.layers` (the decoder layers)
by its LoRA layer, in place, at build time. A converted layer's `self_attn` *is* its HybridMixer (convert() put
it there), so `layers.i.self_attn.q_proj` is the mixer's own attribute: peft's replacement is set on the mixer
and the mixer calls the LoRA layer (tests/test_lora.py changes each adapter and sees the output move). The
teacher's attention module the mixer was built from is no longer in the model. Layers kept at full attention
(--full-attention-layers) get adapters on their own projections. With B = 0 the adapters add exactly nothing,
so stage I (which freezes them) trains the same model as without them.

Saving: merge_adapters() folds each adapter into its projection with peft's own merge (W + alpha / r * B A) and
puts the plain nn.Linear back, so student.json + model.safetensors, `tcache eval` and `tcache export` never see
peft. Checkpoints during training hold the adapters themselves (only trainable weights are checkpointed; a
resumed run rebuilds the same adapters from --seed, then loads them).
"""

from __future__ import annotations

import re

from torch import nn

from tcache.errors import TcacheError

_IN_A_LAYER = re.compile(r"model\.layers\.\d+\.(.+\.)?(?P<leaf>\w+)")


def _peft():
    try:
        import peft
    except ImportError:
        raise TcacheError("--train lora needs the peft package: pip install peft") from None
    return peft


def targets_in(student: nn.Module, names: list[str]) -> list[str]:
    """The full module names (in `student.lm`) of the teacher's nn.Linear layers in its decoder layers whose own name
    is in `names` (the mixers' gates are new parameters, trained in full, never adapted); a name that matches none is
    refused, naming what there is."""
    new = {id(p) for p in student.new_parameters()}
    found = [(n, m.group("leaf")) for n, mod in student.lm.named_modules()
             if isinstance(mod, nn.Linear) and id(mod.weight) not in new and (m := _IN_A_LAYER.fullmatch(n))]
    missing = [t for t in names if t not in {leaf for _, leaf in found}]
    if missing:
        have = ",".join(dict.fromkeys(leaf for _, leaf in found))
        raise TcacheError(f"--lora-targets {','.join(missing)}: no linear projection of that name in the teacher's "
                          f"decoder layers ({type(student.lm).__name__} has {have}); name some of those")
    return [n for n, leaf in found if leaf in names]


def add_adapters(student: nn.Module, rank: int, alpha: float, dropout: float, names: list[str]) -> dict:
    """Inject LoRA adapters (peft, adapter "default", no bias) into the projections `names` of every decoder layer
    of `student.lm`; returns a summary for the run's info (the modules adapted and the adapter parameters)."""
    peft = _peft()
    modules = targets_in(student, names)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none")
    peft.inject_adapter_in_model(config, student.lm)
    student.lm.__dict__.pop("peft_config", None)  # peft's note on the model: nothing here reads it
    params = sum(p.numel() for p in adapter_parameters(student))
    new = sum(p.numel() for p in student.new_parameters())
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(names), "modules": len(modules),
            "params": params, "trainable": params + new}


def adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) of each adapted projection in `model`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices: what `--train lora` trains besides the new mixer parameters."""
    found = adapters(model)
    if not found:
        raise TcacheError("--train lora: the student has no LoRA adapters (build it with add_adapters)")
    return [p for _, m in found for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its projection (peft's merge: W + alpha / r * B A, refused if not finite) and put the
    plain nn.Linear back in its place (on the mixer, for a converted layer): the model holds no peft layer after.
    Returns the number of projections merged."""
    found = adapters(model)
    for name, layer in found:
        try:
            layer.merge(safe_merge=True)
        except ValueError as e:  # peft's NaN check
            raise TcacheError(f"LoRA adapter {name} does not merge: {e}; lower --lr or --lora-alpha") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer.get_base_layer())
    return len(found)
