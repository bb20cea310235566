"""codequant.calibration.data: the data sources, and the windows cut from their token stream."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from codequant.calibration.data import calibration_windows, eval_windows, load_texts, tokenize_joined
from tests.helpers.paths import FIXTURE


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FIXTURE)


def _jsonl(path: Path, texts: list[str], gz: bool = False) -> Path:
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def test_files_of_each_kind_give_their_documents_in_order(tmp_path):
    assert load_texts(str(_jsonl(tmp_path / "a.jsonl", ["one", "two"]))) == ["one", "two"]
    assert load_texts(str(_jsonl(tmp_path / "b.jsonl.gz", ["three"], gz=True))) == ["three"]
    (tmp_path / "c.txt").write_text("four\nfive", encoding="utf-8")
    assert load_texts(str(tmp_path / "c.txt")) == ["four\nfive"]
    (tmp_path / "ignored.csv").write_text("x", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["one", "two", "three", "four\nfive"]  # a directory: files in name order


def test_blank_lines_are_skipped_and_a_bad_row_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:3: expected a JSON object with a 'text' field"):
        load_texts(str(path))


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.jsonl"), "data file {d}/missing.jsonl does not exist"),
    (lambda d: str(d), "data directory {d} holds no .txt/.jsonl/.jsonl.gz files"),
    (lambda d: str(_jsonl(d / "blank.jsonl", ["", "  "])), "data source {d}/blank.jsonl is empty: it holds no text; give a file with text in it"),
])
def test_unusable_sources_are_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        load_texts(make(tmp_path))
    assert str(err.value) == message.format(d=tmp_path)


def test_heldout_reads_exactly_the_listed_rows(tmp_path):
    corpus, model = tmp_path / "corpus", tmp_path / "model"
    corpus.mkdir()
    model.mkdir()
    _jsonl(corpus / "x.jsonl.gz", ["x0", "x1", "x2"], gz=True)
    _jsonl(corpus / "y.jsonl.gz", ["y0", "y1"], gz=True)
    docs = [{"file": "y.jsonl.gz", "row": 1}, {"file": "x.jsonl.gz", "row": 2}, {"file": "x.jsonl.gz", "row": 0}]
    (model / "training.json").write_text(json.dumps({"heldout_documents": docs}))
    assert load_texts(f"heldout:{corpus}", model) == ["x0", "x2", "y1"]
    with pytest.raises(FileNotFoundError, match=f"'heldout:' data needs the model's training.json, not found at {tmp_path}/training.json"):
        load_texts(f"heldout:{corpus}", tmp_path)


def test_calibration_windows_are_seeded_slices_of_the_joined_stream(tokenizer):
    texts = [f"Document {i} says the number {i * 7} twice: {i * 7}." for i in range(40)]
    stream = tokenize_joined(tokenizer, texts)
    windows = calibration_windows(tokenizer, texts, nsamples=6, seqlen=16, seed=3)
    assert windows.shape == (6, 16)
    starts = [next(s for s in range(len(stream) - 16) if torch.equal(stream[s : s + 16], w)) for w in windows]
    assert all(0 <= s < len(stream) - 16 for s in starts)
    assert torch.equal(windows, calibration_windows(tokenizer, texts, 6, 16, seed=3))
    assert not torch.equal(windows, calibration_windows(tokenizer, texts, 6, 16, seed=4))
    with pytest.raises(ValueError, match=rf"calibration text has {len(stream)} tokens, fewer than one window of {len(stream)}"):
        calibration_windows(tokenizer, texts, 2, len(stream))


def test_eval_windows_tile_the_stream_from_its_start(tokenizer):
    texts = [f"Line {i} of the evaluation text." for i in range(30)]
    stream = tokenize_joined(tokenizer, texts)
    windows = eval_windows(tokenizer, texts, seqlen=10)
    assert windows.shape == (len(stream) // 10, 10)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    assert torch.equal(eval_windows(tokenizer, texts, 10, max_windows=2), windows[:2])
    with pytest.raises(ValueError, match=rf"evaluation text has {len(stream)} tokens, fewer than one window of {len(stream) + 1}"):
        eval_windows(tokenizer, texts, len(stream) + 1)
