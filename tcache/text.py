"""Text in, packed token rows out: a `datasets` stream, tokenised with the teacher's tokenizer.

Packing rule (deterministic, documented in docs/format.md): documents are read in dataset order,
tokenised without special tokens, each followed by one EOS token, concatenated into one stream and
cut into rows of exactly `seq_len` tokens. A trailing partial row is dropped. Rows therefore start
mid-document, as in GPT-style pretraining packing.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tcache.datalines import first_bad_line, wrong_text
from tcache.errors import TcacheError
from tcache.fields import opt

DEFAULT_SEQ_LEN = 512
"""Tokens per packed row (build) and per scored window (eval) unless told otherwise."""

# Extension -> `datasets` packaged builder. Compression suffixes are stripped first.
_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSION = (".xz", ".gz", ".bz2", ".zst", ".zstd")


@dataclass(frozen=True)
class DataSpec:
    path: str = opt(flag="--data")
    """HF dataset id, or a local .json/.jsonl/.txt/.parquet/.csv file or directory (.xz/.gz ok)."""
    config: str | None = opt(None, flag="--data-config")
    """Hub dataset configuration name."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Column that holds the document text."""

    def describe(self) -> dict:
        return {"path": self.path, "config": self.config, "split": self.split, "text_field": self.text_field}


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or _builder_for(Path(s)) is not None


def _local_files(spec: DataSpec) -> tuple[str, list[str]] | None:
    """(builder, files) for a local --data, None for a hub id. Raises for a path that is not there."""
    p = Path(os.path.expanduser(spec.path))
    if p.is_file():
        builder = _builder_for(p)
        if builder is None:
            raise TcacheError(
                f"--data {spec.path}: unsupported file type; use .json/.jsonl/.txt/.parquet/.csv "
                "(optionally .xz/.gz/.bz2/.zst compressed)"
            )
        return builder, [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _builder_for(f) is not None)
        builders = {_builder_for(Path(f)) for f in files}
        if not files:
            raise TcacheError(f"--data {spec.path}: directory has no .json/.jsonl/.txt/.parquet/.csv files")
        if len(builders) > 1:
            raise TcacheError(
                f"--data {spec.path}: directory mixes file types ({', '.join(sorted(builders))}); "
                "point --data at one file type"
            )
        return builders.pop(), files
    if _looks_like_path(spec.path):
        raise TcacheError(f"--data {spec.path}: no such file or directory; check the path")
    return None


def open_dataset(spec: DataSpec):
    """A streaming `datasets.IterableDataset`, so a 512M-token budget never loads a whole corpus."""
    import datasets

    local = _local_files(spec)
    try:
        if local is not None:
            builder, files = local
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        return datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
    except StopIteration:  # datasets' json builder peeks at the first table while setting up
        raise TcacheError(f"--data {spec.path}: dataset is empty; point --data at a dataset with documents") from None
    except (FileNotFoundError, ConnectionError) as e:
        raise TcacheError(
            f"--data {spec.path}: dataset not found ({type(e).__name__}); check the name, or pass a local "
            "file, or set HF_TOKEN for a gated dataset"
        ) from None
    except ValueError as e:  # datasets raises ValueError for unknown configs and splits
        msg = str(e).splitlines()[0][:200]
        raise TcacheError(f"--data {spec.path}: {msg}; check --data-config and --split") from None


def _bad_data(spec: DataSpec, e: BaseException) -> TcacheError:
    """The one-line error for a dataset that failed while being read."""
    local = _local_files(spec)
    for f in (local[1] if local else []):
        where = first_bad_line(f, local[0], spec.text_field) if local[0] in ("json", "text") else None
        if where:
            return TcacheError(f"--data {f}: {where}")
    first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    return TcacheError(f"--data {spec.path}: could not be read ({type(e).__name__}: {first}); check the file")


def _bad_text(spec: DataSpec, n: int, problem: str) -> TcacheError:
    """The one-line error for record `n` (1-based, in dataset order) whose text is not a string: by file and
    line where the data is local JSON lines, else by record."""
    local = _local_files(spec)
    if local is not None and local[0] == "json":
        for f in local[1]:
            where = first_bad_line(f, "json", spec.text_field)
            if where:
                return TcacheError(f"--data {f}: {where}")
    return TcacheError(f"--data {spec.path}: record {n}: {problem}")


def iter_texts(spec: DataSpec) -> Iterator[str]:
    """Document texts in dataset order. The first record is checked for the text field; a record that cannot
    be read (malformed JSON, bytes that are not UTF-8) ends the stream with one line naming file and line."""
    try:
        yield from _iter_texts(spec)
    except (TcacheError, GeneratorExit):
        raise
    except Exception as e:  # pyarrow, pandas and codecs errors from the `datasets` readers
        raise _bad_data(spec, e) from None


def _iter_texts(spec: DataSpec) -> Iterator[str]:
    ds = open_dataset(spec)
    it = iter(ds)
    try:
        first = next(it)
    except StopIteration:
        raise TcacheError(f"--data {spec.path}: dataset is empty; point --data at a dataset with documents") from None
    if spec.text_field not in first:
        cols = ", ".join(sorted(first)) or "none"
        raise TcacheError(
            f"--text-field {spec.text_field!r} is not a column of {spec.path} (columns: {cols}); "
            "pass --text-field with one of them"
        )
    local = _local_files(spec)
    json_lines = local is not None and local[0] == "json"
    for n, record in enumerate(itertools.chain([first], it), 1):
        text = record[spec.text_field]
        if not isinstance(text, str):
            problem = wrong_text(record, spec.text_field, json_lines)
            if problem:  # str(123) would be packed as the text "123"
                raise _bad_text(spec, n, problem)
        if text:  # a missing value or "" contribute nothing, not even an EOS
            yield text


def _text_batches(texts: Iterable[str], chars_per_call: int, max_docs: int) -> Iterator[list[str]]:
    """Group documents into tokenizer calls of about `chars_per_call` characters: big enough for the
    tokenizer's threads (one document each), small enough that rows flow while the next call runs."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= chars_per_call or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tokenizer, texts: list[str], eos_id: int, docs: bool = False) -> np.ndarray | list[np.ndarray]:
    """Token ids of each text followed by EOS, concatenated (int32); with `docs`, one array per text (views of
    that one array). A fast tokenizer's backend is called directly (the ids transformers would return, without
    building its per-text dicts)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "encode_batch"):
        seqs = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = np.empty(sum(len(s) + 1 for s in seqs), dtype=np.int32)
    pos = 0
    for ids in seqs:
        out[pos:pos + len(ids)] = ids
        out[pos + len(ids)] = eos_id
        pos += len(ids) + 1
    return np.split(out, np.cumsum([len(ids) + 1 for ids in seqs])[:-1]) if docs else out


_worker_tokenizer = None


def _worker_init(backend, parent: int) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = backend
    die_with_parent(parent)


def die_with_parent(parent: int, every_s: float = 0.2) -> None:
    """End this worker when its parent is gone, even by kill -9 (no cleanup runs there): a daemon thread
    watches for the re-parenting that follows the parent's death. Polling rather than Linux's
    PR_SET_PDEATHSIG, which fires when the parent's spawning *thread* ends, not the process."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _worker_encode(texts: list[str], eos_id: int, docs: bool = False) -> np.ndarray | list[np.ndarray]:
    return _encode(_worker_tokenizer, texts, eos_id, docs)


@contextlib.contextmanager
def _without_main_import():
    """Spawned children re-import the parent's __main__ (a benchmark script, the CLI entry point, which
    import torch and transformers: seconds per worker, measured 4.5 s here). The workers need only this
    module, so while they start, __main__ presents itself under the name multiprocessing skips."""
    main = sys.modules["__main__"]
    had, spec = hasattr(main, "__spec__"), getattr(main, "__spec__", None)
    main.__spec__ = types.SimpleNamespace(name="__main__")
    try:
        yield
    finally:
        if had:
            main.__spec__ = spec
        else:
            del main.__spec__


class TokenizerPool:
    """Tokenises documents in worker processes, results in document order.

    Why processes: in a thread, turning the tokenizer's output into Python ints holds the GIL and stalls
    the loop that feeds the GPU (measured: the build waited 4.4 s of 10.5 s for rows). Why not
    multiprocessing.Pool.imap: it reads its input eagerly; here at most `window` calls are in flight,
    so a 512M-token build never holds more than a few calls of text. Workers are spawned (CUDA and
    fork do not mix) as soon as the pool is made, so their start-up overlaps loading the teacher."""

    def __init__(self, tokenizer, workers: int, chars_per_task: int = 1_000_000, max_docs: int = 1024):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("TokenizerPool needs a fast (Rust) tokenizer")
        self.workers, self.chars_per_task, self.max_docs = workers, chars_per_task, max_docs
        self._ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(backend, os.getpid()))
        with _without_main_import():  # one submit per worker starts them all now
            for _ in range(workers):
                self._ex.submit(len, "")

    def encode(self, texts: Iterable[str], eos_id: int, docs: bool = False) -> Iterator[np.ndarray]:
        """Token arrays (docs + EOS) of consecutive groups of texts, in order; with `docs`, a list of one array
        per text for each group."""
        pending: collections.deque = collections.deque()
        for batch in _text_batches(texts, self.chars_per_task, self.max_docs):
            pending.append(self._ex.submit(_worker_encode, batch, eos_id, docs))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        """Stop now: queued calls are cancelled and the workers terminated (a Ctrl-C must not wait for
        them, nor leave them behind)."""
        procs = list(getattr(self._ex, "_processes", {}).values())
        # The manager thread, taken before shutdown: shutdown(wait=False) forgets it, so a second shutdown(wait=True)
        # would not join it (CPython 3.11), and CI still saw the race this join prevents (twice in a row).
        manager = getattr(self._ex, "_executor_manager_thread", None)
        self._ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        # Join the executor's manager thread now: left running, it closes its wake-up pipe while
        # concurrent.futures' exit hook may still write to it (a race in CPython 3.11: "OSError: Bad file
        # descriptor" traceback at exit). With the workers gone it ends at once.
        if manager is not None:
            manager.join(timeout=30)


def pack_rows(texts: Iterable[str], tokenizer, seq_len: int, eos_id: int, pool: TokenizerPool | None = None,
              chars_per_call: int = 4_000_000, max_docs: int = 1024) -> Iterator[np.ndarray]:
    """Yield int32 rows (seq_len,) of the packed token stream, in order; tokenised in `pool`'s processes
    when given, else in the calling thread (the rows are the same either way)."""
    if pool is not None:
        arrays = pool.encode(texts, eos_id)
    else:
        # Batched calls let a fast tokenizer use its own threads; the result is the same as one by one.
        arrays = (_encode(tokenizer, batch, eos_id) for batch in _text_batches(texts, chars_per_call, max_docs))
    buf = np.empty(0, dtype=np.int32)
    for arr in arrays:
        buf = np.concatenate([buf, arr])
        n_full = len(buf) // seq_len
        if n_full:
            block = buf[: n_full * seq_len].reshape(n_full, seq_len)  # (n, T)
            buf = buf[n_full * seq_len:].copy()
            yield from block


def iter_docs(spec: DataSpec, tokenizer, eos_id: int, pool: TokenizerPool | None = None,
              chars_per_call: int = 4_000_000, max_docs: int = 1024) -> Iterator[np.ndarray]:
    """Token ids (int32, the document's then one EOS) of each document of `spec` in dataset order: pack_rows'
    stream cut at document ends, for a mixture, which interleaves whole documents of several sources."""
    texts = iter_texts(spec)
    if pool is not None:
        groups = pool.encode(texts, eos_id, docs=True)
    else:
        batches = _text_batches(texts, chars_per_call, max_docs)
        groups = (_encode(tokenizer, batch, eos_id, docs=True) for batch in batches)
    for group in groups:
        yield from group
