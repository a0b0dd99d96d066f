"""Data: TFDS builders, an offline tokenizer, tasks, and a resumable per-host grain pipeline.

Typical use (the trainer)::

    from transformer_jax import data
    cfg = data.DataConfig()                      # stdlib source, bpe 8192, causal LM
    tok = data.get_tokenizer(cfg)                # trained once (~5 s), then cached
    it = data.make_iterator(cfg, tok, seq_len=512, global_batch_size=8)
    batch = data.make_global_batch(next(it), NamedSharding(mesh, P(("data", "fsdp"), None)))
    state = it.get_state()                       # bytes (JSON); it.set_state(state) resumes exactly

Modules: config (DataConfig, sources, fields, data_dir), corpus (TFDS builders
python_source and text_files, `open_split`), functions (python_functions builder for the
downstream tasks), tokenizer (bpe/byte, `get_tokenizer`), cache (tokenize once, memory
mapped), tasks (rows for each task), pipeline (`make_iterator`, `make_global_batch`),
bpb (evaluation text, bits per byte, classical compressor baselines).

Batches: dicts of numpy arrays for this host (B = global_batch_size / process count),
int32 unless stated, zeros are padding.
  lm        inputs, targets (next token of the same document), segment_ids (0 = padding,
            documents numbered 1.. per row), positions (restart at 0 per segment),
            weights f32 (1.0 exactly on real targets)                           [B, L]
  mlm       inputs (corrupted), targets (originals), weights (1.0 on the ~15% selected),
            segment_ids, positions                                              [B, L]
  span      inputs, input_segment_ids, input_positions                         [B, L]
  seq2seq   decoder_inputs (targets shifted right per segment, starting with bos_id),
            targets, target_segment_ids, target_positions, weights f32          [B, Lt]
            (span: Lt from T5's rule, 114 for L=512; seq2seq: target_seq_len)
  classify  inputs (bos first: pool token 0), segment_ids, positions             [B, L]
            label [B], weights f32 [B] (0.0 on padding rows of a final batch); no packing

Tokenizer (`get_tokenizer(cfg)`, `Tokenizer.load(dir)`, `tok.save(dir)`):
  encode(str) -> list[int], decode(ids) -> str, encode_bytes / decode_bytes, vocab_size
  (multiple of 128: size the embedding by it), pad_id 0, bos_id 1, eos_id 2, mask_id 3,
  sentinel_ids (100, T5), fingerprint. Every string round-trips exactly.

Downstream tasks: `DataConfig(source="python_functions", task="classify")` (which of 16
stdlib packages a function is from; `label_names(cfg)`) or `task="seq2seq"` (the
function's name from its body with the name masked). They reuse the python_source
tokenizer, so a model pretrained on the default corpus fine-tunes on them directly.

Bad input, and what happens:
  unknown source / tfds name, missing split or field, seq_len < 2, batch not divisible by
  hosts -> ConfigError (one line); offline with an unprepared tfds dataset -> ConfigError
  naming it; a directory or glob with no text files (or only empty/binary ones) ->
  ConfigError with the counts; empty files -> skipped; binary files (NUL byte) ->
  skipped; invalid UTF-8 -> U+FFFD; lines of megabytes -> cut into 64 KiB documents
  (text_files) or tokenized whole (python_source); a state from other data ->
  ValueError on set_state. Nothing is read lazily enough to fail mid-epoch: all text is
  decoded and tokenized when the cache is built.
"""
from transformer_jax.data.config import DataConfig, data_dir, fields, parse_source, tokenizer_source

_LAZY = {
    "make_iterator": "pipeline", "make_global_batch": "pipeline", "DataIterator": "pipeline",
    "label_names": "pipeline", "tokens_per_batch": "pipeline",
    "get_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "ByteTokenizer": "tokenizer",
    "BpeTokenizer": "tokenizer", "train_bpe": "tokenizer",
    "eval_text": "bpb", "EvalText": "bpb", "compression_bits_per_byte": "bpb", "compression_report": "bpb", "bits_per_byte": "bpb",
    "open_split": "corpus",
}

__all__ = ["DataConfig", "data_dir", "fields", "parse_source", "tokenizer_source", *_LAZY]


def __getattr__(name):  # heavy imports (tfds, tokenizers, grain) only when used
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"transformer_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'transformer_jax.data' has no attribute {name!r}")
