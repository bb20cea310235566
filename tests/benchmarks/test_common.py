"""The benchmarks' random CodeQuant models carry the online Hadamard blocks where ``codequant quantize`` puts them."""

from benchmarks.common import install_codequant, random_packed_on, set_online_hadamard
from codequant.core.activations import ActQuantSpec
from tests.helpers.tiny_models import tiny_model


def test_set_online_hadamard_places_the_blocks_of_quantize():
    model = tiny_model("qwen3_moe")
    install_codequant(model, ActQuantSpec(4), random_packed_on("cpu"))
    layers = model.model.layers
    blocks = lambda: {(layer.self_attn.o_proj.hadamard_block, layer.mlp.experts.hadamard_block) for layer in layers}  # noqa: E731
    assert blocks() == {(0, 0)}
    set_online_hadamard(model, down=True, o_proj=True)
    assert blocks() == {(64, 64)}  # o_proj input 64 wide, expert width 64: the largest power-of-two blocks
    set_online_hadamard(model, down=True)
    assert blocks() == {(0, 64)}
    set_online_hadamard(model, down=False)
    assert blocks() == {(0, 0)}
