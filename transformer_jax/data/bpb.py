"""Bits per byte: the evaluation text, its byte count, and classical compressors on the same text.

The lm iterator over a split with `num_epochs=1` covers every token of every document
once, plus one eos per document; summing the loss over its `weights` and dividing by
the split's UTF-8 bytes gives the model's bits per byte (`bits_per_byte`), the number
to set against `compression_bits_per_byte` of the same text (a compressor must spend
bits on everything, so the comparison is fair up to the eos predictions, a few bits per
document).

The compressors (`COMPRESSORS`: gzip -9, xz -9e, brotli 11, zstd 22, PPMd var. I order 6 and 16)
are measured two ways: over the whole split as one stream (they may learn
from every earlier file, as a model learns from the training split) and per document
(each file compressed alone, as the model sees documents: no memory across them).
"""
from __future__ import annotations

import dataclasses
import gzip
import lzma
import math
from typing import Callable, Sequence

import brotli
import pyppmd
import zstandard

from transformer_jax.data import config, corpus


@dataclasses.dataclass(frozen=True)
class EvalText:
    documents: list[str]   # in the split's stored order
    num_bytes: int         # UTF-8 bytes of all documents

    @property
    def text(self) -> str:
        return "".join(self.documents)


def eval_text(cfg: config.DataConfig, split: str | None = None) -> EvalText:
    """The documents of `split` (default cfg.eval_split) in the text field, with their bytes."""
    data = corpus.open_split(cfg.source, config.data_dir(cfg), split or cfg.eval_split)
    docs = data.texts(config.fields(cfg)["text"])
    return EvalText(docs, sum(len(d.encode("utf-8")) for d in docs))


def _ppmd(order: int) -> Callable[[bytes], bytes]:
    # PPMd variant I (7-zip's PPMd for .zip; Shkarin's PPMd var.I) with a 1 GiB model: it never restarts here.
    return lambda raw: pyppmd.compress(raw, max_order=order, mem_size=1 << 30, variant="I")


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip -9": lambda raw: gzip.compress(raw, compresslevel=9, mtime=0),
    "xz -9e": lambda raw: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME),
    "brotli 11": lambda raw: brotli.compress(raw, quality=11, lgwin=24),
    "zstd 22": lambda raw: zstandard.ZstdCompressor(level=22).compress(raw),
    "ppmd o6": _ppmd(6),
    "ppmd o16": _ppmd(16),
}


def compression_bits_per_byte(data: bytes | str | Sequence[str], *, per_document: bool = False) -> dict[str, float]:
    """{compressor: bits/byte} of `data`: one stream, or (per_document) each document alone.

    `data` is the text (or bytes), or its documents; per_document needs the documents."""
    if isinstance(data, (bytes, str)):
        if per_document:
            raise ValueError("per_document needs the documents, not one text")
        data = [data]
    docs = [d.encode("utf-8") if isinstance(d, str) else d for d in data]
    if not per_document:
        docs = [b"".join(docs)]
    total = sum(map(len, docs))
    if not total:
        raise ValueError("compression_bits_per_byte needs non-empty data")
    return {name: 8 * sum(len(compress(d)) for d in docs if d) / total for name, compress in COMPRESSORS.items()}


def compression_report(documents: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every compressor's bits per byte, {"stream": {...}, "per_document": {...}}."""
    return {"stream": compression_bits_per_byte(documents),
            "per_document": compression_bits_per_byte(documents, per_document=True)}


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Summed next-token loss (nats, over the weights) -> bits per UTF-8 byte."""
    return total_nll_nats / math.log(2) / num_bytes
