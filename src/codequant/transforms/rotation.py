"""Stage 1: rotations folded into the weights (R1 on the residual stream, R2 per value head,
the online block Hadamard before down projections), and AOS, the learned R1.

All folds are done in float64 and cast back; the full-precision network is unchanged
(R1 and R2 exactly, the online Hadamard once its run-time half is active: see
:func:`online_hadamard`).

R1 [H, H] orthogonal, residual stream x -> x R1:
    embedding E <- E R1;  reader W [.., H] <- W R1;  writer W [H, ..] <- R1^T W, b <- b R1.
R2 [d, d] per KV head j, value v_j -> v_j R2:
    v_proj rows of head j <- R2^T Wv_j, bias b_j <- b_j R2;
    o_proj columns of every query head reading j <- Wo_h R2.
Online Hadamard H_b (blockdiag of b x b orthonormal Hadamards, symmetric, self-inverse):
    W_down <- W_down H_b, and at run time the down projection's input h becomes h H_b.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Collection, Iterator

import torch
from torch import nn

from ..adapters import ArchitectureAdapter
from ..core.activations import ActQuantSpec, dequantize_activations, quantize_activations
from ..core.hadamard import block_hadamard, largest_power_of_two_block, random_hadamard
from ..core.swiglu import swiglu
from .norm_fold import residual_norms_are_folded, stream_slices, untie_word_embeddings


# -- R1 -------------------------------------------------------------------------------
def rotate_residual(model: nn.Module, adapter: ArchitectureAdapter, R1: torch.Tensor, layers: Collection[int] | None = None, outside: bool = True) -> nn.Module:
    """Fold the orthogonal ``R1`` [H, H] into every weight on the residual stream; in place.

    Needs :func:`~codequant.transforms.norm_fold.fold_norms` first (scale-free norms);
    a norm that keeps a bias (RMSNorm with bias) has it rotated too. Unties lm_head from the
    embedding if they are tied. ``layers``: only these decoder layers (None: all);
    ``outside``: also the embedding and lm_head (the parts may be rotated one at a time).
    """
    hidden = adapter.hidden_size(model)
    if tuple(R1.shape) != (hidden, hidden):
        raise ValueError(f"R1 must be [{hidden}, {hidden}], got {list(R1.shape)}")
    if not residual_norms_are_folded(model, adapter, layers, outside):
        raise ValueError("fold_norms must run before rotate_residual: a residual norm still has a scale")
    if outside:
        untie_word_embeddings(model, adapter)
    with torch.no_grad():
        for group in adapter.residual_readers(model, layers, head=outside):
            for w in group.readers:
                _rotate_stream(w.tensor, w.stream_dim, R1)
            bias = getattr(group.norm, "bias", None)
            if bias is not None:
                _rotate_stream(bias, -1, R1)
        for w in adapter.residual_writers(model, layers, embedding=outside):
            _rotate_stream(w.tensor, w.stream_dim, R1)
            if w.bias is not None:
                _rotate_stream(w.bias_tensor, -1, R1)
    return model


def _rotate_stream(t: torch.Tensor, stream_dim: int, R: torch.Tensor) -> None:
    """t <- t R over its last dim (stream_dim -1) or R^T t over dim -2, in float64, a
    :func:`~.norm_fold.stream_slices` slice at a time (a whole expert stack in float64 would
    take 16 bytes more per weight)."""
    R64 = R.to(device=t.device, dtype=torch.float64)
    for part in stream_slices(t, stream_dim):
        x = part.double()
        part.copy_((x @ R64 if stream_dim == -1 else R64.T @ x).to(t.dtype))


# -- R2 -------------------------------------------------------------------------------
def rotate_value_heads(model: nn.Module, adapter: ArchitectureAdapter, seed: int = 0, layers: Collection[int] | None = None) -> int:
    """Apply a random Hadamard per KV head between v_proj and o_proj; in place.

    Every layer and KV head gets its own sign pattern (deterministic in ``seed``, the same
    whether the layers are rotated together or ``layers`` at a time). Layers without per-head
    value pairs (latent attention) or where v is clipped elementwise (OLMoE clip_qkv) are left
    alone. Returns the number of heads rotated.
    """
    rotated = 0
    with torch.no_grad():
        for i, seeds in value_head_seeds(model, adapter, seed).items():
            if layers is not None and i not in layers:
                continue
            heads = adapter.value_heads(adapter.layers(model)[i], model.config)
            for j, head_seed in enumerate(seeds):
                _rotate_value_head(heads, j, random_hadamard(heads.head_dim, head_seed, torch.float64))
                rotated += 1
    return rotated


def value_head_seeds(model: nn.Module, adapter: ArchitectureAdapter, seed: int) -> dict[int, list[int]]:
    """{layer index: the Hadamard seed of each KV head} for every layer with rotatable value
    heads: one stream of draws from ``seed`` over the layers in order (reads no weights)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        heads = adapter.value_heads(layer, model.config)
        if heads is not None and heads.rotatable:
            out[i] = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for _ in range(heads.num_kv_heads)]
    return out


def _rotate_value_head(heads, j: int, R2: torch.Tensor) -> None:
    rows = heads.v_rows(j)
    wv = heads.v_proj.weight
    R = R2.to(wv.device)
    wv[rows].copy_((R.T @ wv[rows].double()).to(wv.dtype))
    if heads.v_proj.bias is not None:
        b = heads.v_proj.bias
        b[rows].copy_((b[rows].double() @ R).to(b.dtype))
    wo = heads.o_proj.weight
    for cols in heads.o_columns(j):
        wo[:, cols].copy_((wo[:, cols].double() @ R).to(wo.dtype))


# -- online Hadamard before the down projections ---------------------------------------
def fold_online_hadamard(model: nn.Module, adapter: ArchitectureAdapter) -> dict[str, int]:
    """W_down <- W_down H_b for every down projection (experts' ``down_proj`` too); in place.

    Returns {module name relative to the model: block b}, b the largest power of two
    dividing the intermediate size. The network is exact again once the run-time half
    is active: quantized modules take it as ``hadamard_block`` (CodeQuantLinear,
    CodeQuantExperts); full-precision ones inside :func:`online_hadamard`.
    """
    blocks = {}
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(model)):
            for target in adapter.down_projections(layer):
                w = target.module.down_proj if target.kind == "experts" else target.module.weight
                b = largest_power_of_two_block(w.shape[-1])
                w.copy_(block_hadamard(w.double(), b).to(w.dtype))
                blocks[f"{adapter.layer_name(i)}.{target.name}"] = b
    return blocks


@contextlib.contextmanager
def online_hadamard(model: nn.Module, blocks: dict[str, int]) -> Iterator[None]:
    """Run the full-precision model with the run-time half of :func:`fold_online_hadamard`.

    nn.Linear down projections get a forward pre-hook ``h -> block_hadamard(h, b)``;
    fused experts (transformers' [E, 2I, H] / [E, H, I] SwiGLU layout) run a SwiGLU
    forward with the transform before ``down_proj``. Everything is restored on exit.
    """
    handles, patched = [], []
    try:
        for name, b in blocks.items():
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_pre_hook(_hadamard_pre_hook(b)))
            elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
                had_own = "forward" in module.__dict__
                old = module.__dict__.get("forward")
                module.forward = types.MethodType(_experts_forward_with_hadamard(b), module)
                patched.append((module, had_own, old))
            else:
                raise TypeError(f"{name}: no online Hadamard for {type(module).__name__}")
        yield
    finally:
        for h in handles:
            h.remove()
        for module, had_own, old in patched:
            if had_own:
                module.forward = old
            else:
                del module.forward


def _hadamard_pre_hook(block: int):
    def hook(module, args):
        return (block_hadamard(args[0], block),) + tuple(args[1:])

    return hook


def _experts_forward_with_hadamard(block: int):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            h = block_hadamard(swiglu(nn.functional.linear(hidden_states[tok], self.gate_up_proj[e]), self.act_fn), block)
            y = nn.functional.linear(h, self.down_proj[e]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


# -- AOS: learned R1 ------------------------------------------------------------------
def quantization_error(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """mean over tokens of ||x - Q(x)||^2, Q per-token asymmetric min-max (no gradient)."""
    x_hat = dequantize_activations(*quantize_activations(x, ActQuantSpec(bits=bits)))
    return (x.float() - x_hat).pow(2).sum(-1).mean()


def _differentiable_quant_error(y: torch.Tensor, bits: int) -> torch.Tensor:
    """The same error as :func:`quantization_error`, with gradients to R through each
    token's scale and zero point (rounding is straight-through). The plain STE on the
    output would make y - Q(y) constant and the gradient zero."""
    qmax = 2**bits - 1
    hi = y.amax(-1, keepdim=True).clamp(min=0)
    lo = y.amin(-1, keepdim=True).clamp(max=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = _round_ste(-lo / scale)
    q = torch.clamp(_round_ste(y / scale) + zero, 0, qmax)
    return (y - scale * (q - zero)).pow(2).sum(-1).mean()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _skew(p: torch.Tensor) -> torch.Tensor:
    upper = torch.triu(p, diagonal=1)
    return upper - upper.T


def train_rotation(
    activations: torch.Tensor,
    bits: int = 4,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 1024,
    seed: int = 0,
    init: str = "hadamard",
    progress: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """AOS: an orthogonal R1 [H, H] minimising mean ||x R - Q(x R)||^2 over ``activations``.

    ``activations`` [T, H]: samples of the normalized residual stream (input and
    post-attention norm outputs of every layer, after fold_norms). R = R0 expm(A), A
    skew-symmetric (so R stays orthogonal), R0 from ``init``: "hadamard" (random
    Hadamard, ``random_hadamard(H, seed)``), "identity", or "random" (QR of a Gaussian).
    Adam on A over minibatches of ``batch_size`` tokens drawn with ``seed``; deterministic
    for a given seed and device. Q is per-token asymmetric min-max ``bits``-bit
    quantization. ``progress(step, loss)`` is called after every step. Returns float32 R
    on the activations' device.
    """
    if activations.ndim != 2:
        raise ValueError(f"activations must be [tokens, hidden], got {list(activations.shape)}")
    t, h = activations.shape
    device = activations.device
    g = torch.Generator().manual_seed(seed)
    r0 = _initial_rotation(h, init, seed, g).to(device)
    p = torch.zeros(h, h, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr)
    x_all = activations.float()
    for step in range(steps):
        idx = torch.randint(0, t, (min(batch_size, t),), generator=g).to(device)
        R = r0 @ torch.linalg.matrix_exp(_skew(p))
        loss = _differentiable_quant_error(x_all[idx] @ R, bits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    with torch.no_grad():
        R = r0.double() @ torch.linalg.matrix_exp(_skew(p.detach().double()))
        R = _orthogonalize(R)
    return R.float()


def _initial_rotation(h: int, init: str, seed: int, g: torch.Generator) -> torch.Tensor:
    if init == "hadamard":
        return random_hadamard(h, seed, torch.float32)
    if init == "identity":
        return torch.eye(h)
    if init == "random":
        q, r = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()
    raise ValueError(f"init must be 'hadamard', 'identity' or 'random', got {init!r}")


def _orthogonalize(R: torch.Tensor) -> torch.Tensor:
    """The nearest orthogonal matrix (polar factor), removing float drift."""
    u, _, vh = torch.linalg.svd(R)
    return u @ vh


def is_orthogonal(R: torch.Tensor, tol: float = 1e-4) -> bool:
    eye = torch.eye(R.shape[0], dtype=torch.float64, device=R.device)
    return float(torch.linalg.matrix_norm(R.double() @ R.double().T - eye)) < tol
