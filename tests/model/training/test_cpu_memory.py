"""glibc keeps freed memory after `keep_freed_memory`: a large tensor allocated again faults in no new pages."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from model.training.cpu_memory import user_chose_allocator

# Faulted-in pages per allocation of a 96 MB tensor (over glibc's 32 MB mmap ceiling), before and after the call.
SCRIPT = textwrap.dedent("""
    import resource, torch
    from model.training.cpu_memory import keep_freed_memory

    def faults_per_alloc():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.empty(24 * 2**20).fill_(1.0)  # 96 MB, every page touched, freed at once
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5

    default = faults_per_alloc()
    took = keep_freed_memory()
    faults_per_alloc(), faults_per_alloc()  # the first allocations after the call grow the heap
    print(default, took, faults_per_alloc())
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}  # no MALLOC_* from the caller's environment
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    default, took, tuned = out.split()
    pages = 96 * 2**20 // 4096
    assert took == "True"
    assert int(default) >= pages // 2  # glibc's default: each allocation mmaps and faults in fresh pages
    assert int(tuned) < pages // 20  # kept: the freed block is reused


def test_a_users_own_allocator_settings_are_left_alone() -> None:
    assert not user_chose_allocator({"PATH": "/usr/bin"})
    assert user_chose_allocator({"MALLOC_ARENA_MAX": "2"})
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
