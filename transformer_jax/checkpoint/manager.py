"""`Checkpointer`: orbax `CheckpointManager` plus checksums, fallback and quarantine.

Layout of a checkpoint directory (the trainer uses `<workdir>/checkpoints`):

    <dir>/<step>/state/          train state (orbax StandardSave: OCDBT, sharded arrays)
    <dir>/<step>/data_state/     process_<i>-of-<n>.json, each host's data-iterator state
    <dir>/<step>/config/         the experiment config (JSON)
    <dir>/<step>/meta/           small metadata (user dict + versions, device count, time)
    <dir>/<step>/tokenizer/      copy of the tokenizer files, if a tokenizer_dir was given
    <dir>/<step>/MANIFEST.sha256.json   size + CRC-32C of every file above (the manifest sealed by a sha256)
    <dir>/_quarantine/<step>     steps found corrupt or incomplete at restore, moved aside

Every step is self-contained (tokenizer included), so a step directory can be copied
alone and used by `init_from`, eval or export.

Guarantee (async mode, local/NFS/GCSFuse disk): every process checksums the array files it
wrote itself into `MANIFEST.process_<i>.sha256.json`, in orbax's background commit thread
as soon as its own writes are done (in parallel across processes); process 0 then writes
the tokenizer copy and `MANIFEST.sha256.json` (the remaining, small files and the
per-process manifests) inside orbax's `<step>.orbax-checkpoint-tmp` directory, after every
process has finished writing and before orbax renames the directory to `<step>`. So after
a `kill -9` at any moment, every `<step>` directory holds its manifests, and "last good" is the newest step whose files match it; a half-written save
is a leftover tmp directory that orbax ignores (and overwrites if that step is saved
again). Hashing adds to the background commit only; the training loop waits for it only
when the next `save` (which waits for the previous one, as orbax always does) or
`wait_until_finished` comes first. With `async_save=False` the manifest is written right
after orbax's commit, so a kill in between leaves a step without one: it counts as
incomplete and restore skips it. Restore verifies what it reads (the restored items), each
process hashing a share of the files.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm
from orbax.checkpoint import future as ocp_future

from transformer_jax.checkpoint import _sync
from transformer_jax.checkpoint.integrity import verify_step_dir, write_manifest, write_process_manifest
from transformer_jax.checkpoint.items import (DataState, DataStateHandler, DataStateRestore, DataStateSave,
                                              encode_data_state)
from transformer_jax.config import Config, ConfigError

log = logging.getLogger("transformer_jax.checkpoint")

QUARANTINE = "_quarantine"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointIntegrityError(RuntimeError):
    """No intact checkpoint where one was required. The message names each bad step and file."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Config):
    """Checkpoint settings (the `checkpoint` section of an experiment config)."""

    every_steps: int = 1000  # the trainer saves when step % every_steps == 0, at the end, on SIGTERM
    keep_last: int = 3  # newest steps kept
    keep_every: int | None = None  # also keep forever every step that is a multiple of this
    async_save: bool = True
    verify: bool = True  # check the manifests at restore; fall back past bad steps
    fresh_if_none_intact: bool = False  # the trainer starts fresh (bad steps quarantined) if no step is intact

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps={self.every_steps} must be >= 1")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1 (the newest step is always kept)")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"checkpoint.keep_every={self.keep_every} must be >= 1, or none to disable")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` gives back. `skipped` lists (step, reason) of newer steps
    that failed verification."""

    step: int
    state: Any
    data_state: DataState | None
    config_json: str | None
    metadata: dict
    tokenizer_dir: Path | None  # inside the step directory: load it before retention deletes the step
    skipped: tuple[tuple[int, str], ...] = ()


def _abstract(abstract_state: Any) -> Any:
    """Concrete arrays -> ShapeDtypeStruct with their sharding; insists on a sharding."""

    def one(path, leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(
                f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding; build leaves as "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))")
        return leaf

    return jax.tree_util.tree_map_with_path(one, abstract_state)


class _HashingStandardHandler(ocp.StandardCheckpointHandler):
    """orbax's StandardCheckpointHandler, plus: each process hashes the files it wrote, in
    orbax's background commit once its own writes are done (a commit future after the others)."""

    async def async_save(self, directory, *args, **kwargs):
        futures = list(await super().async_save(directory, *args, **kwargs) or [])
        index = jax.process_index()

        async def hash_when_written():
            for f in futures:
                await asyncio.to_thread(f.result)
            await asyncio.to_thread(write_process_manifest, Path(directory), index, "state")

        return futures + [ocp_future.CommitFutureAwaitingContractedSignals(hash_when_written(), name="hash_state")]

    def save(self, directory, *args, **kwargs):
        super().save(directory, *args, **kwargs)
        write_process_manifest(Path(directory), jax.process_index(), "state")


@ocp.args.register_with_handler(_HashingStandardHandler, for_save=True)
class _HashedSave(ocp.args.StandardSave):
    pass


@ocp.args.register_with_handler(_HashingStandardHandler, for_restore=True)
class _HashedRestore(ocp.args.StandardRestore):
    pass


def _read_tree(directory: Path) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            p = Path(root, name)
            files[p.relative_to(directory).as_posix()] = p.read_bytes()
    if not files:
        raise ValueError(f"tokenizer_dir={str(directory)!r} has no files; pass the directory the tokenizer was saved to")
    return files


def _use_coordination_service_barriers() -> None:
    """orbax's barriers through JAX's coordination service instead of its default, a jitted
    all-device collective: run from orbax's background commit thread, that collective interleaves
    with the train step's own (gloo on CPU aborted with "Received data size doesn't match")."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class Checkpointer:
    """Saves and restores training checkpoints in `directory` (see the module docstring).

    All processes call `save`, `restore` and `wait_until_finished` (they are collectives);
    only process 0 writes manifests, the tokenizer copy and quarantine moves.
    `read_only=True` (an eval or export job next to a live run) never writes or moves
    anything: bad steps are logged and skipped.
    """

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig | None = None, *,
                 tokenizer_dir: str | os.PathLike | None = None, read_only: bool = False):
        self.config = config or CheckpointConfig()
        self.read_only = read_only
        self.directory = Path(directory).absolute()
        self._tokenizer_files = _read_tree(Path(tokenizer_dir)) if tokenizer_dir is not None else {}
        self._pending_step: int | None = None
        if jax.process_count() > 1:
            _use_coordination_service_barriers()
        policy: ocm.PreservationPolicy = ocm.LatestN(self.config.keep_last)
        if self.config.keep_every:
            policy = ocm.AnyPreservationPolicy([policy, ocm.EveryNSteps(self.config.keep_every)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=self.config.async_save,
            read_only=read_only, create=not read_only,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_pending)
            if self.config.async_save else None,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _HashingStandardHandler(), "data_state": DataStateHandler(),
                           "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_state: DataState | None = None,
             config_json: str | None = None, metadata: dict | None = None) -> None:
        """Starts saving `state` (any pytree of jax.Arrays) with the data-iterator state, the
        config JSON and a small JSON-able `metadata` dict as checkpoint `step`. Returns once the
        arrays are copied to host memory (the caller may donate/overwrite them); files are
        written, hashed and committed in the background."""
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} is read_only; open it with read_only=False to save")
        step = int(step)
        items = {"state": _HashedSave(state), "meta": ocp.args.JsonSave(self._meta(step, metadata))}
        if data_state is not None:
            encode_data_state(data_state)  # fail here, not inside orbax's save
            items["data_state"] = DataStateSave(data_state)
        if config_json is not None:
            try:
                items["config"] = ocp.args.JsonSave({"config": json.loads(config_json)})
            except (TypeError, ValueError):
                raise ValueError("config_json must be a JSON string, e.g. config.to_json()") from None
        self._manager.wait_until_finished()  # orbax would wait here too; the pending step is then ours
        if step in self._manager.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {self.directory}")
        self._pending_step = step
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not self.config.async_save and _sync.is_primary():
            self._seal(self.step_dir(step))

    def _meta(self, step: int, metadata: dict | None) -> dict:
        doc = {"step": step, "saved_at": time.time(), "process_count": jax.process_count(),
               "device_count": jax.device_count(), "jax": jax.__version__, "orbax": ocp.__version__,
               "user": metadata or {}}
        try:
            json.dumps(doc)
        except TypeError as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
        return doc

    def _seal_pending(self) -> None:
        """orbax's post-finalization callback: process 0, background thread, before the rename."""
        step = self._pending_step
        tmp = self.directory / f"{step}{TMP_SUFFIX}"
        target = tmp if tmp.is_dir() else self.step_dir(step)
        if not target.is_dir():
            raise RuntimeError(f"checkpoint step {step}: neither {tmp} nor {self.step_dir(step)} exists to seal")
        self._seal(target)

    def _seal(self, step_dir: Path) -> None:
        for rel, data in self._tokenizer_files.items():
            p = step_dir / "tokenizer" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        write_manifest(step_dir)

    def wait_until_finished(self) -> None:
        """Blocks until the last save is committed with its manifest; re-raises its errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inspecting ----------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.directory / str(int(step))

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (not verified; see `verify`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def verify(self, step: int) -> str | None:
        """None if step's files match its manifest, else a reason naming the file."""
        return verify_step_dir(self.step_dir(step))

    # -- restoring -----------------------------------------------------------------------
    def restore(self, abstract_state: Any, *, step: int | None = None, fresh_if_none_intact: bool = False,
                restore_data_state: bool = True) -> Restored | None:
        """Restores a step onto the shardings in `abstract_state` (a pytree of
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, or of concrete arrays), on any mesh.

        With `step=None` it takes the newest intact step: newer steps that fail verification
        are logged (one line each), listed in `Restored.skipped` and moved to `_quarantine/`
        (unless read_only), so that saving those step numbers again works. Returns None if the
        directory holds no checkpoint. If none is intact it raises `CheckpointIntegrityError`
        (moving nothing), or, with `fresh_if_none_intact=True`, quarantines them all and
        returns None. An explicit `step` that is missing or corrupt raises."""
        abstract_state = _abstract(abstract_state)
        self.wait_until_finished()
        steps = self.all_steps()
        skipped: tuple[tuple[int, str], ...] = ()
        if step is not None:
            step = int(step)
            if step not in steps:
                raise ValueError(f"checkpoint step {step} not in {self.directory}; available steps: {steps}")
            if self.config.verify:
                reason = self._verify_read(step, restore_data_state)
                if reason is not None:
                    raise CheckpointIntegrityError(f"checkpoint step {step} in {self.directory} is {reason}")
        elif not steps:
            return None
        elif not self.config.verify:
            step = steps[-1]
        else:
            step, skipped = self._newest_intact(steps, fresh_if_none_intact, restore_data_state)
            if step is None:
                return None
        return self._restore_step(step, abstract_state, restore_data_state, skipped)

    def _verify_read(self, step: int, with_data: bool) -> str | None:
        """Verifies what a restore of `step` reads, each process hashing its share of the
        files; the same reason (or None) on every process (a collective)."""
        items = {"state", "meta", "config"} | ({"data_state"} if with_data else set())
        share = (jax.process_index(), jax.process_count())
        reasons = _sync.gather_text(verify_step_dir(self.step_dir(step), items, share) or "")
        return next((r for r in reasons if r), None)

    def _newest_intact(self, steps: list[int], fresh_ok: bool, with_data: bool) -> tuple[int | None, tuple]:
        found, bad = -1, []
        for s in reversed(steps):
            reason = self._verify_read(s, with_data)
            if reason is None:
                found = s
                break
            bad.append((s, reason))
        if found < 0 and not fresh_ok:
            detail = "; ".join(f"step {s} is {r}" for s, r in bad)
            raise CheckpointIntegrityError(
                f"no intact checkpoint in {self.directory}: {detail or 'see process 0'}; to start fresh, train "
                "with --set checkpoint.fresh_if_none_intact=true (in Python: restore(..., fresh_if_none_intact=True)); "
                "the bad steps then move to _quarantine/")
        for i, (s, reason) in enumerate(bad if _sync.is_primary() else []):  # process 0 logs and moves
            older = bad[i + 1][0] if i + 1 < len(bad) else (found if found >= 0 else None)
            then = f"falling back to step {older}" if older is not None else "starting fresh"
            where = "left in place: read_only" if self.read_only else f"moved to {self._quarantine(s)}"
            log.warning(f"checkpoint step {s} is {reason}; {then} ({where})")
        _sync.barrier(f"transformer_jax_checkpoint_quarantine_{found}")
        if (bad or jax.process_count() > 1) and not self.read_only:
            self._manager.reload()
        return (found if found >= 0 else None), tuple(bad)

    def _quarantine(self, step: int) -> Path:
        qdir = self.directory / QUARANTINE
        qdir.mkdir(exist_ok=True)
        dest, n = qdir / str(step), 1
        while dest.exists():
            dest, n = qdir / f"{step}.{n}", n + 1
        os.replace(self.step_dir(step), dest)
        return dest

    def _restore_step(self, step: int, abstract_state: Any, with_data: bool, skipped: tuple) -> Restored:
        d = self.step_dir(step)
        items = {"state": _HashedRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if (d / "config").is_dir():
            items["config"] = ocp.args.JsonRestore()
        if with_data and (d / "data_state").is_dir():
            items["data_state"] = DataStateRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        config = out["config"]["config"] if "config" in items else None
        return Restored(
            step=step, state=out["state"],
            data_state=out["data_state"] if "data_state" in items else None,
            config_json=json.dumps(config, indent=2, sort_keys=True) if config is not None else None,
            metadata=out["meta"].get("user", {}),
            tokenizer_dir=d / "tokenizer" if (d / "tokenizer").is_dir() else None,
            skipped=skipped)
