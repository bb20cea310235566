"""Triton lookup-table kernels on the packed CodeQuant format (see :mod:`codequant.core.format`).

Every kernel reads the saved layout as it is: ``indices`` uint8 [E, N, KP/2] (per 64-column
block, byte j holds column j in its low nibble and column j+32 in its high nibble),
``codebook`` [E, N, NG, 16], ``row_sum``. A byte tile [BLOCK_N, BLOCK_K/2] therefore splits
into a "low" tile (columns 64b + j) and a "high" tile (columns 64b + 32 + j); each is
looked up through the codebook and multiplied with the matching activation columns, so
two dots per K step and no shuffle of nibbles. The K order inside a dot is irrelevant.

Lookup (``LUT``): 0 loads ``codebook[n, g, idx]`` with a gathered global load (the
32-byte row codebook sits in L1); 1 keeps the [BLOCK_N, 16] codebook tile in registers
and uses ``tl.gather``; 2 (GPU only, one codebook per row) holds each row's 16 entries as
8 registers of low / high bytes and looks up 8 nibbles of a 32-bit word with 16 ``prmt``
byte permutes (inline PTX), no memory access per weight. Path 2 is the fast one; 0 and 1
are the portable ones the interpreter runs.

Activations (``X_MODE``): 0 float x, dot in the codebook copy's dtype (fp16 or bf16);
1 float x quantized per token on the fly (min/max prologue over K, then
q - z = clamp(rint(x / s) + z, 0, 15) - z, exact small integers, fp16 dot, y = s * acc);
2 pre-quantized int8 x = q - z with scales [rows, act groups] (fp16 dot).

Rounding is half-to-even like ``torch.round`` ((v + 1.5 * 2^23) - 1.5 * 2^23 in fp32,
exact for |v| < 2^22) and divisions are IEEE (``div_rn``), so q matches
``quantize_activations`` bit for bit.

MoE (``MOE``): 0 dense rows; 1 expert gate_up with SwiGLU, rows gathered by the sorted
assignment list (x row = assignment // topk), output row = padded slot; 2 expert down,
input row = padded slot, output row = assignment, scaled by its top-k weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

_RINT = tl.constexpr(12582912.0)  # 1.5 * 2**23


# Register lookup of 8 nibbles (one 32-bit word of packed indices) through a 16-entry table of
# 16-bit values held as 8 registers: L0..L3 = low bytes of entries 0-3, 4-7, 8-11, 12-15 and
# H0..H3 = their high bytes. prmt picks bytes by 3-bit selectors from 8-byte register pairs;
# entries 8-15 are chosen by a second prmt on bit 3 of each nibble. Output r (r = 0..3) holds
# the values of byte r's low nibble (bits 0-15) and high nibble (bits 16-31).
_PRMT_LUT_ASM = tl.constexpr("""
{
.reg .b32 a, b, sa, sb, t0, t1, lb, hb;
and.b32 a, $4, 0x77777777;
shr.b32 b, $4, 1;
and.b32 b, b, 0x44444444;
or.b32 sb, b, 0x3210;
prmt.b32 t0, $5, $6, a;
prmt.b32 t1, $7, $8, a;
prmt.b32 lb, t0, t1, sb;
prmt.b32 t0, $9, $10, a;
prmt.b32 t1, $11, $12, a;
prmt.b32 hb, t0, t1, sb;
prmt.b32 $0, lb, hb, 0x5140;
prmt.b32 $1, lb, hb, 0x7362;
shr.b32 sa, a, 16;
shr.b32 sb, b, 16;
or.b32 sb, sb, 0x3210;
prmt.b32 t0, $5, $6, sa;
prmt.b32 t1, $7, $8, sa;
prmt.b32 lb, t0, t1, sb;
prmt.b32 t0, $9, $10, sa;
prmt.b32 t1, $11, $12, sa;
prmt.b32 hb, t0, t1, sb;
prmt.b32 $2, lb, hb, 0x5140;
prmt.b32 $3, lb, hb, 0x7362;
}
""")


@triton.jit
def _prmt_lookup(word, t0, t1, t2, t3, t4, t5, t6, t7):
    return tl.inline_asm_elementwise(
        _PRMT_LUT_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [word, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
    )


@triton.jit
def _halves(v, DT: tl.constexpr):
    """(low 16 bits, high 16 bits) of int32 v as two DT (fp16 / bf16) values."""
    lo = v.to(tl.uint16).to(DT, bitcast=True)
    hi = (v >> 16).to(tl.uint16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _load_tables(tab_ptr, offs_n, stride_tn):
    base = tab_ptr + offs_n * stride_tn
    return (tl.load(base + 0)[:, None], tl.load(base + 1)[:, None], tl.load(base + 2)[:, None], tl.load(base + 3)[:, None],
            tl.load(base + 4)[:, None], tl.load(base + 5)[:, None], tl.load(base + 6)[:, None], tl.load(base + 7)[:, None])


@triton.jit
def _rint(v):
    return (v + _RINT) - _RINT


@triton.jit
def _quant_stats(x_ptr, x_rows, m_mask, K: tl.constexpr, clip, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row scale s and zero z of per-token asymmetric INT4 (see quantize_activations)."""
    offs_k = tl.arange(0, BLOCK_K)
    hi = tl.zeros((BLOCK_M,), tl.float32)
    lo = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=m_mask[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        hi = tl.maximum(hi, tl.max(x, 1))
        lo = tl.minimum(lo, tl.min(x, 1))
    hi = hi * clip
    lo = lo * clip
    s = tl.maximum(tl.math.div_rn(hi - lo, 15.0), 1e-8)
    z = _rint(tl.math.div_rn(-lo, s))
    return s, z


@triton.jit
def _quantize(x, s, z):
    """q - z for float x with broadcastable s, z (exact small integers, float32)."""
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)) + z, 0.0), 15.0)
    return q - z


@triton.jit
def _xt_tiles(x_ptr, x_rows, m_mask, col, K: tl.constexpr, s_row, z_row, DT: tl.constexpr, X_MODE: tl.constexpr, MASK_K: tl.constexpr):
    """Activation tiles x^T [len(col), BLOCK_M] at columns col and col + 32, in the dot dtype."""
    pl = x_ptr + x_rows[None, :] + col[:, None]
    if MASK_K:
        xl = tl.load(pl, mask=m_mask[None, :] & (col < K)[:, None], other=0.0)
        xh = tl.load(pl + 32, mask=m_mask[None, :] & (col + 32 < K)[:, None], other=0.0)
    else:
        xl = tl.load(pl, mask=m_mask[None, :], other=0.0)
        xh = tl.load(pl + 32, mask=m_mask[None, :], other=0.0)
    if X_MODE == 1:
        xl = _quantize(xl.to(tl.float32), s_row[None, :], z_row[None, :])
        xh = _quantize(xh.to(tl.float32), s_row[None, :], z_row[None, :])
    return xl.to(DT), xh.to(DT)


@triton.jit
def _dot_pair(acc, v, xl, xh, DT: tl.constexpr, UPCAST: tl.constexpr):
    lo, hi = _halves(v, DT)
    if UPCAST:
        return tl.dot(hi.to(tl.float32), xh.to(tl.float32), tl.dot(lo.to(tl.float32), xl.to(tl.float32), acc))
    return tl.dot(hi, xh, tl.dot(lo, xl, acc))


@triton.jit
def _lut2_step(acc, acc_u, word, word_u, tabs, tabs_u, x_ptr, x_rows, m_mask, base_col, K: tl.constexpr, s_row, z_row,
               DT: tl.constexpr, X_MODE: tl.constexpr, MASK_K: tl.constexpr, MOE: tl.constexpr):
    """One K step of the register-table path: 8 dots of K = BLOCK_K / 8 (one per nibble position)."""
    v0, v1, v2, v3 = _prmt_lookup(word, tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], tabs[5], tabs[6], tabs[7])
    if MOE == 1:
        u0, u1, u2, u3 = _prmt_lookup(word_u, tabs_u[0], tabs_u[1], tabs_u[2], tabs_u[3], tabs_u[4], tabs_u[5], tabs_u[6], tabs_u[7])
    xl, xh = _xt_tiles(x_ptr, x_rows, m_mask, base_col, K, s_row, z_row, DT, X_MODE, MASK_K)
    acc = _dot_pair(acc, v0, xl, xh, DT, False)
    if MOE == 1:
        acc_u = _dot_pair(acc_u, u0, xl, xh, DT, False)
    xl, xh = _xt_tiles(x_ptr, x_rows, m_mask, base_col + 1, K, s_row, z_row, DT, X_MODE, MASK_K)
    acc = _dot_pair(acc, v1, xl, xh, DT, False)
    if MOE == 1:
        acc_u = _dot_pair(acc_u, u1, xl, xh, DT, False)
    xl, xh = _xt_tiles(x_ptr, x_rows, m_mask, base_col + 2, K, s_row, z_row, DT, X_MODE, MASK_K)
    acc = _dot_pair(acc, v2, xl, xh, DT, False)
    if MOE == 1:
        acc_u = _dot_pair(acc_u, u2, xl, xh, DT, False)
    xl, xh = _xt_tiles(x_ptr, x_rows, m_mask, base_col + 3, K, s_row, z_row, DT, X_MODE, MASK_K)
    acc = _dot_pair(acc, v3, xl, xh, DT, False)
    if MOE == 1:
        acc_u = _dot_pair(acc_u, u3, xl, xh, DT, False)
    return acc, acc_u


@triton.jit
def _gemv_pair(acc, v, x_ptr, x_rows, m_mask, col, K: tl.constexpr, s_row, z_row, DT: tl.constexpr, X_MODE: tl.constexpr, MASK_K: tl.constexpr):
    lo, hi = _halves(v, DT)
    pl = x_ptr + x_rows[:, None] + col[None, :]
    if MASK_K:
        xl = tl.load(pl, mask=m_mask[:, None] & (col < K)[None, :], other=0.0).to(tl.float32)
        xh = tl.load(pl + 32, mask=m_mask[:, None] & (col + 32 < K)[None, :], other=0.0).to(tl.float32)
    else:
        xl = tl.load(pl, mask=m_mask[:, None], other=0.0).to(tl.float32)
        xh = tl.load(pl + 32, mask=m_mask[:, None], other=0.0).to(tl.float32)
    if X_MODE == 1:
        xl = _quantize(xl, s_row[:, None], z_row[:, None])
        xh = _quantize(xh, s_row[:, None], z_row[:, None])
    return acc + lo.to(tl.float32)[None, :, :] * xl[:, None, :] + hi.to(tl.float32)[None, :, :] * xh[:, None, :]


@triton.jit
def _w_tile(w_base, cb_base, cb_tile, offs_n, col, byte, half: tl.constexpr, K, G, NG, stride_wn, stride_cn,
            W_MODE: tl.constexpr, LUT: tl.constexpr, NG1: tl.constexpr, MASK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K/2] weight tile of columns ``col`` (the low or high nibbles)."""
    if W_MODE == 1:  # dense weights (the bf16 variant of the same kernel)
        ptrs = w_base + offs_n[:, None] * stride_wn + col[None, :]
        if MASK_K:
            w = tl.load(ptrs, mask=(col < K)[None, :], other=0.0)
        else:
            w = tl.load(ptrs)
    else:
        if half == 0:
            idx = (byte & 15).to(tl.int32)
        else:
            idx = (byte >> 4).to(tl.int32)
        if LUT == 1:
            w = tl.gather(cb_tile, idx, 1)
        else:
            if NG1:
                off = idx
            else:
                off = tl.minimum(col // G, NG - 1)[None, :] * 16 + idx
            w = tl.load(cb_base + offs_n[:, None] * stride_cn + off)
    return w


@triton.jit
def lut_mm_kernel(
    x_ptr, stride_xm, xs_ptr, stride_xsm,
    w_ptr, stride_we, stride_wn, cb_ptr, stride_ce, stride_cn,
    bias_ptr, y_ptr, stride_ym, stride_ys,
    rows_ptr, bexp_ptr, rw_ptr,
    M, N, NUM_VALID, N_OUT, clip,
    K: tl.constexpr, KP2: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, GA: tl.constexpr, TOPK: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    X_MODE: tl.constexpr, W_MODE: tl.constexpr, LUT: tl.constexpr, NG1: tl.constexpr,
    NGA1: tl.constexpr, MOE: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False, TAB_BF16: tl.constexpr = False,
):
    """acc[BLOCK_N, BLOCK_M] = W_tile @ X_tile^T (weights are the dot's A operand).

    SPLIT > 1 writes float32 partials [SPLIT, M, N] at y_ptr (dense only; the reduce
    kernel applies the epilogue). For MOE == 1 the tile covers gate rows n and up rows
    N_OUT + n and writes silu(gate) * up.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    BK2: tl.constexpr = BLOCK_K // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N_OUT
    offs_n_safe = tl.minimum(offs_n, N_OUT - 1)

    if MOE == 0:
        m_mask = offs_m < M
        in_rows = offs_m
        out_rows = offs_m
        expert = pid_m * 0
    else:
        expert = tl.load(bexp_ptr + pid_m)
        if expert < 0:
            return
        assign = tl.load(rows_ptr + offs_m)
        m_mask = assign < NUM_VALID
        if MOE == 1:
            in_rows = tl.where(m_mask, assign // TOPK, 0)
            out_rows = offs_m
        else:
            in_rows = offs_m
            out_rows = tl.where(m_mask, assign, 0)
    x_rows = in_rows.to(tl.int64) * stride_xm

    w_base = w_ptr + expert.to(tl.int64) * stride_we
    cb_base = cb_ptr + expert.to(tl.int64) * stride_ce
    if MOE == 1:
        w_base_u = w_base + N_OUT * stride_wn
        cb_base_u = cb_base + N_OUT * stride_cn
    else:
        w_base_u = w_base
        cb_base_u = cb_base

    cb_tile = 0.0
    cb_tile_u = 0.0
    if LUT == 1:  # codebook tile in registers
        e16 = tl.arange(0, 16)
        cb_tile = tl.load(cb_base + offs_n_safe[:, None] * stride_cn + e16[None, :])
        if MOE == 1:
            cb_tile_u = tl.load(cb_base_u + offs_n_safe[:, None] * stride_cn + e16[None, :])

    s_row = 0.0
    z_row = 0.0
    if X_MODE == 1:
        s_row, z_row = _quant_stats(x_ptr, x_rows, m_mask, K, clip, BLOCK_M, BLOCK_K)
    tabs = (0, 0, 0, 0, 0, 0, 0, 0)
    tabs_u = (0, 0, 0, 0, 0, 0, 0, 0)
    if LUT == 2:
        tabs = _load_tables(cb_base, offs_n_safe, stride_cn)
        if MOE == 1:
            tabs_u = _load_tables(cb_base_u, offs_n_safe, stride_cn)

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)

    offs_c = tl.arange(0, BK2)
    k_start = pid_k * K_PER_SPLIT
    if LUT == 2:
        # register-table path (inline PTX prmt); w_ptr / cb_ptr are int32 words / tables here
        BK8: tl.constexpr = BLOCK_K // 8
        offs_q = tl.arange(0, BK8)
        DT: tl.constexpr = tl.bfloat16 if TAB_BF16 else tl.float16
        for it in range(0, K_PER_SPLIT // BLOCK_K):
            k0 = k_start + it * BLOCK_K
            wcol = k0 // 8 + offs_q
            wptr = offs_n_safe[:, None] * stride_wn + wcol[None, :]
            if MASK_K:
                word = tl.load(w_base + wptr, mask=(wcol < KP2 // 4)[None, :], other=0)
            else:
                word = tl.load(w_base + wptr)
            word_u = word
            if MOE == 1:
                if MASK_K:
                    word_u = tl.load(w_base_u + wptr, mask=(wcol < KP2 // 4)[None, :], other=0)
                else:
                    word_u = tl.load(w_base_u + wptr)
            base_col = k0 + (offs_q // 8) * 64 + (offs_q % 8) * 4
            acc, acc_u = _lut2_step(acc, acc_u, word, word_u, tabs, tabs_u, x_ptr, x_rows, m_mask, base_col, K, s_row, z_row,
                                    DT, X_MODE, MASK_K, MOE)
    else:
        for it in range(0, K_PER_SPLIT // BLOCK_K):
            k0 = k_start + it * BLOCK_K
            col_lo = k0 + (offs_c // 32) * 64 + (offs_c % 32)
            col_hi = col_lo + 32
            byte_col = k0 // 2 + offs_c
            byte = 0
            byte_u = 0
            if W_MODE == 0:
                bptr = offs_n_safe[:, None] * stride_wn + byte_col[None, :]
                if MASK_K:
                    byte = tl.load(w_base + bptr, mask=(byte_col < KP2)[None, :], other=0)
                else:
                    byte = tl.load(w_base + bptr)
                if MOE == 1:
                    if MASK_K:
                        byte_u = tl.load(w_base_u + bptr, mask=(byte_col < KP2)[None, :], other=0)
                    else:
                        byte_u = tl.load(w_base_u + bptr)
            # activations, transposed: [BK2, BLOCK_M]
            xl_ptrs = x_ptr + x_rows[None, :] + col_lo[:, None]
            xh_ptrs = x_ptr + x_rows[None, :] + col_hi[:, None]
            if MASK_K:
                xl = tl.load(xl_ptrs, mask=m_mask[None, :] & (col_lo < K)[:, None], other=0.0)
                xh = tl.load(xh_ptrs, mask=m_mask[None, :] & (col_hi < K)[:, None], other=0.0)
            else:
                xl = tl.load(xl_ptrs, mask=m_mask[None, :], other=0.0)
                xh = tl.load(xh_ptrs, mask=m_mask[None, :], other=0.0)
            if X_MODE == 1:
                xl = _quantize(xl.to(tl.float32), s_row[None, :], z_row[None, :])
                xh = _quantize(xh.to(tl.float32), s_row[None, :], z_row[None, :])

            wl = _w_tile(w_base, cb_base, cb_tile, offs_n_safe, col_lo, byte, 0, K, G, NG, stride_wn, stride_cn, W_MODE, LUT, NG1, MASK_K)
            wh = _w_tile(w_base, cb_base, cb_tile, offs_n_safe, col_hi, byte, 1, K, G, NG, stride_wn, stride_cn, W_MODE, LUT, NG1, MASK_K)
            xl = xl.to(wl.dtype)
            xh = xh.to(wl.dtype)
            if MOE == 1:
                wl_u = _w_tile(w_base_u, cb_base_u, cb_tile_u, offs_n_safe, col_lo, byte_u, 0, K, G, NG, stride_wn, stride_cn, W_MODE, LUT, NG1, MASK_K)
                wh_u = _w_tile(w_base_u, cb_base_u, cb_tile_u, offs_n_safe, col_hi, byte_u, 1, K, G, NG, stride_wn, stride_cn, W_MODE, LUT, NG1, MASK_K)
            if UPCAST_DOT:  # the interpreter's bf16 dot is wrong; same bf16-rounded values, fp32 dot
                xl = xl.to(tl.float32)
                xh = xh.to(tl.float32)
                wl = wl.to(tl.float32)
                wh = wh.to(tl.float32)
                if MOE == 1:
                    wl_u = wl_u.to(tl.float32)
                    wh_u = wh_u.to(tl.float32)
            if X_MODE == 2 and not NGA1:
                # per-(row, activation group) scales: the step lies inside one group (GA % BLOCK_K == 0)
                sg = tl.load(xs_ptr + in_rows * stride_xsm + k0 // GA, mask=m_mask, other=0.0)
                acc += tl.dot(wh, xh, tl.dot(wl, xl)) * sg[None, :]
                if MOE == 1:
                    acc_u += tl.dot(wh_u, xh, tl.dot(wl_u, xl)) * sg[None, :]
            else:
                acc = tl.dot(wh, xh, tl.dot(wl, xl, acc))
                if MOE == 1:
                    acc_u = tl.dot(wh_u, xh, tl.dot(wl_u, xl, acc_u))

    out = acc
    out_u = acc_u
    if X_MODE == 1:
        out = out * s_row[None, :]
        out_u = out_u * s_row[None, :]
    if X_MODE == 2 and NGA1:
        s = tl.load(xs_ptr + in_rows * stride_xsm, mask=m_mask, other=0.0)
        out = out * s[None, :]
        out_u = out_u * s[None, :]
    if SPLIT > 1:
        ptrs = y_ptr + pid_k * stride_ys + out_rows[None, :] * stride_ym + offs_n[:, None]
        tl.store(ptrs, out, mask=n_valid[:, None] & m_mask[None, :])
        return
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n_safe).to(tl.float32)[:, None]
    if MOE == 1:
        out = out / (1.0 + tl.exp(-out)) * out_u
    if MOE == 2:
        rw = tl.load(rw_ptr + out_rows, mask=m_mask, other=0.0).to(tl.float32)
        out = out * rw[None, :]
    ptrs = y_ptr + out_rows.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=n_valid[:, None] & m_mask[None, :])


@triton.jit
def _gemv_gather(x_ptr, x_rows, m_mask, w_ptr, stride_wn, cb_ptr, stride_cn, offs_n_safe, k_start, s_row, z_row,
                 K: tl.constexpr, KP2: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_MODE: tl.constexpr, LUT: tl.constexpr,
                 NG1: tl.constexpr, MASK_K: tl.constexpr):
    """GEMV K loop with codebook gathers (LUT 0 / 1); returns [BLOCK_M, BLOCK_N] sums."""
    BK2: tl.constexpr = BLOCK_K // 2
    cb_tile = 0.0
    if LUT == 1:
        cb_tile = tl.load(cb_ptr + offs_n_safe[:, None] * stride_cn + tl.arange(0, 16)[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N, BK2), tl.float32)
    offs_c = tl.arange(0, BK2)
    for it in range(0, K_PER_SPLIT // BLOCK_K):
        k0 = k_start + it * BLOCK_K
        col_lo = k0 + (offs_c // 32) * 64 + (offs_c % 32)
        col_hi = col_lo + 32
        byte_col = k0 // 2 + offs_c
        bptr = w_ptr + offs_n_safe[:, None] * stride_wn + byte_col[None, :]
        if MASK_K:
            byte = tl.load(bptr, mask=(byte_col < KP2)[None, :], other=0)
            xl = tl.load(x_ptr + x_rows[:, None] + col_lo[None, :], mask=m_mask[:, None] & (col_lo < K)[None, :], other=0.0)
            xh = tl.load(x_ptr + x_rows[:, None] + col_hi[None, :], mask=m_mask[:, None] & (col_hi < K)[None, :], other=0.0)
        else:
            byte = tl.load(bptr)
            xl = tl.load(x_ptr + x_rows[:, None] + col_lo[None, :], mask=m_mask[:, None], other=0.0)
            xh = tl.load(x_ptr + x_rows[:, None] + col_hi[None, :], mask=m_mask[:, None], other=0.0)
        xl = xl.to(tl.float32)
        xh = xh.to(tl.float32)
        if X_MODE == 1:
            xl = _quantize(xl, s_row[:, None], z_row[:, None])
            xh = _quantize(xh, s_row[:, None], z_row[:, None])
        wl = _w_tile(w_ptr, cb_ptr, cb_tile, offs_n_safe, col_lo, byte, 0, K, G, NG, stride_wn, stride_cn, 0, LUT, NG1, MASK_K).to(tl.float32)
        wh = _w_tile(w_ptr, cb_ptr, cb_tile, offs_n_safe, col_hi, byte, 1, K, G, NG, stride_wn, stride_cn, 0, LUT, NG1, MASK_K).to(tl.float32)
        acc += wl[None, :, :] * xl[:, None, :] + wh[None, :, :] * xh[:, None, :]
    return tl.sum(acc, 2)


@triton.jit
def lut_gemv_kernel(
    x_ptr, stride_xm, w_ptr, stride_wn, cb_ptr, stride_cn, bias_ptr, y_ptr, stride_ym, stride_ys,
    M, N, clip,
    K: tl.constexpr, KP2: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    X_MODE: tl.constexpr, LUT: tl.constexpr, NG1: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MASK_K: tl.constexpr, TAB_BF16: tl.constexpr = False,
):
    """Decode GEMV on CUDA cores for a few tokens: acc[m, n, c] += W[n, c] * x[m, c], reduced once."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_n_safe = tl.minimum(offs_n, N - 1)
    x_rows = offs_m.to(tl.int64) * stride_xm
    s_row = 0.0
    z_row = 0.0
    if X_MODE == 1:
        s_row, z_row = _quant_stats(x_ptr, x_rows, m_mask, K, clip, BLOCK_M, BLOCK_K)
    k_start = pid_k * K_PER_SPLIT
    if LUT == 2:
        BK8: tl.constexpr = BLOCK_K // 8
        DT: tl.constexpr = tl.bfloat16 if TAB_BF16 else tl.float16
        tabs = _load_tables(cb_ptr, offs_n_safe, stride_cn)
        offs_q = tl.arange(0, BK8)
        acc8 = tl.zeros((BLOCK_M, BLOCK_N, BK8), tl.float32)
        for it in range(0, K_PER_SPLIT // BLOCK_K):
            k0 = k_start + it * BLOCK_K
            wcol = k0 // 8 + offs_q
            wptr = w_ptr + offs_n_safe[:, None] * stride_wn + wcol[None, :]
            if MASK_K:
                word = tl.load(wptr, mask=(wcol < KP2 // 4)[None, :], other=0)
            else:
                word = tl.load(wptr)
            v0, v1, v2, v3 = _prmt_lookup(word, tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], tabs[5], tabs[6], tabs[7])
            base_col = k0 + (offs_q // 8) * 64 + (offs_q % 8) * 4
            acc8 = _gemv_pair(acc8, v0, x_ptr, x_rows, m_mask, base_col, K, s_row, z_row, DT, X_MODE, MASK_K)
            acc8 = _gemv_pair(acc8, v1, x_ptr, x_rows, m_mask, base_col + 1, K, s_row, z_row, DT, X_MODE, MASK_K)
            acc8 = _gemv_pair(acc8, v2, x_ptr, x_rows, m_mask, base_col + 2, K, s_row, z_row, DT, X_MODE, MASK_K)
            acc8 = _gemv_pair(acc8, v3, x_ptr, x_rows, m_mask, base_col + 3, K, s_row, z_row, DT, X_MODE, MASK_K)
        out = tl.sum(acc8, 2)
    else:
        out = _gemv_gather(x_ptr, x_rows, m_mask, w_ptr, stride_wn, cb_ptr, stride_cn, offs_n_safe, k_start, s_row, z_row, K, KP2, G, NG,
                           K_PER_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, X_MODE, LUT, NG1, MASK_K)
    if X_MODE == 1:
        out = out * s_row[:, None]
    if SPLIT > 1:
        ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(ptrs, out, mask=m_mask[:, None] & n_valid[None, :])
        return
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n_safe).to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_valid[None, :])


@triton.jit
def splitk_reduce_kernel(part_ptr, stride_ps, bias_ptr, y_ptr, stride_ym, M, N,
                         SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[m, n] = sum_s part[s, m, n] (+ bias) for split-K partials (already scaled)."""
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * stride_ps + m * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_quant_kernel(x_ptr, stride_xm, q_ptr, stride_qm, s_ptr, stride_sm, clip, GA: tl.constexpr, BLOCK: tl.constexpr):
    """int8 q - z [rows, K] and scale [rows, K / GA] of per-token (per-group) asymmetric INT4."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    base = x_ptr + row.to(tl.int64) * stride_xm + g * GA
    hi = tl.zeros((BLOCK,), tl.float32)
    lo = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, GA, BLOCK):
        x = tl.load(base + k0 + offs, mask=k0 + offs < GA, other=0.0).to(tl.float32)
        hi = tl.maximum(hi, x)
        lo = tl.minimum(lo, x)
    hi = tl.max(hi, 0) * clip
    lo = tl.min(lo, 0) * clip
    s = tl.maximum(tl.math.div_rn(hi - lo, 15.0), 1e-8)
    z = _rint(tl.math.div_rn(-lo, s))
    qbase = q_ptr + row.to(tl.int64) * stride_qm + g * GA
    for k0 in range(0, GA, BLOCK):
        m = k0 + offs < GA
        x = tl.load(base + k0 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(qbase + k0 + offs, _quantize(x, s, z).to(tl.int8), mask=m)
    tl.store(s_ptr + row * stride_sm + g, s)


@triton.jit
def moe_align_kernel(
    ids_ptr, sorted_ptr, bexp_ptr, S, MAX_BLOCKS,
    S_P2: tl.constexpr, MAXB_P2: tl.constexpr, BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr,
):
    """Group the S = T * topk assignments by expert, each expert's run padded to BLOCK_M.

    One program, no host sync: counts per expert (one-hot sums), padded offsets, then each
    assignment's slot = padded offset of its expert + its rank among earlier assignments of
    that expert. sorted_ptr[slot] = assignment index (S in padding slots); bexp_ptr[block] =
    expert of that block of BLOCK_M slots (-1 past the last).
    """
    experts = tl.arange(0, E_P2)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((E_P2,), tl.int32)
    for c0 in range(0, S_P2, CHUNK):
        ids = tl.load(ids_ptr + c0 + offs, mask=c0 + offs < S, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), 0)
    nblocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(nblocks, 0)
    block_start = block_end - nblocks
    # experts of each block, and padding slots
    boffs = tl.arange(0, BCHUNK)
    r = tl.arange(0, BLOCK_M)
    for b0 in range(0, MAXB_P2, BCHUNK):
        b = b0 + boffs
        inside = (b[:, None] >= block_start[None, :]) & (b[:, None] < block_end[None, :])
        e_of_b = tl.max(tl.where(inside, experts[None, :], -1), 1)
        tl.store(bexp_ptr + b, e_of_b, mask=b < MAX_BLOCKS)
        start_b = tl.sum(tl.where(inside, block_start[None, :], 0), 1)
        count_b = tl.sum(tl.where(inside, counts[None, :], 0), 1)
        local = (b - start_b)[:, None] * BLOCK_M + r[None, :]
        pad = (local >= count_b[:, None]) | (e_of_b < 0)[:, None]
        slot = b[:, None] * BLOCK_M + r[None, :]
        tl.store(sorted_ptr + slot, tl.full((BCHUNK, BLOCK_M), 0, tl.int32) + S, mask=pad & (b < MAX_BLOCKS)[:, None])
    # scatter assignments
    running = tl.zeros((E_P2,), tl.int32)
    for c0 in range(0, S_P2, CHUNK):
        valid = c0 + offs < S
        ids = tl.load(ids_ptr + c0 + offs, mask=valid, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        incl = tl.cumsum(onehot, 0)
        dest = tl.sum(onehot * (block_start[None, :] * BLOCK_M + running[None, :] + incl - 1), 1)
        tl.store(sorted_ptr + dest, c0 + offs, mask=valid)
        running += tl.sum(onehot, 0)


@triton.jit
def topk_sum_kernel(src_ptr, y_ptr, H, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """y[t] = sum_j src[t * TOPK + j] (float32 sum, stored in y's dtype)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOPK):
        acc += tl.load(src_ptr + (t * TOPK + j).to(tl.int64) * H + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * H + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_kernel(idx_ptr, stride_in, cb_ptr, stride_cn, out_ptr, stride_on, N, K, P,
                   G: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n, c] = cb[n, c // G, nibble(n, c)] for a [BLOCK_N, 2 * BLOCK_P] tile of columns.

    Raw values are moved, so one kernel serves every element type (bf16 / fp16 / fp32 /
    fp8 codebook copies viewed as integers). Byte p of a row holds columns
    64 (p // 32) + p % 32 (low nibble) and that + 32 (high nibble).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (offs_n < N)[:, None] & (p < P)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    b = tl.load(idx_ptr + rows * stride_in + p[None, :], mask=mask, other=0).to(tl.int32)
    col_lo = (p // 32) * 64 + p % 32
    col_hi = col_lo + 32
    cb_row = cb_ptr + rows * stride_cn
    v_lo = tl.load(cb_row + (col_lo // G)[None, :] * 16 + (b & 15), mask=mask, other=0)
    v_hi = tl.load(cb_row + (col_hi // G)[None, :] * 16 + (b >> 4), mask=mask, other=0)
    out_row = out_ptr + rows * stride_on
    tl.store(out_row + col_lo[None, :], v_lo, mask=mask & (col_lo < K)[None, :])
    tl.store(out_row + col_hi[None, :], v_hi, mask=mask & (col_hi < K)[None, :])
