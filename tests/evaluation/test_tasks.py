"""Zero-shot task scoring: prompt formats, log-likelihoods, metrics, and agreement with lm-eval."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from codequant.evaluation import tasks as T
from codequant.io import save_quantized

from tests.helpers.packed import quantize_tiny
from tests.helpers.paths import REPO
from tests.helpers.tiny_models import char_tokenizer, tiny_model

SHARED_TASKS = REPO.parent / "shared" / "data" / "tasks"

ARC = [
    {"query": "Question: Which is a gas?", "choices": ["ice", "steam", "rock", "sand"], "gold": 1},
    {"query": "Question: What do plants need?", "choices": ["light", "noise"], "gold": 0},
    {"query": "Question: Which is hot?", "choices": ["the sun", "snow", "a cold cave"], "gold": 0},
]
PIQA = [
    {"query": "Question: Open a jar.\n", "choices": ["Twist the lid.", "Paint the lid."], "gold": 0},
    {"query": "Question: Dry a towel.\n", "choices": ["Put it in water.", "Hang it in the sun."], "gold": 1},
]
WINO = [
    {"context_options": ["Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo"], "continuation": "was kind.", "gold": 0},
    {"context_options": ["The cup fell off the shelf because the cup", "The cup fell off the shelf because the shelf"],
     "continuation": "was tilted.", "gold": 1},
]


pytestmark = pytest.mark.usefixtures("reference_kernels")  # every module on the reference path


def write_tasks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in (("arc_easy", ARC), ("piqa", PIQA), ("winogrande", WINO)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny quantized checkpoint with a character tokenizer, and the loaded model."""
    path = tmp_path_factory.mktemp("tasks") / "ckpt"
    save_quantized(quantize_tiny(tiny_model("olmoe", seed=1)), path, tokenizer=char_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return path, model, char_tokenizer()


def test_request_formats_match_lm_eval():
    arc = T.build_requests("arc_easy", ARC[:1])
    assert [(r.context, r.continuation) for r in arc] == [
        ("Question: Which is a gas?\nAnswer:", " " + c) for c in ARC[0]["choices"]
    ]
    piqa = T.build_requests("piqa", PIQA[:1])
    assert piqa[1].context == "Question: Open a jar.\nAnswer:" and piqa[1].continuation == " Paint the lid."
    wino = T.build_requests("winogrande", WINO[:1])
    assert [(r.context, r.continuation) for r in wino] == [(c, " was kind.") for c in WINO[0]["context_options"]]
    assert {r.doc for r in T.build_requests("arc_easy", ARC)} == {0, 1, 2}


def test_encode_pair_moves_trailing_space_and_splits_whole():
    tok = char_tokenizer()
    ctx, cont = T.encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    assert T.encode_pair(tok, "", "ab") == ([tok.eos_token_id], tok.encode("ab"))


def test_score_task_acc_and_acc_norm():
    docs = [{"choices": ["a", "bbbbbbbbbb"], "gold": 1}, {"choices": ["xx", "y"], "gold": 0}]
    # doc 0: raw picks "a" (-1 > -5) but per character "bbbbbbbbbb" wins (-0.5 > -1)
    # doc 1: raw picks "xx" (-2 > -3), per character "xx" too (-1 > -3)
    result = T.score_task("arc_easy", docs, [-1.0, -5.0, -2.0, -3.0])
    assert result["acc"] == 0.5 and result["acc_norm"] == 1.0 and result["n"] == 2
    assert math.isclose(result["acc_stderr"], math.sqrt(0.25 / 1))
    wino = T.score_task("winogrande", WINO, [-3.0, -4.0, -2.0, -1.0])
    assert wino == {"acc": 1.0, "acc_stderr": 0.0, "n": 2}


def test_loglikelihoods_equal_a_direct_computation(tiny):
    _, model, tok = tiny
    requests = T.build_requests("arc_easy", ARC[1:]) + T.build_requests("winogrande", WINO[:1])
    batched = T.loglikelihoods(model, tok, requests, batch_size=4)
    for r, got in zip(requests[:2] + requests[-1:], batched[:2] + batched[-1:]):
        ctx, cont = tok.encode(r.context), tok.encode(r.continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-4)
    single = T.loglikelihoods(model, tok, requests, batch_size=1)
    assert max(abs(a - b) for a, b in zip(batched, single)) < 1e-4


def test_truncation_keeps_last_tokens(tiny):
    _, model, tok = tiny
    r = T.Request(0, "x" * 40, " yes")
    full = T.loglikelihoods(model, tok, [r], max_length=200)[0]
    cut = T.loglikelihoods(model, tok, [r], max_length=10)[0]
    shorter = T.loglikelihoods(model, tok, [T.Request(0, "x" * 7, " yes")], max_length=200)[0]
    assert math.isclose(cut, shorter, rel_tol=1e-5) and not math.isclose(cut, full, rel_tol=1e-5)


def test_evaluate_tasks_on_shared_files(tiny):
    if not SHARED_TASKS.is_dir():
        pytest.skip(f"{SHARED_TASKS} not present")
    _, model, tok = tiny
    results = T.evaluate_tasks(model, tok, ["arc_easy", "piqa", "winogrande"], data_dir=SHARED_TASKS, limit=3, batch_size=8)
    assert set(results) == {"arc_easy", "piqa", "winogrande"}
    for name, r in results.items():
        assert r["n"] == 3 and ("acc_norm" in r) == (name != "winogrande")
        # the same accuracies from the raw files, one unbatched forward pass per choice
        docs = [json.loads(line) for line in (SHARED_TASKS / T.TASK_FILES[name]).read_text().splitlines()[:3]]
        hits, norm_hits = [], []
        for doc in docs:
            if name == "winogrande":
                pairs = [(ctx, " " + doc["continuation"]) for ctx in doc["context_options"]]
            else:
                pairs = [(doc["query"].strip() + "\nAnswer:", " " + c) for c in doc["choices"]]
            scores = []
            for ctx, cont in pairs:
                c, x = T.encode_pair(tok, ctx, cont)
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([c + x])).logits[0].double(), -1)
                scores.append(sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(x)))
            hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
            if name != "winogrande":
                norm = [s / len(ch) for s, ch in zip(scores, doc["choices"])]
                norm_hits.append(max(range(len(norm)), key=norm.__getitem__) == doc["gold"])
        assert r["acc"] == sum(hits) / 3
        if norm_hits:
            assert r["acc_norm"] == sum(norm_hits) / 3
    with pytest.raises(ValueError, match="unknown task 'hellaswag'"):
        T.evaluate_tasks(model, tok, ["hellaswag"], data_dir=SHARED_TASKS)


def test_shipped_task_configs_point_at_shared_files():
    for task, filename in T.TASK_FILES.items():
        config = yaml.safe_load((T._TASK_DIR / f"{T.LM_EVAL_TASKS[task]}.yaml").read_text())
        assert config["task"] == T.LM_EVAL_TASKS[task] and config["dataset_path"] == "json"
        assert config["dataset_kwargs"]["data_files"]["test"] == f"{T.DEFAULT_DATA_DIR}/{filename}"
        if SHARED_TASKS.is_dir():
            assert (REPO / config["dataset_kwargs"]["data_files"]["test"]).resolve() == (SHARED_TASKS / filename).resolve()


def test_include_path_for_another_data_dir(tmp_path):
    data = write_tasks(tmp_path / "data")
    include = Path(T.lm_eval_include_path(data, out_dir=tmp_path / "include"))
    for task, filename in T.TASK_FILES.items():
        config = yaml.safe_load((include / f"{T.LM_EVAL_TASKS[task]}.yaml").read_text())
        assert config["dataset_kwargs"]["data_files"]["test"] == str((data / filename).resolve())


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (the eval extra)")
def test_lm_eval_on_checkpoint_agrees_with_own_scorer(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, model, tok = tiny
    data = write_tasks(tmp_path / "data")
    results = T.run_lm_eval(path, ["arc_easy", "winogrande"], data_dir=data, limit=3, batch_size=2)
    own = T.evaluate_tasks(model, tok, ["arc_easy", "winogrande"], data_dir=data, limit=3)
    for task in ("arc_easy", "winogrande"):
        lm = results["results"][T.LM_EVAL_TASKS[task]]
        assert lm["acc,none"] == pytest.approx(own[task]["acc"], abs=1e-9)
        if task == "arc_easy":
            assert lm["acc_norm,none"] == pytest.approx(own[task]["acc_norm"], abs=1e-9)
        docs = T.load_docs(task, data, limit=3)
        mine = T.loglikelihoods(model, tok, T.build_requests(task, docs))
        samples = sorted(results["samples"][T.LM_EVAL_TASKS[task]], key=lambda s: s["doc_id"])
        theirs = [float(resp[0]) for s in samples for resp in s["filtered_resps"]]
        assert len(theirs) == len(mine)
        assert max(abs(a - b) for a, b in zip(theirs, mine)) < 1e-3
