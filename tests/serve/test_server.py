"""nanogpt-serve driven by the official `openai` client over a real socket on 127.0.0.1: the
API's shapes, seeded requests equal to `bundle.generate` and to themselves under load,
log-probabilities against transformers, bad requests, disconnects, a full queue, SIGTERM."""

import concurrent.futures
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import REPO, assert_one_line_error, run_script

import nanogpt_jax

STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/serve.py in its own process, ready once /health says so."""

    def __init__(self, checkpoint, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "scripts" / "serve.py"),
                f"--init_from={checkpoint}",
                "--model_name=tiny",
                f"--port={self.port}",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines = []
        threading.Thread(target=self.collect_stderr, daemon=True).start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "".join(self.stderr_lines)
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"server not ready: {''.join(self.stderr_lines)}")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def collect_stderr(self):
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)

    def wait_for(self, name: str, value: float, seconds: float = 30) -> float:
        """The metric once it reaches `value` (a request's rows go in one by one, its first
        token out with the first), or what it is after `seconds`."""
        deadline = time.monotonic() + seconds
        while self.metric(name) < value and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.metric(name)


@pytest.fixture(scope="module")
def served(gpt2_checkpoint):
    path, hf_model = gpt2_checkpoint
    server = Server(path, "--slots=4", "--decode_steps=4")
    yield server, nanogpt_jax.load(path), hf_model
    server.close()


def reference(bundle, prompt, n, seed, max_tokens, stops=(), **sampling):
    """What the server must answer: rows 0..n-1 of bundle.generate with the same seed, cut
    where OpenAI cuts (before a stop string; the end-of-text token is not shown)."""
    result = bundle.generate(
        [prompt] * n,
        max_new_tokens=max_tokens,
        seed=seed,
        stop=[*stops, "<|endoftext|>"],
        **sampling,
    )
    texts = []
    for text in result.completions():
        cuts = [text.find(s) for s in (*stops, "<|endoftext|>") if s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts


def test_models_health_and_metrics(served):
    server, bundle, _ = served
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "nanogpt_requests_running",
        "nanogpt_requests_waiting",
        "nanogpt_generated_tokens_total",
        "nanogpt_time_to_first_token_seconds_bucket",
        "nanogpt_inter_token_latency_seconds_bucket",
        "nanogpt_compiled_programs",
    ):
        assert name in text, name


def test_streamed_pieces_join_to_the_whole_answer(served):
    server, bundle, _ = served
    request = dict(model="tiny", prompt="The quick brown", max_tokens=24, seed=7, n=2)
    request |= dict(temperature=0.9, logprobs=0)  # logprobs list every completion token
    whole = server.client.completions.create(**request)
    chunks = list(
        server.client.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    for index in range(2):
        pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(p.text for p in pieces) == whole.choices[index].text
        finishing = [p for p in pieces if p.finish_reason is not None]
        assert len(finishing) == 1 and finishing[0] is pieces[-1]
        assert finishing[0].finish_reason == whole.choices[index].finish_reason
        streamed_tokens = [t for p in pieces for t in p.logprobs.tokens]
        assert streamed_tokens == whole.choices[index].logprobs.tokens
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert whole.usage.prompt_tokens == len(bundle.tokenizer.encode("The quick brown"))
    completion_tokens = sum(len(c.logprobs.tokens) for c in whole.choices)
    assert whole.usage.completion_tokens == completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + completion_tokens
    for c in whole.choices:  # a row that ran to max_tokens has exactly that many
        assert c.finish_reason == "stop" or len(c.logprobs.tokens) == 24
    assert whole.object == "text_completion" and whole.model == "tiny"


def test_seeded_samples_equal_generate(served):
    server, bundle, _ = served
    sampling = dict(temperature=0.8, top_k=40, top_p=0.95)
    answer = server.client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=30,
        n=3,
        seed=1234,
        temperature=0.8,
        top_p=0.95,
        extra_body={"top_k": 40},
    )
    expected = reference(bundle, "Once upon a time", 3, 1234, 30, **sampling)
    assert [c.text for c in answer.choices] == expected
    assert len(set(expected)) == 3  # three different samples
    assert answer.model_extra["seed"] == 1234


def test_a_request_without_a_seed_can_be_replayed(served):
    server, _, _ = served
    first = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=12)
    seed = first.model_extra["seed"]
    again = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=seed)
    assert again.choices[0].text == first.choices[0].text


MIXED = [
    dict(prompt="In the beginning", max_tokens=40, temperature=0.0),
    dict(prompt="A", max_tokens=5, temperature=1.0, seed=1),
    dict(prompt="The king said", max_tokens=33, temperature=0.7, seed=2, n=2),
    dict(prompt=[464, 3290, 318, 257], max_tokens=20, temperature=1.0, seed=3, top_k=5),
    dict(prompt="Numbers: 1, 2,", max_tokens=25, temperature=0.9, seed=4, top_p=0.8),
    dict(prompt="Stop here. And", max_tokens=30, temperature=1.0, seed=5, stop=["e", "\n"]),
    dict(prompt="Tea or coffee", max_tokens=50, temperature=1.2, seed=6, top_k=300),
    dict(prompt="x", max_tokens=8, temperature=0.5, seed=7, min_p=0.2, n=3),
]


def mixed_requests(count: int) -> list[dict]:
    rng = random.Random(0)
    requests = []
    for i in range(count):
        request = dict(MIXED[i % len(MIXED)], model="tiny")
        request["seed"] = request.get("seed", 0) + 100 * i
        if rng.random() < 0.5:
            request["max_tokens"] += rng.randrange(10)
        requests.append(request)
    return requests


def send(client, request) -> list[str]:
    extra = {k: request[k] for k in ("top_k", "min_p") if k in request}
    fields = {k: v for k, v in request.items() if k not in extra}
    answer = client.completions.create(**fields, extra_body=extra)
    return [(c.text, c.finish_reason) for c in answer.choices]


def test_concurrent_mixed_requests_each_equal_the_request_alone(served):
    """32 requests at once on 4 slots (lengths, temperatures, top_k, top_p, min_p, stops,
    seeds, n): each answer equals the same request sent alone, and no program was compiled
    after the warm-up."""
    server, _, _ = served
    compiled = server.metric("nanogpt_compiled_programs")
    requests = mixed_requests(32)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: send(server.client, r), requests))
    alone = [send(server.client, r) for r in requests]
    assert together == alone
    assert server.metric("nanogpt_compiled_programs") == compiled
    stopped = [a for r, a in zip(requests, alone, strict=True) if "stop" in r]
    assert any(reason == "stop" for answer in stopped for _, reason in answer)
    assert all("e" not in text and "\n" not in text for answer in stopped for text, _ in answer)


def test_logprobs_and_echo_are_the_models_own(served):
    """echo with logprobs: every prompt and completion token scored as transformers scores
    it (float32 log-softmax, 1e-4); the text is the prompt and then the completion."""
    server, bundle, hf_model = served
    prompt = [464, 3290, 318, 257, 1332, 286]
    answer = server.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0, echo=True, logprobs=3
    )
    choice = answer.choices[0]
    tokens = prompt + bundle.tokenizer.encode(choice.text[len(bundle.tokenizer.decode(prompt)) :])
    with torch.no_grad():
        scores = torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), -1)
    expected = [None] + [scores[i - 1, t].item() for i, t in enumerate(tokens) if i > 0]
    got = choice.logprobs.token_logprobs
    assert len(got) == len(tokens) and got[0] is None
    np.testing.assert_allclose(got[1:], expected[1 : len(got)], atol=1e-4)
    assert choice.text == bundle.tokenizer.decode(tokens)
    assert "".join(choice.logprobs.tokens) == choice.text
    for i in range(1, len(tokens)):  # the three likeliest, as transformers ranks them
        top = choice.logprobs.top_logprobs[i]
        values, ids = scores[i - 1].topk(3)
        assert len(top) == 3
        np.testing.assert_allclose(sorted(top.values()), sorted(values.tolist()), atol=1e-4)
        assert set(top) == {bundle.tokenizer.decode([j]) for j in ids.tolist()}
    assert choice.logprobs.text_offset == [
        len(bundle.tokenizer.decode(tokens[:i])) for i in range(len(tokens))
    ]
    # max_tokens=0 scores the prompt alone
    scored = server.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1
    )
    np.testing.assert_allclose(scored.choices[0].logprobs.token_logprobs[1:], got[1:6], atol=1e-6)
    assert scored.usage.completion_tokens == 0


def test_a_long_prompt_is_cropped_unless_its_scores_are_asked(served):
    server, bundle, _ = served
    long = list(range(1000, 1100))  # block_size is 64
    answer = server.client.completions.create(
        model="tiny", prompt=long, max_tokens=5, temperature=0
    )
    expected = bundle.generate([long[-64:]] * 2, max_new_tokens=5, temperature=0.0)
    assert answer.choices[0].text == expected.completions()[0]
    assert answer.usage.prompt_tokens == 100
    with pytest.raises(openai.BadRequestError, match="block_size"):
        server.client.completions.create(
            model="tiny", prompt=long, max_tokens=5, echo=True, logprobs=1
        )


def test_the_load_benchmark_reports_every_level(served, tmp_path):
    server, _, _ = served
    out = tmp_path / "load"
    result = run_script(
        "bench_serve",
        f"--url={server.url}",
        "--concurrency=1,3",
        "--rates=20",
        "--requests=6",
        "--prompt_lens=4,20",
        "--max_tokens=6",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "serve-results.json").read_text())
    levels = report["levels"]
    assert [(lv["kind"], lv.get("clients"), lv.get("rate")) for lv in levels] == [
        ("concurrency", 1, None),
        ("concurrency", 3, None),
        ("poisson", None, 20.0),
    ]
    for level in levels:
        assert level["requests"] == 6 and level["completion_tokens"] > 0
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"]
        assert level["output_tok_s"] > 0 and level["itl_p50_s"] > 0
    assert "3 clients" in result.stdout and "20.0/s Poisson" in result.stdout


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(temperature=-1), "temperature"),
        (dict(n=0), "n"),
        (dict(logprobs=9), "logprobs"),
        (dict(max_tokens=10**9), "max_tokens"),
        (dict(top_p=0), "top_p"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(prompt=[70000]), "prompt"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
    ],
)
def test_bad_fields_are_a_400_naming_the_field(served, fields, param):
    server, _, _ = served
    request = dict(model="tiny", prompt="Hi", max_tokens=3) | fields
    with pytest.raises(openai.BadRequestError) as error:
        server.client.completions.create(**request)
    assert error.value.body["param"] == param, error.value.body
    assert error.value.body["type"] == "invalid_request_error"
    assert server.client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices


def test_an_unknown_model_is_a_404(served):
    server, _, _ = served
    with pytest.raises(openai.NotFoundError) as error:
        server.client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert error.value.body["code"] == "model_not_found"


def malformed_bodies() -> list[bytes]:
    rng = random.Random(1)
    bodies = [b"", b"{", b"[]", b"null", b"42", b'"prompt"', b"\xff\xfe", b'{"model": "tiny"}']
    values = [None, -1, 1e308, 10**40, "x", [], {}, [[]], [None], True, -(10**30), "\x00"]
    fields = [
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "echo",
        "stream",
        "top_k",
        "min_p",
        "stream_options",
    ]
    while len(bodies) < 50:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        body[rng.choice(fields)] = rng.choice(values)
        encoded = json.dumps(body).encode()
        if encoded not in bodies:
            bodies.append(encoded)
    return bodies


def test_malformed_bodies_leave_it_serving(served):
    server, _, _ = served
    statuses = []
    for body in malformed_bodies():
        response = httpx.post(
            f"{server.url}/v1/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert 500 not in statuses and statuses.count(400) >= 40, statuses
    assert server.client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices


def test_a_client_that_disconnects_frees_its_slots(served):
    server, _, _ = served
    stream = server.client.completions.create(
        model="tiny", prompt="Go on", max_tokens=5000, n=4, stream=True, temperature=1.0
    )
    next(iter(stream))
    assert server.wait_for("nanogpt_requests_running", 4) == 4
    stream.close()
    deadline = time.monotonic() + 30
    while server.metric("nanogpt_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("nanogpt_requests_running") == 0
    assert server.client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices


def test_a_full_queue_is_a_503_at_once_and_sigterm_finishes_what_runs(gpt2_checkpoint):
    path, _ = gpt2_checkpoint
    # the programs of `served`'s server, from the persistent compilation cache
    server = Server(path, "--slots=4", "--max_queue=1", "--decode_steps=4")
    long = dict(model="tiny", prompt="Go", max_tokens=400, temperature=1.0)
    try:
        running = server.client.completions.create(**long, n=4, stream=True)
        first = next(iter(running))
        assert server.wait_for("nanogpt_requests_running", 4) == 4  # every slot busy
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            server.client.completions.create, **long
        )
        deadline = time.monotonic() + 30
        while server.metric("nanogpt_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        began = time.monotonic()
        refused = httpx.post(f"{server.url}/v1/completions", json=long | {"max_tokens": 2})
        assert refused.status_code == 503 and time.monotonic() - began < 5
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"

        server.process.send_signal(signal.SIGTERM)  # finishes both requests, then exits 0
        pieces = [first] + list(running)
        assert {c.choices[0].finish_reason for c in pieces if c.choices} >= {"length"}
        assert sum(1 for c in pieces if c.choices and c.choices[0].finish_reason) == 4
        assert waiting.result(timeout=300).choices[0].finish_reason == "length"
        assert server.process.wait(timeout=120) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--slots=1"], "slots"),
        (["--port=70000"], "port"),
        (["--bogus=1"], "bogus"),
    ],
)
def test_bad_flags_are_one_line(gpt2_checkpoint, flags, fragment):
    path, _ = gpt2_checkpoint
    assert_one_line_error(run_script("serve", f"--init_from={path}", *flags), fragment)


def test_a_missing_checkpoint_or_a_taken_port_is_one_line(gpt2_checkpoint):
    path, _ = gpt2_checkpoint
    result = run_script("serve", "--init_from=/no/such/dir")
    assert_one_line_error(result, "no such checkpoint")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("serve", f"--init_from={path}", f"--port={port}")
    assert_one_line_error(result, str(port))
