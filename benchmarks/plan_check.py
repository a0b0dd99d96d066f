"""`plan --chip cpu`'s predicted step time against the measured one: 3 configs x 3 meshes
(1 device; 2 fake CPU devices, one per core of a 2-core machine; 8 fake devices), one table.

    python benchmarks/plan_check.py                 # all three meshes, each in its own process (~6 min quiet)
    python benchmarks/plan_check.py --devices 2     # one mesh, in this process

For each config the train step is compiled once; `plan`'s figures are read from that
executable (transformer_jax/plan.py) and the step is run on real arrays. Rounds alternate one
timed step with one round of plan_cpu.py's timings of the step's parts (its matmuls alone,
the memory-bound ops by kind and size, its collectives), so that both see the same load; the
table gives medians over the rounds. error = predicted / measured - 1.

Measured alone on a 2-core Xeon (2026-12-03, `python benchmarks/plan_check.py`, 6:13 wall):

| config | 1 device | 2 devices | 8 devices |
|---|---:|---:|---:|
| gpt2 d256 x4, dp | +16% | -8% | -6% |
| llama d256 x4, fsdp | +21% | -19% | -27% |
| gpt2 d512 x2 remat full, tp | -0% | -1% | -12% |

On a quiet 2-core AMD EPYC (2026-12-04, same command, ~4.5 min wall), every cell within 25%:

| config | 1 device | 2 devices | 8 devices |
|---|---:|---:|---:|
| gpt2 d256 x4, dp | +13% | +2% | -11% |
| llama d256 x4, fsdp | +3% | -3% | -24% |
| gpt2 d512 x2 remat full, tp | +10% | -3% | -10% |

On the Xeon, the same 1-device step measures 811-902 ms from one run to the next: about +-10% of each
figure is this host's noise. 1 and 2 devices are what the model is for: each device has its
own core, as each chip has its own compute. 8 fake devices on 2 cores time-share them, and
the step then pays what no chip does and nothing here models: XLA:CPU sizes its thread pool
at max(cores, devices), so 8 threads take turns on 2 cores (the same 1-device program runs
1.006 s in an 8-device process, 0.753 s in a 1-device one); the cores are ~10% idle at the
collectives' rendezvous (1.8 of 2 cores busy, `os.times()` around a step); and the kernel
takes 0.15-0.45 CPU-s per step zeroing fresh pages and switching threads. Per op, the llama
fsdp step's memory-bound ops on 8 devices take 0.9-1.0x their predicted time (elementwise,
transpose, reduce; a `jax.profiler` trace against each op's prediction), and its matmuls
what `compute` predicts (`perf record`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # name: (overrides, (preset, mesh axis) of the many-device mesh)
    "gpt2 d256 x4, f32": (["model.vocab_size=8192", "model.d_model=256", "model.num_heads=4", "model.d_ff=1024",
                           "model.num_layers=4", "train.global_batch_size=8"], ("dp", "data")),
    "llama d256 x4, f32": (["model.vocab_size=8192", "model.d_model=256", "model.num_heads=8", "model.num_kv_heads=2",
                            "model.d_ff=768", "model.num_layers=4", "model.norm=rmsnorm", "model.activation=swiglu",
                            "model.position=rope", "model.tie_embeddings=false", "train.global_batch_size=8"],
                           ("fsdp", "fsdp")),
    "gpt2 d512 x2 remat full, f32": (["model.vocab_size=4096", "model.d_model=512", "model.num_heads=8",
                                      "model.d_ff=2048", "model.num_layers=2", "model.remat=full",
                                      "train.global_batch_size=8"], ("tp", "tensor")),
}
COMMON = ["data.tokenizer=byte", "model.max_len=256", "train.seq_len=256", "model.dtype=float32"]


def run(devices: int, rounds: int) -> list[dict]:
    import jax
    from transformer_jax.experiment import load_experiment
    from transformer_jax.plan import measure, predict, train_setup
    from transformer_jax.plan_cpu import Calibration
    from transformer_jax.train import synthetic_batch
    from transformer_jax.train.hardware import get_chip

    rows = []
    for name, (over, (preset, axis)) in CONFIGS.items():
        mesh = [f"mesh.preset={preset}", f"mesh.{axis}={devices}"] if devices > 1 else []
        cfg = load_experiment("tiny", COMMON + over + mesh)
        setup = train_setup(cfg, devices)
        t = cfg.train
        host = synthetic_batch(cfg.task.task, t.global_batch_size, t.seq_len, cfg.model.vocab_size)
        batch = jax.device_put(host, setup.batch_sharding)
        m = measure(cfg, devices, setup=setup)  # compiles the executable the step runs
        step = setup.compiled_train_step(batch)
        state = setup.init_state()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        cal = Calibration(m, devices)
        times = []
        for _ in range(rounds):
            state, metrics = step(state, batch)  # untimed: the first step after the timings runs slow
            jax.block_until_ready(metrics)
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
            cal.sample()
        m["cpu"] = cal.predict()
        p = predict(m, get_chip("cpu", devices), devices, t.global_batch_size * t.seq_len)
        measured = statistics.median(times)
        rows.append(dict(config=name, mesh=m["mesh"], preset=m["preset"], devices=devices, measured_s=measured,
                         predicted_s=p["step_s"], compute_s=p["compute_s"], memory_s=p["memory_s"],
                         comm_s=p["comm_exposed_s"], mfu=p["mfu"], calibration=m["cpu"]["calibration"]))
        del state
    return rows


def table(rows: list[dict]) -> str:
    out = ["| config | mesh | measured ms | predicted ms | compute | memory | comm | error | MFU pred. "
           "| matmul GFLOP/s | op us | GB/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["calibration"]
        mesh = "1 device" if r["devices"] == 1 else f"{r['devices']} devices, {r['preset']}"
        out.append(f"| {r['config']} | {mesh} | {1e3 * r['measured_s']:.0f} | {1e3 * r['predicted_s']:.0f} | "
                   f"{1e3 * r['compute_s']:.0f} | {1e3 * r['memory_s']:.0f} | {1e3 * r['comm_s']:.0f} | "
                   f"{100 * (r['predicted_s'] / r['measured_s'] - 1):+.0f}% | {100 * r['mfu']:.1f}% | "
                   f"{c['matmul_flops_per_s'] / 1e9:.0f} | {1e6 * c['op_s']:.1f} | {c['bandwidth'] / 1e9:.1f} |")
    return "\n".join(out)


def main() -> int:
    from transformer_jax import hugepages
    hugepages.relaunch([__file__, *sys.argv[1:]])  # as `transformer-jax plan` runs (hugepages.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, help="one mesh size, in this process (default: 1, 2 and 8, one process each)")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps (each followed by a round of part timings)")
    ap.add_argument("--json", help=argparse.SUPPRESS)  # the child's rows go here
    args = ap.parse_args()
    if args.devices:
        import jax
        jax.config.update("jax_num_cpu_devices", args.devices)
        rows = run(args.devices, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f)
        else:
            print(table(rows))
        return 0
    rows = []
    for n in (1, 2, 8):
        path = f"/tmp/plan_check_{os.getpid()}_{n}.json"
        subprocess.run([sys.executable, __file__, "--devices", str(n), "--rounds", str(args.rounds), "--json", path],
                       check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        with open(path) as f:
            rows += json.load(f)
        os.remove(path)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
