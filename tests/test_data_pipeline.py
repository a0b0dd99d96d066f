"""The grain pipeline: hosts, resumption, workers, epochs, global arrays and the batch contract."""
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from transformer_jax.config import ConfigError
from transformer_jax.data import DataConfig, bpb, make_global_batch, make_iterator
from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "lambda", "yield", "with", "\n", "    ", "é", "🎉"]
    for i in range(40):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words, int(rng.integers(5, 400)))))
    return DataConfig(source=f"text_files:{root}", tokenizer="byte", data_dir=str(tmp_path_factory.mktemp("data")))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("task", ["lm", "mlm", "span"])
def test_two_hosts_together_make_the_single_host_batch(cfg, task):
    kw = dict(task=task, seq_len=64, global_batch_size=8, seed=3)
    single = take(make_iterator(cfg, TOK, process_index=0, process_count=1, **kw), 6)
    hosts = [take(make_iterator(cfg, TOK, process_index=p, process_count=2, **kw), 6) for p in (0, 1)]
    joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*hosts)]
    assert hosts[0][0]["inputs"].shape[0] == 4
    assert_batches_equal(joined, single)
    assert not np.array_equal(hosts[0][0]["inputs"], hosts[1][0]["inputs"])


@pytest.mark.parametrize("task", ["lm", "mlm", "span"])
def test_restored_state_reproduces_the_next_10_batches(cfg, task):
    kw = dict(task=task, seq_len=64, global_batch_size=4, process_index=0, process_count=1)
    it = make_iterator(cfg, TOK, **kw)
    take(it, 7)
    state = it.get_state()
    assert isinstance(state, bytes) and json.loads(state)["rows"] == 28
    expected = take(it, 10)
    fresh = make_iterator(cfg, TOK, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 10), expected)


def test_resume_on_a_different_number_of_hosts(cfg):
    kw = dict(seq_len=64, global_batch_size=8)
    it = make_iterator(cfg, TOK, process_index=0, process_count=1, **kw)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    parts = []
    for p in (0, 1):
        host = make_iterator(cfg, TOK, process_index=p, process_count=2, **kw)
        host.set_state(state)
        parts.append(take(host, 4))
    assert_batches_equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], expected)


def test_state_from_other_data_is_refused(cfg):
    kw = dict(seq_len=64, global_batch_size=4, process_index=0, process_count=1)
    state = make_iterator(cfg, TOK, seed=1, **kw).get_state()
    with pytest.raises(ValueError, match="saved for different data"):
        make_iterator(cfg, TOK, seed=2, **kw).set_state(state)
    it = make_iterator(cfg, TOK, seed=1, **kw)
    take(it, 1)
    with pytest.raises(ValueError, match="not a multiple of global_batch_size=8"):
        make_iterator(cfg, TOK, seed=1, **{**kw, "global_batch_size": 8}).set_state(it.get_state())


def test_one_epoch_predicts_every_byte_once_and_stops(cfg):
    it = make_iterator(cfg, TOK, split="validation", seq_len=32, global_batch_size=4, num_epochs=1,
                       process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == it.num_batches
    text = bpb.eval_text(cfg)
    weights = sum(b["weights"].sum() for b in batches)
    assert weights == text.num_bytes + len(text.documents)  # every byte, plus one eos per document
    got = np.sort(np.concatenate([b["targets"][b["weights"] > 0] for b in batches]))
    want = np.sort(np.concatenate([TOK.encode_np(d) for d in text.documents] + [[EOS_ID] * len(text.documents)]))
    np.testing.assert_array_equal(got, want)


def test_two_grain_workers_give_the_same_batches(cfg):
    kw = dict(seq_len=64, global_batch_size=4, process_index=0, process_count=1, task="mlm")
    expected = take(make_iterator(cfg, TOK, worker_count=0, **kw), 8)
    it = make_iterator(cfg, TOK, worker_count=2, **kw)
    got = take(it, 5)
    state = it.get_state()
    it.close()
    resumed = make_iterator(cfg, TOK, worker_count=2, **kw)
    resumed.set_state(state)
    got += take(resumed, 3)
    resumed.close()
    assert_batches_equal(got, expected)


def test_make_global_batch_on_8_devices(cfg):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = next(make_iterator(cfg, TOK, seq_len=64, global_batch_size=8))
    arrays = make_global_batch(batch, NamedSharding(mesh, P("data", None)))
    for k, x in arrays.items():
        assert x.shape == batch[k].shape and x.dtype == batch[k].dtype
        assert x.sharding.spec == P("data", None) and len(x.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(x), batch[k])
    label = make_global_batch({"label": np.arange(8, dtype=np.int32)}, NamedSharding(mesh, P("data", None)))
    assert label["label"].sharding.spec == P("data")  # the spec is cut to the array's rank


def test_batch_contract_lm(cfg):
    it = make_iterator(cfg, TOK, seq_len=64, global_batch_size=4, process_index=0, process_count=1)
    b = next(it)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"), "segment_ids": ((4, 64), "int32"),
        "positions": ((4, 64), "int32"), "weights": ((4, 64), "float32")}
    assert {k: s for k, (s, _) in it.element_spec.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(seq_len=1, global_batch_size=4), "seq_len=1 must be >= 2"),
    (dict(seq_len=8, global_batch_size=3, process_count=2, process_index=0), "multiple of the process count 2"),
    (dict(seq_len=8, global_batch_size=4, process_count=2, process_index=2), "process_index=2"),
    (dict(seq_len=8, global_batch_size=4, num_epochs=0), "num_epochs=0"),
    (dict(seq_len=8, global_batch_size=4, split="test"), "split 'test' is not in"),
    (dict(seq_len=8, global_batch_size=4, task="classify"), "task='classify' does not fit"),
])
def test_bad_arguments_are_one_line(cfg, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        make_iterator(cfg, TOK, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_seq2seq_and_classify_from_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        cfg = DataConfig(source="tfds:wmt14_translate/de-en", task="seq2seq", input_field="de", target_field="en",
                         tokenizer="byte", data_dir=str(tmp_path))
        b = next(make_iterator(cfg, TOK, seq_len=64, target_seq_len=32, global_batch_size=2))
        assert b["inputs"].shape == (2, 64) and b["targets"].shape == (2, 32) and b["weights"].dtype == np.float32
        starts = (b["target_positions"] == 0) & (b["target_segment_ids"] > 0)
        assert np.all(b["decoder_inputs"][starts] == BOS_ID) and starts.sum() >= 2
        assert set(b) == {"inputs", "input_segment_ids", "input_positions", "decoder_inputs", "targets",
                          "target_segment_ids", "target_positions", "weights"}
        cfg = DataConfig(source="tfds:glue/sst2", task="classify", text_field="sentence", tokenizer="byte",
                         data_dir=str(tmp_path))
        it = make_iterator(cfg, TOK, seq_len=16, global_batch_size=8, split="validation", num_epochs=1)
        batches = list(it)
        assert len(batches) == 5 and all(b["label"].shape == (8,) and b["inputs"][0, 0] == BOS_ID for b in batches)
        assert sum(b["weights"].sum() for b in batches) == 40 and set(batches[0]) == {
            "inputs", "segment_ids", "positions", "label", "weights"}


def test_embedded_corpus_bytes_end_to_end(tmp_path):
    cfg = DataConfig(tokenizer="byte", data_dir=str(tmp_path))
    b = next(make_iterator(cfg, seq_len=256, global_batch_size=2, process_index=0, process_count=1))
    seg = b["segment_ids"][0] == b["segment_ids"][0, 0]
    assert "\n" in TOK.decode(b["inputs"][0][seg])


@pytest.mark.slow
def test_default_config_end_to_end(tmp_path):
    """The default experiment's data: stdlib, bpe 8192 trained here, lm at 512 (about 20 s)."""
    cfg = DataConfig(data_dir=str(tmp_path))
    it = make_iterator(cfg, seq_len=512, global_batch_size=8, process_index=0, process_count=1)
    b = next(it)
    assert b["inputs"].shape == (8, 512) and b["weights"].sum() == 8 * 512  # packed rows are full
    assert b["inputs"].max() < 8192 and np.all(b["inputs"][b["positions"] == 0] != 0)


_HOST = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from transformer_jax.data import DataConfig, make_global_batch, make_iterator
cfg = DataConfig.from_json(sys.argv[3])
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
it = make_iterator(cfg, seq_len=64, global_batch_size=8)  # process index and count from jax
row_sums = jax.jit(lambda x: x.sum(axis=1), out_shardings=NamedSharding(mesh, P()))
for _ in range(3):
    batch = make_global_batch(next(it), NamedSharding(mesh, P("data", None)))
    print("ROW_SUMS", json.dumps(np.asarray(row_sums(batch["inputs"])).tolist()), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_build_one_global_batch(cfg):
    """Two real JAX processes (4 CPU devices each) each load their half; the global array
    they form together holds exactly the single-host batch."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _HOST, str(port), str(i), cfg.to_json()], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    single = take(make_iterator(cfg, TOK, seq_len=64, global_batch_size=8, process_index=0, process_count=1), 3)
    want = [b["inputs"].sum(axis=1).tolist() for b in single]
    for out, _ in outs:
        got = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("ROW_SUMS ")]
        assert got == want
