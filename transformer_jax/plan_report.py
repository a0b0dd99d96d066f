"""The text report of `transformer-jax plan` (transformer_jax/plan.py computes what it shows)."""
from __future__ import annotations

import math

GIB = 2 ** 30
_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _gib(x: float) -> str:
    """Bytes with a binary unit, 10 characters wide."""
    for scale, unit in ((GIB, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(x) >= scale:
            return f"{x / scale:6.2f} {unit}"
    return f"{x:6.0f} B  "


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_plan(r: dict) -> str:
    m, p, mo = r["measured"], r["prediction"], r["model"]
    n = r["devices"]
    rows = r["batch"] // max(1, _product(m["mesh"], ("data", "fsdp")))
    depth = "full depth" if len(m["compiled_layers"]) == 1 else f"compiled at {m['compiled_layers']} layers, extrapolated"
    lines = [
        f"plan: {r['name']}",
        f"  mesh     {m['mesh']} (preset {m['preset']}), {n} devices (fake CPU devices for the compile)",
        f"  model    {m['params'] / 1e6:,.1f}M parameters, {mo['family']}, {mo['layers']} layers ({depth}), "
        f"remat {mo['remat']}, {mo['dtype']} compute / {mo['param_dtype']} params",
        f"  batch    {r['batch']} x {r['seq_len']} = {r['tokens']:,} tokens/step ({rows} rows per device"
        + (f", {mo['grad_accum']} microbatches)" if mo["grad_accum"] > 1 else ")"),
        f"  chip     {p['chip_source']}",
        "",
        "memory per device",
        f"  parameters (sharded)                     {_gib(m['param_bytes'])}",
        f"  optimizer state                          {_gib(m['opt_bytes'])}",
        f"  batch                                    {_gib(m['batch_bytes'])}",
        f"  activations, gradients, temporaries      {_gib(m['temp_bytes'])}   (XLA temp)",
        f"  peak: arguments + outputs - donated + temp {_gib(p['peak_bytes'])}   of {p['usable_bytes'] / GIB:.2f} GiB "
        f"usable -> {'fits' if p['fits'] else 'DOES NOT FIT'}",
        "",
        f"FLOPs per device per step: model {_si(m['model_flops'] / n, 'FLOP')}"
        + (f" + remat {mo['remat']} recomputation {_si(m.get('remat_flops', 0.0) / n, 'FLOP')}"
           if m.get("remat_flops") else "")
        + f"; hardware {_si(p['hardware_flops'], 'FLOP')} = {p['hardware_flops'] * n / max(m['model_flops'], 1):.2f}x "
        f"model (XLA's matmuls, loops counted: {_si(m['dot_flops'], 'FLOP')})",
        "",
        "collectives per device per step   count      arrays   textbook    ratio   ring link    time ms",
    ]
    book = m.get("textbook", {})
    for kind in _KINDS:
        c = m["collectives"][kind]
        want = book.get(kind, 0.0)
        if c["count"] or want:
            arrays = c.get("array_bytes", c["operand_bytes"])
            ratio = f"{arrays / want:7.2f}x" if want else "       -"
            lines.append(f"  {kind:<28}{c['count']:>9.0f}  {_gib(arrays)} {_gib(want) if want else '         -'}"
                         f" {ratio}  {_gib(c['link_bytes'])}  {1e3 * p['comm_by_kind_s'][kind]:9.2f}")
    if not any(m["collectives"][k]["count"] for k in _KINDS):
        lines.append("  (none)")
    timed = p.get("calibration") is not None
    lines += [
        "",
        f"prediction on {n} x {p['chip']}",
        f"  compute   {1e3 * p['compute_s']:10.2f} ms   hardware matmul FLOPs at {100 * p['efficiency']:.0f}% of peak "
        + ("(the step's matmuls, each timed alone)" if timed else "(per op: or its HBM bytes, if slower)"),
        f"  memory    {1e3 * p['memory_s']:10.2f} ms   ops without a matmul: "
        + ("each timed as an op of its kind and bytes" if timed else "their HBM bytes / bandwidth"),
        f"  comm      {1e3 * p['comm_exposed_s']:10.2f} ms   collectives not hidden behind compute "
        + (f"(of {1e3 * p['comm_s']:.2f} ms: each timed alone)" if timed else
           f"(of {1e3 * p['comm_s']:.2f} ms: ring link bytes / interconnect bandwidth)"),
        f"  step      {1e3 * p['step_s']:10.2f} ms   = compute + memory + comm",
        *_calibration_lines(p.get("calibration")),
        f"  MFU       {100 * p['mfu']:9.1f} %    tokens/s/chip {p['tokens_per_s_per_chip']:,.0f}   [1]",
        "",
        f"  [1] bounds: {1e3 * p['step_fast_s']:.2f} ms (everything overlapped"
        + ("" if timed else " at full peak") + f": MFU {100 * p['mfu_fast']:.1f}%) .. {1e3 * p['step_slow_s']:.2f} ms "
        + ("(nothing overlapped" if timed else "(nothing overlapped, XLA:CPU's fusion") + f": MFU {100 * p['mfu_slow']:.1f}%)",
    ]
    if not p["fits"]:
        lines += ["", f"WARNING: needs {p['peak_bytes'] / GIB:.2f} GiB per device, more than the "
                      f"{p['usable_bytes'] / GIB:.2f} GiB usable on {p['chip']}."]
        s = r.get("suggestion")
        if s and s["fits"]:
            lines.append(f"  try: {s['flags']}  -> {s['peak_bytes'] / GIB:.2f} GiB per device, predicted MFU "
                         f"{100 * s['mfu']:.1f}%")
        elif s:
            lines.append(f"  even {s['flags']} needs {s['peak_bytes'] / GIB:.2f} GiB: use more chips, a smaller "
                         "global batch or a smaller model")
        else:
            lines.append("  try a larger fsdp, model.remat=full or dots, or a smaller batch per device")
    if r["notes"]:
        lines += ["", "notes:"] + [f"  - {x}" for x in r["notes"]]
    return "\n".join(lines)


def _calibration_lines(c: dict | None) -> list[str]:
    """What the CPU prediction was calibrated with (transformer_jax/plan_cpu.py)."""
    if not c:
        return []
    comm = ", ".join(f"{k}: {1e6 * lat:.0f} us + {1e-9 / s:.1f} GB/s" if s else f"{k}: {1e6 * lat:.0f} us"
                     for k, (lat, s) in c["collectives"].items())
    return [f"            timed on this host: the step's matmuls alone {c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"other ops {1e6 * c['op_s']:.1f} us + bytes at {c['bandwidth'] / 1e9:.1f} GB/s (by kind and size)"
            + (f"; collectives (kind, group) {comm}" if comm else "")]


def _product(mesh: str, axes) -> int:
    sizes = dict(part.strip().split("=") for part in mesh.split(" x "))
    return math.prod(int(sizes[a]) for a in axes)
