"""Forward+backward time and compiled memory of the attention kernels.

    .venv/bin/python benchmarks/attention.py                      # xla vs chunked, 1k/4k/16k, causal f32
    .venv/bin/python benchmarks/attention.py --lengths 1024 2048 --dtype bfloat16 --block 256

Each row compiles jax.grad of sum(out * cotangent) w.r.t. q, k, v, reads the compiled
memory_analysis() (temp = scratch XLA allocates besides arguments and outputs) and, if the
temp size is under --max-run-gib, times the median of --runs calls after one warm-up call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from transformer_jax.layers.dot_product import dot_product_attention

GIB = 2**30


def measure(impl, length, args):
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, length, args.heads, args.head_dim)
    kv_shape = (args.batch, length, args.kv_heads or args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], shape, dtype)
    k, v = (jax.random.normal(kk, kv_shape, dtype) for kk in keys[1:3])
    ct = jax.random.normal(keys[3], shape, dtype)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, causal=args.causal, implementation=impl,
                                    block_q=args.block, block_kv=args.block)
        return (out.astype(jnp.float32) * ct.astype(jnp.float32)).sum()

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    row = dict(impl=impl, length=length, compile_s=compile_s, temp=mem.temp_size_in_bytes, total=total,
               peak=getattr(mem, "peak_memory_in_bytes", 0), time_ms=None, note="")
    if mem.temp_size_in_bytes > args.max_run_gib * GIB:
        row["note"] = f"not run: needs {mem.temp_size_in_bytes / GIB:.1f} GiB"
        return row
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    row["time_ms"] = 1e3 * statistics.median(times)
    return row


def fmt_bytes(n):
    return "-" if not n else f"{n / 2**20:,.1f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", nargs="+", default=["xla", "chunked"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block", type=int, default=None, help="chunked block_q = block_kv (default: the library's tiles, 64 x 128 on CPU)")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-run-gib", type=float, default=6.0, help="compile but do not run above this temp size")
    args = p.parse_args()

    print(f"backend={jax.default_backend()} batch={args.batch} heads={args.heads} kv_heads={args.kv_heads or args.heads} "
          f"head_dim={args.head_dim} dtype={args.dtype} causal={args.causal} block={args.block} runs={args.runs}")
    print(f"{'impl':8} {'length':>7} {'fwd+bwd ms':>11} {'temp':>12} {'args+out+temp':>14} {'peak*':>12} {'compile s':>10}  note")
    for length in args.lengths:
        for impl in args.impls:
            r = measure(impl, length, args)
            t = "-" if r["time_ms"] is None else f"{r['time_ms']:,.1f}"
            print(f"{impl:8} {length:7d} {t:>11} {fmt_bytes(r['temp']):>12} {fmt_bytes(r['total']):>14} "
                  f"{fmt_bytes(r['peak']):>12} {r['compile_s']:10.1f}  {r['note']}", flush=True)
    print("* peak_memory_in_bytes as the backend reports it (XLA:CPU's figure is not a true peak; use temp).")


if __name__ == "__main__":
    main()
