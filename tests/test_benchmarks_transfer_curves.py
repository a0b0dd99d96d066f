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


def test_name_table_adds_token_accuracy_with_its_constant_answer():
    evals = (10, 20)
    exact = {"pretrained": [{10: 0.0, 20: 0.1}] * 2, "scratch": [{10: 0.0, 20: 0.0}] * 2,
             "lora": [{10: 0.0, 20: 0.0}] * 2}
    tokens = {"pretrained": [{10: 0.30, 20: 0.40}, {10: 0.32, 20: 0.41}],
              "scratch": [{10: 0.20, 20: 0.42}, {10: 0.25, 20: 0.38}], "lora": [{10: 0.1, 20: 0.2}] * 2}
    results = _results(exact)
    for v in results:
        for run, curve in zip(results[v], tokens[v]):
            run.update(token_curve=curve, token_baseline=0.053)
    s = dict(evals=evals, ft_batch=32, seq_len=64)
    pre = dict(steps=5, batch=2, seq_len=64, input_tokens=640, flops=1e9, seconds=3.0, step_seconds=1.0, params=100,
               eval_loss=1.0, eval_accuracy=0.5)
    table = tc.markdown("name", s, results, pre, ("close", 0.023), range(2))
    head, tail = table.split("### name: validation token accuracy")
    rows = [line.split("|") for line in tail.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert "`close`): **0.023**" in head and "`close`: **0.053**" in tail
    assert [r[-2].strip() for r in rows] == ["yes", "no"]  # 0.30 > 0.25; 0.40 < 0.42
    assert [r[-3].strip() for r in rows] == ["+0.085", "+0.005"]
    assert "Scratch catches up: not within 20 steps." in tail


def test_classify_baseline_is_chance():
    answer, score = tc.constant_baseline("classify")
    assert answer == "idlelib"  # the largest package in training
    assert score == pytest.approx(1 / 16)


@pytest.mark.slow  # a minute: tokenizes the validation names
def test_constant_answer_scored_through_the_pipeline_matches_the_records(tmp_path):
    """name_scores sees every validation name once, whole: the constant answer scores the same through
    the batches as on the records."""
    from transformer_jax.train.loop import Run
    run = Run(tc.finetune_config("name", tc.settings("name", quick=True), "scratch", 0), tmp_path)
    answer, exact = tc.constant_baseline("name")
    scores = tc.name_scores(run, None, answer)
    assert scores["exact_match"] == pytest.approx(exact) and exact > 0
    assert exact < scores["token_accuracy"] < 0.2  # names sharing the answer's first token get partial credit


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
