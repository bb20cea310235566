"""The kernel dispatch table and the kernel options.

Every implementation of an op registers itself with :func:`register`: its op (:class:`Op`), a
name, the backend family it belongs to (``cpu``, ``gpu``, ``reference``: what
``KernelOptions.backend`` selects), the device type of the tensors it runs on (None: any), a
``supports(case) -> bool`` predicate on the call
(:class:`Case`) and the function, which has the signature of
:mod:`codequant.kernels.reference`'s op. :func:`select` returns the first registered
implementation, highest ``priority`` first, whose predicate accepts the call; when none does,
the reference implementation runs and the fallback is logged once per reason, or raised as
:class:`KernelFallbackError` under ``KernelOptions.strict``.

:class:`KernelOptions` holds the settings of the kernels; :func:`options` reads them and
:func:`set_options` / :func:`kernel_options` change them. At first use they are seeded from the
environment (see :meth:`KernelOptions.from_env` for the variables).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.activations import ActQuantSpec
from ..core.format import PackedWeight

logger = logging.getLogger("codequant.kernels")


class Op(enum.Enum):
    """The ops quantized modules call."""

    LINEAR = "linear"
    MOE = "moe"


BACKENDS = ("cpu", "gpu", "reference")  # the backend families codequant ships (registered when present)
PREFILL_MODES = ("bf16", "fp8")


def backend_families() -> list[str]:
    """The known backend families: those codequant ships and any registered."""
    return sorted(set(BACKENDS) | {k.backend for kernels in _TABLE.values() for k in kernels})


def check_backend(name: str) -> None:
    """Refuse an unknown backend family with a ValueError listing the known ones."""
    if name not in backend_families():
        raise ValueError(f"unknown kernel backend {name!r} (known: {backend_families()})")


@dataclass(frozen=True)
class KernelOptions:
    """Settings of the kernels.

    backend: run only this backend family (``cpu``, ``gpu`` or ``reference``); None: any.
    strict: a call no fast kernel supports raises :class:`KernelFallbackError` instead of
        running the reference implementation.
    gpu_w4a4_prefill: W4A4 prefill on CUDA: ``bf16`` (fake-quantized activations through the
        W4A16 prefill) or ``fp8`` (FP8 tensor cores, e4m3-rounded codebooks).
    cuda_gemv: use the CUDA C++ decode kernels.
    cuda_w4a4_int8: quantized activations of up to 7 bits on integer tensor cores in the CUDA
        kernels (int8 codebooks).
    cuda_pdl: programmatic dependent launch of the CUDA kernels (sm_90+).
    cuda_prologue_hadamard: the CUDA kernels' prologue applies the online block Hadamard (else
        block_hadamard runs before it: the comparison for benchmarks).
    """

    backend: str | None = None
    strict: bool = False
    gpu_w4a4_prefill: str = "bf16"
    cuda_gemv: bool = True
    cuda_w4a4_int8: bool = False
    cuda_pdl: bool = True
    cuda_prologue_hadamard: bool = True

    def __post_init__(self):
        if self.backend is not None:
            check_backend(self.backend)
        if self.gpu_w4a4_prefill not in PREFILL_MODES:
            raise ValueError(f"unknown gpu_w4a4_prefill {self.gpu_w4a4_prefill!r} (known: {list(PREFILL_MODES)})")

    @classmethod
    def from_env(cls) -> "KernelOptions":
        """Defaults from ``CODEQUANT_BACKEND``, ``CODEQUANT_KERNELS_STRICT=1``,
        ``CODEQUANT_GPU_W4A4_PREFILL``, ``CODEQUANT_CUDA_GEMV=0``, ``CODEQUANT_CUDA_W4A4_INT8=1``,
        ``CODEQUANT_CUDA_PDL=0`` and ``CODEQUANT_CUDA_PROLOGUE_HADAMARD=0``."""
        env = os.environ.get
        return cls(
            backend=env("CODEQUANT_BACKEND") or None,
            strict=env("CODEQUANT_KERNELS_STRICT", "0") == "1",
            gpu_w4a4_prefill=env("CODEQUANT_GPU_W4A4_PREFILL", "bf16"),
            cuda_gemv=env("CODEQUANT_CUDA_GEMV", "1") != "0",
            cuda_w4a4_int8=env("CODEQUANT_CUDA_W4A4_INT8", "0") == "1",
            cuda_pdl=env("CODEQUANT_CUDA_PDL", "1") != "0",
            cuda_prologue_hadamard=env("CODEQUANT_CUDA_PROLOGUE_HADAMARD", "1") != "0",
        )


_options: list[KernelOptions | None] = [None]


def options() -> KernelOptions:
    """The kernel options in force (seeded from the environment at first use)."""
    current = _options[0]
    if current is None:
        current = _options[0] = KernelOptions.from_env()
    return current


def set_options(**changes) -> KernelOptions:
    """Change some kernel options for the process; returns the previous options."""
    old = options()
    _options[0] = dataclasses.replace(old, **changes)
    return old


@contextlib.contextmanager
def kernel_options(**changes):
    """Run the block with some kernel options changed."""
    old = set_options(**changes)
    try:
        yield options()
    finally:
        _options[0] = old


@dataclass(slots=True)
class Case:
    """One call as the ``supports`` predicates see it. For :attr:`Op.MOE`, ``weight`` is
    gate_up [E, 2I, H] and ``down`` [E, H, I] (packed, or dense tensors for the GPU kernels)."""

    op: Op
    x: torch.Tensor
    weight: PackedWeight | torch.Tensor
    act: ActQuantSpec
    down: PackedWeight | torch.Tensor | None = None
    down_act: ActQuantSpec | None = None
    top_k_index: torch.Tensor | None = None
    top_k_weights: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Rows of x: M for a linear, tokens for a MoE."""
        return math.prod(self.x.shape[:-1])

    @property
    def slots(self) -> int:
        """(token, expert) pairs of a MoE call."""
        return self.top_k_index.numel()

    def describe(self) -> str:
        def w(t):
            if isinstance(t, torch.Tensor):
                return f"dense {list(t.shape)} {t.dtype}"
            return f"packed {[*t.indices.shape[:-1], t.in_features]} in {t.codebook.shape[-2]} codebook group(s)"

        text = f"x {tuple(self.x.shape)} {self.x.dtype} on {self.x.device.type}, weight {w(self.weight)}, act {self.act}"
        if self.op is Op.MOE:
            text += f", down {w(self.down)}, down act {self.down_act}, top-k {self.top_k_index.shape[-1]}"
        return text


@dataclass(frozen=True)
class Kernel:
    """One implementation of an op in the table."""

    op: Op
    name: str
    backend: str
    device: str | None
    fn: Callable
    supports: Callable[[Case], bool]
    priority: int = 0
    hadamard: bool = False  # a linear fn taking hadamard_block and applying the online Hadamard itself


class KernelFallbackError(RuntimeError):
    """A call no fast kernel supports, under ``KernelOptions(strict=True)``."""


_TABLE: dict[Op, list[Kernel]] = {op: [] for op in Op}
_by_device: dict[tuple[Op, str], list[Kernel]] = {}  # _TABLE's entries for one device type, built on demand
_load_errors: dict[str, str] = {}
_logged: set = set()


def register(op: Op, name: str, fn: Callable, supports: Callable[[Case], bool], *, backend: str,
             device: str | None, priority: int = 0, hadamard: bool = False) -> Kernel:
    """Add an implementation of ``op`` for tensors of ``device`` type (None: any), replacing one of
    the same name; higher priority is tried first. ``hadamard``: a linear ``fn`` takes a fifth
    argument, the online Hadamard block, and applies it (else the caller transforms x first)."""
    kernel = Kernel(op, name, backend, device, fn, supports, priority, hadamard)
    table = [k for k in _TABLE[op] if k.name != name] + [kernel]
    table.sort(key=lambda k: -k.priority)
    _TABLE[op] = table
    _by_device.clear()
    return kernel


def unregister(op: Op, name: str) -> None:
    """Remove the implementation ``name`` of ``op``."""
    _TABLE[op] = [k for k in _TABLE[op] if k.name != name]
    _by_device.clear()


def implementations(op: Op) -> list[Kernel]:
    """The implementations of ``op``, in the order they are tried."""
    _load_optional_backends()
    return list(_TABLE[op])


def select(case: Case, backend: str | None = None) -> Kernel:
    """The implementation to run ``case`` on: the first that supports it, else the reference
    (logged once per reason; :class:`KernelFallbackError` when strict)."""
    if not _loaded[0]:
        _load_optional_backends()
    wanted = backend or options().backend
    x = case.x
    device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
    table = _by_device.get((case.op, device))
    if table is None:
        table = _by_device[(case.op, device)] = [k for k in _TABLE[case.op] if k.device in (None, device)]
    if wanted and not any(k.backend == wanted for k in _TABLE[case.op]):
        check_backend(wanted)
        families = sorted({k.backend for k in _TABLE[case.op]})
        raise ValueError(f"kernel backend {wanted!r} has no {case.op.value!r} here; available: {families}")
    declined = []
    for kernel in table:
        if wanted and kernel.backend not in (wanted, "reference"):
            continue
        if kernel.backend == "reference":
            if wanted == "reference":
                return kernel
            _fallback(case, declined)
            return kernel
        if kernel.supports(case):
            return kernel
        declined.append(kernel.name)
    raise LookupError(f"no reference implementation of {case.op.value!r} is registered")


def _fallback(case: Case, declined: list[str]) -> None:
    if declined:
        reason = f"no kernel supports it (declined: {', '.join(declined)})"
    else:
        reason = f"no kernel for {case.x.device.type} tensors is available"
    missing = "; ".join(f"{name}: {err}" for name, err in _load_errors.items())
    if missing:
        reason += f" (not loaded: {missing})"
    message = f"{case.op.value}: {reason}, for {case.describe()}"
    if options().strict:
        raise KernelFallbackError(message)
    key = (case.op, reason, case.x.device.type, case.x.dtype, case.act, case.down_act)
    if key not in _logged:
        _logged.add(key)
        logger.warning("%s; running the reference implementation (slow)", message)


_loaded = [False]


def _load_optional_backends() -> None:
    """Import the compiled CPU and Triton GPU backends if they are present; they register themselves.

    A backend this machine should have (the CPU kernels always, the GPU kernels when CUDA is
    available) that fails to import is logged once with the reason."""
    if _loaded[0]:
        return
    _loaded[0] = True
    for module, expected in (("codequant.kernels.cpu", True), ("codequant.kernels.gpu", torch.cuda.is_available())):
        family = module.rpartition(".")[2]
        try:
            __import__(module)
        except ImportError as exc:
            if expected:
                _load_errors[family] = str(exc)
                logger.warning("%s; until then %s ops run on the reference implementation (slow)", exc, family)
