"""Step time of the default experiment's recipe variants, as a ratio to the default recipe,
timed round-robin in one process (one step of each variant in turn, after a warm-up round),
so that load on a shared machine hits every row alike. It feeds the step-time column of
transformer_jax/experiments/speedrun_ablation.md.

    .venv/bin/python benchmarks/recipe_step.py                      # all variants, 5 rounds
    .venv/bin/python benchmarks/recipe_step.py --variants base,muon --steps 3

Each variant is the default experiment's model and optimizer with the overrides in VARIANTS
(`base`: the previous recipe, learned positions, LayerNorm with biases, AdamW);
the batch is the experiment's (16 x 256 tokens, synthetic ids). Prints a markdown table:
fastest and median step, CPU seconds per step (user + system; what other load changes
least) and the median step as a ratio to `base`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--variants", default="base,muon,arch,arch_muon", help="comma list of VARIANTS rows")
ARGS.add_argument("--steps", type=int, default=5, help="timed rounds")
args = ARGS.parse_args()

import jax  # noqa: E402

from transformer_jax.experiments.default import get_config  # noqa: E402
from transformer_jax.parallel import get_rules, make_mesh  # noqa: E402
from transformer_jax.train import make_train_setup, synthetic_batch  # noqa: E402

OLD = dict(position="learned", norm="layernorm", use_bias=True)  # the recipe before 2026-12-02
ARCH = dict(position="rope", norm="rmsnorm", use_bias=False)
VARIANTS = {  # name -> (model overrides, optimizer overrides) of the default experiment as it is now
    "base": (OLD, dict(optimizer="adamw")),  # the previous default recipe
    "muon": (OLD, dict(optimizer="muon")),
    "arch": (ARCH, dict(optimizer="adamw")),
    "arch_muon": (ARCH, dict(optimizer="muon")),
    "arch_muon_untied": (dict(ARCH, tie_embeddings=False), dict(optimizer="muon")),
    "arch_muon_relu": (dict(ARCH, activation="relu"), dict(optimizer="muon")),
}


def runner(name: str):
    exp = get_config()
    model_over, optim_over = VARIANTS[name]
    model = dataclasses.replace(exp.model, **model_over)
    optim = dataclasses.replace(exp.optimizer, **optim_over)
    batch = synthetic_batch("lm", exp.train.global_batch_size, exp.train.seq_len, model.vocab_size)
    setup = make_train_setup(model, optim, exp.task, make_mesh(exp.mesh, jax.devices()[:1]),
                             get_rules(exp.mesh.preset), total_steps=exp.train.steps)
    box, batch = [setup.init_state()], jax.device_put(batch, setup.batch_sharding)

    def step():
        box[0], m = setup.train_step(box[0], batch)
        jax.block_until_ready(m)
    return step


def main():
    names = args.variants.split(",")
    steps = {n: runner(n) for n in names}
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for i in range(args.steps + 1):
        for n, step in steps.items():
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            if i:  # round 0 is the warm-up (and compile)
                times[n].append(time.perf_counter() - t)
                cpu[n].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.steps} rounds\n")
    print("| variant | step s: min / median | CPU s/step | median step / base's |\n|---|---|---|---|")
    ref = statistics.median(times[names[0]])
    for n in names:
        med = statistics.median(times[n])
        print(f"| {n} | {min(times[n]):.2f} / {med:.2f} | {statistics.median(cpu[n]):.2f} | {med / ref:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
