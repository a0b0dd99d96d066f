"""Attention kernels: `chunked` (and `auto`) against the `xla` reference, masks, memory, dispatch."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

from transformer_jax.layers import platform
from transformer_jax.layers.dot_product import (
    CHUNKED_MIN_SCORES, CPU_BLOCKS, IMPLEMENTATIONS, chunked_blocks, dot_product_attention, select_implementation)


def _qkv(rng, b, lq, lk, h, kh, d, dtype=jnp.float32):
    q = rng.normal(size=(b, lq, h, d))
    k, v = rng.normal(size=(2, b, lk, kh, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _value_and_grads(impl, q, k, v, bias, **kw):
    """Attention output and grads of a nonlinear loss w.r.t. q, k, v (and bias), under jit;
    arrays (segment ids, mask, q_offset) are traced, flags and block sizes static."""
    static = {n: kw.pop(n) for n in ("causal", "block_q", "block_kv") if n in kw}

    def run(q, k, v, bias, **arrays):
        def loss(q, k, v, bias):
            out = dot_product_attention(q, k, v, bias=bias, implementation=impl, **static, **arrays)
            w = jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size
            return jnp.sum(jnp.sin(out.astype(jnp.float32)) * w), out
        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
        return out, grads
    return jax.jit(run)(q, k, v, bias, **kw)


class ShapeTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("mha_xla", "xla", 2, 5, 5, 4, 4), ("mha_chunked", "chunked", 2, 5, 5, 4, 4),
        ("gqa_cross_chunked", "chunked", 1, 7, 3, 6, 2), ("mqa_chunked", "chunked", 2, 1, 9, 4, 1),
        ("gqa_auto", "auto", 2, 6, 4, 4, 2))
    def test_output_shape_and_dtype(self, impl, b, lq, lk, h, kh):
        q, k, v = _qkv(np.random.default_rng(0), b, lq, lk, h, kh, 8, jnp.bfloat16)
        fn = self.variant(functools.partial(dot_product_attention, causal=True, implementation=impl,
                                            block_q=2, block_kv=2))
        out = fn(q, k, v)
        chex.assert_shape(out, (b, lq, h, 8))
        chex.assert_type(out, jnp.bfloat16)
        chex.assert_tree_all_finite(out)


# Hypothesis: chunked == xla, forward and gradients, on random shapes, blocks and masks.
MASKS = ("none", "causal", "segments", "bool_mask", "bias", "all")


@st.composite
def _case(draw, masks):
    """Shapes and blocks; each list starts with an awkward value, which is what hypothesis tries first."""
    pick = lambda *xs: draw(st.sampled_from(xs))  # noqa: E731
    kh = pick(2, 1)
    return dict(b=pick(2, 1), lq=pick(11, 1, 4, 13), lk=pick(9, 1, 6, 13), kh=kh, h=kh * pick(3, 1, 2), d=pick(8, 4),
                block_q=pick(4, 1, 3, 16), block_kv=pick(4, 2, 5, 16), q_offset=pick(2, 0, -3, 7),
                bias_shape=pick("heads", "full", "keys", "2d"), seed=draw(st.integers(0, 2**16)), masks=masks)


def _options(c, rng):
    m, b, lq, lk, h = c["masks"], c["b"], c["lq"], c["lk"], c["h"]
    kw, bias = {}, None
    if m in ("causal", "all"):
        kw["causal"] = True
        kw["q_offset"] = c["q_offset"]  # traced under jit, like a KV-cache index
    if m in ("segments", "all"):  # 0 = padding, which only sees padding
        kw["q_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (b, lq)), axis=1))
        kw["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (b, lk)), axis=1))
    if m in ("bool_mask", "all"):
        kw["mask"] = jnp.asarray(rng.random((b, 1, lq, lk)) < 0.7)
    if m in ("bias", "all"):
        shape = {"full": (b, h, lq, lk), "heads": (1, h, lq, lk), "keys": (b, 1, 1, lk), "2d": (lq, lk)}[c["bias_shape"]]
        bias = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return kw, bias


@pytest.mark.parametrize("masks", MASKS)
@settings(max_examples=2, deadline=None, derandomize=True)
@given(data=st.data())
def test_chunked_matches_xla(masks, data):
    c = data.draw(_case(masks))
    rng = np.random.default_rng(c["seed"])
    q, k, v = _qkv(rng, c["b"], c["lq"], c["lk"], c["h"], c["kh"], c["d"])
    kw, bias = _options(c, rng)
    ref_out, ref_grads = _value_and_grads("xla", q, k, v, bias, **kw)
    out, grads = _value_and_grads("chunked", q, k, v, bias, block_q=c["block_q"], block_kv=c["block_kv"], **kw)
    chex.assert_trees_all_close(out, ref_out, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=5e-5, rtol=5e-5)


def test_traced_q_offset_under_jit_matches_xla():
    """KV-cache decoding: one query at a traced position over a longer cache, plus padding segments."""
    q, k, v = _qkv(np.random.default_rng(1), 2, 1, 11, 4, 2, 8)
    seg_q = jnp.array([[1], [1]])
    seg_kv = jnp.array([[0] * 3 + [1] * 8, [1] * 11])

    @functools.partial(jax.jit, static_argnums=0)
    def attend(impl, q, k, v, offset):
        return dot_product_attention(q, k, v, causal=True, q_offset=offset, q_segment_ids=seg_q,
                                     kv_segment_ids=seg_kv, implementation=impl, block_kv=4)
    for offset in (0, 5, 10):
        chex.assert_trees_all_close(attend("chunked", q, k, v, offset), attend("xla", q, k, v, offset), atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 4, 7, 9), (2, 1, 1, 9), (7, 9), (1, 1, 7, 1), (4, 1, 1)])
def test_bias_gradient_for_every_broadcast_shape(shape):
    """d bias sums over exactly the dims the bias broadcasts over (T5's [1, H, Lq, Lk], padding [B, 1, 1, Lk]...)."""
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, 2, 7, 9, 4, 2, 4)
    bias = jnp.asarray(rng.normal(size=shape), jnp.float32)
    out, grads = _value_and_grads("chunked", q, k, v, bias, causal=True, block_q=3, block_kv=4)
    ref_out, ref_grads = _value_and_grads("xla", q, k, v, bias, causal=True)
    chex.assert_shape(grads[3], shape)
    chex.assert_trees_all_close((out, grads), (ref_out, ref_grads), atol=5e-5, rtol=5e-5)


def test_causal_block_skipping_at_every_offset():
    """Skipped tiles are exactly the fully masked ones: grads match xla for every q_offset (traced,
    so one compile) on blocks that do not divide the lengths, including the boundary alignments."""
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, 1, 10, 12, 2, 1, 4)
    bias = jnp.asarray(rng.normal(size=(1, 2, 10, 12)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl, q, k, v, bias, offset):
        def loss(q, k, v, bias):
            out = dot_product_attention(q, k, v, bias=bias, causal=True, q_offset=offset, implementation=impl,
                                        block_q=3, block_kv=4)
            return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for offset in range(-7, 10):
        chex.assert_trees_all_close(run("chunked", q, k, v, bias, offset), run("xla", q, k, v, bias, offset),
                                    atol=1e-4, rtol=1e-4, custom_message=f"q_offset={offset}")


def test_causality():
    """Output at query t is unchanged when keys/values after t + q_offset change."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 9, 12, 2, 1, 8)
    offset, t = 2, 4
    k2 = k.at[:, t + offset + 1:].set(jnp.asarray(rng.normal(size=k[:, t + offset + 1:].shape), jnp.float32))
    v2 = v.at[:, t + offset + 1:].add(10.0)
    f = jax.jit(functools.partial(dot_product_attention, causal=True, q_offset=offset, implementation="chunked",
                                  block_q=2, block_kv=3))
    a, b = f(q, k, v), f(q, k2, v2)
    chex.assert_trees_all_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_segment_isolation():
    """Packed documents do not attend across segments, in output and in gradient."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 10, 10, 2, 2, 4)
    seg = jnp.array([[1] * 4 + [2] * 6])
    f = jax.jit(lambda k, v: dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                   implementation="chunked", block_q=3, block_kv=3))
    a, b = f(k, v), f(k.at[:, 4:].add(3.0), v.at[:, 4:].add(3.0))
    chex.assert_trees_all_close(a[:, :4], b[:, :4], atol=1e-6)
    dk = jax.jit(jax.grad(lambda k: f(k, v)[:, :4].sum()))(k)
    assert np.abs(dk[:, :4]).max() > 0 and np.abs(dk[:, 4:]).max() == 0


def test_fully_masked_rows_are_finite_and_match_xla():
    """A query with no visible key outputs mean(v) like xla, and gradients stay finite and equal."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 6, 7, 2, 1, 4)
    mask = jnp.ones((2, 1, 6, 7), bool).at[:, :, 1].set(False).at[1, :, 4].set(False)
    bias = jnp.asarray(rng.normal(size=(1, 2, 6, 7)), jnp.float32)
    kw = dict(mask=mask, causal=True, q_offset=-1)  # row 0 also sees nothing through causality
    out, grads = _value_and_grads("chunked", q, k, v, bias, block_q=2, block_kv=3, **kw)
    ref_out, ref_grads = _value_and_grads("xla", q, k, v, bias, **kw)
    chex.assert_tree_all_finite((out, grads))
    mean_v = jnp.broadcast_to(v.mean(1, keepdims=True), out[:, :1].shape)
    chex.assert_trees_all_close(out[:, 1:2], mean_v, out[:, :1], atol=1e-6)
    chex.assert_trees_all_close((out, grads), (ref_out, ref_grads), atol=3e-5)


def test_bf16_inputs_close_to_f32_reference():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 37, 37, 4, 2, 16)
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (2, 37)), axis=1))
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    ref_out, ref_grads = _value_and_grads("xla", q, k, v, None, **kw)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, grads = _value_and_grads("chunked", *bf, None, block_q=8, block_kv=16, **kw)
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_type(grads, [jnp.bfloat16] * 3)
    chex.assert_trees_all_close(out.astype(jnp.float32), ref_out, atol=3e-2, rtol=3e-2)
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g.astype(jnp.float32) - r).max()) < 3e-2 * float(jnp.abs(r).max()) + 1e-3


# ---- dispatch -----------------------------------------------------------------------------

SMALL, LARGE = 256, 4096


@pytest.mark.parametrize("backend,dtype,length,want", [
    ("cpu", jnp.float32, SMALL, "xla"), ("cpu", jnp.bfloat16, LARGE, "chunked"),
    ("tpu", jnp.bfloat16, SMALL, "xla"), ("tpu", jnp.float32, LARGE, "chunked"),
    ("gpu", jnp.bfloat16, SMALL, "cudnn"), ("cuda", jnp.float16, LARGE, "cudnn"),
    ("gpu", jnp.float32, SMALL, "xla"), ("gpu", jnp.float32, LARGE, "chunked"),
    ("rocm", jnp.bfloat16, LARGE, "chunked"),
])
def test_select_implementation(backend, dtype, length, want):
    name, reason = select_implementation(backend, dtype, length, length, batch=1, heads=8, head_dim=64)
    assert name == want and isinstance(reason, str) and reason
    assert (name == "chunked") == (length * length > CHUNKED_MIN_SCORES) or name == "cudnn"


def test_select_implementation_cpu_takes_chunked_from_one_512_tile():
    """On CPU a training step is faster with `chunked` already at 512 x 512 (dot_product.py)."""
    assert select_implementation("cpu", jnp.float32, 512, 512, batch=8, heads=8)[0] == "chunked"
    assert select_implementation("cpu", jnp.bfloat16, 512, 512, causal=True)[0] == "chunked"
    assert select_implementation("cpu", jnp.float32, 511, 512)[0] == "xla"
    assert select_implementation("tpu", jnp.float32, 512, 512)[0] == "xla"


def test_select_implementation_gpu_fallbacks_say_why():
    name, reason = select_implementation("gpu", jnp.bfloat16, 512, 512, head_dim=100)
    assert name == "xla" and "head_dim" in reason
    name, reason = select_implementation("gpu", jnp.bfloat16, 255, 512, has_bias=True)
    assert name == "xla" and "even" in reason
    assert select_implementation("gpu", jnp.bfloat16, 512, 512, dense_mask=True)[0] == "cudnn"
    assert select_implementation("gpu", jnp.bfloat16, 16384, 16384, batch=8, dense_mask=True)[0] == "chunked"
    assert select_implementation("cpu", jnp.float32, 1, 32768)[0] == "xla"  # one decoding step
    assert select_implementation("gpu", jnp.float32, 512, 512, batch=64, heads=32)[0] == "xla"  # one tile anyway


def test_auto_on_cpu_matches_xla():
    q, k, v = _qkv(np.random.default_rng(6), 1, 8, 8, 2, 2, 4)
    chex.assert_trees_all_close(dot_product_attention(q, k, v, causal=True),
                                dot_product_attention(q, k, v, causal=True, implementation="xla"))


def test_cudnn_on_cpu_and_unknown_implementation_raise_one_line():
    q, k, v = _qkv(np.random.default_rng(7), 1, 4, 4, 2, 2, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"needs a CUDA GPU; this backend is cpu") as e:
        dot_product_attention(q, k, v, implementation="cudnn")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown") as e:
        dot_product_attention(q, k, v, implementation="flash")
    assert "\n" not in str(e.value) and set(IMPLEMENTATIONS) == {"auto", "xla", "chunked", "cudnn"}


# ---- memory ---------------------------------------------------------------------------------

def _fwd_bwd_temp_bytes(impl, length):
    x = jax.ShapeDtypeStruct((1, length, 4, 16), jnp.float32)
    loss = lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation=impl,
                                                 block_q=256, block_kv=256).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_cpu_default_tiles_match_xla_in_less_scratch_than_one_tile():
    """On CPU `chunked` defaults to CPU_BLOCKS tiles (512 x 512 where it traces for an accelerator): at
    L = 512, causal, they give xla's output and gradients, and the compiled forward+backward needs
    less scratch than one 512 x 512 tile (measured 1/5 at batch 1, 8 heads)."""
    assert max(chunked_blocks()) < 512 and chunked_blocks() == CPU_BLOCKS
    for target in ("cuda", "tpu"):
        with platform.target_platform(target):
            assert chunked_blocks() == (512, 512)
    q, k, v = _qkv(np.random.default_rng(9), 1, 512, 512, 2, 2, 16)
    out, grads = _value_and_grads("chunked", q, k, v, None, causal=True)
    chex.assert_trees_all_close((out, grads), _value_and_grads("xla", q, k, v, None, causal=True),
                                atol=5e-5, rtol=5e-5)
    x = jax.ShapeDtypeStruct((1, 512, 8, 64), jnp.float32)

    def temp(**blocks):
        loss = lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="chunked", **blocks).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp() < 0.5 * temp(block_q=512, block_kv=512)


def test_chunked_memory_is_linear_in_length_for_forward_and_backward():
    chunked = [_fwd_bwd_temp_bytes("chunked", n) for n in (1024, 4096)]
    xla = [_fwd_bwd_temp_bytes("xla", n) for n in (1024, 4096)]
    assert chunked[1] / chunked[0] < 3, chunked  # 4x length: linear would be <= 4x, measured ~1.7x
    assert xla[1] / xla[0] > 10, xla  # quadratic: 16x, measured ~16x
    assert chunked[1] < xla[0], (chunked, xla)
