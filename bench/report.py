"""Turns a pytest-benchmark JSON of the cnnops suite into a markdown report and a PNG chart.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json [--out-dir bench/results] [--name cpu]
    python bench/report.py ops.json models.json --name h100     # several runs, one report

writes <out-dir>/<name>.md (machine, targets, overview tables of speed-ups vs torch eager,
models, activation memory, then one table per benchmark group) and <out-dir>/<name>.png
(speed-up bars per group). <name> defaults to the (first) JSON file's stem.

Rows carry their precision and layout (extra_info dtype, layout, amp; rows of older JSONs
without them are float32 NCHW): sections and their headings are split by it, the headings
say it when it is not float32 NCHW. The CPU targets count float32 NCHW rows only (the
per-layer ones at batch 8 over the ResNet-18 and ResNet-50 layer sets; those against
torch.compile only its rows compiled with freezing); the GPU targets (shown when there are
cuda rows) float16 channels_last ones at batch 32 over the ResNet-50 layer set, and the
ResNet-50 training step under autocast float16.

Speed-up = torch eager's median / the implementation's median (--stat min: minima), within
one group (same op, shape, inputs and device, measured in the same run): > 1 means faster.
On the CPU the eager time is that of eager rounds alternated with the implementation's own
(benchlib.time_it's baseline), so a slow spell of a shared machine hits both alike; CUDA
rows use the group's separately timed eager row. cnnops.fuse's CPU inference rows are also
timed in alternation with torch.compile (freezing), and the model target against it is judged
on that side-by-side ratio (so is the lean memory rows' time target, against cnnops.fuse's
calls alternated with them); without it (older JSONs) a model target against torch.compile
takes the ratio through each row's paired eager rounds and the ratio of the two medians, and
is met only when both are (_by_medians says why).
GFLOP/s count convolution (and Linear) FLOPs only; sgemm fraction = GFLOP/s / this
machine's float32 sgemm rate measured in the same session.
"""
import argparse
import json
import math
import os
import re
import sys

EAGER = "torch eager"
COMPILE = "torch.compile"
FUSE = "cnnops.fuse"
FUSE_LEAN = "cnnops.fuse (lean)"
CPU = "cnnops cpu"  # the cpu backend, convolution core on auto
CPU_CORES = ["cnnops cpu (im2col)", "cnnops cpu (onednn)",  # benchlib.cpu_core_impl
             "cnnops cpu (winograd)"]
IMPL_ORDER = ["torch eager", "torch.compile", "cnnops cpu", "cnnops cpu (im2col)",
              "cnnops cpu (onednn)", "cnnops cpu (winograd)", "cnnops cuda", "cnnops triton", "cnnops reference",
              "cnnops.fuse", "cnnops.fuse (lean)", "torch eager + checkpoint",
              "cnnops cpu + torch.compile", "cnnops cuda + torch.compile",
              "cnnops triton + torch.compile"]
# the extra_info name (paired_<name>_median) of an implementation timed in alternation
# with a row's rounds (benchlib.paired)
_PAIRED_NAME = {EAGER: "eager", COMPILE: "compile", FUSE: "fuse"}
DEFAULT_VARIANT = ("float32", "nchw", False)
# The CPU targets are judged on float32 NCHW rows, or, in a run with none (the
# --bench-channels-last one), on float32 channels_last rows against eager in channels_last.
CHANNELS_LAST_VARIANT = ("float32", "channels_last", False)

# CPU targets (float32 NCHW). Per layer: the "cnnops cpu" rows (core auto) over the
# ResNet-18 and ResNet-50 layer sets at batch 8, against a baseline row of the same group;
# the geo-mean must reach the goal and, where a floor is given, every layer the floor.
# (op, mode, baseline, goal, floor or None, what)
LAYER_TARGETS = [
    ("conv_bn_relu", "eval", EAGER, 1.20, 1.00,
     "FusedConvBNReLU inference vs Conv2d -> BatchNorm2d -> ReLU"),
    ("conv_bn_relu", "train", EAGER, 1.10, 0.95,
     "FusedConvBNReLU training forward+backward vs eager"),
    ("conv_bn_relu", "eval", COMPILE, 1.00, None,
     "FusedConvBNReLU inference vs torch.compile (freezing) of Conv2d -> BatchNorm2d -> ReLU"),
]
TARGET_NETS = ("resnet18", "resnet50")  # benchlib.QUICK_NETS
TARGET_LAYER_COUNT = 29  # len(benchlib.conv_layers(benchlib.QUICK_NETS))
# cnnops.fuse(model) on the CPU against the eager twin or torch.compile (freezing) of it, at
# each model case measured (quick: benchlib.QUICK_MODELS): (model, mode, baseline, goal)
MODEL_TARGETS = [("resnet50", "eval", EAGER, 1.20), ("densenet121", "eval", EAGER, 1.20),
                 ("resnet_classifier", "eval", EAGER, 1.20),
                 ("resnet50", "eval", COMPILE, 1.00),
                 ("resnet50", "train", EAGER, 1.10), ("densenet121", "train", EAGER, 1.10),
                 ("resnet_classifier", "train", EAGER, 1.10)]

# GPU targets: float16 channels_last, batch 32, over the ResNet-50 layer set (geo-mean of the
# speed-ups vs torch eager, i.e. cuDNN), and the ResNet-50 training step under autocast.
# (op, mode, implementations, kernel size or None, goal, what)
GPU_LAYER_TARGETS = [
    ("conv_bn_relu", "eval", ("cnnops cuda", "cnnops triton"), None, 1.20,
     "FusedConvBNReLU inference vs cuDNN Conv2d -> BatchNorm2d -> ReLU"),
    ("conv_bn_relu", "train", ("cnnops cuda", "cnnops triton"), None, 1.00,
     "FusedConvBNReLU training forward+backward vs eager"),
    ("conv2d", "eval", ("cnnops triton",), 3, 0.80, "Triton conv2d vs cuDNN, 3x3 layers"),
    ("conv2d", "eval", ("cnnops triton",), 1, 0.80, "Triton conv2d vs cuDNN, 1x1 layers"),
    ("conv_bn_relu", "train-fwd", ("cnnops triton",), None, 1.10,
     "Triton FusedConvBNReLU training forward (batch statistics, no backward) vs eager"),
]
GPU_BATCH, GPU_DTYPE, GPU_LAYOUT = 32, "float16", "channels_last"
# benchlib.layer_set("resnet50"): 23 unique convolutions, 7 of them 3x3, 15 1x1 (and the stem)
RESNET50_LAYER_COUNT = {None: 23, 3: 7, 1: 15}
GPU_MODEL_TARGETS = [("resnet50", "train", "cnnops.fuse", 1.00)]  # under autocast float16


class Row:
    """One benchmark: its group, implementation, median seconds and extra_info."""

    def __init__(self, group, impl, median, info, stats=None, stat="median"):
        self.group, self.impl, self.median, self.info = group, impl, median, info
        self.stats = stats or {}
        # torch eager timed in alternation with this row's rounds (benchlib.time_it), in the
        # same statistic; None for eager rows, CUDA rows and older JSONs.
        self.stat = stat
        self.paired_eager = self.paired(EAGER)
        self.speedup = None  # filled by link()

    @classmethod
    def from_result(cls, group, impl, median, info):
        return cls(group, impl, median, info)

    @classmethod
    def from_json(cls, bench, stat="median"):
        info = bench.get("extra_info", {})
        return cls(bench["group"], info.get("impl", bench["name"]), bench["stats"][stat],
                   info, bench["stats"], stat)

    def paired(self, impl):
        """``impl``'s time (in the report's statistic) from its calls alternated with this
        row's rounds (benchlib.paired): torch eager's beside every CPU row but eager's,
        torch.compile's (freezing) beside cnnops.fuse's CPU inference rows, cnnops.fuse's
        beside the lean memory rows. None where there were none."""
        if impl == COMPILE and not self.info.get("paired_compile_freezing"):
            return None
        name = _PAIRED_NAME.get(impl)
        return self.info.get("paired_%s_%s" % (name, self.stat)) if name else None

    op = property(lambda self: self.info.get("op"))
    mode = property(lambda self: self.info.get("mode"))
    device = property(lambda self: self.info.get("device"))

    @property
    def variant(self):
        """(dtype, layout, amp); float32 NCHW for rows of runs that did not record them."""
        return (self.info.get("dtype", "float32"), self.info.get("layout", "nchw"),
                bool(self.info.get("amp", False)))

    @property
    def kernel(self):
        """The kernel size of a convolution row, from its shape label ("... k3 s1 -> 64")."""
        m = re.search(r"\bk(\d+)\b", self.info.get("shape", ""))
        return int(m.group(1)) if m else None

    @property
    def gflops(self):
        flops = self.info.get("flops")
        return flops / self.median / 1e9 if flops and self.median else None

    @property
    def sgemm_fraction(self):
        rate = self.info.get("sgemm_gflops")
        return self.gflops / rate if self.gflops and rate else None

    @property
    def gbytes(self):
        nbytes = self.info.get("bytes")
        return nbytes / self.median / 1e9 if nbytes and self.median else None

    @property
    def copy_fraction(self):
        """GB/s as a share of the machine's copy rate measured in the same run."""
        rate = self.info.get("copy_gbps")
        return self.gbytes / rate if self.gbytes and rate else None

    def gbytes_text(self):
        """'GB/s (share of the copy rate)', e.g. '812.4 (19%)'."""
        if self.gbytes is None:
            return "–"
        share = self.copy_fraction
        return "%.1f%s" % (self.gbytes, " (%.0f%%)" % (100 * share) if share else "")


def link(rows):
    """Sets each row's speed-up against torch eager: the eager rounds timed in alternation
    with the row's own when it has them, else its group's separately timed eager row."""
    eager = {r.group: r.median for r in rows if r.impl == EAGER}
    for r in rows:
        base = r.paired_eager or eager.get(r.group)
        r.speedup = base / r.median if base and r.median else None
    return rows


def impl_key(impl):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(value, spec, none="–"):
    return none if value is None else format(value, spec)


def _by_group(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    return groups


def variant_label(variant):
    """"float16 channels_last", "amp-float16 nchw"; "" for float32 NCHW."""
    dtype, layout, amp = variant
    if variant == DEFAULT_VARIANT:
        return ""
    return "%s%s %s" % ("amp-" if amp else "", dtype, layout)


def _sections(rows):
    """Groups gathered by (kind, mode, device, batch, variant): op tables and model tables,
    in run order."""
    sections = {}
    for r in rows:
        kind = "model" if r.op == "model" else r.op
        sections.setdefault((kind, r.mode, r.device, r.info.get("batch") if kind != "model"
                             else None, r.variant), []).append(r)
    return sections


# ---------------------------------------------------------------------------
# targets

def _against(row, baseline, by_group):
    """row's speed-up over its group's ``baseline`` implementation: vs torch eager its own
    speed-up; vs another implementation the ratio of the two speed-ups vs eager (on the CPU
    each from the eager rounds alternated with that row, so a slow spell of the machine
    during one of them does not enter the ratio). None where either is missing."""
    if baseline == EAGER:
        return row.speedup
    other = by_group.get(row.group, {}).get(baseline)
    if row.speedup and other and other.speedup:
        return row.speedup / other.speedup
    return None


def _baseline_name(baseline):
    return "torch.compile (freezing)" if baseline == COMPILE else baseline


def _target_variant(rows):
    """The variant the CPU targets are judged on (see CHANNELS_LAST_VARIANT)."""
    cpu = {r.variant for r in rows if r.device == "cpu"}
    return CHANNELS_LAST_VARIANT if DEFAULT_VARIANT not in cpu and CHANNELS_LAST_VARIANT in cpu \
        else DEFAULT_VARIANT


def _in_variant(what, variant):
    return what if variant == DEFAULT_VARIANT else "%s (%s)" % (what, variant_label(variant))


def fusion_ceiling(rows, variant=DEFAULT_VARIANT):
    """(geo-mean, layer count) of eager's conv2d alone over eager's Conv2d -> BatchNorm2d ->
    ReLU, per ResNet-18/50 layer at batch 8, each from the same run: the most a fused
    inference block can gain over eager while its convolution runs at eager's (oneDNN's)
    speed and BN and ReLU cost nothing. None where the run has no such pairs."""
    eager = {}
    for r in rows:
        if (r.impl == EAGER and r.mode == "eval" and r.op in ("conv2d", "conv_bn_relu")
                and r.device == "cpu" and r.info.get("batch") == 8 and r.variant == variant
                and set(r.info.get("sets", [])) & set(TARGET_NETS)):
            eager[(r.op, r.info.get("shape"))] = r.median
    ratios = [eager[("conv_bn_relu", shape)] / conv for (op, shape), conv in eager.items()
              if op == "conv2d" and ("conv_bn_relu", shape) in eager]
    return (geomean(ratios), len(ratios)) if ratios else None


def _layer_target(rows, by_group, op, mode, baseline, goal, floor, what,
                  variant=DEFAULT_VARIANT):
    """(what, measured text, goal text, status) of one per-layer CPU target."""
    what = _in_variant(what, variant)
    goal_text = ">= %.2fx%s" % (goal, ", every layer >= %.2fx" % floor if floor else "")
    group_rows = [r for r in rows if r.op == op and r.mode == mode and r.device == "cpu"
                  and r.info.get("batch") == 8 and r.variant == variant
                  and set(r.info.get("sets", [])) & set(TARGET_NETS)]
    compiles = [r for r in group_rows if r.impl == COMPILE]
    if baseline == COMPILE and compiles and not any(r.info.get("freezing") for r in compiles):
        return what, "not measured (torch.compile rows compiled without freezing)", goal_text, "–"
    ratios = {}  # impl -> [(ratio, row)]
    for r in group_rows:
        ratio = _against(r, baseline, by_group)
        if ratio:
            ratios.setdefault(r.impl, []).append((ratio, r))
    sel = ratios.get(CPU, [])
    g = geomean([v for v, _ in sel])
    if g is None:
        return what, "not measured", goal_text, "–"
    worst, worst_row = min(sel, key=lambda p: p[0])
    forced = ["%s %.2fx" % (impl[len(CPU):].strip(" ()"), geomean([v for v, _ in ratios[impl]]))
              for impl in CPU_CORES if impl in ratios]
    misses = []
    if g < goal:
        misses.append("geo-mean below %.2fx" % goal)
    below = sum(1 for v, _ in sel if floor and v < floor)
    if below:
        misses.append("%d layer%s below %.2fx" % (below, "s" if below > 1 else "", floor))
    status = "NOT met (%s)" % "; ".join(misses) if misses else "met"
    if len(sel) < TARGET_LAYER_COUNT:
        status += " (incomplete run)"
    ceiling = fusion_ceiling(rows, variant) if (op, mode, baseline) == (
        "conv_bn_relu", "eval", EAGER) else None
    return ("%s (cnnops cpu, core auto; geo-mean over %d of the %d ResNet-18/50 layers, batch 8)"
            % (what, len(sel), TARGET_LAYER_COUNT),
            "%.2fx (min %.2fx at %s, max %.2fx%s%s)" % (
                g, worst, worst_row.info.get("shape"), max(v for v, _ in sel),
                "; core forced: " + ", ".join(forced) if forced else "",
                "; ceiling at eager's convolution speed %.2fx over %d layers" % ceiling
                if ceiling else ""),
            goal_text, status)


def _model_targets(rows, by_group, model, mode, baseline, goal, variant=DEFAULT_VARIANT):
    """[(what, measured text, goal text, status)] of one model CPU target, one per case."""
    goal_text = ">= %.2fx" % goal
    what = _in_variant("cnnops.fuse(%s) %s vs %s" % (
        model, "inference" if mode == "eval" else "training step", _baseline_name(baseline)),
        variant)
    sel = [r for r in rows if r.op == "model" and r.info.get("model") == model
           and r.mode == mode and r.device == "cpu" and r.variant == variant]
    fused = [r for r in sel if r.impl == FUSE and r.speedup]
    if not sel:
        return [(what, "not measured in this run", goal_text, "–")]
    if not fused:
        return [(what, "not measured (no cnnops.fuse row: not available?)", goal_text, "–")]
    out = []
    for r in fused:
        label = "%s, b%s %s" % (what, r.info.get("batch"), r.info.get("shape"))
        base = by_group[r.group].get(baseline)
        if baseline == COMPILE and not (base and base.info.get("freezing")):
            out.append((label, "not measured (no torch.compile row%s)" % (
                " with freezing" if base else ""), goal_text, "–"))
            continue
        ratio = _against(r, baseline, by_group)
        builtin = by_group[r.group].get(CPU)
        builtin_ratio = _against(builtin, baseline, by_group) if builtin else None
        note = (" (cnnops.models.%s: %.2fx)" % (model, builtin_ratio)) if builtin_ratio else ""
        if ratio is None:
            out.append((label, "not measured%s" % note, goal_text, "–"))
            continue
        if baseline == COMPILE and r.paired(COMPILE) and r.median:
            side = r.paired(COMPILE) / r.median
            direct = _by_medians(r, base)
            out.append((label, "%.2fx side by side (through eager %.2fx, by medians %s)%s" % (
                side, ratio, _fmt(direct, ".2f") + ("x" if direct else ""), note),
                goal_text, "met" if side >= goal else "NOT met"))
            continue
        direct = _by_medians(r, base) if baseline != EAGER else None
        if direct is None:
            out.append((label, "%.2fx%s" % (ratio, note), goal_text,
                        "met" if ratio >= goal else "NOT met"))
        else:
            out.append((label, "%.2fx through eager, %.2fx by medians%s" % (ratio, direct, note),
                        goal_text, "met" if min(ratio, direct) >= goal else "NOT met"))
    return out


def _by_medians(row, base):
    """row's speed-up over ``base`` from the two medians alone, where both are CPU model rows
    paired with eager. A model's eager time depends on what ran just before it (glibc maps
    an activation-sized block fresh or reuses one, page faults or none: ResNet-50's eager
    inference measured 135 ms alternated with cnnops.fuse and 151 ms alternated with
    torch.compile in one run), so the ratio through eager can move by more than the machine
    drifts between two groups: a model target against another implementation is met only
    when both ratios meet it."""
    if not (row.paired_eager and base.paired_eager and row.median and base.median):
        return None
    return base.median / row.median


# The memory group (test_model_memory, CPU, batch 8, 128x128), per model: activation bytes
# saved for backward by cnnops.fuse(model, memory="lean") and by cnnops.fuse(model) against
# eager (at most the goal), and the lean step's time against cnnops.fuse's (at most the goal).
MEMORY_TARGET_MODELS = ("resnet18", "resnet50")
MEMORY_TARGETS = [(FUSE_LEAN, EAGER, "bytes", 0.60), (FUSE, EAGER, "bytes", 1.00),
                  (FUSE_LEAN, FUSE, "time", 1.25)]


def _memory_targets(rows, model, variant=DEFAULT_VARIANT):
    """[(what, measured text, goal text, status)] of the memory targets of one model."""
    sel = {r.impl: r for r in rows if r.op == "model" and r.mode == "memory" and r.device == "cpu"
           and r.info.get("model") == model and r.variant == variant}
    out = []
    for impl, base, kind, goal in MEMORY_TARGETS:
        a, b = sel.get(impl), sel.get(base)
        how = ""
        label = _in_variant("%s training step: %s, %s vs %s" % (
            model, "activation bytes saved for backward" if kind == "bytes" else "time",
            impl, base), variant)
        if kind == "bytes":
            ratio = (a.info["saved_bytes"] / b.info["saved_bytes"]
                     if a and b and a.info.get("saved_bytes") and b.info.get("saved_bytes")
                     else None)
        elif a and a.paired(base):  # a's rounds alternated with base's
            ratio, how = a.median / a.paired(base), " side by side"
        else:  # from the speed-ups over the eager rounds alternated with each row
            ratio = b.speedup / a.speedup if a and b and a.speedup and b.speedup else None
        if ratio is None:
            out.append((label, "not measured in this run", "<= %.2fx" % goal, "–"))
            continue
        out.append((label + " (b%s %s)" % (a.info.get("batch"), a.info.get("shape")),
                    "%.2fx%s" % (ratio, how), "<= %.2fx" % goal,
                    "met" if ratio <= goal else "NOT met"))
    return out


def target_results(rows):
    """[(what, measured text, goal text, status)] for the CPU targets."""
    by_group = {}
    for r in rows:
        by_group.setdefault(r.group, {})[r.impl] = r
    variant = _target_variant(rows)
    out = [_layer_target(rows, by_group, *target, variant=variant) for target in LAYER_TARGETS]
    for target in MODEL_TARGETS:
        out += _model_targets(rows, by_group, *target, variant=variant)
    for model in MEMORY_TARGET_MODELS:
        out += _memory_targets(rows, model, variant)
    return out


def _gpu_layer_rows(rows, op, mode, impl, kernel):
    return [r for r in rows if r.op == op and r.mode == mode and r.device == "cuda"
            and r.impl == impl and r.speedup and r.info.get("batch") == GPU_BATCH
            and r.variant == (GPU_DTYPE, GPU_LAYOUT, False)
            and "resnet50" in r.info.get("sets", []) and (kernel is None or r.kernel == kernel)]


def gpu_target_results(rows):
    """[(what, measured text, goal text, status)] for the GPU targets."""
    out = []
    for op, mode, impls, kernel, goal, what in GPU_LAYER_TARGETS:
        expected = RESNET50_LAYER_COUNT[kernel]
        want = ">= %.2fx" % goal
        for impl in impls:
            sel = _gpu_layer_rows(rows, op, mode, impl, kernel)
            label = "%s: %s (%s %s, batch %d, ResNet-50 layers)" % (
                impl, what, GPU_DTYPE, GPU_LAYOUT, GPU_BATCH)
            g = geomean([r.speedup for r in sel])
            if g is None:
                out.append((label, "not measured", want, "–"))
                continue
            worst = min(sel, key=lambda r: r.speedup)
            out.append(("%s, geo-mean over %d of %d" % (label, len(sel), expected),
                        "%.2fx (range %.2fx at %s .. %.2fx)" % (
                            g, worst.speedup, worst.info.get("shape"),
                            max(r.speedup for r in sel)),
                        want, ("met" if g >= goal else "NOT met")
                        + ("" if len(sel) >= expected else " (incomplete run)")))
    for model, mode, impl, goal in GPU_MODEL_TARGETS:
        what = "%s(%s) training step under autocast %s vs eager under the same autocast" % (
            impl, model, GPU_DTYPE)
        want = ">= %.2fx" % goal
        sel = [r for r in rows if r.op == "model" and r.info.get("model") == model
               and r.mode == mode and r.device == "cuda" and r.variant[0] == GPU_DTYPE
               and r.variant[2]]
        found = [r for r in sel if r.impl == impl and r.speedup]
        if not found:
            out.append((what, "not measured%s" % (" (no %s row)" % impl if sel else ""),
                        want, "–"))
            continue
        for r in found:
            builtin = [b for b in sel if b.group == r.group and b.impl == "cnnops cuda"
                       and b.speedup]
            note = (" (cnnops.models.%s on cuda: %.2fx)" % (model, builtin[0].speedup)
                    if builtin else "")
            out.append(("%s, batch %s, %s, %s" % (what, r.info.get("batch"), r.info.get("shape"),
                                                  r.variant[1]),
                        "%.2fx%s" % (r.speedup, note), want,
                        "met" if r.speedup >= goal else "NOT met"))
    return out


def _has_cuda(rows):
    return any(r.device == "cuda" for r in rows)


def _shows_cpu_targets(rows):
    return any(r.device == "cpu" for r in rows) or not _has_cuda(rows)


def summary_lines(rows, sgemm=None):
    """Plain-text summary for the terminal: targets, then geo-mean speed-ups per op."""
    link(rows)
    lines = []
    if sgemm:
        lines.append("sgemm: " + ", ".join("%s %.1f GFLOP/s" % (d, v) for d, v in sgemm.items()))
    targets = target_results(rows) if _shows_cpu_targets(rows) else []
    if _has_cuda(rows):
        targets += gpu_target_results(rows)
    for what, measured, goal, status in targets:
        lines.append("target  %-95s %s (goal %s) %s" % (what, measured, goal, status))
    lines.append("geo-mean speed-up vs torch eager per op (groups):")
    for (kind, mode, device, batch, variant), sec in _sections(rows).items():
        impls = sorted({r.impl for r in sec if r.impl != EAGER}, key=impl_key)
        parts = []
        for impl in impls:
            vals = [r.speedup for r in sec if r.impl == impl]
            g = geomean(vals)
            parts.append("%s %s (%d)" % (impl, _fmt(g, ".2f") + "x", len([v for v in vals if v])))
        name = " ".join(p for p in (kind, mode, device, variant_label(variant)) if p)
        lines.append("  %-30s %s" % (name, "; ".join(parts)))
    return lines


# ---------------------------------------------------------------------------
# markdown

def _suffix(variant):
    label = variant_label(variant)
    return ", " + label if label else ""


def _suite_text(cb):
    text = "%s mode; per-op batch %s; layer sets %s" % (
        cb.get("mode", "?"), cb.get("batch", "?"), ", ".join(cb.get("nets", [])))
    if "dtype" in cb:  # runs that record precision and layout
        op = (cb["dtype"], cb.get("layout", "nchw"), False)
        model = (cb["dtype"], cb.get("layout", "nchw"), bool(cb.get("amp")))
        text += "; per-op groups %s; models %s%s" % (
            variant_label(op) or "float32 nchw", variant_label(model) or "float32 nchw",
            " (torch.autocast, float32 weights)" if model[2] else "")
        if cb.get("model_batch") or cb.get("model_size"):
            text += "; model cases at%s%s" % (
                " batch %s" % cb["model_batch"] if cb.get("model_batch") else "",
                " size %s" % cb["model_size"] if cb.get("model_size") else "")
        if cb.get("gpu"):
            text += "; cudnn.benchmark %s, cuDNN TF32 %s" % (
                "on" if cb.get("cudnn_benchmark") else "off",
                "on" if cb.get("cudnn_allow_tf32") else "off")
    return text


def _machine_lines(data):
    mi = data.get("machine_info", {})
    cb = mi.get("cnnops_bench", {})
    date = data.get("datetime", "")
    lines = ["- Date: %s" % date.replace("T", " ")[:19] if date else "- Date: unknown",
             "- Machine: %s, %s cores; torch %s, %s threads (oneDNN %s, MKL %s)%s" % (
                 cb.get("cpu_model", mi.get("processor", "?")), cb.get("cpu_count", "?"),
                 cb.get("torch", "?"), cb.get("torch_threads", "?"),
                 "yes" if cb.get("mkldnn") else "no", "yes" if cb.get("mkl") else "no",
                 ("; GPU %s (cuDNN %s%s)" % (cb["gpu"], cb.get("cudnn"), "".join(
                     ", %s %s" % (k, cb[v]) for k, v in (("CUDA", "cuda"), ("Triton", "triton"))
                     if cb.get(v)))) if cb.get("gpu") else ""),
             "- cnnops %s; backends available: %s; timed: %s" % (
                 cb.get("cnnops", "?"), ", ".join(cb.get("cnnops_backends", [])),
                 ", ".join(cb.get("backends", []))),
             "- Suite: %s" % _suite_text(cb),
             "- %s (%s torch.mm, best of 7): %s" % (
                 "sgemm" if cb.get("gemm_dtype", "float32") == "float32" else "GEMM rate",
                 cb.get("gemm_dtype", "float32"),
                 ", ".join("%s %.1f GFLOP/s" % (d, v) for d, v in cb.get("sgemm_gflops",
                                                                           {}).items()) or "?"),
             "- Copy rate (tensor copy, read + write, best of 7; the memory-bound ops' GB/s are "
             "shown with their share of it): %s" % (
                 ", ".join("%s %.1f GB/s" % (d, v) for d, v in cb.get("copy_gbps", {}).items())
                 or "not measured")]
    start, end = cb.get("loadavg_start"), cb.get("loadavg_end")
    if start:
        cores = cb.get("cpu_count") or 1
        busy = max(start[0], (end or [0])[0] - cores) >= 0.75 * cores
        lines.append("- Load average (1/5/15 min) before the run: %s; after: %s%s" % (
            "/".join("%.2f" % v for v in start), "/".join("%.2f" % v for v in end or []),
            " -- **the machine was busy: timings are noisy, do not quote these ratios**"
            if busy else ""))
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append("- Commit: %s%s" % (commit["id"][:12], " (dirty)" if commit.get("dirty")
                                         else ""))
    return lines


def _op_overview(sec, conv, model=False):
    """One table: rows = groups of this op/mode/device, columns = implementations side by side."""
    groups = _by_group(sec)
    impls = sorted({r.impl for r in sec}, key=impl_key)
    head = ["model", "input"] if model else ["shape", "nets"]
    for impl in impls:
        head.append("%s ms" % impl)
        if impl != EAGER:
            head.append("%s speed-up" % impl)
        head.append("%s %s" % (impl, "sgemm" if conv else "GB/s"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, members in groups.items():
        by_impl = {r.impl: r for r in members}
        info = members[0].info
        if model:
            cells = [info.get("model", group), "b%s %s" % (info.get("batch"), info.get("shape"))]
        else:
            cells = [info.get("shape", group), ", ".join(info.get("sets", []))]
        for impl in impls:
            r = by_impl.get(impl)
            cells.append(_fmt(r.median * 1e3 if r else None, ".2f"))
            if impl != EAGER:
                cells.append((_fmt(r.speedup, ".2f") + "x") if r and r.speedup else "–")
            if conv:
                cells.append((_fmt(r.sgemm_fraction * 100, ".0f") + "%")
                             if r and r.sgemm_fraction else "–")
            else:
                cells.append(r.gbytes_text() if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**geo-mean**", ""]
    for impl in impls:
        cells.append("")
        if impl != EAGER:
            g = geomean([r.speedup for r in sec if r.impl == impl])
            cells.append(("**%.2fx**" % g) if g else "–")
        if conv:
            g = geomean([r.sgemm_fraction for r in sec if r.impl == impl])
            cells.append(("%.0f%%" % (g * 100)) if g else "–")
        else:
            cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def _memory_table(rows):
    train = [r for r in rows if r.op == "model" and r.mode in ("train", "memory")
             and ("saved_bytes" in r.info or "memory_error" in r.info)]
    if not train:
        return []
    eager = {r.group: r.info for r in train if r.impl == EAGER}
    lines = ["| model | input | device | implementation | saved for backward MB | vs eager | "
             "saved incl. params MB | peak allocated MB | vs eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    mb = lambda v: None if v is None else v / 2 ** 20  # noqa: E731
    for r in sorted(train, key=lambda r: (r.group, impl_key(r.impl))):
        base = eager.get(r.group, {})
        device = " ".join(p for p in (r.device, variant_label(r.variant)) if p)
        if "memory_error" in r.info:
            lines.append("| %s | b%s %s | %s | %s | n/a (%s) | | | | |" % (
                r.info.get("model"), r.info.get("batch"), r.info.get("shape"), device, r.impl,
                r.info["memory_error"][:60].replace("|", "/")))
            continue
        saved, peak = r.info.get("saved_bytes"), r.info.get("peak_bytes")
        rel = lambda v, b: (_fmt(v / b, ".2f") + "x") if v is not None and b else "–"  # noqa
        lines.append("| %s | b%s %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.info.get("model"), r.info.get("batch"), r.info.get("shape"), device, r.impl,
            _fmt(mb(saved), ".1f"), rel(saved, base.get("saved_bytes")),
            _fmt(mb(r.info.get("saved_bytes_with_params")), ".1f"), _fmt(mb(peak), ".1f"),
            rel(peak, base.get("peak_bytes"))))
    return lines


def _group_table(members):
    lines = ["| implementation | ms | IQR ms | rounds | alternated eager ms | speed-up vs eager "
             "| GFLOP/s | sgemm fraction | GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    members = sorted(members, key=lambda r: impl_key(r.impl))
    for r in members:
        lines.append("| %s | %.3f | %s | %s | %s | %s | %s | %s | %s |" % (
            r.impl + (" (freezing)" if r.info.get("freezing") else ""), r.median * 1e3,
            _fmt(r.stats.get("iqr", 0) * 1e3 if r.stats else None, ".3f"),
            r.stats.get("rounds", "–") if r.stats else "–",
            _fmt(r.paired_eager * 1e3 if r.paired_eager else None, ".3f"),
            (_fmt(r.speedup, ".2f") + "x") if r.speedup else "–", _fmt(r.gflops, ".1f"),
            (_fmt(r.sgemm_fraction * 100, ".1f") + "%") if r.sgemm_fraction else "–",
            r.gbytes_text()))
    notes = [_auto_note(r) for r in members if r.info.get("cpu_conv_auto")]
    return lines + ([""] + notes if notes else [])


def _auto_note(row):
    """What the cpu backend's auto core chose in a row (benchlib.running: the configurations
    first seen there); per call when there are a few, else counted per core."""
    choices = row.info["cpu_conv_auto"]
    if len(choices) <= 4:
        return "%s, auto core: %s." % (row.impl, "; ".join(
            "%s: **%s** (%s)" % (c["call"], c["core"], c["reason"]) for c in choices))
    cores = {}
    for c in choices:
        cores[c["core"]] = cores.get(c["core"], 0) + 1
    return "%s, auto core: %s of the %d convolution configurations first seen here." % (
        row.impl, ", ".join("**%s** %d" % kv for kv in sorted(cores.items())), len(choices))


def markdown(data, rows, chart_name=None, stat="median", others=()):
    """others: [(file name, data)] of further JSONs merged into this report."""
    link(rows)
    out = ["# cnnops benchmark results", ""]
    out += _machine_lines(data)
    for name, other in others:
        cb = other.get("machine_info", {}).get("cnnops_bench", {})
        out.append("- Also from %s (%s): %s" % (
            name, other.get("datetime", "unknown date").replace("T", " ")[:19],
            _suite_text(cb)))
    gemm = sorted({r.info.get("gemm_dtype", "float32") for r in rows if r.info.get("flops")})
    out += ["",
            "Speed-up = torch eager %s / implementation %s within one group (same op, "
            "shape, inputs, device, one run; on the CPU the eager rounds alternate with the "
            "implementation's); > 1 is faster than eager. "
            "torch eager is PyTorch's "
            "native kernels (oneDNN/MKL on CPU, cuDNN on GPU) in unfused torch.nn modules. "
            "GFLOP/s count convolution and Linear FLOPs only (2 x MACs; training: forward + "
            "input and weight gradients); sgemm = fraction of this machine's measured %s "
            "GEMM rate. Times (ms) are the %ss of the timed rounds; every implementation's output "
            "is checked against eager's." % (stat, stat, "/".join(gemm) or "float32", stat)
            + (" On the CPU, torch.compile rows of inference groups are compiled with inductor's "
               "freezing (weights and BatchNorm statistics folded in as constants)."
               " cnnops.fuse's inference rows also alternate their rounds with torch.compile's,"
               " and a model target against torch.compile is judged on that side-by-side ratio"
               " (the ratio through each row's paired eager rounds and that of the two medians"
               " are shown beside it: rows timed a minute apart differ by more than the machine"
               " lets two implementations be told apart)."
               if any(r.info.get("freezing") for r in rows) else "")
            + (" `cnnops cpu` runs the cpu backend with its convolution core on auto (each core "
               "that runs the call timed on a configuration's first call, in the correctness "
               "check, the fastest kept); `cnnops cpu (im2col)` / `(onednn)` / `(winograd)` "
               "force one core (winograd runs the 3x3 stride-1 and stride-2 layers: their forward, "
               "and in training at stride 1 the input gradient; forced, the rest runs on im2col)."
               if any(r.impl in CPU_CORES for r in rows) else ""), ""]
    if chart_name:
        out += ["![speed-up vs torch eager](%s)" % chart_name, ""]
    if _shows_cpu_targets(rows):
        out += ["## Targets (CPU)", "", "| target | measured | goal | status |",
                "|---|---|---|---|"]
        for what, measured, goal, status in target_results(rows):
            out.append("| %s | %s | %s | %s |" % (what, measured, goal, status))
        out.append("")
    if _has_cuda(rows):
        out += ["## Targets (GPU)", "",
                "Per-op targets: %s %s at batch %d over the ResNet-50 layer set (geo-mean of the "
                "speed-ups vs torch eager, one row per cnnops backend); the ResNet-50 training "
                "step under torch.autocast(%s)." % (GPU_DTYPE, GPU_LAYOUT, GPU_BATCH, GPU_DTYPE),
                "", "| target | measured | goal | status |", "|---|---|---|---|"]
        for what, measured, goal, status in gpu_target_results(rows):
            out.append("| %s | %s | %s | %s |" % (what, measured, goal, status))
        out.append("")
    sections = _sections(rows)
    op_secs = [(k, v) for k, v in sections.items() if k[0] != "model"]
    model_secs = [(k, v) for k, v in sections.items() if k[0] == "model"]
    if op_secs:
        out += ["## Ops", ""]
        for (op, mode, device, batch, variant), sec in op_secs:
            conv = any(r.info.get("flops") for r in sec)
            out += ["### %s %s (%s, batch %s%s)" % (op, mode, device, batch,
                                                    _suffix(variant)), ""]
            out += _op_overview(sec, conv) + [""]
    if model_secs:
        out += ["## Models", ""]
        for (kind, mode, device, _, variant), sec in model_secs:
            out += ["### %s (%s%s)" % ("inference" if mode == "eval" else "training step",
                                       device, _suffix(variant)), ""]
            out += _op_overview(sec, True, model=True) + [""]
    mem = _memory_table(rows)
    if mem:
        out += ["## Activation memory of a training step", "",
                "Saved for backward: unique storages packed by "
                "torch.autograd.graph.saved_tensors_hooks during one forward + backward, "
                "parameters and buffers excluded (\"incl. params\" counts them too). Peak "
                "allocated: the allocator's high-water mark during the step above what was "
                "allocated before it (GPU: torch.cuda.max_memory_allocated; CPU: the profiler's "
                "CPU allocation events).", ""] + mem + [""]
    out += ["## All groups", ""]
    for group, members in _by_group(rows).items():
        out += ["### %s" % group, ""] + _group_table(members) + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# chart

def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    link(rows)
    sections = [(k, v) for k, v in _sections(rows).items()
                if any(r.speedup and r.impl != EAGER for r in v)]
    if not sections:
        return False
    heights = [max(1.5, 0.22 * len(_by_group(v)) * max(1, len({r.impl for r in v}) - 1) + 0.8)
               for _, v in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(9, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((kind, mode, device, batch, variant), sec) in zip(axes[:, 0], sections):
        groups = _by_group(sec)
        impls = sorted({r.impl for r in sec if r.impl != EAGER}, key=impl_key)
        width = 0.8 / max(1, len(impls))
        labels = []
        extreme = 0.0
        for gi, (group, members) in enumerate(groups.items()):
            by_impl = {r.impl: r for r in members}
            first = members[0]
            labels.append(first.info.get("model", "") + " " + first.info.get("shape", "")
                          if kind == "model" else first.info.get("shape", group))
            for ii, impl in enumerate(impls):
                r = by_impl.get(impl)
                if r is None or not r.speedup:
                    continue
                color = colors.setdefault(impl, palette[len(colors) % len(palette)])
                # bars grow from 1x on a log axis: left of the line is slower than eager
                ax.barh(gi + (ii - (len(impls) - 1) / 2) * width, r.speedup - 1.0, left=1.0,
                        height=width, color=color, label=impl)
                extreme = max(extreme, abs(math.log2(r.speedup)))
        ax.set_xscale("log", base=2)
        limit = 2 ** max(0.5, extreme * 1.08)
        ax.set_xlim(1 / limit, limit)
        ticks = [t for t in (1 / 8, 1 / 4, 1 / 2, 2 / 3, 0.8, 1, 1.25, 1.5, 2, 4, 8)
                 if 1 / limit <= t <= limit]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: "%.2gx" % v))
        ax.axvline(1.0, color="black", linewidth=0.8)
        goals = set()
        if device == "cpu" and variant == DEFAULT_VARIANT:  # the bars are vs eager
            goals |= {goal for op, tmode, base, goal, _, _ in LAYER_TARGETS
                      if kind == op and mode == tmode and base == EAGER}
            goals |= {goal for _, tmode, base, goal in MODEL_TARGETS
                      if kind == "model" and mode == tmode and base == EAGER}
        if device == "cuda" and variant == (GPU_DTYPE, GPU_LAYOUT, False) and batch == GPU_BATCH:
            goals |= {goal for op, tmode, _, _, goal, _ in GPU_LAYER_TARGETS
                      if kind == op and mode == tmode}
        if device == "cuda" and kind == "model" and variant[0] == GPU_DTYPE and variant[2]:
            goals |= {goal for _, tmode, _, goal in GPU_MODEL_TARGETS if mode == tmode}
        for goal in sorted(goals):
            ax.axvline(goal, color="red", linestyle="--", linewidth=0.8,
                       label="target %.2fx" % goal)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title("%s %s (%s%s%s): speed-up vs torch eager" % (
            "models" if kind == "model" else kind, mode, device,
            ", batch %s" % batch if batch else "", _suffix(variant)), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json=FILE); "
                        "several are merged into one report (machine details from the first)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(
        __file__)), "results"))
    parser.add_argument("--name", default=None, help="output file stem (default: the JSON's)")
    parser.add_argument("--stat", default="median", choices=["median", "min", "mean"],
                        help="the statistic of the timed rounds compared (default median; min "
                             "is more robust on a machine shared with other work)")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    datas = []
    for path in args.json:
        with open(path) as f:
            datas.append(json.load(f))
    data = datas[0]
    rows = [Row.from_json(b, args.stat) for d in datas for b in d.get("benchmarks", [])]
    if not rows:
        print("no benchmarks in %s" % ", ".join(args.json), file=sys.stderr)
        return 1
    groups = [r.group for r in rows]
    twice = sorted({g for g in groups if groups.count(g) > len({
        r.impl for r in rows if r.group == g})})
    if twice:
        print("warning: groups measured in more than one of the files (their rows are mixed): "
              "%s" % ", ".join(twice[:5]), file=sys.stderr)
    name = args.name or os.path.splitext(os.path.basename(args.json[0]))[0]
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, name + ".png")
    has_chart = False
    if not args.no_chart:
        try:
            has_chart = chart(rows, png)
        except ImportError as e:
            print("no chart (%s)" % e, file=sys.stderr)
    md = markdown(data, rows, os.path.basename(png) if has_chart else None, args.stat,
                  [(os.path.basename(p), d) for p, d in zip(args.json[1:], datas[1:])])
    md_path = os.path.join(args.out_dir, name + ".md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    print("wrote %s%s" % (md_path, (" and " + png) if has_chart else ""))
    for line in summary_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
