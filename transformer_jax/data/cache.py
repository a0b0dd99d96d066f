"""Tokenize once, read many times: one field of one split as a flat memory-mapped array.

`<data_dir>/tokens/<dataset>-<split>-<field>-<tokenizer fingerprint>/` holds
`tokens.bin` (uint16 when the vocabulary fits, else uint32), `offsets.npy` (int64,
documents + 1) and `meta.json`. Building encodes the records in chunks with the
tokenizer's multi-threaded `encode_batch` (~5 s for the stdlib corpus on 2 cores); after
that a pipeline reads only the slices its rows need. Labels are cached the same way.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from transformer_jax.data import _files

_CHUNK = 256


def _store_dir(root: str, data, field: str, tag: str) -> str:
    name = f"{data.full_name}-{data.split}-{field}-{tag}"
    return os.path.join(root, "tokens", re.sub(r"[^\w.+-]", "_", name))


class TokenStore:
    """Token ids of every record's `field`: `doc(i)`, `slice(i, a, b)`, `lengths`."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.offsets = np.load(os.path.join(path, "offsets.npy"))
        self.lengths = np.diff(self.offsets)
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            if self.offsets[-1] == 0:
                self._tokens = np.zeros(0, self.meta["dtype"])
            else:
                self._tokens = np.memmap(os.path.join(self.path, "tokens.bin"), self.meta["dtype"], "r")
        return self._tokens

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, i: int) -> np.ndarray:
        return self.slice(i, 0, int(self.lengths[i]))

    def slice(self, i: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of record i, as int32."""
        start = int(self.offsets[i])
        return np.asarray(self.tokens[start + a:start + b], np.int32)

    def __getstate__(self):  # memory maps are reopened after pickling (grain workers)
        return {**self.__dict__, "_tokens": None}


def token_store(root: str, data, field: str, tokenizer) -> TokenStore:
    """The cached tokens of `field` in `data` (a corpus.Split), built on first use."""
    data.check_field(field)
    path = _store_dir(root, data, field, tokenizer.fingerprint)
    if not os.path.exists(os.path.join(path, "meta.json")):
        with _files.locked(path):
            if not os.path.exists(os.path.join(path, "meta.json")):
                _build(path, data, field, tokenizer)
    return TokenStore(path)


def _build(path: str, data, field: str, tokenizer) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    def docs():
        for start in range(0, len(data), _CHUNK):
            yield from tokenizer.encode_batch(data.texts(field, start, min(start + _CHUNK, len(data))))
    with _files.atomic_dir(path) as tmp:
        write_store(tmp, docs(), dtype, dataset=data.full_name, split=data.split, field=field,
                    tokenizer=tokenizer.fingerprint)


def write_store(path: str, docs, dtype=np.uint16, **meta) -> TokenStore:
    """Writes an iterable of id arrays as a TokenStore at `path`."""
    os.makedirs(path, exist_ok=True)
    offsets, total = [0], 0
    with open(os.path.join(path, "tokens.bin"), "wb") as f:
        for ids in docs:
            np.asarray(ids).astype(dtype).tofile(f)
            total += len(ids)
            offsets.append(total)
    np.save(os.path.join(path, "offsets.npy"), np.asarray(offsets, np.int64))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(dict(meta, dtype=np.dtype(dtype).name, documents=len(offsets) - 1, tokens=total), f, indent=1)
    return TokenStore(path)


def label_array(root: str, data, field: str) -> np.ndarray:
    """int32 labels of `field` for every record, cached next to the tokens."""
    path = _store_dir(root, data, field, "labels") + ".npy"
    if not os.path.exists(path):
        with _files.locked(path):
            if not os.path.exists(path):
                labels = data.labels(field)
                tmp = path + ".tmp.npy"
                np.save(tmp, labels)
                os.replace(tmp, path)
    return np.load(path)
