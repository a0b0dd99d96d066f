"""LayerNorm and RMSNorm."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.norms import LayerNorm, RMSNorm, make_norm


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
