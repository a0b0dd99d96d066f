"""A pretrained checkpoint's own tokenizer (`tokenizer.json`, read with Hugging Face `tokenizers`),
behind the same interface as this library's tokenizers, for fine-tuning imported models.

    tok = HFTokenizer.from_pretrained("path/to/llama", vocab_size=128256)   # = embedding rows

Ids are the checkpoint's. Special tokens come from `tokenizer_config.json` (`bos_token`,
`eos_token`, `pad_token`, as strings or {"content": ...}), else `config.json`
(`bos_token_id`, `eos_token_id`, `pad_token_id`). A document reads `bos text eos`; a tokenizer
without a bos token (Qwen2) starts documents with eos, as GPT-2 does. Padding never needs a
token id of its own: padded slots have segment id 0 and weight 0 (pad_id, used to fill
decode outputs, is the pad token, else eos). The vocabulary may be smaller than the
embedding (Qwen2 pads its table); a larger one is an error.

Only causal LM: there are no mask or sentinel tokens. `save` copies the tokenizer files, so a
run's `tokenizer/` directory can be exported next to the weights.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.data.tokenizer import Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class HFTokenizer(Tokenizer):
    kind = "hf"
    mask_id = None
    sentinel_ids = ()
    first_regular_id = 0

    def __init__(self, directory: str | os.PathLike, vocab_size: int, special: dict[str, int | None]):
        from tokenizers import Tokenizer as RustTokenizer

        from transformer_jax.data._files import digest
        self.directory = Path(directory)
        text = (self.directory / "tokenizer.json").read_text()
        self._hf = RustTokenizer.from_str(text)
        self.used_vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        if self.used_vocab_size > vocab_size:
            raise ConfigError(f"the tokenizer in {self.directory} has {self.used_vocab_size} tokens but the model's "
                              f"embedding has {vocab_size} rows; use the tokenizer saved with this checkpoint")
        if special.get("eos") is None:
            raise ConfigError(f"the tokenizer in {self.directory} has no eos token; set eos_token in its "
                              "tokenizer_config.json")
        self.vocab_size = vocab_size
        self.eos_id = special["eos"]
        self.bos_id = self.eos_id if special.get("bos") is None else special["bos"]
        self.pad_id = self.eos_id if special.get("pad") is None else special["pad"]
        self.fingerprint = "hf-" + digest(text, vocab_size, self.bos_id, self.eos_id)
        self._table = _token_bytes(self._hf, json.loads(text).get("decoder") or {})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, vocab_size: int) -> "HFTokenizer":
        """The tokenizer of a transformers checkpoint directory (its tokenizer.json)."""
        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise ConfigError(f"{d} has no tokenizer.json; save the checkpoint's tokenizer beside its weights "
                              "(tokenizer.save_pretrained)")
        return cls(d, vocab_size, _special_ids(d))

    def _encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        try:
            encs = self._hf.encode_batch(texts, add_special_tokens=False)
        except Exception:  # noqa: BLE001  (a lone surrogate somewhere: one by one says which)
            return [self.encode_np(t) for t in texts]
        return [np.asarray(e.ids, np.int32) for e in encs]

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids) -> str:
        """Text of `ids` through the tokenizer's own decoder (`decode_bytes`: the bytes each id stands for)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.used_vocab_size]
        return self._hf.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._hf.id_to_token(i) or ""

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for name in FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, os.path.join(directory, name))
        meta = dict(kind=self.kind, vocab_size=self.vocab_size, fingerprint=self.fingerprint,
                    special=dict(bos=self.bos_id, eos=self.eos_id, pad=self.pad_id))
        with open(os.path.join(directory, "tokenizer_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)


def _token_bytes(hf, decoder: dict) -> list[bytes]:
    """id -> the bytes it stands for (special tokens: b""): byte-level pieces through GPT-2's
    byte map, SentencePiece pieces with U+2581 as a space and <0xNN> byte fallbacks."""
    from transformer_jax.data.tokenizer import _bytes_to_unicode
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    table = []
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        piece = hf.id_to_token(i) or ""
        if i in special:
            table.append(b"")
        elif "ByteLevel" in kinds and all(c in inverse for c in piece):
            table.append(bytes(inverse[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def _special_ids(d: Path) -> dict[str, int | None]:
    """bos/eos/pad ids: tokenizer_config.json's token strings, else config.json's ids."""
    from tokenizers import Tokenizer as RustTokenizer
    tok = RustTokenizer.from_file(str(d / "tokenizer.json"))
    tcfg = _json(d / "tokenizer_config.json")
    mcfg = _json(d / "config.json")
    out = {}
    for name in ("bos", "eos", "pad"):
        token = tcfg.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        i = tok.token_to_id(token) if token else None
        if token and i is None:
            raise ConfigError(f"{d / 'tokenizer_config.json'} names {name}_token={token!r}, which tokenizer.json "
                              "does not hold")
        if i is None:
            i = mcfg.get(f"{name}_token_id")
            i = i[0] if isinstance(i, list) and i else i
        out[name] = i if isinstance(i, int) else None
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
