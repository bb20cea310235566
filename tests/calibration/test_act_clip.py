"""Activation clip-ratio search (calibration/act_clip.py): it finds the ratio of least layer output
error, and that ratio beats quantizing over the whole range on a seeded layer."""

import torch

from codequant.calibration.act_clip import CLIP_RATIOS, ClipSearch
from codequant.core.activations import ActQuantSpec, fake_quantize_activations
from codequant.core.hadamard import block_hadamard


def _layer(seed=0, tokens=2048, k=256, n=384):
    """Rotated heavy-tailed inputs (as after R1 / an online Hadamard; the fixture's K = 256) of
    token-varying scale, and a weight reading them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(4.0).sample((tokens, k)) * (1 + torch.rand(tokens, 1, generator=g))
    return block_hadamard(x, k), torch.randn(n, k, generator=g) / k**0.5


def _output_error(x, w, spec):
    return float((fake_quantize_activations(x, spec) @ w.T - x @ w.T).pow(2).sum())


def test_search_lowers_the_layer_output_error_below_no_clipping():
    torch.manual_seed(0)
    x, w = _layer()
    search = ClipSearch(ActQuantSpec(4))
    search.add(x, w)
    best = search.best()
    errors = [_output_error(x, w, ActQuantSpec(4, 0, r)) for r in CLIP_RATIOS]
    assert best.clip == CLIP_RATIOS[min(range(len(errors)), key=errors.__getitem__)]  # the brute-force argmin
    assert best.clip < 1.0 and (best.bits, best.group_size) == (4, 0)
    assert errors[CLIP_RATIOS.index(best.clip)] < 0.92 * errors[0]  # 12% below the unclipped error here; 8% margin
    assert errors[CLIP_RATIOS.index(best.clip)] < 0.8 * errors[-1]  # and far below clipping too hard (0.7)
    torch.testing.assert_close(search.errors, torch.tensor(errors, dtype=torch.float64), rtol=1e-4, atol=0)


def test_parts_add_up_and_both_products_agree():
    """Two parts give the sum of their errors; a weight with more rows than columns (e G) and one
    with fewer (e W^T) give the same error for the same rows."""
    torch.manual_seed(0)
    x, w = _layer(n=128)
    x2, _ = _layer(seed=1)
    tall = torch.cat((w, torch.zeros(256, 256)))  # 384 rows: the Gram path, same error as w
    one, both, gram = ClipSearch(ActQuantSpec(4)), ClipSearch(ActQuantSpec(4)), ClipSearch(ActQuantSpec(4))
    one.add(x, w)
    gram.add(x, tall)
    both.add(x, w)
    both.add(x2, w)
    torch.testing.assert_close(gram.errors, one.errors, rtol=1e-4, atol=0)
    alone = ClipSearch(ActQuantSpec(4))
    alone.add(x2, w)
    torch.testing.assert_close(both.errors, one.errors + alone.errors, rtol=1e-6, atol=0)
