"""Bits per byte: the evaluation text, its byte count, and gzip / xz on the same text.

The lm iterator over a split with `num_epochs=1` covers every token of every document
once, plus one eos per document; summing the loss over its `weights` and dividing by
the split's UTF-8 bytes gives the model's bits per byte (`bits_per_byte`), the number
to set against `compression_bits_per_byte` of the same text (a compressor must spend
bits on everything, so the comparison is fair up to the eos predictions, a few bits per
document).
"""
from __future__ import annotations

import dataclasses
import gzip
import lzma
import math

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


def compression_bits_per_byte(data: bytes | str) -> dict[str, float]:
    """{'gzip -9': bits/byte, 'xz -9e': bits/byte} of `data` (the whole text, one stream)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not raw:
        raise ValueError("compression_bits_per_byte needs non-empty data")
    gz = gzip.compress(raw, compresslevel=9, mtime=0)
    xz = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    return {"gzip -9": 8 * len(gz) / len(raw), "xz -9e": 8 * len(xz) / len(raw)}


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Summed next-token loss (nats, over the weights) -> bits per UTF-8 byte."""
    return total_nll_nats / math.log(2) / num_bytes
