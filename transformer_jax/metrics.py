"""Run observability: a progress bar, `metrics.jsonl`, TensorBoard event files and `loss.png`.

Only process 0 writes; every process may call. TensorBoard files come from tensorboardX
(no TensorFlow needed); the plot from matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool | None = None,
                 progress: bool = True):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = self._tb = self._jsonl = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
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
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, step: int, **shown: float | str) -> None:
        """Moves the bar to `step` and shows e.g. loss, tok/s, MFU."""
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()},
                              refresh=False)
        self._bar.refresh()

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
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(workdir: str | Path, out: str | Path | None = None, *, x: str = "tokens_seen", title: str | None = None,
                baselines: dict[str, float] | None = None) -> Path | None:
    """Train and validation loss against tokens seen, from metrics.jsonl, to loss.png.

    When a validation record has bits per byte (a causal LM evaluated on its whole split), the
    y axis is bits per byte: every loss is scaled by that record's bits-per-byte / loss (the
    split's tokens per byte), and `baselines` ({compressor: bits/byte}) are drawn as
    horizontal lines. `title`: the experiment's name (default: the workdir's)."""
    records = read_metrics(workdir)
    train = [(r[x], r["loss"]) for r in records if r["kind"] == "train" and x in r and isinstance(r.get("loss"), float)]
    evals = [(r[x], r["loss"]) for r in records if r["kind"] == "eval" and x in r and isinstance(r.get("loss"), float)]
    if not train and not evals:
        return None
    with_bpb = [r for r in records if r["kind"] == "eval" and isinstance(r.get("bits_per_byte"), float)
                and isinstance(r.get("loss"), float) and r["loss"] > 0]
    scale = with_bpb[-1]["bits_per_byte"] / with_bpb[-1]["loss"] if with_bpb else 1.0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*sorted((t, v * scale) for t, v in train)), label="train", linewidth=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*sorted((t, v * scale) for t, v in evals)), "o-", label="validation", linewidth=1.5)
    if with_bpb:
        for i, (name, value) in enumerate(sorted((baselines or {}).items(), key=lambda kv: -kv[1])):
            ax.axhline(value, color=f"C{i + 2}", linestyle="--", linewidth=1, label=f"{name} ({value:.3f})")
        ax.set_ylabel("bits per byte")
        top = max([v * scale for _, v in train[len(train) // 10:] + evals] + list((baselines or {}).values()))
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
