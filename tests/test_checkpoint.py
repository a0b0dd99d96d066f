"""Checkpoints on real orbax and tmp dirs: round trip, other meshes, retention, corruption
fallback, init_from, PreemptionGuard, kill -9 mid-save, two processes."""
import glob
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from transformer_jax.checkpoint import (MANIFEST_NAME, CheckpointConfig, CheckpointIntegrityError, Checkpointer,
                                        PreemptionGuard, init_from, verify_step_dir, write_manifest)
from transformer_jax.checkpoint import integrity
from transformer_jax.checkpoint.integrity import read_manifest
from transformer_jax.checkpoint.items import decode_data_state, encode_data_state
from transformer_jax.config import ConfigError

AUTO2 = (jax.sharding.AxisType.Auto,) * 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=AUTO2)


def make_state(mesh, seed: int, specs=None):
    """A train-state-like tree whose values are a function of `seed`."""
    specs = specs or {"enc": P("data", "fsdp"), "b": P("fsdp"), "head": P(None, "fsdp")}
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    k = jax.random.key(seed)
    params = {"encoder": {"w": put(jax.random.normal(k, (8, 16)), specs["enc"]),
                          "b": put(jnp.arange(16.0) + seed, specs["b"])},
              "head": {"w": put(jnp.full((16, 4), float(seed)), specs["head"])}}
    return {"params": params, "opt": {"mu": jax.tree.map(lambda x: x * 0.5, params)},
            "step": jnp.int32(seed), "rng": jax.random.key(seed + 1000)}


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def values(tree):
    """Comparable numpy leaves (PRNG keys as their key data)."""
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(one, tree)


def largest_array_file(step_dir: Path) -> Path:
    files = glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*"))
    return Path(max(files, key=os.path.getsize))


def save_steps(ckpt, mesh, steps):
    for s in steps:
        ckpt.save(s, make_state(mesh, s), data_state={"pos": s})
    ckpt.wait_until_finished()


# -- round trip --------------------------------------------------------------------------

def test_round_trip_with_data_state_config_tokenizer(tmp_path, mesh):
    tok = tmp_path / "tok"
    (tok / "sub").mkdir(parents=True)
    (tok / "spm.model").write_bytes(bytes(range(256)))
    (tok / "sub" / "vocab.json").write_text('{"a": 1}')
    cfg = CheckpointConfig(keep_last=5, keep_every=100)
    state = make_state(mesh, 7)
    with Checkpointer(tmp_path / "ckpt", cfg, tokenizer_dir=tok) as ckpt:
        ckpt.save(7, state, data_state=b'{"next_index": 123}', config_json=cfg.to_json(), metadata={"loss": 1.5})
        ckpt.wait_until_finished()
        assert verify_step_dir(ckpt.step_dir(7)) is None
        r = ckpt.restore(abstract_of(state))
    assert r.step == 7 and r.skipped == ()
    chex.assert_trees_all_equal(values(r.state), values(state))
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, r.state), jax.tree.map(lambda x: x.sharding, state))
    assert r.data_state == b'{"next_index": 123}'
    assert CheckpointConfig.from_json(r.config_json) == cfg
    assert r.metadata == {"loss": 1.5}
    assert (r.tokenizer_dir / "spm.model").read_bytes() == bytes(range(256))
    assert (r.tokenizer_dir / "sub" / "vocab.json").read_text() == '{"a": 1}'


def test_fresh_directory_restores_none(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore(abstract_of(make_state(mesh, 0))) is None
        assert ckpt.latest_step() is None


@settings(max_examples=20, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=32),
                 st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.none()),
                                 max_size=5)))
def test_data_state_encoding_round_trips_with_type(state):
    back = decode_data_state(encode_data_state(state))
    assert back == state and type(back) is type(state)


def test_bad_inputs_give_one_line_errors(tmp_path, mesh):
    with pytest.raises(ConfigError, match="keep_last=0"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ValueError, match="tokenizer_dir"):
        (tmp_path / "empty").mkdir()
        Checkpointer(tmp_path / "c0", tokenizer_dir=tmp_path / "empty")
    with Checkpointer(tmp_path / "c1") as ckpt:
        state = make_state(mesh, 1)
        with pytest.raises(ValueError, match="config_json must be a JSON string"):
            ckpt.save(1, state, config_json="{not json")
        with pytest.raises(ValueError, match="data_state must be"):
            ckpt.save(1, state, data_state=3.5)
        ckpt.save(1, state)
        with pytest.raises(ValueError, match="step 1 already exists"):
            ckpt.save(1, state)
        no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        with pytest.raises(ValueError, match=r"abstract_state leaf \[.*\] has no sharding; build leaves as"):
            ckpt.restore(no_sharding)
        with pytest.raises(ValueError, match="step 5 not in"):
            ckpt.restore(abstract_of(state), step=5)


# -- other meshes ------------------------------------------------------------------------

def test_restore_onto_different_mesh_and_partitioning(tmp_path, mesh):
    state = make_state(mesh, 3)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, state)
        ckpt.wait_until_finished()
    small = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=AUTO2, devices=jax.devices()[4:])
    other_specs = {"enc": P("fsdp", None), "b": P(), "head": P("data", "fsdp")}
    target = abstract_of(make_state(small, 0, other_specs))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        r = ckpt.restore(target)
    chex.assert_trees_all_equal(values(r.state), values(state))
    for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    assert r.state["params"]["encoder"]["w"].sharding.mesh.devices.size == 4


# -- retention ---------------------------------------------------------------------------

def test_keep_last_k_plus_every_n(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(keep_last=2, keep_every=4)) as ckpt:
        for s in range(1, 11):
            ckpt.save(s, {"x": jnp.full((4,), s)})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 8, 9, 10]
        assert all(verify_step_dir(ckpt.step_dir(s)) is None for s in ckpt.all_steps())


# -- integrity ---------------------------------------------------------------------------

def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,reason", [(_flip, "checksum mismatch (crc32c)"), (_truncate, "truncated")])
def test_damaged_newest_step_falls_back_to_previous(tmp_path, mesh, caplog, damage, reason):
    ckpt = Checkpointer(tmp_path / "ckpt")
    save_steps(ckpt, mesh, [100, 200, 300])
    bad = largest_array_file(ckpt.step_dir(300))
    damage(bad)
    rel = bad.relative_to(ckpt.step_dir(300)).as_posix()
    with caplog.at_level(logging.WARNING, logger="transformer_jax.checkpoint"):
        r = ckpt.restore(abstract_of(make_state(mesh, 0)))
    assert r.step == 200 and r.data_state == {"pos": 200}
    chex.assert_trees_all_equal(values(r.state), values(make_state(mesh, 200)))
    assert len(r.skipped) == 1 and r.skipped[0][0] == 300 and r.skipped[0][1].startswith(f"corrupt: {rel} {reason}")
    [line] = [rec.getMessage() for rec in caplog.records]
    assert line.startswith(f"checkpoint step 300 is corrupt: {rel} {reason}") and "falling back to step 200" in line
    assert ckpt.all_steps() == [100, 200] and (tmp_path / "ckpt" / "_quarantine" / "300").is_dir()
    # Training resumes from 200 and saves 300 again: orbax must not skip it as "not newer".
    ckpt.save(300, make_state(mesh, 301))
    ckpt.wait_until_finished()
    assert ckpt.restore(abstract_of(make_state(mesh, 0))).step == 300
    ckpt.close()


def test_each_process_hashes_its_own_files_and_the_main_manifest_vouches_for_them(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1])
        d = ckpt.step_dir(1)
    top, part = read_manifest(d), read_manifest(d, "MANIFEST.process_0.sha256.json")
    assert top["parts"] == ["MANIFEST.process_0.sha256.json"] and "MANIFEST.process_0.sha256.json" in top["files"]
    assert part["files"] and all(rel.startswith(("state/ocdbt.process_0/", "state/array_metadatas/process_0"))
                                 for rel in part["files"])
    assert not set(part["files"]) & set(top["files"])  # hashed once, by the process that wrote it
    listed = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    assert listed - set(top["files"]) - set(part["files"]) == {MANIFEST_NAME, "_CHECKPOINT_METADATA",
                                                                "commit_success.txt"}
    _flip(d / max(part["files"], key=lambda rel: part["files"][rel]["size"]))
    found = [verify_step_dir(d, share=(i, 3)) for i in range(3)]  # 3 "processes" share the hashing
    assert sum(r is not None for r in found) == 1 and "checksum mismatch (crc32c)" in "".join(r or "" for r in found)
    (d / "MANIFEST.process_0.sha256.json").write_text("{}")
    assert verify_step_dir(d).startswith("corrupt: MANIFEST.process_0.sha256.json truncated (2 of")


def test_restore_verifies_only_what_it_reads(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1, 2])
        _flip(ckpt.step_dir(2) / "data_state" / "process_0-of-1.json")
        assert ckpt.restore(abstract_of(make_state(mesh, 0)), restore_data_state=False).step == 2
        r = ckpt.restore(abstract_of(make_state(mesh, 0)))
        assert r.step == 1 and r.skipped[0][1] == "corrupt: data_state/process_0-of-1.json checksum mismatch (crc32c)"


def test_missing_manifest_counts_as_incomplete(tmp_path, mesh, caplog):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1, 2])
        (ckpt.step_dir(2) / MANIFEST_NAME).unlink()
    with Checkpointer(tmp_path / "ckpt", read_only=True) as reader:  # e.g. an eval job: moves nothing
        assert reader.restore(abstract_of(make_state(mesh, 0))).step == 1
        assert reader.all_steps() == [1, 2]
        with pytest.raises(ValueError, match="read_only"):
            reader.save(3, make_state(mesh, 3))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with caplog.at_level(logging.WARNING, logger="transformer_jax.checkpoint"):
            r = ckpt.restore(abstract_of(make_state(mesh, 0)))
        assert ckpt.all_steps() == [1]
    assert r.step == 1 and r.skipped[0][0] == 2 and r.skipped[0][1].startswith("incomplete:")
    assert "checkpoint step 2 is incomplete" in caplog.text and "moved to" in caplog.text


def test_tampered_manifest_is_detected(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1])
        m = ckpt.step_dir(1) / MANIFEST_NAME
        doc = json.loads(m.read_text())
        first = sorted(doc["body"]["files"])[0]
        doc["body"]["files"][first]["crc32c"] = "0" * 8
        m.write_text(json.dumps(doc))
        assert ckpt.verify(1) == f"corrupt: {MANIFEST_NAME} self-checksum mismatch"


def test_sha256_manifests_of_format_2_still_verify(tmp_path, mesh):
    """Checkpoints saved before CRC-32C (format 2: sha256 of every file) still restore and still catch damage."""
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1])
        d = ckpt.step_dir(1)
    for name in sorted(p.name for p in d.glob("MANIFEST*.json")):  # parts first: the top lists their bytes
        body = read_manifest(d, name)
        for rel, entry in body["files"].items():
            del entry["crc32c"]
            entry.update(sha256=hashlib.sha256((d / rel).read_bytes()).hexdigest(), size=(d / rel).stat().st_size)
        integrity._write_doc(d, name, dict(body, format=2, algorithm="sha256"))
    assert read_manifest(d)["algorithm"] == "sha256" and verify_step_dir(d) is None
    with Checkpointer(tmp_path / "ckpt", read_only=True) as reader:
        assert reader.restore(abstract_of(make_state(mesh, 0))).step == 1
    bad = largest_array_file(d)
    _flip(bad)
    assert verify_step_dir(d) == f"corrupt: {bad.relative_to(d).as_posix()} checksum mismatch (sha256)"


def test_all_steps_corrupt_raises_clear_error_or_starts_fresh(tmp_path, mesh):
    ckpt = Checkpointer(tmp_path / "ckpt")
    save_steps(ckpt, mesh, [1, 2])
    for s in (1, 2):
        _flip(largest_array_file(ckpt.step_dir(s)))
    with pytest.raises(CheckpointIntegrityError) as e:
        ckpt.restore(abstract_of(make_state(mesh, 0)))
    msg = str(e.value)
    assert "\n" not in msg and "step 2 is corrupt" in msg and "step 1 is corrupt" in msg
    assert "fresh_if_none_intact=True" in msg
    assert ckpt.all_steps() == [1, 2]  # nothing moved when raising: a rerun must not silently start fresh
    assert ckpt.restore(abstract_of(make_state(mesh, 0)), fresh_if_none_intact=True) is None
    assert ckpt.all_steps() == []
    ckpt.save(1, make_state(mesh, 11))
    ckpt.wait_until_finished()
    assert ckpt.restore(abstract_of(make_state(mesh, 0))).step == 1
    ckpt.close()


def test_explicit_corrupt_step_raises(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1, 2])
        _truncate(largest_array_file(ckpt.step_dir(1)))
        with pytest.raises(CheckpointIntegrityError, match="step 1 .* is corrupt: state/.* truncated"):
            ckpt.restore(abstract_of(make_state(mesh, 0)), step=1)
        assert ckpt.restore(abstract_of(make_state(mesh, 0)), step=2).step == 2


def test_leftover_tmp_dir_is_ignored_and_overwritten(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1])
        junk = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp" / "state"
        junk.mkdir(parents=True)
        (junk / "half_written").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.restore(abstract_of(make_state(mesh, 0))).step == 1
        ckpt.save(2, make_state(mesh, 2))
        ckpt.wait_until_finished()
        r = ckpt.restore(abstract_of(make_state(mesh, 0)))
    assert r.step == 2 and not (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp").exists()
    chex.assert_trees_all_equal(values(r.state), values(make_state(mesh, 2)))


def test_data_state_from_other_process_count_restores_if_hosts_agree_else_clear_error(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [1])
        d = ckpt.step_dir(1) / "data_state"
        (d / "process_0-of-1.json").rename(d / "process_0-of-2.json")  # as if saved by 2 hosts...
        (d / "process_1-of-2.json").write_text((d / "process_0-of-2.json").read_text())  # ...at one position
        write_manifest(ckpt.step_dir(1))
        assert ckpt.restore(abstract_of(make_state(mesh, 0))).data_state == {"pos": 1}
        (d / "process_1-of-2.json").write_text(encode_data_state({"pos": 7}))  # hosts at different positions
        write_manifest(ckpt.step_dir(1))
        with pytest.raises(ValueError, match="different number of processes: restore with restore_data_state=False"):
            ckpt.restore(abstract_of(make_state(mesh, 0)))
        r = ckpt.restore(abstract_of(make_state(mesh, 0)), restore_data_state=False)
    assert r.step == 1 and r.data_state is None


def test_sync_save_also_writes_manifest(tmp_path, mesh):
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(5, make_state(mesh, 5), data_state="abc")
        assert verify_step_dir(ckpt.step_dir(5)) is None
        r = ckpt.restore(abstract_of(make_state(mesh, 0)))
    assert r.step == 5 and r.data_state == "abc"


# -- init_from ---------------------------------------------------------------------------

def _finetune_params(mesh, seed):
    """The new model: same encoder, a new 'cls' head, and 'head' with 2 classes instead of 4."""
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return {"encoder": {"w": put(jnp.zeros((8, 16)), P(None, "fsdp")), "b": put(jnp.zeros(16), P())},
            "head": {"w": put(jnp.full((16, 2), -1.0), P())},
            "cls": {"w": put(jnp.full((16, 3), float(seed)), P("fsdp", None))}}


def test_init_from_restores_backbone_and_reports(tmp_path, mesh):
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        save_steps(ckpt, mesh, [10, 20])
    pre = make_state(mesh, 20)["params"]
    small = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=AUTO2, devices=jax.devices()[:4])
    fresh = _finetune_params(small, 9)
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "20"):
        params, report = init_from(source, fresh)
        assert report.step_dir == tmp_path / "run" / "checkpoints" / "20"
        assert report.restored == ("encoder/b", "encoder/w")
        assert report.fresh == ("cls/w",)
        assert report.mismatched == ("head/w: checkpoint (16, 4) vs model (16, 2)",)
        assert report.unused == ()
        chex.assert_trees_all_equal(values(params["encoder"]), values(pre["encoder"]))
        assert params["encoder"]["w"].sharding == fresh["encoder"]["w"].sharding
        assert params["cls"]["w"] is fresh["cls"]["w"] and params["head"]["w"] is fresh["head"]["w"]
    # Only the backbone, from abstract leaves; the checkpoint's head is left unused.
    abstract = abstract_of({"encoder": fresh["encoder"]})
    params, report = init_from(tmp_path / "run", abstract, include=["encoder/w"])
    assert report.restored == ("encoder/w",) and report.fresh == ("encoder/b",) and report.unused == ("head/w",)
    assert isinstance(params["encoder"]["b"], jax.ShapeDtypeStruct)
    chex.assert_trees_all_equal(np.asarray(params["encoder"]["w"]), np.asarray(pre["encoder"]["w"]))
    with pytest.raises(ValueError, match="subtree='model' not in checkpoint"):
        init_from(tmp_path / "run", fresh, subtree="model")
    with pytest.raises(ValueError, match="no parameter of the new model matches"):
        init_from(tmp_path / "run", {"decoder": fresh["cls"]})


def test_init_from_verifies_integrity(tmp_path, mesh, caplog):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        save_steps(ckpt, mesh, [10, 20])
    _flip(largest_array_file(tmp_path / "ckpt" / "20"))
    with caplog.at_level(logging.WARNING, logger="transformer_jax.checkpoint"):
        params, report = init_from(tmp_path / "ckpt", _finetune_params(mesh, 0))
    assert report.step_dir.name == "10" and "step 20 is corrupt" in caplog.text
    chex.assert_trees_all_equal(values(params["encoder"]), values(make_state(mesh, 10)["params"]["encoder"]))
    assert (tmp_path / "ckpt" / "20").is_dir()  # someone else's run: reported, not moved
    with pytest.raises(CheckpointIntegrityError, match="20 is corrupt: state/"):
        init_from(tmp_path / "ckpt" / "20", _finetune_params(mesh, 0))


# -- preemption --------------------------------------------------------------------------

def test_preemption_guard_sets_flag_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.should_stop and not guard.should_stop_all(step=1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not guard.should_stop and time.time() < deadline:
            time.sleep(0.01)
        assert guard.should_stop and guard.should_stop_all(step=2) and guard.signal_name == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


def test_preemption_guard_second_ctrl_c_interrupts():
    with PreemptionGuard() as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.should_stop and guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    guard2 = PreemptionGuard(signals=(signal.SIGTERM,))
    guard2.request_stop()
    assert guard2.should_stop and guard2.signal_name is None


# -- kill -9 mid-save --------------------------------------------------------------------

_KILL_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from transformer_jax.checkpoint import Checkpointer, CheckpointConfig
    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(keep_last=100))
    base = jnp.arange(4 << 20, dtype=jnp.float32)  # 16 MB: a save takes long enough to be caught
    for step in range(1, 1000):
        ckpt.save(step, {"w": base + step, "step": jnp.int32(step)}, data_state={"pos": step})
        print(step, flush=True)
""")


def test_kill_9_mid_save_leaves_last_good_step(tmp_path):
    """Kill at several moments of a save loop; the newest restorable step is intact."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for kill_after, delay in ((2, 0.0), (4, 0.05)):
        d = tmp_path / f"k{kill_after}"
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(d)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=env, text=True)
        for line in child.stdout:
            if int(line) >= kill_after:
                break
        time.sleep(delay)
        child.kill()
        child.wait()
        ckpt = Checkpointer(d)
        abstract = {"w": jax.ShapeDtypeStruct((4 << 20,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
        r = ckpt.restore(abstract)
        assert r.step >= kill_after - 1 and r.data_state == {"pos": r.step}
        np.testing.assert_array_equal(np.asarray(r.state["w"]), np.arange(4 << 20, dtype=np.float32) + r.step)
        assert all(verify_step_dir(ckpt.step_dir(s)) is None for s in ckpt.all_steps())
        # Resume: the step the kill interrupted (a leftover tmp dir, usually) saves again.
        ckpt.save(r.step + 1, {"w": r.state["w"], "step": jnp.int32(r.step + 1)})
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == r.step + 1 and ckpt.verify(r.step + 1) is None
        ckpt.close()


# -- two processes -----------------------------------------------------------------------

_TWO_PROC_CHILD = textwrap.dedent("""
    import os, sys, json
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from transformer_jax.checkpoint import Checkpointer, PreemptionGuard
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sh = NamedSharding(mesh, P("data", "fsdp"))
    make = lambda s: jax.make_array_from_callback((8, 16), sh, lambda idx: np.arange(128.0).reshape(8, 16)[idx] + s)
    ckpt = Checkpointer(root)
    for s in (1, 2):
        ckpt.save(s, {"w": make(s)}, data_state={"host": pid, "pos": s})
    ckpt.wait_until_finished()
    if pid == 0:  # corrupt step 2 (one host does it, as a disk would)
        f = max((os.path.join(d, n) for d, _, ns in os.walk(os.path.join(root, "2", "state")) for n in ns
                 if "/d/" in os.path.join(d, n)), key=os.path.getsize)
        b = bytearray(open(f, "rb").read()); b[len(b) // 2] ^= 0xFF; open(f, "wb").write(bytes(b))
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("corrupted")
    r = ckpt.restore({"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sh)})
    local = [np.asarray(x.data) for x in r.state["w"].addressable_shards]
    want = [np.asarray(x.data) for x in make(1).addressable_shards]
    guard = PreemptionGuard()
    if pid == 1:
        guard.request_stop()
    print(json.dumps({"step": r.step, "data": r.data_state, "ok": all((a == b).all() for a, b in zip(local, want)),
                      "stop_local": guard.should_stop, "stop_all": guard.should_stop_all(step=3)}), flush=True)
    ckpt.close()
""")


def test_two_processes_save_restore_fallback_and_agree_on_stop(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROC_CHILD, str(port), str(i), str(tmp_path / "ckpt")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for pid, res in enumerate(results):
        assert res == {"step": 1, "data": {"host": pid, "pos": 1}, "ok": True, "stop_local": pid == 1, "stop_all": True}
    written = sorted(n for n in os.listdir(tmp_path / "ckpt" / "1" / "data_state") if n.endswith(".json"))
    assert written == ["process_0-of-2.json", "process_1-of-2.json"]
    assert (tmp_path / "ckpt" / "_quarantine" / "2").is_dir()
    step1 = tmp_path / "ckpt" / "1"  # each process hashed the array files it wrote
    assert read_manifest(step1)["parts"] == [f"MANIFEST.process_{i}.sha256.json" for i in (0, 1)]
    for i in (0, 1):
        files = read_manifest(step1, f"MANIFEST.process_{i}.sha256.json")["files"]
        assert files and all(f"ocdbt.process_{i}/" in rel or rel.endswith(f"array_metadatas/process_{i}")
                             for rel in files)
