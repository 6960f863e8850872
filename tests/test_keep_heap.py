"""runtime.keep_heap: a freed block comes back without page faults (glibc), in a fresh process
each, since malloc's settings last for the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from byol_core.runtime import keep_heap

if sys.argv[1] == "keep":
    assert keep_heap()
x = torch.ones(16 << 20)  # 64 MB, written
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 << 20)  # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_second_allocation(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_freed_block_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    # As malloc comes: the 64 MB block went back to the system and faults in again page by page.
    assert faults_of_a_second_allocation("plain") > pages // 2
    # Kept: the same memory again, already mapped.
    assert faults_of_a_second_allocation("keep") < pages // 100
