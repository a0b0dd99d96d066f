"""What one device does in a compiled, SPMD-partitioned XLA program, read from its HLO text.

    stats = analyze_hlo(compiled.as_text())
    stats.dot_flops                  # matmul FLOPs per device per step (loops, remat included)
    stats.hbm_bytes                  # bytes the top-level ops read and write (per-op roofline input)
    stats.collectives["all-gather"]  # CollectiveStats(count, operand_bytes, link_bytes)

Every instruction is weighted by how many times it runs: a `while` body runs its
`known_trip_count` times (XLA annotates the scanned layer loops with it; without one, the
trip count comes from the loop condition's `compare(i, constant)` or, failing that, is 1
and listed in `unknown_loops`). Branches of a `conditional` count once each (an upper bound).

Collective bytes are per device. `operand_bytes` sums the operands as written; `array_bytes`
the whole arrays, the unit of the textbook formulas (transformer_jax/collectives.py): an
all-gather's result, a reduce-scatter's or all-reduce's operand; `link_bytes`
is what a ring algorithm moves out of each device over a group of n (Patarasuk & Yuan;
"How to Scale Your Model", ch. 3): all-gather S(n-1) for an operand S (the result is nS),
reduce-scatter S(n-1)/n, all-reduce 2S(n-1)/n, all-to-all S(n-1)/n, collective-permute S.

XLA:CPU has no reduce-scatter pass: it all-reduces FSDP gradients and then keeps a
dynamic-slice of them. An all-reduce (or a tuple element of one) whose every use is a
dynamic-slice is counted as the reduce-scatter that XLA:TPU/GPU emit for the same program.
"""
from __future__ import annotations

import dataclasses
import math
import re

from transformer_jax.hlo_parse import ARRAY, Computation, Instr, parse_module, shape_bytes, shape_dims

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Ops in the loops of the `chunked` attention kernel (named scope "chunked_attention"): the
# CPU stand-in for splash / cuDNN flash attention, whose tiles stay in VMEM / shared memory.
_IN_KERNEL = re.compile(r"chunked_attention.*/while/")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "partition-id", "replica-id", "after-all", "iota", "opt-barrier", "custom-call"}


@dataclasses.dataclass
class CollectiveStats:
    count: float = 0.0  # executions per step
    operand_bytes: float = 0.0
    link_bytes: float = 0.0  # ring-algorithm bytes sent per device
    array_bytes: float = 0.0  # the whole array: all-gather result, reduce-scatter / all-reduce operand

    def add(self, times: float, operand: float, link: float, array: float | None = None) -> None:
        self.count += times
        self.operand_bytes += times * operand
        self.link_bytes += times * link
        self.array_bytes += times * (operand if array is None else array)


@dataclasses.dataclass
class HloStats:
    dot_flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, CollectiveStats] = dataclasses.field(
        default_factory=lambda: {k: CollectiveStats() for k in COLLECTIVES})
    ops: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)  # (times, flops, bytes)
    op_labels: list[str] = dataclasses.field(default_factory=list)  # "opcode name: op_name metadata", per op
    op_kinds: list[str] = dataclasses.field(default_factory=list)  # op_kind() of each op
    loops: dict[str, int] = dataclasses.field(default_factory=dict)  # while body -> trip count
    unknown_loops: list[str] = dataclasses.field(default_factory=list)
    sliced_all_reduces: int = 0  # all-reduce elements counted as reduce-scatter
    kernel_bytes: float = 0.0  # bytes of ops inside blockwise-attention loops, left out of hbm_bytes
    # For timing them on the host (plan_cpu.py): executions per step of each distinct matmul
    # (dot_signature) and of each collective as emitted ("kind n bytes": an all-reduce that is
    # only sliced stays an all-reduce here, which is what XLA:CPU runs).
    dots: dict[str, float] = dataclasses.field(default_factory=dict)
    collective_ops: dict[str, float] = dataclasses.field(default_factory=dict)

    def roofline_seconds(self, peak_flops: float, hbm_bandwidth: float) -> float:
        """Sum over top-level ops of max(flops / peak, bytes / bandwidth)."""
        return sum(t * max(f / peak_flops, b / hbm_bandwidth) for t, f, b in self.ops)


def _attr_comps(attrs: str, key: str) -> list[str]:
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", attrs)
    if not m:
        return []
    return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",") if c.strip()]


def _trip_count(instr: Instr, comps: dict[str, Computation]) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get((_attr_comps(instr.attrs, "condition") or [""])[0])
    if cond and cond.root is not None and cond.root.opcode == "compare" and "direction=LT" in cond.root.attrs:
        for op in cond.root.operands:
            c = cond.by_name.get(op)
            if c is not None and c.opcode == "constant":
                m = re.search(r"constant\((-?\d+)\)", f"constant({c.operands[0] if c.operands else ''})")
                if m:
                    return int(m.group(1))
    return None


def group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group: `{{0,1},{2,3}}`, iota `[2,4]<=[8]` or `mesh[...] {'axis'}`
    (optionally `mesh[...], device_ids=([2,4]T(1,0)) {'axis'}`)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)  # may carry device_ids=(...)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if m:
        return len([x for x in m.group(1).strip("{}").split(",") if x.strip()])
    m = re.search(r"source_target_pairs=", attrs)
    return 2 if m else num_devices  # empty groups: every device


_ELEMENTWISE = ("add", "subtract", "multiply", "divide", "convert", "negate", "maximum", "minimum", "select")


def _only_sliced(comp: Computation, name: str, comps: dict[str, Computation], depth: int = 0) -> bool:
    """Is every use of `name` a dynamic-slice of it (through bitcasts, copies and fusions)?"""
    users = comp.users.get(name, [])
    if not users or depth > 6 or (comp.root is not None and comp.root.name == name):
        return False
    for u in users:
        if u.opcode == "dynamic-slice" and u.operands[0] == name:
            continue
        if u.opcode in ("bitcast", "copy", "reshape") and _only_sliced(comp, u.name, comps, depth + 1):
            continue
        # elementwise on the whole array, then sliced (e.g. a bias added before the slice): the
        # same as slicing first
        if u.opcode in _ELEMENTWISE and name in comp.by_name and shape_dims(u.shape) == shape_dims(
                comp.by_name[name].shape) and _only_sliced(comp, u.name, comps, depth + 1):
            continue
        if u.opcode == "fusion":
            fused = comps.get((_attr_comps(u.attrs, "calls") or [""])[0])
            params = {int(re.search(r"\d+", p.operands[0] if p.operands else "0").group()): p.name
                      for p in (fused.instrs if fused else []) if p.opcode == "parameter"}
            if fused and all(_only_sliced(fused, params.get(k, ""), comps, depth + 1)
                             for k, op in enumerate(u.operands) if op == name):
                continue
        return False
    return True


def _sliced_elements(comp: Computation, ar: Instr, comps) -> list[bool]:
    """For each element of an all-reduce (one, or a tuple's), whether only slices of it are used."""
    if not ar.shape.startswith("("):
        return [_only_sliced(comp, ar.name, comps)]
    n = len(ARRAY.findall(ar.shape))
    out = [False] * n
    gtes = [u for u in comp.users.get(ar.name, []) if u.opcode == "get-tuple-element"]
    for g in gtes:
        k = int(re.search(r"index=(\d+)", g.attrs).group(1))
        out[k] = _only_sliced(comp, g.name, comps)
    return out


def _fusion_bytes(instr: Instr, comp: Computation, fused: Computation | None) -> float:
    """Bytes a fusion (or a plain op) reads and writes; slices of a big operand count as the
    slice, a dynamic-update-slice into a buffer counts as the update (it runs in place)."""
    operand_shapes = [comp.by_name[o].shape if o in comp.by_name else "" for o in instr.operands]
    if fused is None:
        if instr.opcode == "dynamic-slice":
            return 2 * shape_bytes(instr.shape)
        if instr.opcode == "dynamic-update-slice":
            return 2 * shape_bytes(operand_shapes[1])
        return sum(map(shape_bytes, operand_shapes)) + shape_bytes(instr.shape)
    params = {}
    for p in fused.instrs:
        if p.opcode == "parameter":
            params[int(p.operands[0]) if p.operands and p.operands[0].isdigit() else len(params)] = p
    total, in_place = 0.0, None
    dus = _through_unary(fused, fused.root)
    if dus is not None and dus.opcode == "dynamic-update-slice":
        buffer = _through_unary(fused, fused.by_name.get(dus.operands[0]))
        in_place = buffer.name if buffer is not None and buffer.opcode == "parameter" else None
        update = fused.by_name.get(dus.operands[1])
        ratio = shape_bytes(instr.shape) / max(shape_bytes(dus.shape), 1)  # e.g. a bf16 buffer updated in f32
        total += 2 * ratio * shape_bytes(update.shape if update else "")
    if in_place is None:
        total = shape_bytes(instr.shape)
    for k, p in params.items():
        if p.name == in_place:
            continue
        users = fused.users.get(p.name, [])
        if users and all(u.opcode == "dynamic-slice" and u.operands[0] == p.name for u in users):
            total += sum(shape_bytes(u.shape) for u in users)
        else:
            total += shape_bytes(operand_shapes[k] if k < len(operand_shapes) else p.shape)
    return total


def _through_unary(comp: Computation, instr: Instr | None) -> Instr | None:
    """Follows converts, bitcasts and copies from `instr` to their operand (XLA:CPU wraps a
    bf16 dynamic-update-slice in converts to and from f32)."""
    for _ in range(8):
        if instr is None or instr.opcode not in ("convert", "bitcast", "copy", "reshape"):
            return instr
        instr = comp.by_name.get(instr.operands[0]) if instr.operands else None
    return instr


def _dot_flops(instr: Instr, comp: Computation) -> float:
    lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    if lhs is None or m is None:
        return 0.0
    dims = shape_dims(lhs.shape)
    k = math.prod(dims[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * math.prod(shape_dims(instr.shape)) * k


def dot_signature(instr: Instr, comp: Computation) -> str:
    """'lhs shape;rhs shape;dimension numbers;result shape' of a dot, layouts included: what
    plan_cpu.py needs to run the same matmul alone."""
    shapes = [comp.by_name[o].shape if o in comp.by_name else "" for o in instr.operands[:2]]
    dims = ",".join(re.findall(r"\b(?:lhs|rhs)_(?:batch|contracting)_dims=\{[\d,]*\}", instr.attrs))
    return ";".join([*shapes, dims, instr.shape])


def _dots_inside(comp: Computation, comps, seen: int = 0) -> list[tuple[float, str]]:
    """(FLOPs, signature) of the dots in a computation, nested fusions included."""
    out = []
    for i in comp.instrs:
        if i.opcode == "dot":
            out.append((_dot_flops(i, comp), dot_signature(i, comp)))
        elif i.opcode == "fusion" and seen < 8:
            callee = comps.get((_attr_comps(i.attrs, "calls") or [""])[0])
            out += _dots_inside(callee, comps, seen + 1) if callee else []
    return out


def _flops_inside(comp: Computation, comps, seen: int = 0) -> float:
    return sum(f for f, _ in _dots_inside(comp, comps, seen))


def _minor_dim(shape: str) -> int | None:
    """The logical dimension stored minor-most, among those longer than 1 (None: a scalar)."""
    dims = shape_dims(shape)
    m = re.search(r"\]\{([\d,]*)", shape)
    order = [int(d) for d in m.group(1).split(",") if d] if m and m.group(1) else list(range(len(dims)))[::-1]
    return next((d for d in order if d < len(dims) and dims[d] > 1), None)


def _reorders(i: Instr, source: Instr | None) -> str | None:
    """How a transpose or a copy between layouts moves elements: "transpose" when the
    minor-most dimension changes (element by element), "permute" when it stays (whole rows
    move), None when nothing moves."""
    if source is None or i.opcode not in ("transpose", "copy"):
        return None
    src, out = _minor_dim(source.shape), _minor_dim(i.shape)
    if i.opcode == "transpose":
        perm = [int(d) for d in re.search(r"dimensions=\{([\d,]*)\}", i.attrs).group(1).split(",") if d]
        out = perm[out] if out is not None else None
    elif source.shape.split("{")[-1] == i.shape.split("{")[-1]:
        return None  # a copy in the same layout
    return "transpose" if src != out else "permute"


def op_kind(instr: Instr, comp: Computation, fused: Computation | None) -> str:
    """What a memory-bound op does to its bytes, as far as moving them costs: "reduce" (a
    reduction inside: norms, softmax, sums), "transpose" (the minor-most dimension changes:
    elements move one by one), "permute" (a layout change that moves whole rows, e.g. heads
    swapped with positions) or "elementwise" (everything else: maps, slices, updates)."""
    ops = fused.instrs if fused is not None else [instr]
    inner = fused.by_name if fused is not None else comp.by_name
    if any(i.opcode in ("reduce", "reduce-window") for i in ops):
        return "reduce"
    moves = {_reorders(i, inner.get(i.operands[0]) if i.operands else None) for i in ops}
    return "transpose" if "transpose" in moves else "permute" if "permute" in moves else "elementwise"


def analyze_hlo(text: str, num_devices: int = 1) -> HloStats:
    """Per-device matmul FLOPs, HBM bytes of top-level ops and collectives, loops counted."""
    comps, entry = parse_module(text)
    stats = HloStats()

    def visit(name: str, times: float, depth: int = 0) -> None:
        comp = comps.get(name)
        if comp is None or depth > 64:
            return
        for instr in comp.instrs:
            op = instr.opcode
            if op == "while":
                body = (_attr_comps(instr.attrs, "body") or [""])[0]
                trips = _trip_count(instr, comps)
                if trips is None:
                    stats.unknown_loops.append(body)
                stats.loops[body] = trips or 1
                visit(body, times * (trips or 1), depth + 1)
                continue
            if op in ("call", "conditional", "async-start"):
                for key in ("to_apply", "calls", "branch_computations", "true_computation", "false_computation"):
                    for callee in _attr_comps(instr.attrs, key):
                        visit(callee, times, depth + 1)
                continue
            base = op.removesuffix("-start")
            if base in COLLECTIVES:
                _collective(stats, comp, instr, base, times, comps, num_devices)
                continue
            if op in _FREE or op.endswith("-done") or op.endswith("-start"):
                continue
            fused = comps.get((_attr_comps(instr.attrs, "calls") or [""])[0]) if op == "fusion" else None
            dots = [(_dot_flops(instr, comp), dot_signature(instr, comp))] if op == "dot" else (
                _dots_inside(fused, comps) if fused else [])
            flops = sum(f for f, _ in dots)
            for _, sig in dots:
                stats.dots[sig] = stats.dots.get(sig, 0.0) + times
            meta = re.search(r'op_name="([^"]*)"', instr.attrs)
            op_name = meta.group(1) if meta else ""
            nbytes = _fusion_bytes(instr, comp, fused)
            if _IN_KERNEL.search(op_name):  # a tile of blockwise attention: on-chip memory on TPU/GPU
                stats.kernel_bytes += times * nbytes
                nbytes = 0.0
            stats.dot_flops += times * flops
            stats.hbm_bytes += times * nbytes
            stats.ops.append((times, flops, nbytes))
            stats.op_labels.append(f"{op} {instr.name}: {op_name}")
            stats.op_kinds.append(op_kind(instr, comp, fused))

    visit(entry, 1.0)
    return stats


def _collective(stats: HloStats, comp: Computation, instr: Instr, kind: str, times: float, comps,
                num_devices: int) -> None:
    n = max(group_size(instr.attrs, num_devices), 1)
    shapes = [comp.by_name[o].shape for o in instr.operands if o in comp.by_name]
    emitted = f"{kind} {n} {sum(map(shape_bytes, shapes)):.0f}"
    stats.collective_ops[emitted] = stats.collective_ops.get(emitted, 0.0) + times
    if kind != "all-reduce":
        s = sum(map(shape_bytes, shapes))
        link = {"all-gather": s * (n - 1), "reduce-scatter": s * (n - 1) / n,
                "all-to-all": s * (n - 1) / n, "collective-permute": s}[kind]
        stats.collectives[kind].add(times, s, link, s * n if kind == "all-gather" else s)
        return
    sliced = _sliced_elements(comp, instr, comps) if n > 1 else [False] * len(shapes)
    for shape, is_sliced in zip(shapes, sliced + [False] * (len(shapes) - len(sliced))):
        s = shape_bytes(shape)
        if is_sliced:
            stats.sliced_all_reduces += 1
            stats.collectives["reduce-scatter"].add(times, s, s * (n - 1) / n)
        else:
            stats.collectives["all-reduce"].add(times, s, 2 * s * (n - 1) / n)
