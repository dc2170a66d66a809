"""A training process keeps the memory its steps free: no page faults for re-allocated activations."""

import subprocess
import sys

import pytest

from cnnlab import allocator, train
from cnnlab.config import Config
from cnnlab.errors import CnnlabError

# 40 MiB is above the largest mmap threshold glibc picks by itself (32 MiB), so by default each of
# these blocks is a fresh mmap that page-faults all of its 10,240 pages when it is filled.
SCRIPT = """
import resource, sys
import torch
from cnnlab import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
for i in range(30):  # the heap's layout settles in the first ten
    if i == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(40 * 2**20, dtype=torch.uint8).fill_(1)
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(allocator.glibc() is None, reason="malloc is glibc's only on Linux with glibc")
def test_freed_activations_are_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    pages = 10 * 40 * 2**20 // 4096  # 10 blocks of 40 MiB in 4 KiB pages
    assert default > 0.5 * pages  # the mechanism this guards against
    assert kept < 0.02 * pages


def test_training_setup_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = Config()
    cfg.train.device = "nonsense"  # setup stops at the device, after the allocator call
    with pytest.raises(CnnlabError, match="nonsense"):
        train.setup(cfg)
    assert calls == [1]


GIVE_BACK = """
import os, sys
import torch
from cnnlab import allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert allocator.keep_freed_memory()
base = rss()
blocks = [torch.ones(8 * 2**20, dtype=torch.uint8) for _ in range(16)]  # 128 MiB, touched
del blocks
kept = rss()
allocator.give_back_freed_memory()
print(kept - base, rss() - base)
"""


@pytest.mark.skipif(allocator.glibc() is None, reason="malloc is glibc's only on Linux with glibc")
def test_freed_memory_is_kept_until_given_back():
    """Between epochs training gives the heap's free pages back: resident memory then follows what the
    process holds, not its peak."""
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], capture_output=True, text=True, check=True)
    kept, after = map(int, out.stdout.split())
    assert kept > 120 * 2**20  # freed but still resident (keep_freed_memory)
    assert after < 8 * 2**20  # handed back to the kernel


def test_each_saved_epoch_gives_freed_memory_back(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "give_back_freed_memory", lambda: calls.append(1))
    cfg = Config()
    cfg.model.name = "mnist_tiny"
    cfg.data.subset, cfg.data.val_split, cfg.train.epochs, cfg.train.quiet = 256, 128, 2, True
    train.train(cfg, tmp_path / "run")
    assert calls == [1, 1]
