"""Tokenizers: byte-level BPE trained offline (Hugging Face `tokenizers`) and plain bytes.

Why HF `tokenizers` byte-level BPE and not SentencePiece (measured here, stdlib corpus,
2 cores, vocab 8192): it trains in ~5 s against ~15 s; it maps text to UTF-8 bytes before
anything else, so every string round-trips exactly with no normaliser, no unknown token
and no escape rules; and whitespace is ordinary bytes, so runs of indentation become
tokens. SentencePiece needs lines as sentences (long ones are dropped), and it writes a
space as U+2581, so a literal U+2581 in the text comes back as a space.

Ids (both tokenizers): 0 pad, 1 bos, 2 eos, 3 mask, 4..103 the 100 T5 sentinels
(`sentinel_ids[i]` marks the i-th corrupted span), then regular tokens from
`FIRST_REGULAR_ID`. Text never encodes to a special id (the "<pad>" in a string is just
text). `vocab_size` is the embedding size, a multiple of 128; ids from `used_vocab_size`
up are never produced (a small corpus may learn fewer merges than asked for).

Byte tokenizer: id = 104 + byte, vocab_size 384, nothing to train.
`encode_bytes` / `decode_bytes` round-trip any bytes, valid UTF-8 or not.
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np

NUM_SENTINELS = 100
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
SENTINEL_IDS = tuple(range(4, 4 + NUM_SENTINELS))
FIRST_REGULAR_ID = 4 + NUM_SENTINELS
SPECIAL_NAMES = ("<pad>", "<bos>", "<eos>", "<mask>") + tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))
_SURROGATES = re.compile("([\udc80-\udcff]+)")
TRAIN_MAX_BYTES = 128 << 20  # a bpe tokenizer learns from at most this much text


def _round_up(n: int, k: int = 128) -> int:
    return -(-n // k) * k


class Tokenizer:
    """Common behaviour; subclasses define `_encode_text`, `_token_bytes`, `used_vocab_size`."""
    kind = ""
    pad_id, bos_id, eos_id, mask_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID
    sentinel_ids = SENTINEL_IDS
    first_regular_id = FIRST_REGULAR_ID

    vocab_size: int
    used_vocab_size: int
    fingerprint: str
    _table: list[bytes]        # id -> bytes it stands for (specials -> b"")
    _byte_ids: np.ndarray      # byte value -> id of the token that is just that byte

    def encode(self, text: str) -> list[int]:
        return self.encode_np(text).tolist()

    def encode_np(self, text: str) -> np.ndarray:
        """int32 ids of `text` (no bos/eos). Lone surrogates are not text: ValueError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("tokenizer input has a lone surrogate, which is not valid Unicode; "
                             "pass the raw bytes to encode_bytes instead") from None
        return self._encode_text(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_np(t) for t in texts]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes: valid UTF-8 runs are tokenized, other bytes become byte tokens."""
        out = []
        for i, part in enumerate(_SURROGATES.split(data.decode("utf-8", errors="surrogateescape"))):
            if i % 2:
                out.append(self._byte_ids[np.frombuffer(part.encode("utf-8", "surrogateescape"), np.uint8)])
            elif part:
                out.append(self._encode_text(part))
        return np.concatenate(out).tolist() if out else []

    def decode_bytes(self, ids) -> bytes:
        table, n = self._table, len(self._table)
        return b"".join(table[i] if 0 <= i < n else b"" for i in np.asarray(ids, np.int64).tolist())

    def token_byte_lengths(self) -> np.ndarray:
        """[vocab_size] int64: how many bytes of text each id stands for (0 for special and unused ids)."""
        return np.array([len(self.decode_bytes([i])) for i in range(self.vocab_size)], np.int64)

    def decode(self, ids) -> str:
        """Text of `ids`; special and unused ids are dropped; bad UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return SPECIAL_NAMES[i] if i < FIRST_REGULAR_ID else self._table[i].decode("utf-8", "backslashreplace")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = dict(kind=self.kind, vocab_size=self.vocab_size, fingerprint=self.fingerprint)
        self._save_extra(directory)
        with open(os.path.join(directory, "tokenizer_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    def _save_extra(self, directory: str) -> None:
        pass

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        path = os.path.join(directory, "tokenizer_meta.json")
        if not os.path.exists(path):
            raise ValueError(f"no tokenizer in {directory} (tokenizer_meta.json missing); "
                             "save one with Tokenizer.save(dir)")
        with open(path) as f:
            meta = json.load(f)
        if meta["kind"] == "byte":
            return ByteTokenizer()
        if meta["kind"] == "hf":  # a pretrained checkpoint's own tokenizer (data/hf_tokenizer.py)
            from transformer_jax.data.hf_tokenizer import HFTokenizer
            return HFTokenizer(directory, meta["vocab_size"], meta["special"])
        with open(os.path.join(directory, "tokenizer.json")) as f:
            return BpeTokenizer(f.read(), meta["vocab_size"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


class ByteTokenizer(Tokenizer):
    """One id per byte, offset past the special ids."""
    kind = "byte"
    vocab_size = _round_up(FIRST_REGULAR_ID + 256)
    used_vocab_size = FIRST_REGULAR_ID + 256
    fingerprint = "byte-v1"

    def __init__(self):
        self._table = [b""] * FIRST_REGULAR_ID + [bytes([b]) for b in range(256)]
        self._byte_ids = np.arange(FIRST_REGULAR_ID, FIRST_REGULAR_ID + 256, dtype=np.int32)

    def _encode_text(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + FIRST_REGULAR_ID

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids, np.int64)
        return (ids[(ids >= FIRST_REGULAR_ID) & (ids < self.used_vocab_size)] - FIRST_REGULAR_ID).astype(
            np.uint8).tobytes()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class BpeTokenizer(Tokenizer):
    """Byte-level BPE; HF ids are shifted up by FIRST_REGULAR_ID."""
    kind = "bpe"

    def __init__(self, tokenizer_json: str, vocab_size: int):
        from tokenizers import Tokenizer as HFTokenizer
        self._json = tokenizer_json
        self._hf = HFTokenizer.from_str(tokenizer_json)
        n = self._hf.get_vocab_size()
        self.used_vocab_size = FIRST_REGULAR_ID + n
        if vocab_size < self.used_vocab_size or vocab_size % 128:
            raise ValueError(f"vocab_size={vocab_size} must be a multiple of 128 and >= {self.used_vocab_size}")
        self.vocab_size = vocab_size
        from transformer_jax.data._files import digest
        self.fingerprint = f"bpe{vocab_size}-" + digest(tokenizer_json)
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        self._table = [b""] * FIRST_REGULAR_ID + [
            bytes(inverse[c] for c in self._hf.id_to_token(i)) for i in range(n)]
        byte_chars = _bytes_to_unicode()
        self._byte_ids = np.array([self._hf.token_to_id(byte_chars[b]) + FIRST_REGULAR_ID for b in range(256)],
                                  np.int32)

    def _encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, np.int32) + FIRST_REGULAR_ID

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Multi-threaded (Rust) encoding of many texts."""
        try:
            encs = self._hf.encode_batch(texts, add_special_tokens=False)
        except Exception:  # noqa: BLE001  (a lone surrogate somewhere: one by one says which)
            return [self.encode_np(t) for t in texts]
        return [np.asarray(e.ids, np.int32) + FIRST_REGULAR_ID for e in encs]

    def _save_extra(self, directory: str) -> None:
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write(self._json)


def train_bpe(texts, vocab_size: int) -> BpeTokenizer:
    """Trains byte-level BPE on an iterable of strings (no normaliser: exact round-trip)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - FIRST_REGULAR_ID, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(hf.to_str(), vocab_size)


def get_tokenizer(cfg) -> Tokenizer:
    """The tokenizer for `cfg` (a DataConfig): bytes, or bpe loaded from the cache or trained
    on the train split of `tokenizer_source(cfg)` and cached, keyed by dataset + vocab size."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    from transformer_jax.data import _files, config, corpus
    source, root = config.tokenizer_source(cfg), config.data_dir(cfg)
    if source == cfg.source:
        split, f = cfg.train_split, config.fields(cfg)
        names = [f["input"], f["target"]] if cfg.task == "seq2seq" else [f["text"]]
    else:
        split, names = "train", ["text"]
    data = corpus.open_split(source, root, split)
    key = f"{data.full_name.replace('/', '_')}-{split}-{'+'.join(names)}-bpe{cfg.vocab_size}"
    path = os.path.join(root, "tokenizers", re.sub(r"[^\w.+-]", "_", key))
    if not os.path.exists(os.path.join(path, "tokenizer_meta.json")):
        with _files.locked(path):
            if not os.path.exists(os.path.join(path, "tokenizer_meta.json")):
                start = time.time()
                texts, num_bytes = _training_text(data, names)
                tok = train_bpe(texts, cfg.vocab_size)
                with _files.atomic_dir(path) as tmp:
                    tok.save(tmp)
                    with open(os.path.join(tmp, "training.json"), "w") as fh:
                        json.dump(dict(source=source, dataset=data.full_name, split=split, fields=names,
                                       bytes=num_bytes, seconds=round(time.time() - start, 2)), fh, indent=1)
    return Tokenizer.load(path)


def _training_text(data, names: list[str]) -> tuple[list[str], int]:
    """Texts of `names`, records in a seeded order, up to TRAIN_MAX_BYTES."""
    for name in names:
        data.check_field(name)
    order = np.random.default_rng(0).permutation(len(data))
    texts, total = [], 0
    for start in range(0, len(order), 1024):
        rows = data.read(order[start:start + 1024])
        for row in rows:
            for name in names:
                v = row[name]
                t = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                texts.append(t)
                total += len(t)
        if total >= TRAIN_MAX_BYTES:
            break
    return texts, total
