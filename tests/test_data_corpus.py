"""TFDS builders: python_source and text_files build from local files with the network cut;
the catalog path is exercised with tfds.testing.mock_data."""
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from transformer_jax.config import ConfigError
from transformer_jax.data import corpus, functions


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a local build")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stdlib_data"))


def test_python_source_builds_offline_and_matches_the_files(stdlib_dir, no_network):
    train = corpus.open_split("python_source", stdlib_dir, "train")
    val = corpus.open_split("python_source", stdlib_dir, "validation")
    assert train.full_name == f"python_source/{corpus.PYTHON_CONFIG}/1.1.0"
    files = dict(corpus.stdlib_files())
    assert len(train) + len(val) == len(files) and len(val) > 10
    assert not any(p.startswith(("site-packages/", "test/")) or "/test/" in p for p in files)
    for split in (train, val):
        for i in range(0, len(split), max(1, len(split) // 25)):
            rec = split.records[i]
            path = rec["path"].decode()
            assert corpus.split_of(path) == split.split
            held_out = functions.held_out_lines().get(path, [])
            assert rec["text"].decode() == functions.without_lines(corpus.read_text(files[path]), held_out)


def _write(root, name, data: bytes):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def messy_dir(tmp_path):
    root = str(tmp_path / "corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(30):
        _write(root, f"sub{i % 3}/doc{i}.txt", " ".join(rng.choice(words, 200)).encode() + b"\n")
    _write(root, "empty.txt", b"")
    _write(root, "blob.bin", b"\x00\x01\x02" * 100)
    _write(root, ".hidden.txt", b"never read")
    _write(root, "bad_utf8.txt", b"caf\xe9 ok \xff\xfe end\n")
    _write(root, "one_long_line.txt", ("x" * 150_000 + "\u00e9" * 30_000).encode())  # 210 KB, no newline
    return root


def test_text_files_builds_offline_and_handles_bad_files(messy_dir, tmp_path, no_network):
    source, data_dir = f"text_files:{messy_dir}", str(tmp_path / "data")
    splits = {s: corpus.open_split(source, data_dir, s) for s in ("train", "validation")}
    assert len(splits["validation"]) >= 1
    docs = {}
    for split in splits.values():
        for i in range(len(split)):
            rec = split.records[i]
            docs.setdefault(rec["path"].decode(), []).append(rec["text"].decode())
    assert "empty.txt" not in docs and "blob.bin" not in docs and ".hidden.txt" not in docs
    assert docs["bad_utf8.txt"] == ["caf\ufffd ok \ufffd\ufffd end\n"]
    long_docs = docs["one_long_line.txt"]  # cut into <= 64 KiB documents, never inside a character
    assert len(long_docs) == 4 and all(len(d.encode()) <= corpus.MAX_DOC_BYTES for d in long_docs)
    assert sorted(long_docs, key=len, reverse=True)[0].count("x") > 0
    assert sum(len(d) for d in long_docs) == 180_000 and "\ufffd" not in "".join(long_docs)
    assert len(docs) == 32


def test_text_files_glob_and_fingerprint_follow_the_files(messy_dir, tmp_path):
    a = corpus.text_files_config(os.path.join(messy_dir, "sub0", "*.txt"))
    assert a.name == corpus.text_files_config(os.path.join(messy_dir, "sub0", "*.txt")).name
    _write(messy_dir, "sub0/doc0.txt", b"changed text\n")
    assert corpus.text_files_config(os.path.join(messy_dir, "sub0", "*.txt")).name != a.name
    split = corpus.open_split(f"text_files:{messy_dir}/sub*/*.txt", str(tmp_path / "d"), "train")
    paths = {split.records[i]["path"].decode() for i in range(len(split))}
    assert paths and all(p.startswith("sub") for p in paths)


@pytest.mark.parametrize("files, needle", [
    ({}, "no such directory"),
    ({"a.txt": b"", "b.bin": b"\0\0"}, "no text files among 2 files (1 empty, 1 binary)"),
    ({"a.txt": b"tiny"}, "one document"),
])
def test_text_files_bad_input_is_one_clear_line(tmp_path, files, needle):
    root = str(tmp_path / "c")
    for name, data in files.items():
        _write(root, name, data)
    with pytest.raises(ConfigError) as e:
        corpus.open_split(f"text_files:{root}", str(tmp_path / "d"), "train")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_split_and_field_are_clear(messy_dir, tmp_path):
    with pytest.raises(ConfigError, match="split 'test' is not in text_files/.*it has"):
        corpus.open_split(f"text_files:{messy_dir}", str(tmp_path), "test")
    split = corpus.open_split(f"text_files:{messy_dir}", str(tmp_path), "train")
    with pytest.raises(ConfigError, match="field 'sentence' is not in .*it has path, text"):
        split.texts("sentence")


def test_tfds_catalog_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        lm = corpus.open_split("tfds:lm1b", str(tmp_path), "train")
        assert len(lm) == 12 and all(isinstance(t, str) for t in lm.texts("text"))
        sst2 = corpus.open_split("tfds:glue/sst2", str(tmp_path), "train")  # a legacy builder
        assert sst2.num_classes("label") == 2 and set(sst2.labels("label")) <= {0, 1}
        wmt = corpus.open_split("tfds:wmt14_translate/de-en", str(tmp_path), "train")
        assert len(wmt.texts("de")) == len(wmt.texts("en")) == 12


def test_unknown_tfds_name_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        corpus.open_split("tfds:no_such_dataset_xyz", str(tmp_path), "train")
    assert "no such dataset in the TFDS catalog" in str(e.value) and "\n" not in str(e.value)
