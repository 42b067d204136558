"""Every cnnops Triton kernel compiled ahead of time for an NVIDIA GPU (sm_90), without one.

The rest of the suite runs the kernels in Triton's CPU interpreter, which never compiles
them: a kernel the GPU compiler rejects passes there. (It happened: float64 ``tl.dot`` with
a float64 accumulator is a CompilationError in Triton 3.6, and every float64 convolution
failed on the first GPU run.) The NVIDIA backend of the triton wheel compiles to a cubin
with the ptxas it bundles, which needs neither a GPU nor a driver, so this test does that.

How: a child process, with TRITON_INTERPRET unset (``@triton.jit`` picks the interpreter
when the module is imported, and conftest has turned it on for this process), calls the
cnnops_triton ops on small CPU tensors in each dtype with ``wrap_triton`` replaced by a
recorder. So it sees every kernel launch as the ops make it on a GPU (arguments, constexprs,
launch options, GPU autotuning configs) and compiles each distinct one with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; no kernel runs.
Autotuned kernels compile with the largest tile of their config list (the one most likely to
run out of registers or shared memory); the shared memory it needs is checked against the
sm_90 limit. About 130 compilations (80 s of CPU), in two processes, take about a minute
on 2 cores.

What compiles depends on the installed Triton: float64 ``tl.dot`` fails in 3.6 but compiles
in 3.8 and later, so test_float64_gemms_do_not_use_tl_dot also checks that the float64 GEMMs
keep to the path that compiles everywhere (see cnnops/triton_kernels/conv.py, _mma).

Run it by hand: ``python tests/test_triton_compile.py [--arch 90] [--dtype float64]`` prints
one line per compilation.
"""
import json
import os
import subprocess
import sys
import time
import traceback

import pytest

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# The largest dynamic shared memory a block may use on sm_90 (227 KiB).
SM90_SHARED_LIMIT = 232448


# ---------------------------------------------------------------------------
# The child process: record the ops' launches, compile them.

def _op_calls(dtype):
    """Calls of the cnnops_triton ops covering every kernel and constexpr variant they launch."""
    import torch

    import cnnops.triton_kernels.ops  # noqa: F401 - registers torch.ops.cnnops_triton

    ops = torch.ops.cnnops_triton
    dt = getattr(torch, dtype)
    sdt = torch.float64 if dt == torch.float64 else torch.float32
    torch.manual_seed(0)

    def t(*shape, cl=False, d=dt):
        x = torch.randn(shape, dtype=d)
        return x.contiguous(memory_format=torch.channels_last) if cl and x.dim() == 4 else x

    N, C, OC, H, W = 2, 4, 8, 6, 6
    geo = ([1, 1], [1, 1], [1, 1], 1)
    x, w, b = t(N, C, H, W), t(OC, C, 3, 3), t(OC)
    y, res = t(N, OC, H, W), t(N, OC, H, W)
    gamma, beta, rm, rv = t(OC, d=sdt), t(OC, d=sdt), t(OC, d=sdt), t(OC, d=sdt).abs()
    mean, invstd = t(OC, d=sdt), t(OC, d=sdt).abs()
    calls = [
        # convolution: plain, + residual + ReLU, training (stats) and inference (folded BN)
        lambda: ops.conv2d(x, w, b, *geo),
        lambda: ops.conv2d_relu(x, w, b, res, *geo),
        lambda: ops.conv2d_backward(y, x, w, *geo, [True, True, True]),
        lambda: ops.conv_bn_relu(x, w, b, gamma, beta, rm, rv, res, *geo, True, 1e-5, True),
        lambda: ops.conv_bn_relu(x, w, b, gamma, beta, rm, rv, res, *geo, False, 1e-5, True),
        lambda: ops.conv_bn_relu_backward(y, y, x, w, b, y, gamma, mean, invstd, *geo, True,
                                          True, [True] * 6),
        lambda: ops.conv_bn_relu_backward(y, y, x, w, b, y, gamma, mean, invstd, *geo, False,
                                          True, [True] * 6),
        # batch norm
        lambda: ops.batch_norm(y, rm, rv, gamma, beta, True, 1e-5),
        lambda: ops.bn_relu(y, rm, rv, gamma, beta, res, False, 1e-5, True),
        lambda: ops.batch_norm_backward(y, y, gamma, mean, invstd, True, [True] * 3),
        lambda: ops.bn_relu_backward(y, y, y, gamma, mean, invstd, False, True, [True] * 4),
        # the running statistics: one buffer of the input's dtype, one of the statistics'
        lambda: ops.update_running_stats(t(OC), rv.clone(), mean, invstd, 9, 0.1, 1e-5),
        lambda: ops.update_running_stats(None, rv.clone(), mean, invstd, 1, 0.1, 1e-5),
        # elementwise
        lambda: ops.add_relu(y, res),
        lambda: ops.add_relu_backward(y, res),
    ]
    for cl in (False, True):  # pooling, in both layouts its kernels tell apart
        p = t(N, C, 7, 9, cl=cl)
        calls += [
            lambda p=p: ops.max_pool2d(p, [3, 3], [2, 2], [1, 1], [1, 1], True),
            lambda p=p, cl=cl: ops.max_pool2d_backward(t(N, C, 4, 5, cl=cl), p,
                                                torch.zeros(N, C, 4, 5, dtype=torch.int64),
                                                [3, 3], [2, 2], [1, 1], [1, 1]),
            lambda p=p: ops.avg_pool2d(p, [3, 3], [2, 2], [1, 1], True, False, None),
            lambda p=p, cl=cl: ops.avg_pool2d_backward(t(N, C, 4, 5, cl=cl), p, [3, 3], [2, 2],
                                                       [1, 1], True, True, None),
            lambda p=p, cl=cl: ops.avg_pool2d_backward(t(N, C, 4, 5, cl=cl), p, [3, 3], [2, 2],
                                                       [1, 1], True, True, 5),
            lambda p=p: ops.adaptive_avg_pool2d(p, [3, 5]),
            lambda p=p, cl=cl: ops.adaptive_avg_pool2d_backward(t(N, C, 3, 5, cl=cl), p),
        ]
    return calls


def _type_of(value):
    """Triton's signature type of a non-constexpr kernel argument."""
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                      torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                      torch.bool: "i1"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError("kernel argument of type %s" % type(value).__name__)


def _record_launches(dtype):
    """[(jit function, signature, constexprs, options)] of every distinct launch of the ops."""
    from cnnops.triton_kernels import conv, elementwise, norm, pool

    seen, launches = set(), []

    def wrap_triton(kernel):
        def launcher(grid):
            def launch(*args, **kwargs):
                configs = getattr(kernel, "configs", None)
                fn = kernel.fn if configs is not None else kernel
                meta = {}
                if configs is not None:  # autotuned: the largest tile of its GPU configs
                    cfg = max(configs, key=lambda c: (_tile(c.kwargs), c.num_warps))
                    kwargs = dict(kwargs, **cfg.kwargs)
                    meta = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
                options = dict(meta, **options)
                values = dict(zip(fn.arg_names, args), **kwargs)
                sig, constexprs = {}, {}
                for param in fn.params:
                    value = values[param.name]
                    if param.is_constexpr:
                        sig[param.name] = "constexpr"
                        constexprs[param.name] = value
                    else:
                        sig[param.name] = _type_of(value)
                key = (fn.__name__, json.dumps([sig, constexprs, options], sort_keys=True))
                if key not in seen:
                    seen.add(key)
                    launches.append((fn, sig, constexprs, options))
            return launch

        class Wrapped:
            def __getitem__(self, grid):
                return launcher(grid)
        return Wrapped()

    for module in (conv, elementwise, norm, pool):
        module.wrap_triton = wrap_triton
    for call in _op_calls(dtype):
        call()
    return launches


def _tile(meta):
    size = 1
    for name, value in meta.items():
        if name.startswith("BLOCK"):
            size *= value
    return size


def _compile_all(dtypes, arch, verbose):
    """Compiles every launch; -> [{kernel, dtype, constexprs, ok, error, shared, ttir_dot, s}]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for dtype in dtypes:
        for fn, sig, constexprs, options in _record_launches(dtype):
            start = time.perf_counter()
            entry = dict(kernel="%s.%s" % (fn.__module__.rsplit(".", 1)[-1], fn.__name__),
                         dtype=dtype, constexprs={k: repr(v) for k, v in constexprs.items()},
                         options=options, ok=False, error=None, shared=None, ttir_dot=None)
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                          target=target, options=options)
                entry.update(ok=True, shared=compiled.metadata.shared,
                             ttir_dot=" tt.dot " in compiled.asm["ttir"])
            except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
                error = "%s: %s" % (type(e).__name__, e)
                cause = e.__cause__  # a CompilationError's message omits it
                if cause is not None:
                    error += "\ncaused by:\n" + "".join(traceback.format_exception(
                        type(cause), cause, cause.__traceback__)[-3:])
                entry["error"] = error[-4000:]
            entry["s"] = round(time.perf_counter() - start, 2)
            results.append(entry)
            if verbose:
                print("%-4s %-8s %-40s %5.1fs %s" % ("ok" if entry["ok"] else "FAIL", dtype,
                                                    entry["kernel"], entry["s"],
                                                    entry["error"] or ""), flush=True)
    return results


def _probe(arch):
    """None when Triton can compile a trivial kernel for the target here, else why not."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def copy(src, dst, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(dst + offs, tl.load(src + offs))

        sig = dict(src="*fp32", dst="*fp32", BLOCK="constexpr")
        triton.compile(ASTSource(fn=copy, signature=sig, constexprs=dict(BLOCK=64)),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=1))
        return None
    except Exception as e:  # noqa: BLE001
        return "%s: %s" % (type(e).__name__, e)


def main(argv):
    import argparse
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--json", help="write the results here instead of printing them")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET unset: the interpreter's kernels cannot be compiled")
    warnings.simplefilter("ignore")
    why = _probe(args.arch)
    results = None if why else _compile_all(args.dtype or DTYPES, args.arch, not args.json)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(unavailable=why, results=results), f)
    elif why:
        sys.exit("cannot compile for sm_%d here: %s" % (args.arch, why))
    elif not all(r["ok"] for r in results):
        sys.exit(1)


# ---------------------------------------------------------------------------
# The tests.

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: each run really compiles, and ~/.triton is left alone.
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), CUDA_VISIBLE_DEVICES="")
    # The dtypes split between two children, which compile in parallel.
    jobs = []
    for i in range(2):
        out = tmp / ("results%d.json" % i)
        cmd = [sys.executable, __file__, "--json", str(out)]
        for dtype in DTYPES[i::2]:
            cmd += ["--dtype", dtype]
        jobs.append((out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)))
    results = []
    for out, proc in jobs:
        log = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0 and out.exists(), log
        data = json.loads(out.read_text())
        if data["unavailable"]:
            pytest.skip("Triton cannot compile for sm_90 here: " + data["unavailable"])
        results += data["results"]
    return results


def _describe(r):
    flags = ", ".join("%s=%s" % kv for kv in sorted(r["constexprs"].items()))
    return "%s [%s] (%s; %s)" % (r["kernel"], r["dtype"], flags, r["options"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_compiles_for_sm90(compiled, dtype):
    results = [r for r in compiled if r["dtype"] == dtype]
    kernels = {r["kernel"] for r in results}
    # Every kernel module takes part (a launcher that stopped launching would drop out).
    assert {k.split(".")[0] for k in kernels} == {"conv", "norm", "pool", "elementwise"}
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(_describe(r) + ":\n" + r["error"] for r in failed)
    too_big = [r for r in results if r["shared"] > SM90_SHARED_LIMIT]
    assert not too_big, "shared memory past the sm_90 limit:\n" + "\n".join(
        "%s: %d bytes" % (_describe(r), r["shared"]) for r in too_big)


def test_float64_gemms_do_not_use_tl_dot(compiled):
    # Compiling with this machine's Triton proves nothing about older releases, and float64
    # tl.dot fails in Triton 3.6 (see conv._mma). The float64 GEMM kernels must keep to the
    # broadcast-and-sum path: no tt.dot in their Triton IR.
    conv = [r for r in compiled if r["kernel"].startswith("conv.")]
    assert {r["dtype"] for r in conv} == set(DTYPES)
    assert all(r["ttir_dot"] for r in conv if r["dtype"] != "float64" and r["ok"])
    dots = [_describe(r) for r in conv if r["dtype"] == "float64" and r["ttir_dot"]]
    assert not dots, "float64 kernels with tt.dot:\n" + "\n".join(dots)


if __name__ == "__main__":
    main(sys.argv[1:])
