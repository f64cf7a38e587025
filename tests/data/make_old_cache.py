"""Writes the stored old-format caches under tests/data/ with the code of an OLD commit (its top-level
`teachercache` package on PYTHONPATH; nothing of today's tcache is imported). See cache-v1/README.md, cache-v2/README.md.

    git worktree add /tmp/oldtcache 9fdbd26    # the last commit of schema version 1
    cd tests/data/cache-v1 && PYTHONPATH=/tmp/oldtcache python ../make_old_cache.py v1
    git worktree add /tmp/oldtcache2 c9de9f0   # the last commit of schema version 2 (9132b78^)
    cd tests/data/cache-v2 && PYTHONPATH=/tmp/oldtcache2 python ../make_old_cache.py v2

Run from the fixture's directory: the manifest records the teacher and data paths as given (relative).
The teacher is a tiny random Llama (2 layers, hidden 32) with a character-level tokenizer of 21 ids made
here, so the cache's teacher/ copy (tokenizer.json, embeddings.safetensors) stays a few KB; the teacher
itself is kept in cache-v1/teacher/ so the tests can recompute every cached value with transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

DOCS = ["the cat sat on a mat.", "a dog ran far.", "birds sing at dawn!"]
TEACHER = Path("../cache-v1/teacher")
DATA = Path("../cache-v1/data.jsonl")


def make_teacher() -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set("".join(DOCS)))
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one id per character
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    TEACHER.mkdir(parents=True)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(TEACHER)  # fp16: half the bytes
    hf_tok.save_pretrained(TEACHER)
    DATA.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))


def main(version: str) -> None:
    from teachercache.build import BuildConfig, build  # the old commit's
    from teachercache.data import DataSpec

    if version == "v1":
        make_teacher()
        extra = {}
    else:  # v2's default hidden dtype (int8, a scale per position) and fp16 log-probs, two layer groups
        extra = dict(hidden_dtype="int8", logprob_dtype="fp16", hidden_groups=2)
    build(BuildConfig(teacher=str(TEACHER), data=DataSpec(str(DATA)), out="cache", tokens=2 * 16, seq_len=16,
                      top_k=4, batch_size=2, rows_per_shard=2, device="cpu", **extra))


if __name__ == "__main__":
    main(sys.argv[1])
