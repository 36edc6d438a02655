"""recsys.memory: freed memory kept in the process where the C library is glibc."""
from __future__ import annotations

import ctypes

import pytest

from recsys import memory


@pytest.fixture
def fresh(monkeypatch):
    """A process state where retain_freed_memory has not run yet."""
    monkeypatch.setattr(memory, "_state", {})
    for name in ("MUSE_RETAIN_FREED_MEMORY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_freed_memory_is_kept_once_per_process(fresh, monkeypatch):
    calls = []
    real_apply = memory._apply
    monkeypatch.setattr(memory, "_apply", lambda: calls.append(1) or real_apply())
    assert memory.retain_freed_memory() and memory.retain_freed_memory()
    assert calls == [1]


@pytest.mark.parametrize("variable, value", [("MUSE_RETAIN_FREED_MEMORY", "0"), ("MALLOC_TRIM_THRESHOLD_", "4096")])
def test_the_environment_can_keep_the_default_policy(fresh, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert memory.retain_freed_memory() is False


_FAULTS = """
import ctypes, resource, sys
from recsys import memory
if sys.argv[1] == "retain":
    assert memory.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults_of_one_call():
    # two 32 MB blocks written, then freed, like a call's activations (torch allocates through malloc)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(32 << 20) for _ in range(2)]
    for block in blocks:
        libc.memset(block, 1, 32 << 20)
    for block in blocks:
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_call()
print(min(faults_of_one_call() for _ in range(5)))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_a_call_reuses_the_memory_the_call_before_freed():
    import subprocess
    import sys

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.strip())

    # 64 MB is 16,384 pages: by default faulted in again on every call, once retained kept
    assert faults("default") > 8_000
    assert faults("retain") < 1_000
