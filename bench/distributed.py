"""What synchronising BatchNorm costs: training steps of a fused model on 2 ranks against 1.

    python bench/distributed.py [--steps 10] [--rounds 3] [--out bench/results]

Each rank is a process with one thread (gloo on the loopback interface, so on a 2-core
machine the 2 ranks take a core each, and the 1-rank run is timed with one thread too).
Per model (cnnops.fuse of a plain torch.nn network, float32, batch per rank as listed):

    1 rank, BN        one process: fused BatchNorm2d, no communication
    2 ranks, BN       DistributedDataParallel, fused BatchNorm2d (local statistics):
                      what data parallelism costs without synchronised BN
    2 ranks, SyncBN   DistributedDataParallel, fused cnnops.nn.SyncBatchNorm: statistics
                      all-gathered in every BN's forward and its sums all-reduced in backward

The two 2-rank variants alternate round by round in the same processes; each time is the
median step time of rank 0 over its rounds. Writes distributed.json (raw) and
distributed.md (the table) under --out, and prints the table.
"""
import argparse
import datetime
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name -> (plain torch.nn model, input [C, H, W] of one image, classes, batch per rank):
# the main job's distributed model, and ResNet-18 at 64x64
MODELS = {
    "resnet18_digits": ("resnet18_digits", (1, 28, 28), 10, 32),
    "resnet18": ("resnet18", (3, 64, 64), 1000, 8),
}


def _build(name):
    from cnnops.__main__ import DISTRIBUTED_MODELS
    from plain_models import TWINS
    return DISTRIBUTED_MODELS[name]() if name in DISTRIBUTED_MODELS else TWINS[name][0]()


def _model(name, sync):
    import cnnops
    torch.manual_seed(0)
    model = _build(MODELS[name][0])
    if sync:
        model = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return cnnops.fuse(model)


def _step_times(model, opt, batch, steps):
    """Seconds per training step (cross-entropy, SGD), each step timed alone."""
    x, y = batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def _batch(name, rank):
    _, shape, classes, per_rank = MODELS[name]
    g = torch.Generator().manual_seed(rank)
    return (torch.randn((per_rank,) + shape, generator=g),
            torch.randint(0, classes, (per_rank,), generator=g))


def _time_variants(variants, name, rank, steps, rounds):
    """{variant: median seconds per step}: the variants alternate, one warm-up round first."""
    runs = {}
    for label, model in variants.items():
        runs[label] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    batch = _batch(name, rank)
    times = {label: [] for label in variants}
    for r in range(rounds + 1):
        for label, (model, opt) in runs.items():
            t = _step_times(model, opt, batch, steps)
            if r > 0:
                times[label] += t
    return {label: statistics.median(t) for label, t in times.items()}


def _worker(rank, world, port, names, steps, rounds, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for name in names:
            ddp = lambda m: nn.parallel.DistributedDataParallel(m)
            variants = {"2 ranks, BN": ddp(_model(name, False)),
                        "2 ranks, SyncBN": ddp(_model(name, True))}
            out = _time_variants(variants, name, rank, steps, rounds)
            if rank == 0:
                results.put((name, out))
    finally:
        dist.destroy_process_group()


def _one_rank(name, steps, rounds):
    torch.set_num_threads(1)
    return _time_variants({"1 rank, BN": _model(name, False)}, name, 0, steps, rounds)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(results):
    lines = ["| model (batch per rank) | 1 rank, BN (ms) | 2 ranks, BN (ms) | 2 ranks, SyncBN (ms) "
             "| SyncBN / BN, 2 ranks | 2-rank SyncBN / 1-rank step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, t in results.items():
        one, local, sync = t["1 rank, BN"], t["2 ranks, BN"], t["2 ranks, SyncBN"]
        lines.append("| %s (%d) | %.1f | %.1f | %.1f | %.2fx | %.2fx |"
                     % (name, MODELS[name][3], 1e3 * one, 1e3 * local, 1e3 * sync, sync / local,
                        sync / one))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    results = {name: _one_rank(name, args.steps, args.rounds) for name in args.models}
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args.models, args.steps, args.rounds,
                                               queue)) for r in range(2)]
    for p in procs:
        p.start()
    for _ in args.models:
        name, times = queue.get(timeout=1800)
        results[name].update(times)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit("rank process failed with exit status %s" % p.exitcode)

    import cnnops
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, cnnops=cnnops.__version__, cpu=platform.processor()
                or platform.machine(), cores=os.cpu_count(), threads_per_rank=1,
                steps=args.steps, rounds=args.rounds, backend=cnnops.backends.resolve(
                    torch.empty(0)))
    table = _table(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(dict(meta, seconds_per_step=results), f, indent=1)
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write("# Synchronised BatchNorm: training step times (CPU, gloo)\n\n"
                "`python bench/distributed.py` on %(date)s: torch %(torch)s, %(cores)d cores, "
                "one thread per rank, backend `%(backend)s`, median of %(rounds)d rounds of "
                "%(steps)d steps (rank 0).\n\n" % meta + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
