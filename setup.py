"""Builds cnnops._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

CUDA sources (csrc/cuda/*.cu) are compiled when torch is a CUDA build and nvcc is
found, or when CNNOPS_FORCE_CUDA=1 (a machine with nvcc but no GPU, e.g. CI compile
checks); otherwise the build is CPU-only and says so.

What was built, and against which torch, is written to cnnops/_build_info.py;
cnnops/_ext.py compares it with the running torch before loading the extension.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # an isolated build (plain `pip install .`) has no torch
    sys.exit(
        "\ncnnops: torch is not importable in this build environment.\n"
        "cnnops compiles C++ against the torch it will run with, so it must be built\n"
        "without build isolation, after torch is installed:\n\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    force = os.environ.get("CNNOPS_FORCE_CUDA", "") == "1"
    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if force:
        return True, "CNNOPS_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch %s is a CPU build" % torch.__version__
    if not nvcc:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, "torch is a CUDA %s build and nvcc was found" % torch.version.cuda


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    cpp = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
              + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cu = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    want_cuda, why = _want_cuda()
    with_cuda = want_cuda and bool(cu)
    if with_cuda:
        print("cnnops: building C++ CPU and CUDA kernels (%s)" % why)
    elif want_cuda:
        print("cnnops: building C++ CPU kernels only (no CUDA sources in csrc/cuda)")
    else:
        print("cnnops: building C++ CPU kernels only (%s)" % why)

    cxx = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks
    if sys.platform != "win32":
        cxx += ["-fopenmp"]
    args = dict(
        name="cnnops._C",
        sources=cpp + (cu if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        # Stable names for the op registry; no Python bindings are needed.
        py_limited_api=False,
    )
    if with_cuda:
        args["define_macros"] = [("CNNOPS_WITH_CUDA", "1")]
        return cpp_extension.CUDAExtension(**args), with_cuda
    return cpp_extension.CppExtension(**args), with_cuda


def _write_build_info(with_cuda):
    info = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }
    path = os.path.join(ROOT, "cnnops", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py: what cnnops._C was built with.\n")
        f.write("BUILD_INFO = %r\n" % (info,))


ext, with_cuda = _extension()
_write_build_info(with_cuda)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
