"""Convolution as an implicit GEMM, with fused epilogues, and its two gradients.

Forward: output[m, oc] = sum_k A[m, k] * B[k, oc] with m = (n, oh, ow) over
N*OH*OW, oc over OC/groups, and k = (kh, kw, c) over the kernel taps and C/groups.
A is never materialised (no im2col buffer): each K step loads one tap's
[BLOCK_M, BLOCK_K] slice of the input straight from memory, with the padding
masked. The loads use the tensors' strides, so NCHW, NHWC (channels_last) and
strided inputs run the same kernel without a copy.

The epilogue runs on the accumulator while it is in registers:
  * conv bias; or, in inference, BatchNorm folded to a per-channel scale/shift;
  * + residual, ReLU;
  * in training, per-tile Welford partials (count, mean, M2) of the conv output
    for BatchNorm's batch statistics, so they cost no extra pass over it.

Backward:
  * grad_input is the transposed implicit GEMM: for each input position, sum over
    taps and output channels of grad_output at the output position that tap maps
    to (when the stride divides the offset);
  * grad_weight is a GEMM over N*OH*OW per tap, split along N*OH*OW into fixed
    chunks whose partial sums are added in a fixed order (deterministic).

Shapes: input [N, C, H, W], weight [OC, C/groups, KH, KW], output [N, OC, OH, OW].
"""
import inspect

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _common as common
from ._common import configs

# (BLOCK_M, BLOCK_N, BLOCK_K), num_warps, num_stages for Hopper-class GPUs. The
# interpreter runs one config sized so that tiny test tensors need few programs.
_GEMM_CONFIGS = [
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), 8, 3),
    (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 4),
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
    (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32), 4, 3),
]
# float64 tiles multiply with _mma's broadcast-and-sum, which holds the whole
# [BLOCK_M, BLOCK_K, BLOCK_N] product in registers: small tiles, a short K step, and
# warps enough that no config spills registers (checked on sm_90 with Triton 3.6 and 3.9).
_GEMM_CONFIGS_FP64 = [
    (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8), 4, 2),
    (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=8), 8, 2),
    (dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=8), 8, 2),
    (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=4), 8, 2),
]
# Each interpreted program costs the same Python overhead per tile operation whatever
# the tile size, so the interpreter gets tiles that cover the tests' tensors in one go.
_INTERPRETED = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16)
_INTERPRETED_WGRAD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128)  # M: OC, N: C, K: positions


def _min_block_m(gemm_configs):
    """The smallest BLOCK_M a launch with these configs may get: the stats partials are
    indexed by M tile, so they are sized for it."""
    return min(min(c[0]["BLOCK_M"] for c in gemm_configs), _INTERPRETED["BLOCK_M"])


_MIN_BLOCK_M = {False: _min_block_m(_GEMM_CONFIGS), True: _min_block_m(_GEMM_CONFIGS_FP64)}


@triton.jit
def _mma(acc, a, b, FP64: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for tiles a [BLOCK_M, BLOCK_K] and b [BLOCK_K, BLOCK_N].

    float64 does not go through tl.dot. Triton 3.6 (the GPU run's) rejects a float64
    accumulator there at compile time (its tl.dot defaults out_dtype to float32 and asserts
    the accumulator has that dtype), and float64 dot support differs across the Triton
    releases cnnops accepts (>= 3.0) and the GPUs they target. A broadcast multiply and sum
    is plain float64 arithmetic that any Triton compiles for any target, and float64
    convolutions are for checking, not speed. The branch is on a constexpr: the other
    dtypes compile to tl.dot (tensor cores) alone.
    """
    if FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward(
        x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
        cnt_ptr, mean_ptr, m2_ptr,
        N, H, W, OH, OW, CG, OCG, OC, M_BUCKET, T_MAX,
        sxn, sxc, sxh, sxw, swo, swc, swh, sww,
        srn, src, srh, srw, son, soc, soh, sow,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, FOLD_BN: tl.constexpr, HAS_RES: tl.constexpr,
        RELU: tl.constexpr, STATS: tl.constexpr,
        FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    M = N * OH * OW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < OCG
    ow = rm % OW
    oh = (rm // OW) % OH
    n = rm // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = n.to(tl.int64) * sxn + (g * CG).to(tl.int64) * sxc
    oc = g * OCG + rn
    w_col = oc.to(tl.int64) * swo

    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        ih = ih0 + kh * dil_h
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = iw0 + kw * dil_w
            ok = h_ok & (iw >= 0) & (iw < W)
            x_tap = x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = w_col + kh * swh + kw * sww
            for c0 in range(0, CG, BLOCK_K):
                ck = c0 + rk
                k_ok = ck < CG
                a = tl.load(x_ptr + x_tap[:, None] + ck[None, :].to(tl.int64) * sxc,
                            mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + w_tap[None, :] + ck[:, None].to(tl.int64) * swc,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = _mma(acc, a, b, FP64, PRECISION)

    valid = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    if STATS:
        # Welford partials of this tile per channel; norm.batch_constants merges them.
        count = tl.sum(m_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(valid, acc, 0.0), axis=0) / tl.maximum(count, 1.0)
        dev = tl.where(valid, acc - tile_mean[None, :], 0.0)
        part = pid_m.to(tl.int64) * OC + oc
        tl.store(mean_ptr + part, tile_mean, mask=n_ok)
        tl.store(m2_ptr + part, tl.sum(dev * dev, axis=0), mask=n_ok)
        tl.store(cnt_ptr + pid_m, count)
        if (pid_m == 0) & (pid_n == 0) & (g == 0):
            # Rows past this launch's last tile stay from an autotuning run with a smaller
            # BLOCK_M; a zero count makes the merge skip them.
            for t0 in range(tl.cdiv(M, BLOCK_M), T_MAX, BLOCK_M):
                rt = t0 + tl.arange(0, BLOCK_M)
                tl.store(cnt_ptr + rt, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=rt < T_MAX)
    if FOLD_BN:
        scale = tl.load(scale_ptr + oc, mask=n_ok, other=0.0).to(acc.dtype)
        shift = tl.load(shift_ptr + oc, mask=n_ok, other=0.0).to(acc.dtype)
        acc = acc * scale[None, :] + shift[None, :]
    if HAS_RES:
        r_row = n.to(tl.int64) * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw
        acc += tl.load(res_ptr + r_row[:, None] + oc[None, :].to(tl.int64) * src,
                       mask=valid, other=0.0).to(acc.dtype)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    o_row = n.to(tl.int64) * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    tl.store(out_ptr + o_row[:, None] + oc[None, :].to(tl.int64) * soc,
             acc.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _input_grad(
        go_ptr, w_ptr, gi_ptr,
        N, H, W, OH, OW, CG, OCG, M_BUCKET,
        sgn, sgc, sgh, sgw, swo, swc, swh, sww, sin, sic, sih, siw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr,
        FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad_input[m, c] = sum over (kh, kw, oc) of grad_output[n, oc, oh, ow] * w[oc, c, kh, kw],
    # m = (n, ih, iw), where ih = oh*stride - pad + kh*dil (likewise iw).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    M = N * H * W
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < CG
    iw = rm % W
    ih = (rm // W) % H
    n = rm // (W * H)
    go_row = n.to(tl.int64) * sgn + (g * OCG).to(tl.int64) * sgc
    w_col = rn.to(tl.int64) * swc + (g * OCG).to(tl.int64) * swo

    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        th = ih + pad_h - kh * dil_h
        th_pos = tl.maximum(th, 0)  # keeps // and % away from negative operands
        oh = th_pos // stride_h
        h_ok = m_ok & (th >= 0) & (th_pos % stride_h == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + pad_w - kw * dil_w
            tw_pos = tl.maximum(tw, 0)
            ow = tw_pos // stride_w
            ok = h_ok & (tw >= 0) & (tw_pos % stride_w == 0) & (ow < OW)
            go_tap = go_row + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            w_tap = w_col + kh * swh + kw * sww
            for k0 in range(0, OCG, BLOCK_K):
                ko = k0 + rk
                k_ok = ko < OCG
                a = tl.load(go_ptr + go_tap[:, None] + ko[None, :].to(tl.int64) * sgc,
                            mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + w_tap[None, :] + ko[:, None].to(tl.int64) * swo,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = _mma(acc, a, b, FP64, PRECISION)

    i_row = n.to(tl.int64) * sin + ih.to(tl.int64) * sih + iw.to(tl.int64) * siw
    c = g * CG + rn
    tl.store(gi_ptr + i_row[:, None] + c[None, :].to(tl.int64) * sic,
             acc.to(gi_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _weight_grad(
        go_ptr, x_ptr, part_ptr,
        N, H, W, OH, OW, CG, OCG, OC, M_BUCKET, CHUNK,
        sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr,
        FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # part[split, oc, c, kh, kw] = sum over the split's chunk of positions p = (n, oh, ow) of
    # grad_output[n, oc, oh, ow] * input[n, c, oh*stride - pad + kh*dil, ...].
    pid = tl.program_id(0)
    tap_g = tl.program_id(1)
    split = tl.program_id(2)
    tiles_n = tl.cdiv(CG, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    g = tap_g // (KH * KW)
    tap = tap_g % (KH * KW)
    kh = tap // KW
    kw = tap % KW
    ro = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = ro < OCG
    c_ok = rc < CG
    go_col = (g * OCG + ro).to(tl.int64) * sgc
    x_col = (g * CG + rc).to(tl.int64) * sxc
    M = N * OH * OW
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, M)

    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        rp = p0 + tl.arange(0, BLOCK_K)
        p_ok = rp < end
        ow = rp % OW
        oh = (rp // OW) % OH
        n = rp // (OW * OH)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        go_pos = n.to(tl.int64) * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        x_pos = n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(go_ptr + go_col[:, None] + go_pos[None, :],
                    mask=o_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(x_ptr + x_pos[:, None] + x_col[None, :],
                    mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _mma(acc, a, b, FP64, PRECISION)

    # part is contiguous [SPLIT, OC, CG, KH, KW].
    oc = g * OCG + ro
    row = (split.to(tl.int64) * OC + oc) * CG * KH * KW + tap
    tl.store(part_ptr + row[:, None] + (rc * KH * KW)[None, :], acc,
             mask=o_ok[:, None] & c_ok[None, :])


# Tuning results are kept on disk (Triton's cache directory), so a second process does not
# tune again; Triton releases before cache_results tune in every process.
_CACHE = ({"cache_results": True}
          if "cache_results" in inspect.signature(triton.autotune).parameters else {})


def _autotuned(fn, interpreted, key):
    """fn autotuned over the GEMM configs, as {fp64: kernel}: float64 gets its own, smaller
    tiles (see _mma). Both share fn's compilations cache (FP64 is a constexpr)."""
    return {fp64: triton.autotune(configs=configs(gemm, interpreted), key=key, **_CACHE)(fn)
            for fp64, gemm in ((False, _GEMM_CONFIGS), (True, _GEMM_CONFIGS_FP64))}


# What the best tile depends on: channels, kernel, a size class of the GEMM's M, the conv
# stride, and the layout of the activation read along K (its channel stride: 1 for
# channels_last, H*W for NCHW). The tensors' dtypes are part of every Triton tuning key.
_KEY = ["CG", "OCG", "KH", "KW", "M_BUCKET", "stride_h"]
_FORWARD_KERNEL = _autotuned(_forward, _INTERPRETED, _KEY + ["sxc", "STATS"])
_INPUT_GRAD_KERNEL = _autotuned(_input_grad, _INTERPRETED, _KEY + ["sgc"])
_WEIGHT_GRAD_KERNEL = _autotuned(_weight_grad, _INTERPRETED_WGRAD, _KEY + ["sxc"])


def _geometry(input, weight, stride, padding, dilation, groups):
    N, C, H, W = input.shape
    OC, CG, KH, KW = weight.shape
    _, _, OH, OW = common.conv_output_shape(input, weight, stride, padding, dilation)
    return N, C, H, W, OC, CG, OC // groups, KH, KW, OH, OW


def forward(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
            scale=None, shift=None, residual=None, relu=False, stats=False):
    """Convolution with a fused epilogue.

    input [N, C, H, W]; weight [OC, C/groups, KH, KW]; bias [OC] or None;
    scale, shift [OC] or None: folded BatchNorm, out = conv * scale + shift (bias is then
    expected inside shift); residual [N, OC, OH, OW] or None; relu: clamp at 0.
    -> output [N, OC, OH, OW] in input's dtype (layout: common.conv_memory_format), and,
    when ``stats``, the Welford partials (count [T], mean [T, OC], M2 [T, OC]) of the output
    for norm.batch_constants (computed before scale/shift, residual and ReLU).
    """
    N, C, H, W, OC, CG, OCG, KH, KW, OH, OW = _geometry(input, weight, stride, padding,
                                                        dilation, groups)
    out = common.empty(input, (N, OC, OH, OW), fmt=common.conv_memory_format(input, weight))
    M = N * OH * OW
    acc = common.stat_dtype(input.dtype)
    fp64 = common.is_fp64(input)
    T_MAX = triton.cdiv(M, _MIN_BLOCK_M[fp64]) if stats else 1
    # Tiles past the launch's last (the tile height is autotuned, T_MAX sized for the
    # smallest) keep count 0 and are skipped by norm.batch_constants: only the counts need
    # zeroing.
    cnt = (torch.zeros if stats else torch.empty)(T_MAX, dtype=torch.float32,
                                                  device=input.device)
    mean = torch.empty((T_MAX, OC) if stats else (1,), dtype=acc, device=input.device)
    m2 = torch.empty_like(mean)
    if M == 0:
        return (out, (cnt, mean, m2)) if stats else out
    res = residual if residual is not None else out
    dummy = out  # pointer arguments the kernel does not read
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(OCG, meta["BLOCK_N"]),
                         groups)
    wrap_triton(_FORWARD_KERNEL[fp64])[grid](
        input, weight, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        res, out, cnt, mean, m2,
        N, H, W, OH, OW, CG, OCG, OC, common.size_bucket(M), T_MAX,
        *input.stride(), *weight.stride(), *res.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, HAS_BIAS=bias is not None, FOLD_BN=scale is not None,
        HAS_RES=residual is not None, RELU=relu, STATS=stats, FP64=fp64,
        PRECISION=common.dot_precision(input.dtype), UPCAST=common.dot_upcast(input.dtype))
    return (out, (cnt, mean, m2)) if stats else out


def input_grad(grad_output, weight, input_shape, stride, padding, dilation, groups, like):
    """grad_input [N, C, H, W] from grad_output [N, OC, OH, OW], in the layout of the
    convolution of ``like`` (the input) by ``weight`` (common.conv_memory_format)."""
    N, C, H, W = input_shape
    OC, CG, KH, KW = weight.shape
    OH, OW = grad_output.shape[2], grad_output.shape[3]
    gi = common.empty(like, tuple(input_shape), fmt=common.conv_memory_format(like, weight))
    M = N * H * W
    if M == 0 or C == 0:
        return gi
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(CG, meta["BLOCK_N"]),
                         groups)
    fp64 = common.is_fp64(grad_output)
    wrap_triton(_INPUT_GRAD_KERNEL[fp64])[grid](
        grad_output, weight, gi,
        N, H, W, OH, OW, CG, OC // groups, common.size_bucket(M),
        *grad_output.stride(), *weight.stride(), *gi.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, FP64=fp64,
        PRECISION=common.dot_precision(grad_output.dtype),
        UPCAST=common.dot_upcast(grad_output.dtype))
    return gi


# Positions of N*OH*OW summed by one weight-gradient program before its partial is
# written; the partials are then added by torch in a fixed order.
_WGRAD_CHUNK = 4096 if not common.INTERPRET else 512


def weight_grad(grad_output, input, weight, stride, padding, dilation, groups):
    """grad_weight [OC, C/groups, KH, KW] in the input's dtype and the weight's layout
    (common.weight_grad_memory_format)."""
    N, C, H, W = input.shape
    OC, CG, KH, KW = weight_shape = weight.shape
    fmt = common.weight_grad_memory_format(weight)
    OH, OW = grad_output.shape[2], grad_output.shape[3]
    M = N * OH * OW
    acc = common.stat_dtype(input.dtype)
    if M == 0:
        return torch.zeros(tuple(weight_shape), dtype=input.dtype,
                           device=input.device).contiguous(memory_format=fmt)
    splits = triton.cdiv(M, _WGRAD_CHUNK)
    part = torch.empty((splits, OC, CG, KH, KW), dtype=acc, device=input.device)
    grid = lambda meta: (triton.cdiv(OC // groups, meta["BLOCK_M"]) * triton.cdiv(CG, meta["BLOCK_N"]),
                         groups * KH * KW, splits)
    fp64 = common.is_fp64(input)
    wrap_triton(_WEIGHT_GRAD_KERNEL[fp64])[grid](
        grad_output, input, part,
        N, H, W, OH, OW, CG, OC // groups, OC, common.size_bucket(M), _WGRAD_CHUNK,
        *grad_output.stride(), *input.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, FP64=fp64,
        PRECISION=common.dot_precision(input.dtype), UPCAST=common.dot_upcast(input.dtype))
    return part.sum(0).to(input.dtype).contiguous(memory_format=fmt)
