"""The disk layout of packed weights (format 3): indices and codebooks at the index bit width."""

from __future__ import annotations

import pytest
import torch

import codequant.core.format as fmt
from codequant.core.format import pack_for_disk, pack_indices, padded_columns, unpack_from_disk


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [64, 96, 200])
def test_indices_round_trip_at_their_width(bits, k):
    idx = torch.randint(0, 2**bits, (3, 5, k), generator=torch.Generator().manual_seed(bits * k))
    memory = pack_indices(idx)
    stored = pack_for_disk("layer.gate_up_indices", memory, bits)
    assert stored.dtype == torch.uint8 and stored.shape == (3, 5, padded_columns(k) * bits // 8)
    assert torch.equal(unpack_from_disk("layer.gate_up_indices", stored, bits), memory)


def test_four_bit_tensors_are_stored_as_they_are_in_memory():
    memory = pack_indices(torch.randint(0, 16, (4, 130)))
    codebook = torch.randn(4, 2, 16).half()
    assert pack_for_disk("q.indices", memory, 4) is memory and pack_for_disk("q.codebook", codebook, 4) is codebook
    assert unpack_from_disk("q.indices", memory, 4) is memory and unpack_from_disk("q.codebook", codebook, 4) is codebook


def test_bit_stream_layout():
    """Index c of a row is bits b*c .. b*c+b-1 of the row's little-endian bit stream."""
    idx = torch.zeros(1, 64, dtype=torch.long)
    idx[0, :3] = torch.tensor([5, 3, 7])
    idx[0, 63] = 6
    three = pack_for_disk("x.indices", pack_indices(idx), 3)
    # 5 | 3 << 3 | 7 << 6 = 0x1DD; column 63 is bits 189..191: the top 3 bits of byte 23
    assert three[0, :3].tolist() == [0xDD, 0x01, 0x00] and three[0, 23].item() == 6 << 5
    idx[0, :3] = torch.tensor([3, 1, 2])
    idx[0, 63] = 3
    two = pack_for_disk("x.indices", pack_indices(idx), 2)  # 3 | 1 << 2 | 2 << 4; column 63: the top 2 bits of byte 15
    assert two[0, 0].item() == 0x27 and two[0, 15].item() == 3 << 6


def test_row_chunks_give_the_same_bytes(monkeypatch):
    idx = torch.randint(0, 8, (6, 7, 130), generator=torch.Generator().manual_seed(0))
    memory = pack_indices(idx)
    whole = pack_for_disk("x.indices", memory, 3)
    monkeypatch.setattr(fmt, "_ROW_CHUNK", 100)  # one row per chunk
    assert torch.equal(pack_for_disk("x.indices", memory, 3), whole)
    assert torch.equal(unpack_from_disk("x.indices", whole, 3), memory)


def test_codebook_keeps_its_used_entries():
    codebook = torch.zeros(2, 3, 16, dtype=torch.float16)
    codebook[..., :4] = torch.randn(2, 3, 4).half()
    stored = pack_for_disk("m.down_codebook", codebook, 2)
    assert stored.shape == (2, 3, 4) and torch.equal(stored, codebook[..., :4])
    assert torch.equal(unpack_from_disk("m.down_codebook", stored, 2), codebook)
    row_sum = torch.randn(2)
    assert pack_for_disk("m.down_row_sum", row_sum, 2) is row_sum


def test_what_does_not_fit_is_refused():
    idx = torch.zeros(2, 64, dtype=torch.long)
    idx[1, 9] = 4
    with pytest.raises(ValueError, match=r"^m\.indices holds index 4, which does not fit in 2 bits$"):
        pack_for_disk("m.indices", pack_indices(idx), 2)
    codebook = torch.zeros(2, 1, 16, dtype=torch.float16)
    codebook[0, 0, 8] = 1.0
    with pytest.raises(ValueError, match=r"^m\.codebook has nonzero entries past the 8 that 3-bit indices address$"):
        pack_for_disk("m.codebook", codebook, 3)
