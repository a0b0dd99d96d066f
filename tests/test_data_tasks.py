"""Tasks on synthetic token stores: packing invariants, BERT masking and T5 span statistics."""
import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_jax.data import cache, tasks
from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, FIRST_REGULAR_ID, MASK_ID, SENTINEL_IDS

SETTINGS = settings(max_examples=15, deadline=None)


def unique_store(path, lengths):
    """Document d holds distinct ids, so every token says which document and offset it is."""
    docs, base = [], FIRST_REGULAR_ID
    for n in lengths:
        docs.append(np.arange(base, base + n))
        base += n
    return cache.write_store(str(path), docs, np.uint32), docs


def empty_batch(task, rows):
    return {k: np.zeros((rows,) + task.shapes[k], dt) for k, dt in task.keys.items()}


def fill_epoch(task, epoch=0):
    out = empty_batch(task, task.rows_per_epoch)
    for r in range(task.rows_per_epoch):
        task.fill(out, r, epoch, r)
    return out


def segments(row_seg):
    for s in np.unique(row_seg[row_seg > 0]):
        yield s, np.flatnonzero(row_seg == s)


@given(n=st.integers(0, 6), a=st.integers(0, 8), b=st.integers(0, 8), bos=st.booleans(), eos=st.booleans())
@SETTINGS
def test_seq_slice_matches_the_full_sequence(tmp_path_factory, n, a, b, bos, eos):
    store, docs = unique_store(tmp_path_factory.mktemp("s"), [n])
    full = ([BOS_ID] if bos else []) + docs[0].tolist() + ([EOS_ID] if eos else [])
    a, b = min(a, len(full)), min(max(a, b), len(full))
    assert tasks.seq_slice(store, 0, a, b, bos, eos).tolist() == full[a:b]


@given(units=st.lists(st.integers(1, 40), min_size=1, max_size=30), row_len=st.integers(1, 50),
       shuffle=st.booleans(), epoch=st.integers(0, 3))
@SETTINGS
def test_stream_layout_covers_every_unit_once(units, row_len, shuffle, epoch):
    layout = tasks.StreamLayout(np.array(units), row_len, seed=3, shuffle=shuffle)
    seen = collections.defaultdict(list)
    for r in range(layout.rows_per_epoch):
        pieces = layout.pieces(epoch, r)
        size = sum(b - a for _, a, b in pieces)
        assert size == row_len or r == layout.rows_per_epoch - 1  # rows are full but the last
        for d, a, b in pieces:
            seen[d].append((a, b))
    for d, n in enumerate(units):
        ranges = sorted(seen[d])
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))


def test_lm_packing_invariants(tmp_path):
    lengths = np.random.default_rng(0).integers(0, 300, 60)
    store, docs = unique_store(tmp_path, lengths)
    task = tasks.LMTask(store, seq_len=128, seed=0, shuffle=True)
    out = fill_epoch(task)
    where = {int(t): d for d, doc in enumerate(docs) for t in doc}
    assert np.array_equal(out["weights"], (out["segment_ids"] > 0).astype(np.float32))
    for k in range(task.rows_per_epoch):
        ids = out["segment_ids"][k]
        real = np.flatnonzero(ids > 0)
        assert np.array_equal(real, np.arange(len(real)))  # padding only at the end
        assert np.all(np.diff(ids[real]) >= 0) and (len(real) == 0 or ids[0] == 1)
        for _, idx in segments(ids):
            inp, tgt = out["inputs"][k, idx], out["targets"][k, idx]
            assert np.array_equal(out["positions"][k, idx], np.arange(len(idx)))
            assert np.array_equal(inp[1:], tgt[:-1])  # next token, same document
            regular = [where[int(t)] for t in np.concatenate([inp, tgt]) if t >= FIRST_REGULAR_ID]
            assert len(set(regular)) <= 1  # one document per segment
            for x, y in zip(inp, tgt):
                if x >= FIRST_REGULAR_ID and y >= FIRST_REGULAR_ID:
                    assert y == x + 1
    # Nothing lost or duplicated: every document token is a target once, plus one eos each.
    targets = out["targets"][out["weights"] > 0]
    expected = np.concatenate(docs + [np.full(len(docs), EOS_ID)])
    assert np.array_equal(np.sort(targets), np.sort(expected))
    inputs = out["inputs"][out["weights"] > 0]
    assert np.array_equal(np.sort(inputs), np.sort(np.concatenate(docs + [np.full(len(docs), BOS_ID)])))


def test_lm_epochs_reorder_documents(tmp_path):
    store, _ = unique_store(tmp_path, [50] * 40)
    task = tasks.LMTask(store, seq_len=64, seed=0, shuffle=True)
    e0, e1 = fill_epoch(task, 0), fill_epoch(task, 1)
    assert not np.array_equal(e0["inputs"], e1["inputs"])
    assert np.array_equal(np.sort(e0["targets"].ravel()), np.sort(e1["targets"].ravel()))


def test_mlm_statistics(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(FIRST_REGULAR_ID, 2000, n) for n in rng.integers(50, 400, 200)]
    store = cache.write_store(str(tmp_path), docs)
    task = tasks.MLMTask(store, seq_len=256, seed=0, shuffle=True, rate=0.15, low=FIRST_REGULAR_ID, high=2000)
    out = fill_epoch(task)
    real = out["segment_ids"] > 0
    special = np.isin(out["targets"], [BOS_ID, EOS_ID])
    sel = out["weights"] > 0
    assert not np.any(sel & (~real | special))  # only regular tokens are ever selected
    assert np.array_equal(out["inputs"][~sel], out["targets"][~sel])
    for k in range(task.rows_per_epoch):  # exactly round(15%) of each row's candidates
        assert sel[k].sum() == max(1, round(0.15 * (real[k] & ~special[k]).sum()))
    inp, tgt = out["inputs"][sel], out["targets"][sel]
    masked, kept = np.mean(inp == MASK_ID), np.mean(inp == tgt)
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(1 - masked - kept - 0.1) < 0.015
    assert np.all((inp == MASK_ID) | ((inp >= FIRST_REGULAR_ID) & (inp < 2000)))


def test_t5_lengths():
    assert tasks.span_lengths(512, 0.15, 3.0) == (568, 114)  # T5's published numbers
    assert tasks.span_lengths(114, 0.15, 3.0)[0] == 126


def test_noise_mask_statistics():
    rng = np.random.default_rng(0)
    masks = [tasks.noise_mask(568, 0.15, 3.0, rng) for _ in range(300)]
    assert all(m.sum() == 85 and not m[0] for m in masks)
    runs = [len(r) for m in masks for r in np.split(m, np.flatnonzero(np.diff(m)) + 1) if r[0]]
    assert abs(np.mean(runs) - 3.0) < 0.1 and len(runs) == 300 * 28
    assert not tasks.noise_mask(1, 0.15, 3.0, rng).any()


def test_span_corruption_is_invertible():
    rng = np.random.default_rng(1)
    tokens = rng.integers(FIRST_REGULAR_ID, 5000, 300).astype(np.int32)
    mask = tasks.noise_mask(len(tokens), 0.15, 3.0, rng)
    inputs, targets = tasks.span_corrupt(tokens, mask, SENTINEL_IDS)
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    spans = [t for t in targets if t in SENTINEL_IDS]
    assert spans == list(SENTINEL_IDS[:len(spans)])
    fill = {}
    for t in targets[:-1]:
        if t in SENTINEL_IDS:
            key = t
            fill[key] = []
        else:
            fill[key].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (fill[t] if t in SENTINEL_IDS else [t])]
    assert rebuilt == tokens.tolist()


def test_span_task_rows(tmp_path):
    store, docs = unique_store(tmp_path, np.random.default_rng(0).integers(1, 500, 40))
    task = tasks.SpanTask(store, seq_len=128, seed=0, shuffle=True, density=0.15, mean=3.0, sentinels=SENTINEL_IDS)
    out = fill_epoch(task)
    full = out["input_segment_ids"].sum(1) == 128
    assert full.sum() == task.rows_per_epoch - 1  # every chunk but the last fills the inputs exactly
    assert np.array_equal(out["decoder_inputs"][:, 0], np.full(task.rows_per_epoch, BOS_ID))
    tseg = out["target_segment_ids"] > 0
    assert np.array_equal(out["decoder_inputs"][:, 1:][tseg[:, 1:]], out["targets"][:, :-1][tseg[:, 1:]])
    assert np.array_equal(out["weights"], tseg.astype(np.float32))
    kept = out["inputs"][(out["inputs"] >= FIRST_REGULAR_ID)]
    noise = out["targets"][(out["targets"] >= FIRST_REGULAR_ID)]
    assert np.array_equal(np.sort(np.concatenate([kept, noise])), np.sort(np.concatenate(docs)))


def test_seq2seq_packing(tmp_path):
    rng = np.random.default_rng(0)
    src, src_docs = unique_store(tmp_path / "src", rng.integers(1, 60, 80))
    tgt, tgt_docs = unique_store(tmp_path / "tgt", rng.integers(1, 20, 80))
    task = tasks.Seq2SeqTask(src, tgt, seq_len=64, target_len=16, seed=0, shuffle=True)
    out = fill_epoch(task)
    seen = []
    for k in range(task.rows_per_epoch):
        for s, idx in segments(out["input_segment_ids"][k]):
            inp = out["inputs"][k, idx]
            tidx = np.flatnonzero(out["target_segment_ids"][k] == s)
            t, dec = out["targets"][k, tidx], out["decoder_inputs"][k, tidx]
            assert inp[-1] == EOS_ID and t[-1] == EOS_ID and dec[0] == BOS_ID and np.array_equal(dec[1:], t[:-1])
            assert np.array_equal(out["input_positions"][k, idx], np.arange(len(idx)))
            i = next(i for i, d in enumerate(src_docs) if len(d) and d[0] == inp[0])
            assert np.array_equal(inp[:-1], src_docs[i][:63]) and np.array_equal(t[:-1], tgt_docs[i][:15])
            seen.append(i)
    assert sorted(seen) == list(range(80))  # every pair once per epoch


def test_classify_rows(tmp_path):
    store, docs = unique_store(tmp_path, [3, 100, 0])
    task = tasks.ClassifyTask(store, np.array([2, 0, 1], np.int32), seq_len=10)
    out = fill_epoch(task)
    assert out["inputs"][0, :5].tolist() == [BOS_ID, *docs[0], EOS_ID]
    assert out["inputs"][1].tolist() == [BOS_ID, *docs[1][:8], EOS_ID]  # truncated, eos kept
    assert out["inputs"][2, :2].tolist() == [BOS_ID, EOS_ID] and out["segment_ids"][2].sum() == 2
    assert out["label"].tolist() == [2, 0, 1] and out["weights"].tolist() == [1, 1, 1]


def test_span_rejects_more_spans_than_sentinels(tmp_path):
    store, _ = unique_store(tmp_path, [10])
    with pytest.raises(ValueError, match="sentinels"):
        tasks.SpanTask(store, seq_len=4096, seed=0, shuffle=False, density=0.15, mean=3.0, sentinels=SENTINEL_IDS)
