"""Process setup (kdist.processes): the allocator keeps a step's freed memory for the next step."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.processes

# A few training steps of a small convolution net whose activations (128 x 64 x 64 x 64 floats, 128 MiB) are
# larger than anything glibc keeps by default; prints the fewest minor page faults of one step after two warm-up
# steps (the fewest: which thread's arena serves a buffer varies from run to run).
STEPS = """
import resource, sys, torch
from kdist.processes import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
nn = torch.nn
model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 7))
images = torch.randn(128, 3, 64, 64)
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(images).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 100_000  # every step maps its activations afresh: ~0.45M faults each
    assert kept < default / 10, (default, kept)
