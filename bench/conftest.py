"""pytest options and fixtures of the cnnops benchmark suite.

    pytest bench/ --benchmark-only                       quick: ResNet-18/50 layer sets, batch
                                                         8, small models, few rounds
    pytest bench/ --benchmark-only --full                every net's layers, bigger models, more
                                                         rounds, torch.compile everywhere (long)
    pytest bench/ --benchmark-only --benchmark-json=out.json && python bench/report.py out.json

Options (besides pytest-benchmark's --benchmark-*):
    --full                  the full suite
    --bench-backends LIST   cnnops backends to time: 'default' (the native ones that run here;
                            --full adds 'reference'), 'all', or a list such as cpu,reference
    --bench-compile MODE    torch.compile rows: auto (quick: conv_bn_relu eval and model
                            inference only; --full: everywhere), all, none
    --bench-nets LIST       layer sets for the per-op groups (resnet18, resnet50, densenet121,
                            googlenet); quick default resnet18,resnet50, --full all
    --bench-models LIST     only these models (resnet_classifier, resnet50, densenet121, googlenet)
    --bench-batch N         batch of the per-op groups (default 8)
    --bench-devices LIST    cpu and/or cuda (default: cpu, and cuda when available)
    --bench-rounds N        timed rounds per implementation (default: as many as fit a small
                            time budget, between a floor and a cap; see benchlib.Settings)
    --bench-dtype DTYPE     float32 (default), float16 or bfloat16: inputs and weights cast to
                            it (BatchNorm parameters and statistics stay float32)
    --bench-channels-last   inputs, gradients and models in torch.channels_last
    --bench-amp             models keep float32 weights and input and run forward (and the
                            loss) under torch.autocast(device, --bench-dtype); per-op groups
                            still run cast to the dtype
    --bench-model-batch N   batch of every model case (default: each case's own)
    --bench-model-size N    input size of every model case (default: each case's own)
    --bench-cudnn-benchmark torch.backends.cudnn.benchmark = True for the run (eager and
                            torch.compile pick cuDNN's fastest algorithm per shape)

The cpu backend takes float32/float64 only: with a half dtype its rows (and cnnops.fuse
rows, which would fall back to the reference backend) are skipped with the reason. In the
convolution groups it has three rows: its convolution core on auto ("cnnops cpu") and
forced to each core ("cnnops cpu (im2col)", "cnnops cpu (onednn)").

Benchmarks are parametrized by (device, case, impl); each test sets ``benchmark.group`` to
"<op> <mode> | <shape> | b<batch> <device> <dtype> <layout>" (dtype "amp-float16" for models
under autocast) so that one group is one comparison.
"""

import os
import sys

# Benchmark the cnnops of this checkout (its extension built in place), not whichever cnnops
# an editable or regular install elsewhere would give `import cnnops`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "cnnops")) and "cnnops" not in sys.modules:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

import cnnops  # noqa: E402
import benchlib  # noqa: E402

if not cnnops._ext.LOADED and os.environ.get("CNNOPS_BENCH_ALLOW_NO_EXT") != "1":
    raise pytest.UsageError(
        "cnnops._C is not loaded (%s): the benchmarks would time the reference backend only. "
        "Build it with `pip install --no-build-isolation -e .` (or set "
        "CNNOPS_BENCH_ALLOW_NO_EXT=1)." % cnnops._ext.ERROR)

_SETTINGS = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("cnnops benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="cnnops bench: the full suite (all nets' layers, bigger models, more "
                         "rounds, torch.compile everywhere); default is the quick suite")
    group.addoption("--bench-backends", default="default",
                    help="cnnops bench: backends to time: default, all, or a comma list")
    group.addoption("--bench-compile", default="auto", choices=["auto", "all", "none"],
                    help="cnnops bench: which groups get a torch.compile row")
    group.addoption("--bench-nets", default=None,
                    help="cnnops bench: layer sets, comma list of %s" % ", ".join(benchlib.NETS))
    group.addoption("--bench-models", default=None, help="cnnops bench: models, comma list")
    group.addoption("--bench-batch", type=int, default=8, help="cnnops bench: per-op batch")
    group.addoption("--bench-devices", default=None, help="cnnops bench: cpu and/or cuda")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="cnnops bench: timed rounds per implementation")
    group.addoption("--bench-dtype", default="float32", choices=list(benchlib.DTYPES),
                    help="cnnops bench: dtype of inputs and weights (BatchNorm stays float32)")
    group.addoption("--bench-channels-last", action="store_true", default=False,
                    help="cnnops bench: inputs and models in torch.channels_last")
    group.addoption("--bench-amp", action="store_true", default=False,
                    help="cnnops bench: models under torch.autocast(device, --bench-dtype) "
                         "with float32 weights instead of cast to the dtype")
    group.addoption("--bench-model-batch", type=int, default=None,
                    help="cnnops bench: batch of every model case")
    group.addoption("--bench-model-size", type=int, default=None,
                    help="cnnops bench: input size (pixels) of every model case")
    group.addoption("--bench-cudnn-benchmark", action="store_true", default=False,
                    help="cnnops bench: torch.backends.cudnn.benchmark = True")


def pytest_configure(config):
    try:
        settings = benchlib.Settings(
            full=config.getoption("--full"), backends=config.getoption("--bench-backends"),
            compile=config.getoption("--bench-compile"), nets=config.getoption("--bench-nets"),
            models=config.getoption("--bench-models"), batch=config.getoption("--bench-batch"),
            devices_=config.getoption("--bench-devices"), rounds=config.getoption("--bench-rounds"),
            dtype=config.getoption("--bench-dtype"),
            channels_last=config.getoption("--bench-channels-last"),
            amp=config.getoption("--bench-amp"),
            model_batch=config.getoption("--bench-model-batch"),
            model_size=config.getoption("--bench-model-size"),
            cudnn_benchmark=config.getoption("--bench-cudnn-benchmark"))
    except ValueError as e:
        raise pytest.UsageError(str(e))
    config.stash[_SETTINGS] = settings
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    # torch.compile's import of torch.jit warns on every compile; nothing to act on here
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.addinivalue_line("markers", "cnnops_bench_empty: placeholder of a benchmark that "
                            "this mode does not run (deselected)")


def settings_of(config):
    return config.stash[_SETTINGS]


def pytest_generate_tests(metafunc):
    """Parametrizes "device, case, impl" from the test function's ``bench_cases(settings)``."""
    make = getattr(metafunc.function, "bench_cases", None)
    if make is None:
        return
    rows = list(make(settings_of(metafunc.config)))
    if not rows:  # e.g. an op timed in --full only: one placeholder, deselected below
        metafunc.parametrize("device,case,impl", [pytest.param(None, None, None, marks=pytest.mark
                                                               .cnnops_bench_empty)],
                             ids=["not-in-this-mode"])
        return
    metafunc.parametrize("device,case,impl", [r[1:] for r in rows], ids=[r[0] for r in rows])


def pytest_collection_modifyitems(config, items):
    """Drops the placeholders of benchmarks this mode does not run (see pytest_generate_tests)."""
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("cnnops_bench_empty") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def bench(request):
    """The run's benchlib.Settings (rounds, batch, backends, the sgemm rate per device)."""
    return settings_of(request.config)


@pytest.fixture(autouse=True)
def _default_threads():
    """Every benchmark runs with the machine's default torch threads (none may change them)."""
    threads = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == threads, "a benchmark changed torch's thread count"


def pytest_report_header(config):
    s = settings_of(config)
    info = s.start_info
    load = info.get("loadavg", [0])[0]
    lines = []
    if load >= 0.75 * (info["cpu_count"] or 1):
        lines.append("cnnops bench: WARNING: load average %.2f on %s cores before the run: the "
                     "machine is busy, timings and ratios will be noisy"
                     % (load, info["cpu_count"]))
    compile_rows = ("everywhere" if s.compile_for("any") else
                    "conv_bn_relu eval and model inference only"
                    if s.compile_for("conv_bn_relu eval") else "off")
    lines.append("cnnops bench: %s mode; devices %s; cnnops backends %s; torch.compile %s; "
                 "layer sets %s; per-op batch %d"
                 % ("full" if s.full else "quick", ",".join(s.devices),
                    ",".join(s.backends) or "none", compile_rows, ",".join(s.nets), s.batch))
    lines.append("cnnops bench: per-op groups %s; models %s%s%s"
                 % (s.variant.label, s.model_variant.label,
                    " (autocast, float32 weights)" if s.model_variant.amp else "",
                    "; model cases at%s%s" % (
                        " batch %d" % s.model_batch if s.model_batch else "",
                        " size %d" % s.model_size if s.model_size else "")
                    if s.model_batch or s.model_size else ""))
    if "cuda" in s.devices:
        lines.append("cnnops bench: %s; cudnn.benchmark %s; cuDNN TF32 %s"
                     % (info.get("gpu", "?"), torch.backends.cudnn.benchmark,
                        torch.backends.cudnn.allow_tf32))
    lines += ["cnnops bench: " + note for note in s.notes]
    lines.append("cnnops bench: %s, %s cores, torch %s with %d threads"
                 % (info["cpu_model"], info["cpu_count"], info["torch"], info["torch_threads"]))
    lines.append("cnnops bench: timing cnnops from %s" % info["cnnops_path"])
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    s = settings_of(config)
    end = benchlib.machine_info()
    machine_info["cnnops_bench"] = dict(
        end, loadavg_start=s.start_info.get("loadavg"), loadavg_end=end.get("loadavg"),
        mode="full" if s.full else "quick", devices=s.devices,
        backends=s.backends, batch=s.batch, nets=s.nets,
        sgemm_gflops={d: round(v, 2) for d, v in s._sgemm.items()},
        copy_gbps={d: round(v, 2) for d, v in s._copy.items()},
        dtype=benchlib.dtype_name(s.variant.dtype), layout=s.variant.layout,
        amp=s.model_variant.amp, gemm_dtype=benchlib.dtype_name(s.variant.dtype),
        model_batch=s.model_batch, model_size=s.model_size,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The targets and geo-means, computed from this run (same code as bench/report.py)."""
    s = settings_of(config)
    if not s.results:
        return
    import report
    rows = [report.Row.from_result(group, impl, median, info)
            for group, impl, median, info in s.results]
    terminalreporter.section("cnnops benchmark summary (speed-up vs torch eager, >1 is faster)")
    for line in report.summary_lines(rows, {d: v for d, v in s._sgemm.items()}):
        terminalreporter.write_line(line)
