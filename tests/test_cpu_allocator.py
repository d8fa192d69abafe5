"""keep_freed_memory: a large CPU tensor allocated again after a free reuses its pages (no page faults),
heap_bytes_in_use counts a live tensor whether or not freed memory is kept, and the fastp2phd command line
turns keeping on while importing the library does not."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# Page faults of the last of four 128 MiB allocations, each freed after writing it. Not the second:
# glibc's memalign asks for a little more than the block it frees, so when a small allocation lands
# right after the first block, the second comes fresh from the heap's top (and faults) once.
PROBE = """
import resource, sys, torch
from fastp2phd.cpu_allocator import keep_freed_memory

def last_allocation_faults():
    for round in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(32 << 20)
        x.fill_(1)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

{setup}
"""


def faults_after(setup: str, probe: str = "print(last_allocation_faults())") -> int:
    code = textwrap.dedent(PROBE).format(setup=textwrap.dedent(setup)) + probe
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc")
def test_freed_blocks_are_reused_once_kept_and_not_before():
    pages = (128 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults_after("") > pages // 2  # glibc's default: every page faults again
    assert faults_after("assert keep_freed_memory()") < pages // 100


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc")
def test_heap_bytes_in_use_count_a_live_tensor_whether_freed_memory_is_kept_or_not():
    probe = """
    from fastp2phd.cpu_allocator import heap_bytes_in_use
    x = torch.empty(32 << 20); del x  # a freed block, kept or handed back
    before = heap_bytes_in_use()
    x = torch.empty(32 << 20)
    grown = heap_bytes_in_use() - before
    del x
    print(grown if heap_bytes_in_use() - before < 1 << 20 else -1)
    """
    for setup in ("", "assert keep_freed_memory()"):
        assert abs(faults_after(setup, textwrap.dedent(probe)) - (128 << 20)) < 1 << 20, setup


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc")
def test_the_command_line_keeps_freed_memory_and_the_import_does_not():
    assert faults_after("import fastp2phd, fastp2phd.cli") > (128 << 20) // os.sysconf("SC_PAGE_SIZE") // 2
    assert faults_after("from fastp2phd.cli import main; main(['info'])") < (128 << 20) // os.sysconf("SC_PAGE_SIZE") // 100
