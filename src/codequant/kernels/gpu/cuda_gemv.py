"""CUDA C++ decode kernels (M <= 16 rows of x per weight) on the packed format: ``csrc/cq_gemv.cu``
next to this module (package data, shipped in the wheel and the sdist).

The extension ``codequant.kernels.gpu._cq_gemv`` when the install built it (setup.py: torch with
CUDA and a CUDA toolkit at build time), else built on first use from the packaged sources with
``torch.utils.cpp_extension.load`` for the device's architecture (sm_90 on an H200) and cached
by PyTorch's extension builder. When neither works (no nvcc, failed build, GPU older than
sm_80), the entry points return None / False, one warning gives the reason and the fix, and the
caller keeps the Triton path. ``KernelOptions(cuda_gemv=False)`` (``CODEQUANT_CUDA_GEMV=0``)
turns the kernels off. :func:`supports_linear` / :func:`supports_moe` are their conditions in
the kernel table (:mod:`codequant.kernels.gpu`).

* :func:`linear`: W4A16 (x straight from its bf16 / fp16 tensor, or paired by a prologue
  kernel; matches the reference up to fp32 summation order and, for bf16 x, the bf16
  rounding of the codebook) and activations quantized with one scale per token: the
  prologue quantizes each row exactly as
  :func:`~codequant.core.activations.quantize_activations` (same IEEE divisions), the
  codes q - z (exact in fp16) meet the fp16 codebook on tensor cores and the scale is applied
  after the exact fp32 accumulation. Opt-in ``KernelOptions(cuda_w4a4_int8=True)``: for up to 7 bits,
  int8 codes on integer tensor cores against an int8 copy of the codebook
  (``ops.int8_codebook``: per-row scale max|C| / 127, each weight off by at most half an int8
  step, the CPU kernels' tolerance).
* :func:`moe`: routed SwiGLU experts for decode batches. With few (token, k) slots against
  experts, one block per slot with its expert read from the router's indices; otherwise the
  tokens grouped by expert into blocks of ``bm`` rows (one routing launch). One gate_up
  launch over all active experts with SwiGLU in its epilogue, one down launch that scales
  by the routing weight and scatters to the slots, one launch that sums each token's slots.
  W4A16 on 16-bit x reads x and h in place (h written in the dot type), so decode is three
  launches; quantized activations (or the block Hadamard) add a prologue before each GEMV
  that gathers, pairs, applies the down projection's block Hadamard (a fast Walsh-Hadamard
  transform in shared memory) and quantizes. Dense bf16 expert weights run through the same kernels
  (``WBF16``), the comparison that isolates the weight format.
* :func:`route`: an MoE router (bf16 / fp16 weights [E, H]) for up to ROUTE_MAX_T tokens in two
  launches (logits over many blocks; softmax, top-k and renormalization in one block, with PDL):
  :class:`codequant.modules.router.Routing`.

Kernel design in the .cu file and benchmarks/notes-gpu.md.
"""

from __future__ import annotations

import enum
import logging
import math
from pathlib import Path

import torch

from ...core.format import PackedWeight, effective_group_size
from ...core.activations import ActQuantSpec
from ...core.hadamard import block_hadamard
from ..dispatch import Case, options

log = logging.getLogger(__name__)

MAX_M = 16
MOE_MAX_SLOTS = 8192


class Epilogue(enum.IntEnum):
    """What the GEMV kernel does with its sums."""

    PLAIN = 0  # y = sums (+ bias)
    SWIGLU = 1  # MoE gate_up: h = silu(gate) * up
    SCATTER = 2  # MoE down: scaled by the routing weight, written to the slots


_EXT = None
_FAILED = False
_SOURCES = ("cq_gemv_binding.cpp", "cq_gemv.cu", "cq_gemv.h")
_PROPS: dict = {}
_EMPTY: dict = {}
# warps per SM the launch config aims at (H200 sweep: dense 8-24 alike, 32 up to 1.3x slower on
# 14336x4096; the MoE launches up to 1.15x faster with 32 on Mixtral shapes, alike elsewhere)
DENSE_WARPS_PER_SM, MOE_WARPS_PER_SM = 14, 32
# cp.async ring depth per warp (chunks in flight + 1): dense 2 to 4 measured alike on an H200; the
# MoE's short expert rows gain from 4 (Qwen3-30B-A3B shapes, 4 and 16 tokens: 6-10% faster than 2)
STAGES, MOE_STAGES = 2, 4
# dense W4A16 rows at least this long, for at most SMEM_LUT_MAX_M rows of x, look up pair words in
# shared-memory tables (built once per block, so they pay on long rows) instead of the register
# lookup (H200: 4096x14336 M=1 20.1 -> 17.6 us; K = 4096 1.1-1.6x slower, M = 16 1.35x slower)
SMEM_LUT_MIN_K, SMEM_LUT_MAX_M = 8192, 8
# MoE batches with at most n_experts / SLOT_BLOCKS_MAX_SHARE (token, k) slots run one block per slot with
# the expert read from the router's indices (no routing launch); an expert picked twice is read twice,
# which costs little while slots are few against experts (decode)
SLOT_BLOCKS_MAX_SHARE = 4


SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
# the router kernels' limits (cq_gemv.h): tokens, experts, top-k, and T * E (the top-k launch holds 8 bytes per
# logit in shared memory, within ROUTE_MAX_SMEM)
ROUTE_MAX_T, ROUTE_MAX_E, ROUTE_MAX_K, ROUTE_MAX_LOGITS = 16, 1024, 32, 12 * 1024
PREP_HADAMARD_MAX_KP = 16384  # the prologue's block Hadamard holds a row of up to this many fp32 in shared memory (cq_gemv.h)


def enabled() -> bool:
    return options().cuda_gemv


def load(verbose: bool = False):
    """The compiled extension, or None (the reason and the fix warned once)."""
    global _EXT, _FAILED
    if _EXT is not None or _FAILED:
        return _EXT
    try:
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            raise _Unavailable(f"compute capability {major}.{minor} < 8.0 (mma.m16n8k16 bf16 needs sm_80)",
                               "none: this GPU runs the Triton kernels")
        try:
            from . import _cq_gemv as ext  # built at install

            _EXT = ext
        except ImportError:
            _EXT = _build(major, minor, verbose)
    except Exception as e:  # noqa: BLE001  (no nvcc, failed build: keep the Triton path)
        _FAILED = True
        fix = e.fix if isinstance(e, _Unavailable) else (
            "install a CUDA toolkit matching torch.version.cuda (nvcc on PATH or CUDA_HOME set), "
            "or reinstall with it: pip install --no-build-isolation codequant; "
            "cuda_gemv.load(verbose=True) shows the compiler output")
        log.warning("CodeQuant CUDA decode kernels unavailable, using the Triton path (slower decode). "
                    "Reason: %s. Fix: %s", e, fix)
        _EXT = None
    return _EXT


class _Unavailable(RuntimeError):
    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.fix = fix


def _build(major: int, minor: int, verbose: bool):
    """The extension compiled now from the packaged sources for sm_{major}{minor} (cached by torch)."""
    missing = [s for s in _SOURCES if not (SOURCE_DIR / s).is_file()]
    if missing:
        raise _Unavailable(f"sources {missing} missing from {SOURCE_DIR}", "reinstall codequant (the wheel and the sdist ship them)")
    from torch.utils.cpp_extension import load as _load

    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    return _load(
        name=f"codequant_cq_gemv_v3_sm{major}{minor}",
        sources=[str(SOURCE_DIR / s) for s in _SOURCES[:2]],
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", arch, "-lineinfo"],
        verbose=verbose,
    )


def _device_props(device) -> tuple[int, int]:
    """(SM count, compute capability major) of a CUDA device, looked up once."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _PROPS:
        props = torch.cuda.get_device_properties(i)
        _PROPS[i] = (props.multi_processor_count, props.major)
    return _PROPS[i]


def _sm_count(device) -> int:
    return _device_props(device)[0]


def _none(device) -> torch.Tensor:
    if device not in _EMPTY:
        _EMPTY[device] = torch.empty(0, device=device)
    return _EMPTY[device]


def config(tiles16: int, k: int, sms: int = 132, warps_per_sm: int = DENSE_WARPS_PER_SM) -> tuple[int, int]:
    """(R row tiles of 16 per warp, W warps per block splitting K) for ``tiles16`` tiles of 16
    output rows (all experts together for a MoE): two row tiles per warp when that still
    gives about one block per SM, up to ``warps_per_sm`` warps per SM, at least 3 chunks of 128
    columns per warp (the H200 sweep in benchmarks/results/gpu-decode-cuda-meta.json)."""
    r = 2 if tiles16 // 2 >= 0.9 * sms else 1
    blocks = -(-tiles16 // r)
    chunks = -(-k // 128)
    w_max = 8 if r == 2 else 16
    w = 1
    while w < w_max and blocks * w * 2 <= warps_per_sm * sms and w * 2 <= max(1, chunks // 3):
        w *= 2
    return r, w


def one_wave_warps(k: int) -> int:
    """Warps per block splitting K for one 16-row tile per block when the tiles fit in one wave
    (tiles <= SMs): 16 (a block fills an SM) for rows of 16 or more 128-column chunks, else a power
    of two giving each warp about 2 chunks (H100 sweep at M = 1 and 16, with PDL: 2048x2048,
    2048x4096, 2048x7168, 768x2048 1.07-1.25x faster with 16 warps than config()'s 4-8; 2048x768
    1.5-1.6x with 4 warps than with 2; benchmarks/notes-gpu.md, 2026-12-07)."""
    chunks = -(-k // 128)
    if chunks >= 16:
        return 16
    return 1 << max(0, math.ceil(math.log2(max(1, chunks / 2))))


def dense_config(tiles16: int, k: int, sms: int, in_place: bool) -> tuple[int, int]:
    """The (R, W) :func:`linear` launches: :func:`config`, with :func:`one_wave_warps` for
    one-row-tile blocks in one wave when x is read in place (measured for W4A16 only)."""
    r, w = config(tiles16, k, sms)
    if in_place and r == 1 and tiles16 <= sms:
        w = one_wave_warps(k)
    return r, w


def _act_ok(act: ActQuantSpec, k: int) -> bool:
    return not act.enabled or (act.bits <= 8 and effective_group_size(act.group_size, k) == k)


def _packed_ok(w: PackedWeight, experts: bool) -> bool:
    idx, cb = w.indices, w.codebook
    k = w.in_features
    if idx.dim() != (3 if experts else 2) or idx.dtype != torch.uint8 or cb.dtype != torch.float16:
        return False
    if not (idx.is_contiguous() and cb.is_contiguous()) or idx.data_ptr() % 16 or cb.data_ptr() % 16:
        return False
    ng = cb.shape[-2]
    if ng > 1 and (k % ng or (k // ng) % 64):
        return False
    return idx.shape[-1] * 2 == -(-k // 64) * 64


def supported(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec = ActQuantSpec(bits=16)) -> bool:
    """Whether :func:`linear` takes x [..., K] as its M rows (the extension aside)."""
    if not (x.is_cuda and enabled() and 1 <= math.prod(x.shape[:-1]) <= MAX_M):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return _act_ok(act, weight.in_features) and _packed_ok(weight, experts=False)


def supports_linear(case: Case) -> bool:
    """The table's condition: :func:`supported` on x's rows, the GPU kernels' activations, the extension built."""
    from .ops import supports_packed

    return supports_packed(case) and supported(case.x, case.weight, case.act) and load() is not None


def run_linear(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None = None,
               hadamard_block: int = 0) -> torch.Tensor:
    """:func:`linear` on x [..., K] (a call :func:`supports_linear` accepts), y in x's dtype."""
    from .ops import rows_of

    x2 = rows_of(x, weight.in_features)
    y = torch.empty(x2.shape[0], weight.out_features, dtype=x.dtype, device=x.device)
    if not linear(x2, weight, act, bias, y, hadamard_block=hadamard_block):
        raise RuntimeError("the CUDA decode kernel declined a call its predicate accepted")
    return y.reshape(*x.shape[:-1], weight.out_features)


def _int8_path(act: ActQuantSpec) -> bool:
    """Int8 codes and codebooks on integer tensor cores (opt-in, ``KernelOptions(cuda_w4a4_int8=True)``:
    the int8 rounding of codebooks with an outlier centroid costs accuracy, see the module doc)."""
    return options().cuda_w4a4_int8 and act.enabled and act.bits <= 7


def _prep(ext, x: torch.Tensor, kp: int, n_rows: int, bf16: bool, act: ActQuantSpec, rows=None, nslots=0, topk=0,
          pdl: bool = False, hadamard_block: int = 0):
    """x words of x's rows: 16-bit pairs [n_rows, KP/2] or int8 codes [n_rows, KP/4], and the
    per-row scales of quantized activations (``pdl``: x is the previous launch's output;
    ``hadamard_block``: each row through the block Hadamard first, see :func:`prep_hadamard_ok`)."""
    i8 = _int8_path(act)
    xp = torch.empty(n_rows, kp // (4 if i8 else 2), dtype=torch.int32, device=x.device)
    xs = torch.empty(n_rows, dtype=torch.float32, device=x.device) if act.enabled else _none(x.device)
    none = _none(x.device)
    ext.prep_x(x, xp, xs, rows if rows is not None else none, nslots, topk, bf16, act.bits if act.enabled else 16,
               float(act.clip), i8, pdl, hadamard_block)
    return xp, xs


def prep_hadamard_ok(k: int, block: int) -> bool:
    """The prologue applies the block Hadamard itself (in shared memory) to rows of width k
    (``KernelOptions.cuda_prologue_hadamard``)."""
    return options().cuda_prologue_hadamard and block > 0 and k % block == 0 and -(-k // 64) * 64 <= PREP_HADAMARD_MAX_KP


def _lut_args(w: PackedWeight, act: ActQuantSpec) -> tuple:
    """(indices, fp16 codebook, int8 codebook, row scales) for the kernel; int8 ones when x is int8."""
    none = _none(w.indices.device)
    if _int8_path(act):
        from .ops import int8_codebook

        cb8, scale = int8_codebook(w.codebook)
        return w.indices, w.codebook, cb8, scale
    return w.indices, w.codebook, none, none


def linear(x2: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None, y: torch.Tensor,
           r: int | None = None, w: int | None = None, stages: int = STAGES, smem_lut: bool | None = None,
           pdl: bool | None = None, hadamard_block: int = 0) -> bool:
    """y[:] = Q_act(x2 H) @ W_hat^T (+ bias) for x2 [M <= 16, K], H the online block Hadamard (0: none;
    in the prologue where :func:`prep_hadamard_ok`); False when this path does not apply.
    ``r``, ``w``, ``stages``, ``smem_lut``, ``pdl`` override the launch heuristics (benchmarks)."""
    if not supported(x2, weight, act):
        return False
    ext = load()
    if ext is None:
        return False
    m, k = x2.shape
    n = weight.out_features
    if hadamard_block and not prep_hadamard_ok(k, hadamard_block):
        x2, hadamard_block = block_hadamard(x2, hadamard_block), 0
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    sms = _sm_count(x2.device)
    tiles = -(-n // 16)
    direct = (not act.enabled and not hadamard_block and x2.dtype != torch.float32 and k % 64 == 0 and x2.stride(0) % 8 == 0
              and x2.data_ptr() % 16 == 0)
    if r is None or w is None:
        r0, w0 = dense_config(tiles, k, sms, direct)
        r, w = r or r0, w or w0
    kp = weight.indices.shape[-1] * 2
    none = _none(x2.device)
    bf16_dot = x2.dtype != torch.float16 and not act.enabled
    b = bias.float().contiguous() if bias is not None else none
    lut = _lut_args(weight, act)
    # PDL: the prologue or the GEMV is resident while the previous launch finishes, and the GEMV
    # fetches its weights and tables before it waits for x (the previous launch's output); not for
    # 1-row-tile blocks filling half the SMs or more, unless a W4A4 prologue of M <= 4 rows comes first
    # or x is read in place by one wave of blocks of other than 8 warps (H200 and H100, 2048x4096 and
    # 2048x7168 with 8 warps: 0.84-0.93x for W4A16, 0.76-0.87x for W4A4 at M = 16, 1.2-1.3x for W4A4
    # at M <= 4; the blocks placed early spread unevenly; W4A16 blocks of 16 warps, one per SM, and of
    # 2-4 warps gain 1.1-1.6x from it: benchmarks/notes-gpu.md, 2026-12-07)
    if pdl is None:
        pdl = r == 2 or tiles < sms // 2 or (direct and tiles <= sms and w != 8) or (not direct and m <= 4)
    pdl = pdl and _pdl(x2.device)
    xin, xs = (x2, none) if direct else _prep(ext, x2, kp, m, bf16_dot, act, pdl=pdl, hadamard_block=hadamard_block)
    out = y if y.is_contiguous() else torch.empty(y.shape, dtype=torch.float32, device=y.device)
    ext.gemv(xin, direct, xs, *lut, none, b, out, none, none, none, m, k, 0, 0, int(Epilogue.PLAIN), 0,
             bf16_dot, r, w, stages, (k >= SMEM_LUT_MIN_K and m <= SMEM_LUT_MAX_M) if smem_lut is None else smem_lut, 0,
             int(pdl))
    if out is not y:
        y.copy_(out)
    return True


def moe_supported(x: torch.Tensor, top_k_index: torch.Tensor, gate_up, down, act: ActQuantSpec, down_act: ActQuantSpec) -> bool:
    """Whether :func:`moe` takes the call (the extension aside)."""
    s = top_k_index.numel()
    h_dim = x.shape[-1]
    if not (x.is_cuda and enabled() and 0 < s <= MOE_MAX_SLOTS and x.dim() == 2):
        return False
    if isinstance(gate_up, torch.Tensor):
        if gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16 or h_dim % 64 or act.enabled or down_act.enabled:
            return False
        i_dim = gate_up.shape[1] // 2
        if i_dim % 64:
            return False
    else:
        if not (_packed_ok(gate_up, True) and _packed_ok(down, True)):
            return False
        i_dim = gate_up.out_features // 2
    return _act_ok(act, h_dim) and _act_ok(down_act, i_dim)


def supports_moe(case: Case) -> bool:
    """The table's condition: :func:`moe_supported`, the extension built."""
    return moe_supported(case.x, case.top_k_index, case.weight, case.down, case.act, case.down_act) and load() is not None


def moe(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up, down,
        act: ActQuantSpec, down_act: ActQuantSpec, hadamard_block: int = 0) -> torch.Tensor | None:
    """Routed SwiGLU experts (reference.moe's contract) for up to MOE_MAX_SLOTS (token, k)
    slots; ``gate_up`` / ``down`` packed [E, 2I, H] / [E, H, I] or dense bf16 tensors.
    None when this path does not apply."""
    if not moe_supported(x, top_k_index, gate_up, down, act, down_act):
        return None
    ext = load()
    if ext is None:
        return None
    dense = isinstance(gate_up, torch.Tensor)
    t, topk = top_k_index.shape
    s = t * topk
    h_dim = x.shape[-1]
    if dense:
        n_exp, two_i = gate_up.shape[0], gate_up.shape[1]
        gate_up, down = gate_up.contiguous(), down.contiguous()
    else:
        n_exp, two_i = gate_up.indices.shape[0], gate_up.out_features
    i_dim = two_i // 2
    from .ops import expert_ids, moe_route, topk_sum

    none = _none(x.device)
    if s * SLOT_BLOCKS_MAX_SHARE <= n_exp:  # one block per slot, experts straight from the router's indices
        bm, rows, max_blocks, bexp = 1, none, s, expert_ids(top_k_index)
    else:
        bm = 16 if s >= 8 * n_exp else 8
        rows, bexp, max_blocks = moe_route(top_k_index, n_exp, bm)
    n_rows = max_blocks * bm
    sms = _sm_count(x.device)
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    kp_h, kp_i = -(-h_dim // 64) * 64, -(-i_dim // 64) * 64
    if dense:
        w_gu, w_dn = (none, none, none, none, gate_up), (none, none, none, none, down)
    else:
        w_gu, w_dn = (*_lut_args(gate_up, act), none), (*_lut_args(down, down_act), none)
    active = min(max_blocks, n_exp)
    rw = top_k_weights.reshape(-1)
    rw = (rw if rw.dtype in (torch.bfloat16, torch.float16, torch.float32) else rw.float()).contiguous()
    pdl = _pdl(x.device)
    # gate_up + SwiGLU -> h [rows, I]: x read in place (16-bit W4A16) or gathered / quantized by a prologue
    if _raw_ok(x2, act, dense):
        bf16, xin, xs, x_direct = x2.dtype == torch.bfloat16, x2, none, True
    else:
        bf16, x_direct = not act.enabled, False
        xin, xs = _prep(ext, x2, kp_h, n_rows, bf16, act, rows, s, topk, pdl)
    # h straight in the down kernel's 16-bit dot type when nothing (quantization, Hadamard) comes between
    h_direct = not down_act.enabled and not hadamard_block and i_dim % 64 == 0
    h_dtype = torch.bfloat16 if dense or x2.dtype != torch.float16 else torch.float16
    h = torch.empty(n_rows, i_dim, dtype=h_dtype if h_direct else torch.float32, device=x.device)
    _, w_g = config(-(-i_dim // 16) * 2 * active, h_dim, sms, MOE_WARPS_PER_SM)
    ext.gemv(xin, x_direct, xs, *w_gu, none, h, bexp, rows, none, bm, h_dim, s, bm, int(Epilogue.SWIGLU),
             i_dim, bf16, 2, min(w_g, 8), MOE_STAGES, False, topk if x_direct else 0, (2 if x_direct else 1) if pdl else 0)
    fused_hadamard = prep_hadamard_ok(i_dim, hadamard_block)
    if hadamard_block and not fused_hadamard:
        h = block_hadamard(h, hadamard_block)
    # down, scaled by the routing weight, scattered to the slots -> sum over k
    if h_direct:
        bf16, hin, hs = h_dtype == torch.bfloat16, h, none
    else:
        bf16 = not down_act.enabled
        hin, hs = _prep(ext, h, kp_i, n_rows, bf16, down_act, rows, s, 0, pdl, hadamard_block if fused_hadamard else 0)
    y_slots = torch.empty(s, h_dim, dtype=torch.float32, device=x.device)
    r_d, w_d = config(-(-h_dim // 16) * active, i_dim, sms, MOE_WARPS_PER_SM)
    # PDL: the down GEMV fetches its first weights and tables while the launch writing h finishes
    ext.gemv(hin, h_direct, hs, *w_dn, none, y_slots, bexp, rows, rw, bm, i_dim, s, bm,
             int(Epilogue.SCATTER), 0, bf16, r_d, w_d, MOE_STAGES, False, 0, int(pdl))
    return topk_sum(y_slots, torch.empty(t, h_dim, dtype=x.dtype, device=x.device), topk, pdl)


def _pdl(device) -> bool:
    """Programmatic dependent launch of our kernels (sm_90+, ``KernelOptions(cuda_pdl=False)`` turns it off)."""
    return options().cuda_pdl and _device_props(device)[1] >= 9


def _raw_ok(x2: torch.Tensor, act: ActQuantSpec, dense: bool) -> bool:
    """The kernels read x itself (16-bit, rows of whole 64-column blocks, 16-byte aligned);
    dense bf16 expert weights need bf16 x."""
    ok_dtype = x2.dtype == torch.bfloat16 or (x2.dtype == torch.float16 and not dense)
    return (not act.enabled and ok_dtype and x2.shape[1] % 64 == 0 and x2.stride(0) % 8 == 0
            and x2.data_ptr() % 16 == 0)


def route_supported(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`route` takes x [T, H] against the router weight [E, H] (the extension aside;
    only tensor metadata, so torch.compile traces it)."""
    if not (x.is_cuda and x.dim() == 2 and weight.dim() == 2):
        return False
    t, h = x.shape
    e = weight.shape[0]
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.shape[1] == h and h % 8 == 0
            and 1 <= t <= ROUTE_MAX_T and e <= ROUTE_MAX_E and t * e <= ROUTE_MAX_LOGITS and 1 <= top_k <= min(e, ROUTE_MAX_K))


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int, renorm: bool, scale: float, fp32_logits: bool,
          fp32_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, E], weights [T, k], index int64 [T, k]) of softmax top-k routing for a call
    :func:`route_supported` accepts, in two launches: l = x W^T (fp32 sums; in x's dtype unless
    ``fp32_logits``), p = softmax(l) in fp32, the k largest p best first (ties: the lower expert
    index), divided by their sum when ``renorm``, times ``scale``; weights in float32 when
    ``fp32_weights``, else in the logits' dtype."""
    ext = load()
    if ext is None:
        raise RuntimeError("the CUDA router kernel is unavailable (cuda_gemv.load() warned why)")
    if x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    t, e = x.shape[0], weight.shape[0]
    ldtype = torch.float32 if fp32_logits else x.dtype
    logits = torch.empty(t, e, dtype=ldtype, device=x.device)
    weights = torch.empty(t, top_k, dtype=torch.float32 if fp32_weights else ldtype, device=x.device)
    index = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    ws = torch.empty(t, e, dtype=torch.float32, device=x.device)
    ext.route(x, weight.contiguous(), logits, weights, index, not fp32_logits, renorm, scale, ws, _pdl(x.device))
    return logits, weights, index
