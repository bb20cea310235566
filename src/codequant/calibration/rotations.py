"""The global rotation R1 of the residual stream, by name (``Recipe.rotation`` of
:data:`codequant.config.METHODS`): each entry makes R1 [H, H] for a driver and its calibration
tokens; None means no rotation (and then no online Hadamard either). A new rotation is one
function plus one line in :data:`R1_ROTATIONS`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from ..core.hadamard import random_hadamard
from ..transforms.rotation import train_rotation
from .layers import LayerRunner, on_device

if TYPE_CHECKING:
    from .driver import Quantizer


def hadamard_r1(q: Quantizer, tokens: torch.Tensor) -> torch.Tensor:
    """QuaRot's R1: a random Hadamard matrix (seeded by the config)."""
    return random_hadamard(q.adapter.hidden_size(q.model), q.config.seed)


@torch.no_grad()
def learned_r1(q: Quantizer, tokens: torch.Tensor) -> torch.Tensor:
    """AOS: sample normalized stream activations of every layer, train R1 on them."""
    g = torch.Generator().manual_seed(q.config.seed)
    samples: list[torch.Tensor] = []

    run = LayerRunner(q.model, q.adapter, q.device)
    per_batch = -(-q.config.rotation_tokens * run.batch_size // tokens.shape[0])

    def sample(module, args, out):
        acts = out.detach().reshape(-1, out.shape[-1]).float()
        pick = torch.randperm(acts.shape[0], generator=g)[:per_batch]
        samples.append(acts[pick.to(acts.device)].cpu())

    x = q.embed(tokens)
    for i in tqdm(range(len(q.adapter.layers(q.model))), desc="AOS: collecting activations", disable=not q.progress):
        layer = q.open_layer(i, rotated=False)
        with on_device(layer, q.device):
            norms = (q.adapter.input_norm(layer), q.adapter.post_attention_norm(layer))
            hooks = [m.register_forward_hook(sample) for m in norms]
            x = run(i, layer, x)
            for h in hooks:
                h.remove()
        q.close_layer(i, done=False)
    acts = torch.cat(samples).to(q.device)
    bar = tqdm(total=q.config.rotation_steps, desc="AOS: training R1", disable=not q.progress)
    bits = q.config.abits if q.config.abits < 16 else 4
    with torch.enable_grad():
        r1 = train_rotation(acts, bits, q.config.rotation_steps, q.config.rotation_lr, seed=q.config.seed, progress=lambda step, loss: bar.update(1))
    bar.close()
    return r1.cpu()


R1_ROTATIONS: dict[str, Callable[..., torch.Tensor] | None] = {
    "none": None,
    "hadamard": hadamard_r1,
    "learned": learned_r1,
}


def r1_rotation(name: str) -> Callable[..., torch.Tensor] | None:
    """The R1 maker registered as ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return R1_ROTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown R1 rotation {name!r} (known: {list(R1_ROTATIONS)})") from None
