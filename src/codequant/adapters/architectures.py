"""The layouts of the supported architectures (transformers 5.x module names)."""

from __future__ import annotations

from .base import Layout

LAYOUTS: dict[str, Layout] = {
    layout.model_type: layout
    for layout in (
        Layout("llama"),
        Layout("qwen3", notes=("q_norm/k_norm act per head after q_proj/k_proj; not on the residual stream",)),
        Layout("qwen3_moe", notes=("mlp_only_layers / decoder_sparse_step layers are dense SwiGLU",)),
        Layout(
            "qwen2_moe",
            shared_expert="shared_expert",
            shared_expert_gate="shared_expert_gate",
            notes=("shared expert output is scaled by sigmoid(shared_expert_gate(x))",),
        ),
        Layout("mixtral"),
        Layout(
            "deepseek_v2",
            attention_readers=("q_proj", "q_a_proj", "kv_a_proj_with_mqa"),
            value_heads=False,
            shared_expert="shared_experts",
            notes=(
                "multi-head latent attention: q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank is set;"
                " kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj (keys and values of every head)",
                "the first first_k_dense_replace layers are dense SwiGLU",
            ),
        ),
        Layout(
            "phimoe",
            router="router",
            notes=("LayerNorm (with bias) everywhere; attention and lm_head biases; router is an nn.Linear subclass",),
        ),
        Layout(
            "olmoe",
            value_clip_attr="clip_qkv",
            notes=("q_norm/k_norm act over the whole q/k projection; clip_qkv clamps q, k, v when set",),
        ),
    )
}
