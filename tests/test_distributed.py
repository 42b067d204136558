"""Synchronised BatchNorm (cnnops.distributed) across processes, on the CPU with gloo.

Each scenario runs in 2 or 3 processes spawned on the loopback interface, with a short
process-group timeout and a deadline on the whole run, so that a hang fails instead of
stalling CI. The reference is one process running plain torch.nn.BatchNorm2d over the
concatenation of every rank's batch. A few spawns run every scenario of their world size
(starting a process and importing torch is most of the cost); the tests then check each
scenario's result.
"""
import datetime
import multiprocessing
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from cnnops import backends

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

BACKENDS = [b for b in ("cpu", "reference", "triton")
            if backends._unavailable(b, torch.empty(0)) is None]
DEADLINE = 90          # seconds for a whole spawn
GROUP_TIMEOUT = 20     # seconds a collective may wait (init_process_group's timeout)
TOL = 1e-9             # float64 throughout


# ---------------------------------------------------------------------------
# Spawning

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, scenarios, results, pg_backend):
    torch.set_num_threads(1)
    if pg_backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(pg_backend, init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    try:
        for name in scenarios:
            try:
                value = SCENARIOS[name](rank, world)
            except Exception as e:  # reported to the test, which fails with it
                results.put((rank, name, {"error": "%s\n%s" % (e, traceback.format_exc())}))
                break  # the other ranks may be inside a collective of this scenario
            results.put((rank, name, value))
    finally:
        dist.destroy_process_group()


def spawn(world, scenarios, deadline=DEADLINE, pg_backend="gloo"):
    """Runs each named scenario on every one of ``world`` processes.
    -> {scenario: {rank: result dict}}; raises if the processes overrun the deadline."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenarios, results, pg_backend))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {name: {} for name in scenarios}
    end = time.monotonic() + deadline
    try:
        for _ in range(world * len(scenarios)):
            try:
                rank, name, value = results.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("the %d processes did not finish %s within %d s; results "
                                   "so far: %s" % (world, scenarios, deadline, out)) from None
            out[name][rank] = value
    finally:
        for p in procs:
            p.join(max(0.1, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    return out


# ---------------------------------------------------------------------------
# Scenario helpers (run inside the workers)

def _data(sizes, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n,) + shape, generator=g, dtype=torch.float64) for n in sizes]


def _shard(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


class Block(nn.Module):
    """conv -> BN -> ReLU, conv -> BN -> + x -> ReLU, and a BN alone (pre-activation)."""

    def __init__(self, norm=nn.BatchNorm2d, c=6):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.bn2 = norm(c, momentum=None)  # cumulative average
        self.bn3 = norm(c, affine=False)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + x)
        return self.bn3(y)


def _models(group=None, sync=nn.SyncBatchNorm):
    """(fused SyncBN model, plain BatchNorm2d twin) with the same float64 weights. ``sync``:
    torch's nn.SyncBatchNorm or cnnops.nn.SyncBatchNorm (DistributedDataParallel refuses CPU
    models holding torch's)."""
    torch.manual_seed(0)
    plain = Block().double()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = sync.convert_sync_batchnorm(Block().double(), process_group=group)
    model.load_state_dict(plain.state_dict())
    return cnnops.fuse(model), plain


def _ddp_against_reference(rank, world, sizes, backend, group=None, members=None, steps=3):
    """Trains the fused SyncBN model under DDP (``steps`` SGD steps) on ranks ``members`` and
    the plain model in this process on the concatenated batches; the largest differences."""
    members = list(range(world)) if members is None else members
    fused, plain = _models(group, cnnops.nn.SyncBatchNorm)
    xs = _data(sizes, 6, 5, 5, seed=1)
    gs = _data(sizes, 6, 5, 5, seed=2)  # the loss is sum(output * g)
    ddp = nn.parallel.DistributedDataParallel(fused, process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    # DDP averages the ranks' gradients: 1/len(members) of the reference's (whose loss sums
    # every rank's), so the reference steps with 1/len(members) of the learning rate.
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.1 / len(members))
    me = members.index(rank)
    errors = {"output": 0.0, "input grad": 0.0, "param grad": 0.0, "buffers": 0.0}
    for step in range(steps):
        x = torch.cat([t * (step + 1) for t in xs]).requires_grad_()  # a different batch each step
        g = torch.cat(gs)
        ref_out = plain(x)
        ref_out.backward(g)
        mine = _shard(x.detach(), sizes, me).clone().requires_grad_()
        with cnnops.use_backend(backend):
            out = ddp(mine)
            out.backward(_shard(g, sizes, me))
        errors["output"] = max(errors["output"], _max_diff(out, _shard(ref_out, sizes, me)))
        errors["input grad"] = max(errors["input grad"],
                                   _max_diff(mine.grad, _shard(x.grad, sizes, me)))
        for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
            errors["param grad"] = max(errors["param grad"], _max_diff(p.grad * len(members),
                                                                       q.grad))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        errors["buffers"] = max(errors["buffers"], _max_diff(a.double(), b.double()))
    errors["num_batches_tracked"] = fused.bn1.num_batches_tracked.item()
    return errors


# ---------------------------------------------------------------------------
# Scenarios: name -> fn(rank, world) -> dict

def _ddp_even(backend):
    return lambda rank, world: _ddp_against_reference(rank, world, [3] * world, backend)


def _ddp_uneven(rank, world):
    return _ddp_against_reference(rank, world, [3, 0, 2][:world], "cpu")


def _ddp_subgroup(rank, world):
    """Ranks 0 and 2 synchronise in their own group; rank 1 is a group of its own (which
    needs no communication: the local BN)."""
    group = dist.new_group([0, 2])  # every rank creates every group
    alone = dist.new_group([1])
    if rank == 1:
        fused, plain = _models(alone)
        x = _data([4], 6, 5, 5)[0]
        return {"alone": _max_diff(fused(x), plain(x))}
    return _ddp_against_reference(rank, world, [2, 3], "cpu", group=group, members=[0, 2])


def _functional(rank, world, device="cpu", names=BACKENDS):
    """cnnops.functional with process_group=: conv_bn_relu and bn_relu, channels_last input,
    a residual, backward, running statistics, on each backend of ``names``."""
    sizes = [2, 3, 1][:world]
    out = {}
    on = dict(dtype=torch.float64, device=device)
    for backend in names:
        x, = _data([sum(sizes)], 4, 5, 5, seed=3)
        x = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(5, 4, 3, 3, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(4)).to(device)
        w.requires_grad_()
        bw = torch.linspace(0.5, 1.5, 5, **on).requires_grad_()
        bb = torch.linspace(-1, 1, 5, **on).requires_grad_()
        r, = _data([sum(sizes)], 5, 5, 5, seed=5)
        r = r.to(device).requires_grad_()
        stats = lambda: (torch.zeros(5, **on), torch.ones(5, **on))
        rm, rv = stats()
        y = F.conv2d(x, w, None, 1, 1)
        ref = F.relu(F.batch_norm(y, rm, rv, bw, bb, True, 0.3) + r)
        ref2 = F.relu(F.batch_norm(ref, None, None, None, None, True))
        (ref2 * ref2.detach().cos()).sum().backward()
        xs, rs = _shard(x.detach(), sizes, rank).requires_grad_(), _shard(r.detach(), sizes,
                                                                          rank).requires_grad_()
        ws, bws, bbs = (t.detach().clone().requires_grad_() for t in (w, bw, bb))
        rms, rvs = stats()
        with cnnops.use_backend(backend):
            o = CF.conv_bn_relu(xs, ws, None, bws, bbs, rms, rvs, padding=1, training=True,
                                momentum=0.3, residual=rs, process_group=dist.group.WORLD)
            o2 = CF.bn_relu(o, None, None, None, None, training=True,
                            process_group=dist.group.WORLD)
            (o2 * o2.detach().cos()).sum().backward()
        grads = []
        for mine, theirs in ((ws, w), (bws, bw), (bbs, bb)):
            total = mine.grad.clone()
            dist.all_reduce(total)
            grads.append(_max_diff(total, theirs.grad))
        out[backend] = {
            "output": _max_diff(o2, _shard(ref2, sizes, rank)),
            "input grad": _max_diff(xs.grad, _shard(x.grad, sizes, rank)),
            "residual grad": _max_diff(rs.grad, _shard(r.grad, sizes, rank)),
            "param grad": max(grads),
            "running stats": max(_max_diff(rms, rm), _max_diff(rvs, rv)),
            "channels_last": o.is_contiguous(memory_format=torch.channels_last),
        }
    return out


def _eval_no_communication(rank, world):
    """Eval mode communicates nothing: rank 0 runs forwards the others do not (a collective
    would wait for them, and time out); then every rank meets at a barrier."""
    fused, plain = _models(dist.group.WORLD)
    fused.eval()
    plain.eval()
    diff = 0.0
    if rank == 0:
        x = _data([2], 6, 5, 5)[0]
        for _ in range(2):
            diff = max(diff, _max_diff(fused(x), plain(x)))
    dist.barrier()
    return {"diff": diff}


def _fuse_report(rank, world):
    out = {"lean_refused": False}
    x = torch.randn(2, 3, 5, 5)
    try:  # refused before any collective, so no rank waits
        CF.conv_bn_relu(x, torch.randn(4, 3, 3, 3), None, None, None, None, None, training=True,
                        process_group=dist.group.WORLD, memory="lean")
    except NotImplementedError:
        out["lean_refused"] = True
    for sync in (nn.SyncBatchNorm, cnnops.nn.SyncBatchNorm):
        fused, plain = _models(sync=sync)
        records = {r.name: r for r in cnnops.fusion_report(fused)}
        out[sync.__module__] = {
            "sites": {name: (r.pattern, r.status, r.reason) for name, r in records.items()},
            "keys": list(fused.state_dict()) == list(plain.state_dict()),
            "types": sorted({type(m).__name__ for m in fused.modules()} - {"Block", "Conv2d"})}
    return out


def _compiled(rank, world):
    """torch.compile of the fused SyncBN model: the synchronised step is a graph break and runs
    eagerly; the result matches the eager one."""
    fused, _ = _models()
    fused.bn2.momentum = 0.1  # (a cumulative average reads num_batches_tracked: a graph break)
    x = _data([3], 6, 5, 5, seed=rank)[0]
    eager = fused(x)
    compiled = torch.compile(fused, backend="aot_eager")
    return {"diff": _max_diff(compiled(x), eager)}


def _rank_raises(rank, world):
    """Rank 1 raises before the collective (a bad argument on one rank) and its process exits;
    rank 0 waits in the collective until gloo notices and raises."""
    fused, _ = _models(dist.group.WORLD)
    if rank == 1:
        fused(torch.randn(2, 5, 5, 5, dtype=torch.float64))  # 5 channels: ValueError
        return {}
    start = time.monotonic()
    try:
        fused(_data([2], 6, 5, 5)[0])
        return {"raised": None}
    except Exception as e:
        return {"raised": type(e).__name__, "message": str(e)[:200],
                "seconds": time.monotonic() - start}


def _gpu_backends():
    return [b for b in ("cuda", "triton")
            if backends._unavailable(b, torch.empty(0, device="cuda")) is None]


def _functional_gpu(rank, world):
    """_functional on CUDA tensors with the GPU backends (each rank on its own device with
    nccl, all on device 0 with gloo)."""
    return _functional(rank, world, "cuda", _gpu_backends())


SCENARIOS = dict(
    {"ddp_" + b: _ddp_even(b) for b in BACKENDS},
    functional_gpu=_functional_gpu,
    ddp_uneven=_ddp_uneven, ddp_subgroup=_ddp_subgroup, functional=_functional,
    eval=_eval_no_communication, fuse=_fuse_report, compiled=_compiled,
    rank_raises=_rank_raises)


# ---------------------------------------------------------------------------
# The spawns (one per world size) and the tests

TWO = ["ddp_" + b for b in BACKENDS] + ["functional", "eval", "fuse", "compiled"]
THREE = ["ddp_uneven", "ddp_subgroup", "functional"]


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(2, TWO)


@pytest.fixture(scope="module")
def three_ranks():
    return spawn(3, THREE)


def _ok(results):
    """{rank: value} with no rank's scenario raising."""
    for rank, value in results.items():
        assert "error" not in value, "rank %d: %s" % (rank, value["error"])
    return results


def _assert_ddp(results, steps=3):
    for rank, errors in _ok(results).items():
        for what in ("output", "input grad", "param grad", "buffers"):
            assert errors[what] < TOL, (rank, what, errors)
        assert errors["num_batches_tracked"] == steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_matches_one_process_batch_norm(two_ranks, backend):
    """Fused SyncBN under DDP == plain BatchNorm on the concatenated batch: outputs, input
    gradients, parameter gradients after DDP's averaging, running statistics and weights after
    three SGD steps."""
    _assert_ddp(two_ranks["ddp_" + backend])


def test_uneven_batches_and_an_empty_one(three_ranks):
    _assert_ddp(three_ranks["ddp_uneven"])


def test_a_group_that_is_a_subset_of_the_ranks(three_ranks):
    results = _ok(three_ranks["ddp_subgroup"])
    assert results[1]["alone"] < TOL
    _assert_ddp({r: results[r] for r in (0, 2)})


def _assert_functional(results, names):
    for rank, per_backend in _ok(results).items():
        assert sorted(per_backend) == sorted(names)
        for backend, errors in per_backend.items():
            # (the reference backend makes no layout promise: its im2col returns NCHW)
            assert errors.pop("channels_last") or backend == "reference", (rank, backend)
            assert max(errors.values()) < TOL, (rank, backend, errors)


@pytest.mark.parametrize("world", [2, 3])
def test_functional_ops_with_a_process_group(two_ranks, three_ranks, world):
    _assert_functional((two_ranks if world == 2 else three_ranks)["functional"], BACKENDS)


def test_eval_mode_communicates_nothing(two_ranks):
    for rank, value in _ok(two_ranks["eval"]).items():
        assert value["diff"] < TOL


def test_fuse_fuses_sync_batch_norm_and_keeps_the_state_dict(two_ranks):
    """torch's nn.SyncBatchNorm and cnnops.nn.SyncBatchNorm alike: every site fused (a BN
    alone too: torch's SyncBatchNorm runs on GPUs only), the modules and keys unchanged."""
    results = dict(_ok(two_ranks["fuse"])[0])
    assert results.pop("lean_refused")  # memory="lean" with a process_group: not implemented
    for module, value in results.items():
        assert value["keys"]
        assert value["types"] == ["SyncBatchNorm"], module
        sites = value["sites"]
        assert sites["bn1"][:2] == ("conv-bn-relu", "fused")
        assert sites["bn2"][:2] == ("conv-bn-add-relu", "fused")
        assert sites["bn3"][:2] == ("bn", "fused")
        assert all("synchronised over its process group" in s[2] for s in sites.values())


def test_torch_compile_runs_the_synchronised_step_eagerly(two_ranks):
    for rank, value in _ok(two_ranks["compiled"]).items():
        assert value["diff"] < TOL


def test_a_rank_that_raises_does_not_leave_the_others_hanging():
    """The failing rank's process exits; gloo closes its connections and the waiting rank's
    collective raises at once, well within the group timeout."""
    results = spawn(2, ["rank_raises"])["rank_raises"]
    assert "expected" in results[1]["error"] and "channels" in results[1]["error"]
    assert results[0]["raised"] is not None, results[0]
    assert results[0]["seconds"] < GROUP_TIMEOUT + 5, results[0]


needs_gpu = [pytest.mark.cuda,
             pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("pg_backend", [
    pytest.param("nccl", marks=needs_gpu + [pytest.mark.skipif(
        torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
        reason="nccl needs two CUDA devices")]),
    pytest.param("gloo", marks=needs_gpu)])
def test_gpu_backends_synchronise(pg_backend):
    """The cuda and triton backends' synchronised BN on CUDA tensors: over nccl with a device
    per rank, and over gloo (which takes the statistics through host memory) with both ranks
    on one device."""
    if not _gpu_backends():
        pytest.skip("no GPU backend is available here")
    _assert_functional(spawn(2, ["functional_gpu"], pg_backend=pg_backend)["functional_gpu"],
                       _gpu_backends())


# ---------------------------------------------------------------------------
# Single process

def test_process_group_must_be_a_process_group():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="process_group"):
        CF.bn_relu(x, None, None, None, None, training=True, process_group="world")
    # eval mode: nothing to synchronise, the argument is not consulted
    CF.bn_relu(x, torch.zeros(3), torch.ones(3), None, None, process_group="world")


def test_a_group_of_one_process_runs_the_local_op(tmp_path):
    dist.init_process_group("gloo", init_method="file://%s" % (tmp_path / "store"), rank=0,
                            world_size=1)
    try:
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        out = CF.bn_relu(x, None, None, None, None, training=True,
                         process_group=dist.group.WORLD)
        assert torch.allclose(out, F.relu(F.batch_norm(x, None, None, training=True)))
    finally:
        dist.destroy_process_group()
