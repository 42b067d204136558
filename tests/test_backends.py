"""Backend selection: get/set/use_backend, CNNOPS_BACKEND, auto's choice, and explicit choices
that cannot run (they raise and say why; they never silently run another backend).

Which implementation really ran is observed with a TorchDispatchMode that records every op
dispatched below autograd: the compiled backend shows up as torch.ops.cnnops.<op>, the
reference backend as aten ops only.
"""
import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cnnops
import cnnops.functional as CF
from cnnops import backends
from cnnops import triton_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["auto", "cpu", "cuda", "triton", "reference"]


class RecordOps(TorchDispatchMode):
    """Records the name of every op dispatched inside the block (e.g. 'cnnops.conv2d.default')."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def cnnops_ops(self):
        return [name for name in self.ops if name.startswith("cnnops.")]


@pytest.fixture
def restore_backend():
    saved = cnnops.get_backend()
    yield
    cnnops.set_backend(saved)


# One call per public function (float32 by default) and torch.nn.functional's answer. Every
# tensor is made here, so that calling a thunk dispatches nothing but the call itself.
def _calls(dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)

    def stats(c):
        return (torch.randn(c, generator=g).to(dtype),
                (torch.rand(c, generator=g) + 0.5).to(dtype))

    x, y, w = t(2, 3, 6, 6), t(2, 3, 6, 6), t(4, 3, 3, 3)
    s3, s4 = stats(3), stats(4)
    s3_ref, s4_ref = [v.clone() for v in s3], [v.clone() for v in s4]
    return {
        "conv2d": (lambda: CF.conv2d(x, w, None, 1, 1),
                   lambda: F.conv2d(x, w, None, 1, 1)),
        "batch_norm": (lambda: CF.batch_norm(x, *s3, training=True),
                       lambda: F.batch_norm(x, *s3_ref, training=True)),
        "bn_relu": (lambda: CF.bn_relu(x, *s3, None, None, training=True),
                    lambda: F.relu(F.batch_norm(x, *s3_ref, training=True))),
        "conv_bn_relu": (lambda: CF.conv_bn_relu(x, w, None, None, None, *s4, padding=1,
                                                 training=True),
                         lambda: F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), *s4_ref,
                                                     training=True))),
        "max_pool2d": (lambda: CF.max_pool2d(x, 2), lambda: F.max_pool2d(x, 2)),
        "avg_pool2d": (lambda: CF.avg_pool2d(x, 3, 2, 1), lambda: F.avg_pool2d(x, 3, 2, 1)),
        "adaptive_avg_pool2d": (lambda: CF.adaptive_avg_pool2d(x, (4, 5)),
                                lambda: F.adaptive_avg_pool2d(x, (4, 5))),
        "add_relu": (lambda: CF.add_relu(x, y), lambda: F.relu(x + y)),
    }


OPS = sorted(_calls())


def _run(code, **env_overrides):
    env = dict(os.environ)
    env.pop("CNNOPS_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------
# the setting

def test_default_is_auto():
    assert cnnops.get_backend() == (os.environ.get("CNNOPS_BACKEND") or "auto")


def test_set_backend(restore_backend):
    for name in NAMES:
        cnnops.set_backend(name)
        assert cnnops.get_backend() == name
    cnnops.set_backend("reference")
    assert backends.resolve(torch.zeros(1)) == "reference"
    cnnops.set_backend("auto")
    assert backends.resolve(torch.zeros(1)) == "cpu"


def test_use_backend_restores_on_exit(restore_backend):
    cnnops.set_backend("auto")
    with cnnops.use_backend("reference"):
        assert cnnops.get_backend() == "reference"
        with cnnops.use_backend("cpu"):
            assert cnnops.get_backend() == "cpu"
        assert cnnops.get_backend() == "reference"
    assert cnnops.get_backend() == "auto"


def test_use_backend_restores_after_an_exception(restore_backend):
    cnnops.set_backend("cpu")
    with pytest.raises(KeyError, match="inside"):
        with cnnops.use_backend("reference"):
            assert cnnops.get_backend() == "reference"
            raise KeyError("inside")
    assert cnnops.get_backend() == "cpu"
    # ... also when the error comes from a cnnops call that cannot run
    with pytest.raises(RuntimeError, match="cannot run this call"):
        with cnnops.use_backend("cuda"):
            CF.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))
    assert cnnops.get_backend() == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "CPU", "", None, "reference "])
def test_unknown_backend_name_raises(restore_backend, bad):
    cnnops.set_backend("reference")
    expected = r"unknown cnnops backend %s; expected one of auto, cpu, cuda, triton, reference" % (
        "'%s'" % bad if isinstance(bad, str) else repr(bad))
    with pytest.raises(ValueError, match=expected):
        cnnops.set_backend(bad)
    assert cnnops.get_backend() == "reference"
    with pytest.raises(ValueError, match=expected):
        with cnnops.use_backend(bad):
            pytest.fail("the block ran")  # pragma: no cover
    assert cnnops.get_backend() == "reference"


def test_available_backends():
    available = cnnops.available_backends()
    assert "reference" in available and "cpu" in available
    assert "auto" not in available and set(available) <= set(NAMES)
    if not torch.cuda.is_available():
        assert "cuda" not in available
        # Triton runs CPU tensors only in its interpreter (the test suite turns it on).
        assert ("triton" in available) == (triton_kernels.INTERPRET
                                           and triton_kernels.unavailable() is None)


@pytest.fixture
def compiled_triton(monkeypatch):
    """Triton as it is outside the interpreter: CUDA tensors only."""
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)


# ---------------------------------------------------------------------------
# CNNOPS_BACKEND, read at import (fresh interpreters)

_REPORT = """
    import json, torch, cnnops, cnnops.functional as CF
    from cnnops import backends
    out = CF.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3, requires_grad=True))
    print(json.dumps({"backend": cnnops.get_backend(),
                      "resolved": backends.resolve(torch.zeros(1)),
                      "compiled_op_ran": "cnnops::Conv2dBackward" in out.grad_fn.name()}))
    """


def _report(**env):
    r = _run(_REPORT, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fresh_import_defaults_to_auto_and_picks_cpu():
    assert _report() == {"backend": "auto", "resolved": "cpu", "compiled_op_ran": True}


def test_env_var_selects_backend_at_import():
    assert _report(CNNOPS_BACKEND="reference") == {"backend": "reference",
                                                   "resolved": "reference",
                                                   "compiled_op_ran": False}


def test_env_var_with_unknown_name_fails_the_import():
    r = _run("import cnnops", CNNOPS_BACKEND="bogus")
    assert r.returncode != 0
    assert "ValueError: unknown cnnops backend 'bogus'; expected one of auto, cpu, cuda, " \
           "triton, reference" in r.stderr


# ---------------------------------------------------------------------------
# explicit backends that cannot run the call

@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_backend_on_cpu_tensors_raises(restore_backend, compiled_triton, name, op):
    call, _ = _calls()[op]
    why = {"cuda": r"(cnnops\._C was built without CUDA kernels|cnnops\._C.*not|"
                   r"it runs on CUDA tensors, got a tensor on cpu)",
           "triton": r"it runs on CUDA tensors \(CPU tensors only in Triton's interpreter, "
                     r"TRITON_INTERPRET=1\), got a tensor on cpu"}[name]
    cnnops.set_backend(name)
    with RecordOps() as rec:
        with pytest.raises(RuntimeError,
                           match=r"cnnops backend '%s' cannot run this call: %s" % (name, why)):
            call()
    # nothing was computed: no other backend ran it in its place (add_relu broadcasts its
    # operands with expand before it picks a backend)
    assert set(rec.ops) <= {"aten.expand.default"}


def test_failed_call_does_not_touch_running_stats(restore_backend, compiled_triton):
    x = torch.randn(2, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    for name in ("cuda", "triton"):
        with cnnops.use_backend(name), pytest.raises(RuntimeError, match=name):
            CF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_triton_not_installed_is_reported(restore_backend, monkeypatch):
    monkeypatch.setattr(triton_kernels.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert "triton" not in cnnops.available_backends()
    with cnnops.use_backend("triton"), pytest.raises(
            RuntimeError, match=r"cannot run this call: triton is not installed \(pip install"):
        CF.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))


@pytest.mark.parametrize("op", OPS)
def test_explicit_cpu_with_float16_raises(restore_backend, op):
    call, _ = _calls(torch.float16)[op]
    cnnops.set_backend("cpu")
    with pytest.raises(RuntimeError, match=r"cnnops backend 'cpu' cannot run this call: it "
                                           r"supports float32, float64 and bfloat16, got "
                                           r"torch\.float16"):
        call()


@pytest.mark.parametrize("name", ["cpu", "auto"])
@pytest.mark.parametrize("op", OPS)
def test_cpu_runs_bfloat16(restore_backend, op, name):
    """bfloat16 runs on the cpu backend, chosen explicitly or by auto: the compiled op runs
    (the convolutions natively, the other ops on float32 copies) and the output is bfloat16,
    close to torch's bfloat16 answer (tests/test_cpu_conv_core.py judges the accuracy)."""
    call, expected = _calls(torch.bfloat16)[op]
    cnnops.set_backend(name)
    with RecordOps() as rec:
        out = call()
    updates = (["cnnops.update_running_stats.default"]
               if op in ("batch_norm", "bn_relu", "conv_bn_relu") else [])
    assert rec.cnnops_ops() == ["cnnops.%s.default" % op] + updates
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected().float(), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------
# auto

def test_resolve():
    with cnnops.use_backend("auto"):
        assert backends.resolve(torch.zeros(1)) == "cpu"
        assert backends.resolve(torch.zeros(1, dtype=torch.float64)) == "cpu"
        assert backends.resolve(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last)) \
            == "cpu"
        assert backends.resolve(torch.zeros(1, dtype=torch.float16)) == "reference"
        assert backends.resolve(torch.zeros(1, dtype=torch.bfloat16)) == "cpu"
    with cnnops.use_backend("reference"):
        assert backends.resolve(torch.zeros(1)) == "reference"
    with cnnops.use_backend("cpu"):
        assert backends.resolve(torch.zeros(1, dtype=torch.float64)) == "cpu"


@pytest.mark.parametrize("op", OPS)
def test_auto_float16_uses_reference_and_matches_torch(restore_backend, op):
    cnnops.set_backend("auto")
    call, expected = _calls(torch.float16)[op]
    with RecordOps() as rec:
        out = call()
    assert rec.cnnops_ops() == []
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------
# the compiled op really runs on `cpu` (and `auto`), and never on `reference`

@pytest.mark.parametrize("name", ["cpu", "auto", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_which_implementation_runs(restore_backend, name, op):
    cnnops.set_backend(name)
    call, expected = _calls(requires_grad=True)[op]
    with RecordOps() as rec:
        out = call()
        out.backward(torch.ones_like(out))
    ran = rec.cnnops_ops()
    if name == "reference":
        assert ran == []
    else:
        # A training-mode BN call then updates its running statistics with one op call.
        updates = (["cnnops.update_running_stats.default"]
                   if op in ("batch_norm", "bn_relu", "conv_bn_relu") else [])
        assert ran == ["cnnops.%s.default" % op] + updates + ["cnnops.%s_backward.default" % op]
        assert "cnnops" in type(out.grad_fn).__name__ or "cnnops" in out.grad_fn.name()
    torch.testing.assert_close(out, expected(), rtol=1e-4, atol=1e-4)
