"""metrics.py: loss.png in bits per byte with the compressors as reference lines."""
import json

import matplotlib.image
import numpy as np

from transformer_jax.metrics import plot_losses


def _write(workdir, records):
    workdir.mkdir(exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_lm_loss_curve_is_in_bits_per_byte_with_compressor_lines(tmp_path):
    records = [{"step": s, "kind": "train", "tokens_seen": 100 * s, "loss": 4.0 - 0.2 * s} for s in range(1, 11)]
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
    # every loss scaled by the final validation record's bits per byte / loss = 0.5
    np.testing.assert_allclose(captured["lines"]["validation"], [1.0])
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
