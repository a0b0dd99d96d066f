"""From logical axis names to shardings, and sharded initialisation.

    abstract = jax.eval_shape(init_fn, *args)             # boxed with logical names
    shardings = logical_shardings(abstract, mesh, rules)  # NamedSharding per leaf
    params = jax.jit(init_fn, out_shardings=shardings)(*args)

so no parameter is ever materialised whole on one device.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer_jax.parallel.rules import AXIS_SETTINGS, Rules


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding for every leaf of a (boxed) tree; unboxed leaves are replicated.

    Under a preset that splits weights over fsdp, every weight is split over fsdp (ZeRO-3): one
    whose named axes the rules leave whole over fsdp (the bias of a projection into heads or
    mlp) on its largest dimension that fsdp divides ("layers" excepted, which the layer scan
    slices), or else after tensor on a dimension tensor splits (the mlp bias under fsdp_tp).
    Its gradient is then reduce-scattered with the others, where GSPMD all-reduces a
    replicated one once per microbatch under gradient accumulation. Leaves with an unnamed
    axis (T5's relative-position table, LoRA factors) keep the rules' sharding: split over
    fsdp, the position table's forward gathered more bytes than its gradient saved."""
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    if mesh.shape.get("fsdp", 1) == 1 or not any(axes == "fsdp" for name, axes in rules if name != "batch"):
        return shardings

    def zero3(leaf, sharding):
        if not isinstance(leaf, nn.LogicallyPartitioned) or None in leaf.names:
            return sharding
        shape, keep = leaf.value.shape, tuple(i for i, name in enumerate(leaf.names) if name == "layers")
        split = split_update(sharding, shape, "fsdp", keep)
        spec = tuple(split.spec) + (None,) * (len(shape) - len(split.spec))
        if any("fsdp" in mesh_axes_of(e) for e in spec):
            return split
        for i, (n, e) in enumerate(zip(shape, spec)):  # after tensor, on a dimension tensor splits
            axes = mesh_axes_of(e) + ("fsdp",)
            if len(axes) > 1 and i not in keep and n % math.prod(mesh.shape[a] for a in axes) == 0:
                return NamedSharding(mesh, PartitionSpec(*spec[:i], axes, *spec[i + 1:]))
        return split
    return jax.tree.map(zero3, abstract_tree, shardings, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def mesh_axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry: None, a name or a tuple of names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(abstract_tree: Any, mesh: Mesh, rules: Rules) -> None:
    """Raises a one-line ValueError when a sharded dimension does not divide its mesh axes.

    With several, it names the one a user most likely set (num_heads before num_kv_heads,
    which defaults to it, then d_ff, d_model, vocab_size)."""
    bad = []

    def visit(path, leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return
        mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
        for dim, name, axes in zip(leaf.value.shape, leaf.names, mesh_axes):
            if axes is None:
                continue
            axes = mesh_axes_of(axes)
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if dim % size:
                where = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
                setting = AXIS_SETTINGS.get(name, name)
                bad.append((_PRIORITY.index(name) if name in _PRIORITY else len(_PRIORITY), len(bad),
                            f"{setting}={dim} is not divisible by {where} (parameter "
                            f"{jax.tree_util.keystr(path)}); change the model or the mesh"))
    jax.tree_util.tree_map_with_path(visit, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    if bad:
        raise ValueError(min(bad)[2])


def split_update(sharding: jax.sharding.NamedSharding, shape: tuple[int, ...],
                 axis: str = "data", keep: tuple[int, ...] = ()) -> jax.sharding.NamedSharding:
    """`sharding` with `axis` added on one more dimension: the largest one that no other mesh
    axis splits and that `axis` divides, `keep` excepted (unchanged when there is none, when
    `axis` splits one already, or has size 1).

    The weight update's sharding (Xu et al. 2020, "Automatic cross-replica sharding of weight
    update"): gradients reduce-scattered over data, each replica updates its 1/d of the
    weights and optimizer state, and the new weights are all-gathered: the link bytes of the
    gradient all-reduce, with the optimizer's work and memory split d ways."""
    size = sharding.mesh.shape[axis]
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    free = [i for i, (n, e) in enumerate(zip(shape, spec)) if e is None and n % size == 0 and i not in keep]
    if size == 1 or not free or any(axis in mesh_axes_of(e) for e in spec):
        return sharding
    dim = max(free, key=lambda i: (shape[i], -i))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *spec[:dim], axis, *spec[dim + 1:]))


def logical_shards(name: str, manual: bool = True) -> int:
    """How many devices split logical axis `name` under the current mesh and logical rules
    (1 off a mesh); manual=False counts only the axes the SPMD partitioner places (not those
    of an enclosing shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((name,))[0]
    axes = mesh_axes_of(axes)
    skip = () if manual else tuple(mesh.manual_axes)
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape and a not in skip]))


_PRIORITY = ("heads", "kv_heads", "mlp", "embed", "vocab", "head_dim")


def init_sharded(init_fn: Callable, mesh: Mesh, rules: Rules, *args) -> Any:
    """Runs `init_fn(*args)` jitted with out_shardings from its logical axis names."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_fn, *args)
        check_divisible(abstract, mesh, rules)
        shardings = logical_shardings(abstract, mesh, rules)
        return jax.jit(init_fn, out_shardings=shardings)(*args)
