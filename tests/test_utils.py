"""utils.py: glibc malloc kept from handing freed memory back (utils.keep_freed_memory)."""
import platform
import subprocess
import sys

import pytest

from helpers import ROOT

# Allocates 200 MiB in 10 MiB tensors, frees them, and counts the page faults of doing it again: glibc's
# default trims the freed heap (every page faults anew), keep_freed_memory keeps it.
CHURN = """
import resource, sys, torch, utils
if sys.argv[1] == "keep":
    assert utils.keep_freed_memory()
def churn():
    tensors = [torch.ones((10 << 20) // 4) for _ in range(20)]
    del tensors
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra or {}, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_avoids_refaulting_freed_heap():
    default, kept = page_faults("default"), page_faults("keep")
    pages = (200 << 20) // 4096
    assert default > 0.9 * pages  # glibc handed the memory back: reallocating faults every page in again
    assert kept < 0.5 * default


def test_keep_freed_memory_leaves_user_settings_alone(monkeypatch):
    import utils

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert utils.keep_freed_memory() is False
