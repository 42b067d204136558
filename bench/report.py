"""Turns a pytest-benchmark JSON of the cnnops suite into a markdown report and a PNG chart.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json [--out-dir bench/results] [--name cpu]

writes <out-dir>/<name>.md (machine, targets, overview tables of speed-ups vs torch eager,
models, activation memory, then one table per benchmark group) and <out-dir>/<name>.png
(speed-up bars per group). <name> defaults to the JSON file's stem.

Speed-up = torch eager's median / the implementation's median (--stat min: minima), within
one group (same op, shape, inputs and device, measured in the same run): > 1 means faster.
GFLOP/s count convolution (and Linear) FLOPs only; sgemm fraction = GFLOP/s / this
machine's float32 sgemm rate measured in the same session.
"""
import argparse
import json
import math
import os
import sys

EAGER = "torch eager"
IMPL_ORDER = ["torch eager", "torch.compile", "cnnops cpu", "cnnops cuda", "cnnops triton",
              "cnnops reference", "cnnops.fuse", "cnnops cpu + torch.compile",
              "cnnops cuda + torch.compile"]

# (op, mode, goal, what) of the CPU targets over the ResNet-18 layer set at batch 8
LAYER_TARGETS = [("conv_bn_relu", "eval", 1.10,
                  "FusedConvBNReLU inference vs Conv2d -> BatchNorm2d -> ReLU"),
                 ("conv_bn_relu", "train", 1.00,
                  "FusedConvBNReLU training forward+backward vs eager")]
RESNET18_LAYER_COUNT = 11  # benchlib.RESNET18_LAYERS
MODEL_TARGETS = [("resnet_classifier", 1.05), ("resnet50", 1.05)]  # cnnops.fuse, eval, 128, b8


class Row:
    """One benchmark: its group, implementation, median seconds and extra_info."""

    def __init__(self, group, impl, median, info, stats=None):
        self.group, self.impl, self.median, self.info = group, impl, median, info
        self.stats = stats or {}
        self.speedup = None  # filled by link()

    @classmethod
    def from_result(cls, group, impl, median, info):
        return cls(group, impl, median, info)

    @classmethod
    def from_json(cls, bench, stat="median"):
        info = bench.get("extra_info", {})
        return cls(bench["group"], info.get("impl", bench["name"]), bench["stats"][stat],
                   info, bench["stats"])

    op = property(lambda self: self.info.get("op"))
    mode = property(lambda self: self.info.get("mode"))
    device = property(lambda self: self.info.get("device"))

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


def link(rows):
    """Sets each row's speed-up against its group's torch eager row."""
    eager = {r.group: r.median for r in rows if r.impl == EAGER}
    for r in rows:
        base = eager.get(r.group)
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


def _sections(rows):
    """Groups gathered by (kind, mode, device): op tables and model tables, in run order."""
    sections = {}
    for r in rows:
        kind = "model" if r.op == "model" else r.op
        sections.setdefault((kind, r.mode, r.device, r.info.get("batch") if kind != "model"
                             else None), []).append(r)
    return sections


# ---------------------------------------------------------------------------
# targets

def target_results(rows):
    """[(what, measured text, goal, status)] for the CPU targets."""
    out = []
    for op, mode, goal, what in LAYER_TARGETS:
        sel = [r for r in rows if r.op == op and r.mode == mode and r.device == "cpu"
               and r.info.get("batch") == 8 and "resnet18" in r.info.get("sets", [])
               and r.impl == "cnnops cpu" and r.speedup]
        g = geomean([r.speedup for r in sel])
        if g is None:
            out.append((what, "not measured", goal, "–"))
            continue
        worst = min(sel, key=lambda r: r.speedup)
        complete = len(sel) >= RESNET18_LAYER_COUNT
        out.append(("%s (geo-mean over %d of the %d ResNet-18 layers, batch 8)"
                    % (what, len(sel), RESNET18_LAYER_COUNT),
                    "%.2fx (range %.2fx at %s .. %.2fx)" % (
                        g, worst.speedup, worst.info.get("shape"),
                        max(r.speedup for r in sel)),
                    goal, ("met" if g >= goal else "NOT met")
                    + ("" if complete else " (incomplete run)")))
    for model, goal in MODEL_TARGETS:
        what = "cnnops.fuse(%s) inference, 3x128x128, batch 8, vs eager" % model
        sel = [r for r in rows if r.op == "model" and r.info.get("model") == model
               and r.mode == "eval" and r.device == "cpu" and r.info.get("size") == 128
               and r.info.get("batch") == 8]
        fused = [r for r in sel if r.impl == "cnnops.fuse" and r.speedup]
        builtin = [r for r in sel if r.impl == "cnnops cpu" and r.speedup]
        note = (" (cnnops.models.%s: %.2fx)" % (model, builtin[0].speedup)) if builtin else ""
        if fused:
            out.append((what, "%.2fx%s" % (fused[0].speedup, note), goal,
                        "met" if fused[0].speedup >= goal else "NOT met"))
        elif sel:
            out.append((what, "not measured (no cnnops.fuse row: not available?)%s" % note, goal,
                        "–"))
        else:
            out.append((what, "not measured in this run", goal, "–"))
    return out


def summary_lines(rows, sgemm=None):
    """Plain-text summary for the terminal: targets, then geo-mean speed-ups per op."""
    link(rows)
    lines = []
    if sgemm:
        lines.append("sgemm: " + ", ".join("%s %.1f GFLOP/s" % (d, v) for d, v in sgemm.items()))
    for what, measured, goal, status in target_results(rows):
        lines.append("target  %-95s %s (goal >= %.2fx) %s" % (what, measured, goal, status))
    lines.append("geo-mean speed-up vs torch eager per op (groups):")
    for (kind, mode, device, batch), sec in _sections(rows).items():
        impls = sorted({r.impl for r in sec if r.impl != EAGER}, key=impl_key)
        parts = []
        for impl in impls:
            vals = [r.speedup for r in sec if r.impl == impl]
            g = geomean(vals)
            parts.append("%s %s (%d)" % (impl, _fmt(g, ".2f") + "x", len([v for v in vals if v])))
        lines.append("  %-30s %s" % ("%s %s %s" % (kind, mode, device), "; ".join(parts)))
    return lines


# ---------------------------------------------------------------------------
# markdown

def _machine_lines(data):
    mi = data.get("machine_info", {})
    cb = mi.get("cnnops_bench", {})
    date = data.get("datetime", "")
    lines = ["- Date: %s" % date.replace("T", " ")[:19] if date else "- Date: unknown",
             "- Machine: %s, %s cores; torch %s, %s threads (oneDNN %s, MKL %s)%s" % (
                 cb.get("cpu_model", mi.get("processor", "?")), cb.get("cpu_count", "?"),
                 cb.get("torch", "?"), cb.get("torch_threads", "?"),
                 "yes" if cb.get("mkldnn") else "no", "yes" if cb.get("mkl") else "no",
                 ("; GPU %s (cuDNN %s)" % (cb["gpu"], cb.get("cudnn"))) if cb.get("gpu") else ""),
             "- cnnops %s; backends available: %s; timed: %s; cnnops.fuse: %s" % (
                 cb.get("cnnops", "?"), ", ".join(cb.get("cnnops_backends", [])),
                 ", ".join(cb.get("backends", [])),
                 "available" if cb.get("cnnops_fuse") else "not available"),
             "- Suite: %s mode; per-op batch %s; layer sets %s" % (
                 cb.get("mode", "?"), cb.get("batch", "?"), ", ".join(cb.get("nets", []))),
             "- sgemm (float32 torch.mm, best of 7): %s" % (
                 ", ".join("%s %.1f GFLOP/s" % (d, v) for d, v in cb.get("sgemm_gflops",
                                                                           {}).items()) or "?")]
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
                cells.append(_fmt(r.gbytes if r else None, ".1f"))
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
    train = [r for r in rows if r.op == "model" and r.mode == "train"
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
        if "memory_error" in r.info:
            lines.append("| %s | b%s %s | %s | %s | n/a (%s) | | | | |" % (
                r.info.get("model"), r.info.get("batch"), r.info.get("shape"), r.device, r.impl,
                r.info["memory_error"][:60].replace("|", "/")))
            continue
        saved, peak = r.info.get("saved_bytes"), r.info.get("peak_bytes")
        rel = lambda v, b: (_fmt(v / b, ".2f") + "x") if v is not None and b else "–"  # noqa
        lines.append("| %s | b%s %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.info.get("model"), r.info.get("batch"), r.info.get("shape"), r.device, r.impl,
            _fmt(mb(saved), ".1f"), rel(saved, base.get("saved_bytes")),
            _fmt(mb(r.info.get("saved_bytes_with_params")), ".1f"), _fmt(mb(peak), ".1f"),
            rel(peak, base.get("peak_bytes"))))
    return lines


def _group_table(members):
    lines = ["| implementation | ms | IQR ms | rounds | speed-up vs eager | GFLOP/s | "
             "sgemm fraction | GB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(members, key=lambda r: impl_key(r.impl)):
        lines.append("| %s | %.3f | %s | %s | %s | %s | %s | %s |" % (
            r.impl, r.median * 1e3, _fmt(r.stats.get("iqr", 0) * 1e3 if r.stats else None,
                                          ".3f"),
            r.stats.get("rounds", "–") if r.stats else "–",
            (_fmt(r.speedup, ".2f") + "x") if r.speedup else "–", _fmt(r.gflops, ".1f"),
            (_fmt(r.sgemm_fraction * 100, ".1f") + "%") if r.sgemm_fraction else "–",
            _fmt(r.gbytes, ".1f")))
    return lines


def markdown(data, rows, chart_name=None, stat="median"):
    link(rows)
    out = ["# cnnops benchmark results", ""]
    out += _machine_lines(data)
    out += ["",
            "Speed-up = torch eager %s / implementation %s within one group (same op, "
            "shape, inputs, device, one run); > 1 is faster than eager. torch eager is PyTorch's "
            "native kernels (oneDNN/MKL on CPU, cuDNN on GPU) in unfused torch.nn modules. "
            "GFLOP/s count convolution and Linear FLOPs only (2 x MACs; training: forward + "
            "input and weight gradients); sgemm = fraction of this machine's measured float32 "
            "GEMM rate. Times (ms) are the %ss of the timed rounds; every implementation's output "
            "is checked against eager's." % (stat, stat, stat), ""]
    if chart_name:
        out += ["![speed-up vs torch eager](%s)" % chart_name, ""]
    out += ["## Targets (CPU)", "", "| target | measured | goal | status |", "|---|---|---|---|"]
    for what, measured, goal, status in target_results(rows):
        out.append("| %s | %s | >= %.2fx | %s |" % (what, measured, goal, status))
    out.append("")
    sections = _sections(rows)
    op_secs = [(k, v) for k, v in sections.items() if k[0] != "model"]
    model_secs = [(k, v) for k, v in sections.items() if k[0] == "model"]
    if op_secs:
        out += ["## Ops", ""]
        for (op, mode, device, batch), sec in op_secs:
            conv = any(r.info.get("flops") for r in sec)
            out += ["### %s %s (%s, batch %s)" % (op, mode, device, batch), ""]
            out += _op_overview(sec, conv) + [""]
    if model_secs:
        out += ["## Models", ""]
        for (kind, mode, device, _), sec in model_secs:
            out += ["### %s (%s)" % ("inference" if mode == "eval" else "training step", device),
                    ""]
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
    for ax, ((kind, mode, device, batch), sec) in zip(axes[:, 0], sections):
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
        for op, tmode, goal, _ in LAYER_TARGETS:
            if kind == op and mode == tmode and device == "cpu":
                ax.axvline(goal, color="red", linestyle="--", linewidth=0.8,
                           label="target %.2fx" % goal)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title("%s %s (%s%s): speed-up vs torch eager" % (
            "models" if kind == "model" else kind, mode, device,
            ", batch %s" % batch if batch else ""), fontsize=9)
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
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(
        __file__)), "results"))
    parser.add_argument("--name", default=None, help="output file stem (default: the JSON's)")
    parser.add_argument("--stat", default="median", choices=["median", "min", "mean"],
                        help="the statistic of the timed rounds compared (default median; min "
                             "is more robust on a machine shared with other work)")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    rows = [Row.from_json(b, args.stat) for b in data.get("benchmarks", [])]
    if not rows:
        print("no benchmarks in %s" % args.json, file=sys.stderr)
        return 1
    name = args.name or os.path.splitext(os.path.basename(args.json))[0]
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, name + ".png")
    has_chart = False
    if not args.no_chart:
        try:
            has_chart = chart(rows, png)
        except ImportError as e:
            print("no chart (%s)" % e, file=sys.stderr)
    md = markdown(data, rows, os.path.basename(png) if has_chart else None, args.stat)
    md_path = os.path.join(args.out_dir, name + ".md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    print("wrote %s%s" % (md_path, (" and " + png) if has_chart else ""))
    for line in summary_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
