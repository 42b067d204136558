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
import struct

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
def _f64(hi, lo):
    """A float64 argument passed as two float32 (Triton passes Python floats as float32)."""
    return tl.sum(tl.zeros((1,), dtype=tl.float64) + hi + lo, axis=0)


@triton.jit
def _batch_constants_kernel(cnt_ptr, mean_ptr, m2_ptr, w_ptr, out_mean_ptr, out_invstd_ptr,
                            out_scale_ptr, T, C, eps_hi, eps_lo, HAS_W: tl.constexpr,
                            FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # Batch mean, 1/sqrt(biased var + eps) and weight * invstd per channel from T Welford
    # partials (count [T], mean [T, C], M2 [T, C]). Chunks of BLOCK_T partials are merged in
    # parallel (the exact pooled-variance formula), then chunk after chunk with Chan's: a
    # fixed order, so deterministic. A partial with count 0 is skipped (its moments may be
    # uninitialised memory).
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mean = zeros(BLOCK_C, FP64)
    m2 = zeros(BLOCK_C, FP64)
    count = tl.sum(tl.zeros((1,), dtype=tl.float64), axis=0)  # float64: exact integers
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        n = tl.load(cnt_ptr + rt, mask=rt < T, other=0.0)
        has = (n > 0)[:, None] & c_ok[None, :]
        offs = rt.to(tl.int64)[:, None] * C + rc[None, :]
        mb = tl.load(mean_ptr + offs, mask=has, other=0.0).to(mean.dtype)
        m2b = tl.load(m2_ptr + offs, mask=has, other=0.0).to(mean.dtype)
        nb = n.to(mean.dtype)[:, None]
        chunk = tl.sum(n.to(tl.float64), axis=0)
        chunk_mean = tl.sum(nb * mb, axis=0) / tl.maximum(chunk, 1.0).to(mean.dtype)
        dev = tl.where(has, mb - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(m2b + nb * dev * dev, axis=0)
        total = count + chunk
        w = chunk / tl.maximum(total, 1.0)
        delta = chunk_mean - mean
        mean = mean + delta * w.to(mean.dtype)
        m2 = m2 + chunk_m2 + delta * delta * (count * w).to(mean.dtype)
        count = total
    var = m2 / count.to(mean.dtype)  # NaN for an empty batch, as PyTorch's batch statistics
    mean = tl.where(count > 0, mean, var)
    eps = _f64(eps_hi, eps_lo).to(mean.dtype)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(mean.dtype)
    tl.store(out_mean_ptr + rc, mean, mask=c_ok)
    tl.store(out_invstd_ptr + rc, invstd, mask=c_ok)
    tl.store(out_scale_ptr + rc, scale, mask=c_ok)


@triton.jit
def _running_constants_kernel(rm_ptr, rv_ptr, w_ptr, b_ptr, cb_ptr, out_mean_ptr,
                              out_invstd_ptr, out_scale_ptr, out_shift_ptr, C, eps_hi, eps_lo,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_CB: tl.constexpr,
                              FOLD: tl.constexpr, FP64: tl.constexpr, BLOCK_C: tl.constexpr):
    # Inference: mean = running_mean, invstd = 1/sqrt(running_var + eps), scale = weight *
    # invstd, and the shift: bias, or with FOLD the whole BN as y = conv * scale + shift,
    # shift = bias - (mean - conv_bias) * scale.
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    acc = zeros(BLOCK_C, FP64)
    mean = tl.load(rm_ptr + rc, mask=c_ok, other=0.0).to(acc.dtype)
    var = tl.load(rv_ptr + rc, mask=c_ok, other=1.0).to(acc.dtype)
    invstd = 1.0 / tl.sqrt(var + _f64(eps_hi, eps_lo).to(acc.dtype))
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(acc.dtype)
    shift = acc
    if HAS_B:
        shift = tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(acc.dtype)
    if FOLD:
        center = mean
        if HAS_CB:
            center = mean - tl.load(cb_ptr + rc, mask=c_ok, other=0.0).to(acc.dtype)
        shift = shift - center * scale
    tl.store(out_mean_ptr + rc, mean, mask=c_ok)
    tl.store(out_invstd_ptr + rc, invstd, mask=c_ok)
    tl.store(out_scale_ptr + rc, scale, mask=c_ok)
    tl.store(out_shift_ptr + rc, shift, mask=c_ok)


@triton.jit
def _update_running_stats_kernel(rm_ptr, rv_ptr, mean_ptr, invstd_ptr, C, srm, srv, count,
                                 m_hi, m_lo, eps_hi, eps_lo, HAS_RM: tl.constexpr,
                                 HAS_RV: tl.constexpr, BLOCK_C: tl.constexpr):
    # running = (1 - momentum) * running + momentum * batch in float64, the variance
    # recovered from invstd and made unbiased (count / (count - 1)); any buffer dtype/stride.
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    momentum = _f64(m_hi, m_lo)
    if HAS_RM:
        p = rm_ptr + rc.to(tl.int64) * srm
        r = tl.load(p, mask=c_ok, other=0.0).to(tl.float64)
        m = tl.load(mean_ptr + rc, mask=c_ok, other=0.0).to(tl.float64)
        tl.store(p, ((1.0 - momentum) * r + momentum * m).to(rm_ptr.dtype.element_ty),
                 mask=c_ok)
    if HAS_RV:
        p = rv_ptr + rc.to(tl.int64) * srv
        r = tl.load(p, mask=c_ok, other=0.0).to(tl.float64)
        i = tl.load(invstd_ptr + rc, mask=c_ok, other=1.0).to(tl.float64)
        var = tl.maximum(1.0 / (i * i) - _f64(eps_hi, eps_lo), 0.0)
        if count > 1:
            var = var * count.to(tl.float64) / (count - 1).to(tl.float64)
        tl.store(p, ((1.0 - momentum) * r + momentum * var).to(rv_ptr.dtype.element_ty),
                 mask=c_ok)


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
def _backward_constants_kernel(sg_ptr, sgx_ptr, invstd_ptr, w_ptr, out_sg_ptr, out_sgx_ptr,
                               k_ptr, mg_ptr, mgx_ptr, gis_ptr, T, C, R, HAS_W: tl.constexpr,
                               TRAINING: tl.constexpr, FP64: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # The backward's per-channel constants from T partial sums of g' and g' * xhat, in
    # chunk order (deterministic): the sums themselves (the bias and weight gradients),
    # k = weight * invstd, and in training mg = sum g' / R, mgx = sum g' * xhat * invstd / R,
    # so that grad_x = (g' - mg - (x - mean) * mgx) * k; and the sum of grad_x over the
    # channel (a conv bias gradient): k * (sum g' - R * mg) in training (sum xhat = 0),
    # k * sum g' with fixed statistics, from the float sums.
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    sum_g = zeros(BLOCK_C, FP64)
    sum_gx = zeros(BLOCK_C, FP64)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt < T)[:, None] & c_ok[None, :]
        offs = rt.to(tl.int64)[:, None] * C + rc[None, :]
        sum_g += tl.sum(tl.load(sg_ptr + offs, mask=ok, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(sgx_ptr + offs, mask=ok, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + rc, mask=c_ok, other=0.0).to(sum_g.dtype)
    k = invstd
    if HAS_W:
        k = invstd * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(sum_g.dtype)
    gi_sum = k * sum_g
    if TRAINING:
        # R as a float (R == 1 arrives as a constexpr); an empty batch divides by 1.
        r = tl.maximum(tl.sum(tl.zeros((1,), dtype=sum_g.dtype) + R, axis=0), 1.0)
        mg = sum_g / r
        tl.store(mg_ptr + rc, mg, mask=c_ok)
        tl.store(mgx_ptr + rc, sum_gx * invstd / r, mask=c_ok)
        gi_sum = k * (sum_g - mg * r)
    tl.store(out_sg_ptr + rc, sum_g, mask=c_ok)
    tl.store(out_sgx_ptr + rc, sum_gx, mask=c_ok)
    tl.store(k_ptr + rc, k, mask=c_ok)
    tl.store(gis_ptr + rc, gi_sum, mask=c_ok)


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


def batch_stats(x):
    """(mean [C], biased variance [C]) of x [N, C, H, W] per channel, in the statistics dtype:
    moments()'s partials (an empty one holds count 0, mean 0, M2 0) merged as Chan et al. do,
    in a few tensor ops on [T, C]."""
    cnt, part_mean, part_m2 = moments(x)
    n = cnt.to(torch.float64)[:, None]
    count = n.sum(0)
    mean = (n * part_mean).sum(0) / count
    m2 = part_m2.sum(0) + (n * (part_mean - mean).square()).sum(0)
    return mean.to(part_mean.dtype), (m2 / count).to(part_mean.dtype)


def _f64_args(x):
    """x as two float32 kernel arguments whose sum is x to about 2^-48 (see _f64)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, float(x) - hi


def _channel_block(C):
    return min(triton.next_power_of_2(max(C, 1)), 64 if common.INTERPRET else 32)


def _vectors(n, C, like, dtype):
    return [torch.empty(C, dtype=dtype, device=like.device) for _ in range(n)]


def batch_constants(partials, weight, eps):
    """(mean, invstd, scale) [C]: the batch mean, 1/sqrt(biased variance + eps) and
    weight * invstd (invstd without a weight) from Welford partials (count [T], mean [T, C],
    M2 [T, C]), in one launch; NaN statistics when the count is 0, as PyTorch's."""
    cnt, part_mean, part_m2 = partials
    T, C = part_mean.shape
    mean, invstd, scale = _vectors(3, C, part_mean, part_mean.dtype)
    if C > 0:
        block_c = _channel_block(C)
        block_t = min(triton.next_power_of_2(max(T, 1)), 64)
        wrap_triton(_batch_constants_kernel)[(triton.cdiv(C, block_c),)](
            cnt, part_mean, part_m2, weight if weight is not None else mean, mean, invstd, scale,
            T, C, *_f64_args(eps), HAS_W=weight is not None,
            FP64=part_mean.dtype == torch.float64, BLOCK_T=block_t, BLOCK_C=block_c)
    return mean, invstd, scale


def running_constants(running_mean, running_var, weight, bias, eps, dtype, conv_bias=None,
                      fold=False):
    """Inference constants in one launch: (mean, invstd, scale, shift) [C] in ``dtype``, mean
    = running_mean, invstd = 1/sqrt(running_var + eps), scale = weight * invstd, shift = bias
    (0 without one) or, with ``fold``, bias - (running_mean - conv_bias) * scale: the whole
    BatchNorm of a conv's output as conv * scale + shift."""
    C = running_mean.shape[0]
    mean, invstd, scale, shift = _vectors(4, C, running_mean, dtype)
    if C > 0:
        block_c = _channel_block(C)
        wrap_triton(_running_constants_kernel)[(triton.cdiv(C, block_c),)](
            running_mean, running_var, weight if weight is not None else mean,
            bias if bias is not None else mean, conv_bias if conv_bias is not None else mean,
            mean, invstd, scale, shift, C, *_f64_args(eps), HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_CB=conv_bias is not None, FOLD=fold,
            FP64=dtype == torch.float64, BLOCK_C=block_c)
    return mean, invstd, scale, shift


def update_running_stats(running_mean, running_var, save_mean, save_invstd, count, momentum,
                         eps):
    """running = (1 - momentum) * running + momentum * batch in place, in one launch (see
    cnnops.reference.update_running_stats); either buffer may be None."""
    C = save_mean.shape[0]
    if count == 0 or C == 0 or (running_mean is None and running_var is None):
        return
    rm = running_mean if running_mean is not None else save_mean
    rv = running_var if running_var is not None else save_invstd
    block_c = _channel_block(C)
    wrap_triton(_update_running_stats_kernel)[(triton.cdiv(C, block_c),)](
        rm, rv, save_mean, save_invstd, C, rm.stride(0), rv.stride(0), count,
        *_f64_args(momentum), *_f64_args(eps), HAS_RM=running_mean is not None,
        HAS_RV=running_var is not None, BLOCK_C=block_c)


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


def backward_constants(grad, output=None, x=None, mean=None, invstd=None, weight=None,
                       training=False, reduce=True):
    """The backward's per-channel constants, in two launches (partial sums, then
    _backward_constants_kernel): a dict of [C] tensors in the statistics dtype

      sum_g   sum g' (g' = grad zeroed where output <= 0 when ``output`` is given)
      sum_gx  sum g' * xhat, xhat = (x - mean) * invstd (zero when ``x`` is None)
      k       weight * invstd (invstd without a weight; None without ``invstd``)
      mg, mgx sum_g / R and sum_gx * invstd / R (training only)
      gi_sum  the sum over the channel of grad_x = (g' - mg - (x - mean) * mgx) * k (training)
              or g' * k: a conv bias gradient, from the float sums

    grad, output, x [N, C, H, W]; mean, invstd, weight [C]. reduce=False skips the sums (they
    are then zero): one launch, for a backward that needs only k."""
    R, C, HW, W = _geom(grad)
    acc = common.stat_dtype(grad.dtype)
    block_r, block_c = _tiles(grad)
    T, rows = _row_chunks(R, C, block_r, block_c)
    out = dict(zip(("sum_g", "sum_gx", "k", "mg", "mgx", "gi_sum"), _vectors(6, C, grad, acc)))
    if C == 0:
        return out
    if not reduce:
        T = 0
    part_g = torch.empty((T, C), dtype=acc, device=grad.device)
    part_gx = torch.empty_like(part_g)
    if R == 0 and T > 0:
        part_g.zero_()
        part_gx.zero_()
    elif T > 0:
        o = output if output is not None else grad
        xx = x if x is not None else grad
        wrap_triton(_backward_sums_kernel)[(T, triton.cdiv(C, block_c))](
            grad, o, xx, mean if mean is not None else part_g,
            invstd if invstd is not None else part_g, part_g, part_gx, R, C, HW, W,
            *grad.stride(), *o.stride(), *xx.stride(), rows, RELU=output is not None,
            XHAT=x is not None, FP64=acc == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c)
    has_invstd = invstd is not None
    block_cc = _channel_block(C)
    wrap_triton(_backward_constants_kernel)[(triton.cdiv(C, block_cc),)](
        part_g, part_gx, invstd if has_invstd else out["k"],
        weight if weight is not None else out["k"], out["sum_g"], out["sum_gx"], out["k"],
        out["mg"], out["mgx"], out["gi_sum"], T, C, R,
        HAS_W=weight is not None and has_invstd, TRAINING=training and has_invstd,
        FP64=acc == torch.float64, BLOCK_T=min(triton.next_power_of_2(max(T, 1)), 64),
        BLOCK_C=block_cc)
    if not has_invstd:
        out["k"] = out["gi_sum"] = None
    if not (training and has_invstd):
        out["mg"] = out["mgx"] = None
    return out


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
