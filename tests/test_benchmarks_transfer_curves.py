"""benchmarks/transfer_curves.py: its report logic, its baselines, and (slow) a quick end-to-end run."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("transfer_curves", ROOT / "benchmarks" / "transfer_curves.py")
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)


def _results(curves: dict) -> dict:
    """variant -> one run per seed, from variant -> [per-seed {step: metric}]."""
    return {v: [dict(curve=c, trained=10, params=20, seconds=1.0) for c in cs] for v, cs in curves.items()}


def test_catch_up_and_spread():
    evals = (10, 20, 40)
    results = _results({
        "pretrained": [{10: 0.5, 20: 0.6, 40: 0.6}, {10: 0.4, 20: 0.6, 40: 0.7}],
        "scratch": [{10: 0.1, 20: 0.5, 40: 0.7}, {10: 0.3, 20: 0.3, 40: 0.6}],
        "lora": [{10: 0.2, 20: 0.2, 40: 0.2}, {10: 0.2, 20: 0.2, 40: 0.2}]})
    summ = tc.summarise(results, evals)
    assert summ["pretrained"][10] == pytest.approx((0.45, 0.4, 0.5))
    assert tc.catch_up(summ, evals) == 40  # means 0.65 vs 0.65 (and scratch behind before)
    assert tc.catch_up(tc.summarise(results, evals[:2]), evals[:2]) is None
    s = dict(evals=evals, ft_batch=4, seq_len=8)
    pre = dict(steps=5, batch=2, seq_len=8, input_tokens=80, flops=1e9, seconds=3.0, step_seconds=1.0, params=100,
               eval_loss=1.0, eval_accuracy=0.5)
    table = tc.markdown("classify", s, results, pre, ("idlelib", 0.0625), range(2))
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["10", "20", "40"]
    assert [r.split("|")[-2].strip() for r in rows] == ["yes", "yes", "no"]  # 0.4 > 0.3, 0.6 > 0.5, 0.6 < 0.7
    assert "`idlelib`): **0.062**" in table and "Scratch catches up: at 40 steps" in table


def test_classify_baseline_is_chance():
    answer, score = tc.constant_baseline("classify")
    assert answer == "idlelib"  # the largest package in training
    assert score == pytest.approx(1 / 16)


@pytest.mark.slow  # minutes: builds the data, pretrains and fine-tunes three tiny models
def test_quick_run_writes_table_png_and_json(tmp_path):
    assert tc.main(["--quick", "--no-compile-cache", "--task", "classify", "--seeds", "1",
                    "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "runs")]) == 0
    table = (tmp_path / "out" / "classify.md").read_text()
    assert "| 2 | 16 |" in table and "| 4 | 32 |" in table
    data = json.loads((tmp_path / "out" / "classify.json").read_text())
    for v in tc.VARIANTS:
        assert set(data["results"][v][0]["curve"]) == {"2", "4"}
        assert all(0.0 <= x <= 1.0 for x in data["results"][v][0]["curve"].values())
    assert data["results"]["lora"][0]["trained"] < data["results"]["pretrained"][0]["trained"]
    assert (tmp_path / "out" / "classify.png").read_bytes()[:4] == b"\x89PNG"
