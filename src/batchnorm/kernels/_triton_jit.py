"""The Triton kernels of :mod:`batchnorm.kernels.triton_kernels` (imported only with triton).

A channels view ``x (P, C, Q)`` of any strides is visited in ``[BP, BC, BQ]`` tiles: NCHW
views (Q > 1, Q contiguous) take tiles long in Q, channels-last views (Q == 1, C contiguous)
tiles wide in C. The arithmetic runs in the element type of the statistics tables (float32
for half inputs, float64 for float64); loads and stores are in the tensors' own types.

* :func:`channel_reduce_kernel`: two sums per (chunk, channel), split over ``S`` programs
  per (chunk, channel block) along the chunk's rows; partials ``(S, 2, A, C)``.
  Statistics: sums of ``d = x - pivot`` and ``d * d``, ``pivot = x[chunk start, c, 0]``, so
  a large common offset never enters a sum. Backward: sums of ``g`` and ``g * (x - mean)``.
* :func:`finish_kernel`: adds the ``S`` partials; for statistics also
  ``mean = pivot + s1 / n``, ``var = max(s2 / n - (s1 / n)^2, 0)``.
* :func:`channel_apply_kernel`: the elementwise pass, ``act(z [+ residual])`` forward, or
  ``dx = g * k1 + k0 + (x - mean) * k2`` (and ``d residual = g``) backward.
* :func:`rows_forward_kernel`, :func:`rows_backward_kernel`: LayerNorm on contiguous rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "relu6": 5}


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr, param):
    if ACTIVATION == 1:
        z = tl.where(z < 0, 0.0, z)  # a NaN stays NaN, as in torch.relu
    elif ACTIVATION == 2:
        z = tl.where(z > 0, z, z * param)
    elif ACTIVATION == 3:
        z = tl.where(z > 0, z, (tl.exp(z) - 1.0) * param)
    elif ACTIVATION == 4:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 5:
        z = tl.where(z < 0, 0.0, tl.where(z > 6, 6.0, z))  # a NaN stays NaN
    return z


@triton.jit
def _gate(dy, z, ACTIVATION: tl.constexpr, param):
    """``dy * act'(z)``."""
    if ACTIVATION == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACTIVATION == 2:
        dy = tl.where(z <= 0, dy * param, dy)
    elif ACTIVATION == 3:
        dy = tl.where(z > 0, dy, dy * tl.exp(z) * param)
    elif ACTIVATION == 4:
        s = tl.sigmoid(z)
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    elif ACTIVATION == 5:
        dy = tl.where((z > 0) & (z < 6), dy, 0.0)
    return dy


@triton.jit
def channel_reduce_kernel(x_ptr, dy_ptr, res_ptr, mean_ptr, scale_ptr, shift_ptr, part_ptr,
                          P, C, Q, chunk, rows_per_split,
                          sxp, sxc, sxq, sdp, sdc, sdq, srp, src, srq, param,
                          BACKWARD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                          ACTIVATION: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                          BQ: tl.constexpr):
    """Program (a, channel block, split s): partials[s, :, a, channels] over its rows."""
    a = tl.program_id(0)
    cb = tl.program_id(1)
    s = tl.program_id(2)
    tables = tl.num_programs(0) * C
    acc_ty = part_ptr.dtype.element_ty
    c = cb * BC + tl.arange(0, BC)
    c_mask = c < C
    chunk_start = a * chunk
    start = chunk_start + s * rows_per_split
    end = tl.minimum(tl.minimum(start + rows_per_split, chunk_start + chunk), P)
    if BACKWARD:
        center = tl.load(mean_ptr + a * C + c, mask=c_mask, other=0.0)
        scale = tl.load(scale_ptr + a * C + c, mask=c_mask, other=0.0)[None, :, None]
        shift = tl.load(shift_ptr + a * C + c, mask=c_mask, other=0.0)[None, :, None]
    else:
        center = tl.load(x_ptr + chunk_start.to(tl.int64) * sxp + c * sxc, mask=c_mask,
                         other=0.0).to(acc_ty)
    center = center[None, :, None]
    sum1 = tl.zeros([BP, BC, BQ], dtype=acc_ty)
    sum2 = tl.zeros([BP, BC, BQ], dtype=acc_ty)
    for p0 in range(start, end, BP):
        p = (p0 + tl.arange(0, BP)).to(tl.int64)
        p_mask = (p < end)[:, None, None] & c_mask[None, :, None]
        for q0 in range(0, Q, BQ):
            q = q0 + tl.arange(0, BQ)
            mask = p_mask & (q < Q)[None, None, :]
            x = tl.load(x_ptr + p[:, None, None] * sxp + (c * sxc)[None, :, None]
                        + (q * sxq)[None, None, :], mask=mask, other=0.0).to(acc_ty)
            d = tl.where(mask, x - center, 0.0)
            if BACKWARD:
                dy = tl.load(dy_ptr + p[:, None, None] * sdp + (c * sdc)[None, :, None]
                             + (q * sdq)[None, None, :], mask=mask, other=0.0).to(acc_ty)
                z = d * scale + shift
                if HAS_RESIDUAL:
                    z += tl.load(res_ptr + p[:, None, None] * srp + (c * src)[None, :, None]
                                 + (q * srq)[None, None, :], mask=mask, other=0.0).to(acc_ty)
                g = tl.where(mask, _gate(dy, z, ACTIVATION, param), 0.0)
                sum1 += g
                sum2 += g * d
            else:
                sum1 += d
                sum2 += d * d
    out = part_ptr + s * 2 * tables + a * C + c
    tl.store(out, tl.sum(tl.sum(sum1, axis=2), axis=0), mask=c_mask)
    tl.store(out + tables, tl.sum(tl.sum(sum2, axis=2), axis=0), mask=c_mask)


@triton.jit
def finish_kernel(part_ptr, x_ptr, out1_ptr, out2_ptr, splits, tables, C, P, Q, chunk,
                  sxp, sxc, STATS: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    """out1, out2 = the sums of the ``splits`` partials ``(splits, 2, tables)``, ``BS``
    splits at a time; for statistics (``tables = A * C``), the mean and biased variance
    from the pivot sums."""
    i = tl.program_id(0) * BT + tl.arange(0, BT)
    mask = i < tables
    acc_ty = out1_ptr.dtype.element_ty
    sum1 = tl.zeros([BS, BT], dtype=acc_ty)
    sum2 = tl.zeros([BS, BT], dtype=acc_ty)
    for s0 in range(0, splits, BS):
        s = s0 + tl.arange(0, BS)
        part = part_ptr + (s * 2 * tables)[:, None] + i[None, :]
        part_mask = (s < splits)[:, None] & mask[None, :]
        sum1 += tl.load(part, mask=part_mask, other=0.0)
        sum2 += tl.load(part + tables, mask=part_mask, other=0.0)
    first = tl.sum(sum1, axis=0)
    second = tl.sum(sum2, axis=0)
    if STATS:
        start = (i // C) * chunk
        count = (tl.maximum(tl.minimum(chunk, P - start), 1) * Q).to(acc_ty)  # >= 1 if masked
        pivot = tl.load(x_ptr + start.to(tl.int64) * sxp + (i % C) * sxc, mask=mask,
                        other=0.0).to(acc_ty)
        shifted_mean = first / count
        first = pivot + shifted_mean
        second = tl.maximum(second / count - shifted_mean * shifted_mean, 0.0)
    tl.store(out1_ptr + i, first, mask=mask)
    tl.store(out2_ptr + i, second, mask=mask)


@triton.jit
def channel_apply_kernel(x_ptr, dy_ptr, res_ptr, mean_ptr, scale_ptr, shift_ptr,
                         k1_ptr, k0_ptr, k2_ptr, out_ptr, dres_ptr,
                         P, C, Q, chunk, c_blocks, q_blocks,
                         sxp, sxc, sxq, sdp, sdc, sdq, srp, src, srq, sop, soc, soq,
                         param, BACKWARD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         ACTIVATION: tl.constexpr, ONE_CHUNK: tl.constexpr, BP: tl.constexpr,
                         BC: tl.constexpr, BQ: tl.constexpr):
    """One ``[BP, BC, BQ]`` tile; tables are read per (row's chunk, channel), once per
    channel when all rows share one chunk."""
    pid = tl.program_id(0)
    qb = pid % q_blocks
    cb = (pid // q_blocks) % c_blocks
    pb = pid // (q_blocks * c_blocks)
    acc_ty = mean_ptr.dtype.element_ty
    p = (pb * BP + tl.arange(0, BP)).to(tl.int64)
    c = cb * BC + tl.arange(0, BC)
    q = qb * BQ + tl.arange(0, BQ)
    mask = (p < P)[:, None, None] & (c < C)[None, :, None] & (q < Q)[None, None, :]
    if ONE_CHUNK:
        table_mask = (c < C)[None, :]
        table = c[None, :]
    else:
        table_mask = (p < P)[:, None] & (c < C)[None, :]
        table = ((p // chunk) * C)[:, None] + c[None, :]
    mean = tl.load(mean_ptr + table, mask=table_mask, other=0.0)[:, :, None]
    scale = tl.load(scale_ptr + table, mask=table_mask, other=0.0)[:, :, None]
    shift = tl.load(shift_ptr + table, mask=table_mask, other=0.0)[:, :, None]
    x = tl.load(x_ptr + p[:, None, None] * sxp + (c * sxc)[None, :, None]
                + (q * sxq)[None, None, :], mask=mask, other=0.0).to(acc_ty)
    centered = x - mean
    z = centered * scale + shift
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + p[:, None, None] * srp + (c * src)[None, :, None]
                     + (q * srq)[None, None, :], mask=mask, other=0.0).to(acc_ty)
    out = out_ptr + p[:, None, None] * sop + (c * soc)[None, :, None] + (q * soq)[None, None, :]
    if BACKWARD:
        dy = tl.load(dy_ptr + p[:, None, None] * sdp + (c * sdc)[None, :, None]
                     + (q * sdq)[None, None, :], mask=mask, other=0.0).to(acc_ty)
        g = _gate(dy, z, ACTIVATION, param)
        k1 = tl.load(k1_ptr + table, mask=table_mask, other=0.0)[:, :, None]
        k0 = tl.load(k0_ptr + table, mask=table_mask, other=0.0)[:, :, None]
        k2 = tl.load(k2_ptr + table, mask=table_mask, other=0.0)[:, :, None]
        tl.store(out, (g * k1 + k0 + centered * k2).to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:  # d residual: the residual's strides and type
            tl.store(dres_ptr + p[:, None, None] * srp + (c * src)[None, :, None]
                     + (q * srq)[None, None, :], g.to(dres_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out, _activate(z, ACTIVATION, param).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rows_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, invstd_ptr, R, K, sxr, syr, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr,
                        BK: tl.constexpr):
    """``BR`` rows: pivot-shifted sums over K, then ``y = (x - mean) * invstd * w + b``."""
    acc_ty = mean_ptr.dtype.element_ty
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_mask = r < R
    rows = r.to(tl.int64)
    pivot = tl.load(x_ptr + rows * sxr, mask=r_mask, other=0.0).to(acc_ty)
    sum1 = tl.zeros([BR, BK], dtype=acc_ty)
    sum2 = tl.zeros([BR, BK], dtype=acc_ty)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mask = r_mask[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * sxr + k[None, :], mask=mask, other=0.0).to(acc_ty)
        d = tl.where(mask, x - pivot[:, None], 0.0)
        sum1 += d
        sum2 += d * d
    shifted_mean = tl.sum(sum1, axis=1) / K
    var = tl.maximum(tl.sum(sum2, axis=1) / K - shifted_mean * shifted_mean, 0.0)
    mean = pivot + shifted_mean
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + r, mean, mask=r_mask)
    tl.store(invstd_ptr + r, invstd, mask=r_mask)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mask = r_mask[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * sxr + k[None, :], mask=mask, other=0.0).to(acc_ty)
        y = (x - mean[:, None]) * invstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + k, mask=k < K, other=0.0).to(acc_ty)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + k, mask=k < K, other=0.0).to(acc_ty)[None, :]
        tl.store(y_ptr + rows[:, None] * syr + k[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def rows_backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, dx_ptr, part_ptr,
                         R, K, sdr, sxr, sor, HAS_WEIGHT: tl.constexpr,
                         ONE_BLOCK: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Row blocks ``pid, pid + G, ...``: ``dx = invstd * (gh - mean_k(gh) - x_hat *
    mean_k(gh * x_hat))``, ``gh = dy * w``; the column sums of ``dy * x_hat`` and ``dy`` go
    to ``part[pid]`` (kept in registers when one block spans K)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc_ty = mean_ptr.dtype.element_ty
    col_xhat = tl.zeros([BK], dtype=acc_ty)
    col_dy = tl.zeros([BK], dtype=acc_ty)
    for block in range(pid, tl.cdiv(R, BR), programs):
        r = block * BR + tl.arange(0, BR)
        r_mask = r < R
        rows = r.to(tl.int64)
        mean = tl.load(mean_ptr + r, mask=r_mask, other=0.0)[:, None]
        invstd = tl.load(invstd_ptr + r, mask=r_mask, other=0.0)[:, None]
        sum_gh = tl.zeros([BR, BK], dtype=acc_ty)
        sum_gh_xhat = tl.zeros([BR, BK], dtype=acc_ty)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            mask = r_mask[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * sxr + k[None, :], mask=mask, other=0.0)
            gh = tl.load(dy_ptr + rows[:, None] * sdr + k[None, :], mask=mask,
                         other=0.0).to(acc_ty)
            if HAS_WEIGHT:
                gh = gh * tl.load(w_ptr + k, mask=k < K, other=0.0).to(acc_ty)[None, :]
            sum_gh += gh
            sum_gh_xhat += gh * tl.where(mask, (x.to(acc_ty) - mean) * invstd, 0.0)
        mean_gh = (tl.sum(sum_gh, axis=1) / K)[:, None]
        mean_gh_xhat = (tl.sum(sum_gh_xhat, axis=1) / K)[:, None]
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            mask = r_mask[:, None] & (k < K)[None, :]
            x_hat = tl.where(mask, (tl.load(x_ptr + rows[:, None] * sxr + k[None, :],
                                            mask=mask, other=0.0).to(acc_ty) - mean) * invstd,
                             0.0)
            dy = tl.load(dy_ptr + rows[:, None] * sdr + k[None, :], mask=mask,
                         other=0.0).to(acc_ty)
            gh = dy
            if HAS_WEIGHT:
                gh = dy * tl.load(w_ptr + k, mask=k < K, other=0.0).to(acc_ty)[None, :]
            dx = invstd * (gh - mean_gh - x_hat * mean_gh_xhat)
            tl.store(dx_ptr + rows[:, None] * sor + k[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
            if ONE_BLOCK:
                col_xhat += tl.sum(dy * x_hat, axis=0)
                col_dy += tl.sum(dy, axis=0)
            else:
                out = part_ptr + pid * 2 * K + k
                tl.store(out, tl.load(out, mask=k < K) + tl.sum(dy * x_hat, axis=0), mask=k < K)
                tl.store(out + K, tl.load(out + K, mask=k < K) + tl.sum(dy, axis=0),
                         mask=k < K)
    if ONE_BLOCK:
        k = tl.arange(0, BK)
        tl.store(part_ptr + pid * 2 * K + k, col_xhat, mask=k < K)
        tl.store(part_ptr + pid * 2 * K + K + k, col_dy, mask=k < K)
