"""Encoder/decoder layers and the layer stack: scan equals unrolled, remat keeps gradients."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized

from model_testing import stack_unrolled
from transformer_jax.layers.blocks import DecoderLayer, EncoderLayer, LayerStack
from transformer_jax.models import get_config


class LayerShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("pre", "post")
    def test_layer_shapes(self, norm_position):
        cfg = get_config("gpt2-tiny", norm_position=norm_position)
        x, enc = jnp.ones((2, 5, 32)), jnp.ones((2, 7, 32))
        for layer, args in [(EncoderLayer(cfg), (x,)), (DecoderLayer(cfg), (x,)),
                            (DecoderLayer(cfg, cross_attention=True), (x, None, None, None, enc))]:
            v = layer.init(jax.random.key(0), *args)
            y, none = self.variant(layer.apply)(v, *args)
            chex.assert_shape(y, (2, 5, 32))
            assert none is None
        assert {"cross_attention", "cross_attention_norm"} <= set(v["params"])


def _stack_loss(cfg, params, x):
    stack = LayerStack(cfg, DecoderLayer, 3)
    return jnp.sum(stack.apply({"params": params}, x, deterministic=True) ** 2)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_scan_equals_unrolled(name):
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    unrolled = get_config(name, scan_layers=False)
    scanned = get_config(name, scan_layers=True)
    p_unrolled = nn.unbox(LayerStack(unrolled, DecoderLayer, 3).init(jax.random.key(1), x)["params"])
    p_scanned = stack_unrolled(p_unrolled)
    assert jax.tree.structure(p_scanned) == jax.tree.structure(
        nn.unbox(LayerStack(scanned, DecoderLayer, 3).init(jax.random.key(1), x)["params"]))
    l_u, g_u = jax.value_and_grad(lambda p: _stack_loss(unrolled, p, x))(p_unrolled)
    l_s, g_s = jax.value_and_grad(lambda p: _stack_loss(scanned, p, x))(p_scanned)
    chex.assert_trees_all_close(l_u, l_s, rtol=1e-5)
    chex.assert_trees_all_close(stack_unrolled(g_u), g_s, rtol=1e-4, atol=5e-5)


def test_scanned_params_carry_the_layers_axis():
    cfg = get_config("gpt2-tiny", scan_layers=True)
    v = LayerStack(cfg, DecoderLayer, 3).init(jax.random.key(1), jnp.ones((1, 4, 32)))
    kernel = v["params"]["layers"]["self_attention"]["query"]["kernel"]
    assert kernel.names == ("layers", "embed", "heads", "head_dim") and kernel.value.shape == (3, 32, 4, 8)


@pytest.mark.parametrize("policy, scan", [("full", True), ("dots", True), ("dots_no_batch", True), ("full", False)])
def test_remat_gives_the_same_gradients(policy, scan):
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    plain = get_config("gpt2-tiny", scan_layers=scan)
    remat = get_config("gpt2-tiny", scan_layers=scan, remat=policy)
    params = nn.unbox(LayerStack(plain, DecoderLayer, 3).init(jax.random.key(1), x)["params"])
    g_plain = jax.grad(lambda p: _stack_loss(plain, p, x))(params)
    g_remat = jax.jit(jax.grad(lambda p: _stack_loss(remat, p, x)))(params)
    chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-4, atol=5e-5)


def test_remat_recomputes_in_the_backward_pass():
    """With remat='full' the backward pass runs the forward matmuls again: more dots in the HLO."""
    x = jnp.ones((2, 6, 32))
    def n_dots(policy):
        cfg = get_config("gpt2-tiny", scan_layers=False, remat=policy)
        params = nn.unbox(LayerStack(cfg, DecoderLayer, 3).init(jax.random.key(1), x)["params"])
        hlo = jax.jit(jax.grad(lambda p: _stack_loss(cfg, p, x))).lower(params).as_text()
        return hlo.count("dot_general")
    assert n_dots("full") > n_dots("none")


def test_gather_positions_is_whole_forward_and_split_backward_on_a_tp_mesh():
    from transformer_jax.layers.blocks import gather_positions
    from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
    mesh = make_mesh(MeshConfig(tensor=8, preset="tp"))
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))

    def f(x):
        with nn.logical_axis_rules(get_rules("tp")):
            x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))  # the residual stream: split
            return jnp.sum(jnp.sin(gather_positions(x)))
    with jax.set_mesh(mesh):
        value, grad = jax.jit(jax.value_and_grad(f))(x)
        text = jax.jit(jax.grad(f)).lower(x).compile().as_text()
    chex.assert_trees_all_close((value, grad), (jnp.sum(jnp.sin(x)), jnp.cos(x)), rtol=1e-6)  # the identity
    assert "all-gather" in text  # the forward gathers the positions
    assert grad.sharding.spec[1] == "tensor"  # the gradient comes back split along length
