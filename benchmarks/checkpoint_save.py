"""Checkpoint save time: the library's `Checkpointer` (CRC-32C manifests: each process checksums
the files it wrote in orbax's background commit) against plain orbax on the same train state
of the DESIGN.md bench model (decoder LM 6 x 512, vocab 32768, f32 params + AdamW moments).

    python benchmarks/checkpoint_save.py [--rounds 5] [--dir /tmp/ckpt_bench]

Rows alternate (plain, ours, plain, ours, ...) so that load on a shared machine hits both
alike; the table gives the median over rounds of (a) the blocking part of `save()` (what a
training step waits for) and (b) `save()` until `wait_until_finished()` returns (the
checkpoint committed, with its manifests), and the ratio ours / plain.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from transformer_jax.checkpoint import CheckpointConfig, Checkpointer, verify_step_dir
from transformer_jax.checkpoint.integrity import HASH_THREADS
from transformer_jax.models import get_config
from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/transformer_jax_ckpt_bench")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    setup = make_train_setup(get_config("bench"), OptimizerConfig(), TaskConfig(task="lm"),
                             make_mesh(MeshConfig(data=1)), get_rules("fsdp_tp"), total_steps=10)
    state = setup.init_state()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))

    plain = ocp.CheckpointManager(root / "plain", options=ocp.CheckpointManagerOptions(max_to_keep=1),
                                  item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
    ours = Checkpointer(root / "ours", CheckpointConfig(keep_last=1))
    save = {"plain orbax": lambda s: plain.save(s, args=ocp.args.Composite(  # the same two items as ours
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": s}))),
            "transformer_jax (hashed)": lambda s: ours.save(s, state)}
    wait = {"plain orbax": plain.wait_until_finished, "transformer_jax (hashed)": ours.wait_until_finished}
    times = {k: ([], []) for k in save}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in save:
            t = time.perf_counter()
            save[name](r + 1)
            blocking = time.perf_counter() - t
            wait[name]()
            total = time.perf_counter() - t
            if r:
                times[name][0].append(blocking)
                times[name][1].append(total)
    t = time.perf_counter()
    assert verify_step_dir(ours.step_dir(args.rounds + 1)) is None
    rehash = time.perf_counter() - t  # reading back and hashing every file of one step
    plain.close()
    ours.close()
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n## checkpoint save, bench model train state {nbytes / 2**20:.0f} MiB, {args.rounds} rounds "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print("| saver | save() blocking, s | save until committed, s |\n|---|---|---|")
    med = {k: (statistics.median(b), statistics.median(c)) for k, (b, c) in times.items()}
    for k, (b, c) in med.items():
        print(f"| {k} | {b:.3f} | {c:.3f} |")
    (pb, pc), (ob, oc) = med.values()
    print(f"\nours / plain: blocking {ob / pb:.2f}x, until committed {oc / pc:.2f}x; verifying one whole step "
          f"(read + CRC-32C of every file, {HASH_THREADS} threads): {rehash:.3f} s")


if __name__ == "__main__":
    main()
