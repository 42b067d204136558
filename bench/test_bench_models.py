"""Per-model benchmarks: inference and a training step of resnet_classifier, resnet50,
densenet121 and googlenet, and the activation memory of the training step; the memory
group (test_model_memory) adds cnnops.fuse(memory="lean") and eager with
torch.utils.checkpoint per block.

Implementations (benchlib): the plain torch.nn twin ("torch eager": the same weights in
torchvision-style unfused modules), torch.compile of the twin (quick mode: inference only;
on the CPU compiled with inductor's freezing), the cnnops model on each backend,
cnnops.fuse(twin) (when cnnops.fuse exists), and the cnnops model under torch.compile
(--full). The cpu backend's convolution core stays on auto (the choices it makes go to
extra_info["cpu_conv_auto"]). All start from the same weights (the cnnops model's, with
randomised BatchNorm statistics, loaded into the twin) and the same input batch.

Inference: model.eval(), under torch.no_grad(); the logits are checked against the
eager twin's before timing and on the last timed round.
Training step: zero_grad(set_to_none) -> forward -> cross-entropy -> backward -> SGD step,
BatchNorm in training mode. The SGD step runs with lr=0 (momentum 0.9): all its
arithmetic is done but the weights stay put, so every round computes the same loss,
which is checked against the eager twin's after timing; before timing, the loss and
three parameters' gradients are checked. Memory (extra_info, see
benchlib.training_memory): bytes saved for backward and the step's peak allocation.

Precision and layout follow the run's model Variant: cast to --bench-dtype (BatchNorm
kept float32) or, with --bench-amp, float32 weights and input with the forward and the
loss under torch.autocast(device, dtype) (backward and the SGD step outside it, no
GradScaler); --bench-channels-last puts the input and the 4-D weights in channels_last.
A cnnops row that would not run a fused kernel for that dtype on the device (the cpu
backend with half types; cnnops.fuse falling back to the reference backend) is skipped.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.models as M
import plain_models as P
from benchlib import (CHECKPOINT, COMPILE, EAGER, FUSE, FUSE_LEAN, assert_close,
                      checkpoint_blocks, compiled, finish, impl_backend, impl_cpu_conv, impl_id,
                      not_timed_reason, paired, randn, randomize_bn, running, time_it,
                      training_memory)


def cases(mode):
    def make(settings):
        for device in settings.devices:
            for case in settings.model_cases(mode):
                for impl in settings.model_impls(device, mode):
                    yield ("%s-%s-%s" % (device, case.id, impl_id(impl)), device, case, impl)

    def decorate(fn):
        fn.bench_cases = make
        return fn
    return decorate


@functools.lru_cache(maxsize=None)
def _weights(name):
    """The state_dict every implementation of model ``name`` starts from (CPU)."""
    torch.manual_seed(0)
    model = getattr(M, P.TWINS[name][1])()
    randomize_bn(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _materialize(build, name, device):
    """build() on the meta device (no initialisation work), then _weights(name) assigned in."""
    with torch.device("meta"):
        model = build()
    weights = {k: v.clone() for k, v in _weights(name).items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(device)


def _twin(name, device, variant):
    return variant.module(_materialize(P.TWINS[name][0], name, device), device)


def _cnnops_model(name, device, variant):
    return variant.module(_materialize(getattr(M, P.TWINS[name][1]), name, device), device)


def _build(name, impl, device, train, variant):
    """The module that implementation ``impl`` runs, in train or eval mode."""
    if impl in (EAGER, COMPILE):
        model = _twin(name, device, variant).train(train)
        return compiled(model) if impl == COMPILE else model
    if impl == CHECKPOINT:
        return checkpoint_blocks(_twin(name, device, variant).train(train))
    if impl in (FUSE, FUSE_LEAN):
        twin = _twin(name, device, variant).train(train)
        fused = cnnops.fuse(twin, memory="lean") if impl == FUSE_LEAN else cnnops.fuse(twin)
        return fused.train(train)
    model = _cnnops_model(name, device, variant).train(train)
    return compiled(model) if impl.endswith("+ torch.compile") else model


@functools.lru_cache(maxsize=None)
def _flops(name, batch, size, train):
    """FLOPs of the twin's forward (+ backward): torch.utils.flop_counter on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        twin = P.TWINS[name][0]().train(train)
        x = torch.empty(batch, P.TWINS[name][2], size, size)
    with FlopCounterMode(display=False) as counter:
        if train:
            out = twin(x)
            F.cross_entropy(out, torch.zeros(batch, dtype=torch.long, device="meta")).backward()
        else:
            with torch.no_grad():
                twin(x)
    return counter.get_total_flops()


def _inputs(case, device, num_classes, variant):
    x = randn((case.batch, P.TWINS[case.name][2], case.size, case.size), device, 0,
              variant=variant)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, num_classes, (case.batch,), generator=g).to(device)
    return x, y


def _describe(benchmark, bench, case, mode, impl, device):
    """Names the group and fills extra_info; skips a cnnops row that would not run a fused
    kernel for the run's dtype on this device. Returns the run's model Variant."""
    variant = bench.model_variant
    shape = "%dx%dx%d" % (P.TWINS[case.name][2], case.size, case.size)
    benchmark.group = "%s %s | %s | b%d %s %s" % (case.name, mode, shape, case.batch, device,
                                                 variant.label)
    benchmark.extra_info.update(dict(op="model", model=case.name, mode=mode, shape=shape,
                                     impl=impl, device=device, batch=case.batch, size=case.size,
                                     backend=impl_backend(impl), sets=[case.name],
                                     **variant.info()))
    benchmark.extra_info["weights_dtype"] = "float32" if variant.amp else variant.info()["dtype"]
    benchmark.extra_info["bn_dtype"] = "float32"
    reason, resolved = not_timed_reason(impl, device, variant.compute_dtype)
    if resolved:
        benchmark.extra_info["backend_resolved"] = resolved
    if reason:
        pytest.skip(reason)
    return variant


_REFERENCE = {}


def _num_classes(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def _checked_params(model):
    """Weights whose gradients are compared: the first convolution's, a middle one's and the
    classifier's (a conv bias before BatchNorm has a zero gradient: nothing to compare)."""
    names = [n.replace("_orig_mod.", "") for n, p in model.named_parameters() if p.dim() > 1]
    return [names[0], names[len(names) // 2], names[-1]]


def _probe(model, x, y, amp):
    """Forward + backward without an optimizer: (loss, {name: grad}); ``amp()`` is the
    context of forward and loss (torch.autocast or a no-op)."""
    for p in model.parameters():
        p.grad = None
    with amp():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters()}


def _instrumented_probe(model, x, y, device, amp):
    """_probe under benchlib.training_memory: ((loss, grads), memory info)."""
    try:
        return training_memory(lambda: _probe(model, x, y, amp), model, device)
    except Exception as e:  # noqa: BLE001  (e.g. hooks a compiled graph cannot take)
        return _probe(model, x, y, amp), {"memory_error": "%s: %s" % (type(e).__name__, e)}


def _paired_compile(benchmark, bench, case, impl, device, variant, x, expected, tol):
    """For cnnops.fuse's CPU inference row in a run with torch.compile rows: the call of a
    torch.compile (freezing) of the twin, compiled and checked here, that time_it alternates
    with the row's rounds (paired_compile_median in extra_info). report.py judges fuse
    against torch.compile by it: two rows' medians timed a minute apart differ by more than
    the two implementations do (ResNet-50: 149 against 134 ms in one run, 127 against 130 in
    the next). Else None."""
    if impl != FUSE or str(device) != "cpu" or COMPILE not in bench.model_impls(device, "eval"):
        return None
    with running(COMPILE, device, False):  # (compiles with freezing)
        rival = _build(case.name, COMPILE, device, False, variant)
        assert_close(rival(x), expected, "paired " + COMPILE, tol=tol)
    benchmark.extra_info["paired_compile_freezing"] = True
    return lambda: rival(x)


@cases("eval")
def test_model_eval(benchmark, bench, device, case, impl):
    v = _describe(benchmark, bench, case, "eval", impl, device)
    key = ("eval", case, device)
    tol = bench.tol("model", device, model=True)
    with running(impl, device, False, benchmark.extra_info), torch.no_grad(), v.autocast(device):
        model = _build(case.name, impl, device, False, v)
        x, _ = _inputs(case, device, _num_classes(model), v)
        out = model(x)  # the first call (for torch.compile: compiles)
        if impl == EAGER and key not in _REFERENCE:
            _REFERENCE[key] = out
        if key not in _REFERENCE:
            _REFERENCE[key] = _twin(case.name, device, v).eval()(x)
        expected = _REFERENCE[key]
        assert_close(out, expected, impl, tol=tol)
        twin = None if impl == EAGER else _twin(case.name, device, v).eval()
        rival = _paired_compile(benchmark, bench, case, impl, device, v, x, expected, tol)
        result = time_it(benchmark, bench, lambda: model(x), device, model=True,
                         baseline=paired(impl, lambda: twin(x), compile=rival))
    assert_close(result, expected, impl + " (timed)", tol=tol)
    finish(benchmark, bench, device, flops=_flops(case.name, case.batch, case.size, False))


@cases("train")
def test_model_train(benchmark, bench, device, case, impl):
    _train_step(benchmark, bench, device, case, impl, "train")


@cases("memory")
def test_model_memory(benchmark, bench, device, case, impl):
    """The memory group: a training step of resnet18, resnet50 and densenet121 (batch 8,
    128x128) in eager, cnnops.fuse, cnnops.fuse(memory="lean") and eager with
    torch.utils.checkpoint per block: bytes saved for backward, peak, time."""
    _train_step(benchmark, bench, device, case, impl, "memory")


def _sgd_step(model, x, y, amp):
    """() -> the loss: a training step of ``model`` on (x, y), ``amp()`` the context of
    forward and loss, then SGD at lr=0 (momentum 0.9: all its arithmetic, weights kept)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _train_step(benchmark, bench, device, case, impl, mode):
    v = _describe(benchmark, bench, case, mode, impl, device)
    key = ("train", case, device)
    # torch.compile compiles in the first call, and the cpu backend's auto convolution core
    # times both cores there (under the memory measurement's profiler it would time them
    # slowed down, and keep its choice for the session)
    one_off = impl.endswith("torch.compile") or (
        device == "cpu" and impl_cpu_conv(impl) == "auto")
    amp = lambda: v.autocast(device)  # noqa: E731  (forward and loss only)
    with running(impl, device, True, benchmark.extra_info):
        model = _build(case.name, impl, device, True, v)
        x, y = _inputs(case, device, _num_classes(model), v)
        # The first call checks against eager and, unless it does one-off work, measures the
        # activation memory; otherwise the memory is measured after timing.
        if one_off:
            (loss, grads), memory = _probe(model, x, y, amp), None
        else:
            (loss, grads), memory = _instrumented_probe(model, x, y, device, amp)
        if impl == EAGER and key not in _REFERENCE:
            _REFERENCE[key] = (loss, {n: grads[n] for n in _checked_params(model)})
        if key not in _REFERENCE:
            twin = _twin(case.name, device, v).train()
            ref_loss, ref_grads = _probe(twin, x, y, amp)
            _REFERENCE[key] = (ref_loss, {n: ref_grads[n] for n in _checked_params(twin)})
        expected_loss, expected_grads = _REFERENCE[key]
        loss_tol = bench.tol("loss", device, model=True)
        assert_close(loss, expected_loss, impl + " loss", tol=loss_tol)
        last = list(expected_grads)[-1]  # the classifier's
        for name, grad in expected_grads.items():
            if name in grads:
                # float32 gradients of the first layers of a deep BN network differ from a
                # float64 computation by up to ~2% for eager itself; a broken kernel: ~100%
                # (half types: benchlib.tolerances)
                kind = "grad" if name == last else "grad_deep"
                assert_close(grads[name], grad, "%s grad of %s" % (impl, name),
                             tol=bench.tol(kind, device, model=True))
            else:
                raise AssertionError("%s has no parameter %s" % (impl, name))
        step = _sgd_step(model, x, y, amp)
        # Each row's rounds alternate with eager's: in the memory group (its time targets are
        # ratios between rows) and on the CPU, whose speed drifts within a minute (timed
        # alone, the training-step ratios moved by up to 0.3x from one run to the next).
        baseline = None
        if mode == "memory" or device == "cpu":
            # the lean row's rounds alternate with cnnops.fuse's as well: its time target is
            # against that row (paired_fuse_median in extra_info)
            fuse_step = None
            if mode == "memory" and impl == FUSE_LEAN:
                fuse_step = _sgd_step(_build(case.name, FUSE, device, True, v), x, y, amp)
            baseline = paired(impl, _sgd_step(_twin(case.name, device, v).train(), x, y, amp),
                              fuse=fuse_step)
        result = time_it(benchmark, bench, step, device, model=True, baseline=baseline)
        assert_close(result, expected_loss, impl + " loss (timed)", tol=loss_tol)
        if memory is None:
            model.zero_grad(set_to_none=True)
            _, memory = _instrumented_probe(model, x, y, device, amp)
    benchmark.extra_info.update(memory)
    finish(benchmark, bench, device, flops=_flops(case.name, case.batch, case.size, True))
