"""Loads the compiled extension cnnops._C, if it was built for the running torch.

setup.py records what it built in cnnops/_build_info.py. Loading a library built
against another torch fails with undefined symbols or, worse, misbehaves, so the
versions are compared first; on any mismatch or load failure the extension is
disabled with one warning that says what to run, and the `auto` backend falls
back to the pure-PyTorch reference implementation.
"""
import importlib
import warnings

import torch

LOADED = False    # cnnops._C is loaded and its ops are registered
WITH_CUDA = False  # ... and it includes the CUDA kernels
BUILD_INFO = {}   # what setup.py recorded
ERROR = None      # why the extension is not loaded

_REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _load():
    global LOADED, WITH_CUDA, BUILD_INFO, ERROR
    try:
        from cnnops._build_info import BUILD_INFO as info
    except ImportError:
        ERROR = ("the C++ extension cnnops._C was not built; build it with "
                 "`pip install --no-build-isolation .` (or `-e .` in a checkout)")
        return
    BUILD_INFO = dict(info)
    if info["torch_version"] != torch.__version__:
        ERROR = ("cnnops._C was built against torch %s but torch %s is running; "
                 "rebuild it with `%s`" % (info["torch_version"], torch.__version__, _REBUILD))
        return
    try:
        importlib.import_module("cnnops._C")
    except (ImportError, OSError) as e:
        ERROR = "cnnops._C failed to load (%s); rebuild it with `%s`" % (e, _REBUILD)
        return
    LOADED = True
    WITH_CUDA = bool(info.get("with_cuda"))


_load()
if ERROR is not None:
    warnings.warn("cnnops: C++ kernels disabled: %s. The `cpu` and `cuda` backends are "
                  "unavailable; `auto` uses the reference backend." % ERROR,
                  RuntimeWarning, stacklevel=2)
