"""Run observability: a progress bar, `metrics.jsonl`, trackers, `loss.png` and a profiler hook.

Only process 0 writes; every process may call. Trackers share one interface (scalars,
hparams, text): `TensorBoard` always (tensorboardX, no TensorFlow needed; clu's writers import
TensorFlow), `WandB` with `train.tracker="wandb"` when wandb is installed. The plot comes from
matplotlib's Agg backend (no display needed). `StepProfiler` writes a `jax.profiler` trace of
chosen steps next to the TensorBoard events (`train.profile_steps=[start, stop]`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import jax

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool | None = None,
                 progress: bool = True, tracker: str = "none", run_name: str | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = self._jsonl = self._phase_start = None
        self._trackers: list[Tracker] = []
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        _drop_stale_records(self.workdir / "metrics.jsonl", start_step)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
        self._trackers.append(TensorBoard(self.workdir / "tensorboard"))
        if tracker == "wandb":
            self._trackers.append(WandB(self.workdir, run_name or self.workdir.name))
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1, mininterval=1.0)

    def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
        """Appends one record {"step", "kind", **metrics} and mirrors scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)}
        for t in self._trackers:
            t.scalars(int(step), scalars)

    def write_hparams(self, config: dict[str, Any]) -> None:
        """The run's settings (a nested dict, e.g. the config's JSON), flattened to dotted keys."""
        if self.enabled:
            for t in self._trackers:
                t.hparams(_flatten(config))

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A piece of text, e.g. the final sample (TensorBoard's Text tab)."""
        if self.enabled:
            for t in self._trackers:
                t.text(int(step), tag, text)

    def progress(self, step: int, **shown: float | str) -> None:
        """Moves the bar to `step` (redrawn at most once a second) and, if given, shows e.g. loss, tok/s, MFU."""
        if self._bar is None:
            return
        if shown:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                  refresh=False)
        self._bar.update(step - self._bar.n)

    def phase(self, text: str | None) -> None:
        """Shows what the run does between steps ("compiling", "evaluating") in front of the bar;
        None ends the phase. A phase's time counts in neither the bar's rate nor its ETA."""
        if self._bar is None:
            return
        now = time.time()
        if text is None and self._phase_start is not None:
            paused = now - self._phase_start
            self._bar.start_t += paused
            self._bar.last_print_t += paused
        self._phase_start = None if text is None else (self._phase_start or now)
        self._bar.set_description_str(text or "", refresh=True)

    def print(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close_progress(self) -> None:
        """Ends the bar (before a final report printed below it)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_progress()
        for t in self._trackers:
            t.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._jsonl = None
        self._trackers = []


class Tracker(Protocol):
    """Where a run's metrics go besides metrics.jsonl."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def hparams(self, values: dict[str, bool | int | float | str]) -> None: ...
    def text(self, step: int, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Event files in `logdir` (tensorboardX): scalars, the HParams tab and the Text tab."""

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter
        self._w = SummaryWriter(str(logdir))

    def scalars(self, step, values):
        for k, v in values.items():
            self._w.add_scalar(k, v, step)

    def hparams(self, values):
        from tensorboardX.summary import hparams
        # The HParams tab reads these metrics from the scalars of the same tags.
        for summary in hparams(values, {"eval/loss": 0.0, "eval/accuracy": 0.0}):
            self._w.file_writer.add_summary(summary)

    def text(self, step, tag, text):
        self._w.add_text(tag, text, step)

    def close(self):
        self._w.close()


class WandB:
    """Weights & Biases (`pip install wandb`), offline unless WANDB_MODE says otherwise: the run
    lands in <workdir>/wandb; `wandb sync` uploads it later."""

    def __init__(self, workdir: Path, name: str):
        import wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "transformer-jax"), name=name,
                               dir=str(workdir), mode=os.environ.get("WANDB_MODE", "offline"))

    def scalars(self, step, values):
        self._run.log(values, step=step)

    def hparams(self, values):
        self._run.config.update(values, allow_val_change=True)

    def text(self, step, tag, text):
        self._run.summary[tag] = text

    def close(self):
        self._run.finish()


def _flatten(tree: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"a": {"b": 1}, "c": [1, 2], "d": None} -> {"a.b": 1, "c": "[1, 2]", "d": "None"}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class StepProfiler:
    """A `jax.profiler` trace of steps start..stop (inclusive, 1-based), written under `logdir`
    (plugins/profile/<time>/<host>.xplane.pb: TensorBoard's Profile tab, or XProf).

        profiler.before(step + 1); state, m = train_step(state, batch); step += 1; profiler.after(step, m)
    """

    def __init__(self, steps: tuple[int, int] | None, logdir: str | Path):
        self.start, self.stop = steps if steps else (0, -1)
        self.logdir = Path(logdir)
        self.active = False

    def before(self, step: int) -> None:
        if not self.active and self.start <= step <= self.stop:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.stop:
            jax.block_until_ready(outputs)  # the trace holds the device work of the last step
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; unreadable lines (a write cut short by a kill) are skipped."""
    return _parse(Path(workdir) / "metrics.jsonl")[0]


def _parse(path: Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines)."""
    if not path.exists():
        return [], 0
    records, bad = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _drop_stale_records(path: Path, start_step: int) -> None:
    """Before a run appends to metrics.jsonl: drops unreadable lines (a torn last line after
    a kill) and the records of steps after `start_step` (a resumed run trains them again,
    so they would be duplicates); rewrites the file atomically if anything goes."""
    records, bad = _parse(path)
    keep = [r for r in records if r["step"] <= start_step]
    if bad:
        log.warning(f"{path}: dropped {bad} unreadable line(s) (a write cut short?)")
    if bad or len(keep) < len(records):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)


def plot_losses(workdir: str | Path, out: str | Path | None = None, *, x: str = "tokens_seen", title: str | None = None,
                baselines: dict[str, float] | None = None) -> Path | None:
    """Train and validation loss against tokens seen, from metrics.jsonl, to loss.png.

    When a validation record has bits per byte (a causal LM evaluated on its whole split), the
    y axis is bits per byte: each validation point is its record's own bits per byte (a periodic
    evaluation of the first batches has its own bytes per token), every other loss is scaled by
    the last such record's bits-per-byte / loss (the split's tokens per byte), and `baselines`
    ({compressor: bits/byte}) are drawn as horizontal lines. `title`: the experiment's name
    (default: the workdir's)."""
    records = read_metrics(workdir)
    eval_records = [r for r in records if r["kind"] == "eval" and x in r and isinstance(r.get("loss"), float)]
    with_bpb = [r for r in eval_records if isinstance(r.get("bits_per_byte"), float) and r["loss"] > 0]
    scale = with_bpb[-1]["bits_per_byte"] / with_bpb[-1]["loss"] if with_bpb else 1.0
    train = [(r[x], r["loss"] * scale) for r in records
             if r["kind"] == "train" and x in r and isinstance(r.get("loss"), float)]
    evals = [(r[x], r["bits_per_byte"] if isinstance(r.get("bits_per_byte"), float) else r["loss"] * scale)
             for r in eval_records]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*sorted(train)), label="train", linewidth=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*sorted(evals)), "o-", label="validation", linewidth=1.5)
    if with_bpb:
        for i, (name, value) in enumerate(sorted((baselines or {}).items(), key=lambda kv: -kv[1])):
            ax.axhline(value, color=f"C{i + 2}", linestyle="--", linewidth=1, label=f"{name} ({value:.3f})")
        ax.set_ylabel("bits per byte")
        top = max([v for _, v in train[len(train) // 10:] + evals] + list((baselines or {}).values()))
        ax.set_ylim(bottom=0, top=1.1 * top)  # the first steps' loss would squash the curve
    else:
        ax.set_ylabel("loss (nats)")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_title(title or Path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out) if out else Path(workdir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
