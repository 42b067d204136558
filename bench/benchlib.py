"""Shared pieces of the cnnops benchmark suite: shapes, implementations, timing, checks, memory.

The suite (bench/test_bench_*.py, run with ``pytest bench/ --benchmark-only``) times
each op and model for several implementations; one pytest-benchmark group is one
comparison (same op, same shape, same inputs, same device), and every row of a
group has ``extra_info["impl"]`` naming its implementation:

    torch eager                 PyTorch's native kernels (oneDNN/MKL on CPU, cuDNN on GPU),
                                unfused modules: Conv2d -> BatchNorm2d -> ReLU(inplace)
    torch.compile               the same eager code under torch.compile (inductor,
                                fullgraph, static shapes); compiled before timing; on the
                                CPU, inference groups compile with inductor's freezing
    cnnops <backend>            the cnnops op / module / model on that backend (the cpu
                                backend with its convolution core on "auto")
    cnnops cpu (<core>)         the cpu backend with its convolution core forced to im2col
                                or onednn (CPU convolution groups), or winograd
                                (conv_bn_relu inference groups: the calls it runs)
    cnnops.fuse                 cnnops.fuse(plain model) (only when cnnops.fuse exists)
    cnnops <backend> + torch.compile   the cnnops model under torch.compile (--full)

The cpu backend runs each convolution on one of three cores: cnnops' im2col + GEMM with fused
epilogues, ATen's oneDNN convolution with cnnops' fusions around it, or (3x3 stride-1
convolutions in inference) cnnops' Winograd F(2x2, 3x3). On "auto" (the default, the
"cnnops cpu" rows) it times each core that runs a configuration the first time it is seen
and keeps the fastest; that happens in the correctness check before the warm-up (time_it
fails a benchmark whose timed rounds would include one), and the choices made go to
extra_info["cpu_conv_auto"]. The "cnnops cpu (im2col)" / "(onednn)" / "(winograd)" rows
time each core on its own, so a group shows whether auto picked the fastest one.

torch.compile's freezing (torch._inductor.config.freezing = True while the row compiles:
weights and BatchNorm statistics become constants, so BatchNorm folds into the convolution
weights and those can be prepacked) is how torch.compile serves CPU inference, and the CPU
targets against torch.compile assume it. It only acts on a graph compiled under
torch.no_grad with modules in eval mode, which is how the inference groups run; training
groups and CUDA rows compile without it.

FLOPs count convolution multiply-adds only (2 * MACs): BatchNorm, ReLU and adds are
left out, so a fused op and its unfused twin have the same FLOPs. A training
forward + backward counts the forward convolution, the weight gradient and (unless
the layer reads the network input) the input gradient: 3x (or 2x) the forward.
The sgemm fraction is (FLOPs / median time) / (this machine's measured GEMM rate in the
run's dtype: float32 sgemm by default, the float16 / bfloat16 GEMM for a half run).

Precision and layout (Variant, from --bench-dtype, --bench-channels-last, --bench-amp):
tensors are made in float32 from fixed seeds and then cast to the run's dtype and laid
out NCHW or channels_last, so every implementation of a group sees the same values.
Modules are cast except their BatchNorms, whose parameters and statistics stay float32
(mixed-precision BatchNorm, as under torch.autocast and as cuDNN's half BatchNorm takes
them). With --bench-amp the models instead keep float32 weights and float32 input and run
their forward under torch.autocast(device, dtype); the per-op groups always run in the
dtype. Group labels and extra_info record dtype, layout and amp.
"""
import contextlib
import dataclasses
import functools
import math
import os
import platform
import re
import statistics
import time

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import cnnops
from cnnops import triton_kernels

EAGER = "torch eager"
COMPILE = "torch.compile"
FUSE = "cnnops.fuse"
# the memory group's (test_model_memory): cnnops.fuse(model, memory="lean"), and the eager
# twin with torch.utils.checkpoint around each residual / dense block
FUSE_LEAN = "cnnops.fuse (lean)"
CHECKPOINT = "torch eager + checkpoint"


def cnnops_impl(backend):
    return "cnnops " + backend


def cnnops_compile_impl(backend):
    return "cnnops %s + torch.compile" % backend


# the cpu backend's convolution cores (cnnops.set_cpu_conv), each timed as its own row in the
# convolution groups besides the "cnnops cpu" row (core "auto"; winograd forced runs the 3x3
# stride-1 and stride-2 layers, the others on im2col)
CPU_CONV_CORES = ("im2col", "onednn", "winograd")
CONV_OPS = ("conv2d", "conv_bn_relu")


def cpu_core_impl(core):
    return "cnnops cpu (%s)" % core


def impl_backend(impl):
    """The cnnops backend an implementation runs on (None for torch ones; 'auto' for fuse)."""
    if impl in (FUSE, FUSE_LEAN):
        return "auto"
    if impl.startswith("cnnops "):
        return impl.split()[1]
    return None


def impl_cpu_conv(impl):
    """The CPU convolution core a cnnops implementation runs with: the forced one of a
    "cnnops cpu (<core>)" row, else "auto" (None for torch ones)."""
    if impl_backend(impl) is None:
        return None
    core = re.fullmatch(r"cnnops cpu \((\w+)\)", impl)
    return core.group(1) if core else "auto"


def impl_id(impl):
    """A short pytest id for an implementation ("cnnops cpu (im2col)": cnnops-cpu-im2col)."""
    return (impl.replace("torch eager", "eager").replace("torch.compile", "compile")
            .replace("cnnops.fuse", "fuse").replace(" + ", "+").replace(" ", "-")
            .replace("(", "").replace(")", ""))


# ---------------------------------------------------------------------------
# precision and layout

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF = (torch.float16, torch.bfloat16)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a group's tensors are made: dtype, memory layout and (models) autocast.

    dtype: the dtype the tensors are cast to or, with amp, the autocast dtype;
    channels_last: inputs, gradients and 4-D weights in torch.channels_last;
    amp: models keep float32 weights and input and run under torch.autocast(device, dtype).
    """
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    amp: bool = False

    @property
    def layout(self):
        return "channels_last" if self.channels_last else "nchw"

    @property
    def default(self):
        return self == Variant()

    @property
    def label(self):
        """Group-label suffix: "float32 nchw", "float16 channels_last", "amp-float16 nchw"."""
        return "%s%s %s" % ("amp-" if self.amp else "", dtype_name(self.dtype), self.layout)

    def info(self):
        return dict(dtype=dtype_name(self.dtype), layout=self.layout, amp=self.amp)

    def tensor(self, t):
        """t (float32) cast to the dtype (kept float32 under amp) and laid out."""
        if not self.amp and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def module(self, module, device):
        """module on device, cast to the dtype except BatchNorms (float32 statistics and
        affine parameters, mixed precision as cuDNN and autocast take them); under amp
        nothing is cast. channels_last moves 4-D weights to that layout."""
        module = module.to(device)
        if not self.amp and self.dtype != torch.float32:
            cast = lambda t: t.to(self.dtype) if t.is_floating_point() else t  # noqa: E731
            for m in module.modules():
                if not isinstance(m, _BatchNorm):
                    m._apply(cast, recurse=False)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def autocast(self, device):
        """torch.autocast(device, dtype) under amp, else a no-op context."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(str(device).split(":")[0], dtype=self.dtype)

    @property
    def compute_dtype(self):
        """The dtype cnnops's kernels see (under autocast: the autocast dtype)."""
        return self.dtype


@dataclasses.dataclass(frozen=True)
class Tol:
    """A check's tolerance; each bound that is set is checked:
    max |a - e| <= max_rtol * max(1, max |e|); ||a - e|| <= norm_rtol * ||e||; and
    1/ratio <= ||a|| / ||e|| <= ratio (finite), a sanity bound for results whose values are
    mostly rounding noise in a half dtype but whose size is not."""
    max_rtol: float = None
    norm_rtol: float = None
    ratio: float = None

    def __str__(self):
        parts = []
        if self.max_rtol is not None:
            parts.append("max %g" % self.max_rtol)
        if self.norm_rtol is not None:
            parts.append("norm %g" % self.norm_rtol)
        if self.ratio is not None:
            parts.append("norm ratio %g" % self.ratio)
        return ", ".join(parts)


def tolerances(dtype, device):
    """The checks' tolerances for a run in ``dtype`` on ``device``: {kind: Tol}.

    kinds: "op" (per-op outputs), "op_grad" (per-op gradients), "model" (logits), "loss",
    "grad" (a model's classifier weight gradient), "grad_deep" (its first and middle
    convolutions' weight gradients). float32 on CPU keeps the suite's float32 bounds.
    float32 on CUDA: cuDNN convolutions run in TF32 by default (10-bit mantissa, like
    float16), so it gets float16's.

    Half types are compared in float64 with relative-norm bounds several times above what
    separates two correct implementations and below a wrong kernel's error (~0.1 and up, or
    NaN); the elementwise bound only catches gross errors. Eager in float16 / bfloat16 itself
    differs from a float64 computation on the same inputs, at the ResNet-50 conv_bn_relu
    shapes, by up to ~4e-4 / 3e-3 (relative norm) in the forward output, and by up to ~1.2% /
    3.8% in the gradients (the conv output is rounded before BatchNorm, and elements near the
    ReLU threshold change side), with elementwise errors up to 0.12 / 0.19 of the largest
    value: a fused kernel that does not round there differs from eager by as much.
    In a half dtype the first and middle weight gradients of a deep BatchNorm network are
    mostly rounding noise (two correct float16 ResNet-50s differ by 50% and more there,
    bfloat16 ones by 100%), so they get a norm-ratio sanity bound (zero, NaN or exploding
    gradients fail) and the classifier's gradient the relative-norm one.
    """
    tf32 = dtype == torch.float32 and str(device).startswith("cuda")
    if dtype == torch.float32 and not tf32:
        return {"op": Tol(1e-3), "op_grad": Tol(1e-3), "model": Tol(1e-3), "loss": Tol(1e-3),
                "grad": Tol(norm_rtol=0.05), "grad_deep": Tol(norm_rtol=0.05)}
    if dtype == torch.bfloat16:
        return {"op": Tol(0.1, 0.03), "op_grad": Tol(1.0, 0.15), "model": Tol(0.3, 0.1),
                "loss": Tol(0.03), "grad": Tol(norm_rtol=0.5), "grad_deep": Tol(ratio=3.0)}
    return {"op": Tol(0.05, 0.01), "op_grad": Tol(0.5, 0.05), "model": Tol(0.1, 0.03),
            "loss": Tol(0.01), "grad": Tol(norm_rtol=0.15), "grad_deep": Tol(ratio=2.0)}


# ---------------------------------------------------------------------------
# layer shapes

@dataclasses.dataclass(frozen=True)
class Conv:
    """A convolution layer: input [N, C, H, W] -> [N, OC, OH, OW]; ``nets`` it occurs in."""
    C: int
    H: int
    W: int
    OC: int
    k: int
    s: int = 1
    p: int = None
    bias: bool = False
    nets: tuple = ()

    @property
    def pad(self):
        return self.k // 2 if self.p is None else self.p

    @property
    def key(self):
        return (self.C, self.H, self.W, self.OC, self.k, self.s, self.pad, self.bias)

    @property
    def out_hw(self):
        return ((self.H + 2 * self.pad - self.k) // self.s + 1,
                (self.W + 2 * self.pad - self.k) // self.s + 1)

    @property
    def first(self):
        """Reads the network input (3 or 1 channels): training needs no input gradient."""
        return self.C <= 3

    @property
    def label(self):
        text = "%dx%dx%d k%d s%d" % (self.C, self.H, self.W, self.k, self.s)
        if self.pad != self.k // 2:
            text += " p%d" % self.pad
        text += " -> %d" % self.OC
        return text + (" +bias" if self.bias else "")

    @property
    def id(self):
        return self.label.replace(" -> ", "-").replace(" +", "-").replace(" ", "")

    def flops(self, batch):
        oh, ow = self.out_hw
        return 2 * batch * self.OC * oh * ow * self.C * self.k * self.k

    def train_flops(self, batch):
        return (2 if self.first else 3) * self.flops(batch)


def _r18(C, H, OC, k, s, p=None):
    return Conv(C, H, H, OC, k, s, p, nets=("resnet18",))


# The ResNet-18 layer set: the 7x7 stem, the 3x3 layers of each stage, the stride-2 3x3
# transitions and the 1x1 stride-2 downsample shortcuts (with ResNet-50's, QUICK_NETS,
# the set the CPU targets are stated over, at batch 8).
RESNET18_LAYERS = [
    _r18(3, 224, 64, 7, 2, 3),
    _r18(64, 56, 64, 3, 1), _r18(128, 28, 128, 3, 1), _r18(256, 14, 256, 3, 1),
    _r18(512, 7, 512, 3, 1),
    _r18(64, 56, 128, 3, 2), _r18(128, 28, 256, 3, 2), _r18(256, 14, 512, 3, 2),
    _r18(64, 56, 128, 1, 2), _r18(128, 28, 256, 1, 2), _r18(256, 14, 512, 1, 2),
]

NETS = ("resnet18", "resnet50", "densenet121", "googlenet")
# The CPU targets' layer set: ResNet-18's and ResNet-50's shapes, each once (29: every 3x3
# layer from 64 to 512 channels at stride 1 and 2, the 1x1 layers, the stride-2 shortcuts
# and the stem), the quick mode's default.
QUICK_NETS = ("resnet18", "resnet50")


def _trace_convs(build, shape):
    """Every Conv2d a plain twin runs on an input of ``shape``, in order (on the meta device)."""
    with torch.device("meta"):
        model = build()
    found = []

    def hook(module, args):
        _, C, H, W = args[0].shape
        found.append(Conv(C, H, W, module.out_channels, module.kernel_size[0], module.stride[0],
                          module.padding[0], module.bias is not None))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        model.eval()(torch.empty(shape, device="meta"))
    return found


def _thin(convs):
    """Of each run of layers sharing (H, W, OC, k, s) keep the first and the last.

    DenseNet's 1x1 bottlenecks differ only in input channels (58 of them) and
    GoogLeNet has 50-odd Inception convolutions; their ends span the range.
    """
    groups = {}
    for c in convs:
        groups.setdefault((c.H, c.W, c.OC if c.k != 1 else None, c.k, c.s), []).append(c)
    keep = set()
    for members in groups.values():
        keep.add(members[0].key)
        keep.add(members[-1].key)
    return [c for c in convs if c.key in keep]


@functools.lru_cache(maxsize=None)
def layer_set(net):
    """The unique convolution shapes of ``net`` at 224x224 (batch not included)."""
    if net == "resnet18":
        return list(RESNET18_LAYERS)
    import plain_models as P
    if net == "googlenet":  # d2l's GoogLeNet has torchvision's Inception widths; at 224: 28/14/7
        convs = _trace_convs(lambda: P.twin_googlenet(in_channels=3), (1, 3, 224, 224))
    else:
        convs = _trace_convs(P.TWINS[net][0], (1, 3, 224, 224))
    unique = list({c.key: c for c in convs}.values())
    if net in ("densenet121", "googlenet"):
        unique = _thin(unique)
    return [dataclasses.replace(c, nets=(net,)) for c in unique]


def conv_layers(nets):
    """The union of the nets' layer sets, each shape once (``nets`` lists every net it is in)."""
    merged = {}
    for net in nets:
        for c in layer_set(net):
            if c.key in merged:
                merged[c.key] = dataclasses.replace(merged[c.key], nets=merged[c.key].nets + (net,))
            else:
                merged[c.key] = c
    return list(merged.values())


@dataclasses.dataclass(frozen=True)
class Act:
    """An activation tensor [N, C, H, W] for the elementwise ops (bn_relu, add_relu)."""
    C: int
    H: int
    W: int
    residual: bool = False
    nets: tuple = ()

    @property
    def label(self):
        return "%dx%dx%d%s" % (self.C, self.H, self.W, " +residual" if self.residual else "")

    @property
    def id(self):
        return self.label.replace(" +", "-")

    def numel(self, batch):
        return batch * self.C * self.H * self.W


# ResNet-18 stage outputs; DenseNet-121's widest pre-activation of each block (--full).
RESNET18_ACTS = [Act(64, 56, 56, nets=("resnet18",)), Act(128, 28, 28, nets=("resnet18",)),
                 Act(256, 14, 14, nets=("resnet18",)), Act(512, 7, 7, nets=("resnet18",))]
FULL_ACTS = RESNET18_ACTS + [
    dataclasses.replace(a, residual=True) for a in RESNET18_ACTS] + [
    Act(256, 56, 56, nets=("densenet121",)), Act(512, 28, 28, nets=("densenet121",)),
    Act(1024, 14, 14, nets=("densenet121",)), Act(1024, 7, 7, nets=("densenet121",))]


@dataclasses.dataclass(frozen=True)
class Pool:
    """A pooling layer: kind max / avg / adaptive_avg, input [N, C, H, W]."""
    kind: str
    C: int
    H: int
    k: int = 0
    s: int = 0
    p: int = 0
    nets: tuple = ()

    @property
    def shape(self):
        if self.kind == "adaptive_avg":
            return "%dx%dx%d -> 1x1" % (self.C, self.H, self.H)
        return "%dx%dx%d k%d s%d p%d" % (self.C, self.H, self.H, self.k, self.s, self.p)

    @property
    def label(self):
        return "%s %s" % (self.kind, self.shape)

    @property
    def id(self):
        return self.label.replace(" -> ", "-").replace(" ", "-")

    def out_hw(self):
        if self.kind == "adaptive_avg":
            return 1
        return (self.H + 2 * self.p - self.k) // self.s + 1


QUICK_POOLS = [Pool("max", 64, 112, 3, 2, 1, nets=("resnet18", "resnet50")),
               Pool("avg", 128, 56, 2, 2, 0, nets=("densenet121",)),
               Pool("adaptive_avg", 512, 7, nets=("resnet18",))]
FULL_POOLS = QUICK_POOLS + [
    Pool("avg", 256, 28, 2, 2, 0, nets=("densenet121",)),
    Pool("avg", 512, 14, 2, 2, 0, nets=("densenet121",)),
    Pool("max", 192, 28, 3, 1, 1, nets=("googlenet",)),
    Pool("max", 480, 28, 3, 2, 1, nets=("googlenet",)),
    Pool("adaptive_avg", 2048, 7, nets=("resnet50",)),
    Pool("adaptive_avg", 1024, 7, nets=("densenet121", "googlenet"))]


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A model at batch x in_channels x size x size."""
    name: str
    batch: int
    size: int

    @property
    def label(self):
        import plain_models as P
        return "%s b%d %dx%dx%d" % (self.name, self.batch, P.TWINS[self.name][2], self.size,
                                    self.size)

    @property
    def id(self):
        return "%s-b%d-%d" % (self.name, self.batch, self.size)


# Quick: the target sizes for inference of the ResNets (batch 8, 128x128); smaller
# training steps so the default run stays within a few minutes on 2 cores.
QUICK_MODELS = {
    "eval": [ModelCase("resnet_classifier", 8, 128), ModelCase("resnet50", 8, 128),
             ModelCase("densenet121", 4, 64), ModelCase("googlenet", 8, 96)],
    "train": [ModelCase("resnet_classifier", 8, 64), ModelCase("resnet50", 2, 64),
              ModelCase("densenet121", 2, 64), ModelCase("googlenet", 4, 96)],
}
# The memory group (test_model_memory): activation memory and time of a training step at
# batch 8, 128x128, eager / cnnops.fuse / cnnops.fuse(memory="lean") / eager + checkpoint.
MEMORY_MODELS = [ModelCase("resnet18", 8, 128), ModelCase("resnet50", 8, 128),
                 ModelCase("densenet121", 8, 128)]
MEMORY_IMPLS = [EAGER, FUSE, FUSE_LEAN, CHECKPOINT]
FULL_MODELS = {
    "eval": QUICK_MODELS["eval"] + [ModelCase("resnet_classifier", 8, 224),
                                    ModelCase("resnet50", 8, 224),
                                    ModelCase("densenet121", 8, 224),
                                    ModelCase("googlenet", 32, 96)],
    "train": QUICK_MODELS["train"] + [ModelCase("resnet_classifier", 8, 128),
                                      ModelCase("resnet50", 4, 64), ModelCase("resnet50", 8, 128),
                                      ModelCase("densenet121", 8, 128),
                                      ModelCase("googlenet", 8, 96)],
}


# ---------------------------------------------------------------------------
# devices, backends, settings

def devices(selected=None):
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if selected:
        wanted = [d.strip() for d in selected.split(",") if d.strip()]
        unknown = [d for d in wanted if d not in ("cpu", "cuda")]
        if unknown:
            raise ValueError("unknown device(s) %s; expected cpu and/or cuda" % unknown)
        missing = [d for d in wanted if d not in found]
        if missing:
            raise ValueError("--bench-devices %s: no %s here (torch %s, "
                             "torch.cuda.is_available() is %s)"
                             % (selected, ", ".join(missing), torch.__version__,
                                torch.cuda.is_available()))
        return wanted
    return found


def backend_runs_on(name, device):
    """Whether cnnops backend ``name`` can run a float32 call on ``device`` here (Triton's
    interpreter, TRITON_INTERPRET=1, does not count: interpreted kernels are never timed)."""
    if name == "triton" and triton_kernels.INTERPRET:
        return False
    try:
        with cnnops.use_backend(name):
            cnnops.backends.resolve(torch.empty(0, device=device))
        return True
    except RuntimeError:
        return False


def not_timed_reason(impl, device, dtype):
    """Why a cnnops implementation is not timed for ``dtype`` tensors on ``device`` (None
    when it is): its backend cannot run them (the cpu backend takes float32/float64 only),
    or ``auto`` (cnnops.fuse) would resolve to the reference backend (plain PyTorch, no
    fused kernel) or to interpreted Triton. Returns (reason or None, resolved backend)."""
    backend = impl_backend(impl)
    if backend is None:
        return None, None
    probe = torch.empty(0, device=device, dtype=dtype)
    try:
        with cnnops.use_backend(backend):
            resolved = cnnops.backends.resolve(probe)
    except RuntimeError as e:
        return "%s does not run %s tensors on %s: %s" % (impl, dtype_name(dtype), device, e), None
    if backend == "auto" and resolved == "reference":
        return ("%s would run cnnops's reference backend (plain PyTorch, no fused kernel) for "
                "%s tensors on %s: not timed as a fast path"
                % (impl, dtype_name(dtype), device)), resolved
    if resolved == "triton" and triton_kernels.INTERPRET:
        return ("%s would run Triton's interpreter (TRITON_INTERPRET=1): not timed"
                % impl), resolved
    return None, resolved


class Settings:
    """What a run measures: from --full, --bench-* options (see conftest.py)."""

    def __init__(self, full=False, backends="default", compile="auto", nets=None, models=None,
                 batch=8, devices_=None, rounds=None, dtype="float32", channels_last=False,
                 amp=False, model_batch=None, model_size=None, cudnn_benchmark=False):
        self.full = full
        self.compile = compile
        self.batch = batch
        self.devices = devices(devices_)
        self.requested_backends = backends
        if dtype not in DTYPES:
            raise ValueError("unknown --bench-dtype %r; expected one of %s"
                             % (dtype, ", ".join(DTYPES)))
        if amp and DTYPES[dtype] not in HALF:
            raise ValueError("--bench-amp runs the models under torch.autocast in the "
                             "--bench-dtype: give --bench-dtype float16 or bfloat16")
        # per-op groups run in the dtype (cast inputs and weights); models too, or under
        # autocast with float32 weights when amp is set
        self.variant = Variant(DTYPES[dtype], channels_last, False)
        self.model_variant = Variant(DTYPES[dtype], channels_last, amp)
        self.cudnn_benchmark = cudnn_benchmark
        self.notes = []  # header lines about what this run leaves out
        available = cnnops.available_backends()
        if triton_kernels.INTERPRET and "triton" in available:
            available = [b for b in available if b != "triton"]
            self.notes.append("TRITON_INTERPRET=1 is set: the triton backend would run in "
                              "Triton's interpreter and gets no rows (unset it to time Triton "
                              "on CUDA)")
        if backends in ("default", "all"):
            wanted = [b for b in available if b != "reference" or full or backends == "all"]
        else:
            wanted = [b.strip() for b in backends.split(",") if b.strip()]
            bad = [b for b in wanted if b not in cnnops.backends.NAMES[1:]]
            if bad:
                raise ValueError("unknown cnnops backend(s) %s; expected some of %s"
                                 % (bad, ", ".join(cnnops.backends.NAMES[1:])))
            missing = [b for b in wanted if b not in available]
            if missing:
                raise ValueError("cnnops backend(s) %s not available here (available: %s)%s"
                                 % (missing, ", ".join(available),
                                    "; TRITON_INTERPRET=1 is set" if triton_kernels.INTERPRET
                                    else ""))
        self.backends = wanted
        self.nets = [n.strip() for n in nets.split(",")] if nets else (
            list(NETS) if full else list(QUICK_NETS))
        bad = [n for n in self.nets if n not in NETS]
        if bad:
            raise ValueError("unknown net(s) %s for --bench-nets; expected some of %s"
                             % (bad, ", ".join(NETS)))
        self.models = [m.strip() for m in models.split(",")] if models else None
        if self.models == ["none"]:
            self.models = []
        known = {c.name for cases in FULL_MODELS.values() for c in cases}
        if self.models and not set(self.models) <= known:
            raise ValueError("unknown model(s) %s for --bench-models; expected some of %s"
                             % (sorted(set(self.models) - known), ", ".join(sorted(known))))
        for value, option in ((model_batch, "--bench-model-batch"),
                              (model_size, "--bench-model-size")):
            if value is not None and value < 1:
                raise ValueError("%s must be a positive integer, got %d" % (option, value))
        self.model_batch, self.model_size = model_batch, model_size
        # Timed rounds per implementation: as many as fit a time budget (estimated from a
        # warm-up call), between a floor and a cap, so a loaded machine stays within the
        # run's time; --bench-rounds fixes the number. Warm-up calls are untimed and follow
        # the correctness check (itself a first call, and torch.compile's compilation).
        self.fixed_rounds = rounds
        self.layer_warmup, self.model_warmup = (2, 1) if full else (1, 1)
        #                    (floor, cap, budget seconds)
        self.layer_rounds = (10, 30, 4.0) if full else (3, 15, 0.6)
        self.model_rounds = (3, 10, 15.0) if full else (2, 7, 1.5)
        # CUDA: kernels are short and asynchronous. More warm-up calls (caching allocator,
        # cuDNN/Triton autotuning happen in the check call before them); a round is as many
        # back-to-back calls as fill cuda_round_seconds, timed between two synchronizations
        # (benchmark iterations), so launch and synchronize latency do not swamp a 30 us
        # kernel; more rounds, since they are cheap.
        self.cuda_layer_warmup, self.cuda_model_warmup = (5, 3) if full else (3, 2)
        self.cuda_layer_rounds = (20, 100, 2.0) if full else (10, 50, 0.5)
        self.cuda_model_rounds = (10, 30, 10.0) if full else (5, 20, 4.0)
        self.cuda_round_seconds = 2e-3
        self.cuda_max_iterations = 200
        self._sgemm = {}
        self._copy = {}
        self.start_info = machine_info()  # before the run: the load average says if it was quiet
        self.results = []  # (group, impl, median seconds, extra_info) of each finished benchmark

    def warmup_calls(self, device, model=False):
        if str(device).startswith("cuda"):
            return self.cuda_model_warmup if model else self.cuda_layer_warmup
        return self.model_warmup if model else self.layer_warmup

    def rounds_for(self, seconds_per_call, model=False, device="cpu", iterations=1):
        if self.fixed_rounds:
            return self.fixed_rounds
        if str(device).startswith("cuda"):
            floor, cap, budget = self.cuda_model_rounds if model else self.cuda_layer_rounds
        else:
            floor, cap, budget = self.model_rounds if model else self.layer_rounds
        per_round = max(seconds_per_call, 1e-6) * iterations
        return int(max(floor, min(cap, math.ceil(budget / per_round))))

    def iterations_for(self, seconds_per_call, device="cpu"):
        """Calls per timed round: 1 on CPU; on CUDA enough to fill cuda_round_seconds."""
        if not str(device).startswith("cuda"):
            return 1
        return int(max(1, min(self.cuda_max_iterations,
                              math.ceil(self.cuda_round_seconds / max(seconds_per_call, 1e-7)))))

    def backends_for(self, device):
        return [b for b in self.backends if backend_runs_on(b, device)]

    def compile_for(self, op):
        """torch.compile rows for ``op`` ("conv_bn_relu eval", "model eval", ...; "cnnops
        model": the cnnops models under torch.compile): in quick mode only for the groups
        the CPU targets compare with torch.compile, conv_bn_relu inference and the models'
        inference (each compiled shape costs seconds of inductor time on 2 cores, a model
        up to a minute)."""
        if self.compile == "none":
            return False
        if self.compile == "all" or self.full:
            return True
        return op in ("conv_bn_relu eval", "model eval")

    def op_runs(self, op, device):
        """Per-op groups beyond the quick CPU set: conv_bn_relu train-fwd (the training
        forward without backward, a GPU target) runs in quick mode on CUDA only, everywhere
        with --full."""
        if op == "conv_bn_relu train-fwd":
            return self.full or str(device).startswith("cuda")
        return True

    def layer_impls(self, device, op):
        """The implementations of a per-op group; the convolution ops get a row per cpu
        convolution core after the cpu backend's (auto) one."""
        if not self.op_runs(op, device):
            return []
        impls = [EAGER]
        if self.compile_for(op):
            impls.append(COMPILE)
        for b in self.backends_for(device):
            impls.append(cnnops_impl(b))
            if b == "cpu" and op.split()[0] in CONV_OPS:
                impls += [cpu_core_impl(core) for core in CPU_CONV_CORES]
        return impls

    def model_impls(self, device, mode):
        if mode == "memory":
            return list(MEMORY_IMPLS)
        impls = [EAGER]
        if self.compile_for("model " + mode):
            impls.append(COMPILE)
        backends = self.backends_for(device)
        impls += [cnnops_impl(b) for b in backends]
        impls.append(FUSE)  # skipped at run time while cnnops.fuse does not exist
        if self.compile_for("cnnops model"):
            impls += [cnnops_compile_impl(b) for b in backends if b != "reference"]
        return impls

    def model_cases(self, mode):
        cases = MEMORY_MODELS if mode == "memory" else (
            FULL_MODELS if self.full else QUICK_MODELS)[mode]
        if self.models is not None:
            cases = [c for c in cases if c.name in self.models]
        if self.model_batch or self.model_size:
            cases = [dataclasses.replace(c, batch=self.model_batch or c.batch,
                                         size=self.model_size or c.size) for c in cases]
            cases = list({c: None for c in cases})  # each (name, batch, size) once, in order
        return cases

    def tol(self, kind, device, model=False):
        """The check tolerance (a Tol) of a kind of result in this run on ``device``."""
        variant = self.model_variant if model else self.variant
        return tolerances(variant.compute_dtype, device)[kind]

    def sgemm_gflops(self, device):
        """This machine's GEMM rate (GFLOP/s) in the run's dtype (float32 by default), measured
        once per session and device."""
        if device not in self._sgemm:
            self._sgemm[device] = measure_sgemm(device, dtype=self.variant.dtype)
        return self._sgemm[device]


    def copy_gbps(self, device):
        """This machine's copy rate (GB/s, bytes read + written), measured once per session
        and device: the ceiling of the memory-bound ops' GB/s."""
        if device not in self._copy:
            self._copy[device] = measure_copy(device)
        return self._copy[device]


def measure_copy(device, nbytes=None, repeat=7):
    """Best-of-``repeat`` GB/s (read + write) of a tensor copy of ``nbytes`` (256 MiB on the
    GPU, 64 MiB on the CPU: each several times the last-level cache)."""
    nbytes = nbytes or (256 if device == "cuda" else 64) * 2 ** 20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeat + 2):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2.0 * nbytes / best / 1e9


def measure_sgemm(device, n=None, repeat=7, dtype=torch.float32):
    """Best-of-``repeat`` GFLOP/s of an n x n x n torch.mm in ``dtype`` (n: 1024 CPU, 4096 GPU)."""
    n = n or (4096 if device == "cuda" else 1024)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeat + 2):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cnnops": cnnops.__version__,
            "cnnops_backends": cnnops.available_backends(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "mkl": torch.backends.mkl.is_available(),
            "cnnops_path": os.path.dirname(os.path.abspath(cnnops.__file__))}
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = torch.backends.cudnn.version()
        info["cuda"] = torch.version.cuda
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


# ---------------------------------------------------------------------------
# implementations

@contextlib.contextmanager
def running(impl, device=None, train=None, info=None):
    """The context an implementation runs in.

    A cnnops row: its backend, and its CPU convolution core (the forced one of a "cnnops cpu
    (<core>)" row, else "auto", pinned so that CNNOPS_CPU_CONV in the environment does not
    change what a row measures); the choices auto makes inside the block (timing both cores
    the first time a configuration is seen; one seen earlier in the session is not timed
    again) go to info["cpu_conv_auto"] as [{call, core, reason}].
    torch.compile on the CPU with train=False: inductor's freezing is on while the block runs,
    so the compilation in its first call freezes (it needs torch.no_grad and eval mode; see
    the module docstring; later calls do not read the setting), and info["freezing"] is True.
    """
    with contextlib.ExitStack() as stack:
        backend = impl_backend(impl)
        if backend is not None:
            stack.enter_context(cnnops.use_backend(backend))
            stack.enter_context(cnnops.use_cpu_conv(impl_cpu_conv(impl)))
            before = {c["call"] for c in cnnops.cpu_conv_choices()}
        if impl == COMPILE and str(device) == "cpu" and train is False:
            from torch._inductor import config as inductor_config
            stack.enter_context(inductor_config.patch(freezing=True))
            if info is not None:
                info["freezing"] = True
        yield
        if backend is not None and info is not None:
            made = [c for c in cnnops.cpu_conv_choices() if c["call"] not in before]
            if made:
                info["cpu_conv_auto"] = made


def paired(impl, eager_call, **rivals):
    """The baselines time_it alternates with ``impl``'s rounds, {name: call}: "eager", torch
    eager's call, for every implementation but eager itself, and each rival given (a name
    such as "compile": another implementation's call, for a target that compares the two
    side by side; see time_it). None when there are none."""
    calls = {} if impl == EAGER else {"eager": eager_call}
    calls.update((name, call) for name, call in rivals.items() if call is not None)
    return calls or None


def compiled(fn):
    """torch.compile(fn) on a fresh dynamo state, fullgraph and static shapes.

    Each benchmark compiles one function for one shape; resetting keeps the suite's many
    compiles of the same code objects from running into dynamo's recompile limit (which
    would silently fall back to eager) and from turning on dynamic shapes.
    """
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def randomize_bn(model, seed=1):
    """Non-trivial BN affine parameters and running statistics, so eval mode folds something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def randn(shape, device, seed, scale=1.0, requires_grad=False, variant=None):
    """Seeded float32 normal values on ``device``, cast and laid out as ``variant`` says
    (drawn on the device itself on CUDA: batch-32 activations are slow to draw on the CPU)."""
    if str(device).startswith("cuda"):
        g = torch.Generator(device=device).manual_seed(seed)
        t = torch.randn(shape, generator=g, device=device) * scale
    else:
        g = torch.Generator().manual_seed(seed)
        t = (torch.randn(shape, generator=g) * scale).to(device)
    if variant is not None:
        t = variant.tensor(t)
    return t.requires_grad_(requires_grad)


def named_params(module):
    """(name, parameter) sorted by name, with torch.compile's ``_orig_mod.`` prefix removed."""
    return sorted((n.replace("_orig_mod.", ""), p) for n, p in module.named_parameters())


# ---------------------------------------------------------------------------
# checks: a broken kernel must not look fast

def assert_close(actual, expected, what, rtol=1e-3, norm=False, tol=None):
    """max |actual - expected| <= rtol * max(1, max |expected|), NaN failing; with norm=True,
    ||actual - expected|| <= rtol * ||expected|| instead (for gradients deep in a float32
    network, whose elementwise error eager itself does not keep small). ``tol`` (a Tol)
    replaces rtol/norm: both of its bounds are checked. Compared in float64, whatever the
    tensors' dtype (half types are upcast first)."""
    if tol is None:
        tol = Tol(norm_rtol=rtol) if norm else Tol(rtol)
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), "%s: %d results, expected %d" % (
            what, len(actual), len(expected))
        for i, (a, e) in enumerate(zip(actual, expected)):
            if a is None and e is None:
                continue
            assert_close(a, e, "%s[%d]" % (what, i), tol=tol)
        return
    assert tuple(actual.shape) == tuple(expected.shape), "%s: shape %s, expected %s" % (
        what, tuple(actual.shape), tuple(expected.shape))
    a, e = actual.detach().double(), expected.detach().double()
    if not e.numel():
        return
    if tol.norm_rtol is not None:
        err, bound = (a - e).norm().item(), tol.norm_rtol * e.norm().item()
        assert err <= bound, "%s: ||impl - eager|| = %.3g > %.3g (rtol %g)" % (
            what, err, bound, tol.norm_rtol)
    if tol.max_rtol is not None:
        bound = tol.max_rtol * max(1.0, e.abs().max().item())
        err = (a - e).abs().max().item()
        assert err <= bound, "%s: max |impl - eager| = %.3g > %.3g" % (what, err, bound)
    if tol.ratio is not None:
        na, ne = a.norm().item(), e.norm().item()
        ok = (na == ne == 0.0) or (ne > 0 and na > 0 and math.isfinite(na)
                                   and 1 / tol.ratio <= na / ne <= tol.ratio)
        assert ok, "%s: ||impl|| = %.3g, ||eager|| = %.3g: not within a factor %g" % (
            what, na, ne, tol.ratio)


# ---------------------------------------------------------------------------
# timing

class _SyncTimer:
    """perf_counter after a torch.cuda.synchronize(): a round of asynchronous CUDA calls is
    timed from an idle GPU to an idle GPU."""

    def __call__(self):
        torch.cuda.synchronize()
        return time.perf_counter()


def time_it(benchmark, settings, fn, device, model=False, baseline=None):
    """benchmark.pedantic over ``fn``: untimed warm-up calls, then the timed rounds.

    CPU: one call per round. With ``baseline`` ({name: call}, from paired: torch eager's
    version of the same work, and a rival implementation's where given), each round first
    times one call of each baseline (two swap places every round), so they alternate with
    ``fn`` round by round and a slow spell of the machine hits all alike; each baseline's
    median and minimum go to extra_info (paired_<name>_median / paired_<name>_min, seconds),
    and report.py takes the speed-up from them rather than from the group's separately
    timed rows.
    CPU rounds must not run a convolution configuration the cpu backend's auto core has not
    seen (its first call times both cores): the caller's correctness check or the warm-up
    runs it first, and a timed round that did fails the benchmark.
    CUDA: a round is ``iterations`` back-to-back calls (enough to fill
    Settings.cuda_round_seconds) between two synchronizations, and pytest-benchmark reports
    the time per call; the rounds' and iterations' counts come from the last warm-up call's
    duration (Settings.rounds_for / iterations_for). No pairing on CUDA.
    Returns fn's result of the last call (timed or, with iterations, one more), for the
    caller to check.
    """
    cuda = str(device).startswith("cuda")
    if cuda:
        inner = fn

        def synced():
            out = inner()
            torch.cuda.synchronize()
            return out
    seconds = None
    for _ in range(max(1, settings.warmup_calls(device, model))):
        start = time.perf_counter()
        (synced if cuda else fn)()
        seconds = time.perf_counter() - start
    iterations = settings.iterations_for(seconds, device)
    # the round's synchronizations come from the timer; without access to pytest-benchmark's
    # timer, each call synchronizes (one call per round)
    if iterations > 1 and not hasattr(benchmark, "_timer"):
        iterations = 1
    rounds = settings.rounds_for(seconds, model, device, iterations)
    benchmark.extra_info["iterations"] = iterations
    if not cuda:
        choices = len(cnnops.cpu_conv_choices())
        if baseline is None:
            result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        else:
            for call in baseline.values():
                call()  # warm
            times = {name: [] for name in baseline}
            calls = list(baseline.items())

            def time_baselines():  # pytest-benchmark runs setup untimed before each round
                # two baselines swap places every round: each of the three calls then follows
                # each of the others equally often (what ran just before a model's call, and
                # what it left freed, moves the call's time)
                calls.reverse()
                for name, call in calls:
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)

            result = benchmark.pedantic(fn, setup=time_baselines, rounds=rounds,
                                        warmup_rounds=0, iterations=1)
            for name, seconds in times.items():
                benchmark.extra_info["paired_%s_median" % name] = statistics.median(seconds)
                benchmark.extra_info["paired_%s_min" % name] = min(seconds)
        # the cpu backend's auto core times both cores in a configuration's first call: that
        # belongs in the check or the warm-up, never in a timed round
        assert len(cnnops.cpu_conv_choices()) == choices, (
            "cnnops's auto CPU convolution core measured a configuration first seen in the timed "
            "rounds: their time includes both cores' trial runs")
        return result
    if iterations == 1:
        return benchmark.pedantic(synced, rounds=rounds, warmup_rounds=0, iterations=1)
    timer = benchmark._timer
    benchmark._timer = _SyncTimer()
    try:
        result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=iterations)
    finally:
        benchmark._timer = timer
    torch.cuda.synchronize()
    return result


def median_seconds(benchmark):
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return stats.stats.median


def finish(benchmark, settings, device, flops=None, nbytes=None):
    """Adds GFLOP/s, the sgemm fraction and GB/s to extra_info; records the row for the summary."""
    info = benchmark.extra_info
    median = median_seconds(benchmark)
    if flops is not None:
        info["flops"] = flops
        info["sgemm_gflops"] = round(settings.sgemm_gflops(device), 2)
        info["gemm_dtype"] = dtype_name(settings.variant.dtype)
    if nbytes is not None:
        info["bytes"] = nbytes
        info["copy_gbps"] = round(settings.copy_gbps(device), 2)
    if median:
        info["median_ms"] = round(median * 1e3, 4)
        if flops is not None:
            info["gflops"] = round(flops / median / 1e9, 2)
            info["sgemm_fraction"] = round(flops / median / 1e9 / info["sgemm_gflops"], 4)
        if nbytes is not None:
            info["gbytes_per_s"] = round(nbytes / median / 1e9, 2)
            info["copy_fraction"] = round(info["gbytes_per_s"] / info["copy_gbps"], 4)
        settings.results.append((benchmark.group, info.get("impl"), median, dict(info)))


# ---------------------------------------------------------------------------
# memory of a training step

def _storage_key(t):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


@contextlib.contextmanager
def _cpu_peak():
    """High-water mark of the CPU memory allocated while the block runs and not yet freed,
    from the profiler's allocation events (frees of blocks allocated before the block are
    left out); result["peak"] stays None where that is unavailable."""
    result = {"peak": None}
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        yield result
        return
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        events = []
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            f = e.extra_fields
            if e.tag == _EventType.Allocation and str(f.device) == "cpu":
                events.append((e.start_time_ns, f.alloc_size, f.ptr))
        live, current, peak = set(), 0, 0
        for _, size, ptr in sorted(events):
            if size > 0:
                live.add(ptr)
                current += size
            elif ptr in live:
                live.discard(ptr)
                current += size
            peak = max(peak, current)
        result["peak"] = peak
    except Exception:  # private profiler API: report nothing rather than fail the benchmark
        result["peak"] = None


def training_memory(step, module, device):
    """Runs ``step()`` (forward + backward) once and measures its activation memory.

    The module's gradients are set to None first (as zero_grad(set_to_none=True) does).
    saved_bytes: unique storages saved for backward (torch.autograd.graph.saved_tensors_hooks),
    parameters and buffers excluded; saved_bytes_with_params: including them;
    peak_bytes: the high-water mark of memory allocated during the step (activations,
    gradients, temporaries) above what was allocated before it: torch.cuda.max_memory_allocated
    on GPU; on CPU from the profiler's allocation events (None where unavailable).
    Returns (step's result, dict).
    """
    for p in module.parameters():
        p.grad = None
    weights = {t.untyped_storage().data_ptr() for t in list(module.parameters())
               + list(module.buffers())}
    saved = {}

    def pack(t):
        ptr, nbytes = _storage_key(t)
        saved[ptr] = (nbytes, ptr in weights)
        return t

    info = {}
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = step()
        torch.cuda.synchronize()
        info["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        info["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        with _cpu_peak() as peak, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = step()
        info["peak_bytes"] = peak["peak"]
        info["peak_source"] = "profiler CPU allocation events" if peak["peak"] is not None else None
    info["saved_bytes"] = sum(n for n, is_weight in saved.values() if not is_weight)
    info["saved_bytes_with_params"] = sum(n for n, _ in saved.values())
    info["saved_tensors"] = len(saved)
    return result, info



def checkpoint_blocks(model):
    """model with the forward of each residual block (torchvision-style BasicBlock /
    Bottleneck) and dense layer run under torch.utils.checkpoint (non-reentrant), in place:
    their activations are not kept, and the backward runs their forward again (BatchNorm's
    running statistics included: updated twice a step, checkpointing's known caveat).
    Parameter names and state_dict keys stay as they were."""
    from torch.utils.checkpoint import checkpoint
    from cnnops.models.plain import TvBasicBlock, TvBottleneck, TvDenseLayer

    def dense(forward):  # its argument, the block's list of features, grows after the call
        return lambda features: checkpoint(lambda *t: forward(list(t)), *features,
                                           use_reentrant=False)

    for m in model.modules():
        if isinstance(m, TvDenseLayer):
            m.forward = dense(m.forward)
        elif isinstance(m, (TvBasicBlock, TvBottleneck)):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    return model
