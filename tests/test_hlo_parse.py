"""hlo_parse.py: HLO text as XLA:CPU prints it, parsed into computations of instructions."""
import jax
import jax.numpy as jnp
import pytest

from transformer_jax.hlo_parse import parse_module, shape_bytes, shape_dims


def test_shapes():
    assert shape_bytes("f32[8,128]{1,0}") == 8 * 128 * 4
    assert shape_bytes("(f32[8,128]{1,0}, bf16[4])") == 8 * 128 * 4 + 4 * 2  # a tuple sums its elements
    assert shape_bytes("pred[]") == 1 and shape_dims("s32[2,<=5]") == [2, 5]  # dynamic bound: its maximum


def test_parse_module_of_a_compiled_program():
    def f(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w), x)
    text = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((8, 8))).compile().as_text()
    comps, entry = parse_module(text)
    root = comps[entry].root
    assert root is not None and root.shape.startswith("f32[4,8]")
    loops = [i for c in comps.values() for i in c.instrs if i.opcode == "while"]
    assert len(loops) == 1 and "body=" in loops[0].attrs
    dots = [(c, i) for c in comps.values() for i in c.instrs if i.opcode == "dot"]
    assert dots and all(len(d.operands) == 2 for _, d in dots)
    assert all(op in c.by_name for c, d in dots for op in d.operands)  # operands: names defined beside it
    with pytest.raises(ValueError, match="ENTRY"):
        parse_module("HloModule m\n")
