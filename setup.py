"""Builds cnnops._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

CUDA sources (csrc/cuda/*.cu) are compiled when torch
is a CUDA build and nvcc is found, whether or not a GPU is visible (without one, the
architectures torch was built for are targeted unless TORCH_CUDA_ARCH_LIST says otherwise);
otherwise the build is CPU-only and says so. CNNOPS_FORCE_CUDA=1 makes CUDA mandatory: the
build stops with a message saying what is missing instead of falling back to CPU-only.

What was built, and against which torch, is written to cnnops/_build_info.py;
cnnops/_ext.py compares it with the running torch before loading the extension.
"""
import glob
import os
import subprocess
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
        # The CUDA kernels link against torch's CUDA libraries (libc10_cuda, libtorch_cuda),
        # which a CPU build of torch does not ship: forcing cannot work there.
        if torch.version.cuda is None:
            sys.exit(
                "\ncnnops: CNNOPS_FORCE_CUDA=1, but torch %s is a CPU build: the CUDA kernels\n"
                "link against torch's CUDA libraries, which it does not have. Either install a\n"
                "CUDA build of torch (https://pytorch.org/get-started/locally/) and rebuild, or\n"
                "unset CNNOPS_FORCE_CUDA for a CPU-only build. (To only check that the CUDA\n"
                "sources compile, run `python -m pytest tests/test_build.py -k cuda_source`.)\n"
                % torch.__version__
            )
        if not nvcc:
            sys.exit(
                "\ncnnops: CNNOPS_FORCE_CUDA=1, but nvcc was not found (torch looked in %s).\n"
                "Install the CUDA toolkit %s and set CUDA_HOME to it, or unset\n"
                "CNNOPS_FORCE_CUDA for a CPU-only build.\n"
                % (cpp_extension.CUDA_HOME or "PATH and /usr/local/cuda", torch.version.cuda)
            )
        return True, "CNNOPS_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch %s is a CPU build" % torch.__version__
    if not nvcc:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, "torch is a CUDA %s build and nvcc was found" % torch.version.cuda


def _set_default_arch_list():
    """Without a visible GPU (and without TORCH_CUDA_ARCH_LIST), torch.utils.cpp_extension has
    no architecture to compile for; use the ones this torch was built for that nvcc supports."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return
    try:
        built = torch._C._cuda_getArchFlags().split()
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        supported = set(subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                                       check=True).stdout.split())
    except Exception:  # an unusual torch or toolkit: leave the choice to cpp_extension
        return
    archs = []
    for flag in built:  # e.g. sm_80, sm_90a, sm_120
        digits = "".join(ch for ch in flag.split("_")[-1] if ch.isdigit())
        if flag.startswith("sm_") and digits and "compute_" + digits in supported:
            arch = "%d.%d" % (int(digits) // 10, int(digits) % 10)
            if arch not in archs:
                archs.append(arch)
    if archs:
        archs.sort(key=lambda a: tuple(int(x) for x in a.split(".")))
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs) + "+PTX"
        print("cnnops: no GPU visible; compiling for TORCH_CUDA_ARCH_LIST=%s (set it to choose)"
              % os.environ["TORCH_CUDA_ARCH_LIST"])


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    cpp = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
              + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cu = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    want_cuda, why = _want_cuda()
    with_cuda = want_cuda and bool(cu)
    if with_cuda:
        print("cnnops: building C++ CPU and CUDA kernels (%s)" % why)
        _set_default_arch_list()
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


# Symbols that only libstdc++ itself defines. An extension that defines them carries its own
# static copy of libstdc++ (e.g. linked with -static-libstdc++) beside the shared one that torch
# loads. The two copies' locale state disagrees: streaming an integer into a TORCH_CHECK message
# then truncates the message or, with a newer g++, segfaults (as on a GPU machine, where every
# bad-argument error that named a number killed the process).
_LIBSTDCXX_OWN_SYMBOLS = ("_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev")

# Run in a child process on the freshly linked library: a bad argument must come back as a
# Python exception whose message has its numbers in it.
_ERROR_PATH_PROBE = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.cnnops.conv2d(torch.zeros(1, 4, 3, 3), torch.zeros(6, 4, 1, 1), None, [1, 1],
                            [0, 0], [1, 1], 3)
except ValueError as e:
    print(str(e).splitlines()[0])
"""
_PROBE_EXPECTED = "in_channels (4) must be divisible by groups (3)"


def _link_flags(compiler):
    """Where the link line comes from, for the error message."""
    import sysconfig

    return "linker: %s; LDSHARED=%r; LDFLAGS=%r" % (
        " ".join(getattr(compiler, "linker_so", []) or []), sysconfig.get_config_var("LDSHARED"),
        os.environ.get("LDFLAGS"))


def _check_built_extension(path, compiler):
    """Stops the build when the linked library would crash or mangle its own error messages."""
    problems = []
    if sys.platform.startswith("linux"):
        try:
            symbols = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True,
                                     text=True, check=True).stdout.split()
            needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True,
                                    check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            print("cnnops: could not inspect %s (%s); relying on the run-time check" % (path, e))
        else:
            own = [s for s in _LIBSTDCXX_OWN_SYMBOLS if s in symbols]
            if own or "libstdc++.so" not in needed:
                problems.append(
                    "it carries a static copy of libstdc++ (%s) instead of loading libstdc++.so "
                    "as torch does; remove -static-libstdc++ (or the equivalent) from the link "
                    "flags (%s)" % (", ".join(own) or "no libstdc++.so among its NEEDED entries",
                                    _link_flags(compiler)))
    probe = subprocess.run([sys.executable, "-c", _ERROR_PATH_PROBE, path], capture_output=True,
                           text=True)
    if probe.returncode != 0 or probe.stdout.strip() != _PROBE_EXPECTED:
        problems.append(
            "a bad-argument check did not raise its message cleanly: expected %r, got exit "
            "status %d, output %r%s" % (_PROBE_EXPECTED, probe.returncode, probe.stdout.strip(),
                                        (", stderr " + probe.stderr.strip()[-600:])
                                        if probe.stderr.strip() else ""))
    if problems:
        os.remove(path)  # a broken library must not be installed or loaded later
        sys.exit("\ncnnops: the built extension %s is unusable:\n  - %s\n"
                 "Fix the toolchain (a g++ whose libstdc++ is the one torch runs with, no static "
                 "libstdc++) and build again.\n" % (path, "\n  - ".join(problems)))
    print("cnnops: checked %s: libstdc++ is shared and error messages raise cleanly" % path)


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        # -static-libstdc++ can only break a torch extension (see _LIBSTDCXX_OWN_SYMBOLS).
        linker = getattr(self.compiler, "linker_so", None)
        if linker and "-static-libstdc++" in linker:
            print("cnnops: dropping -static-libstdc++ from the link line (%s)"
                  % _link_flags(self.compiler))
            self.compiler.linker_so = [a for a in linker if a != "-static-libstdc++"]
        super().build_extension(ext)
        _check_built_extension(self.get_ext_fullpath(ext.name), self.compiler)


if __name__ == "__main__":  # (tests import this file for _check_built_extension)
    ext, with_cuda = _extension()
    _write_build_info(with_cuda)
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
