"""metrics.py: loss.png in bits per byte with the compressors as reference lines; what the
trackers write (read back from the TensorBoard event files and the offline W&B run), the
profiler hook's trace, and the settings that turn them on; metrics.jsonl survives kills and
resumes; the progress bar's rate leaves compile/eval phases out."""
import json
import struct
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from transformer_jax.config import ConfigError
from transformer_jax.experiment import TrainConfig
from transformer_jax.metrics import MetricsWriter, StepProfiler, plot_losses, read_metrics


def _write(workdir, records):
    workdir.mkdir(exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_lm_loss_curve_is_in_bits_per_byte_with_compressor_lines(tmp_path):
    records = [{"step": s, "kind": "train", "tokens_seen": 100 * s, "loss": 4.0 - 0.2 * s} for s in range(1, 11)]
    # a periodic evaluation of the first batches (more bytes per token than the whole split), then the whole split
    records.append({"step": 5, "kind": "eval", "tokens_seen": 500, "loss": 3.0, "bits_per_byte": 1.2})
    records.append({"step": 10, "kind": "eval", "tokens_seen": 1000, "loss": 2.0, "bits_per_byte": 1.0})
    _write(tmp_path / "run", records)
    import matplotlib.pyplot as plt
    captured = {}
    savefig = plt.Figure.savefig

    def spy(fig, *a, **k):  # the real savefig, after reading what was drawn
        ax = fig.axes[0]
        captured.update(title=ax.get_title(), ylabel=ax.get_ylabel(),
                        lines={ln.get_label(): ln.get_ydata() for ln in ax.get_lines()})
        return savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        out = plot_losses(tmp_path / "run", title="default", baselines={"gzip -9": 1.9, "ppmd o16": 1.4})
    finally:
        plt.Figure.savefig = savefig
    assert out.exists() and matplotlib.image.imread(out).shape[2] in (3, 4)
    assert captured["title"] == "default" and captured["ylabel"] == "bits per byte"
    # validation points: each record's own bits per byte; train losses scaled by the final record's bpb / loss = 0.5
    np.testing.assert_allclose(captured["lines"]["validation"], [1.2, 1.0])
    np.testing.assert_allclose(captured["lines"]["train"], [0.5 * (4.0 - 0.2 * s) for s in range(1, 11)])
    assert list(captured["lines"]["gzip -9 (1.900)"]) == [1.9, 1.9]
    assert list(captured["lines"]["ppmd o16 (1.400)"]) == [1.4, 1.4]


def test_runs_without_bits_per_byte_keep_nats(tmp_path):
    _write(tmp_path / "mlm", [{"step": 1, "kind": "train", "tokens_seen": 10, "loss": 3.0},
                              {"step": 1, "kind": "eval", "tokens_seen": 10, "loss": 2.5}])
    import matplotlib.pyplot as plt
    seen = {}
    savefig = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, *a, **k: (seen.update(ylabel=fig.axes[0].get_ylabel(),
                                                           title=fig.axes[0].get_title()), savefig(fig, *a, **k))[1]
    try:
        assert plot_losses(tmp_path / "mlm", baselines={"gzip -9": 1.9}).exists()
    finally:
        plt.Figure.savefig = savefig
    assert seen == {"ylabel": "loss (nats)", "title": "mlm"}


def tensorboard_events(logdir: Path) -> list:
    """Every `Event` of the event files in `logdir` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            events.append(event)
            i += 12 + n + 4
    return events


def summary_values(logdir: Path) -> list[tuple[int, object]]:
    return [(e.step, v) for e in tensorboard_events(logdir) for v in e.summary.value]


def hparams_of(logdir: Path) -> dict:
    """The hyperparameters of the HParams tab's session-start record."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    for _, v in summary_values(logdir):
        if v.metadata.plugin_data.plugin_name == "hparams":
            data = HParamsPluginData.FromString(v.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                return {k: getattr(x, x.WhichOneof("kind")) for k, x in data.session_start_info.hparams.items()}
    return {}


def texts_of(logdir: Path) -> dict[str, tuple[int, str]]:
    return {v.tag: (step, v.tensor.string_val[0].decode()) for step, v in summary_values(logdir)
            if v.metadata.plugin_data.plugin_name == "text"}


def test_tensorboard_gets_scalars_hparams_and_text(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=3, enabled=True, progress=False)
    w.write(1, {"loss": 2.5, "nll": float("nan")})
    w.write(2, {"loss": 2.0}, kind="eval")
    w.write_hparams({"name": "tiny", "model": {"d_model": 64, "dropout_rate": 0.1, "num_kv_heads": None},
                     "train": {"profile_steps": [2, 3], "scan": True}})
    w.write_text(3, "sample", "def f():\n    return 1")
    w.close()
    logdir = tmp_path / "tensorboard"
    scalars = {(v.tag, step): v.simple_value for step, v in summary_values(logdir) if v.HasField("simple_value")}
    assert scalars == {("train/loss", 1): 2.5, ("eval/loss", 2): 2.0}  # the nan is not a point
    assert hparams_of(logdir) == {"name": "tiny", "model.d_model": 64, "model.dropout_rate": pytest.approx(0.1),
                                  "model.num_kv_heads": "None", "train.profile_steps": "[2, 3]", "train.scan": True}
    assert texts_of(logdir) == {"sample/text_summary": (3, "def f():\n    return 1")}
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.5


def test_step_profiler_traces_the_chosen_steps(tmp_path):
    @jax.jit
    def profiled_step(x):
        return jnp.sin(x) @ x

    profiler = StepProfiler((2, 3), tmp_path)
    x, active = jnp.ones((64, 64)), []
    for step in range(5):
        profiler.before(step + 1)
        active.append(profiler.active)
        x = profiled_step(x)
        profiler.after(step + 1, x)
    profiler.close()
    assert active == [False, True, True, False, False]
    (trace,) = tmp_path.glob("plugins/profile/*/*.xplane.pb")  # what TensorBoard's Profile tab and XProf read
    assert b"profiled_step" in trace.read_bytes()
    off = StepProfiler(None, tmp_path / "off")
    off.before(1)
    assert not off.active and not (tmp_path / "off").exists()


def test_profile_steps_and_tracker_settings_are_checked():
    TrainConfig(profile_steps=(3, 3)).validate()
    with pytest.raises(ConfigError, match=r"^train.profile_steps=\[3, 2\] must be \[start, stop\] with 1 <= start"):
        TrainConfig(profile_steps=(3, 2)).validate()
    with pytest.raises(ConfigError, match=r"^train.profile_steps=\[0, 2\]"):
        TrainConfig(profile_steps=(0, 2)).validate()
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^train.tracker='wandb' needs the wandb package: pip install wandb"):
            TrainConfig(tracker="wandb").validate()


def test_wandb_tracker_writes_an_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    w = MetricsWriter(tmp_path, total_steps=3, enabled=True, progress=False, tracker="wandb", run_name="tiny")
    w.write_hparams({"model": {"d_model": 64}})
    w.write(1, {"loss": 2.5})
    w.write_text(3, "sample", "def f():")
    w.close()
    # what `wandb sync` uploads: protobuf records, strings stored as they are. wandb's service process
    # may still be flushing it after finish() returns (seen under load), so wait for it, boundedly.
    wanted, deadline, records = (b"train/loss", b"model.d_model", b"def f():"), time.time() + 60, b""
    while not all(s in records for s in wanted) and time.time() < deadline:
        time.sleep(0.2)
        records = b"".join(f.read_bytes() for f in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert all(s in records for s in wanted), records[:200]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard too


def _lines(wd):
    return (wd / "metrics.jsonl").read_text().splitlines()


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    w = MetricsWriter(tmp_path, total_steps=4, progress=False)
    w.write(1, {"loss": 2.0})
    w.write(2, {"loss": 1.5})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tra')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # readers skip it
    w = MetricsWriter(tmp_path, total_steps=4, start_step=2, progress=False)
    w.write(3, {"loss": 1.2})
    w.close()
    assert "dropped 1 unreadable line(s)" in caplog.text
    assert [json.loads(x)["step"] for x in _lines(tmp_path)] == [1, 2, 3]


def test_a_resume_drops_the_records_of_steps_it_trains_again(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=6, progress=False)
    for s in range(1, 6):
        w.write(s, {"loss": 1.0 / s})
    w.write(4, {"loss": 0.5}, kind="eval")
    w.close()
    w = MetricsWriter(tmp_path, total_steps=6, start_step=3, progress=False)  # the checkpoint was at step 3
    w.write(4, {"loss": 0.3})
    w.close()
    assert [(r["step"], r["kind"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, "train", 1.0), (2, "train", 0.5), (3, "train", pytest.approx(1 / 3)), (4, "train", 0.3)]


def test_phases_show_in_the_bar_and_do_not_count_in_its_rate(tmp_path, capsys):
    w = MetricsWriter(tmp_path, total_steps=100, start_step=50)
    w.phase("compiling the train step")
    for clock in ("start_t", "last_print_t"):  # as if compiling took an hour (no sleeping in tests)
        setattr(w._bar, clock, getattr(w._bar, clock) - 3600.0)
    w._phase_start -= 3600.0
    w.phase(None)
    w.progress(51)
    assert w._bar.format_dict["elapsed"] < 60.0  # the ETA is not the hour of compilation over 1 step
    assert w._bar.n == 51
    w.close()
    assert "compiling the train step" in capsys.readouterr().err
