"""`plainllama serve` on the loopback interface, driven by the official `openai` client (pinned,
test-only) and by plain HTTP. Oracles: plainllama's own single-request generation of the same prompt
(`LLM.generate` / `LLM.chat`, the path `plainllama generate` runs), OpenAI's documented response and
error shapes, and each request's result when it runs alone on the server."""

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

import plainllama
from helpers import oracle

openai = oracle("openai")

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPTS = ["The capital of France is", "Llamas live in", "1, 2, 3, 4,", "Once upon a time", "The best way to learn is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Served:
    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plainllama", "serve", "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        self.statuses = []
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                status, _ = get(self.url + "/health")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.02)
                continue
            self.statuses.append(status)
            if status == 200:
                break
            time.sleep(0.02)
        assert self.statuses and self.statuses[-1] == 200, self.statuses
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def metric(self, name: str) -> float:
        _, text = get(self.url + "/metrics")
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"plainllama_{name} "))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.process.send_signal(sig)
        self.process.wait(timeout)
        self.log.seek(0)
        return self.process.returncode, self.log.read()


@pytest.fixture(scope="module")
def server():
    s = Served("--max-batch", "16")
    yield s
    if s.process.poll() is None:
        s.stop()


@pytest.fixture(scope="module")
def packed():
    """The default model as `plainllama generate` loads it (compressed weights, the C kernels)."""
    return plainllama.load()


def test_health_is_503_until_the_model_is_loaded(server):
    """The port opens before the model is loaded: /health answers 503 (with Retry-After) until then."""
    assert server.statuses[0] == 503 and server.statuses[-1] == 200, server.statuses


def test_chat_and_completions_give_the_greedy_tokens_of_generate(server, packed):
    """Both endpoints, streamed and not, through the openai client: the text and token counts of
    LLM.chat / LLM.generate on the same prompt (greedy)."""
    expected = packed.chat(CHAT, max_new_tokens=40, temperature=0)
    for _ in expected:
        pass
    expected = expected.result
    answer = server.client.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=40)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert answer.usage.completion_tokens == len(expected.tokens)
    assert answer.usage.prompt_tokens == len(packed.encode_chat(CHAT))
    chunks = list(
        server.client.chat.completions.create(
            model=server.model, messages=CHAT, temperature=0, max_tokens=40, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)

    for prompt in PROMPTS[:3]:
        expected = packed.generate(prompt, max_new_tokens=24, temperature=0)
        answer = server.client.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=24)
        assert answer.choices[0].text == expected.text, prompt
        assert answer.usage.completion_tokens == len(expected.tokens)
        streamed = server.client.completions.create(
            model=server.model, prompt=prompt, temperature=0, max_tokens=24, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_logprobs_are_those_of_generate(server, packed):
    expected = packed.generate(PROMPTS[0], max_new_tokens=6, temperature=0, logprobs=3)
    answer = server.client.completions.create(
        model=server.model, prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=3
    )
    lp = answer.choices[0].logprobs
    assert lp.token_logprobs == [e.logprob for e in expected.logprobs]
    assert [list(top.values()) for top in lp.top_logprobs] == [[v for _, v in e.top] for e in expected.logprobs]
    chat = server.client.chat.completions.create(
        model=server.model, messages=CHAT, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_errors_in_openai_shape(server):
    url = server.url
    cases = [
        ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "tools": []}, 400, "tools"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 9000}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ]
    for path, body, status, param in cases:
        got, answer = post(url + path, body)
        assert got == status and answer["error"]["param"] == param, (body, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 9000})[1]["error"]["code"] == (
        "context_length_exceeded"
    )
    status, answer = post(url + "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, text = get(url + "/v2/nothing")
    assert status == 404 and json.loads(text)["error"]["code"] == "unknown_url"
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="not-this-one", messages=CHAT)


def test_seeded_sampling_does_not_depend_on_company(server):
    """A sampled request with a seed gives the same text alone and among 15 others sent at once."""

    def ask(prompt, seed):
        return (
            server.client.completions.create(
                model=server.model, prompt=prompt, temperature=0.9, top_p=0.95, seed=seed, max_tokens=20
            )
            .choices[0]
            .text
        )

    alone = ask(PROMPTS[3], 7)
    results = {}

    def run(i):
        results[i] = ask(PROMPTS[i % len(PROMPTS)] if i else PROMPTS[3], 7 if i == 0 else i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[0] == alone
    assert len(set(results.values())) > 1  # the others did sample other texts


def test_32_concurrent_clients(server, packed):
    """Streaming and whole answers, greedy and seeded, clients that hang up mid-stream and bad
    requests, all at once: each completed answer equals its single-request result, each bad request
    gets its 400, no request hangs, and afterwards nothing runs and memory is back near idle."""
    import httpx2 as httpx  # the openai client's own HTTP library

    greedy = {p: packed.generate(p, max_new_tokens=16, temperature=0).text for p in PROMPTS}
    seeded = {
        s: server.client.completions.create(
            model=server.model, prompt=PROMPTS[1], temperature=1.0, seed=s, max_tokens=16
        )
        .choices[0]
        .text
        for s in (1, 2)
    }
    idle = server.rss_kib()
    outcomes: dict[int, str] = {}

    def client(i: int) -> None:
        kind = i % 4
        if kind == 0:  # greedy, whole answer
            p = PROMPTS[i % len(PROMPTS)]
            text = server.client.completions.create(model=server.model, prompt=p, temperature=0, max_tokens=16)
            outcomes[i] = "ok" if text.choices[0].text == greedy[p] else f"differs: {text.choices[0].text!r}"
        elif kind == 1:  # seeded, streamed
            s = 1 + i % 2
            stream = server.client.completions.create(
                model=server.model, prompt=PROMPTS[1], temperature=1.0, seed=s, max_tokens=16, stream=True
            )
            text = "".join(c.choices[0].text for c in stream)
            outcomes[i] = "ok" if text == seeded[s] else f"differs: {text!r}"
        elif kind == 2:  # hangs up after a few chunks of a long answer
            body = {"prompt": PROMPTS[3], "max_tokens": 2000, "stream": True, "temperature": 0}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n == 6:
                        break
            outcomes[i] = "ok"
        else:  # a bad field
            status, answer = post(server.url + "/v1/completions", {"prompt": "hi", "top_k": -1})
            outcomes[i] = "ok" if status == 400 and answer["error"]["param"] == "top_k" else f"{status} {answer}"

    start = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert outcomes == dict.fromkeys(range(32), "ok"), outcomes
    deadline = time.time() + 30
    while (server.metric("running_requests") or server.metric("queue_length")) and time.time() < deadline:
        time.sleep(0.2)  # the hung-up streams are dropped at the next step
    assert server.metric("running_requests") == 0 and server.metric("queue_length") == 0
    assert server.metric("batch_size") >= 1
    assert server.rss_kib() < idle + 150 * 1024, f"{idle} KiB idle, {server.rss_kib()} KiB after"
    assert time.time() - start < 300


def test_a_full_queue_answers_429_and_shutdown_exits_cleanly():
    """--max-batch 1 --max-queue 1: a third request while one runs and one waits gets 429 with
    Retry-After. SIGTERM then stops the server within its grace period with status 0, no traceback."""
    s = Served("--max-batch", "1", "--max-queue", "1", "--grace", "5")
    try:
        body = {"prompt": PROMPTS[3], "max_tokens": 400, "temperature": 0, "stream": True}
        streams = []
        for _ in range(2):
            request = urllib.request.Request(s.url + "/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            streams.append(urllib.request.urlopen(request, timeout=60))  # returns with the headers, sent at once
        deadline = time.time() + 10
        while s.metric("queue_length") < 1 and time.time() < deadline:
            time.sleep(0.05)
        request = urllib.request.Request(s.url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 429 and refused.value.headers["Retry-After"]
        assert json.loads(refused.value.read())["error"]["code"] == "queue_full"
        started = time.time()
        code, stderr = s.stop(signal.SIGTERM, timeout=60)
        assert code == 0 and "Traceback" not in stderr, stderr
        assert time.time() - started < 5 + 15
        for stream in streams:
            stream.close()
    finally:
        if s.process.poll() is None:
            s.process.kill()


def test_a_chat_reuses_its_history_from_the_prefix_cache(server, packed):
    """Four turns, each sending the whole conversation: from the second turn on, the previous prompt's
    whole 64-token blocks come from the cache (usage.prompt_tokens_details.cached_tokens), only the
    rest is prefilled (counted by /metrics), and every answer is the one LLM.chat gives without any
    cache (greedy)."""
    questions = [
        "Tell me three facts about llamas, with some detail on each.",
        "Now tell me about alpacas in the same way.",
        "Which of the two is better for wool, and why?",
        "Summarize our conversation in two sentences.",
    ]
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in full sentences."}]
    cached_turns = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        before = server.metric("prompt_tokens_total")
        answer = server.client.chat.completions.create(
            model=server.model, messages=messages, temperature=0, max_tokens=48
        )
        prefilled = server.metric("prompt_tokens_total") - before
        expected = packed.chat(messages, max_new_tokens=48, temperature=0)
        for _ in expected:
            pass
        assert answer.choices[0].message.content == expected.result.text
        cached = answer.usage.prompt_tokens_details.cached_tokens
        assert prefilled == answer.usage.prompt_tokens - cached
        cached_turns.append((cached, answer.usage.prompt_tokens))
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    # each turn reuses every whole block of the previous turn's prompt (its answer's keys came from decode steps)
    expected_reuse = [0] + [length // 64 * 64 for _, length in cached_turns[:-1]]
    assert [cached for cached, _ in cached_turns] == expected_reuse and expected_reuse[-1] > 0, cached_turns
