"""hlo_analysis.op_kind: what a memory-bound op does to its bytes, read from compiled XLA:CPU HLO."""
import jax
import jax.numpy as jnp
import pytest

from transformer_jax.hlo_analysis import analyze_hlo

X = jnp.ones((512, 256), jnp.float32)


def _kinds(fn) -> set[str]:
    stats = analyze_hlo(jax.jit(fn).lower(X).compile().as_text())
    return {k for (_, flops, _), k in zip(stats.ops, stats.op_kinds) if not flops}


@pytest.mark.parametrize("fn, kinds", [
    (lambda x: x * 2.0 + 1.0, {"elementwise"}),
    (lambda x: x[:128] * 2.0, {"elementwise"}),
    (lambda x: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5),
     {"reduce", "elementwise"}),  # the row statistics, then the normalisation
    (lambda x: x.sum(0), {"reduce"}),
    (lambda x: x.T * 2.0, {"transpose"}),  # the minor-most dimension changes: element by element
    (lambda x: x.reshape(512, 4, 64).transpose(1, 0, 2) * 2.0, {"permute"}),  # rows of 64 move whole
], ids=["map", "slice", "layer norm", "column sum", "matrix transpose", "heads swapped with rows"])
def test_op_kind(fn, kinds):
    assert _kinds(fn) == kinds
