"""Per-channel kernels of BatchNorm: statistics, normalise + affine + residual + ReLU, backward.

Every kernel walks an [N, C, H, W] tensor as a 2-D grid of [BLOCK_R, BLOCK_C] tiles,
rows r = (n, h, w) over N*H*W and columns over channels, addressing memory through
the strides. For NCHW the tile is tall (rows are contiguous within a plane), for
channels_last it is wide (channels are contiguous), so loads are coalesced in both
layouts without a copy.

Statistics are merged from per-tile Welford moments (count, mean, M2) with Chan's
formula, in float32 (float64 for float64 input): stable where sum/sum-of-squares
would cancel, and deterministic because partials are merged in tile order.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _common as common
from ._common import zeros


@triton.jit
def _row_offsets(rr, HW, W, sn, sh, sw):
    """Memory offsets (int64) of rows r = n*H*W + h*W + w."""
    n = rr // HW
    hw = rr % HW
    return n.to(tl.int64) * sn + (hw // W).to(tl.int64) * sh + (hw % W).to(tl.int64) * sw


@triton.jit
def _moments_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, R, C, HW, W, sn, sc, sh, sw, ROWS,
                    FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Welford moments of rows [pid_r*ROWS, (pid_r+1)*ROWS) for a block of channels.
    pid_r = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    c_off = rc.to(tl.int64) * sc
    start = pid_r * ROWS
    end = tl.minimum(start + ROWS, R)
    mean = zeros(BLOCK_C, FP64)
    m2 = zeros(BLOCK_C, FP64)
    # Counts and merge weights in float64: exact integers, and weights as precise as the
    # float64 moments they scale.
    count = tl.sum(tl.zeros((1,), dtype=tl.float64), axis=0)
    for r0 in range(start, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < end
        ok = r_ok[:, None] & c_ok[None, :]
        offs = _row_offsets(rr, HW, W, sn, sh, sw)
        v = tl.load(x_ptr + offs[:, None] + c_off[None, :], mask=ok, other=0.0).to(mean.dtype)
        nb = tl.sum(r_ok.to(tl.float64), axis=0)
        tile_mean = tl.sum(v, axis=0) / nb.to(mean.dtype)
        dev = tl.where(ok, v - tile_mean[None, :], 0.0)
        total = count + nb
        delta = tile_mean - mean
        mean += delta * (nb / total).to(mean.dtype)
        m2 += tl.sum(dev * dev, axis=0) + delta * delta * (count * nb / total).to(mean.dtype)
        count = total
    tl.store(cnt_ptr + pid_r, count.to(tl.float32))
    tl.store(mean_ptr + pid_r.to(tl.int64) * C + rc, mean, mask=c_ok)
    tl.store(m2_ptr + pid_r.to(tl.int64) * C + rc, m2, mask=c_ok)


@triton.jit
def _combine_kernel(cnt_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, T, C,
                    FP64: tl.constexpr, BLOCK_C: tl.constexpr):
    # Chan's merge of T partials per channel, in partial order; a zero count is skipped.
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mean = zeros(BLOCK_C, FP64)
    m2 = zeros(BLOCK_C, FP64)
    count = tl.sum(tl.zeros((1,), dtype=tl.float64), axis=0)  # float64: see _moments_kernel
    for t in range(T):
        nb = tl.load(cnt_ptr + t).to(tl.float64)
        total = count + nb
        w = nb / tl.maximum(total, 1.0)
        mb = tl.load(mean_ptr + t * C + rc, mask=c_ok, other=0.0)
        m2b = tl.load(m2_ptr + t * C + rc, mask=c_ok, other=0.0)
        delta = mb - mean
        has = nb > 0
        mean = tl.where(has, mean + delta * w.to(mean.dtype), mean)
        m2 = tl.where(has, m2 + m2b + delta * delta * (count * w).to(mean.dtype), m2)
        count = total
    var = m2 / count.to(mean.dtype)  # NaN for an empty batch, as PyTorch's batch statistics
    mean = tl.where(count > 0, mean, var)
    tl.store(out_mean_ptr + rc, mean, mask=c_ok)
    tl.store(out_var_ptr + rc, var, mask=c_ok)


@triton.jit
def _apply_kernel(x_ptr, res_ptr, out_ptr, mean_ptr, scale_ptr, shift_ptr,
                  R, C, HW, W, sxn, sxc, sxh, sxw, srn, src, srh, srw, son, soc, soh, sow,
                  HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # out = relu?((x - mean) * scale + shift + residual), per channel mean/scale/shift.
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rr < R)[:, None] & c_ok[None, :]
    mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0)
    scale = tl.load(scale_ptr + rc, mask=c_ok, other=0.0)
    x = tl.load(x_ptr + _row_offsets(rr, HW, W, sxn, sxh, sxw)[:, None]
                + (rc.to(tl.int64) * sxc)[None, :], mask=ok, other=0.0).to(mean.dtype)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_SHIFT:
        y += tl.load(shift_ptr + rc, mask=c_ok, other=0.0).to(y.dtype)[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + _row_offsets(rr, HW, W, srn, srh, srw)[:, None]
                     + (rc.to(tl.int64) * src)[None, :], mask=ok, other=0.0).to(y.dtype)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + _row_offsets(rr, HW, W, son, soh, sow)[:, None]
             + (rc.to(tl.int64) * soc)[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_sums_kernel(g_ptr, o_ptr, x_ptr, mean_ptr, invstd_ptr, sum_g_ptr, sum_gx_ptr,
                          R, C, HW, W, sgn, sgc, sgh, sgw, son, soc, soh, sow,
                          sxn, sxc, sxh, sxw, ROWS,
                          RELU: tl.constexpr, XHAT: tl.constexpr, FP64: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Partial per-channel sums of g' and g' * xhat, g' = g zeroed where output <= 0 (RELU),
    # xhat = (x - mean) * invstd, over rows [pid_r*ROWS, (pid_r+1)*ROWS).
    pid_r = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    start = pid_r * ROWS
    end = tl.minimum(start + ROWS, R)
    sum_g = zeros(BLOCK_C, FP64)
    sum_gx = zeros(BLOCK_C, FP64)
    if XHAT:
        mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0).to(sum_g.dtype)
        invstd = tl.load(invstd_ptr + rc, mask=c_ok, other=0.0).to(sum_g.dtype)
    for r0 in range(start, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        ok = (rr < end)[:, None] & c_ok[None, :]
        g = tl.load(g_ptr + _row_offsets(rr, HW, W, sgn, sgh, sgw)[:, None]
                    + (rc.to(tl.int64) * sgc)[None, :], mask=ok, other=0.0).to(sum_g.dtype)
        if RELU:
            o = tl.load(o_ptr + _row_offsets(rr, HW, W, son, soh, sow)[:, None]
                        + (rc.to(tl.int64) * soc)[None, :], mask=ok, other=0.0)
            g = tl.where(o <= 0, 0.0, g)  # as threshold_backward: a NaN output passes g
        sum_g += tl.sum(g, axis=0)
        if XHAT:
            x = tl.load(x_ptr + _row_offsets(rr, HW, W, sxn, sxh, sxw)[:, None]
                        + (rc.to(tl.int64) * sxc)[None, :], mask=ok, other=0.0).to(sum_g.dtype)
            sum_gx += tl.sum(g * (x - mean[None, :]), axis=0)
    if XHAT:
        sum_gx = sum_gx * invstd
    tl.store(sum_g_ptr + pid_r.to(tl.int64) * C + rc, sum_g, mask=c_ok)
    tl.store(sum_gx_ptr + pid_r.to(tl.int64) * C + rc, sum_gx, mask=c_ok)


@triton.jit
def _backward_apply_kernel(g_ptr, o_ptr, x_ptr, gi_ptr, gr_ptr, mean_ptr, k_ptr, mg_ptr, mgx_ptr,
                           R, C, HW, W, sgn, sgc, sgh, sgw, son, soc, soh, sow,
                           sxn, sxc, sxh, sxw, sin, sic, sih, siw, srn, src, srh, srw,
                           RELU: tl.constexpr, TRAINING: tl.constexpr, WRITE_GI: tl.constexpr,
                           WRITE_GR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # g' = g zeroed where output <= 0; grad_residual = g';
    # grad_x = (g' - mg - (x - mean) * mgx) * k in training, g' * k with fixed statistics.
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rr < R)[:, None] & c_ok[None, :]
    g = tl.load(g_ptr + _row_offsets(rr, HW, W, sgn, sgh, sgw)[:, None]
                + (rc.to(tl.int64) * sgc)[None, :], mask=ok, other=0.0)
    if RELU:
        o = tl.load(o_ptr + _row_offsets(rr, HW, W, son, soh, sow)[:, None]
                    + (rc.to(tl.int64) * soc)[None, :], mask=ok, other=0.0)
        g = tl.where(o <= 0, 0.0, g)  # as threshold_backward: a NaN output passes g
    if WRITE_GR:
        tl.store(gr_ptr + _row_offsets(rr, HW, W, srn, srh, srw)[:, None]
                 + (rc.to(tl.int64) * src)[None, :], g.to(gr_ptr.dtype.element_ty), mask=ok)
    if WRITE_GI:
        k = tl.load(k_ptr + rc, mask=c_ok, other=0.0)
        gx = g.to(k.dtype)
        if TRAINING:
            mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0).to(k.dtype)
            mg = tl.load(mg_ptr + rc, mask=c_ok, other=0.0)
            mgx = tl.load(mgx_ptr + rc, mask=c_ok, other=0.0)
            x = tl.load(x_ptr + _row_offsets(rr, HW, W, sxn, sxh, sxw)[:, None]
                        + (rc.to(tl.int64) * sxc)[None, :], mask=ok, other=0.0).to(k.dtype)
            gx = gx - mg[None, :] - (x - mean[None, :]) * mgx[None, :]
        gx = gx * k[None, :]
        tl.store(gi_ptr + _row_offsets(rr, HW, W, sin, sih, siw)[:, None]
                 + (rc.to(tl.int64) * sic)[None, :], gx.to(gi_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------
# launchers

def _tiles(t):
    """(BLOCK_R, BLOCK_C) for walking t: wide tiles for channels_last, tall ones for NCHW."""
    C = t.shape[1]
    if common.INTERPRET:
        return 256, min(triton.next_power_of_2(max(C, 1)), 64)
    if C > 1 and t.stride(1) == 1:
        block_c = min(triton.next_power_of_2(C), 64)
        return max(4096 // block_c, 16), block_c
    return 1024, min(triton.next_power_of_2(max(C, 1)), 4)


def _row_chunks(R, C, block_r, block_c):
    """(programs along rows, rows per program) for the reductions: enough programs to fill a
    GPU, each summing a whole number of tiles."""
    target = 1 if common.INTERPRET else max(1, 1024 // triton.cdiv(C, block_c))
    programs = max(1, min(triton.cdiv(R, block_r), target))
    rows = max(triton.cdiv(triton.cdiv(R, programs), block_r), 1) * block_r
    return max(triton.cdiv(R, rows), 1), rows


def _geom(t):
    N, C, H, W = t.shape
    return N * H * W, C, H * W, W


def moments(x):
    """Welford partials (count [T], mean [T, C], M2 [T, C]) of x [N, C, H, W] per channel."""
    R, C, HW, W = _geom(x)
    block_r, block_c = _tiles(x)
    T, rows = _row_chunks(R, C, block_r, block_c)
    acc = common.stat_dtype(x.dtype)
    cnt = torch.empty(T, dtype=torch.float32, device=x.device)
    mean = torch.empty((T, C), dtype=acc, device=x.device)
    m2 = torch.empty_like(mean)
    if R == 0:
        cnt.zero_()
        return cnt, mean, m2
    wrap_triton(_moments_kernel)[(T, triton.cdiv(C, block_c))](
        x, cnt, mean, m2, R, C, HW, W, *x.stride(), rows,
        FP64=common.is_fp64(x), BLOCK_R=block_r, BLOCK_C=block_c)
    return cnt, mean, m2


def combine_moments(partials, eps):
    """(mean [C], invstd [C]) = batch mean and 1/sqrt(biased variance + eps) from Welford
    partials (count [T], mean [T, C], M2 [T, C]); NaN when the count is 0."""
    cnt, part_mean, part_m2 = partials
    T, C = part_mean.shape
    mean = torch.empty(C, dtype=part_mean.dtype, device=part_mean.device)
    var = torch.empty_like(mean)
    if C > 0:
        block_c = min(triton.next_power_of_2(C), 256)
        wrap_triton(_combine_kernel)[(triton.cdiv(C, block_c),)](
            cnt, part_mean, part_m2, mean, var, T, C,
            FP64=part_mean.dtype == torch.float64, BLOCK_C=block_c)
    # eps added in torch, in the statistics dtype (a kernel argument would be float32).
    return mean, invstd_of(var, eps)


def invstd_of(var, eps):
    """1 / sqrt(var + eps), as PyTorch's BatchNorm computes it."""
    return torch.sqrt(var + eps).reciprocal()


def apply(x, mean, scale, shift=None, residual=None, relu=False, out=None):
    """out = relu?((x - mean) * scale + shift + residual).

    x [N, C, H, W]; mean, scale, shift [C] (float32 or float64); residual like x or None.
    -> out [N, C, H, W] in x's dtype and layout (or written into ``out``).
    """
    R, C, HW, W = _geom(x)
    out = common.empty(x, tuple(x.shape)) if out is None else out
    if R == 0 or C == 0:
        return out
    res = residual if residual is not None else out
    block_r, block_c = _tiles(x)
    wrap_triton(_apply_kernel)[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x, res, out, mean, scale, shift if shift is not None else scale,
        R, C, HW, W, *x.stride(), *res.stride(), *out.stride(),
        HAS_SHIFT=shift is not None, HAS_RES=residual is not None, RELU=relu,
        BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def backward_sums(grad, output=None, x=None, mean=None, invstd=None):
    """Per-channel (sum g', sum g' * xhat) [C] each, g' = grad zeroed where output <= 0 when
    ``output`` is given, xhat = (x - mean) * invstd when ``x`` is given (else the second
    sum is zero). grad, output, x [N, C, H, W]."""
    R, C, HW, W = _geom(grad)
    acc = common.stat_dtype(grad.dtype)
    block_r, block_c = _tiles(grad)
    T, rows = _row_chunks(R, C, block_r, block_c)
    sum_g = torch.zeros((T, C), dtype=acc, device=grad.device)
    sum_gx = torch.zeros_like(sum_g)
    if R > 0 and C > 0:
        o = output if output is not None else grad
        xx = x if x is not None else grad
        wrap_triton(_backward_sums_kernel)[(T, triton.cdiv(C, block_c))](
            grad, o, xx, mean if mean is not None else sum_g, invstd if invstd is not None else sum_g,
            sum_g, sum_gx, R, C, HW, W, *grad.stride(), *o.stride(), *xx.stride(), rows,
            RELU=output is not None, XHAT=x is not None, FP64=acc == torch.float64,
            BLOCK_R=block_r, BLOCK_C=block_c)
    return sum_g.sum(0), sum_gx.sum(0)


def backward_apply(grad, output, x, mean, k, mg=None, mgx=None, want_input=True,
                   want_residual=False, like=None):
    """BatchNorm (+ReLU) input gradient and residual gradient in one pass.

    g' = grad zeroed where output <= 0 (when output is given). grad_residual = g';
    grad_x = (g' - mg - (x - mean) * mgx) * k with batch statistics (mg, mgx given),
    g' * k with fixed ones. mean, k, mg, mgx [C]. -> (grad_x or None, grad_residual or None),
    both in ``like``'s layout (default x's).
    """
    R, C, HW, W = _geom(grad)
    like = like if like is not None else x
    gi = common.empty(like, tuple(grad.shape)) if want_input else None
    gr = common.empty(like, tuple(grad.shape)) if want_residual else None
    if R == 0 or C == 0:
        return gi, gr
    training = mg is not None
    o = output if output is not None else grad
    xx = x if x is not None else grad
    gi_ = gi if gi is not None else grad
    gr_ = gr if gr is not None else grad
    block_r, block_c = _tiles(grad)
    wrap_triton(_backward_apply_kernel)[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        grad, o, xx, gi_, gr_, mean if mean is not None else k, k,
        mg if training else k, mgx if training else k,
        R, C, HW, W, *grad.stride(), *o.stride(), *xx.stride(), *gi_.stride(), *gr_.stride(),
        RELU=output is not None, TRAINING=training, WRITE_GI=want_input,
        WRITE_GR=want_residual, BLOCK_R=block_r, BLOCK_C=block_c)
    return gi, gr
