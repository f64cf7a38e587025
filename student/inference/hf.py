"""A student as a transformers model: `TcacheStudentForCausalLM` (AutoModelForCausalLM, generate() from the static
state of decode.py) and `export_student`, which writes a HF model directory from a `tcache distill` output.

transformers has no architecture for these students: its `xLSTMForCausalLM` is xLSTM-7B's block (q/k/v straight from
the residual stream, no causal conv, no learnable skip, a SwiGLU FFN in every block), while v1/v2 use xlstm's classic
mLSTM block (up-projection x2, conv, skip) and sLSTM blocks, and the hybrid is a converted Llama/Qwen2. So the export
ships a modeling file with `auto_map` (load with trust_remote_code=True) whose classes are these; it needs tcache
installed, which brings the `xlstm` / `mlstm_kernels` packages the blocks come from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PretrainedConfig, \
    PreTrainedModel
from transformers.utils import ModelOutput

from tcache import outdir, ownership
from tcache.errors import TcacheError
from tcache.writefaults import write_error
from tcache.student.inference import slstm_cuda
from tcache.student.inference.decode import StaticDecoder
from tcache.student.inference.prefill import prefill

MODEL_TYPE = "tcache-student"
MODELING_FILE = "modeling_tcache.py"
MODELING_SOURCE = '''"""A tcache student, exported by `tcache export`: load with AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True). The model code is tcache's own (pip install tcache), with the xlstm / mlstm_kernels blocks."""

from tcache.student.hf import TcacheStudentConfig, TcacheStudentForCausalLM  # noqa: F401
'''


class TcacheStudentConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, family: str = "xlstm", student: dict | None = None, hybrid: dict | None = None,
                 base: dict | None = None, **kwargs):
        self.family = family
        """xlstm (Distil-xLSTM v1 / v2) or hybrid."""
        self.student = student or {}
        """xlstm: the StudentConfig fields (sizes, sLSTM positions, training context length)."""
        self.hybrid = hybrid or {}
        """hybrid: the HybridConfig fields (window, sinks, branches, ...)."""
        self.base = base or {}
        """hybrid: the converted teacher's own config (config.json of its architecture)."""
        if family == "hybrid" and base:
            kwargs.setdefault("vocab_size", base.get("vocab_size"))
            kwargs.setdefault("hidden_size", base.get("hidden_size"))
            kwargs.setdefault("tie_word_embeddings", base.get("tie_word_embeddings", False))
        elif student:
            kwargs.setdefault("vocab_size", student.get("vocab_size"))
            kwargs.setdefault("hidden_size", student.get("hidden_size"))
            kwargs.setdefault("tie_word_embeddings", False)  # the student holds the head as its own copy
        super().__init__(**kwargs)


@dataclass
class TcacheCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: StaticDecoder | None = None
    past_key_values: StaticDecoder | None = None
    """The same state under the name transformers < 5.2x's generate() passes back (it knows no `cache`): without it
    those versions re-ran the whole prefix for every token (tests/test_static_decode.py counts the steps)."""


class TcacheStudentForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TcacheStudentConfig
    base_model_prefix = "student"
    _is_stateful = True  # a recurrent state: no assisted generation, no DynamicCache
    _supports_sdpa = True

    def __init__(self, config: TcacheStudentConfig):
        super().__init__(config)
        if config.family == "hybrid":
            from tcache.student.models.hybrid import HybridConfig, HybridStudent

            base = dict(config.base)
            base_cfg = AutoConfig.for_model(base.pop("model_type"), **base)
            lm = AutoModelForCausalLM.from_config(base_cfg, attn_implementation="sdpa")
            self.student = HybridStudent(lm, HybridConfig(**config.hybrid))
        else:
            from tcache.student.models.xlstm import Student, StudentConfig

            self.student = Student(StudentConfig(**config.student), mlstm_kernel="parallel", slstm_backend="vanilla")
        self._kernel_key = None
        self._static_decoders: dict = {}  # (batch, dtype) -> StaticDecoder
        self.post_init()
        if config.family == "hybrid":  # the converted teacher's tied head, one level down (post_init sees children)
            tied = getattr(self.student.lm, "all_tied_weights_keys", None) or {}  # transformers >= 5
            if tied:
                self.all_tied_weights_keys.update({f"student.lm.{k}": f"student.lm.{v}" for k, v in tied.items()})

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _init_weights(self, module):
        """Every weight comes from the checkpoint; the student's own init already ran in its constructor."""

    def get_input_embeddings(self):
        return self.student.lm.get_input_embeddings() if self.config.family == "hybrid" else self.student.embed

    def get_output_embeddings(self):
        return self.student.head

    def _pick_kernels(self, ids: torch.Tensor) -> None:
        """The kernels `tcache eval` picks for this device and length (the parallel mLSTM form on CPU up to 1024
        tokens, a chunkwise one beyond and on CUDA), so the exported model computes what tcache computes."""
        from tcache.student.models.xlstm import PARALLEL_MAX_CONTEXT
        from tcache.student.models.hybrid import resolve_mlstm_kernel

        long = ids.shape[1] > PARALLEL_MAX_CONTEXT
        key = (ids.device.type, long)
        if key == self._kernel_key:
            return
        if self.config.family == "hybrid":
            self.student.set_kernel(ids.device)
        else:
            cpu_short = ids.device.type == "cpu" and not long
            self.student.use_kernel("parallel" if cpu_short else resolve_mlstm_kernel("auto", ids.device))
            if cpu_short:
                # the parallel kernel's causal masks are non-persistent buffers, which from_pretrained leaves
                # uninitialised (a NaN forward, tests/test_export.py): built afresh here
                self.student.set_context_length(max(self.student.mask_length, self.student.cfg.context_length))
        self._kernel_key = key

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: StaticDecoder | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0, **kwargs) -> TcacheCausalLMOutput:
        """logits_to_keep > 0: logits of the last positions only (generate() asks for 1 in its prefill). The state
        comes as `cache` (transformers >= 5.2x) or `past_key_values` (earlier versions)."""
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("tcache students take no padding (a recurrent state would absorb the pad tokens); "
                             "generate unpadded prompts, one at a time or of equal length")
        self._pick_kernels(input_ids)
        if use_cache and cache is not None:
            logits = cache.step(input_ids)  # (B, T, V): fixed buffers, a CUDA graph replay on CUDA
        elif use_cache and not self.training and getattr(self.student, "recurrent", True):
            logits, state = prefill(self.student, input_ids, logits_to_keep)  # (B, T or keep, V)
            cache = self._static(state)
        else:
            with slstm_cuda.cuda_cells(self.student, input_ids.device, next(self.parameters()).dtype):
                x, _ = self.student.features(input_ids)  # (B, T, D)
            logits, cache = self.student.head(x[:, -logits_to_keep:]), None  # (B, T or keep, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return TcacheCausalLMOutput(loss=loss, logits=logits.float(), cache=cache, past_key_values=cache)

    def _static(self, state) -> StaticDecoder:
        """The static decoder for this batch and dtype, its buffers (and CUDA graph) reused by every generate() call
        of the same shape: captured once, replayed after."""
        key = (StaticDecoder.batch_of(state), next(self.parameters()).dtype)
        dec = self._static_decoders.get(key)
        if dec is None:
            dec = self._static_decoders[key] = StaticDecoder(self.student, state)
        return dec.load(state)

    @property
    def static_decode_captures(self) -> int:
        """CUDA graphs captured so far (benchmarks/speed.py checks that timed runs add none)."""
        return sum(d.captures for d in self._static_decoders.values())


AutoConfig.register(MODEL_TYPE, TcacheStudentConfig, exist_ok=True)
AutoModelForCausalLM.register(TcacheStudentConfig, TcacheStudentForCausalLM, exist_ok=True)


def to_hf(model, doc: dict) -> TcacheStudentForCausalLM:
    """The transformers model holding (a copy of) a loaded tcache student's weights."""
    if model.family == "hybrid":
        base = model.lm.config.to_dict()
        config = TcacheStudentConfig(family="hybrid", hybrid=model.cfg.to_dict(), base=base)
    else:
        config = TcacheStudentConfig(family="xlstm", student=model.cfg.to_dict())
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.TcacheStudentConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.TcacheStudentForCausalLM"}
    config.architectures = ["TcacheStudentForCausalLM"]
    config.tcache = {"recipe": doc.get("config", {}).get("recipe"), "trained": doc.get("trained"),
                     "cache": doc.get("cache"), "tcache_version": doc.get("tcache_version")}
    hf = TcacheStudentForCausalLM(config)
    missing, unexpected = hf.student.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("causal_mask")]:
        raise TcacheError(f"the student's weights do not fit its exported architecture (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); re-run `tcache distill` with this tcache")
    return hf.eval()


def check_export_target(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a target that is a file, anything but a tcache export, or an export without --overwrite (before
    any work)."""
    k = outdir.classify(Path(out), "export", flag)
    if k == "export" and not overwrite:
        raise TcacheError(f"{flag} {out} already holds an export; pass --overwrite to replace it")


def export_student(student_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a HF model directory (config.json with auto_map, model.safetensors, modeling file, tokenizer,
    generation_config.json) for the student at `student_dir`; built beside `out` and swapped in when complete."""
    from tcache import locks
    from tcache.student.models.io import load_student

    student_dir, out = Path(student_dir), Path(out)
    check_export_target(out, overwrite)
    outdir.check_writable(out)
    with locks.locked(out):
        check_export_target(out, overwrite)  # again, now that no other command can change it
        model, doc = load_student(student_dir, torch.device("cpu"))
        hf = to_hf(model, doc)
        work = outdir.fresh_staging(out, "export")
        try:
            ownership.claim(work, "export")
            # transformers picks the file names: written into a listed folder, then listed and moved in
            ownership.write_unlisted(work, lambda d: _write_export(hf, student_dir, d))
            ownership.seal(work)
        except Exception as e:  # a full disk: the staging folder goes, an earlier export at `out` stays
            outdir.remove_ours(work)
            raise write_error(out, e) or e from None
        outdir.swap_in(work, out)
    return out


def _write_export(hf: "TcacheStudentForCausalLM", student_dir: Path, work: Path) -> None:
    from transformers import AutoTokenizer

    hf.save_pretrained(work, safe_serialization=True)
    (work / MODELING_FILE).write_text(MODELING_SOURCE)
    tok = AutoTokenizer.from_pretrained(student_dir)
    tok.save_pretrained(work)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    student = hf.student
    if not getattr(student, "recurrent", True):
        gen.use_cache = False  # prefill refuses them: a full-attention layer's KV cache would grow
    gen.save_pretrained(work)
