"""Checksum manifests for checkpoint step directories.

Orbax has no checksums: overwritten bytes restore silently wrong and a truncated file
gives a long, confusing error. Every step directory therefore carries manifests: the size
and sha256 of every file in it, plus a sha256 of each manifest's own body, written
atomically (temp file, fsync, rename).

At scale no single host hashes everything. Each process hashes the array files it wrote
itself (`state/ocdbt.process_<i>/...`, `state/array_metadatas/process_<i>`), in parallel
threads, in orbax's background commit as soon as its own writes are done, into
`MANIFEST.process_<i>.sha256.json`. After every process has finished, process 0 writes
`MANIFEST.sha256.json`, which lists the remaining files (the merged OCDBT root, metadata,
the small items) and the per-process manifests themselves, so one self-checked file vouches
for all of them. `verify_step_dir` checks sizes first, then hashes; it can verify only some
items (what a restore reads) and only a share of the files (`share=(i, n)`: each process of
a restore hashes its part).

Orbax rewrites two top-level files after the manifest, when it commits: `_CHECKPOINT_METADATA`
(it adds the commit timestamp) and `commit_success.txt` (a message). They are not hashed;
instead the manifest records `_CHECKPOINT_METADATA`'s `item_handlers` (what restore reads
from it) and verification checks the file still parses and names the same handlers. Other
files that appear after the manifest are not listed and not checked.
sha256 runs at ~1.5 GB/s per core here (SHA-NI) and `hashlib` releases the GIL, so the
hashing threads cost the training loop little.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST_NAME = "MANIFEST.sha256.json"
STEP_METADATA = "_CHECKPOINT_METADATA"
REWRITTEN_AT_COMMIT = (STEP_METADATA, "commit_success.txt")
FORMAT_VERSION = 2  # 1: one manifest, no per-process parts (still read)
PART_RE = re.compile(r"MANIFEST\.process_(\d+)\.sha256\.json")
HASH_THREADS = min(8, os.cpu_count() or 1)


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
            if rel in REWRITTEN_AT_COMMIT or rel == MANIFEST_NAME or ".sha256.json.tmp" in rel:
                continue
            out.append(rel)
    return out


def _hash_all(root: Path, rels: list[str]) -> dict[str, dict]:
    """{rel: {"size", "sha256"}}, hashed by a few threads (hashlib releases the GIL)."""
    def one(rel):
        p = root / rel
        return rel, {"size": p.stat().st_size, "sha256": _sha256_file(p)}
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        return dict(pool.map(one, rels))


def part_name(process_index: int) -> str:
    return f"MANIFEST.process_{process_index}.sha256.json"


def written_by(rel: str, process_index: int) -> bool:
    """Whether orbax's OCDBT save of an item has process `process_index` write `rel` itself."""
    parts = rel.split("/")
    return f"ocdbt.process_{process_index}" in parts or (len(parts) >= 2 and parts[-2:] == ["array_metadatas",
                                                                                          f"process_{process_index}"])


def write_process_manifest(item_dir: str | os.PathLike, process_index: int, item: str) -> Path:
    """Hashes the files process `process_index` wrote in `item_dir` (see `written_by`; orbax
    may still call it `<item>.orbax-checkpoint-tmp`) into its part manifest next to it, with
    paths under the item's final name `item`. Call it on that process once its writes are done."""
    item_dir = Path(item_dir)
    mine = [rel for rel in _listed_files(item_dir) if written_by(rel, process_index)]
    files = {f"{item}/{rel}": entry for rel, entry in _hash_all(item_dir, mine).items()}
    return _write_doc(item_dir.parent, part_name(process_index), {"format": FORMAT_VERSION, "algorithm": "sha256",
                                                                 "files": files})


def write_manifest(step_dir: str | os.PathLike) -> Path:
    """Writes the step's manifest atomically: every file not in a per-process manifest (those
    are listed as files themselves), hashed here. Returns its path."""
    step_dir = Path(step_dir)
    rels = _listed_files(step_dir)
    covered = set()
    for rel in rels:
        if PART_RE.fullmatch(rel):
            covered |= set(read_manifest(step_dir, rel)["files"])
    files = _hash_all(step_dir, [rel for rel in rels if rel not in covered])
    body = {"format": FORMAT_VERSION, "algorithm": "sha256", "files": files,
            "parts": sorted(rel for rel in files if PART_RE.fullmatch(rel)), "item_handlers": _item_handlers(step_dir)}
    return _write_doc(step_dir, MANIFEST_NAME, body)


def _write_doc(step_dir: Path, name: str, body: dict) -> Path:
    doc = {"body": body, "body_sha256": _body_digest(body)}
    final = step_dir / name
    tmp = step_dir / f"{name}.tmp{os.getpid()}"
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


def read_manifest(step_dir: str | os.PathLike, name: str = MANIFEST_NAME) -> dict:
    """A manifest's body ({"files": {path: {"size", "sha256"}}, "parts", "item_handlers"});
    raises ValueError if unreadable or tampered."""
    path = Path(step_dir) / name
    try:
        doc = json.loads(path.read_text())
        body, digest = doc["body"], doc["body_sha256"]
        body["files"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{name} unreadable ({type(e).__name__})") from None
    if _body_digest(body) != digest:
        raise ValueError(f"{name} self-checksum mismatch")
    if body.get("format") not in (1, FORMAT_VERSION) or body.get("algorithm") != "sha256":
        raise ValueError(f"{name} has unknown format {body.get('format')!r}")
    return body


def verify_step_dir(step_dir: str | os.PathLike, items: set[str] | None = None,
                    share: tuple[int, int] = (0, 1)) -> str | None:
    """None if the files are present with their manifest's size and sha256; else a short reason
    naming the file, starting with "corrupt:" or "incomplete:". `items`: only files under
    these top-level directories (plus the top-level files); None: all. `share=(i, n)`: sizes
    of all those files are checked, but only every n-th file (by size, from the i-th) is
    hashed: n processes with shares (0, n) ... (n-1, n) together hash each file once.
    Sizes are checked before any hashing, so truncation is reported without reading data."""
    step_dir = Path(step_dir)
    if not (step_dir / MANIFEST_NAME).exists():
        return f"incomplete: no {MANIFEST_NAME} (the save did not finish)"
    try:
        body = read_manifest(step_dir)
    except ValueError as e:
        return f"corrupt: {e}"
    files = dict(body["files"])
    if body.get("item_handlers") is not None:
        try:
            handlers = _item_handlers(step_dir)
        except (OSError, ValueError, AttributeError):
            return f"corrupt: {STEP_METADATA} unreadable"
        if handlers != body["item_handlers"]:
            return f"corrupt: {STEP_METADATA} item_handlers differ from the manifest"
    for part in body.get("parts", []):  # small: every process checks them all
        reason = _check(step_dir, part, files[part], hash_it=True)
        if reason:
            return reason
        try:
            files.update(read_manifest(step_dir, part)["files"])
        except ValueError as e:
            return f"corrupt: {e}"
    wanted = sorted((rel for rel in files if items is None or "/" not in rel or rel.split("/")[0] in items),
                    key=lambda rel: (-files[rel]["size"], rel))
    for rel in wanted:
        reason = _check(step_dir, rel, files[rel], hash_it=False)
        if reason:
            return reason
    mine = wanted[share[0]::share[1]]
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        for rel, digest in zip(mine, pool.map(lambda r: _sha256_file(step_dir / r), mine)):
            if digest != files[rel]["sha256"]:
                return f"corrupt: {rel} sha256 mismatch"
    return None


def _check(step_dir: Path, rel: str, entry: dict, hash_it: bool) -> str | None:
    p = step_dir / rel
    if not p.is_file():
        return f"corrupt: {rel} missing"
    size = p.stat().st_size
    if size < entry["size"]:
        return f"corrupt: {rel} truncated ({size} of {entry['size']} bytes)"
    if size != entry["size"]:
        return f"corrupt: {rel} has {size} bytes, manifest says {entry['size']}"
    if hash_it and _sha256_file(p) != entry["sha256"]:
        return f"corrupt: {rel} sha256 mismatch"
    return None
