"""Tokenizers: exact round-trip of any text and any bytes, special ids, save/load, caching."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_jax.data import corpus
from transformer_jax.data import tokenizer as T
from transformer_jax.data.config import DataConfig

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module")
def bpe():
    files = corpus.stdlib_files()[::12]  # ~60 files, ~1 MB of code: trains in about a second
    return T.train_bpe([corpus.read_text(p) for _, p in files], vocab_size=2048)


@pytest.fixture(scope="module", params=["bpe", "byte"])
def tok(request, bpe):
    return bpe if request.param == "bpe" else T.ByteTokenizer()


CODE = 'class A:\n    def f(self, x):\n\t\treturn  x  # tab, two spaces\r\n\n\n"""doc ▁ string"""\n'


@given(text=st.text())
@SETTINGS
def test_any_text_round_trips_bpe(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(bpe.first_regular_id <= i < bpe.used_vocab_size for i in ids)


@given(text=st.text())
@SETTINGS
def test_any_text_round_trips_byte(text):
    tok = T.ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) == len(text.encode())


@given(data=st.binary(max_size=300))
@SETTINGS
def test_any_bytes_round_trip(bpe, data):
    for tok in (bpe, T.ByteTokenizer()):
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_code_whitespace_and_rare_characters(tok):
    for text in (CODE, "\u2581 leading space", "  \n  ", "日本語 🎉 \x00 \x7f", "<pad><bos><mask><extra_id_0>"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert min(ids) >= tok.first_regular_id  # text never becomes a special id


def test_bpe_compresses_code_and_learns_indentation(bpe):
    ids = bpe.encode(CODE * 20)
    assert len(ids) < 0.5 * len((CODE * 20).encode())
    pieces = [bpe.id_to_piece(i) for i in bpe.encode("        return x")]
    assert any(p.isspace() and len(p) >= 4 for p in pieces), pieces


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert len(tok.sentinel_ids) == 100 and len(set(tok.sentinel_ids)) == 100
    assert min(tok.sentinel_ids) > tok.mask_id and max(tok.sentinel_ids) < tok.first_regular_id
    assert tok.vocab_size % 128 == 0 and tok.used_vocab_size <= tok.vocab_size
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.eos_id, tok.pad_id]) == "hi"
    assert tok.id_to_piece(tok.sentinel_ids[7]) == "<extra_id_7>"


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="lone surrogate.*encode_bytes"):
        tok.encode("a\ud800b")


def test_megabyte_line(bpe):
    text = "x" * 1_000_000 + " y" * 100_000
    assert bpe.decode(bpe.encode(text)) == text


def test_save_load_is_identical(tok, tmp_path):
    tok.save(str(tmp_path))
    back = T.Tokenizer.load(str(tmp_path))
    assert type(back) is type(tok) and back.fingerprint == tok.fingerprint and back.vocab_size == tok.vocab_size
    assert back.encode(CODE) == tok.encode(CODE)
    with pytest.raises(ValueError, match="no tokenizer in"):
        T.Tokenizer.load(str(tmp_path / "missing"))


def test_encode_batch_matches_encode(tok):
    texts = [CODE, "", "abc", "ü" * 10]
    assert [list(a) for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


@pytest.fixture
def code_dir(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i, (_, path) in enumerate(corpus.stdlib_files()[:40]):
        (root / f"f{i}.py").write_text(corpus.read_text(path))
    return root


def test_get_tokenizer_trains_once_then_loads(tmp_path, code_dir):
    cfg = DataConfig(source=f"text_files:{code_dir}", data_dir=str(tmp_path / "data"), vocab_size=1024)
    first = T.get_tokenizer(cfg)
    cached = [d for d in os.listdir(tmp_path / "data" / "tokenizers") if not d.endswith(".lock")]
    assert len(cached) == 1 and "bpe1024" in cached[0]
    meta = tmp_path / "data" / "tokenizers" / cached[0] / "training.json"
    stamp = meta.stat().st_mtime_ns
    again = T.get_tokenizer(cfg)
    assert again.fingerprint == first.fingerprint and meta.stat().st_mtime_ns == stamp
    assert T.get_tokenizer(cfg.replace(vocab_size=1152)).vocab_size == 1152  # a new key, a new tokenizer
    assert isinstance(T.get_tokenizer(cfg.replace(tokenizer="byte")), T.ByteTokenizer)
    np.testing.assert_array_equal(first.encode_np(CODE), again.encode_np(CODE))


def test_fine_tuning_source_shares_the_pretraining_tokenizer(tmp_path, code_dir):
    pre = DataConfig(source=f"text_files:{code_dir}", data_dir=str(tmp_path), vocab_size=1024)
    fine = DataConfig(source="python_functions", task="classify", tokenizer_source=pre.source,
                      data_dir=str(tmp_path), vocab_size=1024)
    assert T.get_tokenizer(fine).fingerprint == T.get_tokenizer(pre).fingerprint
