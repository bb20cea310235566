"""compare_peers' unfused experts: one nn.Linear per expert projection, the same outputs as
transformers' fused 3-D experts, and the group-wise INT4 bit count."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import model_config
from benchmarks import compare_peers
from benchmarks.compare_peers import UnfusedExperts, decoder_weights, group_int4_bits, unfuse_experts

SMALL = dict(vocab_size=64, hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny_moe():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("qwen3_30b_a3b", 2, **SMALL), dtype=torch.float32).eval()


def test_unfused_experts_match_fused():
    fused = tiny_moe()
    model = copy.deepcopy(fused)
    assert unfuse_experts(model) == 2
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts)
    assert [type(m) for m in experts.modules()].count(torch.nn.Linear) == 3 * 8
    assert not any(p.dim() == 3 for p in model.parameters())
    gate_up = fused.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(experts.up_proj[5].weight, gate_up[5, 32:])

    x = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        want, got = fused(x).logits, model(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    block = fused.model.layers[1].mlp  # one MoE block alone, every expert hit
    h = torch.randn(40, 64)
    _, weights, index = block.gate(h)
    assert index.unique().numel() == 8
    torch.testing.assert_close(UnfusedExperts(block.experts)(h, index, weights), block.experts(h, index, weights), rtol=0, atol=1e-6)


def test_decoder_weights_of_unfused_model_leave_out_routers():
    model = tiny_moe()
    fused_count = sum(w.numel() for w in decoder_weights(model).values())
    unfuse_experts(model)
    weights = decoder_weights(model)
    assert sum(w.numel() for w in weights.values()) == fused_count
    assert not any(".mlp.gate." in n for n in weights)


def test_group_int4_bits_pads_the_last_group():
    assert group_int4_bits({"a": torch.zeros(4, 256)}, 128, 16) == 4.125
    assert group_int4_bits({"a": torch.zeros(4, 192)}, 128, 16) == 4 + 32 / 192  # 2 groups, the second padded
    assert group_int4_bits({"a": torch.zeros(4, 64)}, 128, 16) == 4.25  # one group of 64
    assert group_int4_bits({"a": torch.zeros(1, 256), "b": torch.zeros(2, 64)}, 128, 16) == (256 * 4.125 + 128 * 4.25) / 384


def test_autoround_row_names_its_group_size():
    with pytest.raises(ValueError, match=r"row 'autoround:w4a16:16': autoround rows are autoround:w4a16 or autoround:w4a16:gN"):
        compare_peers.run_row("autoround:w4a16:16", None, None, None, None)


def test_codequant_row_options_reach_the_config(monkeypatch):
    seen = []
    monkeypatch.setattr(compare_peers, "run_codequant", lambda *args: seen.append(args[3:]))
    args = type("Args", (), {"device": "cpu"})()
    compare_peers.run_row("codequant:w4a4:feedback:clip0.9:block2", None, None, None, args)
    compare_peers.run_row("codequant:w4a4:nearest:ohad:clipsearch:router8:head", None, None, None, args)
    compare_peers.run_row("rtn:w4a4:nearest:agroup64", None, None, None, args)
    compare_peers.run_row("codequant:w4a4:nearest:vrot", None, None, None, args)
    compare_peers.run_row("rtn:w4a4", None, None, None, args)
    assert seen == [("codequant", "w4a4", "feedback", "cpu", {"act_clip": 0.9, "block_tuning_epochs": 2}),
                    ("codequant", "w4a4", "nearest", "cpu", {"o_proj_hadamard": True, "act_clip_search": True, "router_abits": 8,
                                                             "targets": (*compare_peers.QuantConfig.targets, "lm_head")}),
                    ("rtn", "w4a4", "nearest", "cpu", {"act_group_size": 64}),
                    ("codequant", "w4a4", "nearest", "cpu", {"value_rotation": True}),
                    ("rtn", "w4a4", "nearest", "cpu", {})]
    for bad in ("codequant:w4a4:nearest:clip1.5", "codequant:w4a4:nearest:clipx", "codequant:w4a4:nearest:fast", "codequant:w4a4:nearest:routerx",
                "codequant:w4a4:nearest:agroup"):
        with pytest.raises(ValueError, match=r"parts after the third must be blockN .*, clipR \(activation clip ratio R in \(0, 1\]\), "
                                             r"clipsearch, ohad, routerN \(router input bits\), agroupN \(one activation scale per N channels\), "
                                             r"vrot \(value rotation R2\) or head"):
            compare_peers.run_row(bad, None, None, None, args)
