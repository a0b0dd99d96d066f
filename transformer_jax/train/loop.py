"""The trainer: config -> mesh -> data -> state (fresh, resumed or `init_from`) -> steps ->
evaluation, checkpoints, logs -> a final report.

A run lives in its workdir: config.json (the effective config), tokenizer/, checkpoints/,
metrics.jsonl, tensorboard/, loss.png, summary.json. Starting `train` on a workdir that
holds a checkpoint resumes from its newest intact step, with the data iterator where it was,
so the result is bit-identical to an uninterrupted run. SIGTERM/SIGINT at any moment (set-up,
compilation, steps, final report) end the run cleanly with the newest state saved. Stops are
agreed by all processes (train/stop.py). The wall-clock budget counts every attempt of the run.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from transformer_jax import data
from transformer_jax.checkpoint import Checkpointer, PreemptionGuard, init_from
from transformer_jax.config import ConfigError
from transformer_jax.convert import runs as hf_runs
from transformer_jax.experiment import ExperimentConfig
from transformer_jax.metrics import MetricsWriter, StepProfiler, plot_losses, read_metrics
from transformer_jax.parallel import check_batch, describe_mesh, get_rules, make_mesh, maybe_initialize_distributed
from transformer_jax.train.fits import check_fits
from transformer_jax.train.hardware import peak_flops_per_device
from transformer_jax.train.step import TrainSetup, make_train_setup
from transformer_jax.train.stop import StopControl, exit_if_peer_lost

log = logging.getLogger(__name__)
# What the loss of a task is over (metrics' "tokens", "targets_per_s").
_TARGETS = {"lm": "tokens", "mlm": "masked tokens", "span": "target tokens", "seq2seq": "target tokens",
            "classify": "examples"}


class Run:
    """The pieces of a run every command needs: mesh, tokenizer, effective config, setup."""

    def __init__(self, cfg: ExperimentConfig, workdir: str | Path, *, writer_progress: bool = True):
        self.workdir = Path(workdir)
        maybe_initialize_distributed(cfg.mesh)
        self.mesh = make_mesh(cfg.mesh)
        check_batch(cfg.train.global_batch_size, self.mesh, cfg.optimizer.grad_accum_steps)
        self.primary = jax.process_index() == 0
        # init_from=hf:PATH: the checkpoint's architecture and tokenizer (convert/runs.py)
        resuming = any((self.workdir / "checkpoints").glob("[0-9]*"))
        self.hf_dir = hf_runs.hf_dir(cfg.init_from, required=not resuming)
        if self.hf_dir:
            cfg = cfg.replace(model=hf_runs.run_model_config(cfg.model, self.hf_dir))
        self.tokenizer = _load_or_train_tokenizer(cfg, self.workdir, self.hf_dir)
        if cfg.model.vocab_size != self.tokenizer.vocab_size:  # the tokenizer defines the ids
            cfg = cfg.replace(model=cfg.model.replace(vocab_size=self.tokenizer.vocab_size))
        self.cfg = cfg
        self.setup: TrainSetup = make_train_setup(cfg.model, cfg.optimizer, cfg.task, self.mesh,
                                                  get_rules(cfg.mesh.preset), total_steps=cfg.train.steps,
                                                  seed=cfg.train.seed)
        self.ckpt = Checkpointer(self.workdir / "checkpoints", cfg.checkpoint, tokenizer_dir=self.workdir / "tokenizer")

    def iterator(self, split: str, *, eval: bool = False):
        t = self.cfg.train
        return data.make_iterator(self.cfg.data, self.tokenizer, split=split, task=self.cfg.task.task,
                                  seq_len=t.seq_len, target_seq_len=t.target_seq_len,
                                  global_batch_size=t.global_batch_size, seed=t.seed,
                                  num_epochs=1 if eval else None, shuffle=False if eval else None)

    def evaluate(self, state, max_batches: int | None = None, status=None) -> dict:
        """Loss, accuracy (and bits per byte for a causal LM) on eval_split, or its first `max_batches`.
        `status(text)` is told the progress (default: a bar of its own on process 0).

        Bits per byte: over the whole split, the summed loss over the split's UTF-8 bytes (the
        compressors' denominator); over the first batches, over the bytes their targets stand for."""
        lm = self.cfg.task.task == "lm"
        byte_lengths = self.tokenizer.token_byte_lengths() if lm and max_batches is not None else None
        it = self.iterator(self.cfg.data.eval_split, eval=True)
        bar = None
        if status is None and self.primary:
            from tqdm import tqdm
            bar = tqdm(total=max_batches, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True,
                       mininterval=1.0)
            status = lambda text: bar.set_description_str(text.split(":")[0])  # noqa: E731
        status = status or (lambda text: None)
        totals, target_bytes = None, 0
        for i, local in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            if byte_lengths is not None:
                target_bytes += int(np.sum(byte_lengths[local["targets"]] * (local["weights"] > 0)))
            batch = data.make_global_batch(local, self.setup.batch_sharding)
            if i == 0:
                status("compiling the eval step")
                check_fits(self.setup.compiled_eval_step(batch), "eval step", closing=[it])
            sums = self.setup.eval_step(state, batch)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
            status(f"evaluating: batch {i + 1}" + (f"/{max_batches}" if max_batches else ""))
            if bar is not None:
                bar.update()
        it.close()
        if bar is not None:
            bar.close()
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        out = {"loss": totals["nll_sum"] / max(totals["tokens"], 1.0),
               "accuracy": totals["correct"] / max(totals["tokens"], 1.0), "eval_tokens": totals["tokens"]}
        if lm and max_batches is None:
            out["bits_per_byte"] = data.bits_per_byte(totals["nll_sum"], _eval_bytes(self.cfg.data))
        elif lm:
            if jax.process_count() > 1:  # each host counted the bytes of its own rows
                from jax.experimental import multihost_utils
                target_bytes = int(np.sum(multihost_utils.process_allgather(np.int64(target_bytes))))
            out["bits_per_byte"] = data.bits_per_byte(totals["nll_sum"], max(target_bytes, 1))
            out["eval_bytes"] = target_bytes
        return out


def train(cfg: ExperimentConfig, workdir: str | Path) -> dict:
    """Trains (or resumes) `cfg` in `workdir`; returns the final summary.

    SIGTERM/SIGINT at any moment (set-up, compilation, steps, final report) end the run
    cleanly at the next stop check with the newest state saved."""
    with PreemptionGuard() as guard:
        try:
            return _train(cfg, workdir, guard)
        except Exception as e:  # another process died: one line and exit 1, not a hang
            exit_if_peer_lost(e, f"restart the job to resume from {Path(workdir) / 'checkpoints'}")
            raise


def _train(cfg: ExperimentConfig, workdir: str | Path, guard: PreemptionGuard) -> dict:
    t0 = time.time()
    own_run = cfg.init_from and not cfg.init_from.startswith("hf:") and not hf_runs.hf_dir(cfg.init_from)
    if own_run and not any(p.name.isdigit() for p in (Path(workdir) / "checkpoints").glob("*")):
        _check_init_from(cfg.init_from)  # a fresh run: before any data, tokenizer or compile
    run = Run(cfg, workdir)
    guard.reclaim()  # jax.distributed.initialize put JAX's own SIGTERM handler in place
    cfg, setup, ckpt, primary = run.cfg, run.setup, run.ckpt, run.primary
    workdir = run.workdir
    _write_config(run)
    writer_log = print if primary else (lambda *a, **k: None)
    trained = "" if setup.trainable_count == setup.param_count else f" ({setup.trainable_count / 1e6:.3f}M trained)"
    writer_log(f"transformer-jax: {cfg.name}: {setup.param_count / 1e6:.2f}M params{trained}, "
               f"{describe_mesh(run.mesh)}, {jax.device_count()} {jax.devices()[0].platform} device(s), workdir {workdir}")

    train_it = run.iterator(cfg.data.train_split)
    restored = ckpt.restore(setup.abstract_state, fresh_if_none_intact=cfg.checkpoint.fresh_if_none_intact)
    if restored is not None:
        state, start = restored.state, restored.step
        train_it.set_state(restored.data_state)
        meta = restored.metadata or {}
        elapsed_before, tokens_seen = float(meta.get("elapsed_s", 0.0)), int(meta.get("tokens_seen", 0))
        writer_log(f"resumed from step {start} ({elapsed_before:.0f} s already spent)")
    else:
        state, start, elapsed_before, tokens_seen = setup.init_state(), 0, 0.0, 0
        if run.hf_dir:
            params, summary = hf_runs.init_params(run.hf_dir, cfg.model, state.params)
            state = state.replace(params=params)
            writer_log(f"init_from {cfg.init_from}: {summary}")
        elif cfg.init_from:
            params, report = init_from(cfg.init_from, state.params)
            state = state.replace(params=params)
            writer_log(f"init_from {cfg.init_from}: {report.summary()}")
    budget_end = None if cfg.train.time_budget_s is None else t0 + cfg.train.time_budget_s - elapsed_before
    stop = StopControl(guard, budget_end, cfg.train.time_budget_s)
    early = stop.check()  # a signal during set-up: nothing new to save
    if early is not None:
        train_it.close()
        ckpt.close()
        saved = f"newest checkpoint: step {start}" if restored is not None else "nothing to save yet"
        writer_log(f"{early} during set-up; {saved}")
        return {"name": cfg.name, "step": start, "stopped": early}
    peak, peak_source = peak_flops_per_device()
    peak *= jax.device_count()
    devices = f" x {jax.device_count()} devices" if jax.device_count() > 1 and "measured" not in peak_source else ""
    writer_log(f"MFU is of {_flops_str(peak)}, {peak_source}{devices}")
    writer = MetricsWriter(workdir, total_steps=cfg.train.steps, start_step=start, enabled=primary,
                           tracker=cfg.train.tracker, run_name=cfg.name)
    writer.write_hparams(json.loads(cfg.to_json()))
    profiler = StepProfiler(cfg.train.profile_steps, workdir / "tensorboard")
    train_it.start_prefetch()

    def save(step, state):
        meta = {"elapsed_s": elapsed_before + time.time() - t0, "tokens_seen": tokens_seen}
        ckpt.save(step, state, data_state=train_it.get_state(), config_json=cfg.to_json(), metadata=meta)

    step, skipped_total, halted, stopped, last_saved = start, 0, False, None, start
    pending, t_log, steps_since_log = [], time.time(), 0
    flops = None
    while step < cfg.train.steps:
        batch = data.make_global_batch(next(train_it), setup.batch_sharding)
        if flops is None:
            flops, inputs_per_step = setup.flops_per_step(batch), _input_tokens(batch)
            writer.phase("compiling the train step")
            check_fits(setup.compiled_train_step(batch), "train step", closing=[writer, train_it, ckpt])
            writer.phase(None)
            t_log = time.time()  # compile time is not throughput
        profiler.before(step + 1)
        state, metrics = setup.train_step(state, batch)
        step += 1
        profiler.after(step, metrics)
        pending.append((step, metrics))
        steps_since_log += 1
        if len(pending) > 1:  # one step in flight: the bar (and the clock checks below) follow finished steps
            jax.block_until_ready(pending[-2][1]["loss"])
            writer.progress(step - 1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            fetched = jax.device_get([m for _, m in pending])
            dt = time.time() - t_log
            tokens = int(sum(m["tokens"] for m in fetched))
            tokens_seen += tokens
            for (s, _), m in zip(pending, fetched):
                if m["skipped"]:
                    skipped_total += 1
                    writer.print(f"step {s}: non-finite loss or gradients, update skipped "
                                 f"({skipped_total} so far)")
                    if m["halt"]:
                        halted = True
                        writer.print(f"step {s}: halting (task.on_nonfinite='halt')")
            last = {k: float(v) for k, v in fetched[-1].items()}
            # loss, nll, accuracy: the mean over the logged window's steps (one step's is noise)
            good = [m for m in fetched if not m["skipped"]] or fetched
            last.update({k: float(np.mean([m[k] for m in good])) for k in ("loss", "nll", "accuracy")})
            rate = inputs_per_step * steps_since_log / dt if dt > 0 else 0.0  # input tokens (padding included)
            target_rate = tokens / dt if dt > 0 else 0.0  # the tokens (or examples) the loss is over
            mfu = flops * steps_since_log / dt / peak if dt > 0 else 0.0
            writer.write(step, dict(last, tokens_per_s=rate, targets_per_s=target_rate, mfu=mfu,
                                    tokens_seen=tokens_seen, skipped_total=skipped_total))
            shown = {"tok/s": f"{rate:,.0f}"}
            if cfg.task.task != "lm":  # a causal LM's targets are its input tokens
                shown[_TARGETS[cfg.task.task] + "/s"] = f"{target_rate:,.1f}"
            writer.progress(step, loss=last["loss"], **shown, MFU=f"{100 * mfu:.1f}%")
            pending, t_log, steps_since_log = [], time.time(), 0
            if halted:
                stopped = "halted on a non-finite loss"
                break
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            periodic = cfg.train.periodic_eval_batches or cfg.train.eval_batches
            writer.phase("evaluating")
            ev = run.evaluate(state, periodic, status=writer.phase)
            writer.phase(None)
            writer.write(step, dict(ev, tokens_seen=tokens_seen, elapsed_s=elapsed_before + time.time() - t0,
                                    eval_batches=periodic), kind="eval")
            writer.print(f"step {step}: eval loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}")
            t_log = time.time()  # evaluation time is not training throughput
        if stop.due(step, cfg.train.log_every):
            stopped = stop.check()
        if stopped or step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
            save(step, state)
            last_saved = step
        if stopped:
            break
    if last_saved != step and not halted:
        save(step, state)
    profiler.close()
    ckpt.wait_until_finished()
    train_it.close()
    writer.close_progress()
    writer.print(f"step {step}: {stopped or 'step budget reached'}; checkpoint saved")

    summary = {"name": cfg.name, "step": step, "tokens_seen": tokens_seen, "params": setup.param_count,
               "skipped_steps": skipped_total, "stopped": stopped or "steps", "peak_flops": peak,
               "peak_source": peak_source}
    interrupted = stopped is not None and stopped.startswith("stopped by")
    if not interrupted and not halted:
        summary.update(_final_report(run, state, writer, tokens_seen, elapsed_before + time.time() - t0, stop))
    summary["elapsed_s"] = elapsed_before + time.time() - t0
    writer.close()
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    ckpt.close()
    if halted:
        raise SystemExit(f"transformer-jax: training halted at step {step} on a non-finite loss "
                         f"({skipped_total} skipped steps); see {workdir / 'metrics.jsonl'}")
    return summary


def _final_report(run: Run, state, writer: MetricsWriter, tokens_seen: int, elapsed_s: float,
                  stop: StopControl) -> dict:
    """Evaluation (the whole split unless train.eval_batches caps it), compression baselines
    and the time the model took to beat each for a causal LM, loss.png and a sample. A stop
    request (the state is saved already) skips what comes after the evaluation."""
    cfg = run.cfg
    ev = run.evaluate(state, cfg.train.eval_batches)
    writer.write(int(state.step), dict(ev, tokens_seen=tokens_seen, elapsed_s=elapsed_s,
                                       eval_batches=cfg.train.eval_batches), kind="eval")
    unit = _TARGETS[cfg.task.task][:-1]  # loss per target: nats/token, nats/masked token, nats/example
    lines = [f"validation: loss {ev['loss']:.4f} nats/{unit}, accuracy {ev['accuracy']:.4f}"]
    stopped = stop.check(budget=False)  # a budget that ended training still gets its report
    if stopped is not None:
        lines.append(f"{stopped} during the final report; the rest of it is skipped")
    elif "bits_per_byte" in ev:
        ev["baselines"] = data.compression_report(data.eval_text(cfg.data).documents)
        lines.append(f"validation bits per byte: model {ev['bits_per_byte']:.3f}")
        for way, scores in ev["baselines"].items():
            beaten = sum(ev["bits_per_byte"] < v for v in scores.values())
            lines.append(f"  {way.replace('_', ' '):<13}" + "   ".join(f"{k} {v:.3f}" for k, v in scores.items()) +
                         f"   (model beats {beaten} of {len(scores)})")
        if run.primary:
            ev["time_to_beat"] = time_to_beat(read_metrics(run.workdir), ev["baselines"]["stream"])
            lines.append("time to beat (validation; the first evaluation below each, one stream): " + "   ".join(
                f"{k} " + (f"step {t['step']} at {t['elapsed_s']:.0f} s" if t else "not yet")
                for k, t in ev["time_to_beat"].items()))
    if run.primary and stopped is None:
        plot = plot_losses(run.workdir, title=cfg.name, baselines=ev.get("baselines", {}).get("stream"))
        if plot:
            lines.append(f"loss curve: {plot}")
    if cfg.model.family == "decoder" and cfg.train.sample_tokens and stopped is None:
        ev["sample"] = sample_text(run, state.params, cfg.train.sample_prompt, cfg.train.sample_tokens)
        writer.write_text(int(state.step), "sample", cfg.train.sample_prompt + ev["sample"])
        lines.append(f"sample (temperature 0.8, top-p 0.95):\n{cfg.train.sample_prompt}{ev['sample']}")
    for line in lines:
        writer.print(line)
    return {"eval": ev}


def time_to_beat(records: list[dict], baselines: dict[str, float]) -> dict[str, dict | None]:
    """{compressor: {"step", "elapsed_s", "bits_per_byte"} of the first evaluation below it, or None}."""
    evals = sorted((r for r in records if r["kind"] == "eval" and isinstance(r.get("bits_per_byte"), float)
                    and isinstance(r.get("elapsed_s"), (int, float))), key=lambda r: r["elapsed_s"])
    first = {}
    for name, bar in baselines.items():
        hit = next((r for r in evals if r["bits_per_byte"] < bar), None)
        first[name] = hit and {k: hit[k] for k in ("step", "elapsed_s", "bits_per_byte")}
    return first


def sample_text(run: Run, params, prompt: str, n: int, *, temperature=0.8, top_p=0.95, seed=0) -> str:
    from transformer_jax import decode
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    max_new = n
    if run.cfg.model.position == "learned":
        max_new = max(1, min(n, run.cfg.model.max_len - len(ids)))
    with run.setup.context():
        out = decode.generate(run.setup.model, params, [ids], max_new_tokens=max_new, temperature=temperature,
                              top_p=top_p, eos_id=tok.eos_id, seed=seed)
    return tok.decode([int(t) for t in out.tokens[0, :out.lengths[0]] if t != tok.eos_id])


def evaluate(cfg: ExperimentConfig, workdir: str | Path) -> dict:
    """Evaluates the newest intact checkpoint of `workdir` on the validation split (train.eval_batches caps it)."""
    run = Run(cfg, workdir)
    restored = run.ckpt.restore(run.setup.abstract_state, restore_data_state=False)
    if restored is None:
        raise ConfigError(f"no checkpoint in {run.workdir / 'checkpoints'}; train first")
    ev = run.evaluate(restored.state, cfg.train.eval_batches)
    line = f"step {restored.step}: validation loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}"
    if "bits_per_byte" in ev:
        line += f", bits per byte {ev['bits_per_byte']:.3f}"
    if run.primary:
        print(line)
    run.ckpt.close()
    return dict(ev, step=restored.step)


def _load_or_train_tokenizer(cfg: ExperimentConfig, workdir: Path, hf_dir: Path | None = None):
    """The run's own tokenizer if it has one (resume), else an imported checkpoint's, else the
    data cache's (trained once)."""
    saved = workdir / "tokenizer"
    if (saved / "tokenizer_meta.json").exists():
        try:
            return data.Tokenizer.load(str(saved))
        except Exception as e:  # noqa: BLE001  (truncated JSON, a bad tokenizer.json: the file is damaged)
            what = getattr(e, "filename", None) or saved / "tokenizer_meta.json"
            raise ConfigError(f"{what} is damaged ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                              f"every checkpoint holds a copy: replace {saved} with "
                              f"{workdir / 'checkpoints' / '<step>' / 'tokenizer'}") from None
    if hf_dir:
        from transformer_jax.data.hf_tokenizer import HFTokenizer
        tok = HFTokenizer.from_pretrained(hf_dir, cfg.model.vocab_size)
    else:
        tok = data.get_tokenizer(cfg.data)
    if jax.process_index() == 0:
        tmp = workdir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tok.save(str(tmp))
        tmp.rename(saved)
    return tok


def _write_config(run: Run) -> None:
    if run.primary and run.hf_dir:
        shutil.copyfile(run.hf_dir / "config.json", run.workdir / hf_runs.HF_CONFIG)
    if run.primary:
        path = run.workdir / "config.json"
        old = path.read_bytes().decode("utf-8", errors="replace") if path.exists() else None
        new = run.cfg.to_json()
        try:  # read with this version's defaults: a field added since is no difference
            old = old if old is None else ExperimentConfig.from_json(old).to_json()
        except ValueError:  # unreadable JSON (ConfigError is a ValueError too): diffed as text
            pass
        if old is not None and old != new:
            log.warning(f"config differs from the one this workdir was started with ({_config_diff(old, new)}); "
                        "the new one is used")
        path.write_text(new)


def _config_diff(old_json: str, new_json: str) -> str:
    """'train.steps 10 -> 15, model.dropout_rate 0.0 -> 0.1' (at most 8 keys)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    try:
        old, new = flat(json.loads(old_json)), flat(json.loads(new_json))
    except (ValueError, AttributeError):
        return "the old config.json was unreadable"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k} {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys[:8]]
    return ", ".join(parts) + (f", and {len(keys) - 8} more" if len(keys) > 8 else "")


def _check_init_from(source: str) -> None:
    """`init_from` must name a checkpoint: said in one line, before anything compiles."""
    from transformer_jax.checkpoint import resolve_step_dir
    try:
        resolve_step_dir(source, verify=False)
    except FileNotFoundError:
        raise ConfigError(f"init_from={source!r} holds no checkpoint (no <step>/state/ inside); point it at a "
                          "training run's directory or a step directory, or set init_from=none") from None


def _input_tokens(batch) -> int:
    """Token positions one step reads: inputs (and decoder inputs of span/seq2seq), padding included."""
    return sum(int(np.prod(batch[k].shape)) for k in ("inputs", "decoder_inputs") if k in batch)


def _flops_str(flops: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops >= scale:
            return f"{flops / scale:,.0f} {unit}"
    return f"{flops:,.0f} FLOP/s"


@functools.lru_cache(maxsize=None)
def _eval_bytes_cached(data_json: str) -> int:
    return data.eval_text(data.DataConfig.from_json(data_json)).num_bytes


def _eval_bytes(data_cfg) -> int:
    return _eval_bytes_cached(data_cfg.to_json())

