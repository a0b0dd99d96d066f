"""Greedy decoding throughput on the bench model of docs/architecture.md (decoder LM, 6 x 512, 8 heads, mlp
2048, vocab 32768, learned positions), with and without the KV cache, next to Hugging Face
`generate` on the same model as a PyTorch `GPT2LMHeadModel`, in the same process.

    .venv/bin/python benchmarks/decode.py                  # 256 new tokens, batch 1, 8 and 32, prompt 32
    .venv/bin/python benchmarks/decode.py --quick          # smoke run: gpt2-tiny, 16 tokens, seconds
    .venv/bin/python benchmarks/decode.py --batch 8 --no-cache-tokens 64   # shorter no-cache rows

Both libraries run the same random weights: the JAX model is initialised by the library,
exported with `convert.save_hf` and loaded with `GPT2LMHeadModel.from_pretrained`, so the
tokens can be compared. Prompts are random token ids, all `--prompt-len` long, and no EOS
is set, so every row generates exactly `--new-tokens` tokens.

Rows:
- jax, cache: `transformer_jax.decode.generate` (jitted prefill + `lax.while_loop`), timed as
  a caller sees it (host-side padding and cache set-up included).
- jax, no cache: one jitted `fori_loop` of full forward passes over a fixed [B, prompt + new]
  buffer, writing the argmax at the current position (the padding after it is never attended,
  the mask being causal). Every step costs a forward pass at the final length; as HF does
  (`logits_to_keep`), only the current position goes through the output layer.
- hf, cache / no cache: `model.generate(do_sample=False, use_cache=...)` under
  `torch.inference_mode()`, `torch.set_num_threads(<cores>)`; without the cache HF reruns the
  growing sequence, so its mean step is shorter than the jax no-cache step.

"first s" is the first call (JAX: trace + compile + run; HF: warm-up), then `--repeats` rounds
call every row of a batch size in turn (ours and HF's interleaved, so load changes hit both);
"median s" is the median of those calls, "CPU s" the median user + system CPU seconds of a call
over all threads (at most cores x median s), ms/step = median s / new tokens (a step = one
token in every row), tokens/s = batch x new tokens / median s, "x hf" = HF's median s / ours
for the same cache setting (> 1: ours is faster).

The second table (`--fill-batch`, default 8; e.g. `--batch "" --fill-batch 1,8,32` for it alone)
is the per-step time with a short and a long cache: prompts of 16 and of 272 tokens, each
followed by 16 new tokens (a 32- and a 288-slot cache). Each round times all four calls in turn
and gives ms/step = (t(16 new) - t(1 new)) / 15 per cache; the table shows medians [min-max]
over the rounds and the ratio 288/32 of the medians (per-round ratios in brackets). A KV cache
updated in place keeps the two close; what remains is reading the longer cache each step
(at batch 8, f32: 6 layers x K and V x 8 x 8 heads x 288 x 64 x 4 B = 57 MB vs 6.3 MB, next
to 144 MB of weights). The script asserts that JAX's greedy tokens with and
without the cache are equal and prints how far HF's tokens agree with them (same weights,
different kernels: a near-tie can flip one argmax and the rest follows).

Before the decode graph was unrolled (2026-11-29, stacked cache scanned as xs/ys, 256 tokens, a
quieter machine), jax cache ran 16.6 ms/step at batch 1 and 46.8 at batch 8 against HF's 16.7 and
30.8, and its step grew with the cache (28.6 ms over a 161-slot cache, 42-47 over 288 at batch 8).

Measured on 2026-12-02 on a quiet 2-core AMD EPYC (load average 1.1-1.9, nothing else running),
jax 0.10.2, torch 2.13.0+cpu (2 threads), transformers 5.24.0, bench model f32, prompt 32, one run,
medians of 3 interleaved calls, by `benchmarks/decode.py --new-tokens 64 --no-cache-tokens 2`:

| impl | cache | batch | new tokens | median s | CPU s | ms/step | tokens/s | x hf |
|---|---|---|---|---|---|---|---|---|
| jax | yes | 1 | 64 | 0.61 | 0.97 | 9.6 | 105 | 2.12 |
| hf | yes | 1 | 64 | 1.29 | 2.42 | 20.2 | 49 | 1.00 |
| jax | yes | 8 | 64 | 1.15 | 2.12 | 18.0 | 445 | 1.67 |
| hf | yes | 8 | 64 | 1.92 | 3.80 | 30.0 | 267 | 1.00 |
| jax | yes | 32 | 64 | 2.75 | 4.99 | 43.0 | 744 | 1.20 |
| hf | yes | 32 | 64 | 3.31 | 6.59 | 51.8 | 618 | 1.00 |

Greedy tokens: JAX with and without the cache and HF's are all equal (64 tokens x 1, 8, 32 rows).
Cache fill at batch 8 (prompt 16 or 272, then 16 tokens): jax 16.4 ms/step with a 32-slot cache,
20.1 with a 288-slot one (1.23x); hf 35.1 and 44.6 (1.27x).

The ratios depend on the CPU. On 2026-12-03, on a quiet 2-core Intel Xeon (avx512; load average
1.0), same versions, `benchmarks/decode.py --no-cache-tokens 2` (256 new tokens), where HF's
kernels run twice as fast at batch 1 as on the EPYC:

| batch | jax ms/step | hf ms/step | x hf |
|---|---|---|---|
| 1 | 11.9 | 9.9 | 0.83 |
| 8 | 24.3 | 33.3 | 1.37 |
| 32 | 47.5 | 51.4 | 1.08 |

(greedy tokens all equal); cache fill (`--batch "" --fill-batch 1,8,32 --repeats 5`): jax 1.22 /
1.29 / 2.56 at batch 1 / 8 / 32, hf 1.07 / 1.23 / 2.13.

On 2026-12-04, on a 2-core AMD EPYC (load average 1.5-1.9), same command (256 new tokens), the
same versions but transformers 5.25.0:

| batch | jax ms/step | hf ms/step | x hf |
|---|---|---|---|
| 1 | 8.0 | 17.9 | 2.23 |
| 8 | 19.2 | 32.9 | 1.72 |
| 32 | 40.6 | 62.0 | 1.52 |

(greedy tokens all equal); cache fill at batch 8: jax 14.4 ms/step with a 32-slot cache, 19.5 with
a 288-slot one (1.35, per round 1.23-1.62), hf 24.3 and 30.8 (1.27). The attention over the cache
alone (6 layers, q [8, 8, 1, 64] against K, V [8, 8, S, 64], jitted einsums) takes 0.5 ms per
step at S = 32 and 2.1 ms at S = 288; no copy of a cache buffer is left in the decode loop's HLO.

On 2026-12-05, on a 2-core AMD EPYC (load average 1.5), same versions, same command, after the tied
output layer's few-row dot was transposed on CPU (`platform.thin_table_logits`; before it, the same
day: x hf 2.10 / 1.70 / 1.37):

| batch | jax ms/step | hf ms/step | x hf |
|---|---|---|---|
| 1 | 7.3 | 15.4 | 2.12 |
| 8 | 14.1 | 27.9 | 1.98 |
| 32 | 34.2 | 53.2 | 1.55 |

(greedy tokens all equal); cache fill at batch 8: jax 10.6 ms/step with a 32-slot cache, 11.2 with a
288-slot one (1.05, per round 0.96-1.23), hf 22.7 and 29.1 (1.28). A second run (`--batch ""
--fill-batch 1,8,32 --repeats 7`) gave jax 11.3 and 13.9 (1.23, per round 0.96-1.81): per-round
ratios spread this wide on this machine, while the cost that remains, reading the longer cache
(57 MB against 6.3 at batch 8, f32), is fixed by memory bandwidth.

Later on 2026-12-05, on a quiet 2-core Intel Xeon (avx512; load average 0.9-1.7), same versions, same
command, after the 1-row output layer became the table's GEMV (XLA had fused the vector-matrix dot
with the final norm into an elementwise loop: 3.7 -> 2.3 ms a step) and greedy argmax took two
passes (block maxima, then the block); before them, the same day and machine: 10.1 / 16.3 / 43.3
ms/step against HF's 8.9 / 22.9 / 44.8 (x hf 0.89 / 1.41 / 1.04):

| batch | jax ms/step | hf ms/step | x hf |
|---|---|---|---|
| 1 | 8.5 | 9.1 | 1.07 |
| 8 | 16.9 | 25.0 | 1.47 |
| 32 | 40.5 | 45.7 | 1.13 |

(greedy tokens all equal); cache fill at batch 8: jax 11.9 ms/step with a 32-slot cache, 18.1 with a
288-slot one (1.52, per round 1.35-1.72), hf 17.9 and 28.6 (1.59). A profile of the batch-8 step over
288 slots (jax.profiler) puts every large op near this machine's bandwidth: the attention dots read
the cache at ~13 GB/s (4.3 ms a step), the weights' GEMMs at 10-16 GB/s. At batch 1 about 2 ms of
the 9.8 ms step over 288 slots were copies of the KV cache that XLA added when it fused a layer's
cache update twice (once for the carried cache, once for the attention dot that reads it through a
bitcast, which only a batch of 1 has). Since the token loop attends over the cache as it was plus
the new key and writes after (`step_attention.cached_step_attention`), no batch copies it: the batch-1
step over 288 slots went from 10.3-11.4 to 8.3 ms (two alternating runs, 5 calls each), batch 8
unchanged (13.6-16.6 ms against 14.5-15.3, three alternating runs). The same day, a busier hour
(load average 2.5-2.8), the default command gave x hf 1.30 / 1.21 / 1.00 at batch 1 / 8 / 32
(9.3 / 19.9 / 45.7 ms/step against HF's 12.0 / 24.1 / 45.8; tokens all equal).

On 2026-12-06, on the 2-core Intel Xeon (load average 1.1-1.7), same versions, same command, after
the KV cache grew with the tokens (`decode.cache_capacities`: here 128 slots, then 288, one token
loop each, instead of 288 slots from the first step); before it, the same morning (load 0.9-1.7):
7.1 / 16.7 / 41.1 ms/step against HF's 9.1 / 23.3 / 49.1 (x hf 1.28 / 1.39 / 1.20):

| batch | jax ms/step | hf ms/step | x hf |
|---|---|---|---|
| 1 | 6.5 | 8.6 | 1.33 |
| 8 | 16.4 | 25.3 | 1.55 |
| 32 | 37.6 | 44.2 | 1.18 |

(greedy tokens all equal); cache fill at batch 8 (one loop each, as before): jax 11.3 and 16.3
ms/step (1.43, per round 1.32-1.78), hf 15.7 and 25.8 (1.64). The two versions alternated, one
process each, prompt 32, medians of 5 calls of (t(256 new) - t(1 new)) / 255, two rounds (a busy
hour, same tokens): batch 8 20.9 / 19.0 -> 17.3 / 14.9 ms/step, batch 32 45.5 / 45.1 -> 42.8 /
34.5; the first call (compiling two loops instead of one) 7.6-8.4 -> 7.9-9.6 s at batch 8. Three
sizes (128, 256, 288) ran about as fast and compiled 3-4 s longer.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import resource
import tempfile
import time

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--preset", default="bench", help="a GPT-2-style model preset (models/config.py)")
ARGS.add_argument("--new-tokens", type=int, default=256)
ARGS.add_argument("--batch", default="1,8,32", help="comma list of batch sizes (\"\": only the cache-fill table)")
ARGS.add_argument("--prompt-len", type=int, default=32)
ARGS.add_argument("--repeats", type=int, default=3, help="timed calls after the first; the median is reported")
ARGS.add_argument("--fill-batch", default="8",
                  help="comma list of batch sizes of the cache-fill table (ms/step over a 32- and a 288-slot "
                       "cache; 0 or \"\" = skip)")
ARGS.add_argument("--no-cache-tokens", type=int, default=None,
                  help="new tokens for the no-cache rows (default: --new-tokens); shortens slow runs")
ARGS.add_argument("--skip-hf", action="store_true", help="JAX rows only")
ARGS.add_argument("--quick", action="store_true",
                  help="smoke run: gpt2-tiny, 16 new tokens, batch 1,2, prompt 8, one repeat")
args = ARGS.parse_args()
if args.quick:
    args.preset, args.new_tokens, args.batch, args.prompt_len, args.repeats = "gpt2-tiny", 16, "1,2", 8, 1
    args.fill_batch = "0"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from transformer_jax import decode  # noqa: E402
from transformer_jax.models import build_model, get_config  # noqa: E402
from transformer_jax.models.embedder import Embedder  # noqa: E402


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def run_interleaved(runners: dict, repeats: int) -> dict:
    """{name: (first-call s, median wall s, median CPU s, last result, wall s of each round)}. Each runner is called
    once (compile / warm-up), then `repeats` rounds call every runner in turn, so a change in
    the machine's load hits ours and HF's alike. Runners must block."""
    first, walls, cpus, out = {}, {k: [] for k in runners}, {k: [] for k in runners}, {}
    for name, fn in runners.items():
        t = time.perf_counter()
        out[name] = fn()
        first[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, fn in runners.items():
            t, c = time.perf_counter(), _cpu_s()
            out[name] = fn()
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(_cpu_s() - c)
    return {k: (first[k], float(np.median(walls[k])), float(np.median(cpus[k])), out[k], walls[k]) for k in runners}


# -- JAX ------------------------------------------------------------------------------------

def _logits_at(index):
    """An interceptor that feeds only position `index` of the hidden states to `Embedder.logits`."""
    def interceptor(next_fun, fargs, kwargs, context):
        if isinstance(context.module, Embedder) and context.method_name == "logits":
            fargs = (jax.lax.dynamic_slice_in_dim(fargs[0], index, 1, axis=1),) + tuple(fargs[1:])
        return next_fun(*fargs, **kwargs)
    return interceptor


@functools.partial(jax.jit, static_argnames=("model", "new_tokens"))
def greedy_no_cache(model, params, prompt_BP, *, new_tokens: int):
    """Greedy continuation [B, new_tokens] by full forward passes over a [B, P + new] buffer."""
    b, p = prompt_BP.shape
    buf_BT = jnp.zeros((b, p + new_tokens), jnp.int32).at[:, :p].set(prompt_BP)

    def step(i, buf_BT):
        with nn.intercept_methods(_logits_at(p + i - 1)):
            logits_B1V = model.apply({"params": params}, buf_BT)
        nxt_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf_BT, nxt_B[:, None], (0, p + i))

    return jax.lax.fori_loop(0, new_tokens, step, buf_BT)[:, p:]


def jax_runners(model, params, prompts, new_tokens, no_cache_tokens) -> dict:
    prompt_list, prompt = prompts.tolist(), jnp.asarray(prompts)
    return {
        ("jax", "yes", new_tokens): lambda: decode.generate(model, params, prompt_list,
                                                            max_new_tokens=new_tokens).tokens,
        ("jax", "no", no_cache_tokens): lambda: np.asarray(
            greedy_no_cache(model, params, prompt, new_tokens=no_cache_tokens)),
    }


# -- Hugging Face -----------------------------------------------------------------------------

def hf_model(cfg, params, directory):
    import torch
    from transformers import GPT2LMHeadModel

    from transformer_jax.convert import save_hf
    save_hf(directory, cfg, params, hf_config=dict(bos_token_id=None, eos_token_id=None))
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
    hc = model.config
    got = (hc.n_embd, hc.n_layer, hc.n_head, hc.n_inner, hc.vocab_size, hc.n_positions)
    want = (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.vocab_size, cfg.max_len)
    assert got == want, f"HF model dims {got} != {want}"
    return model


def hf_runners(model, prompts, new_tokens, no_cache_tokens) -> dict:
    import torch
    from transformers import GenerationConfig
    ids = torch.as_tensor(prompts, dtype=torch.long)

    def runner(cache, n):
        gen = GenerationConfig(do_sample=False, max_new_tokens=n, use_cache=cache, pad_token_id=0,
                               eos_token_id=None, bos_token_id=None)

        def run():
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen).numpy()
            assert out.shape == (len(prompts), prompts.shape[1] + n), out.shape
            return out[:, prompts.shape[1]:]
        return run
    return {("hf", "yes", new_tokens): runner(True, new_tokens), ("hf", "no", no_cache_tokens): runner(False, no_cache_tokens)}


def fill_rows(model, params, hf, b):
    """ms per decode step at batch `b` with a 32-slot and a 288-slot cache (prompt 16 or 272,
    then 16 new tokens): (t(16 new) - t(1 new)) / 15 within one round, which takes out the
    prefill. [(impl, ms/step of each round with 32 slots, the same with 288 slots)]."""
    runners = {}
    for p in (16, 272):
        prompts = np.random.default_rng(p).integers(1, model.config.vocab_size, (b, p)).astype(np.int32)
        for n in (1, 16):
            runners[("jax", p, n)] = functools.partial(decode.generate, model, params, prompts.tolist(),
                                                       max_new_tokens=n)
            if hf is not None:
                runners[("hf", p, n)] = hf_runners(hf, prompts, n, n)[("hf", "yes", n)]
    res = run_interleaved(runners, args.repeats)
    def per_step(impl, p):
        return np.array([1e3 * (t16 - t1) / 15 for t16, t1 in zip(res[(impl, p, 16)][4], res[(impl, p, 1)][4])])
    return [(impl, per_step(impl, 16), per_step(impl, 272)) for impl in (("jax", "hf") if hf is not None else ("jax",))]


# -- report ---------------------------------------------------------------------------------

def agreement(a, b) -> str:
    """'equal', or the first position where a row differs (min over rows) and how many rows differ."""
    n = min(a.shape[1], b.shape[1])
    diff = a[:, :n] != b[:, :n]
    if not diff.any():
        return f"equal ({n} tokens x {a.shape[0]} rows)"
    first = [int(np.argmax(d)) for d in diff if d.any()]
    return f"{len(first)}/{a.shape[0]} rows differ, first at token {min(first)} of {n}"


def machine_info() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, jax {jax.__version__} "
            f"({jax.default_backend()}), load average {os.getloadavg()[0]:.1f}")
    if not args.skip_hf:
        import torch
        import transformers
        info += (f", torch {torch.__version__} ({torch.get_num_threads()} threads), "
                 f"transformers {transformers.__version__}")
    return info


def main():
    cfg = get_config(args.preset, dropout_rate=0.0)
    if args.prompt_len + args.new_tokens > cfg.max_len:
        raise SystemExit(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds "
                         f"max_len={cfg.max_len} of preset {args.preset}; shorten one of them")
    no_cache_tokens = args.no_cache_tokens or args.new_tokens
    if not 1 <= no_cache_tokens <= args.new_tokens:
        raise SystemExit(f"--no-cache-tokens {no_cache_tokens} must be in [1, --new-tokens={args.new_tokens}]")
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    hf = None
    if not args.skip_hf:
        import torch
        torch.set_num_threads(os.cpu_count())
        with tempfile.TemporaryDirectory() as d:
            hf = hf_model(cfg, params, d)
    print(f"# decode benchmark: {args.preset} ({cfg.num_layers} x {cfg.d_model}, {cfg.num_heads} heads, "
          f"mlp {cfg.d_ff}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params, {cfg.dtype}), greedy, "
          f"prompt {args.prompt_len}")
    print(f"# {machine_info()}\n", flush=True)
    batches = [int(x) for x in args.batch.split(",") if x.strip()]
    if batches:
        print("| impl | cache | batch | prompt | new tokens | first s | median s | CPU s | ms/step | tokens/s | x hf |")
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    notes = []
    for b in batches:
        prompts = np.random.default_rng(b).integers(1, cfg.vocab_size, (b, args.prompt_len)).astype(np.int32)
        runners = jax_runners(model, params, prompts, args.new_tokens, no_cache_tokens)
        if hf is not None:
            runners.update(hf_runners(hf, prompts, args.new_tokens, no_cache_tokens))
        res = run_interleaved(runners, args.repeats)
        for (impl, cache, n), (first, wall, cpu, *_) in res.items():
            hf_wall = res.get(("hf", cache, n), (0, 0))[1]
            ratio = f"{hf_wall / wall:.2f}" if hf_wall else ""
            print(f"| {impl} | {cache} | {b} | {args.prompt_len} | {n} | {first:.2f} | {wall:.2f} | {cpu:.2f} | "
                  f"{1e3 * wall / n:.1f} | {b * n / wall:,.0f} | {ratio} |", flush=True)
        tokens = {f"{impl} {'cache' if cache == 'yes' else 'no cache'}": r[3] for (impl, cache, _), r in res.items()}
        ref = tokens["jax cache"]
        same = agreement(ref, tokens["jax no cache"])
        assert same.startswith("equal"), f"batch {b}: jax greedy with and without the cache disagree: {same}"
        notes.append(f"batch {b}: jax cache vs jax no cache: {same}")
        for name in ("hf cache", "hf no cache"):
            if name in tokens:
                notes.append(f"batch {b}: jax cache vs {name}: {agreement(ref, tokens[name])}")
    fill = [int(x) for x in args.fill_batch.split(",") if x.strip() and int(x)]
    if fill:
        print(f"\nCache fill: ms/step with a 32- and a 288-slot cache, median [min-max] of {args.repeats} rounds; "
              "ratio = median 288 / median 32 (per-round ratios in brackets); goal <= 1.2 at batch 8")
        print("\n| impl | batch | ms/step, 32-slot cache | ms/step, 288-slot cache | ratio 288/32 |")
        print("|---|---|---|---|---|")
        for fb in fill:
            for impl, short, long in fill_rows(model, params, hf, fb):
                r = long / short
                print(f"| {impl} | {fb} | {np.median(short):.1f} [{short.min():.1f}-{short.max():.1f}] | "
                      f"{np.median(long):.1f} [{long.min():.1f}-{long.max():.1f}] | "
                      f"**{np.median(long) / np.median(short):.2f}** [{r.min():.2f}-{r.max():.2f}] |", flush=True)
    print("\n" + "\n".join(notes))
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
