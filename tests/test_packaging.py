"""A wheel built from the repository installs (not editable) into a fresh virtual environment
and trains the shipped `tiny` experiment, by name, from an empty directory.

No network: pip resolves the wheel's dependencies with `--no-index` against a wheelhouse of
the very distributions installed in this environment, each packed back into a wheel from its
RECORD (name, version, tags and metadata unchanged). So pip checks what it checks on a user's
machine (Requires-Python, every Requires-Dist and its markers), and the new environment holds
no path back to the source tree or to this environment.
"""
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SKIP_IN_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requires: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions that `requires` needs, transitively, extras included."""
    out, extras, todo = {}, {}, [(Requirement(r), "") for r in requires]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        key = _canon(req.name)
        new = set(req.extras) - extras.setdefault(key, set())
        if key in out and not new:
            continue
        extras[key] |= new
        dist = out[key] = md.distribution(req.name)
        todo += [(Requirement(r), e) for r in dist.requires or [] for e in ("", *new)]
    return out


def _repack(dist: md.Distribution, dest: Path) -> Path:
    """The installed `dist` as a wheel: its site-packages files per RECORD and its dist-info
    (METADATA, WHEEL, entry points), with a fresh RECORD. Stored, not compressed: speed."""
    info = Path(dist._path)  # the .dist-info directory
    wheel_meta = (info / "WHEEL").read_text()
    tags = [t.split("-") for t in re.findall(r"^Tag: (\S+)", wheel_meta, flags=re.M)]
    tag = "-".join(".".join(dict.fromkeys(part)) for part in zip(*tags))  # py2-none-any, py3-none-any: py2.py3-none-any
    name = f"{_canon(dist.metadata['Name']).replace('-', '_')}-{dist.version}-{tag}.whl"
    site = info.parent
    files = [f for f in dist.files if not str(f).startswith("..") and "__pycache__" not in f.parts
             and not (f.parts[0] == info.name and f.name in SKIP_IN_DIST_INFO)]
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(dest / name, "w", zipfile.ZIP_STORED) as zf:
        for f in files:
            data = (site / f).read_bytes()
            zf.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([str(f), f"sha256={digest}", len(data)])
        writer.writerow([f"{info.name}/RECORD", "", ""])
        zf.writestr(f"{info.name}/RECORD", record.getvalue())
    return dest / name


@pytest.mark.slow
def test_wheel_installs_non_editable_and_trains_from_an_empty_directory(tmp_path):
    # 1. The wheel, built from a copy of the sources (the checkout stays untouched).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".hypothesis", ".pytest_cache"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("transformer_jax-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"transformer_jax/experiments/tiny.py", "transformer_jax/experiments/default.py"} <= names
    assert "Requires-Python: >=3.11" in meta  # jax 0.10.2's own floor

    # 2. Its dependencies, as installed here, in a wheelhouse; a fresh venv; pip install, offline.
    house = tmp_path / "wheelhouse"
    house.mkdir()
    requires = [r for r in re.findall(r"^Requires-Dist: (.+)$", meta, flags=re.M) if "extra ==" not in r]
    for d in _closure(requires).values():
        _repack(d, house)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    pip = subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-compile", "--no-index", "--find-links", house,
                          wheel], env=env, capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]

    # 3. From an empty directory, no PYTHONPATH: the installed package, its shipped experiment.
    empty = tmp_path / "empty"
    empty.mkdir()
    env.update(JAX_PLATFORMS="cpu", TRANSFORMER_JAX_DATA_DIR=str(tmp_path / "data"))
    where = subprocess.run([venv / "bin" / "python", "-c", "import transformer_jax; print(transformer_jax.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv / "lib")), where
    run = subprocess.run([venv / "bin" / "transformer-jax", "train", "--config", "tiny", "--set", "train.steps=2",
                          "--set", "train.sample_tokens=0"], cwd=empty, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (empty / "runs" / "tiny" / "checkpoints" / "2").is_dir(), sorted(p.name for p in (empty / "runs").rglob("*"))
