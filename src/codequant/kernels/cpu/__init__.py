"""CPU lookup-table kernels for packed CodeQuant weights (compiled extension ``_lut``).

``linear`` and ``moe`` have the signatures of :mod:`codequant.kernels.reference` (plus a
``threads`` argument, default ``torch.get_num_threads()`` or :func:`decode_threads`'s) and
register in the kernel table (:mod:`codequant.kernels.dispatch`) as the ``cpu`` backend, for
the CPU calls :func:`supports_linear` / :func:`supports_moe` accept.

Paths (C++ in ``csrc/cpu``, chosen at run time by CPU features; force one with
``CODEQUANT_CPU_ISA=portable|avx2|avx512`` or :func:`use_isa`):

* W4A16 (``act.bits >= 16``): float32 activations; centroids looked up as float32
  (vpermps on AVX-512) and multiplied-added in float32. Matches the reference up to
  float32 summation order.
* W4A8 / W4A4 (``act.bits <= 8``): the activations are quantized per token (or per
  group) in C exactly as :func:`~codequant.core.activations.quantize_activations`
  does (bit-identical codes, scales, zeros), the codebooks are held as int8 with one
  scale per row and group (``sc = max|C| / 127``), and the dot products are integer
  (vpshufb or, with VBMI, vpermb lookups + vpdpbusd on AVX-512; vpmaddubsw on AVX2). The one approximation is
  that int8 rounding of the centroids, so the documented tolerance is::

      |y - y_ref| <= 0.5 * sum_k sc[n, g(k)] * |x_hat_k|  (+ float32 rounding)

  i.e. each weight is off by at most half an int8 step of its row/group's largest centroid
  (relative 1/254). The int8 codebooks and the row sums they need are prepared once per
  weight and cached (keyed on the codebook tensor, invalidated when it is modified).

Per weight, activation spec and ISA the kernel arguments are prepared once and kept in a
plan (a capsule for ``_lut.run``); each call checks it against the weight tensors' identity,
version counters and data pointers, so a decode step's call costs a few microseconds of
Python. bf16 inputs, biases and outputs are converted inside the kernel (the output is the
float32 result rounded once, as ``.to(torch.bfloat16)`` would).

On AVX-512 the kernels stream a row-interleaved copy of the indices made once per weight
at first use (:func:`interleaved_indices`; the saved format and the module's buffers are
unchanged): 4 rows per sequential run, about twice the DRAM throughput of 4 separate
rows of K/2 bytes. It costs one extra copy of the indices in memory.

Threads: the kernels run on the extension's own pool, ``threads`` of them (default: torch's
count). Torch's OpenMP workers spin-wait for a few ms after each torch op, so while a decode
step alternates torch ops and kernel calls, both pools are busy and 2 threads share 2 cores
with a third. :func:`decode_threads` gives the whole thread budget to the kernels for a block
(torch's ops on 1 thread: at one token per step they gain little from threads), and with
the model, its bf16 lm_head runs on the kernels' threads too (:func:`linear_bf16`, at the
read bandwidth, where torch's bf16 matrix-vector product reaches about half of it), decode
attention runs in one call (:func:`attention_decode`) and transformers' RMSNorms in one call
each (:func:`rms_norm`): between two layers' weight streams the caches are cold, and each torch
op of the glue costs tens of microseconds there.

Configurations without a SIMD path (group sizes that are not multiples of 32) run the
portable kernels, which handle every group size; training-mode calls (inputs that need
gradients) and activation widths of 9-15 bits are not supported (the table runs the reference).
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import weakref

import torch

from ...core.format import PackedWeight, check_group_size
from ...core.activations import ActQuantSpec
from ..dispatch import Case, Op, options, register

try:
    from . import _lut
except ImportError as exc:  # the compiled extension is missing: no cpu backend
    raise ImportError(f"codequant CPU kernels are not built ({exc}); reinstall with `pip install .`") from exc

__all__ = [
    "linear", "moe", "isa", "available_isas", "use_isa", "decode_threads", "linear_bf16", "attention_decode", "rms_norm", "int8_codebook",
    "interleaved_indices", "huge_page_copy", "huge_page_empty", "INT8_HALF_STEP",
]

INT8_HALF_STEP = 0.5  # tolerance unit: half an int8 codebook step (see module doc)
HUGE_PAGE = 2 << 20  # bytes in a transparent huge page (x86-64)
HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")  # False: huge_page_copy makes plain copies (benchmarks compare)


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous tensor that starts on a 2 MiB boundary of fresh memory marked
    ``MADV_HUGEPAGE``, so that Linux backs it with 2 MiB pages where transparent huge pages are
    on (``madvise`` or ``always`` mode); plain memory below one huge page, where the platform has
    no such advice, or with :data:`HUGE_PAGES` off. The kernels stream weights, and in 4 KiB
    pages every page costs a TLB miss and stops the L2 streamer at its boundary: a streaming read
    gets 25-35% more bandwidth from 2 MiB pages on the 2-core Sapphire Rapids VM."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not HUGE_PAGES:
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    buf.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the page faults then map 2 MiB pages
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # holds buf (the mapping) for the tensor's life
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)


def huge_page_copy(source: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``source`` in :func:`huge_page_empty` memory."""
    return huge_page_empty(tuple(source.shape), source.dtype).copy_(source)


def isa() -> str:
    """The instruction set the kernels run on now: ``avx512``, ``avx2`` or ``portable``."""
    return _lut.isa()


def available_isas() -> list[str]:
    return list(_lut.available_isas())


_isa_epoch = [0]  # bumped whenever the ISA changes: prepared layers are per ISA


def _set_isa(name: str) -> None:
    _lut.set_isa(name)
    _isa_epoch[0] += 1


@contextlib.contextmanager
def use_isa(name: str):
    """Run the kernels on instruction set ``name`` inside the block."""
    old = _lut.isa()
    _set_isa(name)
    try:
        yield
    finally:
        _set_isa(old)


# ---------------------------------------------------------------- threads

_decode_threads = [0]  # the kernels' thread count inside decode_threads (0: torch's count)
# How long the pool's idle workers spin for the next kernel call inside decode_threads (outside:
# 100 us): longer than the torch ops between two calls of a decode step, so that a worker is
# awake for each call instead of waking after the caller has done most of the work.
DECODE_SPIN_US = 1000


def _kernel_threads(threads: int | None) -> int:
    """A call's thread count: its own, else decode_threads', else torch's."""
    return threads or _decode_threads[0] or torch.get_num_threads()


def worker_cpus(cpus) -> bool:
    """Pin the kernel pool's workers (present and future) to the CPU numbers ``cpus``; empty:
    workers keep the mask of the thread that created them (the default). False where threads
    cannot be pinned. For engines that pin their own threads one core each (vLLM's CPU worker),
    whose pinned thread would otherwise put every worker on its own core."""
    return _lut.worker_cpus(sorted(cpus))


@contextlib.contextmanager
def decode_threads(threads: int | None = None, model: torch.nn.Module | None = None, lean: bool = True):
    """One thread pool for decoding inside the block: the kernels run on ``threads`` threads
    (default: torch's count on entry) and torch's own ops on 1; torch's count is restored on
    exit. With ``model``, its bf16 lm_head (output embeddings, a CPU ``nn.Linear`` without
    bias) runs through :func:`linear_bf16` on those threads in the block (its weight moved
    once into :func:`huge_page_copy` memory), a model on sdpa
    attention decodes through :func:`attention_decode` (transformers' attention implementation
    :data:`DECODE_ATTENTION`; torch's CPU flash attention costs about 0.3 ms per call at one
    query position) and its transformers RMSNorms through :func:`rms_norm`, where the cpu
    backend is in use (not under ``KernelOptions(backend="reference")``; a module with a
    replaced forward keeps it). With ``lean`` (the default), a model the lean decode step
    supports (:mod:`codequant.kernels.cpu.decode`) decodes each token with one kernel call per
    decoder layer. The pool's idle workers spin :data:`DECODE_SPIN_US` for the next call
    inside the block.

    Chosen over ``OMP_WAIT_POLICY=PASSIVE`` (which works only when set before torch is
    imported) and over running the kernels on torch's OpenMP threads (whose barriers spin on
    descheduled threads: far slower on a shared machine): with torch on 1 thread its OpenMP
    workers fall asleep, and the kernels, which do nearly all the work of a decode step, have
    the cores. Prefill inside the block also runs torch's ops (attention) on 1 thread.
    ``torch.set_num_threads`` is process-wide: other threads' torch ops see 1 thread too."""
    n = threads or torch.get_num_threads()
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    cpu_model = model is not None and options().backend in (None, "cpu") and next(model.parameters()).device.type == "cpu"
    head = model.get_output_embeddings() if cpu_model else None
    routed = (
        isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.dtype is torch.bfloat16
        and head.weight.device.type == "cpu" and "forward" not in head.__dict__
    )
    attention = cpu_model and getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
    norms = [m for m in model.modules() if _is_plain_rms_norm(m)] if cpu_model else []
    lean = _lean_decoder(model) if cpu_model and lean else None
    old_torch, old_kernels = torch.get_num_threads(), _decode_threads[0]
    torch.set_num_threads(1)
    _decode_threads[0] = n
    old_spin = _lut.spin_us(DECODE_SPIN_US)
    if routed:
        if not getattr(head.weight, "_cq_huge_pages", False):  # once per model: the head's bytes move
            head.weight.data = huge_page_copy(head.weight.data)
            head.weight._cq_huge_pages = True
        head.forward = functools.partial(_head_forward, head.weight)
    if attention:
        model.set_attn_implementation(_register_decode_attention())
    for norm in norms:
        norm.forward = functools.partial(_rms_norm_forward, norm)
    if lean:
        lean.base.forward = lean.step
    try:
        yield
    finally:
        if lean:
            del lean.base.forward
        for norm in norms:
            del norm.forward
        if attention:
            model.set_attn_implementation("sdpa")
        if routed:
            del head.forward
        _lut.spin_us(old_spin)
        _decode_threads[0] = old_kernels
        torch.set_num_threads(old_torch)


def _lean_decoder(model: torch.nn.Module):
    """The model's :class:`~codequant.kernels.cpu.decode.LeanDecoder`, or None where it has none."""
    from .decode import LeanDecoder, Unsupported

    try:
        return LeanDecoder(model)
    except Unsupported:
        return None


def attention_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     threads: int | None = None) -> torch.Tensor:
    """Attention of one query position per sequence over its cache, on the kernels' threads:
    out = softmax(scale q k^T) v per query head, query head h reading kv head h // (Hq / Hkv),
    float32 arithmetic. query [B, Hq, 1, Dk], key [B, Hkv, T, Dk], value [B, Hkv, T, Dv] (bf16
    or float32); returns [B, 1, Hq, Dv] in query's dtype (transformers' attention output layout)."""
    b, hq, m, dk = query.shape
    hkv, t, dv = key.shape[1], key.shape[2], value.shape[-1]
    if (m != 1 or key.shape != (b, hkv, t, dk) or value.shape != (b, hkv, t, dv) or hkv == 0 or hq % hkv
            or key.dtype != value.dtype or key.dtype not in (torch.bfloat16, torch.float32)
            or any(x.device.type != "cpu" for x in (query, key, value))):
        raise ValueError(f"attention_decode needs CPU query [B, Hq, 1, Dk] and bf16 / float32 key, value [B, Hkv, T, D] "
                         f"with Hkv dividing Hq, got {tuple(query.shape)}, {tuple(key.shape)} {key.dtype}, {tuple(value.shape)} {value.dtype}")
    q = query.reshape(b, hq, dk).to(torch.float32).contiguous()
    k, v = key.contiguous(), value.contiguous()
    out = torch.empty(b, 1, hq, dv, dtype=torch.float32)
    _lut.attention_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, hq, hkv, t, dk, dv,
                          int(k.dtype is torch.float32), float(scale), _kernel_threads(threads))
    return out.to(query.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm in one call: weight * (x / sqrt(mean(x^2) + eps)).to(dtype), the
    norm in float32, for bf16 or float32 x and weight of one dtype (the same arithmetic up to the
    order of the sum of squares)."""
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float32) or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm needs x [..., N] and weight [N] of one dtype, bf16 or float32, "
                         f"got {x.dtype} {tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    xc, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(xc)
    _lut.rms_norm(xc.data_ptr(), xc.numel() // xc.shape[-1], xc.shape[-1], int(x.dtype is torch.bfloat16), w.data_ptr(),
                  y.data_ptr(), float(eps))
    return y


@functools.cache
def _rms_norm_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    code = LlamaRMSNorm.forward.__code__
    return code.co_code, code.co_consts, code.co_names


def _is_plain_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes transformers' Llama RMSNorm (its forward has the same bytecode:
    Qwen2/3(-MoE), Mixtral, OLMoE and DeepSeek-V2 norms do)."""
    forward = getattr(type(module).forward, "__code__", None)
    return (forward is not None and "forward" not in module.__dict__ and isinstance(getattr(module, "weight", None), torch.Tensor)
            and (forward.co_code, forward.co_consts, forward.co_names) == _rms_norm_code())


def _rms_norm_forward(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type != "cpu" or x.dtype != norm.weight.dtype or x.dtype not in (torch.bfloat16, torch.float32)
            or (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))):
        return type(norm).forward(norm, x)
    return rms_norm(x, norm.weight, norm.variance_epsilon)


DECODE_ATTENTION = "codequant_cpu"  # the transformers attention implementation decode_threads sets


def _decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, with decode steps (one query position, no mask, no window
    cut, soft cap or sinks) through :func:`attention_decode`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if (query.shape[2] == 1 and attention_mask is None and not dropout and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and kwargs.get("s_aux") is None and (window is None or key.shape[2] <= window)
            and query.device.type == "cpu" and key.dtype in (torch.bfloat16, torch.float32) and key.dtype == value.dtype
            and not (torch.is_grad_enabled() and query.requires_grad)):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return attention_decode(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@functools.cache
def _register_decode_attention() -> str:
    """Registers :data:`DECODE_ATTENTION` with transformers (masks as sdpa's) and returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention_forward)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    return DECODE_ATTENTION


def _head_forward(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return torch.nn.functional.linear(x, weight)
    return linear_bf16(x, weight)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x @ weight^T for a plain bf16 weight [N, K] (an unquantized lm_head) on the kernels'
    threads: float32 products and sums (as torch's bf16 linear, up to summation order), the
    output in x's dtype (bf16: the float32 result rounded once)."""
    n, k = weight.shape
    if weight.dtype is not torch.bfloat16 or weight.device.type != "cpu" or x.device.type != "cpu" or x.shape[-1] != k:
        raise ValueError(f"linear_bf16 needs a CPU bf16 weight [N, {x.shape[-1]}] and a CPU input, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    w = weight.contiguous()
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    _lut.bf16_linear(xf.data_ptr(), xf.shape[0], k, w.data_ptr(), n, y.data_ptr(),
                     _kernel_threads(threads))
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


# ---------------------------------------------------------------- int8 codebooks (cached)

_cache: dict[int, dict] = {}


def _forget(key: int) -> None:
    _cache.pop(key, None)


def int8_codebook(weight: PackedWeight, act_group: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cb8 int8 [..., N, G', 16], sc float32 [..., N, G'], rs8 float32 [..., N, K / act_group]).

    cb8 = round(codebook / sc) with sc = max|codebook| / 127 per row and group; rs8 the
    per-activation-group row sums of sc * cb8[idx]. Cached per codebook tensor.
    """
    cb = weight.codebook
    key = id(cb)
    stamp = (cb.data_ptr(), cb._version, weight.indices.data_ptr(), weight.indices._version, tuple(cb.shape))
    entry = _cache.get(key)
    if entry is None or entry["stamp"] != stamp:
        if entry is None:
            weakref.finalize(cb, _forget, key)
        c = cb.float()
        sc = c.abs().amax(-1) / 127.0
        cb8 = torch.round(c / torch.where(sc > 0, sc, torch.ones_like(sc)).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        entry = {"stamp": stamp, "cb8": cb8.contiguous(), "sc": sc.contiguous(), "rs8": {}}
        _cache[key] = entry
    k = weight.in_features
    ga = act_group or k
    if ga not in entry["rs8"]:
        idx = weight.indices.contiguous()
        n_rows = idx.shape[:-1].numel()
        out = torch.empty(*idx.shape[:-1], k // ga, dtype=torch.float32)
        _lut.rowsum8(idx.data_ptr(), entry["cb8"].data_ptr(), entry["sc"].data_ptr(), n_rows, k, weight.group_size, ga, out.data_ptr())
        entry["rs8"][ga] = out
    return entry["cb8"], entry["sc"], entry["rs8"][ga]


_il_cache: dict[int, tuple] = {}


def _forget_il(key: int) -> None:
    _il_cache.pop(key, None)


def interleaved_indices(indices: torch.Tensor) -> torch.Tensor:
    """The load-time copy of ``indices`` [..., N, KP/2] that the AVX-512 kernels stream.

    Rows padded to RB = ceil(KP/128) * 64 bytes; each tile of 4 rows alternates the rows'
    64-byte pieces, so a tile is one sequential run of memory (DRAM streams it at nearly
    full bandwidth, where 4 separate short rows do not); the last N % 4 rows follow as
    plain padded rows. Cached per indices tensor (invalidated when it is modified).
    """
    key = id(indices)
    stamp = (indices.data_ptr(), indices._version, tuple(indices.shape))
    hit = _il_cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    *lead, n, half = indices.shape
    rb = -(-half // 64) * 64
    rows = torch.nn.functional.pad(indices.reshape(-1, n, half), (0, rb - half))
    e, n4 = rows.shape[0], n // 4 * 4
    out = huge_page_empty((e, n * rb), torch.uint8)  # written in place: no intermediate copy of the weight
    out[:, :n4 * rb].view(e, n4 // 4, rb // 64, 4, 64).copy_(rows[:, :n4].reshape(e, n4 // 4, 4, rb // 64, 64).transpose(2, 3))
    out[:, n4 * rb:].copy_(rows[:, n4:].reshape(e, (n - n4) * rb))
    out = out.view(*lead, n * rb)
    if hit is None:
        weakref.finalize(indices, _forget_il, key)
    _il_cache[key] = (stamp, out)
    return out


# ---------------------------------------------------------------- ops


def _usable(x: torch.Tensor, act: ActQuantSpec) -> bool:
    """A CPU tensor without gradients, activations unquantized or of 1-8 bits."""
    return x.is_cpu and not (x.requires_grad and torch.is_grad_enabled()) and (act.bits >= 16 or 1 <= act.bits <= 8)


def supports_linear(case: Case) -> bool:
    return _usable(case.x, case.act) and isinstance(case.weight, PackedWeight)


def supports_moe(case: Case) -> bool:
    return (_usable(case.x, case.act) and _usable(case.x, case.down_act) and isinstance(case.weight, PackedWeight)
            and not (case.top_k_weights.requires_grad and torch.is_grad_enabled()))


def _act_args(spec: ActQuantSpec, k: int) -> tuple[int, int, float]:
    if not spec.enabled:
        return 0, 0, 1.0
    return spec.bits, check_group_size(spec.group_size, k, "activation group size"), float(spec.clip)


def _x_arg(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if x.dtype == torch.bfloat16:
        return x.contiguous(), 1
    return x.to(torch.float32).contiguous(), 0


def _weight_tensors(weight: PackedWeight, spec: ActQuantSpec) -> tuple:
    """(weight, (indices, interleaved copy, fp16 codebook, int8 codebook, scales, row sums)),
    None where unused; weight is a contiguous copy where the given one is not."""
    for t in (weight.indices, weight.codebook, weight.row_sum):
        if t.device.type != "cpu":
            raise ValueError("cpu kernels need CPU weights")
    if not weight.indices.is_contiguous() or not weight.codebook.is_contiguous():
        weight = PackedWeight(weight.indices.contiguous(), weight.codebook.contiguous(), weight.row_sum, weight.in_features)
    il = interleaved_indices(weight.indices) if _lut.isa() == "avx512" else None
    if spec.enabled:
        cb8, sc, rs8 = int8_codebook(weight, spec.group_size)
        return weight, (weight.indices, il, None, cb8, sc, rs8)
    return weight, (weight.indices, il, weight.codebook, None, None, None)


def _weight_args(weight: PackedWeight, spec: ActQuantSpec) -> tuple:
    weight, tensors = _weight_tensors(weight, spec)
    return weight, tuple(0 if t is None else t.data_ptr() for t in tensors)


_plans: dict[tuple, tuple] = {}


def _forget_plan(key: tuple) -> None:
    _plans.pop(key, None)


def _plan(weight: PackedWeight, act: ActQuantSpec) -> tuple:
    """(stamp..., capsule) of a weight for the kernels' ``run`` entry point: the weight's
    pointers (indices, interleaved copy, codebooks / int8 codebooks) and the activation
    quantization, prepared once per weight, activation spec and ISA. A decode step calls
    every layer once per token, so a call only checks this stamp and passes x and y."""
    idx, cb = weight.indices, weight.codebook
    key = (id(idx), id(cb))
    bits, ga, clip = _act_args(act, weight.in_features)
    weight, tensors = _weight_tensors(weight, act)
    ptrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
    cap = _lut.plan(*ptrs, weight.out_features, weight.in_features, weight.group_size, bits, ga, clip)
    # The plan holds the tensors its pointers point into (contiguous copies, interleaved
    # indices, int8 codebooks), but not the caller's own indices and codebook: it is dropped
    # when either of those dies.
    held = tuple(t for t in (*tensors, weight.row_sum) if t is not None and t is not idx and t is not cb)
    plan = (act, idx._version, cb._version, idx.data_ptr(), cb.data_ptr(), _isa_epoch[0], cap, weight.out_features,
            weight.in_features, held, ptrs, weight.group_size)
    if key not in _plans:
        weakref.finalize(idx, _forget_plan, key)
        weakref.finalize(cb, _forget_plan, key)
    _plans[key] = plan
    return plan


def _cached_plan(weight: PackedWeight, act: ActQuantSpec) -> tuple:
    idx, cb = weight.indices, weight.codebook
    plan = _plans.get((id(idx), id(cb)))
    if (
        plan is None
        or (plan[0] is not act and plan[0] != act)
        or plan[1] != idx._version
        or plan[2] != cb._version
        or plan[3] != idx.data_ptr()
        or plan[4] != cb.data_ptr()
        or plan[5] != _isa_epoch[0]
    ):
        plan = _plan(weight, act)
    return plan


def linear(
    x: torch.Tensor,
    weight: PackedWeight,
    act: ActQuantSpec,
    bias: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """y = Q_act(x) @ W_hat^T + bias on packed weights; see the module doc for the tolerance.

    Float32 and bf16 inputs (and biases) go to the kernels as they are; the output has the
    input's dtype (bf16: the float32 result rounded once, in the kernel)."""
    plan = _cached_plan(weight, act)
    n, k = plan[7], plan[8]
    shape = x.shape
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, weight expects {k}")
    dtype = x.dtype
    if dtype is torch.bfloat16:
        xb = 1
    else:
        xb = 0
        if dtype is not torch.float32:
            x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    bb = bp = 0
    if bias is not None:
        if bias.dtype is torch.bfloat16:
            bb = 1
        elif bias.dtype is not torch.float32:
            bias = bias.float()
        if not bias.is_contiguous():
            bias = bias.contiguous()
        bp = bias.data_ptr()
    out_shape = _out_shapes.get((shape, n))
    if out_shape is None:
        out_shape = _out_shapes[(shape, n)] = (*shape[:-1], n)
        if len(_out_shapes) > 256:
            _out_shapes.clear()
    y = x.new_empty(out_shape)  # x is float32 or bf16 here: the output dtype
    threads = _kernel_threads(threads)
    _lut.run(plan[6], x.data_ptr(), xb, x.numel() // k, bp, bb, y.data_ptr(), xb, threads)
    return y if y.dtype is dtype else y.to(dtype)


_out_shapes: dict[tuple, tuple] = {}


def moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight,
    down: PackedWeight,
    act: ActQuantSpec,
    down_act: ActQuantSpec,
    hadamard_block: int = 0,
    threads: int | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts, all active experts of all tokens in one call (reference.moe semantics)."""
    t, h = x.shape
    e, two_i = gate_up.indices.shape[0], gate_up.out_features
    inter = two_i // 2
    if gate_up.in_features != h or down.in_features != inter or down.out_features != h:
        raise ValueError("gate_up must be [E, 2I, H] and down [E, H, I]")
    if hadamard_block and (inter % hadamard_block or hadamard_block & (hadamard_block - 1)):
        raise ValueError(f"hadamard block {hadamard_block} must be a power of two dividing {inter}")
    x2, bf16 = _x_arg(x)
    idx = top_k_index if top_k_index.dtype is torch.int64 else top_k_index.to(torch.int64)
    idx = idx if idx.is_contiguous() else idx.contiguous()
    wts = top_k_weights.detach()
    wts = wts if wts.dtype is torch.float32 else wts.float()
    wts = wts if wts.is_contiguous() else wts.contiguous()
    bits, ga, clip = _act_args(act, h)
    dbits, dga, dclip = _act_args(down_act, inter)
    gp_plan, dp_plan = _cached_plan(gate_up, act), _cached_plan(down, down_act)  # prepared once per weight
    y = torch.empty(t, h, dtype=torch.float32)
    _lut.moe(
        x2.data_ptr(), bf16, t, h, idx.shape[1], e, idx.data_ptr(), wts.data_ptr(),
        *gp_plan[10], two_i, gp_plan[11], *dp_plan[10], dp_plan[11],
        bits, ga, clip, dbits, dga, dclip, int(hadamard_block), y.data_ptr(),
        int(_kernel_threads(threads)),
    )
    return y if x.dtype is torch.float32 else y.to(x.dtype)


register(Op.LINEAR, "cpu", linear, supports_linear, backend="cpu", device="cpu")
register(Op.MOE, "cpu", moe, supports_moe, backend="cpu", device="cpu")
