"""Train the bundled fixture model: a small Qwen3-MoE on public-domain English text.

    python scripts/train_fixture.py --corpus ../shared/data/corpus --out models/codequant-moe-tiny

Steps: hold out every 50th document of the corpus (by its row number in each file), train
a byte-level BPE tokenizer (8192 tokens) on the rest, train a Qwen3MoeForCausalLM
(transformers 5.x, grouped_mm experts) with AdamW and a cosine schedule, evaluate
held-out perplexity, and save a standard Hugging Face directory in bfloat16 with tied
embeddings plus ``training.json`` (config, steps, loss curve, held-out documents).
Runs on one GPU in a few minutes; deterministic given --seed up to GPU non-determinism.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

HOLDOUT_EVERY = 50
VOCAB = 8192
MODEL_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=768,
    moe_intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
)


def read_documents(corpus: Path, max_docs: int = 0) -> tuple[list[str], list[str], list[dict]]:
    """(train texts, held-out texts, held-out ids) from every *.jsonl.gz file, sorted by name."""
    train, held, held_ids = [], [], []
    for path in sorted(corpus.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if max_docs and i >= max_docs:
                    break
                text = json.loads(line)["text"]
                if i % HOLDOUT_EVERY == 0:
                    held.append(text)
                    held_ids.append({"file": path.name, "row": i})
                else:
                    train.append(text)
    return train, held, held_ids


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.model_max_length = MODEL_CONFIG["max_position_embeddings"]
    fast.save_pretrained(out)
    return fast


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids = tokenizer.backend_tokenizer.encode_batch(texts)
    return np.concatenate([np.array(e.ids + [eos], dtype=np.uint16) for e in ids])


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seqlen: int, device) -> float:
    n = len(tokens) // seqlen
    data = torch.from_numpy(tokens[: n * seqlen].astype(np.int64)).view(n, seqlen)
    nll, count = 0.0, 0
    for batch in data.split(32):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/data/corpus"))
    ap.add_argument("--out", type=Path, default=Path("models/codequant-moe-tiny"))
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--time-budget", type=float, default=0, help="stop early after this many seconds of training (0: never)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=0, help="use only the first N documents of each file (smoke tests)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()
    train_texts, held_texts, held_ids = read_documents(args.corpus, args.max_docs)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_texts, args.out)
    train_tokens, held_tokens = encode(tokenizer, train_texts), encode(tokenizer, held_texts)
    print(f"data: {len(train_texts)} train docs {len(train_tokens)} tokens, {len(held_texts)} held-out docs {len(held_tokens)} tokens ({time.time() - t0:.0f}s)", flush=True)

    config = Qwen3MoeConfig(**MODEL_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3MoeForCausalLM(config).to(device)
    model.set_experts_implementation("grouped_mm")
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    warmup = max(1, args.steps // 50)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))))

    data = torch.from_numpy(train_tokens.astype(np.int64)).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    curve, step, t_train = [], 0, time.time()
    model.train()
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(data) - args.seqlen - 1, (args.batch,), device=device, generator=gen)
        batch = data[starts[:, None] + torch.arange(args.seqlen + 1, device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        total = loss + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            curve.append({"step": step, "loss": round(loss.item(), 4), "aux": round(out.aux_loss.item(), 4), "seconds": round(time.time() - t_train, 1)})
            print(curve[-1], flush=True)
        step += 1
        if step == 30 and args.time_budget:
            # Fit the cosine schedule to the time budget, measured on the first steps.
            per_step = (time.time() - t_train) / step
            args.steps = min(args.steps, int(args.time_budget / per_step))
            print(f"{per_step * 1000:.0f} ms/step: training {args.steps} steps", flush=True)
    curve.append({"step": step, "loss": round(loss.item(), 4), "aux": round(out.aux_loss.item(), 4), "seconds": round(time.time() - t_train, 1)})
    model.eval()
    held_ppl = perplexity(model, held_tokens, 512, device)
    print(f"held-out perplexity {held_ppl:.3f} after {step} steps ({step * args.batch * args.seqlen / 1e6:.0f}M tokens)", flush=True)

    model.config._experts_implementation = None
    model.to(torch.bfloat16).save_pretrained(args.out)
    record = {
        "command": f"python scripts/train_fixture.py --corpus CORPUS_DIR --out {args.out} --steps {step} --batch {args.batch} --seqlen {args.seqlen} --lr {args.lr} --seed {args.seed}",
        "config": MODEL_CONFIG,
        "parameters": n_params,
        "steps": step,
        "planned_steps": args.steps,
        "tokens_seen": step * args.batch * args.seqlen,
        "train_tokens": int(len(train_tokens)),
        "heldout_tokens": int(len(held_tokens)),
        "heldout_perplexity_seqlen512_bf16": held_ppl,
        "final_train_loss": curve[-1]["loss"],
        "loss_curve": curve,
        "heldout_documents": held_ids,
        "train_seconds": round(time.time() - t_train, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("loss_curve", "heldout_documents")}, indent=1))


if __name__ == "__main__":
    main()
