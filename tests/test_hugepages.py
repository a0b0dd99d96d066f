"""The command line restarts itself with glibc's huge-page tunable where that helps, and it does help."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from transformer_jax import hugepages

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

# Page faults in a 256 MiB buffer from glibc's malloc (as XLA:CPU's buffers are: numpy asks for
# huge pages itself), written twice: each malloc maps it afresh.
FAULTS = textwrap.dedent("""
    import ctypes, os, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def faults():
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(256 << 20)
        ctypes.memset(p, 1, 256 << 20)
        libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    print(os.environ.get("GLIBC_TUNABLES"), min(faults(), faults()))
""")


def _run(code: str, env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    tunables, faults = out.stdout.split()
    return tunables, int(faults)


def test_relaunch_sets_the_tunable_exactly_where_it_helps_and_it_cuts_page_faults():
    relaunched = "from transformer_jax import hugepages; hugepages.relaunch(['-c', CODE])\nexec(CODE)"
    code = f"CODE = {FAULTS!r}\n{relaunched}"
    tunables, faults = _run(code, dict(ENV, PYTHONPATH=str(REPO)))
    plain_tunables, plain_faults = _run(FAULTS, ENV)
    assert plain_tunables == "None" and plain_faults > 60_000  # 4 KiB pages: one fault per page
    if hugepages.would_help():  # Linux, glibc >= 2.35, THP mode madvise (this project's CI machines)
        assert tunables == hugepages.TUNABLE
        assert faults < plain_faults / 20, (faults, plain_faults)
    else:
        assert tunables == "None"


def test_a_users_own_choice_is_kept():
    env = dict(ENV, PYTHONPATH=str(REPO), GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert not subprocess.run([sys.executable, "-c", "from transformer_jax import hugepages; "
                               "assert not hugepages.would_help()"], env=env, cwd=REPO).returncode
    code = f"CODE = {FAULTS!r}\nfrom transformer_jax import hugepages; hugepages.relaunch(['-c', 'raise SystemExit(3)'])\nexec(CODE)"
    tunables, faults = _run(code, env)
    assert tunables == "glibc.malloc.hugetlb=0" and faults > 60_000

