"""python -m cnnops: see cnnops work on this machine.

    python -m cnnops                 train a seed network on bundled digits, cnnops vs torch.nn
    python -m cnnops train --help    options (model, epochs, batch size, plot path)
    torchrun --nproc_per_node 2 -m cnnops train --distributed
                                     train a ResNet-18 (width 16) on 2 processes: DDP, SyncBatchNorm
                                     fused by cnnops, checked against one process on the whole batch
    python -m cnnops check           backends here, and each op's parity with torch.nn.functional
    python -m cnnops check --speed   plus CPU time of conv2d / conv_bn_relu at ResNet-18 shapes
    python -m cnnops models          every model: parameters, FLOPs, output shape
"""
import argparse
import ctypes
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import cnnops
import cnnops.functional as CF


def _progress(text, done, total, width=30):
    """One self-overwriting progress line on a terminal; nothing when piped."""
    if not sys.stdout.isatty():
        return
    filled = int(width * done / max(total, 1))
    sys.stdout.write("\r  %s [%s%s] %d/%d" % (text, "#" * filled, "." * (width - filled), done, total))
    sys.stdout.flush()
    if done == total:
        sys.stdout.write("\r" + " " * (len(text) + width + 20) + "\r")


# ---------------------------------------------------------------------------
# train

def load_digits(size=28, seed=0):
    """scikit-learn's 1,797 handwritten 8x8 digits (bundled, no download), upsampled to size x size.

    -> (train_x [1438, 1, size, size], train_y), (test_x [359, ...], test_y), standardised.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _evaluate(model, x, y, batch_size=256):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def _epoch_order(n, epoch):
    """The shuffled order [n] of the training images in ``epoch`` (the same in every run)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch))


def _step(model, opt, x, y):
    """One optimizer step on the batch x [B, 1, H, W], y [B]. -> its loss (a float)."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _train_epoch(model, opt, x, y, batch_size, order, label):
    """One epoch over x [N, 1, H, W], y [N] in ``order`` [N]; a progress line unless label is
    None. -> (mean loss over the N images, seconds)."""
    model.train()
    total, batches = 0.0, (len(y) + batch_size - 1) // batch_size
    start = time.perf_counter()
    for b in range(batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        total += _step(model, opt, x[idx], y[idx]) * len(idx)
        if label is not None:
            _progress(label, b + 1, batches)
    return total / len(y), time.perf_counter() - start


def _train_epoch_alternating(runs, x, y, batch_size, order, label):
    """One epoch of each of ``runs`` ({name: (model, optimizer)}) over x [N, 1, H, W], y [N]
    in ``order`` [N], the runs taking turns batch by batch (and turns at going first), so
    that a slow spell of a shared machine hits each run alike: with whole epochs in turn,
    the ratio of the two runs' median epochs moved from 1.06x to 1.33x between two runs of
    the same code. One progress line.
    -> {name: (mean loss over the N images, seconds of its own steps)}"""
    names = list(runs)
    for model, _ in runs.values():
        model.train()
    total, seconds = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    batches = (len(y) + batch_size - 1) // batch_size
    for b in range(batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        for name in names if b % 2 == 0 else reversed(names):
            model, opt = runs[name]
            start = time.perf_counter()
            total[name] += _step(model, opt, xb, yb) * len(idx)
            seconds[name] += time.perf_counter() - start
        _progress(label, b + 1, batches)
    return {name: (total[name] / len(y), seconds[name]) for name in names}


def _keep_freed_memory():
    """Asks glibc's malloc to keep the memory the two runs free, rather than hand it back to
    the kernel. -> True where that took effect (glibc), False elsewhere.

    Both runs share this process and its heap. By default glibc returns a freed block above
    a (moving) threshold to the kernel, and the next allocation faults it back in page by
    page: about 4 us a page here, so a 1 MB activation costs 1 ms. Which run pays depends on
    where the other's frees left the heap, and it swung the per-epoch times by up to 30% from
    one run to the next. With the memory kept, each run pays for its own work only.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MiB is glibc's largest mmap threshold on 64-bit systems; larger blocks are mapped
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 1 << 25))


def _model_pair(name, layout):
    """The seed network ``name`` on cnnops (in ``layout``: "channels_last" or "nchw") and on
    torch.nn (as written, NCHW), with the same initial weights. -> (cnnops', torch.nn's)"""
    from cnnops.models import MODELS
    from cnnops.models.plain import PLAIN

    ours = MODELS[name][0]()
    theirs = PLAIN[name]()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if layout == "channels_last":
        # cnnops' outputs follow their input's or weight's layout, so channels_last weights
        # put every activation in channels_last
        ours.to(memory_format=torch.channels_last)
    return ours, theirs


def cmd_train(args):
    from cnnops.models.plain import PLAIN

    if args.distributed:
        return cmd_train_distributed(args, DISTRIBUTED_MODELS.get(args.model) or PLAIN[args.model])
    if args.model in DISTRIBUTED_MODELS:
        raise SystemExit("python -m cnnops train: --model %s is for --distributed runs; "
                         "choose one of %s" % (args.model, ", ".join(PLAIN)))
    kept = _keep_freed_memory()
    torch.manual_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = load_digits(seed=args.seed)
    ours, theirs = _model_pair(args.model, args.layout)
    print("cnnops %s: training %s on scikit-learn digits (%d train / %d test images, 1x28x28), "
          "%d epochs, batch %d, %d threads" % (cnnops.__version__, args.model, len(train_y),
                                               len(test_y), args.epochs, args.batch_size,
                                               torch.get_num_threads()))
    print("backend: %s (resolves to %r for this data); reference: torch.nn with the same "
          "initial weights and batches" % (cnnops.get_backend(), cnnops.backends.resolve(train_x)))
    print("layout: cnnops runs the network in %s; torch.nn as written (NCHW)" % (
        "channels_last (oneDNN's native CPU layout, which torch.compile also picks for CPU "
        "convolutions)" if args.layout == "channels_last" else "NCHW"))
    print("allocator: %s" % ("freed memory stays in the process (glibc mallopt), so neither run "
                             "pays page faults for the other's frees" if kept else
                             "not glibc; the epoch times include the allocator's page faults"))
    runs = {"cnnops": (ours, torch.optim.SGD(ours.parameters(), lr=args.lr, momentum=0.9)),
            "torch.nn": (theirs, torch.optim.SGD(theirs.parameters(), lr=args.lr, momentum=0.9))}
    history = {name: {"loss": [], "acc": [], "time": []} for name in runs}
    for epoch in range(1, args.epochs + 1):
        done = _train_epoch_alternating(runs, train_x, train_y, args.batch_size,
                                        _epoch_order(len(train_y), epoch), "epoch %d" % epoch)
        line = []
        for name, (model, _) in runs.items():
            loss, seconds = done[name]
            acc = _evaluate(model, test_x, test_y)
            for key, value in (("loss", loss), ("acc", acc), ("time", seconds)):
                history[name][key].append(value)
            line.append("%s loss %.4f test acc %.3f (%.2f s)" % (name, loss, acc, seconds))
        print("epoch %d/%d  %s" % (epoch, args.epochs, " | ".join(line)), flush=True)

    def per_epoch(name):  # the first epoch includes one-off warm-up; use the median
        times = sorted(history[name]["time"])
        return times[len(times) // 2]

    print("\n%-10s %9s %11s" % ("", "test acc", "s / epoch"))
    for name in runs:
        print("%-10s %9.3f %11.2f" % (name, history[name]["acc"][-1], per_epoch(name)))
    drift = max(abs(a - b) for a, b in zip(history["cnnops"]["loss"], history["torch.nn"]["loss"]))
    print("speed: cnnops runs at %.2fx the speed of torch.nn (median time per epoch)"
          % (per_epoch("torch.nn") / per_epoch("cnnops")))
    print("parity: largest difference in epoch loss between the two runs: %.2e" % drift)
    choices = cnnops.cpu_conv_choices()
    if choices:
        cores = [c["core"] for c in choices]
        print("cpu convolution core (%s): %s of the %d configurations measured "
              "(cnnops.explain(model, x) lists them)"
              % (cnnops.get_cpu_conv(),
                 ", ".join("%s for %d" % (core, cores.count(core))
                           for core in ("im2col", "onednn", "winograd") if core in cores),
                 len(cores)))
    if args.plot:
        _plot(history, args.plot, args.model)
        print("plot: %s" % args.plot)
    return 0

# ---------------------------------------------------------------------------
# train --distributed

def _resnet18_digits():
    """torchvision's ResNet-18 layout at width 16 for the digits (1 input channel, 10 classes):
    a BatchNorm after each of its 20 convolutions, each a synchronised one in a distributed run.
    [N, 1, 28, 28] -> [N, 10]"""
    from cnnops.models.plain import TvBasicBlock, TvResNet
    return TvResNet(TvBasicBlock, [2, 2, 2, 2], num_classes=10, in_channels=1, width=16)


# Plain torch.nn models the distributed run takes besides the seed networks (which have no
# BatchNorm to synchronise): name -> constructor
DISTRIBUTED_MODELS = {"resnet18_digits": _resnet18_digits}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_COMMAND = "torchrun --nproc_per_node 2 -m cnnops train --distributed"
# Largest difference from the one-process reference that counts as agreement, per dtype. In
# float32 the two runs' different summation orders differ by rounding that SGD amplifies
# step by step (as between any two float32 implementations of the same network): 1e-7
# after a step, 1e-3 after ten here. In float64 (the default) they stay within 1e-14.
PARITY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def cmd_train_distributed(args, build):
    """One of torchrun's processes training build() (a torch.nn model) with SyncBatchNorm fused
    by cnnops in DistributedDataParallel; rank 0 then checks it against one process."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        print("python -m cnnops train --distributed: %s not set, so this is not a torchrun "
              "process; launch it through torchrun, e.g.\n    %s"
              % (", ".join(missing), TORCHRUN_COMMAND), file=sys.stderr)
        return 2
    device = _init_distributed(args.device)
    try:
        return _train_distributed(args, build, device)
    finally:
        # DistributedDataParallel sits in reference cycles; one still alive when the group is
        # destroyed makes the process abort at exit now and then (gloo), so collect it first
        gc.collect()
        dist.destroy_process_group()


def _init_distributed(device):
    """Joins torchrun's process group: gloo for 'cpu', nccl for 'cuda' (on cuda:LOCAL_RANK).
    -> this process's torch.device."""
    if device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _train_distributed(args, build, device):
    """The distributed run, the reference run (rank 0) and the parity verdict, which every
    rank returns as its exit code."""
    rank, world = dist.get_rank(), dist.get_world_size()
    (train_x, train_y), (test_x, test_y) = load_digits(seed=args.seed)
    dtype = getattr(torch, args.dtype)
    data = ((train_x.to(device, dtype), train_y.to(device)),
            (test_x.to(device, dtype), test_y.to(device)))
    full = len(train_y) // (args.batch_size * world)
    steps = min(full, args.max_steps) if args.max_steps else full
    if steps == 0:
        if rank == 0:
            print("batch size %d x %d processes is more than the %d training images"
                  % (args.batch_size, world, len(train_y)), file=sys.stderr)
        return 2
    model, initial = _sync_bn_model(build, args.seed, device, dtype)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        print("cnnops %s: training %s on scikit-learn digits (%d train / %d test images, "
              "1x28x28), %d processes (%s, %s, %s), %d epochs of %d global batches of %d (%d "
              "per process), %d threads per process"
              % (cnnops.__version__, args.model, len(train_y), len(test_y), world,
                 dist.get_backend(), device.type, args.dtype, args.epochs, steps,
                 args.batch_size * world, args.batch_size, torch.get_num_threads()))
        print("model: torch.nn -> cnnops.nn.SyncBatchNorm.convert_sync_batchnorm -> cnnops.fuse "
              "-> DistributedDataParallel; reference: one process, the torch.nn model as built, "
              "the same initial weights and global batches")
        print(_fusion_line(model))
    losses = _distributed_epochs(ddp, args, data, steps, device)
    ok = True
    if rank == 0:
        reference, reference_losses = _reference_run(build, initial, args, data[0],
                                                     steps * args.batch_size * world, world)
        ok = _parity(model, reference, losses, reference_losses, PARITY_TOLERANCE[dtype])
    verdict = torch.tensor([int(ok)], device=device)
    dist.broadcast(verdict, src=0)
    return 0 if verdict.item() else 1


def _sync_bn_model(build, seed, device, dtype):
    """build() seeded with ``seed`` (the same weights on every rank), its BatchNorms turned
    into cnnops.nn.SyncBatchNorm (DistributedDataParallel refuses CPU models holding torch's
    nn.SyncBatchNorm), fused by cnnops, on ``device`` in ``dtype``.
    -> (model, its initial state_dict: copies, on the CPU)."""
    torch.manual_seed(seed)
    plain = build().to(dtype)
    initial = {name: value.clone() for name, value in plain.state_dict().items()}
    sync = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(plain)
    return cnnops.fuse(sync).to(device), initial


def _fusion_line(model):
    """How many of a fused model's SyncBatchNorm sites cnnops.fusion_report lists as fused."""
    modules = dict(model.named_modules())
    records = cnnops.fusion_report(model)
    sync = [r for r in records if isinstance(modules.get(r.name.split("@")[0]),
                                             (nn.SyncBatchNorm, cnnops.nn.SyncBatchNorm))]
    return ("cnnops.fuse: %d of %d SyncBatchNorm sites fused (%d fused sites in all)%s"
            % (sum(r.status == "fused" for r in sync), len(sync),
               sum(r.status == "fused" for r in records),
               "" if sync else "; this model has no BatchNorm"))


def _shard(order, steps, batch_size, world, rank):
    """This rank's images of the first ``steps`` global batches (batch_size * world images
    each) of ``order`` [N]: the rank-th batch_size slice of each. -> [steps * batch_size]"""
    used = order[:steps * batch_size * world]
    return used.view(steps, world, batch_size)[:, rank].reshape(-1)


def _distributed_epochs(ddp, args, data, steps, device):
    """Trains ``ddp`` on this rank's shard of each global batch for args.epochs; rank 0 prints
    a line per epoch. -> the mean training loss over every rank's images, per epoch."""
    (train_x, train_y), (test_x, test_y) = data
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    images = steps * args.batch_size
    losses = []
    for epoch in range(1, args.epochs + 1):
        mine = _shard(_epoch_order(len(train_y), epoch), steps, args.batch_size, world, rank)
        label = "epoch %d" % epoch if rank == 0 else None
        loss, seconds = _train_epoch(ddp, opt, train_x[mine], train_y[mine], args.batch_size,
                                     torch.arange(images), label)
        total = torch.tensor([loss * images], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        losses.append(total.item() / (images * world))
        rates = [None] * world
        dist.all_gather_object(rates, images / seconds)
        acc = _evaluate(ddp.module, test_x, test_y)
        if rank == 0:
            print("epoch %d/%d  loss %.4f test acc %.3f | rank throughput (images/s): %s"
                  % (epoch, args.epochs, losses[-1], acc,
                     ", ".join("%d: %.0f" % (r, rate) for r, rate in enumerate(rates))),
                  flush=True)
    return losses


def _reference_run(build, initial, args, train, images, world):
    """build() with its ordinary BatchNorm and the ``initial`` weights, trained in this process
    on the first ``images`` of each epoch's order in global batches of args.batch_size * world,
    loss averaged over each; prints a line per epoch. -> (model, mean loss per epoch)."""
    train_x, train_y = train
    model = build().to(train_x.device, train_x.dtype)
    model.load_state_dict(initial)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batch = args.batch_size * world
    losses = []
    for epoch in range(1, args.epochs + 1):
        used = _epoch_order(len(train_y), epoch)[:images]
        loss, seconds = _train_epoch(model, opt, train_x[used], train_y[used], batch,
                                     torch.arange(images), "reference epoch %d" % epoch)
        losses.append(loss)
        print("reference epoch %d/%d  loss %.4f | one process, batch %d (images/s): %.0f"
              % (epoch, args.epochs, loss, batch, images / seconds), flush=True)
    return model, losses


def _largest_difference(ours, theirs):
    """max |a - b| over the same-named tensors of two {name: tensor}; None when empty."""
    return max(((ours[name] - theirs[name]).abs().max().item() for name in theirs), default=None)


def _running_stats(model):
    """{name: tensor} of a model's BN running means and variances."""
    return {name: buffer for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def _parity(model, reference, losses, reference_losses, tolerance):
    """Prints the largest differences between the distributed and the reference run, and the
    verdict. -> True when each is below ``tolerance``."""
    loss = max(abs(a - b) for a, b in zip(losses, reference_losses))
    params = _largest_difference(dict(model.named_parameters()),
                                 dict(reference.named_parameters()))
    stats = _largest_difference(_running_stats(model), _running_stats(reference))
    print("parity: largest difference in epoch loss %.2e, in a parameter %.2e, in a BN running "
          "statistic %s" % (loss, params, "-, no BatchNorm" if stats is None else "%.2e" % stats))
    ok = all(d < tolerance for d in (loss, params, 0.0 if stats is None else stats))
    print("parity: %s (tolerance %g)" % ("ok" if ok else "FAILED", tolerance))
    return ok


def _plot(history, path, model_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, style in (("cnnops", "-o"), ("torch.nn", "--x")):
        epochs = range(1, len(history[name]["loss"]) + 1)
        ax_loss.plot(epochs, history[name]["loss"], style, label=name)
        ax_acc.plot(epochs, history[name]["acc"], style, label=name)
    ax_loss.set(title="%s: training loss" % model_name, xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# check

def _parity_cases():
    """(name, cnnops call, torch call, inputs needing gradients) on small random data."""
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    x, w, b = t(4, 6, 9, 9), t(8, 3, 3, 3), t(8)
    bw, bb, r = t(8), t(8), t(4, 8, 5, 5)
    rm, rv = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    x8 = t(4, 8, 5, 5)
    return [
        ("conv2d", lambda: CF.conv2d(x, w, b, 2, 1, 1, 2),
         lambda: F.conv2d(x, w, b, 2, 1, 1, 2), (x, w, b)),
        ("batch_norm (train)", lambda: CF.batch_norm(x8, rm.clone(), rv.clone(), bw, bb, True),
         lambda: F.batch_norm(x8, rm.clone(), rv.clone(), bw, bb, True), (x8, bw, bb)),
        ("bn_relu + residual", lambda: CF.bn_relu(x8, rm, rv, bw, bb, residual=r),
         lambda: F.relu(F.batch_norm(x8, rm, rv, bw, bb) + r), (x8, bw, bb, r)),
        ("conv_bn_relu (train)",
         lambda: CF.conv_bn_relu(x, w, b, bw, bb, rm.clone(), rv.clone(), 2, 1, 1, 2, True),
         lambda: F.relu(F.batch_norm(F.conv2d(x, w, b, 2, 1, 1, 2), rm.clone(), rv.clone(), bw,
                                     bb, True)), (x, w, b, bw, bb)),
        ("conv_bn_relu (eval)",
         lambda: CF.conv_bn_relu(x, w, b, bw, bb, rm, rv, 2, 1, 1, 2, residual=r),
         lambda: F.relu(F.batch_norm(F.conv2d(x, w, b, 2, 1, 1, 2), rm, rv, bw, bb) + r),
         (x, w, b, bw, bb, r)),
        ("max_pool2d", lambda: CF.max_pool2d(x, 3, 2, 1, ceil_mode=True),
         lambda: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), (x,)),
        ("avg_pool2d", lambda: CF.avg_pool2d(x, 3, 2, 1, True, False),
         lambda: F.avg_pool2d(x, 3, 2, 1, True, False), (x,)),
        ("adaptive_avg_pool2d", lambda: CF.adaptive_avg_pool2d(x, (4, 5)),
         lambda: F.adaptive_avg_pool2d(x, (4, 5)), (x,)),
        ("add_relu", lambda: CF.add_relu(x8, r), lambda: F.relu(x8 + r), (x8, r)),
    ]


def _max_error(ours, theirs, inputs):
    a, b = ours(), theirs()
    seed = torch.Generator().manual_seed(1)
    grad = torch.randn(b.shape, generator=seed, dtype=b.dtype)
    ga = torch.autograd.grad(a, inputs, grad)
    gb = torch.autograd.grad(b, inputs, grad)
    return max([(a - b).abs().max().item()] + [(p - q).abs().max().item() for p, q in zip(ga, gb)])


def _median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ResNet-18 layers at batch 8: (in channels, size, out channels, kernel, stride, padding)
RESNET18_LAYERS = [(64, 56, 64, 3, 1, 1), (128, 28, 128, 3, 1, 1), (256, 14, 256, 3, 1, 1),
                   (512, 7, 512, 3, 1, 1), (3, 224, 64, 7, 2, 3), (64, 56, 128, 3, 2, 1),
                   (128, 28, 256, 3, 2, 1), (256, 14, 512, 3, 2, 1), (64, 56, 128, 1, 2, 0)]


def _speed_table(repeat, batch):
    print("\nCPU time, cnnops `cpu` backend vs torch eager (ratio > 1: cnnops faster), batch %d, "
          "%d threads, median of %d:" % (batch, torch.get_num_threads(), repeat))
    print("%-22s %-19s %10s %10s %7s" % ("layer", "op", "torch ms", "cnnops ms", "ratio"))
    for C, H, OC, k, s, p in RESNET18_LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, C, H, H, generator=g)
        w = torch.randn(OC, C, k, k, generator=g) * (2.0 / (C * k * k)) ** 0.5
        bw, bb = torch.rand(OC, generator=g) + 0.5, torch.randn(OC, generator=g)
        rm, rv = torch.randn(OC, generator=g), torch.rand(OC, generator=g) + 0.5
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        bwg, bbg = bw.clone().requires_grad_(), bb.clone().requires_grad_()

        def train(fn):
            def step():
                fn(xg, wg, bwg, bbg).sum().backward()
            return step

        cases = [
            ("conv2d eval", lambda: F.conv2d(x, w, None, s, p), lambda: CF.conv2d(x, w, None, s, p),
             True),
            ("conv2d train", train(lambda x, w, g_, b_: F.conv2d(x, w, None, s, p)),
             train(lambda x, w, g_, b_: CF.conv2d(x, w, None, s, p)), False),
            ("conv_bn_relu eval",
             lambda: F.relu(F.batch_norm(F.conv2d(x, w, None, s, p), rm, rv, bw, bb)),
             lambda: CF.conv_bn_relu(x, w, None, bw, bb, rm, rv, s, p), True),
            ("conv_bn_relu train",
             train(lambda x, w, g_, b_: F.relu(F.batch_norm(F.conv2d(x, w, None, s, p), rm.clone(),
                                                            rv.clone(), g_, b_, True))),
             train(lambda x, w, g_, b_: CF.conv_bn_relu(x, w, None, g_, b_, rm.clone(), rv.clone(),
                                                        s, p, training=True)), False),
        ]
        layer = "%dx%dx%d k%d s%d -> %d" % (C, H, H, k, s, OC)
        for name, theirs, ours, no_grad in cases:
            with torch.set_grad_enabled(not no_grad), cnnops.use_backend("cpu"):
                t_torch = _median_time(theirs, repeat)
                t_ours = _median_time(ours, repeat)
            print("%-22s %-19s %10.2f %10.2f %7.2f" % (layer, name, 1e3 * t_torch, 1e3 * t_ours,
                                                         t_torch / t_ours), flush=True)


def cmd_check(args):
    print("cnnops %s, torch %s" % (cnnops.__version__, torch.__version__))
    print("extension: %s" % ("loaded, built for torch %s%s" % (
        cnnops._ext.BUILD_INFO["torch_version"], " with CUDA" if cnnops._ext.WITH_CUDA else "")
        if cnnops._ext.LOADED else "not loaded: %s" % cnnops._ext.ERROR))
    backends = cnnops.available_backends()
    print("backends available: %s; setting: %s" % (", ".join(backends), cnnops.get_backend()))
    cpu_backends = [b for b in backends if b in ("cpu", "reference")]
    print("\nlargest |cnnops - torch| over output and gradients (float64):")
    print("%-22s" % "op" + "".join("%14s" % b for b in cpu_backends))
    worst = 0.0
    for name, ours, theirs, inputs in _parity_cases():
        errors = []
        for backend in cpu_backends:
            with cnnops.use_backend(backend):
                errors.append(_max_error(ours, theirs, inputs))
        worst = max([worst] + errors)
        print("%-22s" % name + "".join("%14.1e" % e for e in errors))
    ok = worst < 1e-8
    print("parity: %s (largest error %.1e, tolerance 1e-8)" % ("ok" if ok else "FAILED", worst))
    if args.speed:
        if "cpu" not in backends:
            print("speed: skipped, the cpu backend is not available")
        else:
            _speed_table(args.repeat, args.batch)
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# models

def cmd_models(args):
    from torch.utils.flop_counter import FlopCounterMode

    from cnnops.models import MODELS
    print("%-18s %14s %10s %-18s %-16s" % ("model", "parameters", "GFLOPs", "input", "output"))
    for name, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model(torch.randn(shape))
        print("%-18s %14s %10.3f %-18s %-16s" % (name, "{:,}".format(params),
                                                 counter.get_total_flops() / 1e9,
                                                 "x".join(map(str, shape)),
                                                 "x".join(map(str, out.shape))), flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cnnops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a seed network on digits, cnnops vs torch.nn")
    train.add_argument("--model", default=None,
                       choices=["residual_net", "inception_net", "lenet"] + list(DISTRIBUTED_MODELS),
                       help="default: residual_net; with --distributed resnet18_digits "
                            "(ResNet-18 at width 16, with BatchNorm to synchronise)")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=0.02)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--plot", default=os.path.join("runs", "digits.png"),
                       help="where to save the loss/accuracy plot ('' for none; not with "
                            "--distributed)")
    train.add_argument("--layout", default=None, choices=["channels_last", "nchw"],
                       help="the memory format cnnops runs the network in; torch.nn runs it as "
                            "written, NCHW (default: channels_last; not with --distributed)")
    train.add_argument("--distributed", action="store_true",
                       help="one of torchrun's processes: %s" % TORCHRUN_COMMAND)
    train.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="with --distributed: gloo on the CPU, nccl on cuda:LOCAL_RANK")
    train.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                       help="with --distributed: float64 (the default) lets the comparison "
                            "with one process be exact; float32 rounding grows over the steps")
    train.add_argument("--max-steps", type=int, default=0,
                       help="with --distributed: global batches per epoch at most (0: all)")
    check = sub.add_parser("check", help="backends and op parity on this machine")
    check.add_argument("--speed", action="store_true", help="also time ResNet-18 layers")
    check.add_argument("--repeat", type=int, default=5)
    check.add_argument("--batch", type=int, default=8)
    sub.add_parser("models", help="parameters, FLOPs and output shape of every model")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"] + (argv or []))
    if args.command == "train" and args.model is None:
        args.model = "resnet18_digits" if args.distributed else "residual_net"
    if args.command == "train" and args.distributed and args.layout is not None:
        train.error("--layout is for single-process runs")
    if args.command == "train" and args.layout is None:
        args.layout = "channels_last"
    if args.command == "train" and args.max_steps < 0:
        train.error("--max-steps must be 0 (no limit) or more")
    if args.command == "train" and not args.distributed and (
            args.device != "cpu" or args.max_steps or args.dtype != "float64"):
        train.error("--device, --dtype and --max-steps apply with --distributed")
    return {"train": cmd_train, "check": cmd_check, "models": cmd_models}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
