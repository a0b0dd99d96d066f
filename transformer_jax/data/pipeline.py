"""The input pipeline: grain over random-access batches, resumable, per host.

Global structure first, hosts second. A task (tasks.py) defines `rows_per_epoch` rows;
the rows of epoch e are visited in a permutation seeded by (seed, e) — documents are also
reordered per epoch inside the task — and global batch b is global rows
[b*B, (b+1)*B). Host p of P builds rows [b*B + p*B/P, b*B + (p+1)*B/P) and reads only
the token slices those rows need. Hence:

* the global batch does not depend on the number of hosts or grain workers;
* the iterator state is one number (rows consumed) plus a fingerprint of everything
  that shapes the data, so a resumed run sees exactly the batches it would have seen,
  on any number of hosts, with any worker count (and any batch size dividing it);
* with `num_epochs` set, the last batch is padded with empty rows (weights 0) and
  iteration stops; `num_epochs=None` never stops.

Each batch is one grain `MapDataset` element: `worker_count=0` reads in a background
thread of this process, `worker_count>0` in that many processes (`mp_prefetch`).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any, Mapping

import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.data import _files, cache, config, corpus, tasks
from transformer_jax.data.tokenizer import Tokenizer, get_tokenizer

_STATE_VERSION = 1


class RowOrder:
    """Global row g -> (epoch, row of that epoch), rows shuffled per epoch when asked."""

    def __init__(self, rows_per_epoch: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = rows_per_epoch, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def locate(self, g: int) -> tuple[int, int]:
        e, r = divmod(g, self.n)
        if not self.shuffle:
            return e, r
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, np.random.default_rng([self.seed, 0, e]).permutation(self.n))
        return e, int(self._perm[1][r])


class BatchSource:
    """Random-access source for grain: item b is this host's part of global batch b."""

    def __init__(self, task, order: RowOrder, global_batch: int, process_index: int, process_count: int,
                 num_epochs: int | None, name: str):
        self.task, self.order, self.global_batch = task, order, global_batch
        self.local_batch = global_batch // process_count
        self.first = process_index * self.local_batch
        self.total_rows = None if num_epochs is None else task.rows_per_epoch * num_epochs
        self.name = name

    def __len__(self) -> int:
        return sys.maxsize if self.total_rows is None else -(-self.total_rows // self.global_batch)

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        out = {k: np.zeros((self.local_batch,) + self.task.shapes[k], dt) for k, dt in self.task.keys.items()}
        for k in range(self.local_batch):
            g = b * self.global_batch + self.first + k
            if self.total_rows is None or g < self.total_rows:
                self.task.fill(out, k, *self.order.locate(g))
        return out

    def __repr__(self) -> str:
        return f"BatchSource({self.name})"


class DataIterator:
    """Iterator of local batch dicts with `get_state()` -> bytes (JSON) and `set_state()`.

    Works with grain's own orbax handler (`grain.checkpoint.CheckpointSave(it)`) as well as
    any code that stores the bytes."""

    def __init__(self, source: BatchSource, fingerprint: str, worker_count: int):
        self.source, self.fingerprint, self.worker_count = source, fingerprint, worker_count
        self._next = 0
        self._it = None

    @property
    def num_batches(self) -> int | None:
        """Batches per iteration (None: endless)."""
        return None if self.source.total_rows is None else len(self.source)

    @property
    def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        t = self.source.task
        return {k: ((self.source.local_batch,) + t.shapes[k], np.dtype(dt)) for k, dt in t.keys.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self.start_prefetch()
        batch = next(self._it)
        self._next += 1
        return batch

    def start_prefetch(self) -> None:
        if self._it is not None:
            return
        import grain
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = grain.MapDataset.source(self.source)[self._next:]
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
        if self.worker_count:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=2))
        self._it = iter(ds)

    def get_state(self) -> bytes:
        rows = self._next * self.source.global_batch
        return json.dumps(dict(version=_STATE_VERSION, rows=rows, fingerprint=self.fingerprint)).encode()

    def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("data-iterator state was saved for different data (source, task, seq_len, seed or "
                             "tokenizer changed); restore with the same DataConfig or restart the data")
        b, rem = divmod(int(state["rows"]), self.source.global_batch)
        if rem:
            raise ValueError(f"data-iterator state is at row {state['rows']}, not a multiple of "
                             f"global_batch_size={self.source.global_batch}; resume with the old batch size")
        self.close()
        self._next = b

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def make_iterator(cfg: config.DataConfig, tokenizer: Tokenizer | None = None, *, seq_len: int,
                  global_batch_size: int, split: str | None = None, task: str | None = None,
                  seed: int | None = None, process_index: int | None = None, process_count: int | None = None,
                  num_epochs: int | None = None, shuffle: bool | None = None, target_seq_len: int | None = None,
                  worker_count: int | None = None) -> DataIterator:
    """This host's iterator of batches (see the package docstring for their keys).

    Defaults: split=cfg.train_split, task=cfg.task, seed=cfg.seed, hosts from jax,
    shuffle only the train split, target_seq_len=seq_len (seq2seq; span derives its own),
    worker_count=cfg.worker_count."""
    if task is not None and task != cfg.task:
        cfg = cfg.replace(task=task)
    task, split = cfg.task, split or cfg.train_split
    seed = cfg.seed if seed is None else seed
    workers = cfg.worker_count if worker_count is None else worker_count
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    _check(seq_len, target_seq_len, global_batch_size, process_index, process_count, num_epochs)
    shuffle = split == cfg.train_split if shuffle is None else shuffle
    tokenizer = tokenizer or get_tokenizer(cfg)
    root, f = config.data_dir(cfg), config.fields(cfg)
    data = corpus.open_split(cfg.source, root, split)
    if len(data) == 0:
        raise ConfigError(f"split {split!r} of {cfg.source!r} has no examples; choose another split")
    t = _make_task(cfg, task, tokenizer, root, data, f, seq_len, target_seq_len or seq_len, seed, shuffle)
    fingerprint = _files.digest(data.full_name, split, task, tokenizer.fingerprint, f, seq_len, target_seq_len,
                                seed, shuffle, num_epochs, cfg.mask_rate, cfg.noise_density,
                                cfg.mean_noise_span_length)
    source = BatchSource(t, RowOrder(t.rows_per_epoch, seed, shuffle), global_batch_size, process_index,
                         process_count, num_epochs, f"{data.full_name}/{split}/{task}/{fingerprint}")
    return DataIterator(source, fingerprint, workers)


def _check(seq_len, target_seq_len, global_batch_size, process_index, process_count, num_epochs) -> None:
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be >= 2 (a row needs an input and a target)")
    if target_seq_len is not None and target_seq_len < 2:
        raise ConfigError(f"target_seq_len={target_seq_len} must be >= 2")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                          f"process count {process_count}")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must be in [0, {process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs={num_epochs} must be >= 1, or None for endless")


def _make_task(cfg, task, tok, root, data, f, seq_len, target_len, seed, shuffle):
    if tok.kind == "hf" and task != "lm":
        raise ConfigError(f"task={task!r} needs this library's own tokenizer (mask/sentinel/bos ids); a "
                          "checkpoint's tokenizer trains task='lm' only")
    if task == "seq2seq":
        return tasks.Seq2SeqTask(cache.token_store(root, data, f["input"], tok),
                                 cache.token_store(root, data, f["target"], tok), seq_len, target_len, seed, shuffle)
    store = cache.token_store(root, data, f["text"], tok)
    if task == "lm":
        return tasks.LMTask(store, seq_len, seed, shuffle, bos_id=tok.bos_id, eos_id=tok.eos_id)
    if task == "mlm":
        return tasks.MLMTask(store, seq_len, seed, shuffle, cfg.mask_rate, tok.first_regular_id,
                             tok.used_vocab_size)
    if task == "span":
        return tasks.SpanTask(store, seq_len, seed, shuffle, cfg.noise_density, cfg.mean_noise_span_length,
                              tok.sentinel_ids)
    data.num_classes(f["label"])  # a clear error if the label field is not a ClassLabel
    return tasks.ClassifyTask(store, cache.label_array(root, data, f["label"]), seq_len)


def label_names(cfg: config.DataConfig) -> list[str]:
    """Class names of the label field (task='classify'); len() is the number of classes."""
    data = corpus.open_split(cfg.source, config.data_dir(cfg), cfg.train_split)
    field = config.fields(cfg)["label"]
    data.num_classes(field)
    return list(data.features[field].names)


def make_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Local batch dict -> global `jax.Array`s (batch dim = local * process count).

    `sharding` is one `jax.sharding.Sharding` for every key (a NamedSharding's spec is cut
    to each array's rank, so P('data', None) also serves the [B] label) or a dict per key."""
    import jax
    out = {}
    for k, x in batch.items():
        s = sharding[k] if isinstance(sharding, Mapping) else _for_rank(sharding, x.ndim)
        shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        out[k] = jax.make_array_from_process_local_data(s, x, shape)
    return out


def _for_rank(sharding, ndim: int):
    from jax.sharding import NamedSharding, PartitionSpec
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > ndim:
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:ndim]))
    return sharding


def tokens_per_batch(it: DataIterator) -> int:
    """Nominal tokens in one local batch (rows x seq_len), for throughput numbers."""
    return it.source.local_batch * math.prod(it.source.task.shapes[next(iter(it.source.task.keys))])
