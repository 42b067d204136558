"""python -m cnnops train --distributed: two gloo processes under torchrun on the CPU, checked
by the job itself against one process; and the hint when it is not started by torchrun."""
import os
import re
import subprocess
import sys

from cnnops.__main__ import TORCHRUN_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    """Runs ``args`` from the repository root, without torchrun's variables of any launcher
    around pytest. -> CompletedProcess, stdout and stderr merged."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)


def test_two_processes_match_one():
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node", "2", "-m", "cnnops", "train", "--distributed", "--epochs", "1",
              "--max-steps", "4"])
    assert r.returncode == 0, r.stdout
    # resnet18_digits: a BatchNorm after each of its 20 convolutions, every one fused
    assert re.search(r"^cnnops\.fuse: 20 of 20 SyncBatchNorm sites fused", r.stdout,
                     re.M), r.stdout
    assert re.search(r"^epoch 1/1  loss \S+ test acc \S+ \| rank throughput \(images/s\): "
                     r"0: \d+, 1: \d+$", r.stdout, re.M), r.stdout
    assert re.search(r"^reference epoch 1/1 .*\(images/s\): \d+$", r.stdout, re.M), r.stdout
    assert "parity: ok" in r.stdout, r.stdout


def test_without_torchrun_says_how_to_launch():
    r = _run([sys.executable, "-m", "cnnops", "train", "--distributed"])
    assert r.returncode != 0
    assert "torchrun --nproc_per_node 2 -m cnnops train --distributed" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout, r.stdout
