"""The Triton kernels' ops (signatures of :mod:`codequant.kernels.reference`, plus ``config``).

:func:`linear` and :func:`moe` launch the Triton kernels, ``lut_gemv_kernel`` (M <= 4) and
``lut_mm_kernel`` (tensor cores); the kernel table (:mod:`codequant.kernels.gpu`) runs them on
CUDA tensors where :func:`supports_linear` / :func:`supports_moe` accept the call and the
CUDA decode kernels and the prefill paths, tried first, do not. For W4A4 that is the fused
MoE beyond the CUDA kernels' slots (checked on an H200 at real sizes: rel. err. 1.6-1.9e-3
against the reference, Qwen3, Mixtral and DeepSeek shapes, 16-2048 tokens); a W4A4 dense
linear that neither the CUDA decode kernel nor the prefill paths take runs on the reference.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how CI checks them
(tests call :func:`linear` / :func:`moe` directly). The saved format is read as it is;
derived copies (bf16 / fp8 codebooks) are cached, keyed by the codebook tensor's storage and
version. The kernels cover activations of 4 bits in groups of multiples of 64 (or per token).
"""

from __future__ import annotations

import enum
import functools
import os
import weakref
from dataclasses import dataclass

import torch

from ...core.format import PackedWeight, effective_group_size
from ...core.activations import ActQuantSpec
from ..dispatch import Case
from . import kernels as K_

FUSED_QUANT_MAX_M = 64


class XMode(enum.IntEnum):
    """How ``lut_mm_kernel`` / ``lut_gemv_kernel`` read x (their ``X_MODE``)."""

    FLOAT = 0  # float x, dot in the codebook copy's dtype
    FUSED_QUANT = 1  # x quantized per token in the kernel, fp16 dot of the codes
    INT8_CODES = 2  # int8 codes q - z and group scales from quantize_activations_int8


class MoeStage(enum.IntEnum):
    """Which rows ``lut_mm_kernel`` computes (its ``MOE``)."""

    DENSE = 0  # a plain linear
    GATE_UP = 1  # expert gate_up with SwiGLU, rows gathered by the sorted routing
    DOWN = 2  # expert down, scaled by the routing weight, scattered to the slots


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs in its interpreter (``TRITON_INTERPRET=1``, Triton's own setting)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Config:
    """Launch parameters of one kernel call (``kind``: "gemv" or "mm")."""

    kind: str = "mm"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    lut: int = 0


# ---------------------------------------------------------------- derived weight copies

_DERIVED: dict = {}


def _derived(t: torch.Tensor, kind: str, make):
    key = (t.data_ptr(), tuple(t.shape), t.dtype, t.device, t._version, kind)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    value = make()
    if len(_DERIVED) > 4096:
        _DERIVED.clear()
    _DERIVED[key] = (weakref.ref(t), value)
    return value


def codebook_as(codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if codebook.dtype == dtype:
        return codebook
    return _derived(codebook, f"cb-{dtype}", lambda: codebook.to(dtype).contiguous())


def int8_codebook(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codebook [..., N, NG, 16] and float32 per-row scale [..., N]: C ~ scale * C_int8."""

    def make():
        c = codebook.float()
        scale = c.abs().amax(dim=(-1, -2)).clamp(min=1e-12) / 127.0
        q = torch.round(c / scale[..., None, None]).clamp(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()

    return _derived(codebook, "cb-int8", make)


def lut_tables(codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Register tables for LUT path 2: int32 [..., N, NG, 8] = low bytes (4 words) then high
    bytes (4 words) of the 16 entries of each codebook, in fp16 or bf16."""

    def make():
        c = codebook_as(codebook, dtype).contiguous()
        b = c.view(torch.uint8).reshape(*c.shape, 2)
        return torch.cat([b[..., 0], b[..., 1]], -1).contiguous().view(torch.int32)

    return _derived(codebook, f"tab-{dtype}", make)


# ---------------------------------------------------------------- configuration

def _default_lut() -> int:
    return 0 if interpreting() else 2


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << (max(v, 1) - 1).bit_length())


def linear_config(m: int, n: int, k: int, x_mode: XMode) -> Config:
    """Heuristic launch configuration (tuned on an H200, see benchmarks/notes-gpu.md)."""
    kp = -(-k // 64) * 64
    if m <= 4 and x_mode in (XMode.FLOAT, XMode.FUSED_QUANT):
        block_n = 16
        tiles = -(-n // block_n)
        split = 1
        while tiles * split < 264 and kp // (split * 2) >= 512:
            split *= 2
        return Config("gemv", block_m=_pow2_at_least(m, 1), block_n=block_n, block_k=256, split=split, num_warps=4, num_stages=3, lut=_default_lut())
    if m <= 64:
        block_m = _pow2_at_least(m, 16)
        block_n = 64
        tiles = -(-n // block_n)
        split = 1
        while tiles * split < 264 and kp // (split * 2) >= 512:
            split *= 2
        return Config("mm", block_m=block_m, block_n=block_n, block_k=128, split=split, num_warps=4, num_stages=3, lut=_default_lut())
    return Config("mm", block_m=128, block_n=128, block_k=128, split=1, num_warps=8, num_stages=3, lut=_default_lut())


def moe_config(slots: int) -> Config:
    if slots <= 256:
        return Config("mm", block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=3, lut=_default_lut())
    return Config("mm", block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3, lut=_default_lut())


# ---------------------------------------------------------------- helpers

def _supported_act(act: ActQuantSpec, k: int) -> bool:
    if not act.enabled:
        return True
    if act.bits != 4:
        return False
    g = effective_group_size(act.group_size, k)
    return g == k or g % 64 == 0


def quantize_activations_int8(x2: torch.Tensor, act: ActQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q - z [M, K] and float32 scales [M, K / group] (same q as quantize_activations)."""
    m, k = x2.shape
    ga = effective_group_size(act.group_size, k)
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, k // ga, dtype=torch.float32, device=x2.device)
    if m:
        block = min(1024, _pow2_at_least(ga, 16))
        K_.act_quant_kernel[(m, k // ga)](x2, x2.stride(0), q, q.stride(0), s, s.stride(0), float(act.clip), GA=ga, BLOCK=block, num_warps=4)
    return q, s


@dataclass(frozen=True)
class Routing:
    """The MoE side of a ``lut_mm_kernel`` launch: the slot ids sorted by expert (padded to
    blocks), each block's expert, the routing weights, the slot count, k and the block count."""

    stage: MoeStage
    rows: torch.Tensor
    block_expert: torch.Tensor
    weights: torch.Tensor
    slots: int
    topk: int
    blocks: int


def _mm(
    x, xs, w: PackedWeight | torch.Tensor, y, m, n_out, k, cfg: Config, x_mode: XMode, dot_dtype,
    bias=None, ga=None, clip=1.0, routing: Routing | None = None,
):
    """Launch lut_mm_kernel (packed ``PackedWeight`` or a dense [E, N, K] tensor); ``routing``: a MoE stage."""
    dense = isinstance(w, torch.Tensor)
    lut = cfg.lut
    if dense or w.codebook.shape[-2] != 1 or (xs is not None and xs.shape[1] > 1) or (lut == 2 and cfg.block_k < 128):
        lut = min(lut, 1)
    tab_bf16 = False
    if dense:
        wt = w if w.dim() == 3 else w.unsqueeze(0)
        cb = wt  # unused
        stride_we, stride_wn = wt.stride(0), wt.stride(1)
        stride_ce = stride_cn = 0
        kp2, g, ng = (k + 63) // 64 * 32, k, 1
    elif lut == 2:
        idx = w.indices
        wt = idx.view(torch.int32)
        stride_we = wt.stride(0) if wt.dim() == 3 else 0
        stride_wn = wt.stride(-2)
        kp2 = idx.shape[-1]
        cb = lut_tables(w.codebook, dot_dtype)
        tab_bf16 = dot_dtype == torch.bfloat16
        stride_ce = cb.stride(0) if cb.dim() == 4 else 0
        stride_cn = cb.stride(-3)
        ng, g = 1, k
    else:
        idx = w.indices
        stride_we = idx.stride(0) if idx.dim() == 3 else 0
        stride_wn = idx.stride(-2)
        kp2 = idx.shape[-1]
        cb = codebook_as(w.codebook, dot_dtype)
        stride_ce = cb.stride(0) if cb.dim() == 4 else 0
        stride_cn = cb.stride(-3)
        ng = cb.shape[-2]
        g = k // ng
        wt = idx
        if ng != 1:
            lut = 0
    block_k = cfg.block_k
    if x_mode == XMode.INT8_CODES and xs.shape[1] > 1:
        while ga % block_k:
            block_k //= 2
    split, k_per_split, mask_k, out, stride_ym, stride_ys = _split_k(kp2 * 2, k, block_k, cfg.split if routing is None else 1, y, m, n_out)
    gm = routing.blocks if routing is not None else -(-m // cfg.block_m)
    grid = (-(-n_out // cfg.block_n), gm, split)
    dummy = out
    K_.lut_mm_kernel[grid](
        x, x.stride(0), xs if xs is not None else dummy, xs.stride(0) if xs is not None else 0,
        wt, stride_we, stride_wn, cb, stride_ce, stride_cn,
        bias if bias is not None else dummy, out, stride_ym, stride_ys,
        *((routing.rows, routing.block_expert, routing.weights) if routing is not None else (dummy, dummy, dummy)),
        m, n_out, routing.slots if routing is not None else 0, n_out, float(clip),
        K=k, KP2=kp2, G=g, NG=ng, GA=ga or k, TOPK=routing.topk if routing is not None else 1, K_PER_SPLIT=k_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        X_MODE=int(x_mode), W_MODE=1 if dense else 0, LUT=lut, NG1=ng == 1,
        NGA1=xs is None or xs.shape[1] == 1, MOE=int(routing.stage if routing is not None else MoeStage.DENSE), SPLIT=split, HAS_BIAS=bias is not None, MASK_K=mask_k,
        UPCAST_DOT=interpreting() and (dense and wt.dtype == torch.bfloat16 or not dense and cb.dtype == torch.bfloat16),
        TAB_BF16=tab_bf16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _reduce(out, bias, y)


def _split_k(kp: int, k: int, block_k: int, split: int, y: torch.Tensor, m: int, n: int):
    """Cut the KP padded columns into ``split`` block-aligned slices: (split, columns per
    slice, whether the kernel must mask columns, output buffer, its row and slice strides).
    With several slices the kernel writes float32 partials [split, M, N] for :func:`_reduce`."""
    k_per_split = -(-kp // split // block_k) * block_k
    split = -(-kp // k_per_split)
    mask_k = k % block_k != 0 or split * k_per_split != kp
    if split == 1:
        return split, k_per_split, mask_k, y, y.stride(0), 0
    part = torch.empty(split, m, n, dtype=torch.float32, device=y.device)
    return split, k_per_split, mask_k, part, n, part.stride(0)


def _reduce(part, bias, y):
    split, m, n = part.shape
    block_n = 256
    K_.splitk_reduce_kernel[(-(-n // block_n), m)](
        part, part.stride(0), bias if bias is not None else part, y, y.stride(0), m, n,
        SPLIT=split, BLOCK_N=block_n, HAS_BIAS=bias is not None, num_warps=4,
    )


def _gemv(x2, w: PackedWeight, y, bias, cfg: Config, x_mode: XMode, dot_dtype, clip):
    m, k = x2.shape
    n = w.out_features
    tdt = torch.float16 if x_mode == XMode.FUSED_QUANT else dot_dtype
    lut = cfg.lut if w.codebook.shape[-2] == 1 else 0
    if lut == 2 and (tdt == torch.float32 or (x_mode == XMode.FUSED_QUANT and k % 64)):
        lut = 0  # W4A4 register-table GEMV failed the H200 check at K % 64 != 0 (see notes-gpu.md)
    wt = w.indices
    if lut == 2:
        cb, wt = lut_tables(w.codebook, tdt), w.indices.view(torch.int32)
    else:
        cb = codebook_as(w.codebook, tdt)
    ng = w.codebook.shape[-2]
    kp2 = w.indices.shape[-1]
    block_k = cfg.block_k
    split, k_per_split, mask_k, out, stride_ym, stride_ys = _split_k(kp2 * 2, k, block_k, cfg.split, y, m, n)
    K_.lut_gemv_kernel[(-(-n // cfg.block_n), split, -(-m // cfg.block_m))](
        x2, x2.stride(0), wt, wt.stride(0), cb, cb.stride(0), bias if bias is not None else out, out, stride_ym, stride_ys,
        m, n, float(clip),
        K=k, KP2=kp2, G=k // ng, NG=ng, K_PER_SPLIT=k_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, X_MODE=int(x_mode), LUT=lut,
        NG1=ng == 1, SPLIT=split, HAS_BIAS=bias is not None, MASK_K=mask_k, TAB_BF16=tdt == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _reduce(out, bias, y)


def _dot_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16 for fp16 x, else bf16 (the bf16 codebook copy); fp32 x keeps fp32 only when interpreting."""
    if x.dtype == torch.float32 and not interpreting():
        return torch.bfloat16
    return {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}.get(x.dtype, torch.float32)


# ---------------------------------------------------------------- ops

def _supported_weight(w: PackedWeight | torch.Tensor, experts: bool) -> bool:
    return isinstance(w, torch.Tensor) or w.indices.dim() == (3 if experts else 2)


def supports_packed(case: Case) -> bool:
    """A packed [N, K] weight and activations the GPU kernels cover (every GPU linear's condition)."""
    return (isinstance(case.weight, PackedWeight) and _supported_weight(case.weight, False)
            and _supported_act(case.act, case.weight.in_features))


def supports_linear(case: Case) -> bool:
    """CUDA tensors, :func:`supports_packed`; quantized activations only for empty x (the CUDA
    decode kernel and the prefill paths take the others they can)."""
    return case.x.is_cuda and supports_packed(case) and (not case.act.enabled or case.rows == 0)


def supports_moe(case: Case) -> bool:
    """CUDA tensors, packed [E, N, K] experts with activations the kernels cover, or dense experts."""
    gate_up, down = case.weight, case.down
    if not case.x.is_cuda or not (_supported_weight(gate_up, True) and _supported_weight(down, True)):
        return False
    return isinstance(gate_up, torch.Tensor) or (
        _supported_act(case.act, case.x.shape[-1]) and _supported_act(case.down_act, down.in_features))


def rows_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a [M, K] view with unit column stride (a copy where needed)."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """y = Q_act(x) @ W_hat^T + bias on the Triton kernels (reference.linear's contract; any
    device under ``TRITON_INTERPRET=1``); ``config`` overrides the launch heuristics."""
    k = weight.in_features
    lead = x.shape[:-1]
    x2 = rows_of(x, k)
    m, n = x2.shape[0], weight.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    one_group = not act.enabled or effective_group_size(act.group_size, k) == k
    if not act.enabled:
        x_mode = XMode.FLOAT
    elif one_group and m <= FUSED_QUANT_MAX_M:
        x_mode = XMode.FUSED_QUANT
    else:
        x_mode = XMode.INT8_CODES
    cfg = config or linear_config(m, n, k, x_mode)
    dot_dtype = _dot_dtype(x)
    if cfg.kind == "gemv" and x_mode in (XMode.FLOAT, XMode.FUSED_QUANT):
        _gemv(x2, weight, y, bias, cfg, x_mode, dot_dtype, act.clip)
        return y.reshape(*lead, n)
    if x_mode == XMode.INT8_CODES:
        xq, xs = quantize_activations_int8(x2, act)
        _mm(xq, xs, weight, y, m, n, k, cfg, x_mode, torch.float16, bias=bias, ga=effective_group_size(act.group_size, k))
    else:
        _mm(x2, None, weight, y, m, n, k, cfg, x_mode, torch.float16 if x_mode == XMode.FUSED_QUANT else dot_dtype,
            bias=bias, clip=act.clip)
    return y.reshape(*lead, n)


def moe_route(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sorted-by-expert padded slots (assignment ids, S = padding) and each block's expert:
    one launch, the CUDA extension's kernel on a CUDA device when it is built, else Triton's."""
    s = top_k_index.numel()
    max_blocks = max(1, (s + min(num_experts, s) * (block_m - 1)) // block_m)
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=top_k_index.device)
    bexp = torch.empty(max_blocks, dtype=torch.int32, device=top_k_index.device)
    ext = _cuda_extension() if top_k_index.is_cuda and num_experts <= 4096 else None
    if ext is not None:
        ext.moe_align(expert_ids(top_k_index), sorted_ids, bexp, num_experts, block_m)
        return sorted_ids, bexp, max_blocks
    e_p2 = _pow2_at_least(num_experts, 2)
    chunk = max(16, min(256, 8192 // e_p2))
    bchunk = max(1, min(64, 4096 // e_p2, 8192 // (e_p2 * 1)))
    bchunk = 1 << (bchunk.bit_length() - 1)
    K_.moe_align_kernel[(1,)](top_k_index.reshape(-1), sorted_ids, bexp, s, max_blocks,
                              S_P2=_pow2_at_least(s, chunk), MAXB_P2=_pow2_at_least(max_blocks, bchunk), BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, BCHUNK=bchunk, num_warps=4)
    return sorted_ids, bexp, max_blocks


def expert_ids(top_k_index: torch.Tensor) -> torch.Tensor:
    """The router's expert indices flattened, contiguous, int32 or int64 (what the CUDA kernels read)."""
    ids = top_k_index.reshape(-1)
    return (ids if ids.dtype in (torch.int32, torch.int64) else ids.long()).contiguous()


def topk_sum(y_slots: torch.Tensor, out: torch.Tensor, topk: int, pdl: bool = False) -> torch.Tensor:
    """out[t] = sum_j y_slots[t * topk + j] (float32 sum, rounded once to out's dtype): the CUDA
    extension's kernel on a CUDA device when it is built (``pdl``: launched after one of its GEMVs),
    else Triton's."""
    t, h_dim = out.shape
    ext = _cuda_extension() if y_slots.is_cuda else None
    if ext is not None:
        ext.topk_sum(y_slots, out, topk, pdl)
        return out
    block = min(1024, _pow2_at_least(h_dim, 16))
    K_.topk_sum_kernel[(t, -(-h_dim // block))](y_slots, out, h_dim, TOPK=topk, BLOCK=block, num_warps=4)
    return out


def _cuda_extension():
    from . import cuda_gemv

    return cuda_gemv.load() if cuda_gemv.enabled() else None


def moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight | torch.Tensor,
    down: PackedWeight | torch.Tensor,
    act: ActQuantSpec = ActQuantSpec(bits=16),
    down_act: ActQuantSpec = ActQuantSpec(bits=16),
    hadamard_block: int = 0,
    config: Config | None = None,
) -> torch.Tensor:
    """Fused routed SwiGLU experts on the Triton kernels (reference.moe's contract): one routing
    launch, one gate_up + SwiGLU launch over all active experts, one down launch, one top-k sum.

    ``gate_up`` / ``down`` may also be dense [E, 2I, H] / [E, H, I] tensors: the same
    kernels then read those weights instead of looking them up (the bf16 comparison).
    """
    dense = isinstance(gate_up, torch.Tensor)
    h_dim = x.shape[-1]
    i_dim = (gate_up.shape[1] if dense else gate_up.out_features) // 2
    n_experts = gate_up.shape[0] if dense else gate_up.indices.shape[0]
    t, topk = top_k_index.shape
    s = t * topk
    out = torch.empty(t, h_dim, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    cfg = config or moe_config(s)
    rows, bexp, max_blocks = moe_route(top_k_index, n_experts, cfg.block_m)
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    dot_dtype = _dot_dtype(x)
    if dense:
        dot_dtype = gate_up.dtype

    def run(inp, in_act, w, y, n_out, k, stage, valid_rows):
        routing = Routing(stage, rows, bexp, top_k_weights.reshape(-1), s, topk, max_blocks)
        if dense or not in_act.enabled:
            _mm(inp, None, w, y, valid_rows, n_out, k, cfg, XMode.FLOAT, dot_dtype, routing=routing)
        elif effective_group_size(in_act.group_size, k) == k and s <= FUSED_QUANT_MAX_M * 4:
            _mm(inp, None, w, y, valid_rows, n_out, k, cfg, XMode.FUSED_QUANT, torch.float16, clip=in_act.clip, routing=routing)
        else:
            xq, xs = quantize_activations_int8(inp, in_act)
            _mm(xq, xs, w, y, valid_rows, n_out, k, cfg, XMode.INT8_CODES, torch.float16, ga=effective_group_size(in_act.group_size, k),
                routing=routing)

    h = torch.empty(max_blocks * cfg.block_m, i_dim, dtype=torch.float32, device=x.device)
    run(x2, act, gate_up, h, i_dim, h_dim, MoeStage.GATE_UP, t)
    if hadamard_block:
        from ...core.hadamard import block_hadamard

        h = block_hadamard(h, hadamard_block)
    y_slots = torch.empty(s, h_dim, dtype=torch.float32, device=x.device)
    run(h, down_act, down, y_slots, h_dim, i_dim, MoeStage.DOWN, max_blocks * cfg.block_m)
    return topk_sum(y_slots, out, topk)
