"""bench/report.py's arithmetic on synthetic rows (the benchmark suite itself runs under
pytest bench/ --benchmark-only)."""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import report  # noqa: E402


def _row(op, impl, shape, median, sets=("resnet18",), batch=8):
    info = dict(op=op, mode="eval", device="cpu", impl=impl, shape=shape, batch=batch,
                sets=list(sets))
    return report.Row("%s eval | %s" % (op, shape), impl, median, info)


def test_fusion_ceiling_is_eager_block_over_eager_conv():
    rows = [
        _row("conv2d", report.EAGER, "64x56x56 k3 s1 -> 64", 4.0),
        _row("conv_bn_relu", report.EAGER, "64x56x56 k3 s1 -> 64", 5.0),
        _row("conv2d", report.EAGER, "64x56x56 k1 s2 -> 128", 1.0),
        _row("conv_bn_relu", report.EAGER, "64x56x56 k1 s2 -> 128", 1.5),
        # not counted: a layer without its eager conv2d row, another batch, another net
        _row("conv_bn_relu", report.EAGER, "3x224x224 k7 s2 -> 64", 9.0),
        _row("conv2d", report.EAGER, "128x28x28 k3 s1 -> 128", 1.0, batch=32),
        _row("conv_bn_relu", report.EAGER, "128x28x28 k3 s1 -> 128", 3.0, batch=32),
        _row("conv2d", report.EAGER, "1x1 k1 s1 -> 1", 1.0, sets=("densenet121",)),
        _row("conv_bn_relu", report.EAGER, "1x1 k1 s1 -> 1", 3.0, sets=("densenet121",)),
        _row("conv_bn_relu", report.CPU, "64x56x56 k3 s1 -> 64", 1.0),
    ]
    ceiling, layers = report.fusion_ceiling(rows)
    assert layers == 2
    assert math.isclose(ceiling, math.sqrt(1.25 * 1.5))
    assert report.fusion_ceiling(rows[4:]) is None


def _model_row(impl, median, paired_eager, **extra):
    info = dict(op="model", mode="eval", device="cpu", impl=impl, model="resnet50", batch=8,
                shape="3x128x128", paired_eager_median=paired_eager, **extra)
    return report.Row("model eval | resnet50", impl, median, info)


def test_model_target_against_compile_needs_both_ratios():
    """Against torch.compile a model target states the ratio through each row's paired eager
    rounds and the ratio of the two medians, and is met only when both are."""
    def target(fuse_ms, fuse_eager_ms):
        rows = report.link([_model_row(report.COMPILE, 100.0, 150.0, freezing=True),
                            _model_row(report.FUSE, fuse_ms, fuse_eager_ms)])
        by_group = {rows[0].group: {r.impl: r for r in rows}}
        [(what, measured, goal, status)] = report._model_targets(
            rows, by_group, "resnet50", "eval", report.COMPILE, 1.0)
        return measured, status

    # eager ran faster beside cnnops.fuse: 1.05x through eager, but 0.95x by the medians
    measured, status = target(105.0, 165.375)
    assert measured.startswith("1.05x through eager, 0.95x by medians")
    assert status == "NOT met"
    assert target(98.0, 150.0) == ("1.02x through eager, 1.02x by medians", "met")


def test_model_target_against_compile_is_side_by_side_when_paired():
    """cnnops.fuse's row timed in alternation with torch.compile: the target is judged on
    that ratio, whatever the medians of the two rows say."""
    def target(paired_compile, freezing=True):
        rows = report.link([
            _model_row(report.COMPILE, 100.0, 150.0, freezing=True),
            _model_row(report.FUSE, 105.0, 160.0, paired_compile_median=paired_compile,
                       paired_compile_freezing=freezing)])
        by_group = {rows[0].group: {r.impl: r for r in rows}}
        [(what, measured, goal, status)] = report._model_targets(
            rows, by_group, "resnet50", "eval", report.COMPILE, 1.0)
        return measured, status

    # the row medians say 0.95x; side by side, fuse was ahead
    assert target(110.25) == ("1.05x side by side (through eager 1.02x, by medians 0.95x)", "met")
    assert target(99.75)[1] == "NOT met"
    # a paired compile not compiled with freezing is not the target's baseline
    assert target(110.25, freezing=False)[0].startswith("1.02x through eager, 0.95x by medians")


def test_lean_time_target_is_side_by_side_when_paired():
    """The lean row's rounds alternated with cnnops.fuse's: its time target is the ratio of
    the two, not of the two rows' speed-ups over their own paired eager rounds."""
    def row(impl, median, paired_eager, **extra):
        info = dict(op="model", mode="memory", device="cpu", impl=impl, model="resnet18",
                    batch=8, shape="3x128x128", paired_eager_median=paired_eager, **extra)
        return report.Row("model memory | resnet18", impl, median, info)

    rows = report.link([row(report.FUSE, 100.0, 120.0),
                        row(report.FUSE_LEAN, 120.0, 110.0, paired_fuse_median=104.0)])
    time_target = [t for t in report._memory_targets(rows, "resnet18") if "time" in t[0]]
    # through eager: (120 / 100) / (110 / 120) = 1.31x; side by side 120 / 104 = 1.15x
    assert [t[1:] for t in time_target] == [("1.15x side by side", "<= 1.25x", "met")]
