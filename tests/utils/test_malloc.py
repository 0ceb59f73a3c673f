"""utils/malloc.py: glibc's mallopt is called with the settings of the MALLOC_*_ variables, and a user's
own variables win. Each case runs in a fresh interpreter: mallopt changes the whole process."""

import os
import platform
import subprocess
import sys

import pytest

from dino_research.utils import malloc

on_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                              reason="mallopt is glibc's")

# Records the mallopt calls instead of making them.
FAKE_LIBC = """
import ctypes
from dino_research.utils import malloc

calls = []
class FakeMallopt:  # a ctypes function: callable, with argtypes and restype to set
    def __call__(self, param, value):
        calls.append((param, value))
        return 1
class FakeLibc:
    mallopt = FakeMallopt()
ctypes.CDLL = lambda name: FakeLibc()
print(malloc.keep_freed_memory_mapped(), sorted(calls))
"""
REAL_LIBC = "from dino_research.utils.malloc import keep_freed_memory_mapped; print(keep_freed_memory_mapped())"


def _python(code, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in malloc.ENV_VARS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **env_extra},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@on_glibc
def test_sets_the_three_glibc_parameters():
    # (param, value): M_MMAP_THRESHOLD (-3) at its 64-bit maximum, M_TOP_PAD (-2) 1 GiB, M_TRIM_THRESHOLD (-1)
    # the largest int mallopt takes.
    assert _python(FAKE_LIBC) == f"True [(-3, {32 * 1024 * 1024}), (-2, {1024 ** 3}), (-1, {2 ** 31 - 1})]"


def test_a_users_malloc_variable_wins():
    assert _python(FAKE_LIBC, MALLOC_TOP_PAD_="0") == "False []"


@on_glibc
def test_the_real_mallopt_accepts_the_settings():
    assert _python(REAL_LIBC) == "True"
