"""`plan --chip cpu`: the step time on this host's CPU devices, from timings taken in this process.

    cal = Calibration(m, mesh_devices)   # m: plan.measure()'s figures of the compiled step
    cal.sample()                         # one round of timings; call it a few times, interleaved
    t = cal.predict()                    # {"compute_s", "memory_s", "comm_s", "step_s", ...}

Nothing here times the step itself. What is timed is the step's parts, each alone, on all of
the mesh's devices at once (fake CPU devices share the host's cores, so each device's share
of the host is what the step gets too):

    compute = sum over the step's distinct matmuls (HLO dot shapes, layouts and dimension
              numbers, hlo_analysis.dot_signature) of executions x that dot's time
    memory  = sum over the other ops of executions x the time of an op of the same kind and
              bytes, read off a curve per kind timed at 4 KiB and at every 4x from 64 KiB up
              to the step's largest op (straight lines between the points). The kinds
              (hlo_analysis.op_kind): elementwise (x * a + b), reduce (a layer norm over rows
              of 256), permute (heads of 64 swapped with the rows) and transpose (a matrix
              transposed). Both kind and size matter: on a 2-core Xeon with 8 fake devices,
              x * a + b moves 5.0 GB/s per device at 4 MiB (the caches hold all 8 devices'
              arrays) and 1.6 GB/s from 64 MiB on; at 4 MiB a layer norm moves its bytes 2.8x
              slower, a head permutation 3x and a matrix transpose 12x
    comm    = sum over the collectives as XLA:CPU emits them (kind, group, bytes) of
              executions x (latency + bytes x seconds per byte), fitted per kind and group at
              4 KiB and at the step's largest collective
    step    = compute + memory + comm   (XLA:CPU runs one op at a time per device, its
              collectives are synchronous: nothing overlaps)

With at most one device per core this is the model of a chip (within 21% on 1 and 2
devices, benchmarks/plan_check.py). More fake devices than cores take turns on them, and
what that costs (thread switches, idle cores at rendezvous, the kernel's page zeroing) is
not modelled: on 8 devices over 2 cores the prediction falls 6-27% short.

Every timing repeats its op inside one compiled loop (an optimization barrier keeps XLA from
hoisting it), so JAX's dispatch is not part of it. `sample()` takes one more round of every
timing and `predict()` uses the medians: a benchmark can interleave rounds with the step it
checks, so that both see the same load (benchmarks/plan_check.py).
"""
from __future__ import annotations

import math
import re
import statistics
import time

import numpy as np

_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64", "s32": "int32", "s8": "int8"}
_SHAPE = re.compile(r"(\w+)\[([^\]]*)\](?:\{([\d,]*))?")
SMALL_BYTES = 4096


def _parse(shape: str) -> tuple[str, list[int], list[int]]:
    """('float32', dims, physical order major..minor) of an HLO array shape."""
    m = _SHAPE.search(shape)
    dims = [int(d) for d in m.group(2).split(",") if d.strip()]
    minor_to_major = [int(d) for d in (m.group(3) or "").split(",") if d.strip()] or list(range(len(dims)))[::-1]
    return _DTYPES[m.group(1)], dims, minor_to_major[::-1]


def _numbers(text: str, key: str) -> tuple[int, ...]:
    m = re.search(rf"{key}=\{{([\d,]*)\}}", text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


class _Timer:
    """A program that runs `body` `reps` times in a loop on every device of `mesh` at once."""

    def __init__(self, body, arrays, mesh, reps: int):
        import jax
        from jax.sharding import PartitionSpec as P

        def local(*xs):
            def step(_, carry):
                xs, _ = carry
                xs = jax.lax.optimization_barrier(xs)
                return xs, body(*xs)
            out = jax.eval_shape(body, *xs)
            zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), out)
            return jax.lax.fori_loop(0, reps, step, (xs, zeros))[1]

        spec = P(tuple(mesh.axis_names))
        fn = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
        self.fn = jax.jit(fn).lower(*arrays).compile(compiler_options=_FAST)
        self.arrays, self.reps, self.samples = arrays, reps, []
        jax.block_until_ready(self.fn(*arrays))

    def sample(self) -> None:
        import jax
        t = time.perf_counter()
        jax.block_until_ready(self.fn(*self.arrays))
        self.samples.append((time.perf_counter() - t) / self.reps)

    def seconds(self) -> float:
        return statistics.median(self.samples)


# plan's compile subprocess lowers XLA:CPU's LLVM optimisation for speed; the timings must run
# the code a training run runs.
_FAST = {"xla_backend_optimization_level": 2}


def _global(mesh, local_shape, dtype):
    """A device-resident array whose every shard (first axis split over all devices) has `local_shape`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    n = mesh.size
    shape = (local_shape[0] * n, *local_shape[1:]) if local_shape else (n,)
    make = jax.jit(lambda: jnp.full(shape, 0.5, dtype), out_shardings=NamedSharding(mesh, P(tuple(mesh.axis_names))))
    return make()


def _reps(seconds_guess: float, budget: float = 0.01) -> int:
    return int(min(64, max(1, math.ceil(budget / max(seconds_guess, 1e-7)))))


class Calibration:
    def __init__(self, m: dict, devices: int, peak_flops: float = 1e11, bandwidth: float = 1e10):
        """`m`: plan.measure()'s figures; `devices`: the mesh's device count (the first ones of
        this process); `peak_flops`, `bandwidth`: per-device guesses that only size the loops."""
        import jax
        self.m = m
        self.mesh = jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices],
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.dots = {sig: self._dot_timer(sig, peak_flops) for sig in m["dots"]}
        self.memory = {kind: {size: self._memory_timer(kind, size, bandwidth) for size in self.curve_sizes(m)}
                       for kind in sorted({k for _, f, _, k in m["ops"] if not f} | {"elementwise"})}
        self.collectives: dict[tuple[str, int], dict[int, _Timer]] = {}
        for key in m["collective_ops"]:
            kind, n, nbytes = key.split()
            group = (kind, int(n))
            if int(n) > 1 and group not in self.collectives:
                biggest = max(int(k.split()[2]) for k in m["collective_ops"] if k.split()[:2] == [kind, n])
                self.collectives[group] = {s: self._collective_timer(kind, int(n), s, bandwidth)
                                           for s in sorted({SMALL_BYTES, max(biggest, 2 * SMALL_BYTES)})}

    @staticmethod
    def curve_sizes(m: dict) -> list[int]:
        """Bytes per op (read + written) at which the memory-bound kinds are timed: 4 KiB, then
        64 KiB and every 4x up to the step's largest memory-bound op."""
        largest = max((b for t, f, b, _ in m["ops"] if not f), default=0.0)
        sizes, size = [SMALL_BYTES], 16 * SMALL_BYTES
        while size < largest:
            sizes.append(size)
            size *= 4
        return sizes + [int(max(largest, 16 * SMALL_BYTES))]

    @staticmethod
    def bytes_needed(m: dict, devices: int) -> float:
        """Host bytes the timers hold at once: every distinct matmul's operands and result (and
        the loop's copy of it), the memory curves' arrays and the largest collective's input
        and output, on every device."""
        size = lambda shape: math.prod(_parse(shape)[1]) * np.dtype(_parse(shape)[0]).itemsize  # noqa: E731
        dots = sum(size(lhs) + size(rhs) + 2 * size(out) for lhs, rhs, _, out in (s.split(";") for s in m["dots"]))
        memory = 4 * sum(Calibration.curve_sizes(m))  # a curve per kind, each timer holds its in and out
        coll = max((float(k.split()[2]) for k in m["collective_ops"]), default=0.0)
        return devices * (dots + memory + 4 * coll)

    # -- the timers ----------------------------------------------------------------------------
    def _dot_timer(self, sig: str, peak: float) -> _Timer:
        import jax
        import jax.numpy as jnp
        lhs, rhs, dims, out = sig.split(";")
        (ldt, ld, lorder), (rdt, rd, rorder) = _parse(lhs), _parse(rhs)
        out_dtype = _parse(out)[0]
        dn = ((_numbers(dims, "lhs_contracting_dims"), _numbers(dims, "rhs_contracting_dims")),
              (_numbers(dims, "lhs_batch_dims"), _numbers(dims, "rhs_batch_dims")))
        # operands stored in the step's layouts: physical order, transposed back in the program
        a = _global(self.mesh, [ld[i] for i in lorder], ldt)
        b = _global(self.mesh, [rd[i] for i in rorder], rdt)

        def body(a, b):
            a, b = jnp.transpose(a, np.argsort(lorder)), jnp.transpose(b, np.argsort(rorder))
            y = jax.lax.dot_general(a, b, dn, preferred_element_type=out_dtype)
            return y.reshape(1, *y.shape)
        flops = 2 * math.prod(_parse(out)[1]) * math.prod(ld[i] for i in dn[0][0])
        return _Timer(body, (a, b), self.mesh, _reps(flops / peak))

    def _memory_timer(self, kind: str, nbytes: int, bandwidth: float) -> _Timer:
        """An op of `kind` that reads and writes `nbytes` in all (f32, nbytes / 8 elements in)."""
        import jax
        rows = max(1, nbytes // 8 // 256)
        x = _global(self.mesh, [rows, 256], "float32")
        if kind == "reduce":
            body = lambda x: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)  # noqa: E731
        elif kind == "permute":
            body = lambda x: x.reshape(rows, 4, 64).transpose(1, 0, 2).reshape(rows, 256) * 1.0001  # noqa: E731
        elif kind == "transpose":
            body = lambda x: x.T * 1.0001  # noqa: E731
        else:
            body = lambda x: x * 1.0001 + 0.5  # noqa: E731
        return _Timer(body, (x,), self.mesh, _reps(nbytes / bandwidth + 2e-6))

    def _collective_timer(self, kind: str, n: int, nbytes: int, bandwidth: float) -> _Timer:
        import jax
        elems = max(n, nbytes // 4 // n * n)
        if kind == "all-gather":
            elems = max(1, nbytes // 4)
        if n != self.mesh.size:
            mesh = jax.make_mesh((self.mesh.size // n, n), ("r", "x"), devices=list(self.mesh.devices.flat),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 2)
        else:
            mesh = self.mesh
        ops = {"all-gather": lambda x: jax.lax.all_gather(x, "x", tiled=True),
               "reduce-scatter": lambda x: jax.lax.psum_scatter(x, "x", tiled=True),
               "all-to-all": lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True),
               "collective-permute": lambda x: jax.lax.ppermute(x, "x", [(i, (i + 1) % n) for i in range(n)])}
        body = ops.get(kind, lambda x: jax.lax.psum(x, "x"))
        x = _global(mesh, [elems], "float32")
        return _Timer(body, (x,), mesh, _reps(2 * nbytes / bandwidth + 2e-5))

    # -- measuring and predicting --------------------------------------------------------------
    def timers(self):
        yield from self.dots.values()
        for sizes in self.memory.values():
            yield from sizes.values()
        for sizes in self.collectives.values():
            yield from sizes.values()

    def sample(self, rounds: int = 1) -> "Calibration":
        for _ in range(rounds):
            for t in self.timers():
                t.sample()
        return self

    @staticmethod
    def _line(points: dict[int, _Timer]) -> tuple[float, float]:
        """(seconds at 0 bytes, seconds per byte) through the timings at two sizes."""
        (s0, t0), (s1, t1) = [(s, t.seconds()) for s, t in sorted(points.items())][:1] + \
            [(s, t.seconds()) for s, t in sorted(points.items())][-1:]
        per_byte = max(0.0, (t1 - t0) / (s1 - s0)) if s1 > s0 else 0.0
        return max(0.0, t0 - per_byte * s0), per_byte

    def op_seconds(self, nbytes: float, kind: str = "elementwise") -> float:
        """Time of one memory-bound op of `kind` moving `nbytes`: straight lines through that
        kind's curve, flat below 4 KiB, the last segment's slope past the largest point."""
        points = sorted((s, t.seconds()) for s, t in self.memory.get(kind, self.memory["elementwise"]).items())
        if nbytes <= points[0][0]:
            return points[0][1]
        for (s0, t0), (s1, t1) in zip(points, points[1:]):
            if nbytes <= s1:
                return t0 + (t1 - t0) * (nbytes - s0) / (s1 - s0)
        return t1 + max(0.0, t1 - t0) * (nbytes - s1) / (s1 - s0)

    def figures(self) -> dict:
        """The calibration itself, as plain data (the report shows it): `op_s` is the smallest
        elementwise op's time, `bandwidth` the memory-bound ops' bytes over their time beyond
        it, `curves` each kind's GB/s per size."""
        op_s = min(t.seconds() for t in self.memory["elementwise"].values())
        mem = [(t, b, k) for t, f, b, k in self.m["ops"] if not f]
        moving = sum(t * (self.op_seconds(b, k) - op_s) for t, b, k in mem)
        dot_s = sum(t * self.dots[sig].seconds() for sig, t in self.m["dots"].items())
        dot_flops = sum(t * f for t, f, *_ in self.m["ops"] if f)
        return dict(op_s=op_s, bandwidth=sum(t * b for t, b, _ in mem) / moving if moving > 0 else math.inf,
                    curves={k: {s: s / t.seconds() for s, t in sorted(c.items())} for k, c in self.memory.items()},
                    matmul_flops_per_s=dot_flops / dot_s if dot_s else 0.0,
                    collectives={f"{k} {n}": self._line(p) for (k, n), p in self.collectives.items()})

    def predict(self) -> dict:
        fig = self.figures()
        compute = sum(t * self.dots[sig].seconds() for sig, t in self.m["dots"].items())
        # fusions around a dot are timed as the dot (XLA:CPU's dot fusions are a dot + a cheap epilogue)
        memory = sum(t * self.op_seconds(b, k) for t, f, b, k in self.m["ops"] if not f)
        comm_by_kind: dict[str, float] = {}
        for key, t in self.m["collective_ops"].items():
            kind, n, nbytes = key.split()
            if int(n) > 1:
                lat, per_byte = fig["collectives"][f"{kind} {n}"]
                comm_by_kind[kind] = comm_by_kind.get(kind, 0.0) + t * (lat + per_byte * float(nbytes))
        comm = sum(comm_by_kind.values())
        return dict(compute_s=compute, memory_s=memory, comm_s=comm, comm_by_kind_s=comm_by_kind,
                    step_s=compute + memory + comm, calibration=fig)
