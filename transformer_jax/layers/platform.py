"""The platform a program is traced for, and the float32-accumulating dot that suits it.

Kernels and dot precisions are chosen while tracing, for this host's backend or for the
platform of an enclosing `target_platform` (to lower or export for a device this host lacks):

    with target_platform("cuda"):
        lowered = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",))

`dot_general` / `einsum` contract low-precision operands with float32 accumulation. On GPUs
and TPUs that is one bf16 x bf16 -> f32 dot (tensor cores, the MXU). On one CPU device it is
whichever of two equal computations this CPU runs faster: that dot, or the operands upcast to
float32 first (the same products, a product of two bf16 numbers being exact in float32, and
the same float32 sums). Which one wins depends on the CPU, not on its flags. Measured with
jax 0.10.2 on the bench model's shapes [4096,512]x[512,2048], [4096,2048]x[2048,512] and
[1024,512]x[512,32768], GFLOP/s, bf16 x bf16 -> f32 against upcast:

- 2-core Xeon, avx512-bf16, no AMX: 131 / 138 / 76 against 178 / 147 / 139 (upcast wins);
- 2-core AMD EPYC, avx512-bf16: 239 / 282 / 243 against 143 / 135 / 151 (bf16 wins).

So the first CPU dot traced in a process times one [512, 1024] x [1024, 1024] dot both ways
(about 0.2 s, compiles included) and keeps the faster, upcasting unless bf16 is clearly (1.15x) faster. The
environment variable `TRANSFORMER_JAX_CPU_DOTS=f32|bf16|auto` (default auto) or the
`cpu_dots(...)` context fixes the choice, e.g. for programs that must compile the same on
every host.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
MIN_UPCAST_FREE = 64  # rows and columns a dot needs before CPU upcasts its operands
THIN_ROWS = (1, 32)  # rows of x for which `thin_table_logits` transposes the dot on CPU
_TARGET = jax.make_user_context(None)  # part of jit's cache key: a new platform re-traces
_ACCELERATOR_DOTS = jax.make_user_context(False)
CPU_DOTS_ENV = "TRANSFORMER_JAX_CPU_DOTS"
CPU_DOT_KINDS = ("f32", "bf16", "auto")
_CPU_DOTS = jax.make_user_context(None)  # a `cpu_dots` choice, else the environment's


@contextlib.contextmanager
def target_platform(platform: str):
    """Kernels and dots are chosen for `platform` while tracing in this block, instead of for
    this host's backend."""
    if platform not in PLATFORMS:
        raise ValueError(f"target_platform={platform!r} is unknown; choose cuda, rocm, tpu or cpu")
    with _TARGET(platform):
        yield


@contextlib.contextmanager
def accelerator_dots():
    """Dots keep their bf16 operands on CPU too, as on a GPU or TPU: for a CPU compile that
    stands for an accelerator's program (`plan --chip`), whose memory and collectives it reports."""
    with _ACCELERATOR_DOTS(True):
        yield


@contextlib.contextmanager
def cpu_dots(kind: str):
    """Large low-precision dots on one CPU device run as `kind` while tracing in this block:
    "f32" upcasts their operands, "bf16" keeps bf16 x bf16 -> f32, "auto" times both once."""
    _check_kind(kind, "cpu_dots")
    with _CPU_DOTS(kind):
        yield


def cpu_dot_kind() -> str:
    """"f32" or "bf16": how a compute-bound low-precision dot runs on one CPU device here."""
    kind = _CPU_DOTS.value or environment_cpu_dots()
    return faster_cpu_dot() if kind == "auto" else kind


def environment_cpu_dots() -> str:
    """`TRANSFORMER_JAX_CPU_DOTS` (default "auto"); a ValueError naming it if it is unknown."""
    kind = os.environ.get(CPU_DOTS_ENV, "auto")
    _check_kind(kind, CPU_DOTS_ENV)
    return kind


def _check_kind(kind: str, name: str):
    if kind not in CPU_DOT_KINDS:
        raise ValueError(f"{name}={kind!r} is unknown; choose f32 (upcast operands), bf16 or auto (time both)")


@functools.cache
def faster_cpu_dot(rounds: int = 5, margin: float = 1.15) -> str:
    """Times a [512, 1024] x [1024, 1024] bf16 dot with f32 accumulation, as bf16 x bf16 and
    with operands upcast, interleaved for `rounds`; "bf16" if its median is `margin` x faster."""
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.ensure_compile_time_eval():
        a = jax.device_put(jnp.ones((512, 1024), jnp.bfloat16), cpu)
        b = jax.device_put(jnp.ones((1024, 1024), jnp.bfloat16), cpu)
        dots = {"bf16": jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=F32)),
                "f32": jax.jit(lambda a, b: lax.dot(a.astype(F32), b.astype(F32), preferred_element_type=F32))}
        times = {k: [] for k in dots}
        for i in range(rounds + 1):
            for kind, dot in dots.items():
                t = time.perf_counter()
                dot(a, b).block_until_ready()
                if i:  # the first round compiles
                    times[kind].append(time.perf_counter() - t)
    ratio = statistics.median(times["f32"]) / statistics.median(times["bf16"])
    return "bf16" if ratio >= margin else "f32"


def backend() -> str:
    """jax.default_backend(), with "gpu" split into "cuda" and "rocm" (cuDNN exists only on CUDA),
    or the platform of an enclosing `target_platform`."""
    if _TARGET.value is not None:
        return _TARGET.value
    name = jax.default_backend()
    if name == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "").lower()
        return "rocm" if "rocm" in version else "cuda"
    return name


def _operands(a: jax.Array, b: jax.Array, a_free: int, b_free: int) -> tuple[jax.Array, jax.Array]:
    """float32 operands on one CPU device whose float32 GEMM is the faster, where both sides are
    reused often enough for the dot to be compute-bound; a thin dot (e.g. decoding 8 rows
    against a weight) reads bf16 at half the bytes. Measured on the Xeon above: the bench
    model's bf16 train step -8% wall / -10% CPU time upcast (medians of 6 interleaved steps). A multi-device CPU program keeps bf16 operands: it
    stands in for an accelerator's (the collective and preset tests), and under FSDP XLA gathered
    the upcast kernel in f32 (1.20x the textbook's all-gather bytes)."""
    if min(a_free, b_free) >= MIN_UPCAST_FREE and (a.dtype, b.dtype) != (F32, F32) and _upcast_here():
        return a.astype(F32), b.astype(F32)
    return a, b


def _upcast_here() -> bool:
    return _one_cpu_device() and cpu_dot_kind() == "f32"


def _one_cpu_device() -> bool:
    """Whether this program runs on one CPU device (not standing for an accelerator's)."""
    if backend() != "cpu" or _ACCELERATOR_DOTS.value:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def _free_size(x: jax.Array, *used: tuple[int, ...]) -> int:
    return math.prod(d for i, d in enumerate(x.shape) if not any(i in u for u in used))


def dot_general(a: jax.Array, b: jax.Array, dimension_numbers) -> jax.Array:
    """`lax.dot_general` accumulated and returned in float32."""
    (ca, cb), (ba, bb) = dimension_numbers
    a, b = _operands(a, b, _free_size(a, ca, ba), _free_size(b, cb, bb))
    return lax.dot_general(a, b, dimension_numbers, preferred_element_type=F32)


def weight_gradient(x: jax.Array, g: jax.Array, n_batch: int) -> jax.Array:
    """x^T . g over their first `n_batch` axes (a projection's kernel gradient), in float32.

    XLA:CPU (jax 0.10.2) gives such a dot to its GEMM by first copying x transposed, and it
    copies 2-byte elements ~7x slower per byte than 4-byte ones. On one CPU device, when g has
    fewer columns than x (the MLP's output projection: 512 against 2048), this computes
    (g^T . x)^T instead: the smaller bf16 operand is the one copied, and the f32 result is
    transposed after a barrier (without it XLA folds the transpose into the dot's layout, and
    the dot leaves the fast path). wo's gradient on the bench model: 54 -> 27 ms."""
    dims = ((tuple(range(n_batch)), tuple(range(n_batch))), ((), ()))
    if x.dtype.itemsize == 2 and _free_size(g, dims[0][1]) < _free_size(x, dims[0][0]) and _one_cpu_device():
        gx = lax.optimization_barrier(dot_general(g, x, dims))  # [g's columns..., x's columns...]
        ng = g.ndim - n_batch
        return jnp.transpose(gx, tuple(range(ng, gx.ndim)) + tuple(range(ng)))
    return dot_general(x, g, dims)


def thin_table_logits(x: jax.Array, table: jax.Array) -> jax.Array | None:
    """x . table^T for a float32 [..., D] x and a [V, D] table (a tied output layer), computed as
    (table . x^T)^T on one CPU device when x has 1-32 rows (decoding: a row per sequence); None
    otherwise (the caller's plain dot).

    XLA:CPU's GEMM (jax 0.10.2) streams a wide table faster against a few columns than against a
    few rows: the bench model's [32768, 512] table takes 5.0 -> 3.4 ms with 8 rows and 9.9 -> 6.8 ms
    with 32 (2-core EPYC); nothing is gained in bf16 or from 64 rows on. With 1 row the plain dot
    is a vector-matrix product that XLA fuses with the final norm into an elementwise loop: 3.7 ms
    per decode step against 2.3 as a matrix-vector GEMV (2-core Intel Xeon). The barrier keeps
    XLA from folding the transpose back into the dot's layout."""
    rows = math.prod(x.shape[:-1])
    if not (THIN_ROWS[0] <= rows <= THIN_ROWS[1] and x.dtype == table.dtype == F32 and _one_cpu_device()):
        return None
    y_VM = lax.optimization_barrier(lax.dot_general(table, x.reshape(rows, -1), (((1,), (1,)), ((), ()))))
    return y_VM.T.reshape(*x.shape[:-1], table.shape[0])


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum` of two operands (explicit `->` spec), accumulated and returned in float32."""
    sa, sb = spec.split("->")[0].split(",")
    free = lambda x, mine, other: math.prod(d for c, d in zip(mine, x.shape) if c not in other)  # noqa: E731
    a, b = _operands(a, b, free(a, sa, sb), free(b, sb, sa))
    return jnp.einsum(spec, a, b, preferred_element_type=F32)
