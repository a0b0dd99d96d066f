"""LayerNorm and RMSNorm: the definitions, and a custom VJP with autodiff's gradients that keeps only x and its row statistics."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.norms import LayerNorm, RMSNorm, make_norm, normalize


class NormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_layernorm_matches_definition(self):
        x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3 + 1
        m = LayerNorm(eps=1e-6)
        v = m.init(jax.random.key(1), x)
        y = self.variant(m.apply)(v, x)
        chex.assert_shape(y, x.shape)
        ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        chex.assert_trees_all_close(y, ref, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rmsnorm_matches_definition(self):
        x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3 + 1
        m = RMSNorm(eps=1e-6)
        v = m.init(jax.random.key(1), x)
        y = self.variant(m.apply)(v, x)
        ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
        chex.assert_trees_all_close(y, ref, atol=1e-5)


def test_bf16_output_dtype_and_f32_params():
    x = jnp.ones((2, 3, 8), jnp.bfloat16)
    m = RMSNorm(dtype=jnp.bfloat16)
    v = m.init(jax.random.key(0), x)
    assert m.apply(v, x).dtype == jnp.bfloat16
    assert jax.tree.leaves(v)[0].dtype == jnp.float32


def test_unknown_norm():
    with pytest.raises(ValueError, match="norm='batch' is unknown"):
        make_norm("batch", 1e-6, True, jnp.float32, jnp.float32)


def _reference(x, scale, bias, center):
    """The norm as plain float32 arithmetic, differentiated by autodiff."""
    x = x.astype(jnp.float32)
    xc = x - x.mean(-1, keepdims=True) if center else x
    y = xc * jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + 1e-6) * scale
    return y if bias is None else y + bias


@pytest.mark.parametrize("center, with_bias", [(True, True), (True, False), (False, False)])
def test_gradients_match_autodiff(center, with_bias):
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 7, 32)) * 3 + 1
    scale = 1 + 0.1 * jax.random.normal(k[1], (32,))
    bias = jax.random.normal(k[2], (32,)) if with_bias else None
    g = jax.random.normal(k[3], (3, 7, 32))
    ours = jax.grad(lambda *a: jnp.sum(normalize(*a, 1e-6, center, jnp.float32) * g), (0, 1, 2))(x, scale, bias)
    ref = jax.grad(lambda *a: jnp.sum(_reference(*a, center) * g), (0, 1, 2))(x, scale, bias)
    chex.assert_trees_all_close(ours, ref, atol=2e-5, rtol=1e-5)
    # bf16 input and output: the gradient is the f32 one rounded once
    xb = x.astype(jnp.bfloat16)
    dx = jax.grad(lambda x: jnp.sum(normalize(x, scale, bias, 1e-6, center, jnp.bfloat16).astype(jnp.float32) * g))(xb)
    exact = jax.grad(lambda x: jnp.sum(_reference(x, scale, bias, center) * g))(xb.astype(jnp.float32))
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(dx.astype(jnp.float32), exact, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("center", [True, False])
def test_backward_keeps_the_input_and_row_statistics(center):
    """Autodiff of the float32 norm keeps three float32 tensors the size of x; ours keeps x in
    its own width plus one or two [..., 1] statistics (and the parameters)."""
    x, scale = jnp.ones((4, 6, 16), jnp.bfloat16), jnp.ones((16,))
    kept = lambda f: [(a.shape, a.dtype) for a in jax.tree.leaves(jax.vjp(f, x)[1])]  # noqa: E731
    ours = kept(lambda x: normalize(x, scale, None, 1e-6, center, jnp.bfloat16))
    assert [r for r in ours if r[0] == x.shape] == [(x.shape, jnp.uint16)], ours  # x's bits: layers/residuals.py
    assert len([r for r in ours if r[0] == (4, 6, 1)]) == (2 if center else 1), ours
    autodiff = kept(lambda x: _reference(x, scale, None, center).astype(jnp.bfloat16))
    assert len([r for r in autodiff if r[0] == x.shape and r[1] == jnp.float32]) >= 2, autodiff
