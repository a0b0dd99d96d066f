"""What the multi-host stop check costs per step: 2 processes (gloo on CPU) train the bench
model (DESIGN.md: decoder LM 6 x 512, vocab 32768, seq 512, global batch 8) on a data=2 mesh
and time blocks of steps, round-robin, with no stop check, with `StopControl.check()` (one
all-gather of 2 ints per process) at every log boundary as the trainer does, and with the
check after every step (what the trainer did before: the host waits for the device each step).

    python benchmarks/stop_check.py [--model bench] [--steps 5] [--rounds 2] [--devices 1]

Each block runs `--steps` steps and fetches the metrics once at its end (log_every = steps);
the table gives the median seconds per step over rounds and the ratio to no check.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default="bench")
ap.add_argument("--steps", type=int, default=5, help="steps per timed block (= log_every)")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--devices", type=int, default=1, help="CPU devices per process")
ap.add_argument("--process", type=int, default=None, help=argparse.SUPPRESS)
ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
args = ap.parse_args()

if args.process is None:  # the launcher: start both processes, show process 0's table
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--process", str(i), "--port", str(port)],
                              stdout=subprocess.PIPE if i else None) for i in (0, 1)]
    sys.exit(max(p.wait() for p in procs))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", args.devices)
jax.distributed.initialize(f"127.0.0.1:{args.port}", 2, args.process)

from transformer_jax import data  # noqa: E402
from transformer_jax.checkpoint import PreemptionGuard  # noqa: E402
from transformer_jax.models import get_config  # noqa: E402
from transformer_jax.parallel import MeshConfig, get_rules, make_mesh  # noqa: E402
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch  # noqa: E402
from transformer_jax.train.stop import StopControl  # noqa: E402

model = get_config(args.model)
L = min(512, model.max_len)
setup = make_train_setup(model, OptimizerConfig(learning_rate=3e-4, warmup_steps=10), TaskConfig(task="lm"),
                         make_mesh(MeshConfig(data=-1)), get_rules("fsdp_tp"), total_steps=10_000)
state = setup.init_state()
full = synthetic_batch("lm", 8, L, model.vocab_size)
half = {k: v[4 * args.process:4 * args.process + 4] for k, v in full.items()}
batch = data.make_global_batch(half, setup.batch_sharding)
MODES = ("no check", "check at log boundary", "check every step")

with PreemptionGuard() as guard:
    stop = StopControl(guard, deadline=time.time() + 1e9, budget_s=1e9)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds + 1):  # round 0: compile and warm up
        for mode in MODES:
            t, pending = time.perf_counter(), []
            for i in range(args.steps):
                state, metrics = setup.train_step(state, batch)
                pending.append(metrics)
                if mode == "check every step":
                    assert stop.check() is None
            jax.device_get(pending)
            if mode == "check at log boundary":
                assert stop.check() is None
            if r:
                times[mode].append((time.perf_counter() - t) / args.steps)

if args.process == 0:
    base = statistics.median(times["no check"])
    print(f"\n## stop check, {args.model}, 2 processes x {args.devices} CPU device(s), blocks of {args.steps} steps, "
          f"{args.rounds} rounds (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print("| mode | s/step (median) | x no check |\n|---|---|---|")
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"| {mode} | {med:.4f} | {med / base:.3f} |")
jax.distributed.shutdown()
