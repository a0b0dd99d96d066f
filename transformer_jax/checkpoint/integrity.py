"""Checksum manifests for checkpoint step directories.

Orbax has no checksums: overwritten bytes restore silently wrong and a truncated file
gives a long, confusing error. Every step directory therefore carries
`MANIFEST.sha256.json`: the size and sha256 of every file in it, plus a sha256 of the
manifest's own body, written atomically (temp file, fsync, rename). `verify_step_dir`
re-hashes the files and names the first bad one.

Orbax rewrites two top-level files after the manifest, when it commits: `_CHECKPOINT_METADATA`
(it adds the commit timestamp) and `commit_success.txt` (a message). They are not hashed;
instead the manifest records `_CHECKPOINT_METADATA`'s `item_handlers` (what restore reads
from it) and verification checks the file still parses and names the same handlers. Other
files that appear after the manifest are not listed and not checked.
sha256 runs at ~1.5 GB/s per core here (SHA-NI); `hashlib` releases the GIL, so hashing
in orbax's background commit thread costs the training loop little.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "MANIFEST.sha256.json"
STEP_METADATA = "_CHECKPOINT_METADATA"
REWRITTEN_AT_COMMIT = (STEP_METADATA, "commit_success.txt")
FORMAT_VERSION = 1


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _body_digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def _listed_files(step_dir: Path) -> list[str]:
    """Every regular file under `step_dir` (relative, '/'-separated), manifest excluded."""
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            rel = Path(root, name).relative_to(step_dir).as_posix()
            if rel in REWRITTEN_AT_COMMIT or rel == MANIFEST_NAME or rel.startswith(MANIFEST_NAME + "."):
                continue
            out.append(rel)
    return out


def write_manifest(step_dir: str | os.PathLike) -> Path:
    """Hashes every file in `step_dir` and writes the manifest atomically. Returns its path."""
    step_dir = Path(step_dir)
    files = {}
    for rel in _listed_files(step_dir):
        p = step_dir / rel
        files[rel] = {"size": p.stat().st_size, "sha256": _sha256_file(p)}
    body = {"format": FORMAT_VERSION, "algorithm": "sha256", "files": files,
            "item_handlers": _item_handlers(step_dir)}
    doc = {"body": body, "body_sha256": _body_digest(body)}
    final = step_dir / MANIFEST_NAME
    tmp = step_dir / f"{MANIFEST_NAME}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(step_dir)
    return final


def _item_handlers(step_dir: Path) -> dict | None:
    """The `item_handlers` of orbax's step metadata; None if the file is absent."""
    path = step_dir / STEP_METADATA
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("item_handlers")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(step_dir: str | os.PathLike) -> dict:
    """The manifest body ({"files": {path: {"size", "sha256"}}, "item_handlers": ...});
    raises ValueError if unreadable or tampered."""
    path = Path(step_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
        body, digest = doc["body"], doc["body_sha256"]
        body["files"].items()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{MANIFEST_NAME} unreadable ({type(e).__name__})") from None
    if _body_digest(body) != digest:
        raise ValueError(f"{MANIFEST_NAME} self-checksum mismatch")
    if body.get("format") != FORMAT_VERSION or body.get("algorithm") != "sha256":
        raise ValueError(f"{MANIFEST_NAME} has unknown format {body.get('format')!r}")
    return body


def verify_step_dir(step_dir: str | os.PathLike) -> str | None:
    """None if every file in the manifest is present with its size and sha256; else a short
    reason naming the file, starting with "corrupt:" or "incomplete:". Sizes are checked for
    all files before any hashing, so truncation is reported without reading the data."""
    step_dir = Path(step_dir)
    if not (step_dir / MANIFEST_NAME).exists():
        return f"incomplete: no {MANIFEST_NAME} (the save did not finish)"
    try:
        body = read_manifest(step_dir)
    except ValueError as e:
        return f"corrupt: {e}"
    files = body["files"]
    if body.get("item_handlers") is not None:
        try:
            handlers = _item_handlers(step_dir)
        except (OSError, ValueError, AttributeError):
            return f"corrupt: {STEP_METADATA} unreadable"
        if handlers != body["item_handlers"]:
            return f"corrupt: {STEP_METADATA} item_handlers differ from the manifest"
    for rel, entry in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"corrupt: {rel} missing"
        size = p.stat().st_size
        if size < entry["size"]:
            return f"corrupt: {rel} truncated ({size} of {entry['size']} bytes)"
        if size != entry["size"]:
            return f"corrupt: {rel} has {size} bytes, manifest says {entry['size']}"
    for rel, entry in files.items():
        if _sha256_file(step_dir / rel) != entry["sha256"]:
            return f"corrupt: {rel} sha256 mismatch"
    return None
