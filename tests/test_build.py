"""The build and its guards (DESIGN.md, "Build").

(a) a cnnops._C built against another torch is not loaded: one clear RuntimeWarning, and the
    ops fall back to the reference backend instead of crashing on undefined symbols;
(b) an isolated build (no importable torch) stops at once and says what to run;
(c) cnnops/_build_info.py records the torch the extension was built against;
(d) the CUDA sources compile with nvcc (when nvcc exists), every op has a CUDA kernel, and the
    GPU tests skip cleanly without a GPU.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import cnnops
from cnnops import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    env = dict(os.environ)
    env.pop("CNNOPS_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          **kw)


# ---------------------------------------------------------------------------
# (a) build/runtime torch version mismatch

_MISMATCH = """
    import json, sys, types, warnings
    fake = types.ModuleType("cnnops._build_info")
    fake.BUILD_INFO = {"torch_version": "0.0.0", "cuda_version": None, "with_cuda": False,
                       "cxx11_abi": True}
    sys.modules["cnnops._build_info"] = fake
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import cnnops
    import torch, torch.nn.functional as F
    import cnnops.functional as CF
    from cnnops import _ext, backends
    x, w, b = torch.randn(2, 3, 7, 7), torch.randn(4, 3, 3, 3), torch.randn(4)
    out = CF.conv2d(x, w, b, 2, 1)
    with cnnops.use_backend("cpu"):
        try:
            CF.conv2d(x, w, b, 2, 1)
            explicit_cpu = "ran"
        except RuntimeError as e:
            explicit_cpu = str(e)
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in caught
                     if "cnnops" in str(w.message)],
        "loaded": _ext.LOADED,
        "error": _ext.ERROR,
        "C_imported": "cnnops._C" in sys.modules,
        "available": cnnops.available_backends(),
        "resolved": backends.resolve(x),
        "matches_torch": torch.allclose(out, F.conv2d(x, w, b, 2, 1), rtol=1e-4, atol=1e-4),
        "grad_fn": out.grad_fn.name() if out.grad_fn is not None else None,
        "explicit_cpu": explicit_cpu,
    }))
    """


def test_version_mismatch_disables_the_extension_with_a_warning():
    r = _run([sys.executable, "-c", textwrap.dedent(_MISMATCH)])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])

    assert len(report["warnings"]) == 1, report["warnings"]
    category, message = report["warnings"][0]
    assert category == "RuntimeWarning"
    assert "C++ kernels disabled" in message
    assert "cnnops._C was built against torch 0.0.0 but torch %s is running" % torch.__version__ \
        in message
    assert "pip install --no-build-isolation" in message
    assert "`auto` uses the reference backend" in message

    assert report["loaded"] is False
    assert "0.0.0" in report["error"] and torch.__version__ in report["error"]
    assert report["C_imported"] is False  # the mismatched library was never dlopen'ed
    # the C++ backends are off; reference remains (and triton, where Triton can run: on a GPU,
    # or on CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets)
    assert "cpu" not in report["available"] and "cuda" not in report["available"]
    assert "reference" in report["available"]
    assert report["resolved"] == "reference"
    assert report["matches_torch"] is True
    # asking for the disabled backend says why instead of running the reference one
    assert report["explicit_cpu"].startswith("cnnops backend 'cpu' cannot run this call: "
                                             "cnnops._C was built against torch 0.0.0")


# ---------------------------------------------------------------------------
# (b) isolated builds stop at once

def test_setup_without_torch_stops_with_instructions():
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    build_info = os.path.join(ROOT, "cnnops", "_build_info.py")
    before = os.stat(build_info).st_mtime_ns if os.path.exists(build_info) else None
    start = time.monotonic()
    r = _run([sys.executable, "-c", code])
    elapsed = time.monotonic() - start

    assert r.returncode != 0
    assert "torch is not importable in this build environment" in r.stderr
    assert "pip install --no-build-isolation ." in r.stderr
    assert "Traceback" not in r.stderr  # a message, not a crash
    assert elapsed < 30
    after = os.stat(build_info).st_mtime_ns if os.path.exists(build_info) else None
    assert after == before  # it stopped before writing anything


# ---------------------------------------------------------------------------
# (b2) a library that would crash in its own error messages is not installed

_PROBE_LIBRARY = r"""
#include <torch/library.h>
#include "cnnops/conv_shape.h"

// cnnops::conv2d's argument checks, and nothing else: what setup.py's probe calls.
at::Tensor conv2d_checks(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>&, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  cnnops::conv_shape(input, weight, at::Tensor(), stride, padding, dilation, groups);
  return input.clone();
}

TORCH_LIBRARY(cnnops, m) {
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor", &conv2d_checks);
}
"""


@pytest.fixture(scope="module")
def probe_libraries(tmp_path_factory):
    """The same object linked twice: as setup.py links cnnops._C, and with -static-libstdc++
    (what put a second libstdc++ into cnnops._C on the first GPU machine)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux")
    from torch.utils import cpp_extension

    d = tmp_path_factory.mktemp("probe")
    (d / "probe.cpp").write_text(_PROBE_LIBRARY)
    includes = ["-I" + p for p in cpp_extension.include_paths()]
    includes.append("-I" + os.path.join(ROOT, "csrc", "include"))
    abi = "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI)
    subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", abi, *includes, "-c", str(d / "probe.cpp"),
                    "-o", str(d / "probe.o")], check=True, capture_output=True, timeout=600)
    libs = ["-L" + p for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    out = {}
    for name, extra in (("shared", []), ("static", ["-static-libstdc++"])):
        out[name] = str(d / ("%s.so" % name))
        subprocess.run([cxx, "-shared", str(d / "probe.o"), "-o", out[name], *libs, *extra],
                       check=True, capture_output=True, timeout=300)
    return out


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnnops_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the build helpers; runs setup() only as __main__
    return module


def test_build_check_accepts_a_normally_linked_library(probe_libraries, capsys):
    _setup_module()._check_built_extension(probe_libraries["shared"], None)
    assert "error messages raise cleanly" in capsys.readouterr().out
    assert os.path.exists(probe_libraries["shared"])


def test_build_check_stops_on_a_static_libstdcxx(probe_libraries):
    """A second libstdc++ in the extension breaks every error message that streams a number
    (truncated here; a segfault with g++ 13 on the GPU machine): the build must stop and say so,
    and must not leave the library behind."""
    with pytest.raises(SystemExit) as stop:
        _setup_module()._check_built_extension(probe_libraries["static"], None)
    message = str(stop.value.code)
    assert "static copy of libstdc++" in message
    assert "_ZNSt6locale7classicEv" in message
    assert "did not raise its message cleanly" in message  # the run-time probe saw it too
    assert not os.path.exists(probe_libraries["static"])


# ---------------------------------------------------------------------------
# (c) what the build recorded

def test_build_info_matches_the_running_torch():
    from cnnops._build_info import BUILD_INFO

    assert set(BUILD_INFO) >= {"torch_version", "cuda_version", "with_cuda", "cxx11_abi"}
    assert BUILD_INFO["torch_version"] == torch.__version__
    assert BUILD_INFO["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert isinstance(BUILD_INFO["with_cuda"], bool)
    if torch.version.cuda is None:  # a CPU build of torch, as on the CI machines
        assert BUILD_INFO["with_cuda"] is False
        assert BUILD_INFO["cuda_version"] is None
    elif BUILD_INFO["with_cuda"]:
        assert BUILD_INFO["cuda_version"] == torch.version.cuda
    assert _ext.BUILD_INFO == BUILD_INFO
    assert _ext.LOADED and _ext.ERROR is None
    assert _ext.WITH_CUDA == BUILD_INFO["with_cuda"]
    assert "cpu" in cnnops.available_backends()


# ---------------------------------------------------------------------------
# (d) nvcc compiles the CUDA sources

# Headers that torch's CUDA headers include but that a CPU wheel (c10's generated
# cuda_cmake_macros.h, ATen's CUDAConfig.h) or a minimal CUDA toolkit (the cuBLAS / cuSPARSE /
# cuSOLVER headers) may lack. They only declare what torch's headers name, and are searched
# last (-idirafter), after torch's and the toolkit's own include directories, so real headers
# win wherever they exist.
_STUB_HEADERS = {
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
    "ATen/cuda/CUDAConfig.h": "".join("#define %s() 0\n" % m for m in (
        "AT_CUDNN_ENABLED", "AT_CUSPARSELT_ENABLED", "AT_HIPSPARSELT_ENABLED",
        "AT_ROCM_ENABLED", "AT_MAGMA_ENABLED")) + '#define NVCC_FLAGS_EXTRA ""\n',
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                   "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0, "
                         "CUSOLVER_STATUS_INVALID_VALUE = 3 } cusolverStatus_t;\n",
    "cusolverDn.h": "#include <cusolver_common.h>\n"
                    "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
}

# Every CUDA translation unit: the kernels (.cu) that setup.py compiles only in a CUDA build.
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")


def _nvcc_command(source, obj, stub_dir):
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [os.path.join(ROOT, "csrc", "include")]
    # The flags setup.py's CUDAExtension gets from torch.utils.cpp_extension. No -gencode: nvcc's
    # default architecture (sm_75 for CUDA 12/13), enough for every intrinsic the kernels use.
    return ([NVCC, "-c", source, "-o", obj, "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
             "-Xcompiler", "-idirafter," + stub_dir,
             "-DTORCH_EXTENSION_NAME=_C", "-DCNNOPS_WITH_CUDA=1",
             "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI)]
            + cpp_extension.COMMON_NVCC_FLAGS
            + ["-I" + d for d in includes])


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compiles every CUDA source once, in parallel (one job per core: each file spends most of
    its ~1 min in nvcc's front ends parsing torch's headers). -> {source: (returncode, stderr,
    seconds, object size)}"""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    work = tmp_path_factory.mktemp("nvcc")
    stub_dir = work / "stub_include"
    for rel, text in _STUB_HEADERS.items():
        path = stub_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n" + text)

    def compile_one(source):
        obj = work / (os.path.basename(source) + ".o")
        start = time.monotonic()
        r = subprocess.run(_nvcc_command(source, str(obj), str(stub_dir)), capture_output=True,
                           text=True, timeout=900)
        size = obj.stat().st_size if obj.exists() else 0
        return r.returncode, r.stderr, time.monotonic() - start, size

    from concurrent.futures import ThreadPoolExecutor

    jobs = max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))
    start = time.monotonic()
    with ThreadPoolExecutor(jobs) as pool:
        results = dict(zip(CUDA_SOURCES, pool.map(compile_one, CUDA_SOURCES)))
    print("nvcc: %d sources in %.1f s with %d jobs (%s)" % (
        len(results), time.monotonic() - start, jobs,
        ", ".join("%s %.0f s" % (os.path.basename(s), r[2]) for s, r in results.items())))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("source", CUDA_SOURCES or [None],
                         ids=lambda s: os.path.basename(s) if s else "no-cuda-sources")
def test_cuda_source_compiles(nvcc_results, source):
    if source is None:
        pytest.skip("no CUDA sources (csrc/cuda/*.cu) to compile")
    returncode, stderr, _seconds, size = nvcc_results[source]
    assert returncode == 0, stderr[-5000:]
    assert size > 0
    # The project's own code compiles without warnings (nvcc's or the host compiler's; warnings
    # inside torch's headers are not ours to fix).
    ours = [line for line in stderr.splitlines()
            if "warning" in line.lower() and "csrc" + os.sep in line]
    assert not ours, "\n".join(ours)


def test_every_cuda_op_is_registered_in_the_sources():
    """Each op of the library has a CUDA kernel: csrc/cuda registers every schema of
    csrc/cnnops.cpp but the CPU-only inference ops conv_bn_relu_inference and
    conv_bn_relu_into_residual (cnnops.nn._inference_op calls them, on the cpu backend only);
    csrc/autocast.cpp (built with or without CUDA)
    registers the convolutions' autocast kernels, for CUDA and for the CPU (checked on the
    text, so it runs without nvcc or a GPU)."""
    schemas = set(re.findall(r'm\.def\("(\w+)\(', open(os.path.join(ROOT, "csrc",
                                                                   "cnnops.cpp")).read()))
    registered = {}
    for source in CUDA_SOURCES + [os.path.join(ROOT, "csrc", "autocast.cpp")]:
        text = open(source).read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(cnnops, (\w+), m\) \{(.*?)\n\}", text,
                                re.S):
            names = set(re.findall(r'm\.impl\("(\w+)"', block[1]))
            registered.setdefault(block[0], set()).update(names)
    assert len(schemas) == 22
    convolutions = {"conv2d", "conv2d_relu", "conv_bn_relu"}
    assert registered == {"CUDA": schemas - {"conv_bn_relu_inference",
                                             "conv_bn_relu_into_residual"},
                          "AutocastCUDA": convolutions,
                          "AutocastCPU": convolutions}


# The per-op files that hold GPU entries (tests/conftest.py: per_device).
GPU_TEST_FILES = ["tests/test_conv2d.py", "tests/test_batch_norm.py", "tests/test_conv_bn_relu.py",
                  "tests/test_pooling.py", "tests/test_add_relu.py", "tests/test_opcheck.py",
                  "tests/test_compile.py"]


def test_gpu_cases_are_marked_cuda_and_skip_cleanly_without_cuda():
    """`pytest -m cuda tests/` (bench/gpu_check.sh) must run exactly the GPU cases. In a dry run
    (CNNOPS_GPU_TESTS_ON_CPU=1: the GPU entries of the `backend` fixture replaced by
    `gpu-grid-on-cpu`) every case of that entry is marked `cuda` and none is left unmarked;
    without it, on a CPU-only machine, the GPU-only tests collect as skipped cases (none fails
    or errors)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU cases run for real")
    collect = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"]
    dry = ["env", "CNNOPS_GPU_TESTS_ON_CPU=1"]
    marked = _run(dry + collect + ["-m", "cuda"] + GPU_TEST_FILES)
    unmarked = _run(dry + collect + ["-m", "not cuda"] + GPU_TEST_FILES)
    assert marked.returncode == unmarked.returncode == 0, (marked.stdout + unmarked.stdout)[-3000:]
    assert len([line for line in marked.stdout.splitlines() if "[gpu-grid-on-cpu" in line]) \
        >= 1000, marked.stdout[-3000:]
    assert not [line for line in unmarked.stdout.splitlines() if "gpu-grid-on-cpu" in line]
    r = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "-m", "cuda"]
             + GPU_TEST_FILES)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(r"^\d+ skipped(, \d+ deselected)? in ", summary), summary
    assert int(summary.split()[0]) >= 15, summary
