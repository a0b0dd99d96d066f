"""Sharded init and forward on 8 fake devices equal the one-device result, and parameters
are really split the way each preset's logical rules say."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from model_testing import inputs_for
from transformer_jax.models import build_model, get_config
from transformer_jax.parallel.partition import check_divisible, init_sharded
from transformer_jax.parallel.rules import PRESETS, get_rules

MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (1, 1, 8), "dp_tp": (2, 1, 4), "fsdp_tp": (2, 2, 2)}
# Small models whose heads, kv heads, mlp and vocab divide 8.
MODELS = {
    "gpt2-tiny": dict(d_model=64, num_heads=8),
    "llama-tiny": dict(d_model=64, num_heads=8, num_kv_heads=8),
    "bert-tiny": dict(d_model=64, num_heads=8),
    "t5-tiny": dict(d_model=64, num_heads=8),
}


def mesh_of(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


# gpt2/bert/t5 are covered more strongly by tests/test_step.py (train steps on every preset);
# llama (GQA, RoPE, SwiGLU) is not, so it stays in the default run.
@pytest.mark.parametrize("name", [n if n == "llama-tiny" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_sharded_forward_equals_one_device(name):
    cfg = get_config(name, **MODELS[name])
    model = build_model(cfg)
    args = inputs_for(cfg, batch=8, length=16)
    ref_vars = model.init(jax.random.key(0), *args)
    ref = model.apply(ref_vars, *args)
    for preset in ("dp", "fsdp", "tp", "dp_tp"):
        mesh, rules = mesh_of(MESHES[preset]), get_rules(preset)
        v = init_sharded(model.init, mesh, rules, jax.random.key(0), *args)
        for a, b in zip(jax.tree.leaves(nn.unbox(ref_vars)), jax.tree.leaves(nn.unbox(v))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"{name} {preset} init")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            out = jax.jit(model.apply)(v, *args)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5, err_msg=f"{name} {preset} forward")


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


@pytest.mark.parametrize("preset", list(MESHES))
def test_parameters_are_split_as_the_rules_say(preset):
    cfg = get_config("gpt2-tiny", d_model=64, num_heads=8)
    model = build_model(cfg)
    mesh, rules = mesh_of(MESHES[preset]), get_rules(preset)
    v = init_sharded(model.init, mesh, rules, jax.random.key(0), jnp.ones((8, 16), jnp.int32))["params"]
    fsdp = MESHES[preset][1] if "fsdp" in preset else 1
    tensor = MESHES[preset][2] if "tp" in preset else 1
    q = v["decoder"]["layers"]["self_attention"]["query"]["kernel"].value  # [layers, embed, heads, head_dim]
    assert q.shape == (2, 64, 8, 8)
    assert _shard_shape(q) == (2, 64 // fsdp, 8 // tensor, 8)
    wo = v["decoder"]["layers"]["mlp"]["wo"]["kernel"].value  # [layers, mlp, embed]
    assert _shard_shape(wo) == (2, 64 // tensor, 64 // fsdp)
    emb = v["embedder"]["token"]["embedding"].value  # [vocab, embed]
    assert _shard_shape(emb) == (256 // tensor, 64 // fsdp)
    # Every device holds a distinct piece (or a replica) and the pieces rebuild the whole.
    assert len(q.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(q), np.asarray(jax.device_get(q)))


def test_indivisible_dimension_is_a_one_line_error():
    cfg = get_config("gpt2-tiny")  # 4 heads
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"^num_heads=4 is not divisible by tensor=8 \(parameter .*self_attention.*\); change the model or the mesh$"):
        init_sharded(model.init, mesh_of((1, 1, 8)), get_rules("tp"), jax.random.key(0), jnp.ones((8, 4), jnp.int32))


def test_presets_are_data():
    assert set(PRESETS) == {"dp", "fsdp", "tp", "dp_tp", "fsdp_tp"}
    assert dict(PRESETS["fsdp_tp"])["embed"] == "fsdp" and dict(PRESETS["tp"])["mlp"] == "tensor"
    with pytest.raises(ValueError, match="unknown parallelism preset 'zero3'"):
        get_rules("zero3")
    check_divisible({"x": jnp.ones(3)}, mesh_of((8, 1, 1)), get_rules("dp"))  # unboxed leaves are fine
