"""The quantize pipeline end to end on tiny real-class models, and its error messages."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from codequant.calibration.pipeline import quantize
from codequant.cli import main
from codequant.config import QuantConfig
from codequant.evaluation.perplexity import evaluate
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.modules.router import CodeQuantRouter
from tests.helpers.tiny_models import tiny_input_ids, tiny_model

FAST = dict(nsamples=8, seqlen=32, rotation_steps=30, accf_epochs=2, accf_batch_tokens=64, kmeans_iters=8, device="cpu")


def _calibration(n=8, s=32, seed=1):
    return tiny_input_ids(n, s, seed)


def _kl(arch, method, abits, seed=0):
    fp = tiny_model(arch, seed)
    result = quantize(copy.deepcopy(fp), QuantConfig(method=method, abits=abits, **FAST), progress=False, calibration=_calibration())
    return evaluate(result.model, tiny_input_ids(4, 32, seed=7), fp, progress=False), result


def test_codequant_w4a4_beats_rtn_w4a4_on_tiny_moe():
    cq, result = _kl("qwen3_moe", "codequant", 4)
    rtn, _ = _kl("qwen3_moe", "rtn", 4)
    assert torch.isfinite(torch.tensor(cq["perplexity"]))
    assert cq["kl"] < rtn["kl"]
    layer = result.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, CodeQuantLinear) and isinstance(layer.mlp.experts, CodeQuantExperts)
    assert isinstance(layer.mlp.gate, CodeQuantRouter)  # router quantized too
    # every tiny row has K = 64: 4-bit indices + 16 fp16 centroids + one fp32 row sum per row
    assert result.report["bits_per_weight"] == pytest.approx(4 + (16 * 16 + 32) / 64)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2", "phimoe", "mixtral", "olmoe", "llama"])
def test_every_architecture_quantizes_with_finite_perplexity(arch):
    fp = tiny_model(arch)
    result = quantize(copy.deepcopy(fp), QuantConfig(**{**FAST, "rotation_steps": 5, "accf_epochs": 1}), progress=False, calibration=_calibration())
    out = evaluate(result.model, tiny_input_ids(2, 32, seed=7), fp, progress=False)
    assert torch.isfinite(torch.tensor([out["perplexity"], out["kl"]])).all()
    assert out["top1_agreement"] > 0.3


def test_accf_lowers_its_objective_below_plain_kmeans():
    _, result = _kl("qwen3_moe", "codequant", 4)
    histories = result.report["accf_loss_per_epoch"]
    assert histories, "ACCF ran on no module"
    for name, h in histories.items():
        assert min(h[1:]) <= h[0], name
    assert sum(min(h[1:]) < h[0] * 0.999 for h in histories.values()) >= len(histories) // 2


@pytest.mark.parametrize("method", ["quarot", "spinquant", "gptq", "kmeans"])
def test_baselines_run_and_stay_close(method):
    out, result = _kl("qwen3_moe", method, 16)
    assert out["kl"] < 0.5 and result.report["method"] == method


@pytest.mark.parametrize("group_size", [None, 32])
def test_feedback_assignment_keeps_the_packed_format(group_size):
    fp = tiny_model("qwen3_moe")
    config = dict(FAST, group_size=group_size, accf_epochs=1)
    near = quantize(copy.deepcopy(fp), QuantConfig(**config), progress=False, calibration=_calibration())
    feed = quantize(copy.deepcopy(fp), QuantConfig(weight_assignment="feedback", **config), progress=False, calibration=_calibration())
    assert feed.report["bits_per_weight"] == near.report["bits_per_weight"]
    for (name, a), (_, b) in zip(near.model.named_buffers(), feed.model.named_buffers()):
        assert a.shape == b.shape and a.dtype == b.dtype, name
    changed = [n for (n, a), (_, b) in zip(near.model.named_buffers(), feed.model.named_buffers()) if n.endswith("indices") and not torch.equal(a, b)]
    assert changed, "the feedback walk assigned no weight differently"
    out = evaluate(feed.model, tiny_input_ids(4, 32, seed=7), fp, progress=False)
    assert out["kl"] < 0.5


def test_grouped_codebooks_use_pog_and_group_size(monkeypatch):
    from codequant.calibration import driver

    permuted = []
    real_pog = driver.apply_pog
    monkeypatch.setattr(driver, "apply_pog", lambda model, adapter, g, *a, **k: permuted.append((g, real_pog(model, adapter, g, *a, **k))))
    fp = tiny_model("qwen3_moe")
    result = quantize(copy.deepcopy(fp), QuantConfig(group_size=32, **FAST), progress=False, calibration=_calibration())
    q = result.model.model.layers[0].self_attn.q_proj
    assert q.group_size == 32 and q.codebook.shape[-2] == 64 // 32
    # POG runs once per layer with the group size and reorders 16 channel sets (experts and value heads of both layers)
    assert permuted == [(32, 8), (32, 8)]


def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch):
    from codequant.calibration import driver

    config = QuantConfig(**FAST)
    full = quantize(copy.deepcopy(tiny_model("qwen3_moe")), config, tmp_path / "full", progress=False, calibration=_calibration())

    calls = {"n": 0}
    original = driver.Quantizer.quantize_layer

    def crash_on_second_layer(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, i, *args)

    monkeypatch.setattr(driver.Quantizer, "quantize_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        quantize(copy.deepcopy(tiny_model("qwen3_moe")), config, tmp_path / "resumed", progress=False, calibration=_calibration())
    assert (tmp_path / "resumed.partial" / "layer_0000.safetensors").is_file()
    monkeypatch.setattr(driver.Quantizer, "quantize_layer", original)
    resumed = quantize(copy.deepcopy(tiny_model("qwen3_moe")), config, tmp_path / "resumed", progress=False, calibration=_calibration())
    assert not (tmp_path / "resumed.partial").exists()
    ids = tiny_input_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(ids).logits, full.model(ids).logits, rtol=0, atol=1e-5)


# -- configuration -----------------------------------------------------------------------
def test_experts_with_another_activation_are_refused_before_any_work():
    from transformers.activations import ACT2FN

    model = tiny_model("qwen3_moe")
    model.model.layers[1].mlp.experts.act_fn = ACT2FN["gelu"]
    with pytest.raises(ValueError) as e:
        quantize(model, QuantConfig(method="rtn", **FAST), progress=False, calibration=_calibration())
    assert str(e.value) == (
        "model.layers.1.mlp.experts uses the expert activation GELUActivation, but CodeQuant's expert kernels compute "
        "SiLU (SwiGLU) only; this model cannot be quantized faithfully (supported: experts with hidden_act silu)"
    )


def test_config_from_yaml_and_toml(tmp_path):
    (tmp_path / "a.yaml").write_text("method: gptq\nwbits: 3\ngroup_size: 128\n")
    (tmp_path / "b.toml").write_text('method = "rtn"\nabits = 16\n')
    a = QuantConfig.from_file(tmp_path / "a.yaml", wbits=2)
    assert (a.method, a.wbits, a.group_size) == ("gptq", 2, 128)
    assert QuantConfig.from_file(tmp_path / "b.toml").abits == 16
    (tmp_path / "c.yaml").write_text("methd: rtn\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['methd'\]; valid options: "):
        QuantConfig.from_file(tmp_path / "c.yaml")


# -- bad input through the command line -------------------------------------------------------
def _cli_error(capsys, *argv) -> str:
    assert main(["quantize", *argv]) == 2
    return capsys.readouterr().err


def test_missing_model_path(capsys, tmp_path):
    err = _cli_error(capsys, str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert f"codequant: error: model path {tmp_path / 'nope'} does not exist or holds no config.json" in err


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    err = _cli_error(capsys, str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert "unsupported architecture 'gpt2' (GPT2LMHeadModel); CodeQuant supports: deepseek_v2, llama, mixtral, olmoe, phimoe, qwen2_moe, qwen3, qwen3_moe" in err


@pytest.fixture
def tiny_dir(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "m")
    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_empty_calibration_file(capsys, tmp_path, tiny_dir):
    (tmp_path / "empty.txt").write_text("")
    err = _cli_error(capsys, str(tiny_dir), "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "empty.txt"), "--device", "cpu")
    assert f"codequant: error: data source {tmp_path / 'empty.txt'} is empty: it holds no text; give a file with text in it" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--wbits", "5", "--wbits must be between 2 and 4 (codebooks of 4 to 16 centroids), got 5"),
    ("--abits", "1", "--abits must be between 2 and 8, or 16 for no activation quantization, got 1"),
    ("--block-tuning-epochs", "-1", "--block-tuning-epochs must be 0 (off) or a positive number of epochs, got -1"),
    ("--act-clip", "0", "--act-clip must be in (0, 1]: the share of each token's range that activations are quantized over, got 0.0"),
    ("--act-clip", "1.5", "--act-clip must be in (0, 1]: the share of each token's range that activations are quantized over, got 1.5"),
    ("--group-size", "48", "--group-size 48 does not divide the row length 64 of model.layers.0.self_attn.q_proj; choose a divisor of 64"),
])
def test_bad_numbers(capsys, tmp_path, tiny_dir, flag, value, message):
    err = _cli_error(capsys, str(tiny_dir), "--out", str(tmp_path / "o"), flag, value, "--device", "cpu")
    assert f"codequant: error: {message}" in err


def test_quantize_then_eval_from_the_command_line(capsys, tmp_path, tiny_dir):
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog " * 40)
    args = ["quantize", str(tiny_dir), "--out", str(tmp_path / "q"), "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "CodeQuant summary" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "q"), "--ref", str(tiny_dir), "--data", str(tmp_path / "calib.txt"),
                 "--seqlen", "32", "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert set(record) >= {"perplexity", "kl", "top1_agreement", "tokens"}
    assert record["tokens"] > 0 and record["kl"] >= 0 and 0 <= record["top1_agreement"] <= 1


def test_phimoe_checkpoint_round_trip_keeps_folded_layernorm_biases(tmp_path, reference_kernels):
    """PhiMoE's LayerNorm betas end in RMSNorm biases and new linear biases; both survive save/load."""
    from transformers import AutoModelForCausalLM

    fp = tiny_model("phimoe")
    result = quantize(copy.deepcopy(fp), QuantConfig(**{**FAST, "accf_epochs": 1}), tmp_path / "q", progress=False, calibration=_calibration())
    assert any(getattr(m, "bias", None) is not None for n, m in result.model.named_modules() if n.endswith("post_attention_layernorm"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", attn_implementation="eager")
    result.model.config._attn_implementation = "eager"
    ids = tiny_input_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


def test_accuracy_flags_reach_the_config(tmp_path):
    from codequant.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    config = _config_from_args(parse(["quantize", "--out", str(tmp_path / "x"), "--act-clip", "0.9", "--weight-assignment", "feedback"]))
    assert (config.act_clip, config.weight_assignment) == (0.9, "feedback")
    config = _config_from_args(parse(["quantize", "--out", str(tmp_path / "x"), "--act-clip-search", "--o-proj-hadamard", "--router-abits", "8",
                                      "--act-group-size", "64"]))
    assert (config.act_clip_search, config.o_proj_hadamard, config.router_abits, config.act_group_size) == (True, True, 8, 64)
    config = _config_from_args(parse(["quantize", "--out", str(tmp_path / "x")]))
    assert (config.act_clip, config.weight_assignment) == (1.0, "nearest")
    assert (config.act_clip_search, config.o_proj_hadamard, config.router_abits, config.act_group_size) == (False, False, None, 0)


def test_quantized_lm_head_is_weight_only_and_round_trips(tmp_path, reference_kernels):
    """Target lm_head (``--quantize-head``): the head becomes a weight-only codebook linear fitted on
    the final norm's outputs, untied from the float embedding, and loads back with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from codequant.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--out", str(tmp_path / "x"), "--quantize-head"])
    assert _config_from_args(args).targets == (*QuantConfig.targets, "lm_head")
    fp = tiny_model("qwen3_moe")
    config = QuantConfig(**FAST, targets=(*QuantConfig.targets, "lm_head"))
    result = quantize(copy.deepcopy(fp), config, tmp_path / "q", progress=False, calibration=_calibration())
    head = result.model.lm_head
    assert isinstance(head, CodeQuantLinear) and not head.act.enabled and head.hadamard_block == 0
    assert result.model.model.layers[0].self_attn.q_proj.act.bits == 4  # the rest keeps the run's activations
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.lm_head, CodeQuantLinear) and not loaded.config.tie_word_embeddings
    torch.testing.assert_close(loaded.model.embed_tokens.weight, result.model.model.embed_tokens.weight, rtol=0, atol=0)
    ids = tiny_input_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)
    out = evaluate(result.model, tiny_input_ids(4, 32, seed=7), fp, progress=False)
    assert out["kl"] < 0.5 and out["top1_agreement"] > 0.5


def test_o_proj_hadamard_router_bits_and_clip_search_reach_the_modules_and_round_trip(tmp_path, reference_kernels):
    """o_proj_hadamard puts the online Hadamard before o_proj only; router_abits sets the router's input
    bits only; act_clip_search stores each module's searched ratio in its spec (q/k/v one ratio, so they
    still fuse; shared-expert gate/up one ratio) and in the report. The checkpoint loads back the same."""
    from transformers import AutoModelForCausalLM

    from codequant.calibration.act_clip import CLIP_RATIOS

    fp = tiny_model("qwen2_moe")
    config = QuantConfig(**FAST, o_proj_hadamard=True, router_abits=8, act_clip_search=True)
    result = quantize(copy.deepcopy(fp), config, tmp_path / "q", progress=False, calibration=_calibration())
    clips = result.report["act_clip"]
    for i, layer in enumerate(result.model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.o_proj.hadamard_block == 64 and attn.q_proj.hadamard_block == attn.k_proj.hadamard_block == 0
        assert mlp.experts.hadamard_block == 64  # the down projections keep theirs
        assert mlp.gate.act.bits == 8 and mlp.experts.act.bits == mlp.experts.down_act.bits == attn.o_proj.act.bits == 4
        assert attn.q_proj.act == attn.k_proj.act == attn.v_proj.act
        assert mlp.shared_expert.gate_proj.act == mlp.shared_expert.up_proj.act
        prefix = f"model.layers.{i}"
        assert clips[f"{prefix}.self_attn.o_proj"] == attn.o_proj.act.clip and clips[f"{prefix}.mlp.gate"] == mlp.gate.act.clip
        assert clips[f"{prefix}.mlp.experts.down_proj"] == mlp.experts.down_act.clip
    assert set(clips.values()) <= set(CLIP_RATIOS) and len(clips) == 2 * 11  # q k v o, router, gate_up, down, 4 shared-expert linears
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.model.layers[1].self_attn.o_proj.hadamard_block == 64 and loaded.model.layers[1].mlp.gate.act.bits == 8
    ids = tiny_input_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)
    out = evaluate(result.model, tiny_input_ids(4, 32, seed=7), fp, progress=False)
    assert out["kl"] < 0.5


def test_activation_options_leave_w4a16_and_rtn_alone():
    """Without quantized activations there is no online Hadamard and the router keeps --abits; plain
    RTN (no rotation) gets no o_proj Hadamard either."""
    fp = tiny_model("qwen3_moe")
    w4a16 = quantize(copy.deepcopy(fp), QuantConfig(**{**FAST, "accf_epochs": 1}, abits=16, o_proj_hadamard=True), progress=False, calibration=_calibration())
    layer = w4a16.model.model.layers[0]
    assert layer.self_attn.o_proj.hadamard_block == 0 and not layer.mlp.gate.act.enabled
    rtn = quantize(copy.deepcopy(fp), QuantConfig(**FAST, method="rtn", o_proj_hadamard=True, router_abits=8), progress=False, calibration=_calibration())
    layer = rtn.model.model.layers[0]
    assert layer.self_attn.o_proj.hadamard_block == 0 and (layer.mlp.gate.act.bits, layer.self_attn.o_proj.act.bits) == (8, 4)


@pytest.mark.parametrize("argv,message", [
    (["--router-abits", "1"], "--router-abits must be between 2 and 8, or 16 for an unquantized router input, got 1"),
    (["--router-abits", "12"], "--router-abits must be between 2 and 8, or 16 for an unquantized router input, got 12"),
    (["--act-clip", "0.9", "--act-clip-search"], "--act-clip 0.9 and --act-clip-search exclude each other: the search picks every module's clip ratio"),
    (["--act-group-size", "-8"], "--act-group-size must be a positive number of channels, or 0 for one scale per token, got -8"),
    (["--act-group-size", "48"], "--act-group-size 48 does not divide the input width 64 of model.layers.0.self_attn.q_proj; "
                                 "choose a divisor of 64, or 0 for one scale per token"),
])
def test_bad_activation_options(capsys, tmp_path, tiny_dir, argv, message):
    err = _cli_error(capsys, str(tiny_dir), "--out", str(tmp_path / "o"), *argv, "--device", "cpu")
    assert f"codequant: error: {message}" in err
