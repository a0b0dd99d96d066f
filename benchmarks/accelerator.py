"""One command for a GPU or TPU machine: the accelerator paths checked and timed, one table.

    python benchmarks/accelerator.py            # on one GPU or TPU chip; about 5 minutes
    python benchmarks/accelerator.py --quick    # tiny sizes, any backend (CPU: seconds)

Rows (one table, printed as they finish):
- attention: the platform's kernel (cuDNN on CUDA, Pallas splash on TPU, `chunked`
  elsewhere) against the `xla` einsum reference, causal bf16, forward + backward, at seq
  1k / 4k / 16k (batch 1, 8 heads, head_dim 128): the largest difference of the output and of
  dq/dk/dv relative to the reference's largest magnitude, and the median ms of each.
- train: tokens/s and MFU (model FLOPs of train/flops.py over the chip's published dense
  bf16 peak, train/hardware.py; on a machine not in that table, a measured matmul peak) of
  the bench model (6 x 512, seq 512) and of a ~1B llama-style model (llama-1b, seq 2048)
  at the first remat policy / batch of `LLAMA_CANDIDATES` whose compiled step fits in memory.
- decode: greedy tokens/s of `decode.generate` on the bench model in bf16 at batch 1/8/64
  (prompt 32, 128 new tokens), and beside each, where PyTorch sees the GPU (or with `--hf yes`),
  Hugging Face `generate` on the same weights (exported with `convert.save_hf`, loaded as a bf16
  `GPT2LMHeadModel` on the same device), with how many greedy tokens agree.

Measured on 2026-12-04 on one NVIDIA H200 (SXM, 141 GB; driver 580, CUDA 13), jax 0.11.2, flax
0.12.10, torch 2.11.0+cu130, transformers 5.17.0; one run of `python benchmarks/accelerator.py`,
130 s in all (attention 17 s, train 24 s, decode 75 s), medians of 5 calls:

| part | what | size | ours | reference / step | check |
|---|---|---|---|---|---|
| attention | cudnn vs xla, causal bf16 fwd+bwd | seq 1024 | 0.38 ms | xla 0.35 ms (0.92x) | max rel diff 5.4e-03 (out) ok |
| attention | cudnn vs xla, causal bf16 fwd+bwd | seq 4096 | 0.80 ms | xla 2.44 ms (3.03x) | max rel diff 5.4e-03 (out) ok |
| attention | cudnn vs xla, causal bf16 fwd+bwd | seq 16384 | 4.04 ms | xla 31.13 ms (7.71x) | max rel diff 5.4e-03 (out) ok |
| train | bench (6 x 512, bf16) | batch 8 x seq 512 | 452,549 tokens/s | 9.1 ms/step | MFU 10.7% of h200 published bf16 peak |
| train | llama-1b (bf16 compute, f32 params) | batch 8 x seq 2048, remat none | 51,502 tokens/s | 318.1 ms/step | MFU 42.8% of h200 published bf16 peak |
| decode | bench greedy, bf16 | batch 1, prompt 32 | 4,457 tokens/s | 0.22 ms/step; hf 3.19 ms/step (14.20x) | 128 new tokens, 127/128 equal to hf's |
| decode | bench greedy, bf16 | batch 8, prompt 32 | 36,998 tokens/s | 0.22 ms/step; hf 4.95 ms/step (22.91x) | 128 new tokens, 812/1024 equal to hf's |
| decode | bench greedy, bf16 | batch 64, prompt 32 | 195,201 tokens/s | 0.33 ms/step; hf 3.57 ms/step (10.90x) | 128 new tokens, 6317/8192 equal to hf's |

- The published peak is 989 TFLOP/s; a plain 8192^3 bf16 matmul measures ~790 on such a machine,
  so the ~1B model's 42.8% is ~54% of what a matmul reaches there.
- The bench model's step (9 ms) is too small to fill the chip; the ~1B model is the MFU figure.
- HF `generate` (eager PyTorch, SDPA attention, its dynamic cache) is bound by Python launching
  each layer's kernels: 3-5 ms a step at every batch size, where ours runs the whole loop on the
  device (`lax.while_loop`). Tokens: in bf16 a near-tie flips one argmax and the row goes its own
  way from there; 127 of 128 agree at batch 1.

Exit status 1 when a kernel disagrees with the reference beyond the bf16 tolerance
(`TOLERANCE`) or a part fails (its row says why), after printing the whole table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on any backend")
ARGS.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
ARGS.add_argument("--hf", choices=("auto", "yes", "no"), default="auto",
                  help="Hugging Face generate beside the decode rows (auto: where torch sees a CUDA GPU)")
args = ARGS.parse_args()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from transformer_jax import decode  # noqa: E402
from transformer_jax.layers.dot_product import dot_product_attention  # noqa: E402
from transformer_jax.layers.platform import backend  # noqa: E402
from transformer_jax.models import build_model, get_config  # noqa: E402
from transformer_jax.parallel import MeshConfig, get_rules, make_mesh  # noqa: E402
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch  # noqa: E402
from transformer_jax.train.hardware import chip_for_device_kind, measured_matmul_peak  # noqa: E402

TOLERANCE = 2e-2  # max |kernel - xla| / max |xla|, bf16 inputs, f32 accumulation in both
KERNEL = {"cuda": "cudnn", "tpu": "splash"}.get(backend(), "chunked")
ATTN_LENGTHS = (128, 256) if args.quick else (1024, 4096, 16384)
# (remat policy, batch) for llama-1b at seq 2048, best first: the first whose step fits is timed.
LLAMA_CANDIDATES = [("none", 8), ("dots_no_batch", 8), ("full", 8), ("full", 4)]
DECODE_BATCHES = (1, 2) if args.quick else (1, 8, 64)
ROWS: list[tuple[str, ...]] = []
FAILED: list[str] = []


def median_s(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def row(*cells):
    ROWS.append(tuple(str(c) for c in cells))
    print("| " + " | ".join(ROWS[-1]) + " |", flush=True)


# -- attention ---------------------------------------------------------------------------

def attention_rows():
    for length in ATTN_LENGTHS:
        shape = (1, length, 8, 128)
        q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))

        def fwd_bwd(impl):
            def loss(q, k, v):
                out = dot_product_attention(q, k, v, causal=True, implementation=impl)
                return jnp.sum(out.astype(jnp.float32) * v.astype(jnp.float32)), out  # a loss that uses every output
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

        fns = {impl: fwd_bwd(impl) for impl in (KERNEL, "xla")}
        got, want = fns[KERNEL](q, k, v), fns["xla"](q, k, v)
        names = ("out", "dq", "dk", "dv")
        errors = {}
        for name, a, b in zip(names, (got[1],) + got[0], (want[1],) + want[0]):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            errors[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
        worst = max(errors, key=errors.get)
        ok = errors[worst] <= TOLERANCE
        if not ok:
            FAILED.append(f"attention {KERNEL} at seq {length}: {worst} differs by {errors[worst]:.3g} of its max")
        ms = {impl: 1e3 * median_s(lambda f=f: f(q, k, v), args.repeats) for impl, f in fns.items()}
        row("attention", f"{KERNEL} vs xla, causal bf16 fwd+bwd", f"seq {length}", f"{ms[KERNEL]:.2f} ms",
            f"xla {ms['xla']:.2f} ms ({ms['xla'] / ms[KERNEL]:.2f}x)",
            f"max rel diff {errors[worst]:.1e} ({worst}) {'ok' if ok else 'MISMATCH'}")


# -- train step --------------------------------------------------------------------------

def peak_flops() -> tuple[float, str]:
    chip = chip_for_device_kind(jax.devices()[0].device_kind)
    if chip is not None:
        return chip.peak_flops, f"{chip.name} published bf16 peak"
    return measured_matmul_peak(dtype="bfloat16"), "measured bf16 matmul peak"


def train_setup(preset, seq, batch, remat, **overrides):
    cfg = get_config(preset, dtype="bfloat16", param_dtype="float32", remat=remat, max_len=max(seq, 64), **overrides)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    setup = make_train_setup(cfg, OptimizerConfig(learning_rate=1e-4, warmup_steps=0), TaskConfig(task="lm"), mesh,
                             get_rules("fsdp_tp"), total_steps=100)
    data = synthetic_batch("lm", batch, seq, cfg.vocab_size, fill=1.0)
    return setup, data


def fits(setup, data) -> bool:
    """The compiled step's arguments + temporaries fit in the device's memory (when it says)."""
    try:
        mem = setup.compiled_train_step(data).memory_analysis()
    except Exception as e:  # XLA refuses programs that do not fit  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return False
        raise
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    need = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return limit is None or need <= limit


def train_row(name, setup, data, peak, peak_name, note=""):
    box, placed = [setup.init_state()], jax.device_put(data, setup.batch_sharding)

    def step():
        box[0], metrics = setup.train_step(box[0], placed)
        return metrics
    s = median_s(step, args.repeats)
    tokens = data["inputs"].size
    mfu = setup.flops_per_step(data) / s / peak
    row("train", name, f"batch {data['inputs'].shape[0]} x seq {data['inputs'].shape[1]}{note}",
        f"{tokens / s:,.0f} tokens/s", f"{1e3 * s:.1f} ms/step", f"MFU {100 * mfu:.1f}% of {peak_name}")


def train_rows():
    peak, peak_name = peak_flops()
    if args.quick:
        setup, data = train_setup("gpt2-tiny", 64, 4, "none")
        train_row("gpt2-tiny", setup, data, peak, peak_name)
        setup, data = train_setup("llama-tiny", 64, 4, "full")
        train_row("llama-tiny", setup, data, peak, peak_name, ", remat full")
        return
    setup, data = train_setup("bench", 512, 8, "none")
    train_row("bench (6 x 512, bf16)", setup, data, peak, peak_name)
    for remat, batch in LLAMA_CANDIDATES:
        setup, data = train_setup("llama-1b", 2048, batch, remat)
        if fits(setup, data):
            train_row("llama-1b (bf16 compute, f32 params)", setup, data, peak, peak_name, f", remat {remat}")
            return
    row("train", "llama-1b", "no candidate fits", "", "", "")


# -- decode ------------------------------------------------------------------------------

def hf_on(device) -> bool:
    if args.hf != "auto":
        return args.hf == "yes"
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and device.platform == "gpu"


def hf_generate(cfg, params):
    """A `run(prompts, new) -> tokens [B, new]` of HF `generate` on our weights, bf16, on the GPU if any."""
    import torch
    from transformers import GenerationConfig, GPT2LMHeadModel

    from transformer_jax.convert import save_hf
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        save_hf(d, cfg, params, hf_config=dict(bos_token_id=None, eos_token_id=None))
        model = GPT2LMHeadModel.from_pretrained(d, dtype=torch.bfloat16).to(where).eval()

    def run(prompts, new):
        ids = torch.as_tensor(prompts, dtype=torch.long, device=where)
        gen = GenerationConfig(do_sample=False, max_new_tokens=new, pad_token_id=0, eos_token_id=None,
                               bos_token_id=None)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        return out[:, ids.shape[1]:].cpu().numpy()  # .cpu() waits for the device
    return run


def decode_rows():
    name = "gpt2-tiny" if args.quick else "bench"
    cfg = get_config(name, dtype="bfloat16", param_dtype="bfloat16", dropout_rate=0.0)
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"])
    hf = hf_generate(cfg, params) if hf_on(jax.devices()[0]) else None
    prompt, new = (8, 16) if args.quick else (32, 128)
    for b in DECODE_BATCHES:
        prompts = np.random.default_rng(b).integers(1, cfg.vocab_size, (b, prompt)).tolist()
        ours = decode.generate(model, params, prompts, max_new_tokens=new).tokens  # [B, new]
        s = median_s(lambda: decode.generate(model, params, prompts, max_new_tokens=new).tokens, args.repeats)
        reference = "-"
        if hf is not None:
            theirs = hf(prompts, new)
            hs = median_s(lambda: hf(prompts, new), args.repeats)
            reference = f"hf {1e3 * hs / new:.2f} ms/step ({hs / s:.2f}x)"
            check = f"{new} new tokens, {int((theirs == ours).sum())}/{theirs.size} equal to hf's"
        else:
            check = f"{new} new tokens"
        row("decode", f"{name} greedy, bf16", f"batch {b}, prompt {prompt}", f"{b * new / s:,.0f} tokens/s",
            f"{1e3 * s / new:.2f} ms/step; {reference}", check)


def part(name, rows):
    """Run one part of the table; a failure becomes a row (and exit status 1), not the end of the run."""
    start = time.perf_counter()
    try:
        rows()
    except Exception as e:  # noqa: BLE001 -- the table goes on; the traceback goes to stderr
        traceback.print_exc()
        FAILED.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        row(name, "FAILED", "", "", "", FAILED[-1][:200])
    print(f"# {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def main():
    import flax
    device = jax.devices()[0]
    print(f"# {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax {flax.__version__}, "
          f"attention kernel {KERNEL}, load average {os.getloadavg()[0]:.1f}\n")
    print("| part | what | size | ours | reference / step | check |")
    print("|---|---|---|---|---|---|", flush=True)
    part("attention", attention_rows)
    part("train", train_rows)
    part("decode", decode_rows)
    for line in FAILED:
        print(f"MISMATCH: {line}" if line.startswith("attention ") else f"FAILED: {line}", file=sys.stderr)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
