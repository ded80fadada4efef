"""The HTTP face of the server (FastAPI): OpenAI requests in, scheduler jobs out, and back.

POST /v1/completions   OpenAI's completions, streamed (server-sent events) or not
GET  /v1/models        the one model served
GET  /health           200 once the model is loaded and every program compiled, else 503
GET  /metrics          Prometheus text
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from nanogpt_jax.serve import protocol
from nanogpt_jax.serve.protocol import OpenAIError
from nanogpt_jax.serve.scheduler import Job, Piece, Prompt, QueueFull, Scheduler

RETRY_AFTER_SECONDS = 1


def create_app(scheduler: Scheduler, model_name: str, max_tokens_default: int) -> FastAPI:
    """The app; `scheduler` starts with it and drains when it shuts down (SIGTERM)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)  # in-flight requests have finished by now

    app = FastAPI(title="nanogpt-jax", lifespan=lifespan)
    created = int(time.time())
    tokenizer, block_size = scheduler.tokenizer, scheduler.block_size

    @app.exception_handler(OpenAIError)
    async def openai_error(request, error: OpenAIError):
        scheduler.metrics.requests.labels("error").inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health():
        if not scheduler.ready.is_set():
            status = f"failed: {scheduler.failed}" if scheduler.failed else "warming up"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(scheduler.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = protocol.model_card(model_name, block_size, tokenizer.vocab_size, created)
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OpenAIError(400, "the request body is not valid JSON") from None
        params = protocol.parse_request(body)
        if params.model != model_name:
            message = f"The model `{params.model}` does not exist (this server has {model_name})"
            raise OpenAIError(404, message, "model", "model_not_found")
        if scheduler.failed:
            raise OpenAIError(503, f"the server failed: {scheduler.failed}")
        if not scheduler.ready.is_set():
            raise OpenAIError(503, "the model is still warming up", headers=retry_after())
        prompts = [
            read_prompt(p, tokenizer, block_size, params.echo and params.logprobs is not None)
            for p in prompt_list(params.prompt)
        ]
        if len(prompts) * params.n > protocol.MAX_CHOICES:
            raise OpenAIError(400, f"at most {protocol.MAX_CHOICES} choices (prompts x n)", "n")
        max_tokens = max_tokens_default if params.max_tokens is None else params.max_tokens
        if max_tokens == 0 and not params.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 without echo", "max_tokens")
        seed = random.randrange(*protocol.SEED_RANGE) if params.seed is None else params.seed
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(
            id=protocol.completion_id(),
            prompts=prompts,
            n=params.n,
            max_tokens=max_tokens,
            sampling=dict(
                temperature=params.temperature,
                top_k=min(max(params.top_k or 0, 0), tokenizer.vocab_size),
                top_p=params.top_p,
                min_p=params.min_p,
            ),
            stops=params.stops(),
            seed=seed,
            logprobs=params.logprobs,
            echo=params.echo,
            notify=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        try:
            scheduler.submit(job)
        except QueueFull:
            raise OpenAIError(
                503,
                "the server's queue is full; retry later",
                code="queue_full",
                headers=retry_after(),
            ) from None
        answer = Answer(job, params, model_name, tokenizer)
        if params.stream:
            return StreamingResponse(
                stream(scheduler, job, events, answer), media_type="text/event-stream"
            )
        try:
            while (event := await events.get())[0] == "piece":
                answer.add(event[1])
        except asyncio.CancelledError:  # the client went away before the answer was ready
            scheduler.cancel(job)
            raise
        if event[0] == "error":
            raise OpenAIError(500, event[1])
        scheduler.metrics.requests.labels("done").inc()
        return answer.whole()

    return app


def retry_after() -> dict:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


async def stream(scheduler: Scheduler, job: Job, events: asyncio.Queue, answer: Answer):
    """Server-sent events: a chunk per piece of text, the usage if asked, then [DONE]. A
    client that goes away cancels its job, freeing its slots."""
    finished = False
    try:
        while True:
            event = await events.get()
            if event[0] == "piece":
                yield sse(answer.chunk(event[1]))
            elif event[0] == "error":
                yield sse(OpenAIError(500, event[1]).body())
                break
            else:
                if answer.include_usage:
                    yield sse(answer.usage_chunk())
                yield "data: [DONE]\n\n"
                scheduler.metrics.requests.labels("done").inc()
                finished = True
                break
    finally:
        if not finished:
            scheduler.cancel(job)
            scheduler.metrics.requests.labels("cancelled").inc()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class Answer:
    """A job's pieces gathered into OpenAI's objects: whole, or chunk by chunk."""

    def __init__(self, job: Job, params: protocol.CompletionRequest, model: str, tokenizer):
        self.job, self.params, self.model, self.tokenizer = job, params, model, tokenizer
        self.include_usage = bool(params.stream_options and params.stream_options.include_usage)
        self.created = int(time.time())
        self.texts = {row.index: "" for row in job.rows}
        self.logprobs = {row.index: empty_logprobs() for row in job.rows}
        self.finish = {}
        self.echoed = set()

    def prompt_of(self, index: int) -> Prompt:
        return self.job.prompts[index // self.job.n]

    def add(self, piece: Piece) -> tuple[str, dict | None]:
        """Record a piece; (its text, its logprobs) as the client sees them, the echoed
        prompt in front of the first piece of each choice. Text offsets count from the start
        of the choice's text."""
        scored = self.params.logprobs is not None
        parts = []  # (text, logprobs) in order
        if self.params.echo and piece.index not in self.echoed:
            self.echoed.add(piece.index)
            prompt = self.prompt_of(piece.index)
            parts.append((prompt.text, self.prompt_logprobs(prompt) if scored else None))
        entries = self.entries(piece.token_ids, piece.logprobs, piece.top) if scored else None
        parts.append((piece.text, entries))
        text, logprobs = "", empty_logprobs() if scored else None
        for part_text, part in parts:
            if scored:
                at = len(self.texts[piece.index]) + len(text)
                part = dict(part, text_offset=[at + o for o in part["text_offset"]])
                logprobs = {key: logprobs[key] + part[key] for key in logprobs}
            text += part_text
        if scored:
            whole = self.logprobs[piece.index]
            self.logprobs[piece.index] = {key: whole[key] + logprobs[key] for key in whole}
        self.texts[piece.index] += text
        if piece.finish_reason:
            self.finish[piece.index] = piece.finish_reason
        return text, logprobs

    def entries(self, ids, lps, top) -> dict:
        """OpenAI's logprobs object for these tokens; text offsets from 0."""
        count = self.params.logprobs
        strings = [self.tokenizer.decode([i]) for i in ids]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": strings,
            "token_logprobs": list(lps),
            "top_logprobs": [
                {self.tokenizer.decode([i]): lp for i, lp in alternatives[:count]}
                for alternatives in top
            ],
            "text_offset": offsets,
        }

    def prompt_logprobs(self, prompt: Prompt) -> dict:
        """The echoed prompt's tokens scored by the model (the first has no context)."""
        chosen, top_ids, top_lps = prompt.scores
        entries = self.entries(
            prompt.tokens,
            chosen,
            [list(zip(i, p, strict=True)) for i, p in zip(top_ids, top_lps, strict=True)],
        )
        entries["token_logprobs"][0], entries["top_logprobs"][0] = None, None
        return entries

    def chunk(self, piece: Piece) -> dict:
        text, logprobs = self.add(piece)
        choice = protocol.choice(piece.index, text, piece.finish_reason, logprobs)
        return protocol.completion(
            self.job.id, self.model, self.job.seed, [choice], None, self.created
        )

    def counts(self) -> dict:
        prompt_tokens = sum(p.given_tokens for p in self.job.prompts)
        return protocol.usage(prompt_tokens, sum(len(r.tokens) for r in self.job.rows))

    def usage_chunk(self) -> dict:
        return protocol.completion(
            self.job.id, self.model, self.job.seed, [], self.counts(), self.created
        )

    def whole(self) -> dict:
        scored = self.params.logprobs is not None
        choices = [
            protocol.choice(
                index,
                self.texts[index],
                self.finish[index],
                self.logprobs[index] if scored else None,
            )
            for index in sorted(self.texts)
        ]
        return protocol.completion(
            self.job.id, self.model, self.job.seed, choices, self.counts(), self.created
        )


def empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def prompt_list(prompt) -> list:
    """OpenAI's four prompt shapes as a list of prompts (strings or token lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", "prompt")
    return list(prompt)


def read_prompt(prompt, tokenizer, block_size: int, scored_echo: bool) -> Prompt:
    """Token ids of one prompt, cropped to block_size as sample.py crops; a 400 if unusable."""
    if isinstance(prompt, str):
        try:
            tokens = tokenizer.encode(prompt) if prompt else []
        except Exception as e:  # a character outside a char model's vocabulary
            raise OpenAIError(400, f"prompt: {e}", "prompt") from None
        text = prompt
    else:
        tokens = list(prompt)
        if any(t < 0 or t >= tokenizer.vocab_size for t in tokens):
            raise OpenAIError(
                400, f"prompt token ids must lie in [0, {tokenizer.vocab_size})", "prompt"
            )
        text = tokenizer.decode(tokens)
    if not tokens:
        if tokenizer.eot_id is None:
            raise OpenAIError(400, "prompt is empty and this model has no start token", "prompt")
        tokens = [tokenizer.eot_id]  # GPT-2 begins a document after its end-of-text token
    if len(tokens) > block_size and scored_echo:
        raise OpenAIError(
            400,
            f"prompt has {len(tokens)} tokens, more than block_size={block_size}: with echo and "
            "logprobs they cannot all be scored by the model",
            "prompt",
        )
    return Prompt(tokens=tokens[-block_size:], text=text, given_tokens=len(tokens))
