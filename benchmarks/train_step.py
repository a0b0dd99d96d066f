"""Train-step benchmark on the bench model of docs/architecture.md (decoder LM, 6 x 512, 8 heads, mlp 2048,
vocab 32768, seq 512, global batch 8 = 4,096 tokens, 953.5 GFLOP/step).

    .venv/bin/python benchmarks/train_step.py                           # peak + step table, one device (~10 min)
    .venv/bin/python benchmarks/train_step.py --only breakdown          # where the step's time goes
    .venv/bin/python benchmarks/train_step.py --only profile            # op time by model part (jax.profiler)
    .venv/bin/python benchmarks/train_step.py --only compile            # 6 / 24 layers, scan or not
    .venv/bin/python benchmarks/train_step.py --only presets --devices 8   # 8 fake devices

Sections print markdown tables. The machine is shared: the step table times its variants
round-robin (one step of each in turn, after a warm-up round) and reports the fastest and
the median step plus the CPU seconds a step consumed (user + system, what other load
changes least); tokens/s and % of peak use the fastest step. The matmul peak is measured
in the same process, before and after. Throughput counts every position (4,096
tokens/step); model FLOPs follow train/flops.py.

The peer table (plain Flax, HF GPT-2 torch eager / torch.compile, this library through its
public API, f32 and bf16) comes from the peer bench kept next to the project, in one run on a
quiet machine, from the project root:

    PY=$PWD/.venv/bin/python
    JAX_PY=$PY TORCH_PY=$PY FLAX_ALSO_PY="" ONLY="peak flax torch" \
      BENCH_EXTRA="$PY ../shared/bench/transformer_jax_bench.py" bash ../shared/bench/run_peers.sh

CPU findings (jax 0.10.2, 2-core Xeon with AVX512-BF16, heavily loaded, CPU s/step of interleaved
steps): see docs/architecture.md, Performance.
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--only", default="peak,step", help="comma list: peak,step,breakdown,profile,compile,presets")
ARGS.add_argument("--devices", type=int, default=1, help="fake CPU devices (8 for presets)")
ARGS.add_argument("--steps", type=int, default=3, help="timed steps per row")
ARGS.add_argument("--variants", default="f32,f32-unrolled,f32-whole-logits,bf16,bf16-plain-dots,flax-f32,flax-bf16",
                  help="rows of the step table (see VARIANTS)")
args = ARGS.parse_args()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", args.devices)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from transformer_jax.models import get_config  # noqa: E402
from transformer_jax.parallel import MeshConfig, get_rules, make_mesh  # noqa: E402
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch  # noqa: E402
from transformer_jax.train.flops import train_flops  # noqa: E402

B, L, V = 8, 512, 32768
BATCH = synthetic_batch("lm", B, L, V, fill=1.0)
FLOPS = train_flops(get_config("bench"), "lm", BATCH)
OPTIM = OptimizerConfig(learning_rate=3e-4, warmup_steps=10)
PEAK: dict[str, float] = {}


def timed(fn, n: int) -> tuple[float, list[float]]:
    """(median seconds, all) of n calls after one warm-up; fn must block."""
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def section(title: str):
    load = os.getloadavg()[0]
    print(f"\n## {title}  (load average {load:.1f} on {os.cpu_count()} cores)\n", flush=True)


# -- matmul peak ---------------------------------------------------------------------------

def peak():
    section("jitted matmul peak, 2048^3")
    print("| inputs -> accumulate/output | GFLOP/s |\n|---|---|")
    n = 2048
    x = np.random.default_rng(0).standard_normal((n, n), np.float32)
    for name, dt, acc in [("f32", jnp.float32, jnp.float32), ("bf16-f32acc", jnp.bfloat16, jnp.float32),
                          ("bf16", jnp.bfloat16, jnp.bfloat16)]:
        a = jnp.asarray(x, dt)
        f = jax.jit(lambda a, b, acc=acc: jax.lax.dot(a, b, preferred_element_type=acc))
        med, _ = timed(lambda: f(a, a).block_until_ready(), 5)
        PEAK[name] = 2 * n ** 3 / med
        print(f"| {name} | {PEAK[name] / 1e9:.0f} |", flush=True)


# -- our step on one device ------------------------------------------------------------------

def _plain_bf16_dots(enable: bool):
    """Variant: bf16 x bf16 -> bf16 dots (no f32 accumulation request) in Dense and the tied logits."""
    from transformer_jax.layers import dense, embeddings
    if not hasattr(dense, "_original_matmul"):
        dense._original_matmul = dense.matmul

    def plain(x, w, n_contract, dtype):
        x, w = x.astype(dtype), w.astype(dtype)
        dims = (tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract)))
        return jax.lax.dot_general(x, w, (dims, ((), ())))

    fn = plain if enable else dense._original_matmul
    dense.matmul = fn
    if hasattr(embeddings, "matmul"):
        embeddings.matmul = fn


VARIANTS = {  # name -> (model overrides, task overrides, dots)
    # dots: None as the library picks, "plain" bf16 x bf16 -> bf16, or a layers.platform.cpu_dots kind
    "f32": (dict(), dict(), None),
    "f32-whole-logits": (dict(), dict(loss_chunk=0), None),
    "f32-chunk-512": (dict(), dict(loss_chunk=512), None),
    "f32-chunk-2048": (dict(), dict(loss_chunk=2048), None),
    "f32-unrolled": (dict(scan_layers=False), dict(), None),
    "f32-remat-dots": (dict(remat="dots"), dict(), None),
    "f32-remat-full": (dict(remat="full"), dict(), None),
    "f32-attn-xla": (dict(attention="xla"), dict(), None),
    "bf16": (dict(dtype="bfloat16"), dict(), None),
    "bf16-attn-xla": (dict(dtype="bfloat16", attention="xla"), dict(), None),
    "bf16-whole-logits": (dict(dtype="bfloat16"), dict(loss_chunk=0), None),
    "bf16-chunk-2048": (dict(dtype="bfloat16"), dict(loss_chunk=2048), None),
    "bf16-chunk-4096": (dict(dtype="bfloat16"), dict(loss_chunk=4096), None),
    "bf16-unrolled": (dict(dtype="bfloat16", scan_layers=False), dict(), None),
    "bf16-plain-dots": (dict(dtype="bfloat16"), dict(), "plain"),
    "bf16-upcast-dots": (dict(dtype="bfloat16"), dict(), "f32"),
    "bf16-bf16-dots": (dict(dtype="bfloat16"), dict(), "bf16"),
}


def one_device_setup(layers=6, mesh=None, preset="fsdp_tp", task=None, **overrides):
    cfg = get_config("bench", num_layers=layers, **overrides)
    mesh = mesh or make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return make_train_setup(cfg, OPTIM, TaskConfig(task="lm", **(task or {})), mesh, get_rules(preset),
                            total_steps=1000)


def run_steps(setup, n):
    state = setup.init_state()
    batch = jax.device_put(BATCH, setup.batch_sharding)
    box = [state]

    def step():
        box[0], m = setup.train_step(box[0], batch)
        jax.block_until_ready(m)
    med, ts = timed(step, n)
    return med, ts


def _our_runner(name):
    """(compile seconds, one blocking step, peak name) for a VARIANTS row."""
    from transformer_jax.layers.platform import cpu_dots
    overrides, task, dots = VARIANTS[name]
    _plain_bf16_dots(dots == "plain")
    setup = one_device_setup(task=task, **overrides)
    t = time.perf_counter()
    with cpu_dots(dots if dots in ("f32", "bf16") else "auto"):
        setup.compiled_train_step(BATCH)  # traced with the variant's matmul: the executable keeps it
    compile_s = time.perf_counter() - t
    _plain_bf16_dots(False)
    box, batch = [setup.init_state()], jax.device_put(BATCH, setup.batch_sharding)

    def step():
        box[0], m = setup.train_step(box[0], batch)
        jax.block_until_ready(m)
    return compile_s, step, "f32" if name.startswith("f32") else ("bf16" if dots == "plain" else "bf16-f32acc")


def step_table():
    """Variants are compiled first, then timed round-robin (one step of each in turn), so a
    change of load on the shared machine hits every row alike."""
    section("train step, one device (bench model, AdamW, f32 params)")
    names = args.variants.split(",")
    runners = {n: (_flax_runner(n) if n.startswith("flax") else _our_runner(n)) for n in names}
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for i in range(args.steps + 1):
        for name, (_, step, _) in runners.items():
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            if i:  # the first round is the warm-up
                times[name].append(time.perf_counter() - t)
                cpu[name].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    print("| variant | compile s | step s: min / median | CPU s/step | tokens/s (min) | model GFLOP/s (min) "
          "| % of its matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        compile_s, _, peak_name = runners[name]
        best, med = min(times[name]), statistics.median(times[name])
        pct = f"{100 * FLOPS / best / PEAK[peak_name]:.0f}% ({peak_name})" if peak_name in PEAK else "-"
        print(f"| {name} | {compile_s:.0f} | {best:.2f} / {med:.2f} | {statistics.median(cpu[name]):.1f} | "
              f"{B * L / best:,.0f} | {FLOPS / best / 1e9:.0f} | {pct} |", flush=True)


def breakdown():
    """Times sub-programs of the f32 step: forward, forward+backward, whole step, and the
    output layer + loss alone (hidden -> logits -> cross-entropy, forward+backward)."""
    from transformer_jax.train.losses import cross_entropy_sums, forward
    section("where the f32 step's time goes (one device)")
    setup = one_device_setup(scan_layers=False)
    state = setup.init_state()
    batch = jax.device_put(BATCH, setup.batch_sharding)

    def loss(p, b):
        return cross_entropy_sums(*forward(setup.model, p, b, "lm"))["loss"]

    emb = state.params["embedder"]["token"]["embedding"]
    h = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, 512)), jnp.float32)

    def head(e, h):
        return cross_entropy_sums(jnp.einsum("bld,vd->blv", h, e), batch["targets"], batch["weights"])["loss"]

    with setup.context():
        progs = {
            "forward (loss)": (jax.jit(loss), (state.params, batch), FLOPS / 3),
            "forward + backward": (jax.jit(jax.grad(loss)), (state.params, batch), FLOPS),
            "output layer + loss, fwd+bwd": (jax.jit(jax.grad(head, argnums=(0, 1))), (emb, h), 6 * B * L * 512 * V),
        }
        print("| program | median s | model GFLOP | GFLOP/s |\n|---|---|---|---|")
        for name, (f, a, flops) in progs.items():
            med, _ = timed(lambda: jax.block_until_ready(f(*a)), args.steps)
            print(f"| {name} | {med:.2f} | {flops / 1e9:.0f} | {flops / med / 1e9:.0f} |", flush=True)
    med, _ = run_steps(setup, args.steps)
    print(f"| whole train step | {med:.2f} | {FLOPS / 1e9:.0f} | {FLOPS / med / 1e9:.0f} |", flush=True)


def _scope(op_name: str) -> str:
    """Which part of the model an HLO op's op_name metadata comes from."""
    if "jvp()/while" in op_name or any(k in op_name for k in ("bcv", "bcd", "_run.<locals>")):  # the fused loss scan
        return "output layer + loss"
    if "self_attention/" in op_name:
        proj = any(f"self_attention/{p}/" in op_name for p in ("query", "key", "value", "out")) or op_name.endswith(
            "self_attention/dot_general")  # q, k, v projected by one matmul over their joined kernels
        return "attention projections" if proj else "attention scores/softmax"
    for key, name in (("/mlp/", "mlp"), ("norm", "norms"), ("mbedder", "embeddings"), ("layers", "layer stack")):
        if key in op_name:
            return name
    return "optimizer + rest"


def profile():
    """jax.profiler trace of 2 steps of the default variants; op time per (part, dots or not).
    Times are the sum over XLA's threads of each op's span: on a loaded host a descheduled thread
    inflates the op it is in, so read shares, not seconds."""
    import collections
    import glob
    import re
    import tempfile
    for name in ("f32", "bf16"):
        section(f"where the {name} step's op time goes (jax.profiler, one device)")
        overrides, task, _ = VARIANTS[name]
        setup = one_device_setup(task=task, **overrides)
        text = setup.compiled_train_step(BATCH).as_text()
        op = {m[0]: m[1] for m in re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', text)}
        calls = dict(re.findall(r"%([\w.\-]+) = [^\n]*calls=%([\w.\-]+)", text))
        bodies = dict(re.findall(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S | re.M))
        has_dot = {h: bool(re.search(r"\bdot\(", b)) for h, b in bodies.items()}
        for ev, callee in calls.items():  # a fusion without metadata: its body's last op_name
            op.setdefault(ev, (re.findall(r'op_name="([^"]*)"', bodies.get(callee, "")) or [""])[-1])
        run_steps(setup, 1)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                run_steps(setup, 1)  # a warm-up step and a timed one
            data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
            spans = collections.Counter()
            for plane in data.planes:
                for line in plane.lines:
                    if line.name.startswith("tf_XLAEigen"):
                        for ev in line.events:
                            spans[ev.name] += ev.duration_ns / 2e9
        parts = collections.Counter()
        for ev, t in spans.items():
            if ev in op or ev in calls:
                kind = "dots" if has_dot.get(calls.get(ev, ""), False) or ev.startswith("dot") else "other ops"
                part = _scope(op.get(ev, ""))
                if part == "optimizer + rest" and f",{V}]" in bodies.get(calls.get(ev, ""), ""):
                    part = "output layer + loss"  # the fused loss's dots carry no op_name; they read [.., V]
                parts[(part, kind)] += t
        total = sum(parts.values())
        print("| part | kind | op s/step (summed over threads) | share |\n|---|---|---|---|")
        for (part, kind), t in parts.most_common():
            print(f"| {part} | {kind} | {t:.2f} | {100 * t / total:.0f}% |", flush=True)


def compile_table():
    section("compile time of the f32 train step (lower + XLA compile)")
    print("| layers | scan | compile s |\n|---|---|---|")
    for layers in (6, 24):
        for scan in (True, False):
            setup = one_device_setup(layers=layers, scan_layers=scan)
            t = time.perf_counter()
            setup.compiled_train_step(BATCH)
            print(f"| {layers} | {scan} | {time.perf_counter() - t:.0f} |", flush=True)


# -- presets on 8 fake devices ----------------------------------------------------------------

PRESET_MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (1, 1, 8), "dp_tp": (4, 1, 2), "fsdp_tp": (2, 2, 2)}
def presets():
    """Every preset compiled first, then timed round-robin with the one-device step (one step of
    each in turn), so a change of load on the shared machine hits every row alike."""
    if jax.device_count() < 8:
        sys.exit("presets needs --devices 8")
    from transformer_jax.collectives import compare, measured_bytes
    from transformer_jax.hlo_analysis import analyze_hlo
    section("presets on 8 fake CPU devices (bench model, f32; collective MiB per device per step, "
            "loop trip counts applied: measured / textbook; step: median, timed round-robin)")
    print("| preset | mesh | compile s | step s | vs 1 device | per-device MiB (args+temp) | "
          "all-gather | reduce-scatter | all-reduce |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = one_device_setup(scan_layers=False)
    base.compiled_train_step(BATCH)
    rows, steps = {}, {"one device": _stepper(base)}
    for preset, shape in PRESET_MESHES.items():
        mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2], preset=preset))
        setup = one_device_setup(mesh=mesh, preset=preset, scan_layers=False)
        t = time.perf_counter()
        compiled = setup.compiled_train_step(BATCH)
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        per_dev = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes) / 2**20
        got = {k: (g, w) for k, g, w, _ in compare(setup, BATCH, measured_bytes(analyze_hlo(compiled.as_text(), 8)))}
        cells = " | ".join(f"{got[k][0] / 2**20:.0f} / {got[k][1] / 2**20:.0f}" if k in got else "-"
                           for k in ("all-gather", "reduce-scatter", "all-reduce"))
        rows[preset] = (shape, compile_s, per_dev, cells)
        steps[preset] = _stepper(setup)
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up round
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    t1 = statistics.median(times["one device"])
    print(f"| one device | 1 | - | {t1:.2f} | 1.00 | - | - | - | - |")
    for preset, (shape, compile_s, per_dev, cells) in rows.items():
        med = statistics.median(times[preset])
        print(f"| {preset} | {shape} | {compile_s:.0f} | {med:.2f} | {med / t1:.2f} | {per_dev:.0f} | {cells} |",
              flush=True)


def _stepper(setup):
    """One blocking train step of `setup` on the bench batch (its state carried along)."""
    box, batch = [setup.init_state()], jax.device_put(BATCH, setup.batch_sharding)

    def step():
        box[0], m = setup.train_step(box[0], batch)
        jax.block_until_ready(m)
    return step


# -- plain Flax linen, as the Flax docs write it (same model, same machine) --------------------

def _flax_runner(name):
    """The bench model as the Flax docs write it: nn.MultiHeadDotProductAttention with a causal
    mask, whole logits, optax.adamw, jit. "flax-f32" or "flax-bf16" (compute dtype)."""
    import flax.linen as nn
    import optax
    dtype = jnp.bfloat16 if name.endswith("bf16") else jnp.float32

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.LayerNorm(dtype=dtype)(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=8, dtype=dtype)(h, h, mask=mask)
            h = nn.Dense(2048, dtype=dtype)(nn.LayerNorm(dtype=dtype)(x))
            return x + nn.Dense(512, dtype=dtype)(nn.gelu(h))

    class GPT(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(V, 512, dtype=dtype)
            x = embed(tokens) + nn.Embed(L, 512, dtype=dtype)(jnp.arange(tokens.shape[1]))
            mask = nn.make_causal_mask(tokens)
            for _ in range(6):
                x = Block()(x, mask)
            return embed.attend(nn.LayerNorm(dtype=dtype)(x)).astype(jnp.float32)

    model, tx = GPT(), optax.adamw(3e-4)
    tokens, targets = jnp.asarray(BATCH["inputs"]), jnp.asarray(BATCH["targets"])
    params = jax.jit(model.init)(jax.random.key(0), tokens)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens, targets):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, tokens), targets).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    box = [params, tx.init(params)]
    t = time.perf_counter()
    compiled = train_step.lower(*box, tokens, targets).compile()
    compile_s = time.perf_counter() - t

    def step():
        box[0], box[1], loss = compiled(box[0], box[1], tokens, targets)
        loss.block_until_ready()
    return compile_s, step, "f32" if dtype == jnp.float32 else "bf16-f32acc"


if __name__ == "__main__":
    print(f"# transformer_jax train-step benchmark: jax {jax.__version__}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), bench model {FLOPS / 1e9:.1f} GFLOP/step")
    for part in args.only.split(","):
        {"peak": peak, "step": step_table, "breakdown": breakdown, "profile": profile, "compile": compile_table,
         "presets": presets}[part]()
    if "peak" in args.only.split(",") and args.only != "peak":
        peak()  # again at the end: how much the machine's speed moved during the run
