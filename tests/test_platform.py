"""`layers/platform.py`: float32-accumulating dots upcast their operands on CPU only, and only
where this CPU's float32 GEMM is the faster (`cpu_dots`, the environment, or a timed probe), with
the same numbers as the bf16 x bf16 -> f32 dot accelerators run, and XLA:CPU keeps them float32."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.hlo_parse import ARRAY, parse_module
from transformer_jax.layers import platform
from transformer_jax.layers.dense import matmul

DIMS = (((1,), (0,)), ((), ()))


def _bf16(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape).astype(jnp.bfloat16)


def _dot_operand_dtypes(jaxpr) -> list[list[str]]:
    return [[str(v.aval.dtype) for v in e.invars] for e in jaxpr.eqns if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("target,operands", [("cpu", "float32"), ("cuda", "bfloat16"), ("tpu", "bfloat16")])
def test_operands_are_upcast_on_cpu_only(target, operands):
    a, b = _bf16((128, 256), 0), _bf16((256, 96), 1)
    with platform.target_platform(target), platform.cpu_dots("f32"):
        jaxpr = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
        einsum = jax.make_jaxpr(lambda a, b: platform.einsum("ik,kj->ij", a, b))(a, b)
    assert _dot_operand_dtypes(jaxpr) == _dot_operand_dtypes(einsum) == [[operands] * 2]
    assert jaxpr.out_avals[0].dtype == jnp.float32


def test_accelerator_dots_keep_bf16_operands_on_cpu():
    """`plan --chip` compiles on CPU a program that stands for the accelerator's."""
    a, b = _bf16((128, 256), 0), _bf16((256, 96), 1)
    with platform.cpu_dots("f32"):
        with platform.accelerator_dots():
            inside = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
        outside = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
    assert _dot_operand_dtypes(inside) == [["bfloat16"] * 2]
    assert _dot_operand_dtypes(outside) == [["float32"] * 2]


def test_a_multi_device_cpu_mesh_keeps_bf16_operands():
    """8 fake CPU devices stand in for accelerators (and FSDP would gather an upcast kernel in f32)."""
    a, b = _bf16((128, 256), 0), _bf16((256, 96), 1)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
    one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:1])
    with jax.set_mesh(one), platform.cpu_dots("f32"):
        upcast = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
    assert _dot_operand_dtypes(jaxpr) == [["bfloat16"] * 2]
    assert _dot_operand_dtypes(upcast) == [["float32"] * 2]


def test_thin_dots_keep_bf16_operands_on_cpu():
    """Decoding a few rows against a weight is bandwidth-bound: bf16 reads half the bytes."""
    rows = platform.MIN_UPCAST_FREE - 1
    with platform.cpu_dots("f32"):
        jaxpr = jax.make_jaxpr(lambda a, b: platform.einsum("bd,df->bf", a, b))(_bf16((rows, 256), 0),
                                                                               _bf16((256, 512), 1))
        assert _dot_operand_dtypes(jaxpr) == [["bfloat16"] * 2]
        jaxpr = jax.make_jaxpr(platform.dot_general, static_argnums=2)(_bf16((512, 256), 0), _bf16((256, rows), 1),
                                                                       DIMS)
    assert _dot_operand_dtypes(jaxpr) == [["bfloat16"] * 2]


def test_upcast_dot_equals_the_bf16_dot():
    """A product of two bf16 numbers is exact in float32, so only the summation order can differ."""
    a, b = _bf16((64, 1024), 2), _bf16((1024, 96), 3)
    with platform.cpu_dots("f32"):
        got = jax.jit(platform.dot_general, static_argnums=2)(a, b, DIMS)  # this host: a CPU
    with platform.target_platform("cuda"):  # traced as for a GPU, run here
        native = jax.jit(platform.dot_general, static_argnums=2)(a, b, DIMS)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    scale = np.abs(exact).max()
    assert np.abs(np.asarray(got) - np.asarray(native)).max() <= 1e-6 * scale
    assert np.abs(np.asarray(got) - exact).max() <= 1e-6 * scale


def test_compiled_cpu_matmul_keeps_float32_operands():
    """XLA:CPU must not fold the converts back into a bf16 dot (the slower kernel on CPU)."""
    x, w = _bf16((4, 32, 64), 4), jax.random.normal(jax.random.key(5), (64, 96))
    loss = lambda x, w: jnp.sum(matmul(x, w, 1, jnp.bfloat16).astype(jnp.float32) ** 2)  # noqa: E731
    with platform.cpu_dots("f32"):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    comps, _ = parse_module(text)
    dots = [[ARRAY.match(c.by_name[o].shape).group(1) for o in i.operands[:2]]
            for c in comps.values() for i in c.instrs if i.opcode == "dot"]
    assert len(dots) == 3, dots  # forward, dx, dw
    assert dots == [["f32", "f32"]] * 3


def test_bf16_cpu_dots_keep_bf16_operands_and_the_same_numbers():
    """Where bf16 x bf16 -> f32 is this CPU's faster dot (an AMD EPYC: 1.7-2x), nothing is upcast."""
    a, b = _bf16((128, 256), 0), _bf16((256, 96), 1)
    with platform.cpu_dots("bf16"):
        jaxpr = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
        native = jax.jit(platform.dot_general, static_argnums=2)(a, b, DIMS)
    with platform.cpu_dots("f32"):
        upcast = jax.jit(platform.dot_general, static_argnums=2)(a, b, DIMS)
    assert _dot_operand_dtypes(jaxpr) == [["bfloat16"] * 2]
    scale = np.abs(np.asarray(upcast)).max()
    assert np.abs(np.asarray(native) - np.asarray(upcast)).max() <= 1e-6 * scale


def test_the_probe_picks_a_kind_once_and_auto_uses_it():
    kind = platform.faster_cpu_dot()
    assert kind in ("f32", "bf16")
    before = platform.faster_cpu_dot.cache_info()
    assert platform.faster_cpu_dot() == kind
    after = platform.faster_cpu_dot.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)  # timed once per process
    a, b = _bf16((128, 256), 0), _bf16((256, 96), 1)
    with platform.cpu_dots("auto"):
        jaxpr = jax.make_jaxpr(platform.dot_general, static_argnums=2)(a, b, DIMS)
    assert _dot_operand_dtypes(jaxpr) == [["float32" if kind == "f32" else "bfloat16"] * 2]


def test_the_probe_keeps_f32_unless_bf16_is_clearly_faster():
    """A margin no dot can reach keeps the upcast; a margin every dot reaches picks bf16."""
    assert platform.faster_cpu_dot.__wrapped__(rounds=2, margin=1e9) == "f32"
    assert platform.faster_cpu_dot.__wrapped__(rounds=2, margin=0.0) == "bf16"


def test_the_environment_fixes_the_choice_and_a_bad_value_is_one_clear_error():
    code = ("import jax, jax.numpy as jnp\n"
            "from transformer_jax.layers import platform\n"
            "a = jnp.ones((128, 256), jnp.bfloat16)\n"
            "j = jax.make_jaxpr(lambda a: platform.einsum('ik,kj->ij', a, a.T))(a)\n"
            "print([str(v.aval.dtype) for e in j.eqns if e.primitive.name == 'dot_general' for v in e.invars])\n")
    for kind, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        env = dict(os.environ, **{platform.CPU_DOTS_ENV: kind})
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str([dtype, dtype])
    with pytest.raises(ValueError, match="cpu_dots='fast' is unknown; choose f32"):
        with platform.cpu_dots("fast"):
            pass


@pytest.mark.parametrize("x_cols, g_cols", [(256, 64), (64, 256)])
def test_weight_gradient_equals_the_plain_dot(x_cols, g_cols):
    """x^T . g over the batch axes; on one CPU device with g the narrower, as (g^T . x)^T (the
    smaller bf16 operand is the one XLA:CPU copies transposed)."""
    x, g = _bf16((4, 32, x_cols), 0), _bf16((4, 32, g_cols), 1)
    plain = lambda x, g: platform.dot_general(x, g, (((0, 1), (0, 1)), ((), ())))  # noqa: E731
    with platform.cpu_dots("bf16"):
        ours = jax.jit(platform.weight_gradient, static_argnums=2)(x, g, 2)
        want = jax.jit(plain)(x, g)
        jaxpr = str(jax.make_jaxpr(platform.weight_gradient, static_argnums=2)(x, g, 2))
        with platform.accelerator_dots():
            accel = str(jax.make_jaxpr(platform.weight_gradient, static_argnums=2)(x, g, 2))
    assert ours.shape == (x_cols, g_cols) and ours.dtype == jnp.float32
    scale = np.abs(np.asarray(want)).max()  # bf16 products are exact in f32: only the summation order differs
    assert np.abs(np.asarray(ours) - np.asarray(want)).max() <= 1e-6 * scale
    assert ("optimization_barrier" in jaxpr) == (g_cols < x_cols), jaxpr
    assert "optimization_barrier" not in accel  # accelerators' dots take either layout as it is


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 33, 64])
def test_a_tied_output_layer_with_few_rows_runs_transposed_on_cpu_with_the_same_logits(rows):
    """`Embed.attend` with 1-32 float32 rows (decoding) on one CPU device: (E . x^T)^T behind a
    barrier; the same logits and gradients as the plain dot, which every other case keeps."""
    from transformer_jax.layers.embeddings import Embed
    embed = Embed(512, 64, dtype=jnp.float32)
    params = embed.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    x = jax.random.normal(jax.random.key(1), (rows, 1, 64))
    attend = lambda p, x: embed.apply(p, x, method=Embed.attend)  # noqa: E731
    table = nn.meta.unbox(params)["params"]["embedding"]
    thin = 1 <= rows <= 32
    assert ("optimization_barrier" in str(jax.make_jaxpr(attend)(params, x))) == thin
    np.testing.assert_allclose(jax.jit(attend)(params, x), x @ table.T, rtol=1e-5, atol=1e-5)
    loss = lambda x: jnp.sum(jnp.sin(attend(params, x)))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(lambda x: jnp.sum(jnp.sin(x @ table.T)))(x),
                               rtol=1e-4, atol=1e-5)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):  # a multi-device program (an accelerator's stand-in) keeps the plain dot
        assert "optimization_barrier" not in str(jax.make_jaxpr(attend)(params, x))
    xb = x.astype(jnp.bfloat16)  # bf16's few-row GEMM is fast as it is
    bf16_embed = Embed(512, 64, dtype=jnp.bfloat16)
    assert "optimization_barrier" not in str(jax.make_jaxpr(
        lambda p, x: bf16_embed.apply(p, x, method=Embed.attend))(params, xb))
