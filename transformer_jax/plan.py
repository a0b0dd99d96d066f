"""`transformer-jax plan`: will an experiment fit on N chips of a kind, and how fast will it run?

    transformer-jax plan --config gpt2_small --chip v5e [--mesh data=1,fsdp=8,tensor=1] [--set ...]

The train step is lowered and compiled ahead of time for fake CPU devices shaped like the
mesh: abstract shapes only (`jax.ShapeDtypeStruct`), so no parameter is ever materialised
and an 8B model plans in seconds on a laptop. When this process's JAX does not already
have exactly that many CPU devices, the compile runs in a subprocess started with
`JAX_NUM_CPU_DEVICES=N` (and `--xla_force_host_platform_device_count=N`).

Per device it reports: parameter and optimizer-state bytes (from the arrays' shardings),
XLA's memory analysis (arguments, outputs, donated aliases, temporaries = activations,
gradients and workspace), model FLOPs (train/flops.py) and XLA's matmul FLOPs (remat
included), collective bytes by kind beside the textbook's (transformer_jax/collectives.py,
loop trip counts applied), and one predicted step time for the chip (train/hardware.py):

    compute = sum over matmul ops of max(FLOPs / (efficiency x peak), HBM bytes / bandwidth)
              (XLA's matmul FLOPs: loops counted, remat's recomputation included)
    memory  = sum over the other ops of HBM bytes / bandwidth (memory-bound: norms, softmax...)
    comm    = ring link bytes / interconnect bandwidth, less the weight all-gathers and gradient
              reduce-scatters that hide behind compute (async on TPU/GPU; none on CPU)
    step    = compute + memory + comm

`efficiency` is the fraction of peak the step's matmuls reach (hardware.py: assumed 0.8 on
accelerators). With `--chip cpu` (this host) the three terms are instead timed: the step's
own matmuls, ops of each memory-bound kind (map, reduction, transpose) at the step's sizes
and its collectives, each alone on the mesh's devices (transformer_jax/plan_cpu.py;
benchmarks/plan_check.py compares the sum with measured steps). Ops are those of XLA:CPU's
fusion, coarser than TPU/GPU's
(and bf16 converted to f32 around elementwise ops), so `memory` leans high off CPU. A
footnote gives the bounds: everything overlapped at full peak (roofline) and nothing
overlapped at full peak.

MFU = model FLOPs / (chips x peak x step); model FLOPs leave remat's recomputation out
(train/flops.py), the hardware FLOPs line shows it. Blockwise attention (`chunked`, what
CPU compiles in place of splash / cuDNN flash attention) is counted for FLOPs, not for the
HBM bytes of its tiles, which stay on chip in those kernels.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from transformer_jax.config import ConfigError
from transformer_jax.plan_report import format_plan  # noqa: F401  (re-exported)


# -- the request ---------------------------------------------------------------------------

def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (axes left out: unchanged)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh {text!r}: write axis=size pairs like data=2,fsdp=4,tensor=1")
        out[key.strip()] = int(value)
    return out


def with_mesh(cfg, mesh: dict[str, int] | None):
    return cfg if not mesh else cfg.apply_overrides([f"mesh.{k}={v}" for k, v in mesh.items()])


def device_count(cfg, devices: int | None) -> int:
    sizes = cfg.mesh.sizes
    if devices is None:
        if -1 in sizes:
            raise ConfigError(f"mesh {_mesh_str(cfg.mesh)} has a -1 (fill) axis; give --devices N or a full --mesh")
        return math.prod(sizes)
    from transformer_jax.parallel.mesh import resolve_sizes
    resolve_sizes(sizes, devices)  # one-line error when they disagree
    return devices


def _mesh_str(m) -> str:
    return " x ".join(f"{a}={s}" for a, s in zip(("data", "fsdp", "tensor"), m.sizes))


# -- measuring (needs `devices` JAX CPU devices in this process) ----------------------------

def _scaled(cfg, layers: int):
    m = cfg.model
    dec = None if m.num_decoder_layers is None else max(1, round(layers * m.num_decoder_layers / m.num_layers))
    over = [f"model.num_layers={layers}"] + ([f"model.num_decoder_layers={dec}"] if dec is not None else [])
    return cfg.apply_overrides(over)


def abstract_batch(cfg) -> dict:
    """ShapeDtypeStructs of one global batch of the experiment's task (no data is generated)."""
    import jax
    from transformer_jax.train.synthetic import synthetic_batch
    t = cfg.train
    one = synthetic_batch(cfg.task.task, 1, t.seq_len, cfg.model.vocab_size, target_len=t.target_seq_len,
                          num_classes=cfg.model.num_classes)
    return {k: jax.ShapeDtypeStruct((t.global_batch_size, *v.shape[1:]), v.dtype) for k, v in one.items()}


def train_setup(cfg, devices: int):
    """The TrainSetup of `cfg` on this process's first `devices` devices."""
    import jax
    from transformer_jax.parallel import check_batch, get_rules, make_mesh
    from transformer_jax.train import make_train_setup

    mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
    check_batch(cfg.train.global_batch_size, mesh, cfg.optimizer.grad_accum_steps)
    try:
        return make_train_setup(cfg.model, cfg.optimizer, cfg.task, mesh, get_rules(cfg.mesh.preset),
                                total_steps=cfg.train.steps, seed=cfg.train.seed)
    except ValueError as e:  # indivisible dimensions: one line already
        raise ConfigError(str(e)) from None


def _compile_once(cfg, devices: int, setup=None) -> dict:
    import jax
    from transformer_jax.collectives import textbook_bytes, update_split_bytes
    from transformer_jax.hlo_analysis import analyze_hlo
    from transformer_jax.train.flops import remat_flops

    setup = setup or train_setup(cfg, devices)
    batch = abstract_batch(cfg)
    compiled = setup.compiled_train_step(batch)
    mem = compiled.memory_analysis()
    hlo = analyze_hlo(compiled.as_text(), devices)

    def shard_bytes(tree) -> float:
        return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

    state = setup.abstract_state
    batch_bytes = sum(math.prod(setup.batch_sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in batch.values())
    return dict(
        params=setup.param_count, param_bytes=shard_bytes(state.params), opt_bytes=shard_bytes(state.opt_state),
        other_state_bytes=shard_bytes([state.step, state.rng]), batch_bytes=float(batch_bytes),
        argument_bytes=float(mem.argument_size_in_bytes), output_bytes=float(mem.output_size_in_bytes),
        alias_bytes=float(mem.alias_size_in_bytes), temp_bytes=float(mem.temp_size_in_bytes),
        model_flops=float(setup.flops_per_step(batch)), dot_flops=hlo.dot_flops, hbm_bytes=hlo.hbm_bytes,
        remat_flops=remat_flops(cfg.model, cfg.task.task, batch),
        ops=_compact_ops(hlo), dots=hlo.dots, collective_ops=hlo.collective_ops, unknown_loops=len(hlo.unknown_loops), sliced_all_reduces=hlo.sliced_all_reduces,
        collectives={k: dataclasses.asdict(v) for k, v in hlo.collectives.items()},
        textbook=textbook_bytes(setup, batch),
        # DP's split weight update: reduce-scatter + all-gather of U over data, both ring link bytes
        update_link_bytes=2 * update_split_bytes(setup) * (1 - 1 / setup.mesh.shape["data"]),
        mesh=_mesh_str(mesh_cfg_of(cfg, devices)), preset=cfg.mesh.preset)


def mesh_cfg_of(cfg, devices: int):
    from transformer_jax.parallel.mesh import resolve_sizes
    sizes = resolve_sizes(cfg.mesh.sizes, devices)
    return cfg.mesh.replace(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])


def _compact_ops(hlo) -> list[list]:
    """(times, flops, bytes, kind) of each op, identical ones merged: what the roofline needs,
    and for the CPU model the memory-bound ops' kinds (hlo_analysis.op_kind)."""
    merged: dict[tuple[float, float, str], float] = {}
    for (t, f, b), kind in zip(hlo.ops, hlo.op_kinds):
        merged[(f, b, kind)] = merged.get((f, b, kind), 0.0) + t
    return [[t, f, b, kind] for (f, b, kind), t in merged.items()]


def measure(cfg, devices: int, layers: int | None = None, setup=None) -> dict:
    """Compiles the train step (at `layers` and 2x`layers`, extrapolated linearly to the
    model's depth, when given) and returns the per-device figures as plain data. `setup`:
    cfg's TrainSetup (train_setup), whose executable then is the one measured."""
    full = cfg.model.num_layers
    if not layers or layers >= full:
        out = _compile_once(cfg, devices, setup)
        out["compiled_layers"] = [full]
        return out
    k2 = min(2 * layers, full)
    a, b = _compile_once(_scaled(cfg, layers), devices), _compile_once(_scaled(cfg, k2), devices)
    exact = _compile_once_state_only(cfg, devices)  # the full model's state: exact, no compile
    x = (full - layers) / (k2 - layers)
    lin = lambda u, v: u + (v - u) * x  # noqa: E731
    out = dict(a, **exact)
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "dot_flops", "hbm_bytes",
                "update_link_bytes"):
        out[key] = lin(a[key], b[key])
    out["collectives"] = {k: {f: lin(a["collectives"][k][f], b["collectives"][k][f]) for f in a["collectives"][k]}
                          for k in a["collectives"]}
    out["textbook"] = {k: lin(a["textbook"][k], b["textbook"][k]) for k in a["textbook"]}
    for key in ("dots", "collective_ops"):
        out[key] = {k: lin(a[key].get(k, 0.0), b[key].get(k, 0.0)) for k in {*a[key], *b[key]}}
    out["ops"] = [[t * x, *op] for t, *op in b["ops"]] + [[t * (1 - x), *op] for t, *op in a["ops"]]
    out["model_flops"] = float(exact["model_flops"])
    out["remat_flops"] = float(exact["remat_flops"])
    out["compiled_layers"] = [layers, k2]
    return out


def _compile_once_state_only(cfg, devices: int) -> dict:
    import jax
    from transformer_jax.parallel import get_rules, make_mesh
    from transformer_jax.train import make_train_setup
    from transformer_jax.train.flops import remat_flops
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
    setup = make_train_setup(cfg.model, cfg.optimizer, cfg.task, mesh, get_rules(cfg.mesh.preset),
                             total_steps=cfg.train.steps, seed=cfg.train.seed)
    nbytes = lambda t: float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize  # noqa: E731
                                 for x in jax.tree.leaves(t)))
    s = setup.abstract_state
    return dict(params=setup.param_count, param_bytes=nbytes(s.params), opt_bytes=nbytes(s.opt_state),
                other_state_bytes=nbytes([s.step, s.rng]), model_flops=float(setup.flops_per_step(abstract_batch(cfg))),
                remat_flops=remat_flops(cfg.model, cfg.task.task, abstract_batch(cfg)))


# -- predicting ------------------------------------------------------------------------------

def peak_bytes(m: dict) -> float:
    """Live bytes at the step's peak: arguments + outputs - donated (aliased) + temporaries."""
    return m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]


def predict(m: dict, chip, devices: int, tokens: int) -> dict:
    """Step time, MFU and fit of measurement `m` on `chip` (a hardware.Chip); see the module docstring."""
    # hardware matmul FLOPs: XLA's count with loop trip counts, remat's recomputation included;
    # never below model + remat FLOPs (train/flops.py), which loops of unknown length (counted
    # once) can take XLA's count under
    flops = max(m["dot_flops"], (m["model_flops"] + m.get("remat_flops", 0.0)) / devices)
    rate, bw = chip.peak_flops * chip.matmul_efficiency, chip.hbm_bandwidth
    scale = flops / max(sum(t * f for t, f, *_ in m["ops"]), 1.0)  # unknown loops: matmul ops scaled up
    compute = sum(t * max(f * scale / rate, b / bw) for t, f, b, _ in m["ops"] if f)
    compute = max(compute, flops / rate)
    memory = sum(t * b / bw for t, f, b, _ in m["ops"] if not f)  # ops without a matmul: memory-bound
    comm = {k: v["link_bytes"] / chip.link_bandwidth for k, v in m["collectives"].items()}
    comm_s = sum(comm.values())
    # Weight all-gathers and gradient reduce-scatters run ahead of / behind the layer that needs
    # them (XLA's async collectives); all-reduces (TP activations) wait, and so does DP's split
    # update (its gradients reduce-scattered after the backward, its weights gathered after Adam).
    update = m.get("update_link_bytes", 0.0) / chip.link_bandwidth
    hidden = max(0.0, comm["all-gather"] + comm["reduce-scatter"] - update) if chip.overlaps_collectives else 0.0
    exposed = comm_s - hidden + max(0.0, hidden - compute)
    efficiency, calibration = chip.matmul_efficiency, None
    if "cpu" in m and chip.name == "cpu":  # this host: the step's parts timed alone (plan_cpu.py)
        c, calibration = m["cpu"], m["cpu"]["calibration"]
        compute, memory, comm_s = c["compute_s"], c["memory_s"], c["comm_s"]
        comm, exposed = {k: c["comm_by_kind_s"].get(k, 0.0) for k in comm}, c["comm_s"]
        efficiency = calibration["matmul_flops_per_s"] / chip.peak_flops
    step = compute + memory + exposed
    # the footnote's range: everything overlapped at full peak (roofline) .. nothing overlapped
    live = 2 * m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"]
    fast = max(flops / chip.peak_flops, live / bw, comm_s)
    slow = sum(t * max(f * scale / chip.peak_flops, b / bw) for t, f, b, _ in m["ops"]) + comm_s
    slow = max(slow, step)
    if calibration is not None:  # timed parts: all overlapped .. none (XLA:CPU overlaps none)
        fast, slow = max(compute, memory, comm_s), step
    per_device = m["model_flops"] / devices
    usable = chip.usable_fraction * chip.hbm_bytes
    return dict(chip=chip.name, chip_source=chip.source, efficiency=efficiency, calibration=calibration,
                hardware_flops=flops, compute_s=compute, memory_s=memory, comm_s=comm_s, comm_exposed_s=exposed,
                comm_by_kind_s=comm, step_s=step, mfu=per_device / (chip.peak_flops * step) if step else 0.0,
                tokens_per_s_per_chip=tokens / step / devices if step else 0.0,
                step_fast_s=fast, step_slow_s=slow, mfu_fast=per_device / (chip.peak_flops * fast) if fast else 0.0,
                mfu_slow=per_device / (chip.peak_flops * slow) if slow else 0.0,
                peak_bytes=peak_bytes(m), usable_bytes=usable, fits=peak_bytes(m) <= usable)


def candidates(cfg, devices: int) -> list[tuple[str, object]]:
    """Changes that lower memory per device, roughly cheapest first: remat of non-matmuls
    (no extra FLOPs), microbatches (more FSDP gathers), all of data into fsdp, full remat
    (a third more FLOPs), and combinations."""
    mc = mesh_cfg_of(cfg, devices)
    rows = cfg.train.global_batch_size // (mc.data * mc.fsdp)
    accum = cfg.optimizer.grad_accum_steps
    steps = {}
    if cfg.model.remat == "none":
        steps["dots"] = ["model.remat=dots"]
    for k in (2, 4):
        if rows % (k * accum) == 0:
            steps[f"accum{k}"] = [f"optimizer.grad_accum_steps={k * accum}"]
    if mc.data > 1:
        steps["fsdp"] = ["mesh.data=1", f"mesh.fsdp={mc.data * mc.fsdp}",
                         f"mesh.preset={'fsdp_tp' if mc.tensor > 1 else 'fsdp'}"]
    if cfg.model.remat != "full":
        steps["full"] = ["model.remat=full"]
    order = [["dots"], ["accum2"], ["fsdp"], ["dots", "accum2"], ["accum4"], ["full"], ["full", "accum2"],
             ["full", "fsdp"], ["full", "accum4"], ["full", "fsdp", "accum4"]]
    out = []
    for combo in order:
        if all(c in steps for c in combo):
            over = [o for c in combo for o in steps[c]]
            out.append((" ".join(f"--set {o}" for o in over), cfg.apply_overrides(over)))
    return out


def run_plan(cfg, devices: int, chip_name: str, layers: int | None = None, suggest: bool = True) -> dict:
    """Everything `plan` reports, as plain data; needs `devices` CPU devices in this process."""
    if chip_name == "cpu":
        return _run_plan(cfg, devices, chip_name, layers, suggest)
    from transformer_jax.layers.platform import accelerator_dots
    with accelerator_dots():  # the accelerator's bf16 dots, which layers/platform.py upcasts on CPU only
        return _run_plan(cfg, devices, chip_name, layers, suggest)


def _run_plan(cfg, devices: int, chip_name: str, layers: int | None, suggest: bool) -> dict:
    from transformer_jax.train.hardware import get_chip
    chip = get_chip(chip_name, devices)
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    m = measure(cfg, devices, layers)
    untimed = None
    if chip_name == "cpu":  # time the step's matmuls, memory-bound ops and collectives on these devices
        from transformer_jax.plan_cpu import Calibration
        from transformer_jax.train.hardware import available_host_bytes
        need, free = Calibration.bytes_needed(m, devices), available_host_bytes()
        if need <= free / 2:
            m["cpu"] = Calibration(m, devices, chip.peak_flops, chip.hbm_bandwidth).sample(3).predict()
        else:
            untimed = (f"the step's parts were not timed on this host: their arrays need {need / 2 ** 30:,.1f} GiB "
                       f"over {devices} devices, more than half of the {free / 2 ** 30:,.1f} GiB available; the "
                       "prediction uses the default CPU matmul efficiency (plan for the chip you will run on: "
                       "--chip v5p, h100, ...)")
    result = dict(name=cfg.name, devices=devices, tokens=tokens, batch=cfg.train.global_batch_size,
                  seq_len=cfg.train.seq_len, model=dict(family=cfg.model.family, layers=cfg.model.num_layers,
                  remat=cfg.model.remat, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                  grad_accum=cfg.optimizer.grad_accum_steps), measured=m, prediction=predict(m, chip, devices, tokens),
                  notes=([untimed] if untimed else []) + _notes(cfg, m, chip, devices), suggestion=None)
    if suggest and not result["prediction"]["fits"]:
        result["suggestion"] = _search(cfg, devices, layers, chip, tokens)
    return result


def _search(cfg, devices, layers, chip, tokens, max_compiles: int = 5) -> dict | None:
    """Compiles candidates until two fit (or `max_compiles`); the fitting one predicted fastest
    wins, else the one that needs the least memory."""
    tried = []
    for flags, alt in candidates(cfg, devices)[:max_compiles]:
        try:
            p = predict(measure(alt, devices, layers), chip, devices, tokens)
        except ConfigError:
            continue
        tried.append(dict(flags=flags, peak_bytes=p["peak_bytes"], fits=p["fits"], mfu=p["mfu"], step_s=p["step_s"]))
        if sum(t["fits"] for t in tried) == 2:
            break
    fitting = [t for t in tried if t["fits"]]
    if fitting:
        return min(fitting, key=lambda t: t["step_s"])
    return min(tried, key=lambda t: t["peak_bytes"]) if tried else None


def _notes(cfg, m, chip, devices) -> list[str]:
    notes = []
    if len(m["compiled_layers"]) > 1:
        a, b = m["compiled_layers"]
        notes.append(f"compiled with {a} and {b} layers and extrapolated linearly to {cfg.model.num_layers} "
                     "(parameter and optimizer bytes are exact)")
    if m["sliced_all_reduces"]:
        notes.append(f"{m['sliced_all_reduces']} all-reduce results are only sliced: counted as the reduce-scatter "
                     "XLA:TPU/GPU emit (XLA:CPU has no reduce-scatter pass)")
    if m["unknown_loops"]:
        notes.append(f"{m['unknown_loops']} loop(s) without a known trip count were counted once")
    if chip.name in ("a100", "h100", "h200") and devices > 8:
        notes.append("collectives over axes that span nodes run on InfiniBand (~50 GB/s per GPU), ~9x slower "
                     "than the NVLink figure used here; keep tensor (and if possible fsdp) inside a node")
    if chip.name in ("v4", "v5e", "v5p", "v6e"):
        notes.append("ICI figure assumes each mesh axis is a ring with wraparound (full torus dimension); "
                     "multi-slice (DCN) axes are far slower")
    return notes


# -- running where the devices are -------------------------------------------------------------

def _have_devices(n: int) -> bool:
    try:
        from jax._src import xla_bridge
        if not xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    import jax
    return jax.default_backend() == "cpu" and jax.device_count() == n and jax.process_count() == 1


def plan(cfg, *, devices: int | None = None, chip: str = "cpu", layers: int | None = None,
         suggest: bool = True) -> dict:
    """Plans `cfg` (an ExperimentConfig) on `devices` chips of kind `chip`; compiles in this
    process when it has exactly that many CPU devices, else in a subprocess."""
    from transformer_jax.train.hardware import CHIPS
    if chip != "cpu" and chip not in CHIPS:
        raise ConfigError(f"--chip {chip!r} is unknown; choose one of {', '.join([*CHIPS, 'cpu'])}")
    n = device_count(cfg, devices)
    if _have_devices(n):
        return run_plan(cfg, n, chip, layers, suggest)
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(dict(config=cfg.to_dict(), devices=n, chip=chip, layers=layers, suggest=suggest)))
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        if not any("backend_optimization_level" in f for f in flags):
            flags.append("--xla_backend_optimization_level=0")  # same HLO and buffers, faster LLVM
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n),
                   XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]))
        proc = subprocess.run([sys.executable, "-m", "transformer_jax.plan", str(req), str(out)], env=env,
                              capture_output=True, text=True)
        if not out.exists():
            if proc.returncode < 0:
                from transformer_jax.train.hardware import available_host_bytes
                name = signal.Signals(-proc.returncode).name
                hint = (f" (the system's out-of-memory killer, most likely: {n} devices of this model did not fit in "
                        f"{available_host_bytes() / 2 ** 30:,.0f} GiB; try --layers 2)") if name == "SIGKILL" else ""
                raise ConfigError(f"plan's compile process was killed by {name}{hint}")
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"plan subprocess failed (exit {proc.returncode}): {tail}")
        result = json.loads(out.read_text())
    if "error" in result:
        raise ConfigError(result["error"])
    return result


def add_arguments(p) -> None:
    """The `plan` subcommand's own flags (besides --config and --set)."""
    p.add_argument("--mesh", help="mesh sizes, e.g. data=1,fsdp=8,tensor=2 (default: the config's)")
    p.add_argument("--chip", default="cpu", help="v4, v5e, v5p, v6e, a100, h100, h200 or cpu (this host, measured)")
    p.add_argument("--devices", type=int, help="chip count when the mesh has a -1 (fill) axis")
    p.add_argument("--layers", type=int, help="compile at this depth and twice it, extrapolate to the model's")
    p.add_argument("--no-suggest", action="store_true", help="when it does not fit, do not search for a change that fits")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def plan_cli(cfg, args) -> int:
    """`transformer-jax plan`: the report for `cfg` (--config with --set) under --mesh; exit 1 if it does not fit."""
    cfg = with_mesh(cfg, parse_mesh(args.mesh) if args.mesh else None)
    result = plan(cfg, devices=args.devices, chip=args.chip, layers=args.layers, suggest=not args.no_suggest)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0 if result["prediction"]["fits"] else 1


def _worker(request: str, output: str) -> int:
    from transformer_jax.experiment import ExperimentConfig
    r = json.loads(Path(request).read_text())
    try:
        cfg = ExperimentConfig.from_dict(r["config"])
        result = run_plan(cfg, r["devices"], r["chip"], r["layers"], r["suggest"])
    except ConfigError as e:
        result = {"error": str(e)}
    Path(output).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
