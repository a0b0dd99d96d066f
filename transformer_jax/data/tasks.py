"""Tasks: how tokenized records become fixed-size rows. Pure numpy, random access.

Every task has `rows_per_epoch` and `fill(out, k, epoch, row)`, which writes row `row` of
`epoch` into batch slot `k` of the zero-initialised arrays `out` (zeros = padding:
segment id 0, weight 0). The pipeline decides which (epoch, row) each slot gets.

* lm: each document is `bos text eos`; its (input, target) pairs are laid end to end in
  a per-epoch shuffled order and cut every `seq_len` pairs, so rows are full, a document
  longer than a row continues in later rows, and every target of an epoch appears once.
  Segments are numbered 1.. per row, positions restart at 0 in each segment.
* mlm: the same layout over `bos text eos` tokens; BERT masking (select `mask_rate` of
  the non-special tokens, 80% -> mask, 10% -> a random regular token, 10% unchanged).
* span: T5 span corruption. `text eos` streams are cut into chunks of `raw_len` tokens
  (chosen so inputs are exactly `seq_len` long, `span_lengths`); a chunk may hold the
  end of one document and the start of the next, as in T5. Noise density and mean span
  length follow T5; inputs and targets each end with eos; one segment per row.
* seq2seq: (input eos, target eos) pairs, truncated to fit, packed greedily in a seeded
  order computed once (the rows' order is reshuffled every epoch).
* classify: `bos text eos`, truncated, one example per row, with its label.

Decoder inputs (span, seq2seq) are the targets shifted right within each segment,
starting with **bos** (not pad).
"""
from __future__ import annotations

import numpy as np

from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, MASK_ID


def rng_for(seed: int, salt: int, epoch: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, salt, epoch, row])


def seq_slice(store, doc: int, a: int, b: int, bos: bool, eos: bool, bos_id: int = BOS_ID,
              eos_id: int = EOS_ID) -> np.ndarray:
    """Elements [a, b) of `[bos]? text [eos]?` for document `doc` of `store`."""
    lead, n = int(bos), int(store.lengths[doc])
    parts = []
    if bos and a < 1 <= b:
        parts.append(np.array([bos_id], np.int32))
    lo, hi = max(a - lead, 0), min(b - lead, n)
    if hi > lo:
        parts.append(store.slice(doc, lo, hi))
    if eos and a <= lead + n < b:
        parts.append(np.array([eos_id], np.int32))
    if not parts:
        return np.zeros(0, np.int32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class StreamLayout:
    """Documents of `units[d]` units laid end to end in a per-epoch order, cut every `row_len`."""

    def __init__(self, units: np.ndarray, row_len: int, seed: int, shuffle: bool):
        self.units, self.row_len, self.seed, self.shuffle = units.astype(np.int64), row_len, seed, shuffle
        self.total = int(self.units.sum())
        self.rows_per_epoch = max(1, -(-self.total // row_len))
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative units with a leading 0) of epoch e."""
        if e not in self._epochs:
            order = (np.random.default_rng([self.seed, 1, e]).permutation(len(self.units)) if self.shuffle
                     else np.arange(len(self.units)))
            cum = np.concatenate([[0], np.cumsum(self.units[order])])
            self._epochs = {e: (order, cum)}  # keep one epoch: rows arrive roughly in epoch order
        return self._epochs[e]

    def pieces(self, e: int, r: int) -> list[tuple[int, int, int]]:
        """(document, first unit, end unit) of the documents row r of epoch e covers."""
        order, cum = self.epoch(e)
        start, stop = r * self.row_len, min((r + 1) * self.row_len, self.total)
        i = int(np.searchsorted(cum, start, side="right")) - 1
        out = []
        while i < len(order) and cum[i] < stop:
            lo, hi = max(start, cum[i]), min(stop, cum[i + 1])
            if hi > lo:
                out.append((int(order[i]), int(lo - cum[i]), int(hi - cum[i])))
            i += 1
        return out


def _put(out: dict, k: int, pos: int, **cols) -> None:
    for name, v in cols.items():
        out[name][k, pos:pos + len(v)] = v


class LMTask:
    keys = dict(inputs=np.int32, targets=np.int32, segment_ids=np.int32, positions=np.int32, weights=np.float32)

    def __init__(self, store, seq_len: int, seed: int, shuffle: bool, bos_id: int = BOS_ID, eos_id: int = EOS_ID):
        self.store, self.seq_len, self.special = store, seq_len, dict(bos_id=bos_id, eos_id=eos_id)
        self.layout = StreamLayout(store.lengths + 1, seq_len, seed, shuffle)
        self.rows_per_epoch = self.layout.rows_per_epoch
        self.shapes = {k: (seq_len,) for k in self.keys}

    def fill(self, out: dict, k: int, e: int, r: int) -> None:
        pos = 0
        for seg, (d, a, b) in enumerate(self.layout.pieces(e, r), 1):
            seq = seq_slice(self.store, d, a, b + 1, bos=True, eos=True, **self.special)
            n = b - a
            _put(out, k, pos, inputs=seq[:-1], targets=seq[1:], segment_ids=np.full(n, seg),
                 positions=np.arange(n), weights=np.ones(n))
            pos += n


def mlm_mask(tokens: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, rate: float,
             low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT corruption: (inputs, weights) with round(rate * #candidates) positions selected."""
    idx = np.flatnonzero(candidates)
    num = min(len(idx), max(1, int(round(rate * len(idx))))) if len(idx) else 0
    sel = rng.choice(idx, num, replace=False) if num else idx
    u = rng.random(num)
    inputs = tokens.copy()
    inputs[sel[u < 0.8]] = MASK_ID
    rand = sel[(u >= 0.8) & (u < 0.9)]
    inputs[rand] = rng.integers(low, high, len(rand))
    weights = np.zeros(len(tokens), np.float32)
    weights[sel] = 1.0
    return inputs, weights


class MLMTask:
    keys = dict(inputs=np.int32, targets=np.int32, segment_ids=np.int32, positions=np.int32, weights=np.float32)

    def __init__(self, store, seq_len: int, seed: int, shuffle: bool, rate: float, low: int, high: int):
        self.store, self.seq_len, self.seed = store, seq_len, seed
        self.rate, self.low, self.high = rate, low, high
        self.layout = StreamLayout(store.lengths + 2, seq_len, seed, shuffle)
        self.rows_per_epoch = self.layout.rows_per_epoch
        self.shapes = {k: (seq_len,) for k in self.keys}

    def fill(self, out: dict, k: int, e: int, r: int) -> None:
        pos = 0
        for seg, (d, a, b) in enumerate(self.layout.pieces(e, r), 1):
            seq = seq_slice(self.store, d, a, b, bos=True, eos=True)
            _put(out, k, pos, targets=seq, segment_ids=np.full(len(seq), seg), positions=np.arange(len(seq)))
            pos += len(seq)
        tokens = out["targets"][k, :pos]
        cand = (tokens != BOS_ID) & (tokens != EOS_ID)
        inputs, weights = mlm_mask(tokens, cand, rng_for(self.seed, 2, e, r), self.rate, self.low, self.high)
        out["inputs"][k, :pos], out["weights"][k, :pos] = inputs, weights


def _noise_counts(n: int, density: float, mean: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of n tokens (T5's rounding)."""
    if n < 2:
        return 0, 0
    noise = min(max(int(round(n * density)), 1), n - 1)
    return noise, min(max(1, int(round(noise / mean))), n - noise)


def span_lengths(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """T5's random_spans_helper: (raw tokens per chunk, targets length) so inputs fill exactly."""
    def lengths(n):
        noise, spans = _noise_counts(n, density, mean)
        return n - noise + spans + 1, noise + spans + 1
    n = 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    return n, lengths(n)[1]


def noise_mask(n: int, density: float, mean: float, rng: np.random.Generator) -> np.ndarray:
    """bool[n]: alternating non-noise / noise spans of random lengths, starting non-noise."""
    noise, spans = _noise_counts(n, density, mean)
    if spans == 0:
        return np.zeros(n, bool)

    def split(items, parts):  # random composition of `items` into `parts` positive parts
        cuts = np.sort(rng.choice(np.arange(1, items), parts - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [items]]))
    lens = np.stack([split(n - noise, spans), split(noise, spans)], 1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), lens)


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Each run of True in `mask` becomes one sentinel (numbered in order); False tokens stay."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    out = np.where(starts, sentinels[np.maximum(np.cumsum(starts) - 1, 0)], tokens)
    return out[~mask | starts]


def span_corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels) -> tuple[np.ndarray, np.ndarray]:
    """T5 (inputs, targets), each ending with eos."""
    sentinels = np.asarray(sentinels, np.int32)
    eos = np.array([EOS_ID], np.int32)
    return (np.concatenate([_replace_spans(tokens, mask, sentinels), eos]),
            np.concatenate([_replace_spans(tokens, ~mask, sentinels), eos]))


def _decoder_cols(inputs, targets, seg=1) -> dict:
    dec = np.concatenate([[BOS_ID], targets[:-1]])
    return dict(decoder_inputs=dec, targets=targets, target_segment_ids=np.full(len(targets), seg),
                target_positions=np.arange(len(targets)), weights=np.ones(len(targets)))


_ENC_DEC_KEYS = dict(inputs=np.int32, input_segment_ids=np.int32, input_positions=np.int32,
                     decoder_inputs=np.int32, targets=np.int32, target_segment_ids=np.int32,
                     target_positions=np.int32, weights=np.float32)


def _enc_dec_shapes(seq_len: int, target_len: int) -> dict:
    return {k: ((seq_len,) if k.startswith("input") else (target_len,)) for k in _ENC_DEC_KEYS}


class SpanTask:
    keys = _ENC_DEC_KEYS

    def __init__(self, store, seq_len: int, seed: int, shuffle: bool, density: float, mean: float, sentinels):
        self.store, self.seed, self.density, self.mean = store, seed, density, mean
        self.raw_len, self.target_len = span_lengths(seq_len, density, mean)
        needed = _noise_counts(self.raw_len, density, mean)[1]
        if needed > len(sentinels):
            raise ValueError(f"span corruption at seq_len={seq_len} needs {needed} sentinels, the tokenizer has "
                             f"{len(sentinels)}; use a shorter seq_len or a larger mean_noise_span_length")
        self.sentinels = np.asarray(sentinels, np.int32)
        self.layout = StreamLayout(store.lengths + 1, self.raw_len, seed, shuffle)
        self.rows_per_epoch = self.layout.rows_per_epoch
        self.shapes = _enc_dec_shapes(seq_len, self.target_len)

    def fill(self, out: dict, k: int, e: int, r: int) -> None:
        parts = [seq_slice(self.store, d, a, b, bos=False, eos=True) for d, a, b in self.layout.pieces(e, r)]
        tokens = np.concatenate(parts)
        mask = noise_mask(len(tokens), self.density, self.mean, rng_for(self.seed, 3, e, r))
        inputs, targets = span_corrupt(tokens, mask, self.sentinels)
        _put(out, k, 0, inputs=inputs, input_segment_ids=np.ones(len(inputs)), input_positions=np.arange(len(inputs)))
        _put(out, k, 0, **_decoder_cols(inputs, targets))


class Seq2SeqTask:
    keys = _ENC_DEC_KEYS

    def __init__(self, inputs, targets, seq_len: int, target_len: int, seed: int, shuffle: bool):
        self.inputs, self.targets, self.seq_len, self.target_len = inputs, targets, seq_len, target_len
        lin = np.minimum(inputs.lengths + 1, seq_len)
        ltg = np.minimum(targets.lengths + 1, target_len)
        self.order = (np.random.default_rng([seed, 4]).permutation(len(lin)) if shuffle
                      else np.arange(len(lin)))
        starts, used_in, used_tg = [0], 0, 0
        for j, i in enumerate(self.order.tolist()):  # greedy packing, once
            if used_in + lin[i] > seq_len or used_tg + ltg[i] > target_len:
                starts.append(j)
                used_in, used_tg = 0, 0
            used_in, used_tg = used_in + lin[i], used_tg + ltg[i]
        self.starts = np.asarray(starts + [len(self.order)], np.int64)
        self.rows_per_epoch = len(starts)
        self.shapes = _enc_dec_shapes(seq_len, target_len)

    def fill(self, out: dict, k: int, e: int, r: int) -> None:
        pos_in = pos_tg = 0
        for seg, i in enumerate(self.order[self.starts[r]:self.starts[r + 1]].tolist(), 1):
            src = np.append(self.inputs.slice(i, 0, min(int(self.inputs.lengths[i]), self.seq_len - 1)), EOS_ID)
            tgt = np.append(self.targets.slice(i, 0, min(int(self.targets.lengths[i]), self.target_len - 1)), EOS_ID)
            _put(out, k, pos_in, inputs=src, input_segment_ids=np.full(len(src), seg),
                 input_positions=np.arange(len(src)))
            _put(out, k, pos_tg, **_decoder_cols(src, tgt, seg))
            pos_in, pos_tg = pos_in + len(src), pos_tg + len(tgt)


class ClassifyTask:
    keys = dict(inputs=np.int32, segment_ids=np.int32, positions=np.int32, label=np.int32, weights=np.float32)

    def __init__(self, store, labels: np.ndarray, seq_len: int):
        self.store, self.labels, self.seq_len = store, labels, seq_len
        self.rows_per_epoch = len(store)
        self.shapes = dict(inputs=(seq_len,), segment_ids=(seq_len,), positions=(seq_len,), label=(), weights=())

    def fill(self, out: dict, k: int, e: int, r: int) -> None:
        body = self.store.slice(r, 0, min(int(self.store.lengths[r]), self.seq_len - 2))
        tokens = np.concatenate([[BOS_ID], body, [EOS_ID]])
        _put(out, k, 0, inputs=tokens, segment_ids=np.ones(len(tokens)), positions=np.arange(len(tokens)))
        out["label"][k], out["weights"][k] = self.labels[r], 1.0
