"""Transparent huge pages for the host memory XLA:CPU computes in.

XLA:CPU takes each step's buffers from glibc's malloc; the large ones are fresh `mmap`s, so
every step faults its working set in again, 4 KiB at a time, and the kernel zeroes each
page. On the default experiment (2-core Xeon, kernel THP mode `madvise`) that was 232,000
page faults per 2.4 s step. glibc >= 2.35 can ask for 2 MiB pages on its own mappings
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): 900 faults per step. Measured alone with
`transformer-jax train` (2026-12-03): 82.0M page faults in the run before, 0.85M with it; 350
steps in the 840 s budget instead of 337 (+3.9%), step 180 reached at 6:51 instead of 7:10.

It does not help everywhere. On a 2-core Xeon VM (2026-12-03) the default run gained again
(1,787-1,870 tokens/s against 1,638-1,740 without, 40 steps each), but the bf16 step of the
bench model lost ~20% (11.1-14.9 s against 9.3-11.3 s per step; the kernel's system time 30-35
s against 7.5-7.8 s per run, `clear_page_erms` 27% of all CPU), while both faulted in about
the same bytes (`/proc/vmstat`): on that host, zeroing 2 MiB pages cost ~4x as much per byte.
If your steps get slower, `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns it off.

Tunables are read when a program starts, so the command line starts itself once more with
the tunable set (`os.execve`: same process id, nothing run twice). It does so only where it
can help: Linux, GNU libc >= 2.35, THP mode `madvise` (with `always` the pages are huge
already; with `never` they cannot be), and no `glibc.malloc.hugetlb` chosen by the user
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` keeps 4 KiB pages). Your own scripts get the same by
starting Python with that variable set.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def would_help() -> bool:
    """Whether starting again with `TUNABLE` would give malloc's mappings huge pages here."""
    if sys.platform != "linux" or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"; absent on musl
        with open(THP_MODE) as f:
            mode = f.read()
    except (OSError, ValueError):
        return False
    name, _, version = libc.partition(" ")
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and (major, minor) >= (2, 35) and "[madvise]" in mode


def relaunch(args: list[str]) -> None:
    """Replaces this process by `python ARGS` with `TUNABLE` set, if that would help; else returns."""
    if not would_help():
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], dict(os.environ, GLIBC_TUNABLES=tunables))
