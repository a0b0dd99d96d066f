"""Batches of random tokens built by the data pipeline's own tasks (`data/tasks.py`), for
tests, benchmarks and `info`: the same keys, packing, segment ids, positions, weights and
padding as real data, without a corpus or a tokenizer.

    batch = synthetic_batch("lm", batch=8, seq_len=512, vocab_size=32768)   # numpy, one host
"""
from __future__ import annotations

import numpy as np

from transformer_jax.data import tasks


class _Store:
    """In-memory stand-in for the token cache: `lengths`, `slice(i, a, b)`, `len()`."""

    def __init__(self, docs: list[np.ndarray]):
        self.docs = docs
        self.lengths = np.array([len(d) for d in docs], np.int64)

    def __len__(self) -> int:
        return len(self.docs)

    def slice(self, i: int, a: int, b: int) -> np.ndarray:
        return self.docs[i][a:b]


def _docs(rng, total: int, low: int, high: int, lo_tok: int, hi_tok: int) -> list[np.ndarray]:
    """Random documents whose lengths plus one (the bos/eos a task adds) sum to `total`."""
    docs, n = [], 0
    while n < total - 1:
        k = int(min(rng.integers(low, high + 1), total - n - 1))
        docs.append(rng.integers(lo_tok, hi_tok, k).astype(np.int32))
        n += k + 1
    return docs


def synthetic_batch(task: str, batch: int, seq_len: int, vocab_size: int, *, target_len: int | None = None,
                    num_classes: int = 2, fill: float = 0.9, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch for `task` ("lm", "mlm", "span", "seq2seq", "classify"): random documents of
    about seq_len/3 tokens packed by the task, filling a `fill` fraction of the rows' space
    (the rest is padding: segment id 0, weight 0)."""
    rng = np.random.default_rng(seed)
    n_sentinels = 100 if vocab_size > 200 else vocab_size // 4
    hi_tok = vocab_size - n_sentinels  # T5 sentinels take the top ids
    sentinels = np.arange(vocab_size - 1, hi_tok - 1, -1)
    doc_len = (max(seq_len // 6, 1), max(seq_len // 2, 2))
    budget = int(batch * seq_len * fill)
    if task == "lm":
        t = tasks.LMTask(_Store(_docs(rng, budget, *doc_len, 4, hi_tok)), seq_len, seed, False)
    elif task == "mlm":
        t = tasks.MLMTask(_Store(_docs(rng, budget, *doc_len, 4, hi_tok)), seq_len, seed, False,
                          0.15, 4, hi_tok)
    elif task == "span":
        t = tasks.SpanTask(_Store(_docs(rng, budget, *doc_len, 4, hi_tok)), seq_len, seed, False, 0.15, 3.0, sentinels)
    elif task == "seq2seq":
        tl = target_len or max(seq_len // 4, 2)
        n = batch * 3
        src = [rng.integers(4, hi_tok, rng.integers(1, seq_len // 2)).astype(np.int32) for _ in range(n)]
        tgt = [rng.integers(4, hi_tok, rng.integers(1, max(tl // 2, 2))).astype(np.int32) for _ in range(n)]
        t = tasks.Seq2SeqTask(_Store(src), _Store(tgt), seq_len, tl, seed, False)
    elif task == "classify":
        docs = [rng.integers(4, hi_tok, rng.integers(1, max(int(seq_len * fill), 2))).astype(np.int32)
                for _ in range(batch)]
        t = tasks.ClassifyTask(_Store(docs), rng.integers(0, num_classes, batch), seq_len)
    else:
        raise ValueError(f"task={task!r} is unknown; choose lm, mlm, span, seq2seq or classify")
    out = {k: np.zeros((batch, *t.shapes[k]), dtype) for k, dtype in t.keys.items()}
    for k in range(batch):
        if k < t.rows_per_epoch:
            t.fill(out, k, 0, k)
    return out
