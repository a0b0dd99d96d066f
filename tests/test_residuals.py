"""Custom-VJP residuals kept as bits: exact round trips, and a bf16 layer stack whose saved
activations XLA:CPU writes into their [layers, ...] stacks without converting them to f32."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testing import compiled_lm_step
from transformer_jax.layers import residuals
from transformer_jax.layers.residuals import stash, unstash
from transformer_jax.models import get_config


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_round_trip_is_exact(dtype):
    x = (jax.random.normal(jax.random.key(0), (3, 5)) * 100).astype(dtype)
    kept = stash(x)
    back = unstash(kept)
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)), np.asarray(x.astype(jnp.float32)))
    low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    assert kept[0].dtype == (jnp.uint16 if low else x.dtype)


def _rewritten_stack_bytes(text: str) -> int:
    """Bytes of the arrays that fused computations update a slice of in f32 between two converts,
    convert(dynamic-update-slice(convert(stack), update)): each rewrites its whole stack."""
    total = 0
    for body in re.findall(r"^%[\w.\-]+ [^\n]*\{\n(.*?)\n\}", text, re.S | re.M):
        root = re.search(r"ROOT %\S+ = (bf16|f16)\[([\d,]*)\]\S* convert\(", body)
        if "dynamic-update-slice(" in body and root:
            total += 2 * math.prod(int(d) for d in root.group(2).split(",") if d)
    return total


def test_bf16_layer_stack_updates_its_residual_stacks_in_place(monkeypatch):
    """The activations' stacks (4 x 128 x 32 per layer and up) are updated in place; only the
    layers' cast kernels (32 x 96 and smaller, kept as bf16 so FSDP gathers each once) are not."""
    cfg = get_config("bench", num_layers=2, dtype="bfloat16", d_model=32, num_heads=2, d_ff=64, vocab_size=256)
    hlo = lambda: compiled_lm_step(cfg, 4, 128).as_text()  # noqa: E731
    ours = _rewritten_stack_bytes(hlo())
    monkeypatch.setattr(residuals, "_BITS", {})  # residuals kept as bf16: the pattern this avoids
    as_bf16 = _rewritten_stack_bytes(hlo())
    assert as_bf16 >= 4 * 2 * 4 * 128 * 32 * 2, as_bf16  # at least four activation stacks
    assert ours <= 0.1 * as_bf16, (ours, as_bf16)
