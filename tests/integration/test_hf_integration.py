"""transformers integration: registration, from_pretrained + generate with the KV cache, streaming."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import codequant
from codequant.generate import generate
from codequant.io import CodeQuantConfig, CodeQuantHfQuantizer, read_quantization_config, save_quantized
from codequant.kernels import set_options
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear

from tests.helpers.packed import quantize_tiny
from tests.helpers.tiny_models import char_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("reference_kernels")  # every module on the reference path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = quantize_tiny(tiny_model("qwen3_moe", seed=3))
    model.generation_config.eos_token_id = None  # random weights: never stop early
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    save_quantized(model, path, tokenizer=char_tokenizer(), extra={"method": "test"})
    return path


def test_import_registers_config_and_quantizer():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["codequant"] is CodeQuantConfig
    assert AUTO_QUANTIZER_MAPPING["codequant"] is CodeQuantHfQuantizer
    assert codequant.io.CodeQuantConfig is CodeQuantConfig


def test_from_pretrained_returns_quantized_model(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert isinstance(model.hf_quantizer, CodeQuantHfQuantizer) and model.is_quantized
    assert isinstance(model.model.layers[0].mlp.experts, CodeQuantExperts)
    assert isinstance(model.model.layers[1].self_attn.q_proj, CodeQuantLinear)
    assert model.config.quantization_config.extra == {"method": "test"}
    assert model.config.quantization_config.to_dict() == read_quantization_config(checkpoint)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(checkpoint.parent / "again")


def test_generate_with_kv_cache_matches_no_cache(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    ids = torch.tensor([[10, 20, 30]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=1)
    assert cached.shape == (1, 7)
    assert torch.equal(cached, uncached)


def test_generate_streams_text_and_reports_rate(checkpoint, capsys):
    text, rate = generate(checkpoint, "Hello", max_new_tokens=6)
    printed = capsys.readouterr().out
    assert rate > 0
    assert printed.rstrip("\n") == text
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = char_tokenizer()
    ids = torch.tensor([tokenizer.encode("Hello")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert out.shape[1] == ids.shape[1] + 6
    assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_on_model_object_is_deterministic(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    first, _ = generate(model, "abc", max_new_tokens=5, stream=False)
    again, _ = generate(model, "abc", max_new_tokens=5, stream=False)
    assert first == again


def test_generate_compiled_gives_the_eager_text(checkpoint):
    """transformers compiles the decode step of a CodeQuant model (static cache, fullgraph: the
    quantizer declares it compileable) and the greedy text is the eager one."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.hf_quantizer.is_compileable
    want, _ = generate(model, "Hello", max_new_tokens=6, stream=False, tokenizer=char_tokenizer())
    torch._dynamo.reset()
    counters.clear()
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode="default")
    got, _ = generate(model, "Hello", max_new_tokens=6, stream=False, tokenizer=char_tokenizer(), compile=config)
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    assert got == want


def test_generate_on_cpu_gives_kernels_the_threads_and_restores_torch(checkpoint, monkeypatch):
    """generate() runs on one pool: every kernel call gets torch's thread count while torch's
    ops run on 1 thread, and torch's count is restored afterwards."""
    cpu = pytest.importorskip("codequant.kernels.cpu", reason="compiled CPU kernels not built")
    set_options(backend=None)  # the cpu kernels (the reference_kernels fixture restores the options)
    calls = []
    for name in ("run", "moe"):
        kernel = getattr(cpu._lut, name)

        def spy(*args, kernel=kernel):
            calls.append((torch.get_num_threads(), args[-1]))
            return kernel(*args)

        monkeypatch.setattr(cpu._lut, name, spy)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        generate(model, "abc", max_new_tokens=3, stream=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert calls and set(calls) == {(1, 2)}


def test_generate_needs_tokenizer_for_in_memory_model():
    model = quantize_tiny(tiny_model("olmoe"))
    with pytest.raises(ValueError, match="pass tokenizer="):
        generate(model, "abc", max_new_tokens=2, stream=False)


def test_fresh_process_loads_with_trust_remote_code_without_importing_codequant(checkpoint):
    """What lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True does."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "from transformers.quantizers import AutoQuantizationConfig\n"
        f"c = AutoConfig.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)\n"
        "AutoQuantizationConfig.from_dict(c.quantization_config)  # what lm-eval does first\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)\n"
        "assert 'codequant' in sys.modules\n"
        "print(type(m.model.layers[0].mlp.experts).__name__, m(torch.tensor([[5, 6, 7]])).logits.shape[-1])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "CODEQUANT_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["CodeQuantExperts", "128"]
