"""Transfer learning curves: does pretraining help, at which fine-tuning budgets, and for how long?

    python benchmarks/transfer_curves.py                       # both tasks, 3 seeds, writes docs/transfer/
    python benchmarks/transfer_curves.py --task classify       # one task
    python benchmarks/transfer_curves.py --quick --out /tmp/t  # smoke run: tiny models, a few steps
    # in parallel: pretrain once, then one process per variant, then the table and plot
    python benchmarks/transfer_curves.py --task classify --variants pretrained   # (pretrains first)
    python benchmarks/transfer_curves.py --task classify --variants scratch &
    python benchmarks/transfer_curves.py --task classify --variants lora &
    python benchmarks/transfer_curves.py --task classify --report-only

Sizes (CPU-cheap): 2-layer, 128-wide models, 64-token inputs, bpe trained on python_source
(2048 for classify, 8192 for name); pretraining 6000 steps of 32 rows (12.3M tokens: 15x the
longest classify fine-tune's, 7.5x name's); fine-tuning batch 16 (classify) or 32 (name),
evaluated at 25, 50, 100, 200, 400 and 800 steps. About 75 minutes on 2 CPU cores.

Two tasks on `python_functions` (split by function, 24 validation functions from each of the
16 packages; `python_source`, the pretraining text, holds none of them):

* classify: which package a function comes from (16 classes), a BERT-style Encoder,
  pretrained with masked-LM on python_source. Metric: validation accuracy.
* name: the function's name from its body (the name masked), a T5-style EncoderDecoder,
  pretrained with span corruption on python_source. Metric: exact match of the whole name
  (every target token's argmax right given the right prefix, which is what greedy decoding
  produces), on the whole validation split; beside it, the fraction of the names' tokens right.

Each task pretrains once (the library's trainer, `transformer_jax.train.train`), then
fine-tunes three ways for each seed, at equal compute (same steps, batch, sequence length):
pretrained (every backbone weight restored, fresh head), scratch (random init) and LoRA
(the pretrained backbone frozen, rank-8 adapters + head train). The learning rate is
constant after warmup, so the point at step s of a run is a fine-tuning budget of s steps.
The seed sets the head / model init, dropout and the data order.

Result (measured 2026-12-03 with the default command on a quiet 2-core CPU; tables and plots
in docs/transfer/), mean of 3 seeds at 25 / 50 / 100 / 200 / 400 / 800 steps:

* classify: pretraining pays at every budget. Pretrained .282 .375 .427 .490 .566 .625, scratch
  .094 .176 .276 .394 .499 .549, LoRA .307 .357 .391 .438 .494 .523, constant answer .062. Every
  pretrained seed beats every scratch seed at every budget (+.067 to +.199); scratch has not
  caught up at 800 steps (12,800 examples, 2.2 epochs of the training split). The pretraining
  (MLM, 0.69M params, 36.5 TFLOP) took 14 min of steps; its masked-token accuracy was only .140.
* name: whole names stay out of reach at this size. Exact match is .000-.005 for every variant
  and budget, under the constant answer "close" (.023), so pretrained and scratch do not differ
  beyond the seeds' spread. Per token (eos included), pretrained .333 .339 .366 .377 .390 .417
  against scratch .319 .331 .355 .354 .356 .377 (constant answer .053): ahead at every budget,
  beyond the spread at all but 50 steps, by +.008 to +.040. The pretraining (span corruption,
  1.97M params, 50.2 TFLOP) took 15 min of steps and reached .355 target-token accuracy, most of
  it sentinels and EOS (28.6% of span-corruption targets on python_source validation): on the
  other tokens about .09. Asked in its own format (2026-12-06: the name's first occurrence in
  `masked` as sentinel 0, target "<s0> name <s1>"), it filled in 0 of the 384 validation names,
  4.2% of their tokens, so T5-style fine-tuning had nothing to start from.

The first version of this script (300 pretraining steps of 16 rows, 64-wide models, curves to
200 steps) found no gain on either task: its MLM backbone had reached .089 masked-token accuracy.

Every table gives the constant-answer baseline (the best single answer chosen on the
training split, scored on validation) beside the numbers, mean +- spread (max - min over
seeds), and whether pretrained beats scratch by more than the two spreads at that budget.
Writes `<out>/<task>.md`, `<out>/<task>.png` and `<out>/<task>.json`; pretraining runs stay
under `--workdir` and are reused when their summary exists.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from transformer_jax import data  # noqa: E402
from transformer_jax.checkpoint import CheckpointConfig, init_from  # noqa: E402
from transformer_jax.data import DataConfig  # noqa: E402
from transformer_jax.data.tokenizer import EOS_ID  # noqa: E402
from transformer_jax.experiment import ExperimentConfig, TrainConfig  # noqa: E402
from transformer_jax.models import get_config as model_config  # noqa: E402
from transformer_jax.parallel import MeshConfig  # noqa: E402
from transformer_jax.train import OptimizerConfig, TaskConfig  # noqa: E402
from transformer_jax.train.loop import Run, train  # noqa: E402
from transformer_jax.train.losses import forward  # noqa: E402

VARIANTS = ("pretrained", "scratch", "lora")
SEQ_LEN = 64
EVALS = (25, 50, 100, 200, 400, 800)  # fine-tuning steps at which the metric is taken


def settings(task: str, quick: bool) -> dict:
    """Model, pretraining and fine-tuning sizes of `task` (quick: a smoke run)."""
    if task == "classify":  # bpe 2048: a small MLM output layer keeps CPU steps cheap
        model = model_config("bert-base", vocab_size=2048, d_model=128, num_heads=4, num_layers=2, d_ff=512,
                             max_len=SEQ_LEN, num_classes=16)
        s = dict(model=model, pre_task="mlm", ft_task="classify", seq_len=SEQ_LEN, target_len=None,
                 pre_steps=6000, pre_batch=32, pre_lr=2e-3, ft_batch=16, ft_lr=1e-3, lora_lr=3e-3, evals=EVALS)
    else:  # bpe 8192: names take 3.4 tokens on average (4.5 with 2048), so whole-name matches are reachable
        model = model_config("t5-small", vocab_size=8192, d_model=128, num_heads=4, head_dim=32, num_layers=2,
                             d_ff=512)
        s = dict(model=model, pre_task="span", ft_task="seq2seq", seq_len=SEQ_LEN, target_len=8,
                 pre_steps=6000, pre_batch=32, pre_lr=2e-3, ft_batch=32, ft_lr=2e-3, lora_lr=3e-3, evals=EVALS)
    if quick:
        s.update(model=s["model"].replace(d_model=32, d_ff=64, num_layers=1), pre_steps=6, pre_batch=8,
                 ft_batch=8, evals=(2, 4))
    return s


def pretrain_config(task: str, s: dict) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"transfer_curves_{task}_pretrain", model=s["model"],
        data=DataConfig(source="python_source", task=s["pre_task"], vocab_size=s["model"].vocab_size),
        task=TaskConfig(task=s["pre_task"]),
        train=TrainConfig(steps=s["pre_steps"], seq_len=s["seq_len"], global_batch_size=s["pre_batch"],
                          eval_every=0, eval_batches=10, log_every=max(1, s["pre_steps"] // 10)),
        optimizer=OptimizerConfig(learning_rate=s["pre_lr"], warmup_steps=max(1, s["pre_steps"] // 20)),
        mesh=MeshConfig(), checkpoint=CheckpointConfig(every_steps=s["pre_steps"], keep_last=1))


def finetune_config(task: str, s: dict, variant: str, seed: int) -> ExperimentConfig:
    lora = variant == "lora"
    return ExperimentConfig(
        name=f"transfer_curves_{task}_{variant}", model=s["model"].replace(lora_rank=8 if lora else 0),
        data=DataConfig(source="python_functions", task=s["ft_task"], vocab_size=s["model"].vocab_size),
        task=TaskConfig(task=s["ft_task"]),
        train=TrainConfig(steps=max(s["evals"]), seq_len=s["seq_len"], target_seq_len=s["target_len"],
                          global_batch_size=s["ft_batch"], seed=seed, eval_every=0, log_every=10),
        optimizer=OptimizerConfig(learning_rate=s["lora_lr"] if lora else s["ft_lr"], schedule="constant",
                                  warmup_steps=max(1, min(s["evals"]) // 2), weight_decay=0.01),
        mesh=MeshConfig(), checkpoint=CheckpointConfig(every_steps=10**9, keep_last=1))


# -- metrics ----------------------------------------------------------------------------

def name_scores(run: Run, state, answer: str | None = None) -> dict:
    """exact_match: the fraction of validation names whose every target token (eos included) is the
    argmax given the right prefix (what greedy decoding produces); token_accuracy: the fraction of
    target tokens that are. With `answer`, the scores of that constant answer instead of the model's."""
    setup = run.setup
    if answer is None and not hasattr(run, "_predict"):
        with setup.context():
            run._predict = jax.jit(lambda params, batch: forward(setup.model, params, batch, "seq2seq")[0].argmax(-1))
    answer_ids = None if answer is None else np.asarray(run.tokenizer.encode(answer) + [EOS_ID])
    names = names_right = tokens = tokens_right = 0
    it = run.iterator(run.cfg.data.eval_split, eval=True)
    for local in it:
        seg, w = local["target_segment_ids"], local["weights"] > 0
        name_at = [(r, np.flatnonzero(seg[r] == s_id)) for r in range(seg.shape[0])
                   for s_id in np.unique(seg[r][seg[r] > 0])]  # (row, target positions) of each name
        if answer_ids is None:
            with setup.context():
                pred = np.asarray(run._predict(state.params, jax.device_put(local, setup.batch_sharding)))
        else:  # the answer's i-th token at each name's i-th position
            pred = np.full_like(local["targets"], -1)
            for r, at in name_at:
                n = min(len(at), len(answer_ids))
                pred[r, at[:n]] = answer_ids[:n]
        right = pred == local["targets"]
        tokens, tokens_right = tokens + w.sum(), tokens_right + (right & w).sum()
        names += len(name_at)
        names_right += sum(bool((right | ~w)[r, at].all()) for r, at in name_at)
    it.close()
    return dict(exact_match=names_right / max(names, 1), token_accuracy=float(tokens_right / max(tokens, 1)))


def metrics(run: Run, state, task: str) -> dict:
    """The task's metrics, the first the headline one."""
    if task == "classify":
        return dict(accuracy=run.evaluate(state, None, status=lambda text: None)["accuracy"])
    return name_scores(run, state)


@functools.cache  # seconds: parses the stdlib; every fine-tune of a task asks for it
def constant_baseline(task: str) -> tuple[str, float]:
    """(answer, validation score) of the most common training answer, given to every example."""
    from transformer_jax.data.functions import function_split
    split = function_split()
    key = "package" if task == "classify" else "name"
    answer, _ = collections.Counter(r[key] for r in split["train"]).most_common(1)[0]
    return answer, float(np.mean([r[key] == answer for r in split["validation"]]))


# -- runs -------------------------------------------------------------------------------

def pretrain(task: str, s: dict, workdir: Path) -> dict:
    summary_path = workdir / "summary.json"
    if not summary_path.exists() or json.loads(summary_path.read_text()).get("stopped") != "steps":
        train(pretrain_config(task, s), workdir)  # fresh, or resumed from its newest checkpoint
    return pretrain_cost(task, s, workdir)


def pretrain_cost(task: str, s: dict, workdir: Path) -> dict:
    """Steps, tokens, FLOPs and seconds of the pretraining run in `workdir` (from its logs):
    `seconds` is the whole run (data preparation, compilation, final evaluation included),
    `step_seconds` the logged windows' steps alone (the first window, holding compilation, left out)."""
    summary = json.loads((workdir / "summary.json").read_text())
    t = pretrain_config(task, s).train
    logs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logs = [m for m in logs if m["kind"] == "train"]
    step_tokens = t.global_batch_size * t.seq_len
    flops_per_step = float(np.median([m["mfu"] * summary["peak_flops"] * step_tokens / m["tokens_per_s"]
                                      for m in logs]))
    windows = [(b["step"] - a["step"], b) for a, b in zip(logs, logs[1:])]
    step_seconds = sum(n * step_tokens / m["tokens_per_s"] for n, m in windows) * t.steps / sum(n for n, _ in windows)
    return dict(steps=summary["step"], batch=t.global_batch_size, seq_len=t.seq_len,
                input_tokens=summary["step"] * step_tokens, flops=flops_per_step * summary["step"],
                seconds=summary["elapsed_s"], step_seconds=step_seconds, params=summary["params"],
                eval_loss=summary["eval"]["loss"], eval_accuracy=summary["eval"]["accuracy"])


def finetune(task: str, s: dict, variant: str, seed: int, pretrain_dir: Path, workdir: Path) -> dict:
    run = Run(finetune_config(task, s, variant, seed), workdir)
    setup = run.setup
    state = setup.init_state()
    if variant != "scratch":
        params, _ = init_from(str(pretrain_dir), state.params)
        state = state.replace(params=params)
    it = run.iterator(run.cfg.data.train_split)
    curves, t0 = {}, time.time()
    for step in range(1, max(s["evals"]) + 1):
        state, _ = setup.train_step(state, data.make_global_batch(next(it), setup.batch_sharding))
        if step in s["evals"]:
            for name, x in metrics(run, state, task).items():
                curves.setdefault(name, {})[step] = x
            print(f"  {task} {variant} seed {seed} step {step}: "
                  + ", ".join(f"{name} {c[step]:.4f}" for name, c in curves.items()), flush=True)
    it.close()
    run.ckpt.close()
    out = dict(curve=next(iter(curves.values())), trained=setup.trainable_count, params=setup.param_count,
               seconds=time.time() - t0)
    if task == "name":  # the token accuracy, with the constant answer's beside it
        out.update(token_curve=curves["token_accuracy"],
                   token_baseline=name_scores(run, None, constant_baseline(task)[0])["token_accuracy"])
    return out


# -- report -----------------------------------------------------------------------------

def summarise(results: dict, evals, key: str = "curve") -> dict:
    """variant -> step -> (mean, min, max) over seeds of the runs' `key` curve."""
    out = {}
    for v, runs in results.items():
        out[v] = {}
        for step in evals:
            xs = [r[key][step] for r in runs]
            out[v][step] = (float(np.mean(xs)), float(min(xs)), float(max(xs)))
    return out


def catch_up(summary: dict, evals) -> int | None:
    """First budget at which scratch's mean reaches pretrained's (None: never within the curve)."""
    for step in evals:
        if summary["scratch"][step][0] >= summary["pretrained"][step][0]:
            return step
    return None


def _table(s: dict, summ: dict) -> list[str]:
    lines = ["| steps | examples seen | pretrained | scratch | LoRA r=8 | pretrained - scratch | beyond spread |",
             "|---:|---:|---|---|---|---:|:---:|"]
    for step in s["evals"]:
        cells = [f"{summ[v][step][0]:.3f} ({summ[v][step][1]:.3f}-{summ[v][step][2]:.3f})" for v in VARIANTS]
        gap = summ["pretrained"][step][0] - summ["scratch"][step][0]
        clear = summ["pretrained"][step][1] > summ["scratch"][step][2]  # worst pretrained > best scratch
        lines.append(f"| {step} | {step * s['ft_batch']:,} | " + " | ".join(cells) + f" | {gap:+.3f} | "
                     f"{'yes' if clear else 'no'} |")
    return lines


def _catch_up_line(summ: dict, evals) -> str:
    cu = catch_up(summ, evals)
    return "Scratch catches up: " + (f"already at the first budget ({cu} steps)." if cu == evals[0] else
                                     f"at {cu} steps." if cu else f"not within {max(evals)} steps.")


def markdown(task: str, s: dict, results: dict, pre: dict, baseline: tuple[str, float], seeds) -> str:
    evals = s["evals"]
    summ = summarise(results, evals)
    metric_name = "validation accuracy" if task == "classify" else "validation exact match of the name"
    lines = [f"### {task}: {metric_name} vs fine-tuning steps ({len(seeds)} seeds)", "",
             f"Constant answer (most common in training, `{baseline[0]}`): **{baseline[1]:.3f}**. "
             f"Fine-tuning: batch {s['ft_batch']} x {s['seq_len']} tokens per step, constant lr after warmup.",
             "", *_table(s, summ)]
    ft_tokens = max(evals) * s["ft_batch"] * s["seq_len"]
    lines += ["", "Cells: mean over seeds (min-max). \"beyond spread\": every pretrained seed above every "
              "scratch seed.", "", _catch_up_line(summ, evals),
              f"Pretraining cost: {pre['steps']} steps x {pre['batch']} x {pre['seq_len']} = "
              f"{pre['input_tokens'] / 1e6:.2f}M input tokens of python_source ({pre['params'] / 1e6:.2f}M params, "
              f"{pre['flops'] / 1e12:.2f} TFLOP), {pre['step_seconds']:.0f} s of steps ({pre['seconds']:.0f} s with "
              f"data preparation, compilation and evaluation) on {os.cpu_count()} CPU cores; "
              f"{pre['input_tokens'] / ft_tokens:.1f}x the "
              f"tokens of the longest fine-tune ({max(evals)} steps); its validation loss {pre['eval_loss']:.3f}, "
              f"accuracy {pre['eval_accuracy']:.3f}.",
              f"Trained parameters: full {results['pretrained'][0]['trained'] / 1e6:.3f}M, "
              f"LoRA {results['lora'][0]['trained'] / 1e6:.3f}M of {results['lora'][0]['params'] / 1e6:.3f}M."]
    if "token_curve" in results["pretrained"][0]:  # name: the per-token view of the same predictions
        tokens = summarise(results, evals, "token_curve")
        lines += ["", f"### {task}: validation token accuracy of the name (eos included, right prefix given)", "",
                  f"Constant answer `{baseline[0]}`: **{results['pretrained'][0]['token_baseline']:.3f}**.", "",
                  *_table(s, tokens), "", _catch_up_line(tokens, evals)]
    return "\n".join(lines) + "\n"


def plot(task: str, s: dict, results: dict, baseline: tuple[str, float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals = s["evals"]
    panels = [("curve", "validation accuracy" if task == "classify" else "validation exact match", baseline[1])]
    if "token_curve" in results["pretrained"][0]:
        panels.append(("token_curve", "validation token accuracy", results["pretrained"][0]["token_baseline"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, label, constant) in zip(axes[0], panels):
        summ = summarise(results, evals, key)
        for v, color in zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")):
            ax.plot(evals, [summ[v][e][0] for e in evals], "o-", color=color, label=v)
            ax.fill_between(evals, [summ[v][e][1] for e in evals], [summ[v][e][2] for e in evals], color=color,
                            alpha=0.2)
        ax.axhline(constant, color="gray", ls="--", label=f"constant answer ({baseline[0]})")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(evals, [str(e) for e in evals])
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel(label)
        ax.set_title(f"python_functions {task}: mean and min-max of {len(results['scratch'])} seeds")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_task(task: str, args) -> str:
    s = settings(task, args.quick)
    workdir = Path(args.workdir) / task
    out = Path(args.out)
    seeds = range(args.seeds)
    if args.report_only:  # the tables and plot again, from finished runs' JSON and the pretraining logs
        results = {}
        for path in [out / f"{task}.json"] if (out / f"{task}.json").exists() else sorted(out.glob(f"{task}.*.json")):
            saved = json.loads(path.read_text())
            results.update({v: [dict(r, **{key: {int(k): x for k, x in r[key].items()}
                                               for key in ("curve", "token_curve") if key in r}) for r in runs]
                            for v, runs in saved["results"].items()})
        pre, baseline = pretrain_cost(task, s, workdir / "pretrain"), tuple(saved["baseline"])
        seeds = range(len(results["scratch"]))
    else:
        pre = pretrain(task, s, workdir / "pretrain")
        print(f"{task}: pretrained in {pre['seconds']:.0f} s", flush=True)
        results = {v: [finetune(task, s, v, seed, workdir / "pretrain", workdir / f"{v}_{seed}") for seed in seeds]
                   for v in args.variants}
        baseline = constant_baseline(task)
    out.mkdir(parents=True, exist_ok=True)
    name = task if tuple(args.variants) == VARIANTS else f"{task}.{'+'.join(args.variants)}"
    (out / f"{name}.json").write_text(json.dumps(dict(pretrain=pre, baseline=baseline, results=results), indent=1))
    if set(results) != set(VARIANTS):  # one process per variant: --report-only once all have finished
        return f"{task}: {', '.join(results)} written to {out / name}.json"
    table = markdown(task, s, results, pre, baseline, seeds)
    (out / f"{task}.md").write_text(table)
    plot(task, s, results, baseline, out / f"{task}.png")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("classify", "name", "both"), default="both")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs" / "transfer"))
    p.add_argument("--workdir", default="runs/transfer_curves")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, a few steps")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="fine-tune only these (one process each, in parallel); then --report-only")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table and plot from <out>/<task>.json and the pretraining run's logs")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="no persistent compilation cache under --workdir")
    args = p.parse_args(argv)
    if args.compile_cache:  # every seed's run compiles the same programs: compile them once
        jax.config.update("jax_compilation_cache_dir", str(Path(args.workdir) / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    for task in (("classify", "name") if args.task == "both" else (args.task,)):
        print(run_task(task, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
