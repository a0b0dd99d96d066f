"""plan_cpu.py: the CPU prediction is the sum of the step's parts timed alone. Structure only
(which programs are timed, how their timings add up), never the time itself."""
import re

import jax
import pytest

from transformer_jax.plan import format_plan, predict
from transformer_jax.plan_cpu import Calibration
from transformer_jax.train.hardware import get_chip

jax.devices()  # conftest's 8 fake CPU devices

DOT = "f32[64,32]{0,1};f32[32,16]{1,0};lhs_contracting_dims={1},rhs_contracting_dims={0};f32[64,16]{1,0}"
BATCHED = ("f32[2,8,16]{2,1,0};f32[2,16,4]{2,1,0};lhs_batch_dims={0},lhs_contracting_dims={2},rhs_batch_dims={0},"
           "rhs_contracting_dims={1};f32[2,8,4]{2,1,0}")
# what plan.measure() returns, as far as the CPU model reads it: (executions, FLOPs, bytes, kind) per op
FIGURES = dict(dots={DOT: 12.0, BATCHED: 3.0},
               ops=[[12.0, 2 * 64 * 16 * 32, 1e4, "elementwise"], [3.0, 2 * 2 * 8 * 4 * 16, 1e3, "elementwise"],
                    [5.0, 0.0, 2e5, "elementwise"], [7.0, 0.0, 4e3, "reduce"]],
               collective_ops={"all-reduce 8 4096": 4.0, "all-gather 4 1024": 2.0, "all-reduce 1 64": 9.0})


@pytest.fixture(scope="module")
def cal():
    return Calibration(FIGURES, 8).sample(2)


def test_each_distinct_dot_is_timed_as_the_step_runs_it(cal):
    assert set(cal.dots) == {DOT, BATCHED}
    for sig, timer in cal.dots.items():
        text = timer.fn.as_text()
        local = sig.split(";")[-1].split("{")[0]  # the per-device result shape: the step's own
        assert re.search(rf"= {re.escape(local)}\S* (dot|fusion)\(", text), sig
        assert "while" in text  # repeated in a loop: dispatch left out
        assert len(timer.samples) == 2 and all(t > 0 for t in timer.samples)
    assert "f32[32,64]" in cal.dots[DOT].fn.as_text()  # the step's {0,1} operand: stored transposed
    # collectives: per (kind, group) at 4 KiB and at the step's largest; groups of 1 are no collective
    assert set(cal.collectives) == {("all-reduce", 8), ("all-gather", 4)}
    assert sorted(cal.collectives["all-reduce", 8]) == [4096, 8192]
    # memory-bound ops: a curve per kind the step has (and elementwise) at 4 KiB, 64 KiB and every
    # 4x up to the largest op (2e5 bytes); the reduce kind's program reduces
    assert sorted(cal.memory) == ["elementwise", "reduce"]
    assert all(sorted(curve) == [4096, 65536, 200000] for curve in cal.memory.values())
    assert "reduce(" in cal.memory["reduce"][65536].fn.as_text()
    assert "reduce(" not in cal.memory["elementwise"][65536].fn.as_text()


def test_memory_bound_ops_are_timed_on_their_kinds_curve_between_its_points(cal):
    (s0, a), (s1, b), (s2, c) = sorted((s, t.seconds()) for s, t in cal.memory["reduce"].items())
    op = lambda nbytes: cal.op_seconds(nbytes, "reduce")  # noqa: E731
    assert op(100) == op(s0) == a  # flat below the smallest point
    assert op(s1) == pytest.approx(b) and op(s2) == pytest.approx(c)
    assert op((s1 + s2) / 2) == pytest.approx((b + c) / 2)
    assert op(2 * s2) == pytest.approx(c + max(0.0, c - b) * s2 / (s2 - s1))  # the last slope, on
    assert cal.op_seconds(s1, "permute") == cal.op_seconds(s1)  # a kind not timed: elementwise
    fig = cal.figures()
    assert fig["op_s"] == min(t.seconds() for t in cal.memory["elementwise"].values())
    assert sorted(fig["curves"]) == ["elementwise", "reduce"] and sorted(fig["curves"]["reduce"]) == [s0, s1, s2]
    moved = 5 * (cal.op_seconds(2e5) - fig["op_s"]) + 7 * (op(4e3) - fig["op_s"])
    assert fig["bandwidth"] == pytest.approx((5 * 2e5 + 7 * 4e3) / moved)


def test_prediction_is_the_sum_of_the_timed_parts(cal):
    p, fig = cal.predict(), cal.figures()
    assert p["compute_s"] == pytest.approx(12 * cal.dots[DOT].seconds() + 3 * cal.dots[BATCHED].seconds())
    assert p["memory_s"] == pytest.approx(5 * cal.op_seconds(2e5, "elementwise") + 7 * cal.op_seconds(4e3, "reduce"))
    lat, per_byte = fig["collectives"]["all-reduce 8"]
    assert p["comm_by_kind_s"]["all-reduce"] == pytest.approx(4 * (lat + 4096 * per_byte))
    assert p["step_s"] == pytest.approx(p["compute_s"] + p["memory_s"] + p["comm_s"])
    assert fig["matmul_flops_per_s"] == pytest.approx((12 * 2 * 64 * 16 * 32 + 3 * 2 * 2 * 8 * 4 * 16) / p["compute_s"])


def test_plan_on_cpu_predicts_one_step_from_the_timings(cal):
    chip = get_chip("cpu", 8)
    m = dict(FIGURES, cpu=cal.predict(), model_flops=8 * 1e6, dot_flops=2e6, temp_bytes=1e6, argument_bytes=1e6,
             output_bytes=1e6, alias_bytes=0.0,
             collectives={k: dict(count=1.0, operand_bytes=1.0, link_bytes=1.0, array_bytes=1.0)
                          for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")})
    p = predict(m, chip, 8, tokens=512)
    assert p["step_s"] == pytest.approx(m["cpu"]["step_s"]) and p["comm_exposed_s"] == m["cpu"]["comm_s"]
    assert p["efficiency"] == pytest.approx(p["calibration"]["matmul_flops_per_s"] / chip.peak_flops)
    assert p["mfu"] == pytest.approx(1e6 / chip.peak_flops / p["step_s"])
    # the footnote's range: the timed parts all overlapped .. none overlapped (the prediction: XLA:CPU overlaps none)
    assert p["step_fast_s"] == max(p["compute_s"], p["memory_s"], p["comm_s"]) and p["step_slow_s"] == p["step_s"]
    m.update(params=1e6, param_bytes=4e6, opt_bytes=8e6, batch_bytes=1e3, mesh="data=8 x fsdp=1 x tensor=1",
             preset="dp", compiled_layers=[2])
    text = format_plan(dict(name="x", devices=8, tokens=512, batch=8, seq_len=64, notes=[], suggestion=None,
                            model=dict(family="decoder", layers=2, remat="none", dtype="float32",
                                       param_dtype="float32", grad_accum=1), measured=m, prediction=p))
    assert "timed on this host" in text and text.count("MFU") == 3 and "[1] bounds" in text  # one MFU + footnote
