"""Data benchmark: builder, tokenizer training, token cache, pipeline throughput.

    .venv/bin/python benchmarks/data.py [--data_dir DIR] [--batches 300]

Starts from an empty cache (a temporary directory unless --data_dir is given) so the
one-off costs are real, then times the lm pipeline at seq 512 with 0 and 2 grain
workers (plus mlm and span at 0 workers) and compares with the train step's rate.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from transformer_jax.data import DataConfig, corpus, make_iterator
from transformer_jax.data import cache, tokenizer

TRAIN_STEP_TOKENS_PER_S = 20_000  # the upper end the default experiment's train step reaches on 2 cores


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def throughput(cfg, tok, task, workers, seq_len, batch, n):
    it = make_iterator(cfg, tok, task=task, seq_len=seq_len, global_batch_size=batch, worker_count=workers,
                       process_index=0, process_count=1)
    for _ in range(5 if workers == 0 else 20):  # warm-up: threads / worker processes started
        next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - start
    it.close()
    return n * batch * seq_len / dt


def direct(cfg, tok, seq_len, batch, n):
    """Batches built on the calling thread, no grain: the pipeline's own cost."""
    it = make_iterator(cfg, tok, seq_len=seq_len, global_batch_size=batch, process_index=0, process_count=1)
    src = it.source
    src[0]
    start = time.perf_counter()
    for b in range(1, n + 1):
        src[b]
    return n * batch * seq_len / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab_sizes", default="8192,16384")
    args = ap.parse_args()
    root = args.data_dir or tempfile.mkdtemp(prefix="tj_data_bench_")
    rows = []

    train, t = timed(lambda: corpus.open_split("python_source", root, "train"))
    texts = train.texts("text")
    rows.append(("build python_source (TFDS, ArrayRecord)", f"{t:.2f} s",
                 f"{len(train)} train files, {sum(len(x.encode()) for x in texts) / 1e6:.1f} MB"))
    toks = {}
    for v in [int(x) for x in args.vocab_sizes.split(",")]:
        cfg = DataConfig(data_dir=root, vocab_size=v)
        toks[v], t = timed(lambda: tokenizer.get_tokenizer(cfg))
        rows.append((f"train bpe tokenizer, vocab {v}", f"{t:.2f} s", "HF tokenizers byte-level BPE"))
    v0 = int(args.vocab_sizes.split(",")[0])
    cfg, tok = DataConfig(data_dir=root, vocab_size=v0), toks[v0]
    store, t = timed(lambda: cache.token_store(root, train, "text", tok))
    n_bytes = sum(len(x.encode()) for x in texts)
    rows.append((f"tokenize + cache train split, vocab {v0}", f"{t:.2f} s",
                 f"{store.offsets[-1] / 1e6:.2f} M tokens, {n_bytes / store.offsets[-1]:.2f} bytes/token"))

    shape = f"seq {args.seq_len} x batch {args.batch}"
    r = direct(cfg, tok, args.seq_len, args.batch, args.batches)
    rows.append((f"lm batches on the caller's thread (no grain), {shape}", f"{r:,.0f} tok/s",
                 f"{r / TRAIN_STEP_TOKENS_PER_S:.0f}x the train step"))
    for task, workers in (("lm", 0), ("lm", 2), ("mlm", 0), ("span", 0)):
        r = throughput(cfg, tok, task, workers, args.seq_len, args.batch, args.batches)
        rows.append((f"{task} pipeline, grain worker_count={workers}, {shape}", f"{r:,.0f} tok/s",
                     f"{r / TRAIN_STEP_TOKENS_PER_S:.0f}x the train step"))

    print(f"\ndata benchmark (cache {root}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"train step taken as {TRAIN_STEP_TOKENS_PER_S:,} tok/s)\n")
    w = max(len(a) for a, _, _ in rows)
    print(f"| {'what'.ljust(w)} | result | note |\n|{'-' * (w + 2)}|---|---|")
    for a, b, c in rows:
        print(f"| {a.ljust(w)} | {b} | {c} |")


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    main()
