"""A checkpoint's own tokenizer: the ids of transformers' tokenizer, special tokens from
tokenizer_config.json or config.json, a saved copy that reloads, rows that start with its bos."""
import json

import numpy as np
import pytest
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from transformer_jax.config import ConfigError
from transformer_jax.data.hf_tokenizer import HFTokenizer
from transformer_jax.data.tasks import LMTask
from transformer_jax.data.tokenizer import Tokenizer as OurTokenizer

TEXT = "def add(a, b):\n    return a + b  # ünïcode\n"


def make_dir(path, specials=("<unk>", "<s>", "</s>"), config=None, tokenizer_config=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3, "class A:\n    pass\n"], trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(
            dict(tokenizer_config, tokenizer_class="PreTrainedTokenizerFast")))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_ids_and_specials_follow_transformers(tmp_path):
    d = make_dir(tmp_path / "a", tokenizer_config=dict(bos_token="<s>", eos_token="</s>"))
    ours = HFTokenizer.from_pretrained(d, vocab_size=512)
    theirs = T.AutoTokenizer.from_pretrained(d)
    ids = ours.encode(TEXT)
    assert ids == theirs(TEXT, add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # no pad token: eos fills decode outputs
    assert ours.decode(ids) == TEXT and ours.decode_bytes(ids) == TEXT.encode()  # bytes: id by id
    assert ours.decode_bytes([ours.bos_id, ours.eos_id]) == b""
    assert [a.tolist() for a in ours.encode_batch([TEXT, "x"])] == [ids, ours.encode("x")]

    saved = tmp_path / "saved"
    ours.save(str(saved))
    back = OurTokenizer.load(str(saved))
    assert isinstance(back, HFTokenizer) and back.fingerprint == ours.fingerprint and back.encode(TEXT) == ids
    assert T.AutoTokenizer.from_pretrained(saved)(TEXT, add_special_tokens=False)["input_ids"] == ids


def test_config_json_ids_and_a_missing_bos(tmp_path):
    """Qwen2 style: no bos token, eos from config.json: documents start with eos."""
    d = make_dir(tmp_path / "b", specials=("<|endoftext|>",), config=dict(eos_token_id=0, bos_token_id=None))
    tok = HFTokenizer.from_pretrained(d, vocab_size=300)
    assert (tok.bos_id, tok.eos_id) == (0, 0)

    class Store:
        lengths = np.array([3])

        def slice(self, doc, a, b):
            return np.array([10, 11, 12], np.int32)[a:b]

    task = LMTask(Store(), 8, 0, False, bos_id=tok.bos_id, eos_id=tok.eos_id)
    out = {k: np.zeros((1, 8), dt) for k, dt in task.keys.items()}
    task.fill(out, 0, 0, 0)
    assert out["inputs"][0, :4].tolist() == [0, 10, 11, 12] and out["targets"][0, :4].tolist() == [10, 11, 12, 0]


def test_mismatches_are_one_line_errors(tmp_path):
    d = make_dir(tmp_path / "c", tokenizer_config=dict(bos_token="<s>", eos_token="</s>"))
    with pytest.raises(ConfigError, match=r"has \d+ tokens but the model.s embedding has 256 rows"):
        HFTokenizer.from_pretrained(d, vocab_size=256)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        HFTokenizer.from_pretrained(tmp_path, vocab_size=512)
    (d / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<nope>")))
    with pytest.raises(ConfigError, match="eos_token='<nope>'"):
        HFTokenizer.from_pretrained(d, vocab_size=512)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="no eos token"):
        HFTokenizer.from_pretrained(d, vocab_size=512)


def test_sentencepiece_style_pieces_count_their_bytes(tmp_path):
    """Llama 2 / Mistral tokenizers: U+2581 is a space; the decoder drops the leading one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT * 3], trainer=trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<s>", "</s>"], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(bos_token="<s>", eos_token="</s>")))
    ours = HFTokenizer.from_pretrained(tmp_path, vocab_size=256)
    ids = ours.encode("def add(a, b):")
    assert ours.decode(ids) == "def add(a, b):" and ours.decode_bytes(ids) == b" def add(a, b):"
