"""Evaluation text, bits per byte and the classical compressor baselines."""
import gzip
import lzma
import math
import os

import brotli
import numpy as np
import pyppmd
import pytest
import zstandard

from transformer_jax.data import DataConfig, bpb, corpus


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    for i in range(60):
        (root / f"t{i}.txt").write_bytes(" ".join(rng.choice(["ab", "cd", "é", "λx", "\n"], 300)).encode())
    return DataConfig(source=f"text_files:{root}", tokenizer="byte", data_dir=str(tmp_path_factory.mktemp("d")))


def test_eval_text_is_exactly_the_validation_files(cfg):
    text = bpb.eval_text(cfg)
    split = corpus.open_split(cfg.source, cfg.data_dir, "validation")
    root = cfg.source.split(":", 1)[1]
    files = [split.records[i]["path"].decode() for i in range(len(split))]
    raw = [open(os.path.join(root, f), "rb").read() for f in files]
    assert text.num_bytes == sum(len(r) for r in raw) and text.text.encode() == b"".join(raw)
    assert len(bpb.eval_text(cfg, "train").documents) == 60 - len(files)


def test_compression_baselines_match_the_modules():
    data = ("def f(x):\n    return x * 2\n" * 500).encode()
    got = bpb.compression_bits_per_byte(data)
    assert got["gzip -9"] == 8 * len(gzip.compress(data, 9)) / len(data)
    assert got["xz -9e"] == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert got["brotli 11"] == 8 * len(brotli.compress(data, quality=11, lgwin=24)) / len(data)
    assert got["zstd 22"] == 8 * len(zstandard.ZstdCompressor(level=22).compress(data)) / len(data)
    ppmd = pyppmd.compress(data, max_order=16, mem_size=1 << 30, variant="I")
    assert got["ppmd o16"] == 8 * len(ppmd) / len(data)
    assert pyppmd.decompress(ppmd, max_order=16, mem_size=1 << 30, variant="I") == data  # a real, lossless stream
    assert all(v < 0.3 for v in got.values())  # very repetitive text
    noise = bpb.compression_bits_per_byte(np.random.default_rng(0).bytes(20000))
    assert all(7.9 < v < 8.3 for v in noise.values()), noise
    with pytest.raises(ValueError, match="non-empty"):
        bpb.compression_bits_per_byte(b"")


def test_per_document_compression_has_no_memory_across_documents():
    doc = np.random.default_rng(1).bytes(4000).hex()  # 8000 chars of hex: ~4 bits/char of entropy
    stream = bpb.compression_bits_per_byte([doc, doc, doc])
    alone = bpb.compression_bits_per_byte([doc, doc, doc], per_document=True)
    assert set(stream) == set(alone) == set(bpb.COMPRESSORS)
    for name in bpb.COMPRESSORS:  # one stream finds the repeats; documents alone cannot
        assert stream[name] < 0.6 * alone[name], name
        assert alone[name] == pytest.approx(bpb.compression_bits_per_byte(doc)[name])
    report = bpb.compression_report([doc, doc])
    assert set(report) == {"stream", "per_document"}
    with pytest.raises(ValueError, match="documents"):
        bpb.compression_bits_per_byte(doc, per_document=True)


def test_bits_per_byte_of_a_uniform_byte_model():
    # A model assigning 1/256 to every byte spends 8 bits on each.
    assert bpb.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
