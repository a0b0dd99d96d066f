"""`transformer-jax plan`: memory per device against the real sharded arrays, collective bytes
against the DP / FSDP / TP formulas ("How to Scale Your Model", ch. 5), the HLO reader on
hand-written programs, the prediction arithmetic, the fit warning and the CLI."""
import dataclasses
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from transformer_jax.cli import main
from transformer_jax.experiment import load_experiment
from transformer_jax.hlo_analysis import analyze_hlo, group_size
from transformer_jax.parallel import get_rules, make_mesh
from transformer_jax.plan import format_plan, measure, parse_mesh, plan, predict
from transformer_jax.train import make_train_setup
from transformer_jax.train.hardware import (CHIPS, chip_for_device_kind, get_chip, host_matmul_peak,
                                              peak_flops_per_device)

jax.devices()  # backends up: plan() compiles in this process, on conftest's 8 fake devices

B, L, D, LAYERS = 16, 128, 128, 2
# f32 and untied embeddings, so every gradient is one array of the parameter's size.
SMALL = ["data.tokenizer=byte", "model.vocab_size=512", f"model.d_model={D}", "model.num_heads=8", "model.d_ff=512",
         f"model.num_layers={LAYERS}", "model.max_len=128", f"train.seq_len={L}", f"train.global_batch_size={B}",
         "model.tie_embeddings=false", "model.dtype=float32"]


def _cfg(preset, data=1, fsdp=1, tensor=1, extra=()):
    return load_experiment("tiny", SMALL + [f"mesh.preset={preset}", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                            f"mesh.tensor={tensor}", *extra])


def _setup(cfg):
    mesh = make_mesh(cfg.mesh)
    return make_train_setup(cfg.model, cfg.optimizer, cfg.task, mesh, get_rules(cfg.mesh.preset), 10)


def _param_bytes(setup, sharded_over=None, layers=None):
    """Full (unsharded) bytes of the parameters, or of those split over mesh axis `sharded_over`;
    layers=True/False: only those inside / outside the scanned layer stack."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(setup.abstract_state.params):
        axes = {a for entry in x.sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
        in_stack = "layers" in jax.tree_util.keystr(path)
        if (sharded_over is None or sharded_over in axes) and layers in (None, in_stack):
            total += math.prod(x.shape) * x.dtype.itemsize
    return total


@pytest.fixture(scope="module")
def measured():
    cfgs = {"dp": _cfg("dp", data=8), "fsdp": _cfg("fsdp", fsdp=8), "tp": _cfg("tp", tensor=8)}
    return {k: (cfg, measure(cfg, 8)) for k, cfg in cfgs.items()}


def test_memory_per_device_matches_the_sharded_arrays():
    cfg = _cfg("fsdp_tp", data=2, fsdp=2, tensor=2)
    result = plan(cfg, chip="v5e")  # in process: this process has the 8 devices
    m = result["measured"]
    state = _setup(cfg).init_state()  # the real arrays, sharded from birth
    dev = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)

    params, opt = on_device(state.params), on_device(state.opt_state)
    assert m["param_bytes"] == pytest.approx(params, rel=0.1) and m["opt_bytes"] == pytest.approx(opt, rel=0.1)
    assert params < _param_bytes(_setup(cfg)) / 2  # really sharded
    # XLA's argument buffers are the state and this device's rows of the batch
    actual_args = on_device(state) + m["batch_bytes"]
    assert m["argument_bytes"] == pytest.approx(actual_args, rel=0.1)
    assert result["prediction"]["peak_bytes"] >= m["argument_bytes"] + m["temp_bytes"] - m["alias_bytes"]
    # weights are gathered within fsdp x tensor groups (4 devices), never across data replicas
    ag = m["collectives"]["all-gather"]
    assert ag["count"] > 0 and ag["operand_bytes"] <= ag["link_bytes"] <= 3 * ag["operand_bytes"]


def test_data_parallel_reduces_the_gradients_and_gathers_the_weights_once(measured):
    cfg, m = measured["dp"]
    p = _param_bytes(_setup(cfg))
    rs, ag, ar = (m["collectives"][k] for k in ("reduce-scatter", "all-gather", "all-reduce"))
    # the weight update split over data: every f32 gradient reduce-scattered, every weight gathered
    assert rs["operand_bytes"] == pytest.approx(p, rel=0.03)
    assert 8 * ag["operand_bytes"] == pytest.approx(p, rel=0.03)
    assert rs["link_bytes"] + ag["link_bytes"] == pytest.approx(2 * 7 / 8 * p, rel=0.03)  # a ring all-reduce's
    assert ar["operand_bytes"] < 1e-3 * p  # a few scalars


def test_fsdp_gathers_params_twice_and_reduce_scatters_gradients(measured):
    cfg, m = measured["fsdp"]
    setup = _setup(cfg)
    sharded = _param_bytes(setup, "fsdp")
    replicated = _param_bytes(setup) - sharded
    ag, rs, ar = (m["collectives"][k] for k in ("all-gather", "reduce-scatter", "all-reduce"))
    # forward and backward each gather every layer's weights (2 x, the scan keeps no gathered copy);
    # the weights outside the scan are gathered once and kept for the backward pass, except the
    # (untied) token table: its lookup runs in each device's columns (layers/embeddings.py)
    stack, rest = _param_bytes(setup, "fsdp", layers=True), _param_bytes(setup, "fsdp", layers=False)
    token = 4 * 512 * D
    assert 8 * ag["operand_bytes"] == pytest.approx(2 * stack + rest - token, rel=0.01)
    assert ag["link_bytes"] == pytest.approx(7 * ag["operand_bytes"])
    # gradients: reduce-scattered (XLA:CPU's all-reduce + slice, counted as such), replicated ones
    # all-reduced; the token table's lookup gradient is whole in each device's columns already
    assert rs["operand_bytes"] == pytest.approx(sharded - token, rel=0.01)
    assert ar["operand_bytes"] == pytest.approx(replicated, rel=0.05, abs=4096)
    assert m["sliced_all_reduces"] > 0


def test_tensor_parallel_gathers_and_scatters_activations(measured):
    cfg, m = measured["tp"]
    act = B * L * D * 4  # one [batch, length, d_model] f32 activation (tensor=8: every device has all rows)
    ag, rs, ar = (m["collectives"][k]["operand_bytes"] for k in ("all-gather", "reduce-scatter", "all-reduce"))
    # Megatron's minimum with sequence parallelism: 4 gathers and 4 reduce-scatters per layer (2
    # forward, 2 backward; q/k/v are one matmul, so their input gradients are reduced once); the
    # vocab-split embedding and unembedding add 2 of each. At most one activation (the chunked
    # fused loss's dh) is all-reduced instead.
    assert 8 * ag >= 4 * LAYERS * act and rs >= 4 * LAYERS * act
    assert ar <= 1.1 * act
    assert 8 * ag + rs + ar == pytest.approx((8 * LAYERS + 4) * act, rel=0.1)


def test_prediction_is_the_stated_arithmetic(measured):
    _, m = measured["fsdp"]
    chip = CHIPS["v5p"]
    p = predict(m, chip, devices=8, tokens=B * L)
    rate, bw = chip.peak_flops * chip.matmul_efficiency, chip.hbm_bandwidth
    assert p["hardware_flops"] == m["dot_flops"] >= m["model_flops"] / 8  # loops counted: no model-FLOP floor needed
    assert p["compute_s"] == pytest.approx(sum(t * max(f / rate, b / bw) for t, f, b, _ in m["ops"] if f))
    assert p["compute_s"] >= m["dot_flops"] / rate
    assert p["memory_s"] == pytest.approx(sum(t * b / bw for t, f, b, _ in m["ops"] if not f)) and p["memory_s"] > 0
    comm = {k: c["link_bytes"] / chip.link_bandwidth for k, c in m["collectives"].items()}
    assert p["comm_s"] == pytest.approx(sum(comm.values()))
    hidden = comm["all-gather"] + comm["reduce-scatter"]  # FSDP's gathers and scatters overlap compute on TPU
    assert hidden > 0 and p["comm_exposed_s"] == pytest.approx(p["comm_s"] - hidden + max(0, hidden - p["compute_s"]))
    assert p["step_s"] == pytest.approx(p["compute_s"] + p["memory_s"] + p["comm_exposed_s"])
    assert p["mfu"] == pytest.approx(m["model_flops"] / 8 / chip.peak_flops / p["step_s"])
    assert 0 < p["mfu_slow"] <= p["mfu"] <= p["mfu_fast"] <= 1.0 + 1e-9
    assert p["tokens_per_s_per_chip"] == pytest.approx(B * L / p["step_s"] / 8)
    # on CPU nothing overlaps: every collective is on the step's path
    cpu = predict(m, dataclasses.replace(chip, overlaps_collectives=False), 8, B * L)
    assert cpu["comm_exposed_s"] == pytest.approx(cpu["comm_s"])
    tiny = dataclasses.replace(chip, hbm_bytes=p["peak_bytes"] / 2)
    assert p["fits"] and not predict(m, tiny, 8, B * L)["fits"]


def test_the_split_weight_update_is_not_hidden(measured):
    # DP's reduce-scatter of the gradients (after the backward) and all-gather of the new weights
    # (after Adam) have nothing left to overlap with: on the step's path even on an overlapping chip
    cfg, m = measured["dp"]
    chip = CHIPS["v5p"]
    update = 2 * _param_bytes(_setup(cfg)) * 7 / 8  # every f32 weight, split over data=8
    assert m["update_link_bytes"] == pytest.approx(update, rel=0.01)
    p = predict(m, chip, devices=8, tokens=B * L)
    assert p["comm_exposed_s"] >= 0.99 * update / chip.link_bandwidth > 0
    assert p["comm_exposed_s"] == pytest.approx(p["comm_s"], rel=0.01)  # nothing else to hide in dp


def test_report_shows_textbook_beside_measured_and_one_mfu(measured):
    cfg, m = measured["dp"]
    result = dict(name="x", devices=8, tokens=B * L, batch=B, seq_len=L, notes=[], suggestion=None,
                  model=dict(family="decoder", layers=LAYERS, remat="none", dtype="float32", param_dtype="float32",
                             grad_accum=1), measured=m, prediction=predict(m, CHIPS["v5e"], 8, B * L))
    text = format_plan(result)
    for kind in ("reduce-scatter", "all-gather"):  # DP: every gradient once, every weight once, the textbook
        row = next(line for line in text.splitlines() if line.strip().startswith(kind))
        assert "1.00x" in row, row
    assert text.count("MFU") == 3 and "[1] bounds" in text  # one MFU, the range in the footnote


def test_report_warns_when_it_does_not_fit(measured):
    cfg, m = measured["dp"]
    small = dataclasses.replace(CHIPS["v5e"], hbm_bytes=m["temp_bytes"] / 2)
    result = dict(name="x", devices=8, tokens=B * L, batch=B, seq_len=L, notes=["a note"], suggestion=None,
                  model=dict(family="decoder", layers=LAYERS, remat="none", dtype="float32", param_dtype="float32",
                             grad_accum=1), measured=m, prediction=predict(m, small, 8, B * L))
    text = format_plan(result)
    assert "DOES NOT FIT" in text and "WARNING" in text and "remat" in text and "a note" in text
    result["prediction"] = predict(m, CHIPS["v5e"], 8, B * L)
    assert "DOES NOT FIT" not in format_plan(result) and "all-reduce" in format_plan(result)


HLO = """HloModule m

%body (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %p = (s32[], f32[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,32]{1,0} get-tuple-element(%p), index=1
  %w = f32[32,32]{1,0} constant({...})
  %d = f32[64,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[64,128]{1,0} all-gather(%d), channel_id=1, replica_groups=[2,4]<=[8], dimensions={1}
  %s = f32[64,32]{1,0} slice(%ag), slice={[0:64], [0:32]}
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%i, %s)
}

%cond (c: (s32[], f32[64,32])) -> pred[] {
  %c = (s32[], f32[64,32]{1,0}) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %k = s32[] constant(5)
  ROOT %lt = pred[] compare(%n, %k), direction=LT
}

ENTRY %main (a: f32[64,32], b: f32[16]) -> (f32[64,32], f32[4], f32[16]) {
  %a = f32[64,32]{1,0} parameter(0)
  %b = f32[16]{0} parameter(1)
  %z = s32[] constant(0)
  %init = (s32[], f32[64,32]{1,0}) tuple(%z, %a)
  %loop = (s32[], f32[64,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = f32[64,32]{1,0} get-tuple-element(%loop), index=1
  %pid = s32[] partition-id()
  %ar = (f32[16]{0}, f32[16]{0}) all-reduce(%b, /*index=1*/%b), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %g0 = f32[16]{0} get-tuple-element(%ar), index=0
  %g1 = f32[16]{0} get-tuple-element(%ar), index=1
  %slice = f32[4]{0} dynamic-slice(%g0, %pid), dynamic_slice_sizes={4}
  ROOT %r = (f32[64,32]{1,0}, f32[4]{0}, f32[16]{0}) tuple(%out, %slice, %g1)
}
"""


def test_hlo_reader_counts_loops_groups_and_sliced_all_reduces():
    s = analyze_hlo(HLO, num_devices=8)
    assert s.loops == {"body": 3} and not s.unknown_loops
    assert s.dot_flops == 3 * 2 * 64 * 32 * 32  # trip count x 2 x output x contracted
    ag = s.collectives["all-gather"]
    assert ag.count == 3 and ag.operand_bytes == 3 * 64 * 32 * 4 and ag.link_bytes == 3 * 3 * 64 * 32 * 4
    # the all-reduce tuple: element 0 is only sliced (-> reduce-scatter), element 1 is used whole
    assert s.sliced_all_reduces == 1
    assert s.collectives["reduce-scatter"].operand_bytes == 64 and s.collectives["all-reduce"].operand_bytes == 64
    # what plan_cpu.py times: each distinct dot and each collective as emitted, with executions per step
    assert s.dots == {"f32[64,32]{1,0};f32[32,32]{1,0};lhs_contracting_dims={1},rhs_contracting_dims={0};"
                      "f32[64,32]{1,0}": 3}
    assert s.collective_ops == {"all-gather 4 8192": 3, "all-reduce 4 128": 1}  # the sliced one stays an all-reduce
    assert s.collectives["all-reduce"].link_bytes == 2 * 64 * 3 / 4
    unknown = analyze_hlo(HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""), 8)
    assert unknown.loops == {"body": 5}  # from the condition's compare(i, 5)


def test_group_size_formats():
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, x", 8) == 4
    assert group_size("replica_groups=mesh['a'=2,'b'=2,'c'=2] {'a','c'}", 8) == 4
    assert group_size("replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}", 8) == 4
    assert group_size("replica_groups=[4,2]<=[8]", 8) == 2
    assert group_size("replica_groups={{0,1,2,3,4,5,6,7}}", 8) == 8
    assert group_size("replica_groups={}", 8) == 8


def test_parse_mesh_and_errors():
    assert parse_mesh("data=2, fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in ("data2", "pipeline=2", "data=x"):
        with pytest.raises(ValueError, match="axis=size"):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="unknown"):
        get_chip("tpu9")


def test_cli_compiles_in_a_subprocess_with_the_mesh_device_count():
    # 4 devices != this process's 8: the compile runs in a child started with 4 CPU devices
    r = subprocess.run([sys.executable, "-m", "transformer_jax", "plan", "--config", "tiny", "--mesh", "data=2,fsdp=2",
                        "--chip", "h100"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("data=2 x fsdp=2 x tensor=1", "4 devices", "parameters (sharded)", "optimizer state",
                 "all-gather", "prediction on 4 x h100", "MFU", "-> fits"):
        assert line in r.stdout, (line, r.stdout)


def test_cpu_plan_of_a_model_this_host_cannot_hold_skips_the_timings():
    # llama_8b on 32 devices: its matmuls' operands (~1 TB) would not fit in host memory, and
    # timing them used to end in the out-of-memory killer and a traceback
    r = subprocess.run([sys.executable, "-m", "transformer_jax", "plan", "--config", "llama_8b", "--chip", "cpu",
                        "--no-suggest"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]  # 1: does not fit
    assert "Traceback" not in r.stderr and "prediction on 32 x cpu" in r.stdout
    assert "the step's parts were not timed on this host" in r.stdout and "--chip v5p" in r.stdout, r.stdout


@pytest.mark.parametrize("args,message", [
    (["--mesh", "data=3"], "not divisible"),  # batch 8 over 3 rows (raised in the compiling child)
    (["--chip", "tpu9"], "--chip 'tpu9' is unknown"),
    (["--mesh", "data=-1"], "--devices"),
    (["--mesh", "data=2,fsdp=2", "--devices", "8"], "needs 4 devices"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    assert main(["plan", "--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_suggestion_is_a_change_that_fits():
    """A 20 GiB step per v5e (16 GiB): plan suggests remat=dots (possibly with more
    microbatches), and planning with exactly those flags fits (11.4 GiB)."""
    over = ["model.vocab_size=1024", "model.d_model=1024", "model.d_ff=4096", "model.num_layers=8",
            "model.max_len=1024", "train.seq_len=1024", "train.global_batch_size=192", "mesh.data=8",
            "model.num_heads=8"]
    cfg = load_experiment("tiny", SMALL + over)
    r = plan(cfg, chip="v5e")
    assert not r["prediction"]["fits"] and r["suggestion"]["fits"]
    flags = r["suggestion"]["flags"].split()
    assert flags[0::2] == ["--set"] * (len(flags) // 2) and "model.remat=dots" in flags  # the cheapest change
    again = plan(cfg.apply_overrides(flags[1::2]), chip="v5e", suggest=False)
    assert again["prediction"]["fits"] and again["prediction"]["peak_bytes"] == r["suggestion"]["peak_bytes"]


@pytest.mark.slow
def test_layer_extrapolation_matches_the_full_compile():
    cfg = _cfg("fsdp", fsdp=8, extra=["model.num_layers=6"])
    full, scaled = measure(cfg, 8), measure(cfg, 8, layers=2)
    assert scaled["compiled_layers"] == [2, 4] and full["compiled_layers"] == [6]
    for key in ("param_bytes", "opt_bytes", "temp_bytes", "dot_flops", "argument_bytes"):
        assert scaled[key] == pytest.approx(full[key], rel=0.05), key
    for kind in ("all-gather", "reduce-scatter"):
        np.testing.assert_allclose(scaled["collectives"][kind]["link_bytes"], full["collectives"][kind]["link_bytes"],
                                   rtol=0.05)


@pytest.mark.parametrize("kind,chip", [("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"),
                                       ("TPU v6 lite", "v6e"), ("TPU v4", "v4"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("cpu", None)])
def test_device_kinds_map_to_chips(kind, chip):
    found = chip_for_device_kind(kind)
    assert (found and found.name) == chip
    if found:
        assert found.peak_flops > 1e14 and found.hbm_bytes >= 16 * 2 ** 30 and found.link_bandwidth > 0


def test_mfu_peak_on_cpu_is_the_measured_host_split_over_devices():
    peak, source = peak_flops_per_device()  # what the trainer divides by for MFU
    assert "measured once" in source and peak == pytest.approx(host_matmul_peak() / jax.local_device_count())
    cpu = get_chip("cpu", 8)
    assert cpu.peak_flops == pytest.approx(peak) and cpu.hbm_bytes > 0 and cpu.hbm_bandwidth > 0


def test_hardware_flops_count_remat_recomputation_separately():
    cfg = _cfg("dp", data=8)
    none = measure(cfg, 8)
    full = measure(cfg.apply_overrides(["model.remat=full"]), 8)
    assert none["model_flops"] == full["model_flops"]  # model FLOPs: the same work
    assert none["dot_flops"] * 8 / none["model_flops"] == pytest.approx(1.0, abs=0.05)
    # full remat runs each layer's forward twice: 4/3 of the layers' FLOPs (the output layer is not rematerialised)
    ratio = full["dot_flops"] * 8 / full["model_flops"]
    assert 1.2 < ratio <= 4 / 3 + 0.01
