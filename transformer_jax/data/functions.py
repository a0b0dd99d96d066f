"""Downstream tasks from the embedded corpus: every function of 16 stdlib packages.

The TFDS builder `PythonFunctions` ("python_functions") parses the same stdlib files as
`python_source` with `ast` and yields one example per function or method (nested ones
too; dunder methods such as `__init__` are skipped):

  path      the file, relative to the stdlib
  package   ClassLabel over `PACKAGES` (the top-level package the file is in)
  name      the function's name
  function  its source, from the `def` line to its end, dedented
  masked    the same source with every whole-word occurrence of the name replaced by
            `MASK` ("___"), so `def ___(self):` is left for the model to name

Tasks (select with `DataConfig(source="python_functions", task=...)`):
  task="classify"  text_field "function" -> label_field "package"   (16 classes)
  task="seq2seq"   input_field "masked"  -> target_field "name"

Splits follow the file's split in `python_source` (same path hash), so no function used
for validation here was in the language model's training text.
"""
from __future__ import annotations

import ast
import re
import textwrap
import warnings

import tensorflow_datasets as tfds

from transformer_jax.data.corpus import PYTHON_CONFIG, LocalBuilder, read_text, split_of, stdlib_files

PACKAGES = ("asyncio", "collections", "concurrent", "ctypes", "email", "http", "idlelib", "importlib",
            "logging", "multiprocessing", "tkinter", "unittest", "urllib", "wsgiref", "xml", "xmlrpc")
MASK = "___"


def extract_functions(source: str) -> list[tuple[str, str, str]]:
    """(name, dedented source, masked source) of every non-dunder function in `source`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # old escape sequences in a few files
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = node.name
        if name.startswith("__") and name.endswith("__"):
            continue
        text = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
        out.append((name, text, re.sub(rf"\b{re.escape(name)}\b", MASK, text)))
    return out


class PythonFunctions(LocalBuilder):
    """Functions of the running Python's stdlib packages, for classification and naming."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=PYTHON_CONFIG, description=f"functions of {PYTHON_CONFIG}")]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(dict(
                path=tfds.features.Text(), package=tfds.features.ClassLabel(names=PACKAGES),
                name=tfds.features.Text(), function=tfds.features.Text(), masked=tfds.features.Text())),
            description=self.builder_config.description)

    def _split_generators(self, dl_manager):
        files = [(rel, full) for rel, full in stdlib_files() if rel.split("/")[0] in PACKAGES]
        return {s: self._generate_examples([f for f in files if split_of(f[0]) == s])
                for s in ("train", "validation")}

    def _generate_examples(self, files):
        for rel, full in files:
            for i, (name, text, masked) in enumerate(extract_functions(read_text(full))):
                yield f"{rel}:{i}", dict(path=rel, package=rel.split("/")[0], name=name,
                                         function=text, masked=masked)
