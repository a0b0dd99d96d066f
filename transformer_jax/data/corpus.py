"""TFDS builders for local text, and one way to open any source's split.

Builders (`tfds.core.GeneratorBasedBuilder`, written as ArrayRecord, read back with
`builder.as_data_source` — no TensorFlow, no network):

* `PythonSource` ("python_source"): the running interpreter's standard library `.py`
  files, skipping `site-packages` and test directories; one example per file
  `{path, text}`, less the lines of the functions `python_functions` validates on. Its config name says which Python it came from ("cpython-3.11.7").
* `TextFiles` ("text_files"): every non-hidden file under a directory, or the files a glob
  matches. Files are cut into documents of at most 64 KiB (at a newline when there is
  one), so a single big file (a book, enwik8) still has a train and a validation part.
  Empty files and binary files (a NUL byte in the first 8 KiB) are skipped; invalid
  UTF-8 bytes become U+FFFD. Its config name is a fingerprint of the file list (paths,
  sizes, mtimes), so edited files give a fresh build.

Split rule (both): a document is in "validation" when sha256(key) % 100 < 5, with key
the path (python_source) or "path#chunk" (text_files), so it is stable across machines.
If no text_files document lands in validation the one with the smallest hash does.

`open_split(source, data_dir, split)` opens any `DataConfig.source`, building first
when needed (under a file lock, so processes sharing a cache build once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob as globlib
import hashlib
import importlib
import io
import logging
import os
import platform
import sys
import sysconfig
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from transformer_jax.config import ConfigError
from transformer_jax.data import _files
from transformer_jax.data.config import parse_source

VALIDATION_PERCENT = 5
MAX_DOC_BYTES = 1 << 16
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
PYTHON_CONFIG = f"{platform.python_implementation().lower()}-{platform.python_version()}"



def _not_tfds_noise(record: logging.LogRecord) -> bool:
    """TFDS warns that a dataset it is about to build has no dataset_info.json yet: not news."""
    return "has no dataset_info.json" not in record.getMessage()


_absl_log = logging.getLogger("absl")
if not _absl_log.level or _absl_log.level < logging.WARNING:  # absl INFO chatter off; a stricter level stays
    _absl_log.setLevel(logging.WARNING)
_absl_log.addFilter(_not_tfds_noise)


def hash_percent(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


def split_of(key: str) -> str:
    return "validation" if hash_percent(key) < VALIDATION_PERCENT else "train"


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """Sorted (relative posix path, absolute path) of the stdlib's .py files."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    return sorted(out)


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


_TEXT_FEATURES = dict(path=tfds.features.Text(), text=tfds.features.Text())


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of this library's builders: tells TFDS where the code is, so it needs neither
    metadata files nor `importlib_resources` to find out."""
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
    code_path = tfds.core.utils.classproperty(classmethod(
        lambda cls: epath.Path(os.path.abspath(sys.modules[cls.__module__].__file__))))


class PythonSource(LocalBuilder):
    """The running Python's standard-library source, one example per file, without the
    functions `python_functions` holds out for validation (so pretraining never sees them)."""
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "without python_functions' validation functions"}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name=PYTHON_CONFIG, description=f"stdlib of {platform.python_implementation()} {platform.python_version()}")]

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_TEXT_FEATURES),
                                              description=self.builder_config.description)

    def _split_generators(self, dl_manager):
        from transformer_jax.data.functions import held_out_lines
        files, held_out = stdlib_files(), held_out_lines()
        return {s: self._generate_examples([f for f in files if split_of(f[0]) == s], held_out)
                for s in ("train", "validation")}

    def _generate_examples(self, files, held_out):
        from transformer_jax.data.functions import without_lines
        for rel, full in files:
            yield rel, {"path": rel, "text": without_lines(read_text(full), held_out.get(rel, []))}


# -- text_files ---------------------------------------------------------------------------

def _list_files(pattern: str) -> tuple[str, list[str]]:
    """(root, sorted files) for a directory (recursive, non-hidden) or a glob."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    if os.path.isdir(pattern):
        root, files = pattern, []
        for dirpath, dirnames, filenames in os.walk(pattern):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [os.path.join(dirpath, n) for n in filenames if not n.startswith(".")]
    else:
        files = [f for f in globlib.glob(pattern, recursive=True) if os.path.isfile(f)]
        root = os.path.commonpath(files) if files else ""
        root = os.path.dirname(root) if os.path.isfile(root) else root
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise ConfigError(f"DataConfig.source='text_files:{pattern}': no such directory and no files match; "
                          "point it at a directory or a glob of text files")
    return root, files


def _chunks(data: bytes) -> list[tuple[int, int]]:
    """[start, end) byte ranges of <= MAX_DOC_BYTES, cut after a newline or at a char boundary."""
    out, start = [], 0
    while start < len(data):
        end = min(start + MAX_DOC_BYTES, len(data))
        if end < len(data):
            cut = data.rfind(b"\n", start + MAX_DOC_BYTES // 2, end)
            if cut != -1:
                end = cut + 1
            else:
                while end > start + 1 and data[end] & 0xC0 == 0x80:  # inside a UTF-8 character
                    end -= 1
        out.append((start, end))
        start = end
    return out


def scan_text_files(pattern: str) -> dict[str, list[tuple[str, str, int, int]]]:
    """Split name -> documents (relative path, absolute path, start byte, end byte)."""
    root, files = _list_files(pattern)
    docs, empty, binary = [], 0, 0
    for full in files:
        with open(full, "rb") as f:
            data = f.read()
        if not data:
            empty += 1
        elif b"\0" in data[:8192]:
            binary += 1
        else:
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            docs += [(rel, full, a, b) for a, b in _chunks(data)]
    if len(docs) < 2:
        what = "no text files" if not docs else "one document (under 64 KiB)"
        raise ConfigError(f"DataConfig.source='text_files:{pattern}': {what} among {len(files)} files "
                          f"({empty} empty, {binary} binary); a train/validation split needs more text")
    keys = [f"{d[0]}#{i}" for i, d in enumerate(docs)]
    pct = [hash_percent(k) for k in keys]
    val = {i for i, p in enumerate(pct) if p < VALIDATION_PERCENT} or {int(np.argmin(pct))}
    return {"train": [d for i, d in enumerate(docs) if i not in val],
            "validation": [d for i, d in enumerate(docs) if i in val]}


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    pattern: str = ""


def text_files_config(pattern: str) -> TextFilesConfig:
    """A config named by a fingerprint of the files' paths, sizes and mtimes."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    root, files = _list_files(pattern)
    stats = [(os.path.relpath(f, root), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    name = "files-" + _files.digest(pattern, stats, MAX_DOC_BYTES)
    return TextFilesConfig(name=name, pattern=pattern, description=f"text files {pattern}")


class TextFiles(LocalBuilder):
    """A user's text files; pass `config=text_files_config(pattern)`."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_TEXT_FEATURES),
                                              description=self.builder_config.description)

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(d) for s, d in scan_text_files(self.builder_config.pattern).items()}

    def _generate_examples(self, docs):
        for i, (rel, full, start, end) in enumerate(docs):
            with open(full, "rb") as f:
                f.seek(start)
                text = f.read(end - start).decode("utf-8", errors="replace")
            yield f"{rel}#{start}", {"path": rel, "text": text}


# -- opening any source -----------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    """One split of a source: `records[i]` is a dict (Text as bytes, ClassLabel as int)."""
    full_name: str        # "python_source/cpython-3.11.7/1.1.0"
    split: str
    records: Sequence[dict[str, Any]]
    features: Any         # tfds FeaturesDict

    def __len__(self) -> int:
        return len(self.records)

    def texts(self, field: str, start: int = 0, stop: int | None = None) -> list[str]:
        """Decoded text of `field` for records [start, stop)."""
        self.check_field(field)
        stop = len(self) if stop is None else stop
        return [_as_text(r[field]) for r in self.read(range(start, stop))]

    def labels(self, field: str) -> np.ndarray:
        self.check_field(field)
        out = np.empty(len(self), np.int32)
        for start in range(0, len(self), 4096):
            rows = self.read(range(start, min(start + 4096, len(self))))
            out[start:start + len(rows)] = [int(r[field]) for r in rows]
        return out

    def read(self, indices) -> list[dict[str, Any]]:
        """Records at `indices`, read in one batch where the source allows it."""
        indices = [int(i) for i in indices]
        try:
            return self.records.__getitems__(indices)
        except TypeError:  # tfds.testing.mock_data's __getitems__ is broken; read one by one
            return [self.records[i] for i in indices]

    def num_classes(self, field: str) -> int:
        self.check_field(field)
        feature = self.features[field]
        if not isinstance(feature, tfds.features.ClassLabel):
            raise ConfigError(f"DataConfig.label_field={field!r} of {self.full_name} is not a ClassLabel")
        return feature.num_classes

    def check_field(self, field: str) -> None:
        if field not in self.features:
            raise ConfigError(f"field {field!r} is not in {self.full_name} (it has {', '.join(self.features)}); "
                              "set DataConfig.text_field/input_field/target_field/label_field")


def _as_text(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v if isinstance(v, str) else str(v)


def builder_for(source: str, data_dir: str):
    """The TFDS builder behind `source`, prepared (built or downloaded) if it is not yet."""
    kind, arg = parse_source(source)
    if kind == "tfds":
        def make():
            return _catalog_builder(arg, data_dir)
    else:
        if kind == "python_functions":
            from transformer_jax.data.functions import PythonFunctions as cls  # registers the builder
            config = None
        else:
            cls, config = (PythonSource, None) if kind == "python_source" else (TextFiles, text_files_config(arg))
        kwargs = dict(data_dir=data_dir, file_format="array_record")

        def make():
            return cls(config=config, **kwargs) if config is not None else cls(**kwargs)
    builder = make()
    if not builder.is_prepared():
        with _files.locked(os.path.join(data_dir, builder.info.full_name)):
            builder = make()  # another process may have built it while we waited: re-read its info
            _prepare(builder, source)
    return builder


def _prepare(builder, source: str) -> None:
    if builder.is_prepared():
        return
    dl = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP,
                                      try_download_gcs=source.startswith("tfds:"))
    local = not source.startswith("tfds:")
    if local:  # TFDS would print "Downloading and preparing dataset Unknown size ..." for files on this disk
        print(f"preparing dataset {builder.info.full_name} in {builder.data_dir} (once; later runs reuse it)",
              file=sys.stderr, flush=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if local else contextlib.nullcontext():
            builder.download_and_prepare(download_config=dl, file_format="array_record")
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:  # network, missing manual download, TFRecord-only cache...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"DataConfig.source={source!r}: could not prepare {builder.info.full_name} "
                          f"({type(e).__name__}: {first}); check the name, the network or data_dir") from e


def _catalog_builder(arg: str, data_dir: str):
    try:
        return tfds.builder(arg, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        pass
    for module in ("text", "translate", "summarization", "question_answering"):
        try:  # legacy builders (glue, wmt, ...) register only once their module is imported
            importlib.import_module(f"tensorflow_datasets.{module}")
        except Exception:  # noqa: BLE001
            pass
    try:
        return tfds.builder(arg, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f"DataConfig.source='tfds:{arg}': no such dataset in the TFDS catalog; "
                          "check the name (tfds.list_builders()) and the config after '/'") from None


def open_split(source: str, data_dir: str, split: str) -> Split:
    """Opens `split` of `source`, building or downloading the dataset first if needed."""
    builder = builder_for(source, data_dir)
    available = list(builder.info.splits.keys())
    base = split.split("[")[0]
    if available and base not in available:
        raise ConfigError(f"split {split!r} is not in {builder.info.full_name} (it has {', '.join(available)}); "
                          "set DataConfig.train_split / eval_split")
    records = builder.as_data_source(split=split)
    return Split(builder.info.full_name, split, records, builder.info.features)
