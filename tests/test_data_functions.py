"""Downstream tasks from the stdlib: package classification and function naming."""
import re

import numpy as np
import pytest

from transformer_jax.data import DataConfig, corpus, label_names, make_iterator
from transformer_jax.data.functions import (MASK, PACKAGES, VALIDATION_PER_PACKAGE, extract_functions,
                                           flat_lines, function_split, without_lines)
from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, ByteTokenizer

SOURCE = '''
import os

class Reader:
    def read_all(self, path):
        """read_all reads everything; read_all_lines is another name."""
        return self.read_all_lines(path)

    def __init__(self):
        pass

async def fetch(url):
    def fetch_inner():
        return fetch
    return fetch_inner
'''


def test_extract_functions_masks_whole_words_only():
    got = {name: (text, masked) for name, text, masked in extract_functions(SOURCE)}
    assert set(got) == {"read_all", "fetch", "fetch_inner"}  # dunder methods skipped, nested ones kept
    text, masked = got["read_all"]
    assert text.startswith("def read_all(self, path):") and text.endswith("read_all_lines(path)\n")
    assert masked.startswith(f"def {MASK}(self, path):") and "read_all_lines" in masked
    assert not re.search(r"\bread_all\b", masked)
    assert got["fetch"][1].startswith(f"async def {MASK}(url):") and "fetch_inner" in got["fetch"][1]
    assert extract_functions("def broken(:\n") == []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("functions"))


def test_builder_records_are_the_split(data_dir):
    split = function_split()
    for name in ("train", "validation"):
        data = corpus.open_split("python_functions", data_dir, name)
        assert len(data) == len(split[name])
        labels = data.labels("package")
        assert labels.min() >= 0 and labels.max() < len(PACKAGES)
        want = {(r["path"], r["name"], r["function"]) for r in split[name]}
        for i in range(0, len(data), max(1, len(data) // 30)):
            rec = data.records[i]
            path, fn = rec["path"].decode(), rec["function"].decode()
            assert (path, rec["name"].decode(), fn) in want
            assert path.split("/")[0] == PACKAGES[int(rec["package"])]
            assert fn.lstrip().startswith(("def ", "async def "))


_lines = flat_lines  # a function's text as it reads anywhere in a file: lines without indentation


def test_split_is_by_function_balanced_and_leak_free(data_dir):
    split = function_split()
    train, val = split["train"], split["validation"]
    packages = [r["package"] for r in val]
    assert {p: packages.count(p) for p in PACKAGES} == {p: VALIDATION_PER_PACKAGE for p in PACKAGES}
    majority = max(packages.count(p) for p in PACKAGES) / len(val)  # a constant answer's accuracy
    assert majority == pytest.approx(1 / len(PACKAGES))
    assert len({r["path"] for r in val}) >= 60  # many files, not one file's methods
    # no training function holds a validation function's text (equal, or nested inside it)
    val_texts = [_lines(r["function"]) for r in val]
    train_text = "\n\n".join(_lines(r["function"]) for r in train)
    assert not [t for t in val_texts if t in train_text]
    # nor does the pretraining corpus: python_source, both splits, every file
    source = "\n\n".join(_lines(t) for s in ("train", "validation")
                          for t in corpus.open_split("python_source", data_dir, s).texts("text"))
    assert not [t for t in val_texts if t in source]
    # ... while training functions are still there (the check can find text)
    assert sum(_lines(r["function"]) in source for r in train[::50]) == len(train[::50])


def test_without_lines():
    assert without_lines("a\nb\nc\nd\n", [(2, 3)]) == "a\nd\n"
    assert without_lines("a\nb", []) == "a\nb"


def test_classify_batches(data_dir):
    cfg = DataConfig(source="python_functions", task="classify", tokenizer="byte", data_dir=data_dir)
    assert label_names(cfg) == list(PACKAGES)
    batches = list(make_iterator(cfg, ByteTokenizer(), split="validation", seq_len=128, global_batch_size=16,
                                 num_epochs=1, process_index=0, process_count=1))
    n = len(corpus.open_split("python_functions", data_dir, "validation"))
    assert sum(b["weights"].sum() for b in batches) == n
    b = batches[0]
    assert b["label"].shape == (16,) and b["label"].dtype == np.int32
    assert np.all(b["inputs"][:, 0] == BOS_ID)
    text = ByteTokenizer().decode(b["inputs"][0])
    assert text.lstrip().startswith(("def ", "async def ", "@"))


def test_function_name_seq2seq(data_dir):
    cfg = DataConfig(source="python_functions", task="seq2seq", tokenizer="byte", data_dir=data_dir)
    tok = ByteTokenizer()
    b = next(make_iterator(cfg, tok, seq_len=512, target_seq_len=64, global_batch_size=4,
                           process_index=0, process_count=1))
    for k in range(4):
        for s in np.unique(b["target_segment_ids"][k][b["target_segment_ids"][k] > 0]):
            tgt = b["targets"][k][b["target_segment_ids"][k] == s]
            inp = b["inputs"][k][b["input_segment_ids"][k] == s]
            assert tgt[-1] == EOS_ID and inp[-1] == EOS_ID
            name, body = tok.decode(tgt), tok.decode(inp)
            assert re.fullmatch(r"\w+", name) and MASK in body
            assert not re.search(rf"\b{re.escape(name)}\b", body)
