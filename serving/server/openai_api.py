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

What a request may ask (OpenAI's names; `FIELDS` lists them and `REFUSED` what lmstack refuses):
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

import dataclasses
import hmac
import json
import os
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from serving import contract as c
from serving.contract import HTTP_STATUS, ServingError
from serving.server import chat
from serving.server.core import ModelServer, internal_error
from serving.server.deadlines import Call
from serving.server.versions import LoadedVersion

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256  # a stop string's length: a stream holds back that much text that could start one
MAX_N = 128  # OpenAI's limit on choices (the server's --max_request_rows bounds prompts x n too)
DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's; chat defaults to the rest of the context
_SEED_RANGE = 1 << 31  # the signature's seed is int32: a request's seed is taken modulo this

# Fields OpenAI takes that lmstack refuses, and why: a client that sends one is told, not ignored.
REFUSED = {
    "suffix": "lmstack models continue text; they do not fill in between a prompt and a suffix",
    "tools": "lmstack models do not call tools", "tool_choice": "lmstack models do not call tools",
    "functions": "lmstack models do not call functions", "function_call": "lmstack models do not call functions",
    "parallel_tool_calls": "lmstack models do not call tools",
    "response_format": "only {\"type\": \"text\"} is supported: lmstack does not constrain output to JSON",
    "logit_bias": "lmstack does not bias logits (send {} or leave it out)",
    "best_of": "lmstack does not rank candidates: ask for n choices instead",
    "audio": "lmstack models make text only", "modalities": "lmstack models make text only",
    "prediction": "lmstack does not take predicted outputs", "reasoning_effort": "lmstack models do not reason",
    "web_search_options": "lmstack models do not search the web",
}
# What a refused field may hold and still mean "not asked for" (OpenAI's defaults).
_HARMLESS = {"response_format": lambda v: isinstance(v, dict) and v.get("type") == "text" and len(v) == 1,
             "logit_bias": lambda v: v == {}, "best_of": lambda v: v in (None, 1),
             "tools": lambda v: v in (None, []), "parallel_tool_calls": lambda v: v is None,
             "tool_choice": lambda v: v in (None, "none"), "modalities": lambda v: v in (None, ["text"])}
# Fields taken as information only: they change nothing in the answer.
_INFORMATIONAL = {"user", "metadata", "store", "service_tier"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options",
           "presence_penalty", "frequency_penalty"}
FIELDS = {"completions": _COMMON | {"prompt", "echo", "logprobs"},
          "chat": _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}}
_ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    """A request fails with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                             503: "server_error"}.get(status, "server_error" if status >= 500
                                                       else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, error: ServingError) -> ApiError:
        return cls(HTTP_STATUS.get(error.code, 500), error.message, code=error.code.lower())


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
                from serving.server.versions import log

                log.error("--openai_api_keys_file %s cannot be read (%s): keeping its last keys", self.path, e)
        if not header or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer "):].strip().encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)


@dataclasses.dataclass
class _Request:
    """A completions or chat request, checked: what each choice generates."""
    kind: str  # "completions" or "chat"
    model: str  # as the client named it (echoed back)
    loaded: LoadedVersion
    name: str
    prompts: list[str]
    prompt_tokens: list[int]
    prompt_ids: list[list[int]]  # each prompt's tokens as the model reads them
    max_tokens: int
    n: int
    sampling: dict[str, Any]  # temperature, top_k, top_p
    penalties: dict[str, float]  # presence_penalty, frequency_penalty: those asked for (not 0)
    seed: int
    stops: list[str]
    echo: bool
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives to show at each token (0: the chosen token's alone), or None


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
                    return _respond(start_response, 200, answer)
                start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
                return answer
            except ApiError as e:
                return _respond(start_response, e.status, e.body())
            except ServingError as e:
                error = ApiError.of(e)
                return _respond(start_response, error.status, error.body())
            except Exception as e:  # a bug must not drop the connection or print a traceback
                return _respond(start_response, 500, ApiError(500, internal_error(f"{method} {path[:200]}", e)).body())

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
        body = _read_json(environ, self.core.limits.max_request_bytes)
        api = "chat.completions" if kind == "chat" else "completions"
        with self.core.counted(str(body.get("model", ""))[:200].split(":")[0], api, "REST"):
            request = self._request(kind, body)
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

    def _request(self, kind: str, body: dict[str, Any]) -> _Request:
        for key in body:
            if key in REFUSED and not _HARMLESS.get(key, lambda v: v is None)(body[key]):
                raise ApiError(400, f"'{key}' is not supported: {REFUSED[key]}", param=key,
                               code="unsupported_parameter")
            if key not in FIELDS[kind] and key not in REFUSED and key not in _INFORMATIONAL:
                raise ApiError(400, f"Unrecognized request argument supplied: {str(key)[:100]}", param=str(key)[:100],
                               code="unrecognized_argument")
        name, loaded = self._resolve(body.get("model"))
        if c.TOKENIZE not in loaded.signatures:
            raise ApiError(400, f"model '{name}' version {loaded.version} was exported before lmstack's OpenAI API "
                                "(it has no tokenize signature): export it again", param="model",
                           code="model_too_old")
        limits = self.core.limits
        stream = _get(body, "stream", bool, False)
        options = _get(body, "stream_options", dict, None)
        if options is not None and not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        options = options or {}
        if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' takes {\"include_usage\": true|false}", param="stream_options")
        stops = _get(body, "stop", (str, list), None)
        stops = [stops] if isinstance(stops, str) else (stops or [])
        if len(stops) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"'stop' is a string of 1 to {MAX_STOP_CHARS} characters or a list of up to "
                                f"{MAX_STOPS} of them", param="stop")
        template_stops: list[str] = []
        if kind == "chat":
            template = chat.ChatTemplate.from_export(loaded.info)
            messages = _messages(body.get("messages"))
            size = sum(len(m["content"].encode("utf-8")) for m in messages)
            if size > limits.max_text_bytes:  # checked again on the prompt the template makes
                raise ApiError(400, f"the messages hold {size} bytes; this server takes at most "
                                    f"{limits.max_text_bytes} (--max_text_bytes)", param="messages")
            try:
                prompts = [template.render(messages)]
            except chat.TemplateError as e:
                raise ApiError(400, str(e), param="messages") from None
            template_stops = list(template.stop)
            echo = False
            max_tokens = _get(body, "max_completion_tokens", int, None)
            if max_tokens is None:
                max_tokens = _get(body, "max_tokens", int, None)
            param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        else:
            prompts = _prompts(body.get("prompt", _MISSING))
            echo = _get(body, "echo", bool, False)
            max_tokens = _get(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
            param = "max_tokens"
        if kind == "chat":
            top = _get(body, "top_logprobs", int, None)
            logprobs = (top or 0) if _get(body, "logprobs", bool, False) else None
            if top is not None and logprobs is None:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            logprobs_param = "top_logprobs"
        else:
            logprobs, logprobs_param = _get(body, "logprobs", int, None), "logprobs"
        if logprobs is not None:
            if not 0 <= logprobs <= c.TOP_LOGPROBS:
                raise ApiError(400, f"'{logprobs_param}' is 0 to {c.TOP_LOGPROBS} here (the alternatives an lmstack "
                                    f"export gives at each token), got {logprobs}", param=logprobs_param)
            if stream:
                raise ApiError(400, "lmstack gives log-probabilities with whole answers only: drop 'stream' or "
                                    "'logprobs'", param="logprobs", code="unsupported_parameter")
            if c.TOKEN_LOGPROBS not in loaded.signatures:
                raise ApiError(400, f"model '{name}' version {loaded.version} was exported before lmstack gave "
                                    "log-probabilities (it has no token_logprobs signature): export it again",
                               param="logprobs", code="model_too_old")
        n = _get(body, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' is 1 to {MAX_N}, got {n}", param="n")
        if len(prompts) * n > limits.max_request_rows:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} generations; this server "
                                f"runs at most {limits.max_request_rows} for one request (--max_request_rows)",
                           param="n")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise ApiError(400, "'top_p' must be above 0 (1 keeps every token; for greedy send temperature 0)",
                           param="top_p")
        penalties = {c.PRESENCE_PENALTY: _number(body, "presence_penalty", 0.0, -2.0, 2.0),
                     c.FREQUENCY_PENALTY: _number(body, "frequency_penalty", 0.0, -2.0, 2.0)}
        top_k = _get(body, "top_k", int, 0)
        if top_k < -1:
            raise ApiError(400, "'top_k' is 0 or -1 (off) or a number of tokens", param="top_k")
        seed = _get(body, "seed", int, None)
        seed = secrets.randbelow(_SEED_RANGE) if seed is None else seed % _SEED_RANGE
        ids = self._tokenize(loaded, prompts)
        counts = [len(row) for row in ids]
        context = loaded.context
        if max_tokens is None:  # chat: the rest of the context, within the server's limit
            max_tokens = limits.max_new_tokens if context is None else min(limits.max_new_tokens,
                                                                           context - max(counts))
        if max_tokens < 0:
            raise ApiError(400, f"'{param}' must not be negative", param=param)
        if max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"'{param}' is {max_tokens}; this server makes at most {limits.max_new_tokens} "
                                "tokens a request (--max_new_tokens_limit)", param=param)
        if context is not None and max(counts) + max_tokens > context:
            longest, what = max(counts), "messages" if kind == "chat" else "prompt"
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the {what}"
                                f", {max_tokens} in the completion). Ask for at most {max(0, context - longest)} new "
                                "tokens" + (f", or shorten the prompt to {context - max_tokens} tokens."
                                            if max_tokens < context else "."), param=param,
                           code="context_length_exceeded")
        return _Request(kind, body["model"], loaded, name, prompts, counts, ids, max_tokens, n,
                        {c.TEMPERATURE: temperature, c.TOP_K: max(0, top_k), c.TOP_P: top_p},
                        {k: v for k, v in penalties.items() if v}, seed,
                        stops + template_stops, echo, stream, bool(options.get("include_usage")), logprobs)

    def _tokenize(self, loaded: LoadedVersion, prompts: list[str]) -> list[list[int]]:
        """Each prompt's tokens as a generation reads it (an empty one is [EOS] alone)."""
        text_bytes = sum(len(p.encode("utf-8")) for p in prompts)
        if text_bytes > self.core.limits.max_text_bytes:
            raise ApiError(400, f"the prompt holds {text_bytes} bytes; this server takes at most "
                                f"{self.core.limits.max_text_bytes} (--max_text_bytes)", param="prompt")
        out = loaded.signatures[c.TOKENIZE](**{c.TEXT: tf.constant(prompts, tf.string)})
        ids, counts = out[c.TOKEN_IDS].numpy(), out[c.NUM_TOKENS].numpy()
        eos = ((loaded.info.get("tokenizer") or {}).get("special_ids") or {}).get("eos", -1)
        return [ids[i, :n].tolist() if n else [eos] for i, n in enumerate(counts)]

    # -- running ---------------------------------------------------------------

    def _start(self, request: _Request, call: Call) -> list[_Choice]:
        """Every choice queued (with a scheduler, they run from now), each as one generation; a
        request the server cannot take fails here, before an answer starts."""
        runs: list[_Choice] = []
        try:
            for p, prompt in enumerate(request.prompts):
                for j in range(request.n):
                    inputs = {c.PROMPT: prompt, c.MAX_NEW_TOKENS: request.max_tokens, **request.sampling,
                              **request.penalties, c.SEED: (request.seed + j) % _SEED_RANGE}
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

    def _choices(self, request: _Request, call: Call) -> list[tuple[str, list[int], str]]:
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
                  c.SEED: np.array([(request.seed + j) % _SEED_RANGE for _, j in rows], np.int32)}
        arrays = self.core.validate(request.loaded, c.GENERATE, inputs)
        arrays.update({k: np.full([len(rows)], v, np.float32) for k, v in request.penalties.items()})
        done = scheduler.run(arrays, call).rows
        return [(text, row.tokens, "stop" if row.stopped else "length")
                for text, row in zip(scheduler.texts([row.tokens for row in done]), done)]

    def _whole(self, request: _Request, answers: list[tuple[str, list[int], str]]) -> dict[str, Any]:
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

    def _logprobs(self, request: _Request, answers: list[tuple[str, list[int], str]]) -> list[dict[str, Any]]:
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

    def _events(self, request: _Request, runs: list[_Choice], call: Call) -> Iterator[bytes]:
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


def _usage(request: _Request, completion: int) -> dict[str, int]:
    prompt = sum(request.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_MISSING = object()


def _get(body: dict[str, Any], key: str, kind, default):
    """A field of `kind` (a type or tuple of types; bools are not numbers), or `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        value = object()  # true is not 1
    if not isinstance(value, kinds):
        names = " or ".join({bool: "a boolean", int: "an integer", str: "a string", list: "a list",
                             dict: "an object", float: "a number"}[k] for k in kinds)
        raise ApiError(400, f"'{key}' must be {names}", param=key, code="invalid_type")
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = float(_get(body, key, (int, float), default))
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' is {low:g} to {high:g}, got {value:g}", param=key, code="invalid_value")
    return value


def _prompts(prompt) -> list[str]:
    if prompt is _MISSING:
        raise ApiError(400, "'prompt' is required: a string or a list of strings", param="prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings (lmstack takes text, not "
                            "token ids)", param="prompt")
    return prompts


def _messages(messages) -> list[dict[str, str]]:
    """The conversation as the template reads it: roles and text contents."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            why = (" (lmstack models do not call tools)" if role in ("tool", "function") else "")
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}{why}",
                           param=f"messages.[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: lmstack models read text parts only "
                                    "({\"type\": \"text\", \"text\": ...})", param=f"messages.[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages.[{i}].content")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"messages[{i}] has fields lmstack does not support: {sorted(extra)[:5]}",
                           param=f"messages.[{i}]")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _read_json(environ, limit: int) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    if length > limit:
        raise ApiError(413, f"the request body of {length} bytes is larger than the {limit} this server takes "
                            "(--max_request_bytes)", code="request_too_large")
    data = environ["wsgi.input"].read(length) if length > 0 else b""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the body is not JSON in UTF-8: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _created(loaded: LoadedVersion) -> int:
    try:
        return int(loaded.info.get("created") or os.path.getmtime(loaded.path))
    except (OSError, ValueError, TypeError):
        return 0


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def _sse(value: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(value)}\n\n".encode("utf-8")


def _respond(start_response, status: int, body: dict[str, Any]) -> list[bytes]:
    from serving.server.rest_api import _REASONS

    data = json.dumps(body).encode("utf-8")
    start_response(f"{status} {_REASONS.get(status, 'Error')}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def framing_error(code: int, reason: str, detail: str) -> bytes:
    """waitress's own errors (bad framing, an oversized body) in OpenAI's shape."""
    kind = "invalid_request_error" if code < 500 else "server_error"
    return json.dumps({"error": {"message": f"{reason}: {detail}", "type": kind, "param": None,
                                 "code": "request_too_large" if code == 413 else None}}).encode("utf-8")

