"""vLLM's model classes for the architectures whose router vLLM builds unquantized.

vLLM's Mixtral, Qwen2-MoE and OLMoE build ``mlp.gate`` (and Qwen2-MoE ``mlp.shared_expert_gate``)
without the quantization config, so the checkpoint's packed router could not load. Each class
here is vLLM's own with two additions that act only for a codequant checkpoint: after
construction :func:`~codequant.vllm.method.quantize_plain_linears` rebuilds those layers with the
codequant method; Mixtral's weights are renamed from transformers 5's ``mlp.`` to vLLM's
``block_sparse_moe.``, and Qwen2-MoE's load without vLLM's GGUF reshape of 1-D
``shared_expert_gate`` tensors. :func:`codequant.vllm.register` registers them under the architecture
names (vLLM imports this module only when such a model is served).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.mixtral import MixtralForCausalLM as _Mixtral
from vllm.model_executor.models.olmoe import OlmoeForCausalLM as _Olmoe
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM as _Qwen2Moe
from vllm.model_executor.models.utils import AutoWeightsLoader

from .method import VLLM_TO_CHECKPOINT, CodeQuantVllmConfig, quantize_plain_linears, renamed


def _codequant(vllm_config) -> CodeQuantVllmConfig | None:
    qc = vllm_config.quant_config
    return qc if isinstance(qc, CodeQuantVllmConfig) else None


class _QuantizedRouters:
    # (checkpoint, vLLM) parts of weight names
    RENAMES: tuple[tuple[str, str], ...] = ()

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._cq = _codequant(vllm_config)
        if self._cq is not None:
            quantize_plain_linears(self, self._cq)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self._cq is not None and self.RENAMES:
            weights = ((renamed(name, self.RENAMES), w) for name, w in weights)
        return super().load_weights(weights)


class MixtralForCausalLM(_QuantizedRouters, _Mixtral):
    RENAMES = tuple((ckpt, vllm) for vllm, ckpt in VLLM_TO_CHECKPOINT)  # the inverse of checkpoint_name


class Qwen2MoeForCausalLM(_QuantizedRouters, _Qwen2Moe):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self._cq is None:
            return super().load_weights(weights)
        # vLLM's own, less its GGUF reshape of 1-D ``shared_expert_gate`` tensors (the packed row_sum is 1-D)
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class OlmoeForCausalLM(_QuantizedRouters, _Olmoe):
    pass
