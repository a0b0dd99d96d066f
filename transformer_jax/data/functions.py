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

Split: by function, stratified by package. From every package, the validation split takes
`VALIDATION_PER_PACKAGE` (24) top-level functions (not nested in another function), those
with the smallest sha256 of their text among the ones whose text (indentation aside) occurs
nowhere else in the stdlib; functions nested in them belong to neither split, so no training example contains
a validation function's text. The validation split is balanced (24 x 16 = 384 functions from
~200 files), so a constant answer scores exactly chance (1/16). `python_source` leaves the
validation functions' lines out of its files, so pretraining on it never sees them.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import re
import textwrap
import warnings

import tensorflow_datasets as tfds

from transformer_jax.data.corpus import PYTHON_CONFIG, LocalBuilder, read_text, stdlib_files

PACKAGES = ("asyncio", "collections", "concurrent", "ctypes", "email", "http", "idlelib", "importlib",
            "logging", "multiprocessing", "tkinter", "unittest", "urllib", "wsgiref", "xml", "xmlrpc")
MASK = "___"
VALIDATION_PER_PACKAGE = 24


def extract_functions(source: str) -> list[tuple[str, str, str]]:
    """(name, dedented source, masked source) of every non-dunder function in `source`."""
    return [(f["name"], f["function"], f["masked"]) for f in function_records(source)]


def function_records(source: str) -> list[dict]:
    """Every non-dunder function of `source`: name, function, masked, its lines [first, last]
    (1-based) and `top`, the index in this list of the top-level function it is nested in
    (itself when it is not nested; None when that one is a dunder method)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # old escape sequences in a few files
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return []
    lines = source.splitlines(keepends=True)
    out = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            is_def = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not is_def:
                visit(child, top)
                continue
            dunder = child.name.startswith("__") and child.name.endswith("__")
            here = top
            if not dunder:
                text = textwrap.dedent("".join(lines[child.lineno - 1:child.end_lineno]))
                if top == "none":  # a top-level function: the top of itself and what it holds
                    here = len(out)
                out.append(dict(name=child.name, function=text, first=child.lineno, last=child.end_lineno,
                                masked=re.sub(rf"\b{re.escape(child.name)}\b", MASK, text), top=here))
            elif top == "none":
                here = None
            visit(child, here)
    visit(tree, "none")
    return out


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def flat_lines(text: str) -> str:
    """`text`'s non-blank lines without indentation: a function's text as it reads anywhere."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


@functools.lru_cache(maxsize=None)
def function_split(root: str | None = None) -> dict[str, list[dict]]:
    """{"train": [...], "validation": [...]}: records (path, package, name, function, masked,
    first, last) of the packages' functions, split as the module docstring says."""
    files = stdlib_files(root)
    texts = {rel: read_text(full) for rel, full in files}
    per_file = [(rel, rel.split("/")[0], function_records(texts[rel])) for rel, _ in files
                if rel.split("/")[0] in PACKAGES]
    records = {rel: recs for rel, _, recs in per_file}
    everything = "\n".join(flat_lines(t) for t in texts.values())  # the whole stdlib, as flat lines
    chosen = set()  # (path, index) of validation functions
    for package in PACKAGES:
        candidates = sorted((_text_key(r["function"]), rel, i) for rel, pkg, recs in per_file if pkg == package
                            for i, r in enumerate(recs) if r["top"] == i)
        picked = ((rel, i) for _, rel, i in candidates  # lazily: its text nowhere else in the stdlib
                  if everything.count(flat_lines(records[rel][i]["function"])) == 1)
        chosen |= set(itertools.islice(picked, VALIDATION_PER_PACKAGE))
    out = {"train": [], "validation": []}
    for rel, pkg, recs in per_file:
        for i, r in enumerate(recs):
            record = dict(r, path=rel, package=pkg)
            del record["top"]
            if (rel, i) in chosen:
                out["validation"].append(record)
            elif (rel, r["top"]) not in chosen:  # nested in a validation function: neither split
                out["train"].append(record)
    return out


def held_out_lines(root: str | None = None) -> dict[str, list[tuple[int, int]]]:
    """path -> [first, last] line ranges (1-based) of the validation functions in that file."""
    out: dict[str, list[tuple[int, int]]] = {}
    for r in function_split(root)["validation"]:
        out.setdefault(r["path"], []).append((r["first"], r["last"]))
    return out


def without_lines(text: str, ranges: list[tuple[int, int]]) -> str:
    """`text` without the lines in `ranges` (1-based, inclusive)."""
    drop = {n for a, b in ranges for n in range(a, b + 1)}
    return "".join(line for n, line in enumerate(text.splitlines(keepends=True), 1) if n not in drop)


class PythonFunctions(LocalBuilder):
    """Functions of the running Python's stdlib packages, for classification and naming."""
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "split by function, balanced by package"}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=PYTHON_CONFIG, description=f"functions of {PYTHON_CONFIG}")]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(dict(
                path=tfds.features.Text(), package=tfds.features.ClassLabel(names=PACKAGES),
                name=tfds.features.Text(), function=tfds.features.Text(), masked=tfds.features.Text())),
            description=self.builder_config.description)

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(records) for s, records in function_split().items()}

    def _generate_examples(self, records):
        for r in records:
            yield f"{r['path']}:{r['first']}:{r['name']}", {k: r[k] for k in ("path", "package", "name", "function",
                                                                              "masked")}
