"""Feed-forward network: plain and gated activations."""
import chex
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized

from transformer_jax.layers.mlp import ACTIVATIONS, MLP


class MLPTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("relu", "gelu", "gelu_tanh", "swiglu", "geglu")
    def test_shapes_and_params(self, activation):
        x = jax.random.normal(jax.random.key(0), (2, 5, 16))
        m = MLP(d_ff=32, activation=activation, use_bias=True)
        v = m.init(jax.random.key(1), x)
        y = self.variant(m.apply)(v, x)
        chex.assert_shape(y, (2, 5, 16))
        names = set(v["params"])
        assert names == ({"wi_0", "wi_1", "wo"} if activation in ("swiglu", "geglu") else {"wi", "wo"})


def test_swiglu_is_silu_gate_times_linear():
    x = jax.random.normal(jax.random.key(0), (1, 3, 8))
    m = MLP(d_ff=16, activation="swiglu")
    v = m.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: a, v["params"])
    unbox = lambda d: d["kernel"].value  # noqa: E731
    h = jax.nn.silu(x @ unbox(p["wi_0"])) * (x @ unbox(p["wi_1"]))
    chex.assert_trees_all_close(m.apply(v, x), h @ unbox(p["wo"]), atol=1e-5)


def test_dropout_active_only_when_not_deterministic():
    x = jnp.ones((2, 4, 8))
    m = MLP(d_ff=64, activation="relu", dropout_rate=0.5, deterministic=False)
    v = m.init(jax.random.key(1), x)
    a = m.apply(v, x, rngs={"dropout": jax.random.key(2)})
    b = m.apply(v, x, rngs={"dropout": jax.random.key(3)})
    assert not jnp.allclose(a, b)
    det = MLP(d_ff=64, activation="relu", dropout_rate=0.5, deterministic=True)
    chex.assert_trees_all_close(det.apply(v, x), det.apply(v, x))


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation='tanh' is unknown"):
        MLP(d_ff=4, activation="tanh").init(jax.random.key(0), jnp.ones((1, 1, 4)))
    assert set(ACTIVATIONS) == {"relu", "gelu", "gelu_tanh", "swiglu", "geglu"}
