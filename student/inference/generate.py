"""`tcache export` and `tcache generate` as library calls: their configs, and text generation from a student (a
`tcache distill` output or its export) through transformers' generate() with the recurrent state, streamed as it
comes and stopped by SIGINT / SIGTERM with the text so far."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tcache.device import resolve_device
from tcache.errors import Interrupted, TcacheError
from tcache.fields import opt
from tcache.signals import StopRequest, stop_on_signals

# The most --max-new-tokens accepts. A recurrent student has no context limit of its own: its state is the same size
# at any length, and its training length is no limit (test_export.py generates beyond it). What grows is the rest:
# transformers' loop appends each token to the whole sequence (a copy of it per token), the text, and the time, which
# at the few hundred to few thousand tokens/s of a student is hours for a million tokens. A larger value is a typo
# (a zero too many), so it is refused, not capped: a cap would quietly run something other than what was asked.
# To run "until I stop it", ask for a large count and press Ctrl-C: generation stops with the text so far.
MAX_NEW_TOKENS = 1_000_000


@dataclass
class ExportConfig:
    student: str = opt(argument=True)
    """A `tcache distill` output directory."""
    out: str = opt()
    """The HF model directory to write (config.json, model.safetensors, modeling file, tokenizer)."""
    overwrite: bool = False
    """Replace an existing export at --out."""


@dataclass
class GenerateConfig:
    model: str = opt(argument=True)
    """A `tcache distill` output directory or a `tcache export` directory."""
    prompt: str = "The"
    """Text to continue."""
    max_new_tokens: int = 64
    """Tokens to generate, 1 to 1,000,000 (others are refused). Ctrl-C / SIGTERM stops early, keeping the text so
    far."""
    temperature: float = 0.0
    """0: greedy; above 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (with --temperature above 0)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise TcacheError(f"--max-new-tokens must be 1 to {MAX_NEW_TOKENS:,}, got {self.max_new_tokens:,} (a long "
                              "run stops at Ctrl-C, keeping the text so far)")
        if self.temperature < 0:
            raise TcacheError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TcacheError(f"--top-p must be in (0, 1], got {self.top_p}")


def load_hf_student(path: str | Path, device: torch.device):
    """(transformers model, tokenizer) from a `tcache distill` output or a `tcache export` directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tcache.student.inference.hf import MODEL_TYPE, to_hf
    from tcache.student.models.io import is_student_dir, load_student

    path = Path(path)
    if is_student_dir(path):
        model, doc = load_student(path, torch.device("cpu"))
        hf = to_hf(model, doc)
    else:
        try:
            is_export = AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == MODEL_TYPE
        except (OSError, ValueError):
            is_export = False
        if not is_export:
            raise TcacheError(f"{path} is neither a `tcache distill` output nor a `tcache export`; pass one of them")
        hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    return hf.to(device).eval(), AutoTokenizer.from_pretrained(path)


@functools.cache
def streaming_classes() -> tuple[type, type]:
    """(TextCallbackStreamer, StopWhenRequested), transformers' TextStreamer and StoppingCriteria subclasses, made on
    first use: every `tcache` command imports this module (for its configs), and transformers costs ~1 s to import.
    """
    from transformers import StoppingCriteria, TextStreamer

    class TextCallbackStreamer(TextStreamer):
        """transformers' TextStreamer handing its text to `on_text` (None: nothing is shown) instead of print(),
        and keeping the ids it was given after the prompt.

        TextStreamer re-decodes all the tokens since the last newline at every token, which grows with a text that
        has no newline; once everything decoded is shown, this keeps only the last token as context, as
        TextStreamer itself does after a newline, so a token costs the same at any length."""

        TRIM_AT = 256  # tokens since the last newline before trying to trim

        def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.on_text = on_text
            self.ids: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.ids.extend(value.reshape(-1).tolist())  # batch 1 (TextStreamer refuses more)
            super().put(value)
            if len(self.token_cache) > self.TRIM_AT:
                text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                if self.print_len == len(text) and not text.endswith("\ufffd"):  # all shown, no partial character
                    self.token_cache = self.token_cache[-1:]
                    self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.on_text is not None and (text or stream_end):
                self.on_text(text + ("\n" if stream_end else ""))

    class StopWhenRequested(StoppingCriteria):
        """True once a stop was requested: checked at every step, so generate() ends at the next token.
        `on_first` runs at the first check, when the prompt is prefilled and the first token is out."""

        def __init__(self, stop: StopRequest, on_first: Callable[[], None] | None = None):
            self.stop, self.on_first = stop, on_first

        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            if self.on_first is not None:
                self.on_first()
                self.on_first = None
            return torch.full((input_ids.shape[0],), self.stop.requested, dtype=torch.bool,
                              device=input_ids.device)

    return TextCallbackStreamer, StopWhenRequested


def _count(n: int) -> str:
    return f"{n:,} token{'' if n == 1 else 's'} generated"


def generate(cfg: GenerateConfig, on_text: Callable[[str], None] | None = None) -> dict:
    """The prompt's continuation, with the tokens/s of the decode.

    on_text (if given) receives the prompt once the model is loaded, then the continuation as transformers'
    TextStreamer decodes it, then the newline that ends it. SIGINT / SIGTERM: while the model loads and the prompt is
    prefilled, the first one raises Interrupted at once (there is nothing to keep); once tokens come, it ends the
    decode at the next token (StopWhenRequested), and Interrupted is raised after the text is out, its detail the
    tokens generated and its `result` this function's dict so far; a second signal raises at once."""
    from transformers import StoppingCriteriaList

    device = resolve_device(cfg.device)
    streamer, echoed, t0 = None, False, time.perf_counter()
    with stop_on_signals(graceful=True) as stop, contextlib.ExitStack() as loading:
        loading.enter_context(stop_on_signals())  # load, tokenise, prefill: stop at once; closed at the first token
        try:
            model, tok = load_hf_student(cfg.model, device)
            ids = tok(cfg.prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
            if ids.shape[1] == 0:
                raise TcacheError("--prompt tokenises to nothing; pass some text")
            sample = cfg.temperature > 0
            torch.manual_seed(cfg.seed)
            streamer_cls, stop_cls = streaming_classes()
            streamer = streamer_cls(tok, on_text)
            if on_text is not None:
                on_text(cfg.prompt)
                echoed = True
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                 temperature=cfg.temperature if sample else None,
                                 top_p=cfg.top_p if sample else None, top_k=None, pad_token_id=tok.eos_token_id,
                                 streamer=streamer,
                                 stopping_criteria=StoppingCriteriaList([stop_cls(stop, on_first=loading.close)]))
        except Interrupted as e:  # a signal while loading or prefilling, or a second one while decoding
            n = len(streamer.ids) if streamer is not None else 0
            if n:
                streamer.end()  # what TextStreamer holds back, and the line's end
                detail = _count(n)
            elif echoed:
                on_text("\n")
                detail = "during the prompt's prefill, no tokens generated"
            else:
                detail = "while loading the model"
            stopped = Interrupted(e.signum, detail)
            stopped.result = (_result(cfg, tok.decode(streamer.ids, skip_special_tokens=True), n,
                                      time.perf_counter() - t0, device) if n else None)
            raise stopped from None
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    r = _result(cfg, tok.decode(new, skip_special_tokens=True), int(new.numel()), seconds, device)
    if stop.requested:
        stopped = Interrupted(stop.signum, _count(r["new_tokens"]))
        stopped.result = r
        raise stopped
    return r


def _result(cfg: GenerateConfig, text: str, n: int, seconds: float, device: torch.device) -> dict:
    return {"prompt": cfg.prompt, "text": text, "new_tokens": n, "seconds": round(seconds, 3),
            "tokens_per_s": round(n / max(seconds, 1e-9), 1), "device": str(device)}


def export(cfg: ExportConfig) -> Path:
    from tcache.student.inference.hf import export_student

    return export_student(cfg.student, cfg.out, cfg.overwrite)
