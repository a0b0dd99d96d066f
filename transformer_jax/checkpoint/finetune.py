"""`init_from`: start a new model from some of a checkpoint's parameters (fine-tuning).

Parameters are matched by path ('encoder/layer_0/attn/q_kernel') under `subtree` of the
saved train state. A parameter restored needs the same path and shape in both; a new
model's parameter the checkpoint lacks (a new head) keeps its fresh value; a checkpoint
parameter the new model lacks (the old head) is left on disk; a same-path, different-shape
pair (a head with a new number of classes) keeps the fresh value and is reported. dtypes
are cast to the new model's. Only the selected arrays are read (orbax partial restore).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from transformer_jax.checkpoint import _sync
from transformer_jax.checkpoint.integrity import MANIFEST_NAME, verify_step_dir
from transformer_jax.checkpoint.manager import CheckpointIntegrityError

log = logging.getLogger("transformer_jax.checkpoint")


@dataclasses.dataclass(frozen=True)
class InitFromReport:
    step_dir: Path
    restored: tuple[str, ...]  # paths copied from the checkpoint
    fresh: tuple[str, ...]  # the new model's paths the checkpoint lacks (or `include` left out)
    mismatched: tuple[str, ...]  # 'path: checkpoint (a, b) vs model (c, d)', kept fresh
    unused: tuple[str, ...]  # checkpoint paths under `subtree` the new model lacks

    def summary(self) -> str:
        return (f"init_from {self.step_dir}: restored {len(self.restored)} parameters, fresh {len(self.fresh)}"
                f" {list(self.fresh)[:4]}, shape-mismatched {len(self.mismatched)} {list(self.mismatched)[:4]},"
                f" unused {len(self.unused)} {list(self.unused)[:4]}")


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves if leaf is not None}


def _is_step_dir(d: Path) -> bool:
    return (d / "state").is_dir() and ((d / MANIFEST_NAME).exists() or (d / "_CHECKPOINT_METADATA").exists())


def resolve_step_dir(source: str | os.PathLike, *, verify: bool = True) -> Path:
    """A step directory from `source`: a step directory itself (verified, no fallback), a
    checkpoint directory (its newest intact step; bad newer steps are logged and skipped,
    not moved) or a workdir holding `checkpoints/`."""
    src = Path(source).absolute()
    if _is_step_dir(src):
        reason = verify_step_dir(src) if verify else None
        if reason:
            raise CheckpointIntegrityError(f"init_from: checkpoint {src} is {reason}")
        return src
    root = src / "checkpoints" if (src / "checkpoints").is_dir() and not any(_steps(src)) else src
    steps = _steps(root)
    if not steps:
        raise FileNotFoundError(f"init_from={str(source)!r} holds no checkpoint (no <step>/state/ inside)")
    bad = []
    for s in reversed(steps):
        reason = verify_step_dir(root / str(s)) if verify else None
        if reason is None:
            for b, why in bad:
                log.warning(f"init_from: checkpoint step {b} is {why}; falling back to step {s}")
            return root / str(s)
        bad.append((s, reason))
    raise CheckpointIntegrityError(
        f"init_from: no intact checkpoint in {root}: " + "; ".join(f"step {s} is {r}" for s, r in bad))


def _steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir())


def init_from(source: str | os.PathLike, params: Any, *, subtree: str = "params",
              include: Sequence[str] | None = None, verify: bool = True) -> tuple[Any, InitFromReport]:
    """Copies matching parameters of checkpoint `source` into `params`, the new model's tree.

    `params` leaves are either freshly initialised jax.Arrays or `jax.ShapeDtypeStruct`s with
    a sharding; restored leaves land on those shardings, the others come back unchanged.
    `subtree` is the '/'-path of the parameters inside the saved state ("params" for a train
    state with a `params` field). `include` limits restoring to paths starting with one of
    its prefixes (e.g. ["encoder"] to take only the backbone). Pass an unboxed tree
    (`flax.linen.meta.unbox`). Raises if nothing matches (a wrong `subtree` or boxed params).
    """
    step_dir = ""
    if _sync.is_primary():
        try:
            step_dir = str(resolve_step_dir(source, verify=verify))
        except (CheckpointIntegrityError, FileNotFoundError) as e:
            if jax.process_count() == 1:
                raise
            step_dir = ("\x01" + str(e))[:2000]  # tell the other processes, then fail everywhere
    step_dir = _broadcast_path(step_dir)
    if step_dir.startswith("\x01"):
        raise CheckpointIntegrityError(step_dir[1:])
    step_dir = Path(step_dir)
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir / "state"))
    saved = meta.tree
    prefix = [p for p in subtree.split("/") if p]
    for key in prefix:
        if not isinstance(saved, dict) or key not in saved:
            top = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"init_from: subtree={subtree!r} not in checkpoint {step_dir} (top-level keys: {top})")
        saved = saved[key]
    saved_flat, new_flat = _flat(saved), _flat(params)

    restored, fresh, mismatched, item = [], [], [], {}
    for path, leaf in new_flat.items():
        wanted = include is None or any(path == p or path.startswith(p.rstrip("/") + "/") for p in include)
        on_disk = saved_flat.get(path)
        if not wanted or on_disk is None:
            fresh.append(path)
        elif tuple(on_disk.shape) != tuple(leaf.shape):
            mismatched.append(f"{path}: checkpoint {tuple(on_disk.shape)} vs model {tuple(leaf.shape)}")
        else:
            restored.append(path)
            _set(item, prefix + path.split("/"), jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding))
    unused = sorted(set(saved_flat) - set(new_flat))
    if not restored:
        raise ValueError(
            f"init_from: no parameter of the new model matches {step_dir} under {subtree!r} "
            f"(model has e.g. {list(new_flat)[:3]}, checkpoint has e.g. {list(saved_flat)[:3]}); "
            "check `subtree` and pass unboxed params")
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        got = ckptr.restore(epath.Path(step_dir / "state"), args=args)
    for key in prefix:
        got = got[key]
    got_flat = _flat(got)
    merged = jax.tree_util.tree_map_with_path(
        lambda path, leaf: got_flat.get("/".join(_key_str(k) for k in path), leaf), params)
    report = InitFromReport(Path(step_dir), tuple(restored), tuple(fresh), tuple(mismatched), tuple(unused))
    log.info(report.summary())
    return merged, report


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _broadcast_path(path: str) -> str:
    """Process 0's path string on every process."""
    if jax.process_count() == 1:
        return path
    import numpy as np
    from jax.experimental import multihost_utils

    raw = path.encode()
    if len(raw) > 4096:
        raise ValueError(f"checkpoint path longer than 4096 bytes: {path[:80]}...")
    buf = np.zeros(4096, np.int32)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)
    return bytes(out[out != 0]).decode()
