"""`layers/dense.py`: the projection's matmul. With f32 master weights and bf16 compute its
backward pass runs in bf16 with f32 accumulation (a custom VJP), against float32 autodiff.
The bias add sums its gradient in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.dense import Dense, add_bias, matmul
from transformer_jax.layers.platform import cpu_dots, target_platform

CASES = [  # x shape, w shape, contracted dims
    ((4, 8, 16), (16, 3, 5), 1),  # [B, L, D] . [D, H, Dh]
    ((4, 8, 3, 5), (3, 5, 16), 2),  # [B, L, H, Dh] . [H, Dh, D]
]


def _inputs(xs, ws, x_dtype=jnp.bfloat16):
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, xs).astype(x_dtype), jax.random.normal(kw, ws) / np.sqrt(ws[0])


@pytest.mark.parametrize("xs,ws,n", CASES)
def test_forward_is_the_bf16_product_accumulated_in_f32(xs, ws, n):
    x, w = _inputs(xs, ws)
    want = jnp.tensordot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), n,
                         preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    got = matmul(x, w, n, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("xs,ws,n", CASES)
def test_mixed_gradients_match_float32_autodiff(xs, ws, n, x_dtype):
    x, w = _inputs(xs, ws, x_dtype)
    r = jax.random.normal(jax.random.key(1), xs[:len(xs) - n] + ws[n:])

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * r)
    dx, dw = jax.grad(loss(lambda x, w: matmul(x, w, n, jnp.bfloat16)), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(lambda x, w: jnp.tensordot(x.astype(jnp.float32), w, n)), argnums=(0, 1))(x, w)
    assert dx.dtype == x.dtype and dw.dtype == jnp.float32  # each cotangent in its input's dtype
    for got, want in ((dx, rx), (dw, rw)):  # bf16 inputs, f32 sums: ~3 significant digits
        err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max()
        assert err <= 2e-2 * np.abs(np.asarray(want, np.float32)).max(), err


@pytest.mark.parametrize("target", ["cuda", "tpu", "cpu"])
def test_backward_matmuls_run_in_the_compute_dtype(target):
    """bf16 operands, never upcast by autodiff; only on CPU does `platform.dot_general` upcast
    them to float32 (the faster kernel there, the same products: tests/test_platform.py)."""
    x, w = _inputs((4, 32, 64), (64, 2, 64))  # every dot at least MIN_UPCAST_FREE rows and columns
    grad = jax.grad(lambda x, w: jnp.sum(matmul(x, w, 1, jnp.bfloat16).astype(jnp.float32) ** 2), argnums=(0, 1))
    with target_platform(target), cpu_dots("f32"):
        eqns = jax.make_jaxpr(grad)(x, w).eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, dx, dw
    operand = jnp.float32 if target == "cpu" else jnp.bfloat16
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [operand] * 2, e
        assert e.params["preferred_element_type"] == jnp.float32
    if target == "cpu":  # upcast from bf16 values: 6 converts of bf16 to f32 feed the 3 dots
        ups = [e for e in eqns if e.primitive.name == "convert_element_type"
               and e.invars[0].aval.dtype == jnp.bfloat16 and e.params["new_dtype"] == jnp.float32]
        assert len(ups) >= 6


def test_float32_weights_and_compute_take_plain_autodiff():
    x, w = _inputs(*CASES[0][:2], x_dtype=jnp.float32)
    grad = jax.grad(lambda w: jnp.sum(matmul(x, w, 1, jnp.float32) ** 2))
    assert "custom_vjp" not in str(jax.make_jaxpr(grad)(w))
    b = jnp.ones(CASES[0][1][1:])
    grad = jax.grad(lambda w, b: jnp.sum(add_bias(matmul(x, w, 1, jnp.float32), b) ** 2), argnums=(0, 1))
    assert "custom_vjp" not in str(jax.make_jaxpr(grad)(w, b))


@pytest.mark.parametrize("b_shape", [(16,), (3, 16)])
def test_bias_gradient_is_the_float32_sum_of_the_cotangent(b_shape):
    """bf16 activations, f32 bias: the value is y + b in bf16, the bias gradient the float32 sum
    over the leading axes (autodiff of the plain add sums 4096 bf16 terms in bf16)."""
    y = jax.random.normal(jax.random.key(0), (8, 512) + b_shape, jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), b_shape)
    g = jax.random.normal(jax.random.key(2), y.shape, jnp.bfloat16) + 1.0  # a sum far from 0
    out, vjp = jax.vjp(add_bias, y, b)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(y + b.astype(jnp.bfloat16), np.float32))
    dy, db = vjp(g)
    assert dy is g and db.dtype == jnp.float32 and db.shape == b_shape
    want = np.asarray(g, np.float64).sum((0, 1))
    np.testing.assert_allclose(np.asarray(db), want, rtol=1e-5)
    plain = jax.vjp(lambda y, b: y + b.astype(jnp.bfloat16), y, b)[1](g)[1]
    assert np.abs(np.asarray(plain) - want).max() > 10 * np.abs(np.asarray(db) - want).max()


def test_scanned_bf16_layer_gradient_has_no_tree_reduction():
    """XLA:CPU runs autodiff's bf16 bias-gradient sum inside a scan as an upcast reduce-window
    (tree reduction), ~17 ms for a [4096, 2048] cotangent; add_bias's float32 sum is a plain
    reduction. The bf16 bench step: 4.47 -> 4.19 s (docs/architecture.md)."""
    dense = Dense((2048,), ("embed", "mlp"), use_bias=True, dtype=jnp.bfloat16)
    x = jnp.ones((8, 512, 256), jnp.bfloat16)
    params = jax.tree.map(lambda p: jnp.stack([p] * 2), dense.init(jax.random.key(0), x))

    def loss(params):
        def layer(h, p):
            return dense.apply(p, h)[..., :256], None
        return jnp.sum(jax.lax.scan(layer, x, params)[0].astype(jnp.float32))
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert "reduce-window" not in hlo
