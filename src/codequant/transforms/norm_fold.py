"""Stage 0: fold the residual-stream norms' scales into the linears that read them.

After :func:`fold_norms` every residual norm is scale-free (gamma = 1), so it commutes with
any orthogonal rotation of the stream, and the full-precision network is unchanged.

RMSNorm(x) * gamma read by W becomes RMSNorm(x) read by W diag(gamma).

LayerNorm with bias (PhiMoE) is first made an RMSNorm: every writer of the stream (the
embedding table, o_proj, the experts' and MLPs' down projections, their biases) is
centred over the hidden dim, so the stream has zero mean and
LayerNorm(x) = RMSNorm(x) * gamma + beta exactly. gamma folds into the readers as above;
beta folds into the readers' biases (b <- b + W beta, a zero bias is added where a linear
has none) when every reader of that norm is an nn.Linear. When a reader cannot take a bias
(fused experts), the norm keeps beta / gamma as its own bias (an RMSNorm with a bias):
W diag(gamma) (x_hat + beta / gamma) = W (gamma x_hat + beta).
Norms inside attention (q_norm, k_norm, q_a_layernorm, kv_a_layernorm) are left alone.

Where the checkpoint code finds what changed (module names relative to the model):
``config.codequant_rms_norms`` (every replaced LayerNorm, now an RMSNorm),
``config.codequant_rms_norm_biases`` (those of them that keep a bias),
``config.codequant_added_biases`` (linears that received a bias they did not have).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import nn

from ..adapters import ArchitectureAdapter
from ..modules.norm import RMSNorm


FOLD_CHUNK = 1 << 24  # weights folded at a time: float64 temporaries of a few hundred MiB, not of a whole expert stack


def stream_slices(t: torch.Tensor, stream_dim: int) -> Iterator[torch.Tensor]:
    """Views of t that keep its stream dim whole, :data:`FOLD_CHUNK` weights (at least one
    line) at a time: rows [R, K] of t viewed as [-1, K] (stream_dim -1), or column blocks
    [H, C] of each leading matrix [H, N] (stream_dim -2)."""
    if stream_dim == -1:
        rows = t.view(-1, t.shape[-1])
        step = max(1, FOLD_CHUNK // t.shape[-1])
        for r0 in range(0, rows.shape[0], step):
            yield rows[r0 : r0 + step]
    elif stream_dim == -2:
        step = max(1, FOLD_CHUNK // t.shape[-2])
        for matrix in t.view(-1, *t.shape[-2:]):
            for c0 in range(0, matrix.shape[-1], step):
                yield matrix[:, c0 : c0 + step]
    else:
        raise ValueError(f"stream_dim must be -1 or -2, got {stream_dim}")


def untie_word_embeddings(model: nn.Module, adapter: ArchitectureAdapter) -> bool:
    """Give lm_head its own copy of a tied embedding table; True if it was tied."""
    head, emb = adapter.lm_head(model), adapter.embed_tokens(model)
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None:
        text_config.tie_word_embeddings = False
    return tied


def center_residual_writers(model: nn.Module, adapter: ArchitectureAdapter, layers: Collection[int] | None = None, outside: bool = True) -> None:
    """Subtract from every stream writer (and the embedding table) its mean over the
    hidden dim, so the residual stream has zero mean (in float64 a slice at a time, cast back); ``layers`` and
    ``outside`` as in :func:`fold_norms`."""
    with torch.no_grad():
        for w in adapter.residual_writers(model, layers, embedding=outside):
            t = w.tensor
            for part in stream_slices(t, w.stream_dim):
                part.copy_(_centered(part.double(), w.stream_dim).to(t.dtype))
            if w.bias is not None:
                b = w.bias_tensor
                b.copy_(_centered(b.double(), -1).to(b.dtype))


def fold_norms(model: nn.Module, adapter: ArchitectureAdapter, layers: Collection[int] | None = None, outside: bool = True) -> nn.Module:
    """Fold every residual norm's gamma (and LayerNorm beta) into its readers; in place.

    Ties between lm_head and the embedding are broken first (see module doc for LayerNorm).
    ``layers``: fold only these decoder layers (None: all); ``outside``: also the embedding,
    final norm and lm_head. Folding the parts one at a time gives the same weights as all at once.
    """
    if outside:
        untie_word_embeddings(model, adapter)
    groups = adapter.residual_readers(model, layers, head=outside)
    if any(isinstance(g.norm, nn.LayerNorm) for g in groups):
        center_residual_writers(model, adapter, layers, outside)
    replaced, with_bias, added_biases = [], [], []
    with torch.no_grad():
        for g in groups:
            gamma = _norm_weight(g.norm)
            gamma64 = gamma.double() if gamma is not None else None
            beta = getattr(g.norm, "bias", None) if isinstance(g.norm, nn.LayerNorm) else None
            beta_in_readers = beta is not None and all(isinstance(r.module, nn.Linear) for r in g.readers)
            for r in g.readers:
                w = r.tensor
                if beta_in_readers:
                    shift = w.double() @ beta.double()
                    if r.module.bias is None:
                        r.module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
                        added_biases.append(r.name)
                    r.module.bias.copy_((r.module.bias.double() + shift).to(r.module.bias.dtype))
                if gamma is not None:
                    for part in stream_slices(w, -1):  # float64 product (exact), one rounding to w's dtype
                        part.copy_((part.double() * gamma64).to(w.dtype))
            if isinstance(g.norm, nn.LayerNorm):
                keep_bias = beta is not None and not beta_in_readers
                if keep_bias and gamma is not None:
                    if bool(torch.any(gamma == 0)):
                        raise ValueError(f"{g.name}: a zero LayerNorm scale with a bias cannot be folded into fused experts")
                    beta = (beta.double() / gamma.double()).to(beta.dtype)
                new = _rms_from_layer_norm(g.norm, beta if keep_bias else None)
                model.set_submodule(g.name, new)
                replaced.append(g.name)
                if keep_bias:
                    with_bias.append(g.name)
            elif gamma is not None:
                g.norm.weight.fill_(1.0)
    config = model.config
    config.codequant_rms_norms = sorted(set(getattr(config, "codequant_rms_norms", []) or []) | set(replaced))
    config.codequant_rms_norm_biases = sorted(set(getattr(config, "codequant_rms_norm_biases", []) or []) | set(with_bias))
    config.codequant_added_biases = sorted(set(getattr(config, "codequant_added_biases", []) or []) | set(added_biases))
    return model


def residual_norms_are_folded(model: nn.Module, adapter: ArchitectureAdapter, layers: Collection[int] | None = None, outside: bool = True) -> bool:
    """True when every residual norm (of ``layers`` / outside them, as in :func:`fold_norms`)
    is scale-free (gamma = 1, no LayerNorm left)."""
    for g in adapter.residual_readers(model, layers, head=outside):
        if isinstance(g.norm, nn.LayerNorm):
            return False
        gamma = _norm_weight(g.norm)
        if gamma is not None and not bool(torch.all(gamma == 1)):
            return False
    return True


def _centered(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t - t.mean(dim=dim, keepdim=True)


def _norm_weight(norm: nn.Module) -> torch.Tensor | None:
    return getattr(norm, "weight", None)


def _rms_from_layer_norm(norm: nn.LayerNorm, bias: torch.Tensor | None) -> RMSNorm:
    (hidden,) = norm.normalized_shape
    ref = norm.weight if norm.weight is not None else torch.empty(0)
    new = RMSNorm(hidden, norm.eps, dtype=ref.dtype, device=ref.device, bias=bias is not None)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new
