"""python -m cnnops train (the main job): what it sets up before it times the two runs."""
import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_keeps_freed_memory():
    # In a child process: mallopt changes the whole process's allocator. glibc refuses values
    # past its limits (an mmap threshold over 32 MiB), and the job would then time the page
    # faults it says it avoids.
    code = "from cnnops.__main__ import _keep_freed_memory as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True", out.stdout + out.stderr
