"""Cached rows as torch batches, in a shuffled order that is a pure function of (seed, epoch)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tcache.teachercache import schema
from tcache.teachercache.codecs import decode_hidden
from tcache.teachercache.manifest import load_manifest
from tcache.errors import TcacheError
from tcache.teachercache.reader import CacheReader


class CacheRows(Dataset):
    """One cached row as tensors: ids int64 (T,), topk_logprobs fp32 (T, k), topk_ids int64 (T, k),
    hidden fp16 (T, G, D) when the cache has hidden states and they are wanted."""

    def __init__(self, cache_dir: str, with_hidden: bool = True, with_targets: bool = True):
        fields = [schema.INPUT_IDS] + ([schema.TOPK_LOGPROBS, schema.TOPK_IDS] if with_targets else [])
        probe = load_manifest(cache_dir)
        if with_targets and with_hidden and schema.HIDDEN in probe.fields:
            fields += [schema.HIDDEN, schema.HIDDEN_SCALE]  # the reader drops fields a cache lacks
        self.hidden_dtype = probe.fields.get(schema.HIDDEN, {}).get("dtype")
        self.reader = CacheReader(cache_dir, fields=tuple(fields))
        self.groups = probe.hidden_groups
        self.vocab_size = probe.vocab_size

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.reader.row(int(i))
        self._check_ids(int(i), row)
        out = {schema.INPUT_IDS: torch.from_numpy(row[schema.INPUT_IDS].astype(np.int64))}
        if schema.TOPK_LOGPROBS in row:
            out[schema.TOPK_LOGPROBS] = torch.from_numpy(row[schema.TOPK_LOGPROBS].astype(np.float32))
            out[schema.TOPK_IDS] = torch.from_numpy(row[schema.TOPK_IDS].astype(np.int64))
        if schema.HIDDEN in row:
            h = decode_hidden(row, self.hidden_dtype).astype(np.float16)
            out[schema.HIDDEN] = torch.from_numpy(h.reshape(h.shape[0], self.groups, -1))  # (T, G, D)
        return out

    def _check_ids(self, i: int, row: dict[str, np.ndarray]) -> None:
        """An id outside the vocabulary would index past the embedding (an IndexError on CPU, a
        device-side assert on a GPU); the whole-cache hash check may not have reached this shard yet."""
        for name in (schema.INPUT_IDS, schema.TOPK_IDS):
            ids = row.get(name)
            if ids is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise TcacheError(
                    f"{self.reader.root}: {self.reader.where(i)} has {name} "
                    f"outside [0, {self.vocab_size}) (cache row {i}); the cache is corrupt, "
                    f"run `tcache verify {self.reader.root}` and rebuild it"
                )


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row permutation of one epoch; the same (seed, epoch) always gives the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


class EpochSampler(Sampler):
    """Rows of one epoch's permutation from global micro-batch `start_batch` on (to resume mid-epoch), this
    rank's share: global micro-batch j is rows [j * B * W, (j + 1) * B * W) of the permutation, and rank r
    takes its r-th B of them. So W ranks at --batch-size B train on the rows, in the order, that one process
    at B * W does (a last partial global batch is dropped)."""

    def __init__(self, n_rows: int, seed: int, epoch: int, batch_size: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1):
        order = epoch_order(n_rows, seed, epoch)
        n_micro = n_rows // (batch_size * world)
        per_rank = order[:n_micro * batch_size * world].reshape(n_micro, world, batch_size)  # (J, W, B)
        self.order = per_rank[start_batch:, rank].reshape(-1)

    def __iter__(self):
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def epoch_loader(rows: CacheRows, batch_size: int, seed: int, epoch: int, start_batch: int,
                 workers: int, pin: bool, rank: int = 0, world: int = 1) -> DataLoader:
    """This rank's micro-batches of one epoch from global micro-batch `start_batch` on."""
    sampler = EpochSampler(len(rows), seed, epoch, batch_size, start_batch, rank, world)
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      drop_last=True, persistent_workers=False)
