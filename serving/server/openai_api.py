"""The OpenAI-compatible API (`lmstack serve --openai_api_port`), beside TensorFlow Serving's.

    GET  /v1/models                  every served model (its TF Serving name)
    GET  /v1/models/{model}          one ("name", "name:VERSION" or "name:LABEL")
    POST /v1/completions             text completions
    POST /v1/chat/completions        chat, through the model's chat template (`serving.server.chat`)

The official `openai` client, LangChain, LlamaIndex and the eval harnesses that speak this API
talk to the same loaded versions, limits, metrics and generation scheduler as TF Serving's
clients: each choice is one generation of the `generate` signature (its sampling rule, its seed),
so a completion's text is the text `lmstack generate` and the Predict API give for the same
settings, and OpenAI's requests share decoding steps with TF Serving's.

What a request may ask (OpenAI's names; `openai_request.FIELDS` lists them and `REFUSED` what lmstack
refuses; `openai_request.check` checks a request in full before it runs):
`prompt` (a string or a list of them), `messages`, `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `top_k` (an extension, as vLLM's), `n`, `seed`, `stop` (a string or up
to 4), `echo`, `stream` with `stream_options.include_usage`, and `logprobs` (with `top_logprobs`
for chat) on whole answers, from the `token_logprobs` signature. Stop strings are matched on the
decoded text, so a stop that spans tokens works; the text returned ends before it, and held-back
text that could start a stop is sent only once it cannot. `usage` counts the model's tokens: the
prompt's as the model reads it (an empty prompt is [EOS] alone), and every token generated up to
the end or the stop.

Errors answer OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with its status
codes: an unknown model 404, a request the model cannot hold (the prompt and max_tokens past the
context) 400 naming the largest allowed, a field lmstack does not support 400 naming it (never
silently ignored), a request over the server's limits 400 (413 for the body), a full generation
queue 429, shutting down 503. With `--openai_api_keys_file`, every request needs
`Authorization: Bearer KEY` with a key of the file (re-read when it changes), else 401.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import threading
import time
import uuid
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from serving import contract as c
from serving.contract import ServingError
from serving.server import openai_request
from serving.server.core import ModelServer, internal_error
from serving.server.deadlines import Call
from serving.server.openai_request import SEED_RANGE, ApiError, Request, read_json
from serving.server.rest_api import respond
from serving.server.versions import LoadedVersion, log


class Keys:
    """The API keys of `--openai_api_keys_file` (one a line; blank lines and #-comments skipped),
    re-read when the file changes. A file that cannot be read later keeps the keys it had."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple | None = None
        self._keys: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        self._read()  # OSError at start: the server does not start

    def _read(self) -> None:
        stat = os.stat(self.path)
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        with open(self.path, encoding="utf-8") as f:
            keys = tuple(line.strip().encode() for line in f if line.strip() and not line.lstrip().startswith("#"))
        self._keys, self._stamp = keys, stamp

    def allows(self, header: str | None) -> bool:
        with self._lock:
            try:
                self._read()
            except (OSError, UnicodeDecodeError) as e:
                log.error("--openai_api_keys_file %s cannot be read (%s): keeping its last keys", self.path, e)
        if not header or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer "):].strip().encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)


class OpenAiApi:
    """The WSGI application of the OpenAI-compatible routes (see the module docstring).

    Args:
        core: the server's models (shared with the TF Serving APIs).
        timeout: seconds a request may run (None: no limit): --rest_api_timeout_in_ms.
        keys: the API keys, or None for an open API.
    """

    def __init__(self, core: ModelServer, timeout: float | None = 30.0, keys: Keys | None = None):
        self.core, self.timeout, self.keys = core, timeout, keys

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self.core.track():
            try:
                if self.keys is not None and not self.keys.allows(environ.get("HTTP_AUTHORIZATION")):
                    raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with a key "
                                        "of the server's --openai_api_keys_file", code="invalid_api_key")
                answer = self._answer(method, path.rstrip("/"), environ)
                if isinstance(answer, dict):
                    return respond(start_response, 200, answer)
                start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
                return answer
            except ApiError as e:
                return respond(start_response, e.status, e.body())
            except ServingError as e:
                error = ApiError.of(e)
                return respond(start_response, error.status, error.body())
            except Exception as e:  # a bug must not drop the connection or print a traceback
                return respond(start_response, 500, ApiError(500, internal_error(f"{method} {path[:200]}", e)).body())

    def _answer(self, method: str, path: str, environ):
        if path == "/v1/models" and method == "GET":
            return {"object": "list", "data": [self._model_card(name) for name in sorted(self.core.models)]}
        if path.startswith("/v1/models/") and method == "GET":
            model = path[len("/v1/models/"):]
            self._resolve(model)
            return self._model_card(model)
        kind = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(path)
        if kind is None or method != "POST":
            raise ApiError(404, f"Unknown route: {method} {path[:200]} (this server answers GET /v1/models, "
                                "POST /v1/completions and POST /v1/chat/completions)", code="unknown_url")
        body = read_json(environ, self.core.limits.max_request_bytes)
        api = "chat.completions" if kind == "chat" else "completions"
        with self.core.counted(str(body.get("model", ""))[:200].split(":")[0], api, "REST"):
            name, loaded = self._resolve(body.get("model"))
            request = openai_request.check(kind, body, name, loaded, self.core.limits)
            disconnected = environ.get("waitress.client_disconnected")
            call = Call(self.timeout, is_active=(lambda: not disconnected()) if disconnected else None)
            if request.stream:
                return self._events(request, self._start(request, call), call)
            return self._whole(request, self._choices(request, call))

    # -- models ----------------------------------------------------------------

    def _resolve(self, model: Any) -> tuple[str, LoadedVersion]:
        """The served version a model id names: "name", "name:VERSION" or "name:LABEL"."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must name a model ('model': one of GET /v1/models)", param="model")
        name, _, pick = model.partition(":") if model not in self.core.models else (model, "", "")
        if name not in self.core.models:
            raise ApiError(404, f"The model '{model[:200]}' does not exist (this server has: "
                                f"{', '.join(sorted(self.core.models))})", param="model", code="model_not_found")
        version = int(pick) if pick.isascii() and pick.isdigit() else None
        try:
            return name, self.core.model(name).get(version, pick if pick and version is None else None)
        except ServingError as e:
            raise ApiError(404, f"The model '{model[:200]}' does not exist: {e.message}", param="model",
                           code="model_not_found") from None

    def _model_card(self, model: str) -> dict[str, Any]:
        name, loaded = self._resolve(model)
        card = {"id": model, "object": "model", "created": _created(loaded), "owned_by": "lmstack"}
        if loaded.context is not None:
            card["max_model_len"] = loaded.context  # vLLM's field: the context, prompt and completion together
        return card

    # -- a request, checked ------------------------------------------------------

    # -- running ---------------------------------------------------------------

    def _start(self, request: Request, call: Call) -> list[_Choice]:
        """Every choice queued (with a scheduler, they run from now), each as one generation; a
        request the server cannot take fails here, before an answer starts."""
        runs: list[_Choice] = []
        try:
            for p, prompt in enumerate(request.prompts):
                for j in range(request.n):
                    inputs = {c.PROMPT: prompt, c.MAX_NEW_TOKENS: request.max_tokens, **request.sampling,
                              **request.penalties, c.SEED: (request.seed + j) % SEED_RANGE}
                    _, chunks = self.core.stream(request.name, request.loaded.version, inputs, None, call)
                    runs.append(_Choice(len(runs), p, chunks, request.stops))
        except BaseException:
            for run in runs:
                run.chunks.close()
            raise
        return runs

    @staticmethod
    def _pieces(runs: list[_Choice], call: Call) -> Iterator[tuple[_Choice, str | None]]:
        """(choice, new text) as the choices make it, then (choice, None) once each is done. One
        choice is read in this thread; several each on a thread of their own, so none waits for
        another."""
        if len(runs) == 1:
            for piece in runs[0].pieces():
                yield runs[0], piece
            yield runs[0], None
            return
        events: queue.Queue = queue.Queue()
        for run in runs:
            threading.Thread(target=run.drain, args=(events,), name="openai-choice", daemon=True).start()
        left = len(runs)
        while left:
            try:
                run, piece, error = events.get(timeout=0.1)
            except queue.Empty:
                call.check()
                continue
            if error is not None:
                raise error
            left -= piece is None
            yield run, piece

    def _choices(self, request: Request, call: Call) -> list[tuple[str, list[int], str]]:
        """Every choice's (text, tokens made, finish_reason), for an answer sent whole.

        Without stop strings, on a version with a step scheduler, one request of a row per choice:
        what a TF Serving client's Predict request on `generate` costs. With them (or on the
        call-by-call path), each choice is read as it grows, and stops where a stop string appears.
        """
        scheduler = request.loaded.scheduler
        if request.stops or scheduler is None:
            runs = self._start(request, call)
            texts: dict[int, list[str]] = {run.index: [] for run in runs}
            try:
                for run, piece in self._pieces(runs, call):
                    texts[run.index].append(piece or "")
            finally:
                call.gone.set()  # every choice's generation stops (a failed one takes the rest with it)
            return [("".join(texts[run.index]), run.token_ids, run.finish_reason) for run in runs]
        rows = [(p, j) for p in range(len(request.prompts)) for j in range(request.n)]
        inputs = {c.PROMPT: np.array([request.prompts[p].encode("utf-8") for p, _ in rows], object),
                  c.MAX_NEW_TOKENS: np.full([len(rows)], request.max_tokens, np.int32),
                  **{k: np.full([len(rows)], v) for k, v in request.sampling.items()},
                  c.SEED: np.array([(request.seed + j) % SEED_RANGE for _, j in rows], np.int32)}
        arrays = self.core.validate(request.loaded, c.GENERATE, inputs)
        arrays.update({k: np.full([len(rows)], v, np.float32) for k, v in request.penalties.items()})
        done = scheduler.run(arrays, call).rows
        texts = scheduler.texts([row.tokens for row in done])
        width = max((len(row.tokens) for row in done), default=0)
        self.core.request_logs.predict(request.name, request.loaded.version, c.GENERATE, arrays, {
            c.COMPLETION: np.array([t.encode("utf-8") for t in texts], object),
            c.TOKEN_IDS: np.array([row.tokens + [0] * (width - len(row.tokens)) for row in done], np.int32)})
        return [(text, row.tokens, "stop" if row.stopped else "length") for text, row in zip(texts, done)]

    def _whole(self, request: Request, answers: list[tuple[str, list[int], str]]) -> dict[str, Any]:
        logprobs = self._logprobs(request, answers) if request.logprobs is not None else [None] * len(answers)
        choices = []
        for index, (text, _, finish_reason) in enumerate(answers):
            if request.echo:
                text = request.prompts[index // request.n] + text
            if request.kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs[index], "finish_reason": finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs[index],
                                "finish_reason": finish_reason})
        return {"id": _id(request.kind), "object": "chat.completion" if request.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": request.model, "choices": choices,
                "usage": _usage(request, sum(len(ids) for _, ids, _ in answers))}

    def _logprobs(self, request: Request, answers: list[tuple[str, list[int], str]]) -> list[dict[str, Any]]:
        """Each choice's `logprobs` object in OpenAI's shape, from the token_logprobs signature: one
        forward pass over every choice's prompt and new tokens. A choice cut at a stop string shows
        the tokens of the text it returns."""
        sequences = []
        for index, (text, ids, _) in enumerate(answers):
            prompt = request.prompt_ids[index // request.n]
            shown = _tokens_within(self._token_texts(request.loaded, ids), len(text))
            sequences.append((prompt, ids[:shown]))
        rows = [prompt + new for prompt, new in sequences]
        padded = np.zeros([len(rows), max(map(len, rows))], np.int32)
        for i, row in enumerate(rows):
            padded[i, :len(row)] = row
        out = request.loaded.signatures[c.TOKEN_LOGPROBS](**{
            c.TOKEN_IDS: tf.constant(padded), c.NUM_TOKENS: tf.constant([len(r) for r in rows], tf.int32)})
        chosen, top_ids, top = (out[k].numpy() for k in (c.LOGPROBS, c.TOP_TOKEN_IDS, c.TOP_LOGPROBS_OUTPUT))
        k = request.logprobs
        vocabulary = sorted({int(t) for t in top_ids[..., :k].flat} | {t for row in rows for t in row})
        texts = dict(zip(vocabulary, self._token_texts(request.loaded, vocabulary, raw=True)))
        results = []
        for i, (prompt, _) in enumerate(sequences):
            first = 0 if request.echo else len(prompt)  # echoed prompts show their tokens too
            if request.echo and request.prompts[i // request.n] == "":
                first = 1  # the [EOS] an empty prompt is read as is not text of the answer
            positions = range(first, len(rows[i]))
            entries = [(texts[rows[i][t]], None if t == 0 else float(chosen[i, t]),
                        [] if t == 0 else [(texts[int(top_ids[i, t, j])], float(top[i, t, j])) for j in range(k)])
                       for t in positions]
            results.append(_chat_logprobs(entries) if request.kind == "chat" else _completion_logprobs(entries))
        return results

    @staticmethod
    def _token_texts(loaded: LoadedVersion, ids: list[int], raw: bool = False) -> list:
        """Each token alone as text (or bytes, `raw`), as the detokenize signature makes it."""
        if not ids:
            return []
        out = loaded.signatures[c.DETOKENIZE](**{c.TOKEN_IDS: tf.constant(np.array(ids, np.int32)[:, None]),
                                                 c.NUM_TOKENS: tf.ones([len(ids)], tf.int32)})
        pieces = list(out[c.TEXT].numpy())
        return pieces if raw else [p.decode("utf-8", errors="replace") for p in pieces]

    def _events(self, request: Request, runs: list[_Choice], call: Call) -> Iterator[bytes]:
        """The SSE stream: one chunk object per piece of text, each choice's last with its
        finish_reason, the usage chunk if asked, then `data: [DONE]`."""
        chat_kind = request.kind == "chat"
        head = {"id": _id(request.kind), "object": "chat.completion.chunk" if chat_kind else "text_completion",
                "created": int(time.time()), "model": request.model}
        usage = {"usage": None} if request.include_usage else {}

        def chunk(run: _Choice, text: str, finish: str | None = None, first: bool = False) -> bytes:
            if chat_kind:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": run.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": run.index, "text": text, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **usage})

        with self.core.track():
            try:
                for run in runs:
                    opening = request.prompts[run.prompt] if request.echo else ""
                    if chat_kind or opening:
                        yield chunk(run, opening, first=True)
                for run, piece in self._pieces(runs, call):
                    yield chunk(run, "", run.finish_reason) if piece is None else chunk(run, piece)
                if request.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(request, sum(run.tokens for run in runs))})
                yield b"data: [DONE]\n\n"
            except ServingError as e:
                yield _sse(ApiError.of(e).body())
            except Exception as e:  # one log line and an error event, not a traceback
                yield _sse(ApiError(500, internal_error("openai stream", e)).body())
            finally:
                call.gone.set()  # a client that left (waitress closes this generator) stops every choice


class _Choice:
    """One choice: its generation's chunks, read on a thread of its own, with the stop strings
    applied to its text."""

    def __init__(self, index: int, prompt: int, chunks: Iterator[dict[str, Any]], stops: list[str]):
        self.index, self.prompt, self.chunks, self.stops = index, prompt, chunks, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # text that may yet start a stop
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def pieces(self) -> Iterator[str]:
        """The choice's new text as it comes; `finish_reason` is set once it ends. Raises the
        generation's ServingError."""
        text, sent = "", 0
        try:
            for chunk in self.chunks:
                if "completion" in chunk:
                    self.finish_reason = "stop" if chunk["finished"] else "length"
                    break
                self.token_ids += [int(t) for t in chunk["token_ids"]]
                text += chunk["text"]
                cut = _first_stop(text, self.stops, max(0, sent - self.hold))
                if cut is not None:
                    text, self.finish_reason = text[:cut], "stop"
                    break
                ready = len(text) - self.hold if self.stops else len(text)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
        finally:
            self.chunks.close()  # a stop met or the reader gone: the generation leaves its slot at the next step
        if len(text) > sent:
            yield text[sent:]
        self.finish_reason = self.finish_reason or "length"

    def drain(self, events: queue.Queue) -> None:
        """Puts (self, new text, None) as text comes, then (self, None, None); (self, None, error) on failure."""
        try:
            for piece in self.pieces():
                events.put((self, piece, None))
        except ServingError as e:
            events.put((self, None, e))
            return
        except Exception as e:
            events.put((self, None, ServingError("INTERNAL", internal_error("openai choice", e))))
            return
        events.put((self, None, None))


def _tokens_within(pieces: list[str], length: int) -> int:
    """How many of the tokens (their texts, in order) lie within the first `length` characters."""
    total = 0
    for i, piece in enumerate(pieces):
        total += len(piece)
        if total > length:
            return i
    return len(pieces)


def _completion_logprobs(entries: list[tuple[bytes, float | None, list[tuple[bytes, float]]]]) -> dict[str, Any]:
    """/v1/completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset (into the choice's text)."""
    tokens = [t.decode("utf-8", errors="replace") for t, _, _ in entries]
    offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist() if tokens else []
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {t.decode("utf-8", errors="replace"): v for t, v in top}
                             for _, lp, top in entries],
            "text_offset": [int(o) for o in offsets]}


def _chat_logprobs(entries: list[tuple[bytes, float | None, list[tuple[bytes, float]]]]) -> dict[str, Any]:
    """/v1/chat/completions' logprobs: content, one entry a token with its bytes and alternatives."""
    item = lambda token, logprob: {"token": token.decode("utf-8", errors="replace"), "logprob": logprob,
                                   "bytes": list(token)}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in top]} for t, lp, top in entries],
            "refusal": None}


def _first_stop(text: str, stops: list[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _usage(request: Request, completion: int) -> dict[str, int]:
    prompt = sum(request.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _created(loaded: LoadedVersion) -> int:
    try:
        return int(loaded.info.get("created") or os.path.getmtime(loaded.path))
    except (OSError, ValueError, TypeError):
        return 0


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def _sse(value: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(value)}\n\n".encode("utf-8")


def framing_error(code: int, reason: str, detail: str) -> bytes:
    """waitress's own errors (bad framing, an oversized body) in OpenAI's shape."""
    kind = "invalid_request_error" if code < 500 else "server_error"
    return json.dumps({"error": {"message": f"{reason}: {detail}", "type": kind, "param": None,
                                 "code": "request_too_large" if code == 413 else None}}).encode("utf-8")

