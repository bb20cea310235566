"""vLLM's OpenAI-compatible server on 127.0.0.1, started by ``codequant serve``, serves a CodeQuant
checkpoint: a completion and a chat request return the greedy tokens transformers gives for the same
checkpoint; the server is stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from tests.vllm_serving.checkpoints import make_checkpoint  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from codequant.io import load_quantized  # noqa: E402

# the fixture's tokenizer has no chat template; the server takes one on its command line
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
NEW_TOKENS = 12
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_until_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(2)
    raise TimeoutError(f"the server did not answer /health within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, checkpoint dir) of a running api_server; stopped by PID afterwards."""
    root = tmp_path_factory.mktemp("server")
    ckpt = make_checkpoint(root / "ckpt", 4)
    template = root / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    command = [sys.executable, "-m", "codequant.cli", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
               "--kv-cache-gib", "1", "--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
               "--chat-template", str(template)]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # codequant serve execs vLLM's server: same PID
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        yield url, ckpt
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def greedy(ckpt, prompt_ids: list[int]) -> list[int]:
    model = load_quantized(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_completion_returns_transformers_greedy_text(server):
    url, ckpt = server
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    prompt = tokenizer("The President said")["input_ids"]
    body = post(url + "/v1/completions", {"model": str(ckpt), "prompt": prompt, "max_tokens": NEW_TOKENS,
                                          "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    choice = body["choices"][0]
    assert choice["token_ids"] == greedy(ckpt, prompt)
    assert choice["text"] and choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] == NEW_TOKENS


def test_chat_returns_transformers_greedy_reply(server):
    url, ckpt = server
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    body = post(url + "/v1/chat/completions", {
        "model": str(ckpt), "messages": [{"role": "user", "content": "The President said"}], "max_tokens": NEW_TOKENS,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True,
    })
    prompt = body["prompt_token_ids"]
    assert tokenizer.decode(prompt) == "user: The President said\nassistant:"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert body["choices"][0]["token_ids"] == greedy(ckpt, prompt)
