"""Cache-directory helpers: an inter-process lock and write-to-temp-then-rename."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def locked(path: str):
    """Holds an exclusive fcntl lock on `path + '.lock'` (processes sharing a cache build once)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yields a temporary directory that becomes `final` only if the block succeeds."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def digest(*parts) -> str:
    """A short stable hex fingerprint of `parts`."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() + b"\0")
    return h.hexdigest()[:16]
