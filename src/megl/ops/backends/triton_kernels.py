"""Triton kernels of the fused saliency op (docs/fused-op.md) and their launch functions; `triton.py` is the glue.

Semantics and the backward are those of `megl.ops.backends.torch_explicit` (the executable spec). Six kernels:

forward
    _cam_fwd_kernel       grid (B,)          alpha = mean G, z = Σ_k alpha_k A_k (stored as `cam`), min/max of
                                             relu(z), n = (c - m)/(M - m + eps) into a (B, h, w) fp32 scratch
    _saliency_fwd_kernel  grid (B, tiles)    s = bilinear(n) on a BLOCK_R x BLOCK_C tile, masked = I * s, and the
                                             tile's partial sums [Σ|s - mask|, Σ(s+e), -, Σ(prior+e)] into a
                                             (B, tiles, 4) scratch
    _kl_fwd_kernel        grid (B, tiles)    (with a prior) S_p, S_q from the partials, then the tile's Σ p log(p/q)
                                             (s recomputed from n) into slot 2
    _losses_fwd_kernel    grid (B,)          sums the partials over tiles in a fixed order -> l1, kl, stats[2:4]
backward
    _saliency_bwd_kernel  grid (B, tiles)    g_s and g_I per pixel, the adjoint of bilinear restricted to the tile
                                             (Wy^T g_s Wx with one-hot tap weights, a dense product: no atomics) into
                                             a (B, tiles, BLOCK_h, BLOCK_w) scratch, and the tile's Σ p log(p/q)
    _cam_bwd_kernel       grid (B,)          sums the tile grids in a fixed order -> g_n, then the min/max terms
                                             (ties split evenly), g_z, g_A and g_G

Every reduction has a fixed order, so results are bitwise deterministic run to run. Inputs may be float32,
float16 or bfloat16 on a GPU: loads are cast to float32, accumulation is float32, stores cast to the output's
dtype. In interpreter mode (TRITON_INTERPRET=1 when this module is imported, tests on CPU) float32 only.

KL in two passes, as every backend (docs/fused-op.md, "KL in float32"): S_p is reduced first, then Σ p log(p/q).
Its gradient is w_kl (log(p/q) - kl) / S_p; kl is not known while the backward's tiles run, so the tile kernel
upsample-adjoints the rest and the per-sample kernel subtracts w_kl kl / S_p · upsample^T(1), where
upsample^T(1) = outer(ry, rx) is separable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # how the kernels below are defined: interpreted (CPU) or compiled (GPU); read once, as triton.jit does
    from triton import knobs as _knobs

    INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # older Triton
    import os

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Output tile of the pixel kernels. Large tiles in the interpreter (numpy: fewer programs is faster), GPU-sized
# tiles otherwise. Both must be >= 16 (tl.dot shapes) and powers of two.
BLOCK_R = 64 if INTERPRET else 32
BLOCK_C = 128 if INTERPRET else 64
MAX_LOWRES_CELLS = 16384  # h*w held in one block by the per-sample kernels


def _gpu_autotune(key):
    """Autotune num_warps on a GPU only: the interpreter ignores launch configs and would just rerun the kernel.

    Tile sizes stay fixed (they set the scratch shapes the launcher allocates); every kernel overwrites its
    outputs, so benchmarking reruns are harmless.
    """
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)], key=key)


@triton.jit
def _taps(dst, scale, size_in):
    """Bilinear taps of output indices `dst`, align_corners=False, exactly as torch computes them."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), size_in - 1)  # floor (src >= 0); the clamp only matters for padding lanes
    i1 = tl.minimum(i0 + 1, size_in - 1)
    lam = src - i0.to(tl.float32)
    return i0, i1, lam


@triton.jit
def _onehot_weights(i0, i1, lam, cells):
    """(len(dst), len(cells)) matrix of tap weights: row p has 1-lam at i0[p] and lam at i1[p] (2 taps, or 1)."""
    return tl.where(cells[None, :] == i0[:, None], 1.0 - lam[:, None], 0.0) + tl.where(
        cells[None, :] == i1[:, None], lam[:, None], 0.0
    )


@triton.jit
def _bilinear_tile(n_ptr, b, rows, cols, scale_h, scale_w, h, w):
    """s = bilinear(n) on a tile of output rows x cols (n: the (B, h, w) normalised map)."""
    y0, y1, ly = _taps(rows, scale_h, h)
    x0, x1, lx = _taps(cols, scale_w, w)
    # gathers from the low-res map: tap indices are clamped into range, so no load mask is needed
    nb = n_ptr + b * h * w
    n00 = tl.load(nb + y0[:, None] * w + x0[None, :])
    n01 = tl.load(nb + y0[:, None] * w + x1[None, :])
    n10 = tl.load(nb + y1[:, None] * w + x0[None, :])
    n11 = tl.load(nb + y1[:, None] * w + x1[None, :])
    wx0, wx1 = (1.0 - lx)[None, :], lx[None, :]
    return (1.0 - ly)[:, None] * (wx0 * n00 + wx1 * n01) + ly[:, None] * (wx0 * n10 + wx1 * n11)


@triton.jit
def _kl_term(s, prior, eps_kl, sum_p, sum_q):
    """(p log(p/q), log(p/q)) per pixel, p = (s + e) / S_p, q = (prior + e) / S_q: one log of the ratio."""
    log_pq = tl.log(((s + eps_kl) / sum_p) / ((prior + eps_kl) / sum_q))
    return ((s + eps_kl) / sum_p) * log_pq, log_pq


@triton.jit
def _sum_slot(part_ptr, b, n_tiles, slot, BLOCK_T: tl.constexpr):
    """Σ over sample b's tiles of one slot of the (B, tiles, 4) partials, in a fixed order (same bits anywhere)."""
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(part_ptr + (b * n_tiles + ts) * 4 + slot, mask=ts < n_tiles, other=0.0)
    return tl.sum(acc, axis=0)


# ----------------------------------------------------------------------------------------------------- forward
@_gpu_autotune(key=["K", "HW"])
@triton.jit
def _cam_fwd_kernel(
    A_ptr, G_ptr, alpha_ptr, cam_ptr, n_ptr, stats_ptr, K, HW, eps,
    BLOCK_K: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cells = tl.arange(0, BLOCK_HW)
    valid = cells < HW
    z = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kv = ks < K
        offs = (b * K + ks[:, None]) * HW + cells[None, :]
        m2 = kv[:, None] & valid[None, :]
        g = tl.load(G_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        alpha = tl.sum(g, axis=1) / HW
        tl.store(alpha_ptr + b * K + ks, alpha, mask=kv)
        a = tl.load(A_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        z += tl.sum(alpha[:, None] * a, axis=0)
    tl.store(cam_ptr + b * HW + cells, z, mask=valid)
    c = tl.maximum(z, 0.0)
    lo = tl.min(tl.where(valid, c, float("inf")), axis=0)
    hi = tl.max(tl.where(valid, c, float("-inf")), axis=0)
    tl.store(n_ptr + b * HW + cells, (c - lo) / (hi - lo + eps), mask=valid)
    tl.store(stats_ptr + b * 4, lo)
    tl.store(stats_ptr + b * 4 + 1, hi)


@_gpu_autotune(key=["C", "H", "W", "h", "w"])
@triton.jit
def _saliency_fwd_kernel(
    n_ptr, I_ptr, mask_ptr, prior_ptr, s_ptr, masked_ptr, part_ptr,
    C, H, W, h, w, scale_h, scale_w, eps_kl, n_tiles_w, n_tiles,
    HAS_MASK: tl.constexpr, HAS_PRIOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    rows = (t // n_tiles_w) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % n_tiles_w) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (rows < H)[:, None] & (cols < W)[None, :]
    s = _bilinear_tile(n_ptr, b, rows, cols, scale_h, scale_w, h, w)
    pix = rows[:, None] * W + cols[None, :]
    HWo = H * W
    tl.store(s_ptr + b * HWo + pix, s.to(s_ptr.dtype.element_ty), mask=valid)
    for ch in range(C):
        off = (b * C + ch) * HWo + pix
        x = tl.load(I_ptr + off, mask=valid, other=0.0).to(tl.float32)
        tl.store(masked_ptr + off, (x * s).to(masked_ptr.dtype.element_ty), mask=valid)
    part = part_ptr + (b * n_tiles + t) * 4
    tl.store(part + 1, tl.sum(tl.where(valid, s + eps_kl, 0.0)))
    tl.store(part + 2, 0.0)  # Σ p log(p/q): _kl_fwd_kernel's slot
    if HAS_MASK:
        mk = tl.load(mask_ptr + b * HWo + pix, mask=valid, other=0.0)
        tl.store(part, tl.sum(tl.where(valid, tl.abs(s - mk), 0.0)))
    else:
        tl.store(part, 0.0)
    if HAS_PRIOR:
        tl.store(part + 3, tl.sum(tl.where(valid, tl.load(prior_ptr + pix, mask=valid, other=0.0) + eps_kl, 0.0)))
    else:
        tl.store(part + 3, 0.0)


@triton.jit
def _kl_fwd_kernel(
    n_ptr, prior_ptr, part_ptr, H, W, h, w, scale_h, scale_w, eps_kl, n_tiles_w, n_tiles,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    sum_p = _sum_slot(part_ptr, b, n_tiles, 1, BLOCK_T)  # the same bits as _losses_fwd_kernel's
    sum_q = _sum_slot(part_ptr, b, n_tiles, 3, BLOCK_T)
    rows = (t // n_tiles_w) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % n_tiles_w) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (rows < H)[:, None] & (cols < W)[None, :]
    s = _bilinear_tile(n_ptr, b, rows, cols, scale_h, scale_w, h, w)  # fp32 s, not the stored (maybe fp16) one
    prior = tl.load(prior_ptr + rows[:, None] * W + cols[None, :], mask=valid, other=0.0)
    term, _ = _kl_term(s, prior, eps_kl, sum_p, sum_q)
    tl.store(part_ptr + (b * n_tiles + t) * 4 + 2, tl.sum(tl.where(valid, term, 0.0)))


@triton.jit
def _losses_fwd_kernel(
    part_ptr, has_mask_ptr, l1_ptr, kl_ptr, stats_ptr, n_tiles, HW,
    HAS_MASK: tl.constexpr, HAS_SELECT: tl.constexpr, HAS_PRIOR: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    sum_p = _sum_slot(part_ptr, b, n_tiles, 1, BLOCK_T)
    l1 = _sum_slot(part_ptr, b, n_tiles, 0, BLOCK_T) / HW
    if HAS_SELECT:
        sel = tl.load(has_mask_ptr + b) != 0
    if HAS_MASK:
        l1 = tl.where(sel, l1, 0.0)
    tl.store(l1_ptr + b, l1)
    tl.store(stats_ptr + b * 4 + 2, sum_p)
    if HAS_PRIOR:
        sum_q = _sum_slot(part_ptr, b, n_tiles, 3, BLOCK_T)
        kl = _sum_slot(part_ptr, b, n_tiles, 2, BLOCK_T)
        if HAS_SELECT:
            kl = tl.where(sel, 0.0, kl)
        tl.store(kl_ptr + b, kl)
        tl.store(stats_ptr + b * 4 + 3, sum_q)
    else:
        tl.store(kl_ptr + b, 0.0)
        tl.store(stats_ptr + b * 4 + 3, 0.0)


# ---------------------------------------------------------------------------------------------------- backward
@_gpu_autotune(key=["C", "H", "W", "h", "w"])
@triton.jit
def _saliency_bwd_kernel(
    grad_s_ptr, grad_masked_ptr, grad_l1_ptr, grad_kl_ptr, I_ptr, mask_ptr, has_mask_ptr, prior_ptr, s_ptr,
    stats_ptr, gI_ptr, gn_part_ptr, t_part_ptr,
    C, H, W, h, w, scale_h, scale_w, eps_kl, n_tiles_w, n_tiles,
    HAS_GRAD_S: tl.constexpr, HAS_GRAD_MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SELECT: tl.constexpr,
    HAS_PRIOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_h: tl.constexpr, BLOCK_w: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    rows = (t // n_tiles_w) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % n_tiles_w) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (rows < H)[:, None] & (cols < W)[None, :]
    pix = rows[:, None] * W + cols[None, :]
    HWo = H * W
    s = tl.load(s_ptr + b * HWo + pix, mask=valid, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    if HAS_GRAD_S:
        g += tl.load(grad_s_ptr + b * HWo + pix, mask=valid, other=0.0).to(tl.float32)
    if HAS_GRAD_MASKED:
        for ch in range(C):
            off = (b * C + ch) * HWo + pix
            go = tl.load(grad_masked_ptr + off, mask=valid, other=0.0).to(tl.float32)
            x = tl.load(I_ptr + off, mask=valid, other=0.0).to(tl.float32)
            g += go * x
            tl.store(gI_ptr + off, (go * s).to(gI_ptr.dtype.element_ty), mask=valid)
    if HAS_SELECT:
        sel = tl.load(has_mask_ptr + b) != 0
    if HAS_MASK:
        w_l1 = tl.where(sel, tl.load(grad_l1_ptr + b), 0.0) / HWo
        d = s - tl.load(mask_ptr + b * HWo + pix, mask=valid, other=0.0)
        g += w_l1 * (tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0))  # sign, sign(0) = 0
    if HAS_PRIOR:
        w_kl = tl.load(grad_kl_ptr + b)
        if HAS_SELECT:
            w_kl = tl.where(sel, 0.0, w_kl)
        sum_p = tl.load(stats_ptr + b * 4 + 2)
        prior = tl.load(prior_ptr + pix, mask=valid, other=0.0)
        term, log_pq = _kl_term(s, prior, eps_kl, sum_p, tl.load(stats_ptr + b * 4 + 3))
        g += (w_kl / sum_p) * log_pq  # the constant -w_kl kl / S_p part is added per sample
        tl.store(t_part_ptr + b * n_tiles + t, tl.sum(tl.where(valid, term, 0.0)))
    g = tl.where(valid, g, 0.0)
    # adjoint of bilinear on this tile: gn_tile = Wy^T g Wx, with Wy (BLOCK_R, BLOCK_h), Wx (BLOCK_C, BLOCK_w)
    y0, y1, ly = _taps(rows, scale_h, h)
    x0, x1, lx = _taps(cols, scale_w, w)
    wy = _onehot_weights(y0, y1, ly, tl.arange(0, BLOCK_h))
    wx = _onehot_weights(x0, x1, lx, tl.arange(0, BLOCK_w))
    gx = tl.dot(g, wx, input_precision="ieee")  # (BLOCK_R, BLOCK_w); ieee: no TF32 rounding
    gn = tl.dot(tl.trans(wy), gx, input_precision="ieee")  # (BLOCK_h, BLOCK_w)
    cells = tl.arange(0, BLOCK_h)[:, None] * BLOCK_w + tl.arange(0, BLOCK_w)[None, :]
    tl.store(gn_part_ptr + (b * n_tiles + t) * (BLOCK_h * BLOCK_w) + cells, gn)


@_gpu_autotune(key=["K", "h", "w"])
@triton.jit
def _cam_bwd_kernel(
    gn_part_ptr, t_part_ptr, grad_kl_ptr, has_mask_ptr, A_ptr, alpha_ptr, cam_ptr, stats_ptr, gA_ptr, gG_ptr,
    K, H, W, h, w, scale_h, scale_w, eps, n_tiles,
    HAS_SELECT: tl.constexpr, HAS_PRIOR: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_h: tl.constexpr, BLOCK_w: tl.constexpr, BHW: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    q = tl.arange(0, BHW)  # padded low-res grid, flattened: cell (i, j) at i * BLOCK_w + j
    i = q // BLOCK_w
    j = q % BLOCK_w
    valid = (i < h) & (j < w)
    gn = tl.zeros([BHW], dtype=tl.float32)
    for t in range(n_tiles):  # fixed order: deterministic
        gn += tl.load(gn_part_ptr + (b * n_tiles + t) * BHW + q)
    sum_p = tl.load(stats_ptr + b * 4 + 2)
    if HAS_PRIOR:
        w_kl = tl.load(grad_kl_ptr + b)
        if HAS_SELECT:
            w_kl = tl.where(tl.load(has_mask_ptr + b) != 0, 0.0, w_kl)
        acc_t = tl.zeros([BLOCK_L], dtype=tl.float32)
        for t0 in range(0, n_tiles, BLOCK_L):
            ts = t0 + tl.arange(0, BLOCK_L)
            acc_t += tl.load(t_part_ptr + b * n_tiles + ts, mask=ts < n_tiles, other=0.0)
        const = (w_kl / sum_p) * tl.sum(acc_t, axis=0)  # w_kl kl / S_p
        # upsample^T(1)[i, j] = ry[i] * rx[j]: how much weight all output rows / columns put on low-res row i / col j
        ry = tl.zeros([BHW], dtype=tl.float32)
        for r0 in range(0, H, BLOCK_L):
            rr = r0 + tl.arange(0, BLOCK_L)
            y0, y1, ly = _taps(rr, scale_h, h)
            ry += tl.sum(tl.where((rr < H)[:, None], _onehot_weights(y0, y1, ly, i), 0.0), axis=0)
        rx = tl.zeros([BHW], dtype=tl.float32)
        for c0 in range(0, W, BLOCK_L):
            cc = c0 + tl.arange(0, BLOCK_L)
            x0, x1, lx = _taps(cc, scale_w, w)
            rx += tl.sum(tl.where((cc < W)[:, None], _onehot_weights(x0, x1, lx, j), 0.0), axis=0)
        gn -= const * ry * rx
    gn = tl.where(valid, gn, 0.0)
    hw = h * w
    cell = i * w + j
    z = tl.load(cam_ptr + b * hw + cell, mask=valid, other=0.0)
    c = tl.maximum(z, 0.0)
    lo = tl.load(stats_ptr + b * 4)
    hi = tl.load(stats_ptr + b * 4 + 1)
    d = hi - lo + eps
    n = (c - lo) / d
    g_lo = tl.sum(tl.where(valid, gn * (n - 1.0) / d, 0.0), axis=0)
    g_hi = tl.sum(tl.where(valid, -gn * n / d, 0.0), axis=0)
    at_lo = valid & (c == lo)
    at_hi = valid & (c == hi)
    n_lo = tl.sum(at_lo.to(tl.float32), axis=0)  # >= 1: lo and hi are values of c
    n_hi = tl.sum(at_hi.to(tl.float32), axis=0)
    gc = gn / d + tl.where(at_lo, g_lo / n_lo, 0.0) + tl.where(at_hi, g_hi / n_hi, 0.0)
    gz = tl.where(valid & (z > 0), gc, 0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kv = ks < K
        offs = (b * K + ks[:, None]) * hw + cell[None, :]
        m2 = kv[:, None] & valid[None, :]
        alpha = tl.load(alpha_ptr + b * K + ks, mask=kv, other=0.0)
        tl.store(gA_ptr + offs, (alpha[:, None] * gz[None, :]).to(gA_ptr.dtype.element_ty), mask=m2)
        a = tl.load(A_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        gG = tl.sum(gz[None, :] * a, axis=1) / hw
        gG2 = gG[:, None] + tl.zeros([BLOCK_K, BHW], dtype=tl.float32)
        tl.store(gG_ptr + offs, gG2.to(gG_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------------------- launch
def _pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(int(x)))


def _block_k(K: int, cells: int) -> int:
    return min(_pow2(K), max(1, 8192 // cells))


def _check_lowres(h: int, w: int) -> None:
    if _pow2(h, 16) * _pow2(w, 16) > MAX_LOWRES_CELLS:
        raise ValueError(
            f"triton saliency kernels hold the Grad-CAM map in one block and support h*w up to about "
            f"{MAX_LOWRES_CELLS} cells, got {h}x{w}: use backend='cuda' or 'torch' for such large maps"
        )


def _tiles(H: int, W: int, block_r: int, block_c: int) -> tuple[int, int]:
    n_tiles_w = triton.cdiv(W, block_c)
    return n_tiles_w, triton.cdiv(H, block_r) * n_tiles_w


def _flag_args(mask, has_mask, prior, like):
    """Real pointers or a dummy (never read: the matching constexpr flag is off) for the optional inputs."""
    dummy = like.new_empty(1, dtype=torch.float32)
    sel = has_mask.view(torch.uint8) if has_mask is not None else dummy
    return (mask if mask is not None else dummy), sel, (prior if prior is not None else dummy)


def saliency_forward(A, G, I, mask, has_mask, prior, eps, eps_kl, *, block_r=None, block_c=None):
    """Forward of the fused op: (s, masked, l1, kl, alpha, cam, stats), as `torch_explicit.forward`."""
    block_r, block_c = block_r or BLOCK_R, block_c or BLOCK_C
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    _check_lowres(h, w)
    dev = A.device
    f32 = dict(dtype=torch.float32, device=dev)
    alpha = torch.empty(B, K, **f32)
    cam = torch.empty(B, h, w, **f32)
    n = torch.empty(B, h, w, **f32)
    stats = torch.empty(B, 4, **f32)
    block_hw = _pow2(h * w)
    _cam_fwd_kernel[(B,)](A, G, alpha, cam, n, stats, K, h * w, eps, BLOCK_K=_block_k(K, block_hw), BLOCK_HW=block_hw)

    s = torch.empty(B, H, W, dtype=I.dtype, device=dev)
    masked = torch.empty_like(I)
    n_tiles_w, n_tiles = _tiles(H, W, block_r, block_c)
    part = torch.empty(B, n_tiles, 4, **f32)
    mask_a, sel_a, prior_a = _flag_args(mask, has_mask, prior, A)
    _saliency_fwd_kernel[(B, n_tiles)](
        n, I, mask_a, prior_a, s, masked, part, C, H, W, h, w, h / H, w / W, eps_kl, n_tiles_w, n_tiles,
        HAS_MASK=mask is not None, HAS_PRIOR=prior is not None, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    block_t = min(_pow2(n_tiles), 1024)
    if prior is not None:
        _kl_fwd_kernel[(B, n_tiles)](
            n, prior_a, part, H, W, h, w, h / H, w / W, eps_kl, n_tiles_w, n_tiles,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_T=block_t,
        )
    l1 = torch.empty(B, **f32)
    kl = torch.empty(B, **f32)
    _losses_fwd_kernel[(B,)](
        part, sel_a, l1, kl, stats, n_tiles, H * W,
        HAS_MASK=mask is not None, HAS_SELECT=has_mask is not None, HAS_PRIOR=prior is not None, BLOCK_T=block_t,
    )
    return s, masked, l1, kl, alpha, cam, stats


def saliency_backward(
    grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl,
    *, block_r=None, block_c=None,
):
    """Backward of the fused op: (gA, gG, gI), as `torch_explicit.backward`."""
    block_r, block_c = block_r or BLOCK_R, block_c or BLOCK_C
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    _check_lowres(h, w)
    dev = A.device
    block_h, block_w = _pow2(h, 16), _pow2(w, 16)
    n_tiles_w, n_tiles = _tiles(H, W, block_r, block_c)
    gn_part = torch.empty(B, n_tiles, block_h * block_w, dtype=torch.float32, device=dev)
    t_part = torch.empty(B, n_tiles, dtype=torch.float32, device=dev)
    gI = torch.empty_like(I) if grad_masked is not None else torch.zeros_like(I)
    mask_a, sel_a, prior_a = _flag_args(mask, has_mask, prior, A)
    dummy = A.new_empty(1, dtype=torch.float32)
    _saliency_bwd_kernel[(B, n_tiles)](
        grad_s if grad_s is not None else dummy, grad_masked if grad_masked is not None else dummy,
        grad_l1, grad_kl, I, mask_a, sel_a, prior_a, s, stats, gI, gn_part, t_part,
        C, H, W, h, w, h / H, w / W, eps_kl, n_tiles_w, n_tiles,
        HAS_GRAD_S=grad_s is not None, HAS_GRAD_MASKED=grad_masked is not None, HAS_MASK=mask is not None,
        HAS_SELECT=has_mask is not None, HAS_PRIOR=prior is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_h=block_h, BLOCK_w=block_w,
    )
    gA = torch.empty_like(A)
    gG = torch.empty_like(G)
    _cam_bwd_kernel[(B,)](
        gn_part, t_part, grad_kl, sel_a, A, alpha, cam, stats, gA, gG,
        K, H, W, h, w, h / H, w / W, eps, n_tiles,
        HAS_SELECT=has_mask is not None, HAS_PRIOR=prior is not None,
        BLOCK_K=_block_k(K, block_h * block_w), BLOCK_h=block_h, BLOCK_w=block_w, BHW=block_h * block_w, BLOCK_L=64,
    )
    return gA, gG, gI
