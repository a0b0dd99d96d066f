"""MLP activations with a custom VJP: jax.nn's values, the same gradients, and only the
input kept for the backward pass (so a train step holds fewer activation-sized buffers)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testing import compiled_lm_step
from transformer_jax.layers import activations
from transformer_jax.layers.mlp import MLP
from transformer_jax.models import get_config

REFERENCE = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
X = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)


def saved(f, *args):
    """(shape, dtype) of each array the backward pass of f keeps: the leaves of jax.vjp's function."""
    return [(a.shape, a.dtype) for a in jax.tree.leaves(jax.vjp(f, *args)[1])]


def _grad(f, x):
    return jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_values_are_jax_nn_and_gradients_match_autodiff(name):
    act, ref = getattr(activations, name), REFERENCE[name]
    np.testing.assert_array_equal(act(X), ref(X))
    np.testing.assert_allclose(_grad(act, X), _grad(ref, X), rtol=0, atol=2e-6)
    xb = X.astype(jnp.bfloat16)
    np.testing.assert_array_equal(act(xb), ref(xb))
    # bf16: the derivative is computed in f32, so it is as close to the f32 one as rounding allows
    exact = _grad(ref, xb.astype(jnp.float32))
    ours = _grad(act, xb).astype(jnp.float32)
    assert ours.dtype == jnp.float32 and _grad(act, xb).dtype == jnp.bfloat16
    np.testing.assert_allclose(ours, exact, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_backward_keeps_only_the_input(name):
    x = jnp.ones((4, 8), jnp.bfloat16)
    ours = saved(lambda x: jnp.sum(getattr(activations, name)(x)), x)
    assert ours == [((4, 8), jnp.uint16), ((0,), jnp.bfloat16)], ours  # x's bits (layers/residuals.py)
    autodiff = saved(lambda x: jnp.sum(REFERENCE[name](x)), x)
    assert len([r for r in autodiff if r[0] == (4, 8)]) >= 2, autodiff  # what the custom VJP saves us


@pytest.mark.parametrize("activation, wide", [("gelu_tanh", 2), ("swiglu", 4)])
def test_mlp_keeps_its_input_and_hidden_activations(activation, wide):
    """[B, L, d_ff] tensors the MLP's backward keeps. Plain: wi's output and the activation's;
    gated: both projections, the activation and the product (jax.nn's autodiff: 3-5 more)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    m = MLP(d_ff=64, activation=activation)
    params = m.init(jax.random.key(1), x)["params"]
    kept = saved(lambda p, x: jnp.sum(m.apply({"params": p}, x)), params, x)
    assert len([r for r in kept if r[0] == (2, 8, 64)]) == wide, kept


def test_train_step_temp_memory_falls():
    """The bench-shaped step's temporaries with these activations against jax.nn's autodiff
    (XLA's own memory_analysis; measured 1.62 vs 2.37 GiB on the 6-layer bench model in bf16)."""
    from transformer_jax.layers import mlp
    cfg = get_config("bench", num_layers=2, dtype="bfloat16", d_model=128, num_heads=2, d_ff=1024, vocab_size=512)

    def temp_bytes():
        return compiled_lm_step(cfg, 4, 256).memory_analysis().temp_size_in_bytes
    ours = temp_bytes()
    original = dict(mlp.ACTIVATIONS)
    try:
        mlp.ACTIVATIONS["gelu_tanh"] = REFERENCE["gelu_tanh"]
        autodiff = temp_bytes()
    finally:
        mlp.ACTIVATIONS.update(original)
    # 2 layers x 4 x 256 x 1024 bf16 = 2 MiB per saved tensor; autodiff keeps >= 3 more per layer
    assert autodiff - ours >= 3 * 2 * 4 * 256 * 1024 * 2, (ours, autodiff)
