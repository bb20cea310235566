"""Perplexity, and agreement with a full-precision reference, over token windows.

For windows of S tokens, every position t < S-1 predicts token t+1:
    perplexity     = exp(mean NLL),
    kl             = mean_t KL(p_ref(.|x_<=t) || p(.|x_<=t)),
    top1_agreement = share of positions where argmax p_ref = argmax p.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, ref_model=None, batch_size: int = 4, progress: bool = True) -> dict:
    """{"perplexity", "kl", "top1_agreement", "tokens", "ref_perplexity"} of ``model`` on
    windows [n, S] (the last three None without ``ref_model``)."""
    device = next(model.parameters()).device
    nll, ref_nll, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    for batch in tqdm(windows.split(batch_size), desc="evaluating", leave=False, disable=not progress):
        batch = batch.to(device)
        logp = F.log_softmax(model(batch).logits[:, :-1].float(), -1)
        target = batch[:, 1:]
        nll += -logp.gather(-1, target[..., None]).sum().item()
        count += target.numel()
        if ref_model is not None:
            ref_logp = F.log_softmax(ref_model(batch.to(next(ref_model.parameters()).device)).logits[:, :-1].float(), -1).to(device)
            ref_nll += -ref_logp.gather(-1, target[..., None]).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    return {
        "perplexity": math.exp(nll / count),
        "kl": kl / count if ref_model is not None else None,
        "top1_agreement": agree / count if ref_model is not None else None,
        "tokens": count,
        "ref_perplexity": math.exp(ref_nll / count) if ref_model is not None else None,
    }
