"""python -m cnnops train (the main job): what it sets up before it times the two runs."""
import platform
import re
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


def _train(*args):
    out = subprocess.run([sys.executable, "-m", "cnnops", "train", "--epochs", "1", "--plot", "",
                          *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_main_job_runs_cnnops_in_channels_last_and_says_so():
    """By default the cnnops run holds its convolution weights in channels_last, so every
    activation follows (torch.compile lays out CPU convolutions so too); --layout nchw keeps
    the model as written. The job prints which, next to the speed ratio."""
    default = _train("--model", "lenet")
    assert ("layout: cnnops runs the network in channels_last (oneDNN's native CPU layout, "
            "which torch.compile also picks for CPU convolutions); torch.nn as written (NCHW)"
            in default)
    assert "speed: cnnops runs at " in default
    nchw = _train("--model", "lenet", "--layout", "nchw")
    assert "layout: cnnops runs the network in NCHW; torch.nn as written (NCHW)" in nchw
    # the same batches from the same weights: in NCHW both runs' epoch losses agree to
    # float32 rounding (exactly where the auto core picks oneDNN for every convolution whose
    # sums differ; which it picks is measured, so the bound is rounding's, not zero)
    parity = re.search(r"parity: largest difference in epoch loss between the two runs: (\S+)",
                       nchw)
    assert parity and float(parity.group(1)) < 1e-6, nchw


@pytest.mark.parametrize("name", ["residual_net", "inception_net"])
def test_main_job_model_pair(name):
    """The cnnops net in channels_last (every activation follows its weights) computes what
    torch.nn's does in NCHW, from the same initial weights."""
    import torch
    import cnnops
    from cnnops.__main__ import _model_pair
    ours, theirs = _model_pair(name, "channels_last")
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(
        m.weight.stride() == m.weight.contiguous(memory_format=torch.channels_last).stride()
        for m in convs)
    assert all(p.is_contiguous() for p in theirs.parameters())
    x = torch.randn(4, 1, 28, 28)
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o))
               for m in ours.modules() if m is not ours]
    with cnnops.use_backend("cpu"):
        out = ours(x)
    for h in handles:
        h.remove()
    activations = [o for o in seen if isinstance(o, torch.Tensor) and o.dim() == 4]
    assert len(activations) > len(convs) // 2
    assert all(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()
               for o in activations)
    torch.testing.assert_close(out, theirs(x), rtol=1e-4, atol=1e-5)
    nchw, _ = _model_pair(name, "nchw")
    assert all(m.weight.is_contiguous() for m in nchw.modules() if isinstance(m, torch.nn.Conv2d))


def test_layout_is_for_single_process_runs():
    out = subprocess.run([sys.executable, "-m", "cnnops", "train", "--distributed", "--layout",
                          "nchw"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--layout is for single-process runs" in out.stderr
