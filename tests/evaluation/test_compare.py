"""codequant.evaluation.compare: one table of every method against full precision, resumable."""

import json
import math

import pytest

from codequant.evaluation import compare as C
from tests.helpers.paths import FIXTURE

SMALL = dict(seqlen=32, max_windows=2, nsamples=4, calib_seqlen=32, device="cpu", progress=False)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"The river {i} runs past the old mill and the town of {i}."}) + "\n" for i in range(30)))
    return str(path)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("compare")
    return out, C.compare(str(FIXTURE), out, ["rtn"], ["w4a16"], {"set": text}, calib=text, **SMALL)


def test_rows_hold_full_precision_and_each_method_with_kl_to_it(first_run):
    out, rows = first_run
    assert [(r["method"], r["mode"]) for r in rows] == [("full precision", "16-bit"), ("rtn", "w4a16")]
    fp, rtn = rows
    assert fp["set_kl"] is None and fp["seconds"] is None
    assert rtn["set_kl"] > 0 and math.isfinite(rtn["set_ppl"]) and 0 <= rtn["set_top1"] <= 1
    assert rtn["set_tokens"] == fp["set_tokens"] == 2 * 31
    record = json.loads((out / "results.json").read_text())
    assert record["rows"] == rows and record["settings"]["sets"] == {"set": [2, 32]}
    assert (out / "results.md").read_text() == C.format_table(rows, ["set"]) + "\n"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_with_the_same_settings_quantizes_nothing_again(first_run, text, monkeypatch):
    out, rows = first_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("quantize ran again for a row already in results.json")

    monkeypatch.setattr(C, "quantize", must_not_run)
    assert C.compare(str(FIXTURE), out, ["rtn"], ["w4a16"], {"set": text}, calib=text, **SMALL) == rows


def test_other_settings_start_a_new_table(first_run, text, monkeypatch):
    out, _ = first_run
    calls = []
    monkeypatch.setattr(C, "quantize", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        C.compare(str(FIXTURE), out, ["rtn"], ["w4a16"], {"set": text}, calib=text, **{**SMALL, "max_windows": 1})
    assert calls == [1]


def test_unknown_mode_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match=r"unknown modes \['w3a3'\]; choose from: w4a16, w4a4"):
        C.compare(str(FIXTURE), tmp_path, ["rtn"], ["w3a3"], {"set": text}, **SMALL)
