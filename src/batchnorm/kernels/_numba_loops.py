"""The compiled loops behind :mod:`batchnorm.kernels.numba_cpu`: plain float32 arrays in,
plain arrays out, no torch. Three layouts cover every canonical view:

* segments ``x (S, L)``: one statistic group is a set of contiguous length-L segments
  (BatchNorm channels-first ``(P, C, Q)``, GroupNorm/InstanceNorm, LayerNorm statistics);
  per-segment scalars, parallel over segments, vectorized along L.
* columns ``x (M, C)``: BatchNorm channels-last; per-column vectors, vectorized along C,
  parallel over fixed row blocks whose partial sums are merged in block order.
* rows ``x (R, K)``: LayerNorm; per-row statistics, per-column parameters.

Sums accumulate in float32 over one segment or a chunk of rows (vectorized, short), then
in float64; statistics are shifted by a pivot (one sample of the group), so a large
common offset never enters the sums. Results depend on the shape only, never on the
number of threads.

Activations (codes of ``ACTIVATION_CODES``) are applied as ``act(z)`` in the forward;
the backward recomputes ``z`` from x and multiplies by ``act'(z)``. Identity, relu and
leaky_relu share one branch-free piecewise-linear loop (``param`` is then the negative
slope: 1, 0 or the leaky slope), which vectorizes; elu and silu call ``exp`` per value.
Reductions run over 1-D row views with scalar float32 accumulators: with ``reassoc``
LLVM vectorizes them (indexing the 2-D array directly, or a chunk bound of ``min(...)``,
keeps the loop scalar and 3-5x slower).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4}
PIECEWISE_LINEAR = 2  # codes up to this one are max(z, 0) + slope * min(z, 0)
_FAST = {"reassoc", "contract", "nsz"}  # lets LLVM vectorize reductions; keeps NaN
_CHUNK_ROWS = 64  # rows summed in float32 before a float64 flush (columns, rows layouts)
_CHUNK_LENGTH = 4096  # segment values summed in float32 before a float64 flush
_MAX_BLOCKS = 64  # row blocks of the columns layout: a function of M only, never of threads
_JIT = {"parallel": True, "cache": True, "fastmath": _FAST}


@njit(inline="always", fastmath=_FAST, cache=True)
def _act(z, code, param):
    if code <= PIECEWISE_LINEAR:
        return z if z > 0 else z * param  # NaN stays NaN
    if code == 3:
        return z if z > 0 else math.expm1(z) * param
    return z / (np.float32(1.0) + math.exp(-z))


@njit(inline="always", fastmath=_FAST, cache=True)
def _act_grad(z, code, param):
    if code <= PIECEWISE_LINEAR:
        return np.float32(1.0) if z > 0 else param
    if code == 3:
        return np.float32(1.0) if z > 0 else math.exp(z) * param
    s = np.float32(1.0) / (np.float32(1.0) + math.exp(-z))
    return s * (np.float32(1.0) + z * (np.float32(1.0) - s))


@njit(inline="always", cache=True)
def _flush(part, blk, first, second):
    """Add a block's float32 running sums to its float64 partials and restart them."""
    for c in range(first.shape[0]):
        part[blk, 0, c] += first[c]
        part[blk, 1, c] += second[c]
        first[c] = 0.0
        second[c] = 0.0


@njit(inline="always", cache=True)
def _merge(part, first, second):
    """Add the blocks' partials in block order, so the result does not depend on threads."""
    for blk in range(part.shape[0]):
        for c in range(part.shape[2]):
            first[c] += part[blk, 0, c]
            second[c] += part[blk, 1, c]


@njit(inline="always", fastmath=_FAST, cache=True)
def _pivot_sums(values, pivot):
    """sum(values - pivot) and sum((values - pivot)^2): float32 sums of chunks of
    ``_CHUNK_LENGTH`` values (vectorized) added in float64 (accurate)."""
    total = 0.0
    total_sq = 0.0
    for start in range(0, values.shape[0], _CHUNK_LENGTH):
        chunk = values[start:start + _CHUNK_LENGTH]
        acc = np.float32(0.0)
        acc_sq = np.float32(0.0)
        for i in range(chunk.shape[0]):
            d = chunk[i] - pivot
            acc += d
            acc_sq += d * d
        total += acc
        total_sq += acc_sq
    return total, total_sq


@njit(inline="always", cache=True)
def _mean_invstd(pivot, total, total_sq, count, eps):
    """float32 mean and 1 / sqrt(var + eps) from pivot-shifted float64 sums."""
    shifted = total / count
    var = max(total_sq / count - shifted * shifted, 0.0)
    return np.float32(pivot + shifted), np.float32(1.0 / math.sqrt(var + eps))


# ---------------------------------------------------------------- segments x (S, L)

@njit(**_JIT)
def segment_sums(x, pivot, sums, sq_sums):
    """sums[s] = sum_l (x[s, l] - pivot[s]),  sq_sums[s] = sum_l (x[s, l] - pivot[s])^2."""
    for s in prange(x.shape[0]):
        sums[s], sq_sums[s] = _pivot_sums(x[s], pivot[s])


@njit(**_JIT)
def segment_normalize(x, mean, scale, shift, code, param, y):
    """y[s, l] = act((x[s, l] - mean[s]) * scale[s] + shift[s])."""
    for s in prange(x.shape[0]):
        m, a, b = mean[s], scale[s], shift[s]
        if code <= PIECEWISE_LINEAR:
            for i in range(x.shape[1]):
                z = (x[s, i] - m) * a + b
                y[s, i] = z if z > 0 else z * param
        else:
            for i in range(x.shape[1]):
                y[s, i] = _act((x[s, i] - m) * a + b, code, param)


@njit(**_JIT)
def segment_backward_sums(dy, x, mean, scale, shift, code, param, sum_g, sum_g_xc):
    """g = dy * act'(z): sum_g[s] = sum_l g,  sum_g_xc[s] = sum_l g * (x - mean[s])."""
    for s in prange(x.shape[0]):
        m, a, b = mean[s], scale[s], shift[s]
        x_row, dy_row = x[s], dy[s]
        total_g = 0.0
        total_gx = 0.0
        for start in range(0, x_row.shape[0], _CHUNK_LENGTH):
            x_chunk = x_row[start:start + _CHUNK_LENGTH]
            dy_chunk = dy_row[start:start + _CHUNK_LENGTH]
            acc_g = np.float32(0.0)
            acc_gx = np.float32(0.0)
            if code <= PIECEWISE_LINEAR:
                for i in range(x_chunk.shape[0]):
                    xc = x_chunk[i] - m
                    g = dy_chunk[i]
                    g = g if xc * a + b > 0 else g * param
                    acc_g += g
                    acc_gx += g * xc
            else:
                for i in range(x_chunk.shape[0]):
                    xc = x_chunk[i] - m
                    g = dy_chunk[i] * _act_grad(xc * a + b, code, param)
                    acc_g += g
                    acc_gx += g * xc
            total_g += acc_g
            total_gx += acc_gx
        sum_g[s] = total_g
        sum_g_xc[s] = total_gx


@njit(**_JIT)
def segment_backward_input(dy, x, mean, scale, shift, code, param, k1, k0, k2, batch_stats,
                           dx):
    """dx = g * k1[s] + k0[s] + (x - mean[s]) * k2[s]; without batch statistics and with
    no activation x is not read: dx = dy * k1[s]."""
    for s in prange(x.shape[0]):
        m, a, b, c1, c0, c2 = mean[s], scale[s], shift[s], k1[s], k0[s], k2[s]
        if code == 0 and not batch_stats:
            for i in range(x.shape[1]):
                dx[s, i] = dy[s, i] * c1
        elif code <= PIECEWISE_LINEAR:
            for i in range(x.shape[1]):
                xc = x[s, i] - m
                g = dy[s, i]
                g = g if xc * a + b > 0 else g * param
                dx[s, i] = g * c1 + c0 + xc * c2
        else:
            for i in range(x.shape[1]):
                xc = x[s, i] - m
                g = dy[s, i] * _act_grad(xc * a + b, code, param)
                dx[s, i] = g * c1 + c0 + xc * c2


# ---------------------------------------------------------------- columns x (M, C)

@njit(**_JIT)
def column_sums(x, pivot, sums, sq_sums):
    """Per column: sums[c] = sum_m (x[m, c] - pivot[c]), sq_sums likewise of the square;
    float32 over chunks of rows, float64 per block, blocks merged in order."""
    rows, cols = x.shape
    blocks = max(1, min(_MAX_BLOCKS, rows // _CHUNK_ROWS))
    part = np.zeros((blocks, 2, cols))
    for blk in prange(blocks):
        start, stop = blk * rows // blocks, (blk + 1) * rows // blocks
        acc = np.zeros(cols, np.float32)
        acc_sq = np.zeros(cols, np.float32)
        for r in range(start, stop):
            for c in range(cols):
                d = x[r, c] - pivot[c]
                acc[c] += d
                acc_sq[c] += d * d
            if (r - start) % _CHUNK_ROWS == _CHUNK_ROWS - 1 or r == stop - 1:
                _flush(part, blk, acc, acc_sq)
    _merge(part, sums, sq_sums)


@njit(**_JIT)
def column_normalize(x, mean, scale, shift, code, param, y):
    """y[m, c] = act((x[m, c] - mean[c]) * scale[c] + shift[c])."""
    rows, cols = x.shape
    for r in prange(rows):
        if code <= PIECEWISE_LINEAR:
            for c in range(cols):
                z = (x[r, c] - mean[c]) * scale[c] + shift[c]
                y[r, c] = z if z > 0 else z * param
        else:
            for c in range(cols):
                y[r, c] = _act((x[r, c] - mean[c]) * scale[c] + shift[c], code, param)


@njit(**_JIT)
def column_backward_sums(dy, x, mean, scale, shift, code, param, sum_g, sum_g_xc):
    """Per column: sum_g[c] = sum_m g,  sum_g_xc[c] = sum_m g * (x - mean[c])."""
    rows, cols = x.shape
    blocks = max(1, min(_MAX_BLOCKS, rows // _CHUNK_ROWS))
    part = np.zeros((blocks, 2, cols))
    for blk in prange(blocks):
        start, stop = blk * rows // blocks, (blk + 1) * rows // blocks
        acc_g = np.zeros(cols, np.float32)
        acc_gx = np.zeros(cols, np.float32)
        for r in range(start, stop):
            if code <= PIECEWISE_LINEAR:
                for c in range(cols):
                    xc = x[r, c] - mean[c]
                    g = dy[r, c]
                    g = g if xc * scale[c] + shift[c] > 0 else g * param
                    acc_g[c] += g
                    acc_gx[c] += g * xc
            else:
                for c in range(cols):
                    xc = x[r, c] - mean[c]
                    g = dy[r, c] * _act_grad(xc * scale[c] + shift[c], code, param)
                    acc_g[c] += g
                    acc_gx[c] += g * xc
            if (r - start) % _CHUNK_ROWS == _CHUNK_ROWS - 1 or r == stop - 1:
                _flush(part, blk, acc_g, acc_gx)
    _merge(part, sum_g, sum_g_xc)


@njit(**_JIT)
def column_backward_input(dy, x, mean, scale, shift, code, param, k1, k0, k2, batch_stats,
                          dx):
    """dx[m, c] = g * k1[c] + k0[c] + (x - mean[c]) * k2[c] (dy * k1[c] when x is not
    needed)."""
    rows, cols = x.shape
    for r in prange(rows):
        if code == 0 and not batch_stats:
            for c in range(cols):
                dx[r, c] = dy[r, c] * k1[c]
        elif code <= PIECEWISE_LINEAR:
            for c in range(cols):
                xc = x[r, c] - mean[c]
                g = dy[r, c]
                g = g if xc * scale[c] + shift[c] > 0 else g * param
                dx[r, c] = g * k1[c] + k0[c] + xc * k2[c]
        else:
            for c in range(cols):
                xc = x[r, c] - mean[c]
                g = dy[r, c] * _act_grad(xc * scale[c] + shift[c], code, param)
                dx[r, c] = g * k1[c] + k0[c] + xc * k2[c]


# ---------------------------------------------------------------- groups x (N, G, Cg, L)

@njit(**_JIT)
def group_forward(x, weight, bias, eps, code, param, y, mean, invstd):
    """GroupNorm/InstanceNorm forward, each (sample, group) block visited once while in
    cache: statistics over its Cg x L values (float32 chunk sums of x - first value, merged
    in float64), then y = act((x - mean) * invstd * weight[g, c] + bias[g, c])."""
    samples, groups, per_group, length = x.shape
    count = per_group * length
    for sg in prange(samples * groups):
        n, g = sg // groups, sg % groups
        block = x[n, g]
        pivot = block[0, 0]
        total = 0.0
        total_sq = 0.0
        for c in range(per_group):
            sums = _pivot_sums(block[c], pivot)
            total += sums[0]
            total_sq += sums[1]
        m, inv = _mean_invstd(pivot, total, total_sq, count, eps)
        mean[n, g] = m
        invstd[n, g] = inv
        for c in range(per_group):
            scale, shift = inv * weight[g, c], bias[g, c]
            x_row, y_row = block[c], y[n, g, c]
            if code <= PIECEWISE_LINEAR:
                for i in range(length):
                    z = (x_row[i] - m) * scale + shift
                    y_row[i] = z if z > 0 else z * param
            else:
                for i in range(length):
                    y_row[i] = _act((x_row[i] - m) * scale + shift, code, param)


@njit(**_JIT)
def group_backward(dy, x, mean, invstd, weight, bias, code, param, sum_g, sum_g_xhat, dx):
    """GroupNorm/InstanceNorm backward, each (sample, group) block visited once while in
    cache: per channel sum_g[n, g, c] = sum_l g and sum_g_xhat[n, g, c] = sum_l g * x_hat
    (g = dy * act'(z); float64, summed over samples by the caller for the parameter
    gradients), then dx = invstd * (g * w - mean(g * w) - x_hat * mean(g * w * x_hat))."""
    samples, groups, per_group, length = x.shape
    count = per_group * length
    for sg in prange(samples * groups):
        n, g = sg // groups, sg % groups
        m, inv = mean[n, g], invstd[n, g]
        total_gh = 0.0
        total_gh_xhat = 0.0
        for c in range(per_group):
            w, b = weight[g, c], bias[g, c]
            x_row, dy_row = x[n, g, c], dy[n, g, c]
            acc = np.float32(0.0)
            acc_x = np.float32(0.0)
            if code <= PIECEWISE_LINEAR:
                for i in range(length):
                    x_hat = (x_row[i] - m) * inv
                    gi = dy_row[i]
                    gi = gi if x_hat * w + b > 0 else gi * param
                    acc += gi
                    acc_x += gi * x_hat
            else:
                for i in range(length):
                    x_hat = (x_row[i] - m) * inv
                    gi = dy_row[i] * _act_grad(x_hat * w + b, code, param)
                    acc += gi
                    acc_x += gi * x_hat
            sum_g[n, g, c] = acc
            sum_g_xhat[n, g, c] = acc_x
            total_gh += np.float64(acc) * w
            total_gh_xhat += np.float64(acc_x) * w
        c1 = np.float32(total_gh / count)
        c2 = np.float32(total_gh_xhat / count)
        for c in range(per_group):
            w, b = weight[g, c], bias[g, c]
            x_row, dy_row, dx_row = x[n, g, c], dy[n, g, c], dx[n, g, c]
            if code <= PIECEWISE_LINEAR:
                for i in range(length):
                    x_hat = (x_row[i] - m) * inv
                    gi = dy_row[i]
                    gi = gi if x_hat * w + b > 0 else gi * param
                    dx_row[i] = inv * (gi * w - c1 - x_hat * c2)
            else:
                for i in range(length):
                    x_hat = (x_row[i] - m) * inv
                    gi = dy_row[i] * _act_grad(x_hat * w + b, code, param)
                    dx_row[i] = inv * (gi * w - c1 - x_hat * c2)


# ---------------------------------------------------------------- rows x (R, K)

@njit(**_JIT)
def row_forward(x, weight, bias, eps, code, param, y, mean, invstd):
    """Statistics and normalization of each row in one visit while it is in cache:
    mean[r], invstd[r] from float32 chunk sums of x - x[r, 0] merged in float64, then
    y[r, k] = act((x[r, k] - mean[r]) * invstd[r] * weight[k] + bias[k])."""
    rows, cols = x.shape
    for r in prange(rows):
        row, y_row = x[r], y[r]
        pivot = row[0]
        total, total_sq = _pivot_sums(row, pivot)
        m, inv = _mean_invstd(pivot, total, total_sq, cols, eps)
        mean[r] = m
        invstd[r] = inv
        if code <= PIECEWISE_LINEAR:
            for k in range(cols):
                z = (row[k] - m) * (inv * weight[k]) + bias[k]
                y_row[k] = z if z > 0 else z * param
        else:
            for k in range(cols):
                y_row[k] = _act((row[k] - m) * (inv * weight[k]) + bias[k], code, param)


@njit(**_JIT)
def row_backward(dy, x, mean, invstd, weight, bias, code, param, grad_weight, grad_bias, dx):
    """The whole backward of row statistics, each row visited once while in cache:
    g = dy * act'(z), m1 = mean_k(g * weight), m2 = mean_k(g * weight * x_hat), then
    dx[r, k] = invstd[r] * (g * weight[k] - m1 - x_hat * m2); grad_weight[k] = sum_r g * x_hat
    and grad_bias[k] = sum_r g, from float32 row-chunk partials merged in block order."""
    rows, cols = x.shape
    blocks = max(1, min(_MAX_BLOCKS, rows // _CHUNK_ROWS))
    part = np.zeros((blocks, 2, cols))
    for blk in prange(blocks):
        start, stop = blk * rows // blocks, (blk + 1) * rows // blocks
        acc_w = np.zeros(cols, np.float32)
        acc_b = np.zeros(cols, np.float32)
        g_row = np.empty(cols, np.float32)
        for r in range(start, stop):
            m, inv = mean[r], invstd[r]
            x_row, dy_row, dx_row = x[r], dy[r], dx[r]
            if code <= PIECEWISE_LINEAR:
                for k in range(cols):
                    g = dy_row[k]
                    g_row[k] = g if (x_row[k] - m) * inv * weight[k] + bias[k] > 0 else g * param
            else:
                for k in range(cols):
                    g_row[k] = dy_row[k] * _act_grad((x_row[k] - m) * inv * weight[k] + bias[k],
                                                     code, param)
            row_gh = np.float32(0.0)
            row_gh_xhat = np.float32(0.0)
            for k in range(cols):
                x_hat = (x_row[k] - m) * inv
                g = g_row[k]
                acc_w[k] += g * x_hat
                acc_b[k] += g
                row_gh += g * weight[k]
                row_gh_xhat += g * weight[k] * x_hat
            c1 = np.float32(row_gh / cols)
            c2 = np.float32(row_gh_xhat / cols)
            for k in range(cols):
                dx_row[k] = inv * (g_row[k] * weight[k] - c1 - (x_row[k] - m) * inv * c2)
            if (r - start) % _CHUNK_ROWS == _CHUNK_ROWS - 1 or r == stop - 1:
                _flush(part, blk, acc_w, acc_b)
    _merge(part, grad_weight, grad_bias)
