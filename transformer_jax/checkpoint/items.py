"""The data-iterator state as an orbax checkpoint item, one JSON file per process.

Each host's grain iterator has its own position, so every process writes
`data_state/process_<i>-of-<n>.json` (grain's own naming). `get_state()` of a
`grain.DataLoader` iterator gives bytes, of a `grain.DatasetIterator` a dict; both are
kept with their type so `set_state` gets back exactly what it gave.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from typing import Any, Union

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future as ocp_future

DataState = Union[bytes, str, dict, list]


def encode_data_state(state: DataState) -> str:
    if isinstance(state, bytes):
        doc = {"type": "bytes", "value": base64.b64encode(state).decode("ascii")}
    elif isinstance(state, (str, dict, list)):
        doc = {"type": "json", "value": state}
    else:
        raise ValueError(
            f"data_state must be bytes, str, dict or list (an iterator's get_state()), got {type(state).__name__}")
    try:
        return json.dumps(doc, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"data_state is not JSON-serialisable: {e}") from None


def decode_data_state(text: str) -> DataState:
    doc = json.loads(text)
    if doc["type"] == "bytes":
        return base64.b64decode(doc["value"])
    return doc["value"]


def _filename(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


class DataStateHandler(ocp.handlers.AsyncCheckpointHandler):
    """Saves this process's data-iterator state; restores it for the same process count, or for
    any when every process saved the same state (the trainer's iterator counts global rows)."""

    async def _write(self, path: epath.Path, text: str) -> None:
        await asyncio.to_thread(path.write_text, text)

    async def async_save(self, directory: epath.Path, args: "DataStateSave") -> list[Any]:
        text = encode_data_state(args.state)  # serialised now: later iterator steps do not leak in
        path = directory / _filename(jax.process_index(), jax.process_count())
        return [ocp_future.CommitFutureAwaitingContractedSignals(self._write(path, text), name="data_state_save")]

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        (directory / _filename(jax.process_index(), jax.process_count())).write_text(encode_data_state(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> DataState:
        index, count = jax.process_index(), jax.process_count()
        path = directory / _filename(index, count)
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            texts = {(directory / name).read_text() for name in saved if name.startswith("process_")}
            if len(texts) == 1:  # every host was at the same (global) position: it fits any process count
                return decode_data_state(texts.pop())
            raise ValueError(
                f"data-iterator state for process {index} of {count} not in {directory} (has {saved}); "
                "it was saved by a different number of processes: restore with restore_data_state=False "
                "to restart the data iterator")
        return decode_data_state(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: DataState


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass
