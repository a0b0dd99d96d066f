"""Sharded init and forward on 8 fake devices equal the one-device result, parameters are
really split the way each preset's logical rules say, and the presets serve Flax NNX too."""
import contextlib
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from model_testing import inputs_for
from transformer_jax.models import build_model, get_config
from transformer_jax.parallel.partition import check_divisible, init_sharded, logical_shardings, split_update
from transformer_jax.parallel.rules import LOGICAL_AXES, PRESETS, get_rules

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


@pytest.mark.parametrize("preset,mesh", [("fsdp", (1, 8, 1)), ("fsdp_tp", (2, 2, 2)), ("dp", (2, 4, 1))])
def test_fsdp_presets_split_every_parameter_over_fsdp(preset, mesh):
    """ZeRO-3: norm scales and the biases of projections into heads or mlp too, whose logical
    axes the rules leave whole over fsdp, on a dimension fsdp divides and never along "layers";
    a preset that replicates weights (dp, its batch over data x fsdp) leaves them whole."""
    model = build_model(get_config("gpt2-tiny", d_model=64, num_heads=8))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((8, 16), jnp.int32))["params"]
    shardings = logical_shardings(abstract, mesh_of(mesh), get_rules(preset))
    flat = jax.tree_util.tree_leaves_with_path(shardings)
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(flat) == len(leaves) > 10
    for (path, s), leaf in zip(flat, leaves):
        spec = tuple(s.spec) + (None,) * (leaf.value.ndim - len(s.spec))
        axes = [a for e in spec if e for a in ((e,) if isinstance(e, str) else e)]
        assert ("fsdp" in axes) == (preset != "dp"), (jax.tree_util.keystr(path), spec)
        if "layers" in leaf.names:
            assert spec[leaf.names.index("layers")] is None, (jax.tree_util.keystr(path), spec)
    bias = dict((jax.tree_util.keystr(p), s.spec) for p, s in flat)
    if preset == "fsdp_tp":  # the mlp bias: split over tensor by the rules, then over fsdp too
        assert bias["['decoder']['layers']['mlp']['wi']['bias']"] == P(None, ("tensor", "fsdp"))
        assert bias["['decoder']['layers']['self_attention']['query']['bias']"] == P(None, "tensor", "fsdp")


def test_indivisible_dimension_is_a_one_line_error():
    cfg = get_config("gpt2-tiny")  # 4 heads
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"^num_heads=4 is not divisible by tensor=8 \(parameter .*self_attention.*\); change the model or the mesh$"):
        init_sharded(model.init, mesh_of((1, 1, 8)), get_rules("tp"), jax.random.key(0), jnp.ones((8, 4), jnp.int32))


def test_split_update_adds_data_on_the_largest_free_dimension():
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
    spec = lambda shape, *entries: split_update(jax.sharding.NamedSharding(mesh, P(*entries)), shape).spec  # noqa: E731
    assert spec((8, 16)) == P(None, "data")  # the largest
    assert spec((8, 16), None, "tensor") == P("data", "tensor")  # one no other axis splits
    assert spec((6, 8, 4)) == P(None, "data", None)  # one data divides
    assert spec((6, 3)) == P() and spec((6, 8), None, "tensor") == P(None, "tensor")  # none: unchanged
    assert spec((8, 8), ("data", "tensor")) == P(("data", "tensor"))  # data already there
    one = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
    assert split_update(jax.sharding.NamedSharding(one, P()), (8, 8)).spec == P()  # data of size 1


def test_presets_are_data():
    assert set(PRESETS) == {"dp", "fsdp", "tp", "dp_tp", "fsdp_tp"}
    assert dict(PRESETS["fsdp_tp"])["embed"] == "fsdp" and dict(PRESETS["tp"])["mlp"] == "tensor"
    with pytest.raises(ValueError, match="unknown parallelism preset 'zero3'"):
        get_rules("zero3")
    check_divisible({"x": jnp.ones(3)}, mesh_of((8, 1, 1)), get_rules("dp"))  # unboxed leaves are fine


def test_every_preset_maps_every_logical_axis_the_models_use():
    """Flax NNX, unlike linen, passes a name without a rule through to the mesh (and fails)."""
    used = set()
    for name in ("gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"):
        cfg = get_config(name, position="t5_bias") if name == "llama-tiny" else get_config(name)
        boxed = jax.eval_shape(build_model(cfg).init, jax.random.key(0), *inputs_for(cfg, batch=2, length=8))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        used |= {n for leaf in leaves if isinstance(leaf, nn.LogicallyPartitioned) for n in leaf.names if n}
    assert {"layers", "head_dim", "kv_heads", "embed", "vocab"} <= used <= set(LOGICAL_AXES)
    for preset, rules in PRESETS.items():
        assert {n for n, _ in rules} == set(LOGICAL_AXES), preset


NNX_CFG = dict(d_model=64, num_heads=8)  # llama-tiny: GQA (2 kv heads on tensor=2), RoPE, SwiGLU, scanned layers


def _nnx_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@functools.cache
def _nnx_on_mesh():
    """(cfg, tokens, model, mesh context) for a bridged DecoderLM on a (2,2,2) mesh under fsdp_tp."""
    cfg = get_config("llama-tiny", **NNX_CFG)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 1, cfg.vocab_size)
    with _fsdp_tp():  # jitted: parameters are created sharded, never whole on one device
        lm = nnx.jit(lambda t: nnx.bridge.ToNNX(build_model(cfg), rngs=nnx.Rngs(0)).lazy_init(t))(tokens[:, :-1])
    return cfg, tokens, lm


@contextlib.contextmanager
def _fsdp_tp():
    with jax.set_mesh(mesh_of((2, 2, 2))), nn.logical_axis_rules(get_rules("fsdp_tp")):
        yield


def test_nnx_bridge_on_a_mesh_equals_linen():
    """`nnx.bridge.ToNNX` + `lazy_init` on a (2,2,2) mesh under fsdp_tp: parameters split as the
    rules say, and the logits equal the linen model's on one device with the same parameters."""
    cfg, tokens, lm = _nnx_on_mesh()
    q = lm.decoder["layers"]["self_attention"]["query"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.get_value().sharding.spec == P(None, "fsdp", "tensor")
    assert len(q.get_value().addressable_shards) == 8 and q.get_value().addressable_shards[0].data.shape == (2, 32, 4, 8)
    with _fsdp_tp():
        logits = nnx.jit(lambda m, t: m(t))(lm, tokens[:, :-1])
    params = jax.device_get(nnx.to_pure_dict(nnx.state(lm, nnx.Param)))  # the linen params tree, on the host
    want = jax.jit(build_model(cfg).apply)({"params": params}, tokens[:, :-1])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_nnx_bridge_on_a_mesh_has_linen_gradients():
    cfg, tokens, lm = _nnx_on_mesh()
    model = build_model(cfg)
    with _fsdp_tp():
        got_loss, got_grads = nnx.jit(nnx.value_and_grad(lambda m, t: _nnx_loss(m(t[:, :-1]), t)))(lm, tokens)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(lm, nnx.Param)))
    want_loss, want_grads = jax.jit(jax.value_and_grad(
        lambda p: _nnx_loss(model.apply({"params": p}, tokens[:, :-1]), tokens)))(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(nnx.to_pure_dict(got_grads)), want_grads, rtol=1e-4, atol=1e-6)


def test_logical_shards_counts_mesh_axes_and_optionally_only_automatic_ones():
    """Off a mesh 1; on data=2 x fsdp=4, "batch" is split 8 ways, and inside a shard_map manual
    over data only fsdp's 4 are left to the partitioner."""
    from transformer_jax.parallel import MeshConfig, make_mesh
    from transformer_jax.parallel.partition import logical_shards
    assert logical_shards("batch") == 1
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1, preset="fsdp"))
    seen = {}

    def inner(x):
        seen["manual"] = (logical_shards("batch"), logical_shards("batch", manual=False))
        return x
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("fsdp")):
        assert (logical_shards("batch"), logical_shards("batch", manual=False), logical_shards("embed")) == (8, 8, 4)
        jax.jit(jax.shard_map(inner, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}))(jnp.zeros(8))
    assert seen["manual"] == (8, 4)
