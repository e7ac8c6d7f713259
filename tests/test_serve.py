"""`python -m jft.serve` end to end: a server on localhost, driven by the real `openai`
client. Each request's greedy text equals `jft.generate` for it alone, whatever shares
its batch; streams equal non-streamed replies; adapters come and go under load without
losing a request; bad requests get OpenAI's error object and the server stays up."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import openai
import pytest

import jft
from jft.errors import run_cli
from jft.formats.jft_adapter import save_jft_adapter
from jft.formats.peft_adapter import save_peft_adapter
from jft.peft import create
from tests.hf_reference import save_tiny_smollm2
from tests.test_serve_engine import perturbed

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The river runs", "Once upon a time", "In 1969 the", "Seven plus two",
           "My favourite colour", "The capital of France", "Rain falls on", "A cat sat",
           "Numbers: 1, 2,", "Dear friend,", "Tomorrow we will", "The old house",
           "Water boils at", "She opened the door", "Lists are", "Light travels"]
ADAPTERS = {  # name -> (method, options, format)
    "lora-a": ("lora", dict(r=8, alpha=16, targets="all-linear"), "peft"),
    "lora-b": ("lora", dict(r=4, alpha=4, rslora=True, targets=["q_proj", "v_proj"]), "jft"),
    "ia3": ("ia3", {}, "peft"),
    "s2ft": ("s2ft", dict(attention_ratio=0.25, mlp_ratio=0.1), "jft"),
}
LAZY = {"spiel": ("spiel", dict(count=64), "jft")}
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _save(model, name, method, options, fmt, directory: Path, seed: int) -> Path:
    scale = 0.3 if method in ("lora", "ia3") else 0.05
    adapter = perturbed(method, model.params, model.config, seed, scale=scale,
                        split=method == "s2ft", **options)
    path = directory / name
    path.mkdir(parents=True)
    save = save_peft_adapter if fmt == "peft" else save_jft_adapter
    save(adapter, model.config, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_smollm2(directory / "tiny")
    model = jft.load(model_dir, dtype="float32")
    paths = {name: _save(model, name, *spec, directory / "adapters", seed)
             for seed, (name, spec) in enumerate(ADAPTERS.items())}
    lazy = {name: _save(model, name, *spec, directory / "lazy", 10)
            for name, spec in LAZY.items()}
    port = _free_port()
    log = open(directory / "server.log", "w")
    command = [sys.executable, "-m", "jft.serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch", "4", "--max-adapters-on-device", "3", "--max-len", "128",
               "--adapter-dir", str(directory / "lazy"), "--log-level", "warning"]
    for name, path in paths.items():
        command += ["--adapter", f"{name}={path}"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (directory / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        yield {"url": url, "model": model, "model_dir": model_dir, "paths": paths | lazy,
               "directory": directory}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _client(setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key="none", max_retries=0,
                         timeout=300)


def _reference(setup, adapter: str | None, prompt: str, chat=False, max_tokens=MAX_TOKENS):
    """What `jft.load(...).generate`, the code behind `python -m jft.generate`, gives."""
    key = (adapter, prompt, chat, max_tokens)
    cache = setup.setdefault("references", {})
    if key not in cache:
        models = setup.setdefault("models", {})
        if adapter not in models:
            models[adapter] = jft.load(setup["model_dir"], dtype="float32",
                                       adapter=setup["paths"][adapter] if adapter else None)
        cache[key] = models[adapter].generate(prompt, max_new_tokens=max_tokens, chat=chat)
    return cache[key]


def _metrics(setup) -> dict[str, float]:
    text = urllib.request.urlopen(setup["url"] + "/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _http(setup, method: str, path: str, body=None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(setup["url"] + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_lists_the_base_and_every_adapter(setup):
    listed = {m.id: m for m in _client(setup).models.list().data}
    assert set(listed) == {str(setup["model_dir"]), *ADAPTERS, *LAZY}
    assert listed["spiel"].parent == str(setup["model_dir"])


def test_concurrent_requests_equal_each_alone(setup):
    """16 concurrent greedy requests over four adapters (LoRA through the bank; IA3 and
    S2FT rowwise) and the base, on 4 decode rows and 3 device entries."""
    names = ([None, *ADAPTERS] * 4)[:16]
    before = _metrics(setup)

    def ask(job):
        name, prompt = job
        reply = _client(setup).completions.create(
            model=name or "base", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage

    jobs = list(zip(names, PROMPTS, strict=True))
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, jobs))
    for (name, prompt), (text, reason, usage) in zip(jobs, replies, strict=True):
        assert text == _reference(setup, name, prompt), (name, prompt)
        assert usage.completion_tokens == MAX_TOKENS or reason == "stop"
    after = _metrics(setup)
    steps = after["jft_decode_step_seconds_count"] - before["jft_decode_step_seconds_count"]
    tokens = after["jft_generated_tokens_total"] - before["jft_generated_tokens_total"]
    assert tokens > 1.5 * steps  # rows shared decode steps
    assert after["jft_adapter_evictions_total"] > 0  # five names, three device entries


def test_python_m_jft_generate_agrees(setup):
    """The CLI itself, once: what it prints is the server's reply, stripped."""
    out = subprocess.run(
        [sys.executable, "-m", "jft.generate", "--model", str(setup["model_dir"]), "--adapter",
         str(setup["paths"]["lora-a"]), "--prompt", PROMPTS[1], "--max-new-tokens",
         str(MAX_TOKENS)], capture_output=True, text=True, cwd=ROOT, check=True)
    reply = _client(setup).completions.create(model="lora-a", prompt=PROMPTS[1],
                                              max_tokens=MAX_TOKENS, temperature=0)
    assert out.stdout.strip() == reply.choices[0].text.strip()


def test_streams_equal_replies_and_chat_uses_the_template(setup):
    client = _client(setup)
    for name in ("lora-a", "s2ft", "spiel"):  # spiel: loaded on first use from --adapter-dir
        messages = [{"role": "user", "content": PROMPTS[3]}]
        reply = client.chat.completions.create(model=name, messages=messages, temperature=0,
                                               max_tokens=MAX_TOKENS)
        text = reply.choices[0].message.content
        assert text == _reference(setup, name, PROMPTS[3], chat=True)
        chunks = list(client.chat.completions.create(
            model=name, messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        streamed = client.completions.create(model=name, prompt=PROMPTS[4], temperature=0,
                                             max_tokens=MAX_TOKENS, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == _reference(setup, name,
                                                                          PROMPTS[4])


def test_sampling_n_seed_and_stop(setup):
    client = _client(setup)
    options = dict(model="lora-b", prompt=PROMPTS[5], max_tokens=12, temperature=1.0,
                   top_p=0.9, seed=3)
    first = client.completions.create(n=2, **options)
    again = client.completions.create(n=2, **options)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # seeds 3 and 4
    full = _reference(setup, "lora-b", PROMPTS[5], max_tokens=12)
    stop = full[3:6]
    cut = client.completions.create(model="lora-b", prompt=PROMPTS[5], max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_stays_up(setup):
    client = _client(setup)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="x", temperature=7)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model="base", prompt="word " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="base", prompt="x", presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="base", messages=[])
    status, body = _http(setup, "POST", "/v1/adapters", {"name": "x", "path": "/nowhere"})
    assert status == 400 and "not an adapter directory" in body["error"]["message"]
    status, body = _http(setup, "POST", "/v1/adapters",
                         {"name": "ia3", "path": str(setup["paths"]["ia3"])})
    assert status == 409
    status, body = _http(setup, "DELETE", "/v1/adapters/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert urllib.request.urlopen(setup["url"] + "/health").status == 200


def test_adapters_load_and_delete_under_load_without_losing_a_request(setup):
    """Six streams hold lora-b (four decoding, two queued) when it is deleted: each
    finishes with its whole text; new requests for it get 404 until it is posted again."""
    client = _client(setup)
    accepted = threading.Barrier(7)  # a stream's headers come once the server holds it
    tokens = 32

    def stream(prompt):
        chunks = client.completions.create(model="lora-b", prompt=prompt, temperature=0,
                                           max_tokens=tokens, stream=True)
        accepted.wait(timeout=120)
        return "".join(chunk.choices[0].text for chunk in chunks)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, p) for p in PROMPTS[:6]]
        accepted.wait(timeout=120)
        assert _http(setup, "DELETE", "/v1/adapters/lora-b")[0] == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="lora-b", prompt="x", max_tokens=2)
        status, _ = _http(setup, "POST", "/v1/adapters",
                          {"name": "lora-c", "path": str(setup["paths"]["lora-b"])})
        assert status == 200
        texts = [f.result() for f in futures]
    assert texts == [_reference(setup, "lora-b", p, max_tokens=tokens) for p in PROMPTS[:6]]
    reply = client.completions.create(model="lora-c", prompt=PROMPTS[0], temperature=0,
                                      max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == _reference(setup, "lora-b", PROMPTS[0])
    assert _http(setup, "POST", "/v1/adapters",
                 {"name": "lora-b", "path": str(setup["paths"]["lora-b"])})[0] == 200
    assert "lora-b" in {m.id for m in client.models.list().data}


def test_a_client_that_disconnects_frees_its_slot(setup):
    before = _metrics(setup).get('jft_requests_total{finish_reason="cancelled"}', 0)
    request = urllib.request.Request(
        setup["url"] + "/v1/completions", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "base", "prompt": "Go on", "max_tokens": 100,
                         "temperature": 0, "stream": True}).encode())
    response = urllib.request.urlopen(request)
    assert response.readline().startswith(b"data: ")
    response.close()
    deadline = time.monotonic() + 60
    while True:
        metrics = _metrics(setup)
        if metrics.get('jft_requests_total{finish_reason="cancelled"}', 0) > before:
            break
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.2)
    assert metrics["jft_running_requests"] == 0


def test_cli_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys):
    from jft.serve.__main__ import main

    _, prompt = create("prompt_tuning", jax.random.key(0),
                       setup["model"].params, setup["model"].config, num_virtual_tokens=2)
    save_jft_adapter(prompt, setup["model"].config, tmp_path)
    cases = [
        (["--model", str(setup["model_dir"]), "--adapter", "nameonly"], "give NAME=DIR"),
        (["--model", str(setup["model_dir"]), "--max-batch", "0"], "--max-batch"),
        (["--model", str(setup["model_dir"]), "--adapter-dir", str(tmp_path / "no")],
         "not a directory"),
        (["--model", str(setup["model_dir"]), "--port", str(_free_port()),
          "--adapter", f"p={tmp_path}"], "merged model"),
    ]
    for argv, message in cases:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
