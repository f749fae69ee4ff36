"""What an OpenAI request may ask, checked in full before it runs (`serving.server.openai_api` runs it).

`check` turns a /v1/completions or /v1/chat/completions body into a `Request`: every field typed
and in range, the fields lmstack refuses (`REFUSED`) and unknown ones answered with a 400 naming
them, a chat's messages laid out by the model's template (`serving.server.chat`), the prompts
tokenized with the export's `tokenize` signature, and max_tokens fitted to the server's limit and
the model's context. Errors are `ApiError`s, OpenAI's shape.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

import tensorflow as tf

from serving import contract as c
from serving.contract import HTTP_STATUS, ServingError
from serving.server import chat
from serving.server.core import Limits
from serving.server.versions import LoadedVersion

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256  # a stop string's length: a stream holds back that much text that could start one
MAX_N = 128  # OpenAI's limit on choices (the server's --max_request_rows bounds prompts x n too)
DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's; chat defaults to the rest of the context
SEED_RANGE = 1 << 31  # the signature's seed is int32: a request's seed is taken modulo this

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


@dataclasses.dataclass
class Request:
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


def check(kind: str, body: dict[str, Any], name: str, loaded: LoadedVersion, limits: Limits) -> Request:
    """A completions ("completions") or chat ("chat") request for a served version, checked in full and
    its prompts tokenized, before anything runs. Raises ApiError (400) naming the field at fault."""
    for key in body:
        if key in REFUSED and not _HARMLESS.get(key, lambda v: v is None)(body[key]):
            raise ApiError(400, f"'{key}' is not supported: {REFUSED[key]}", param=key,
                           code="unsupported_parameter")
        if key not in FIELDS[kind] and key not in REFUSED and key not in _INFORMATIONAL:
            raise ApiError(400, f"Unrecognized request argument supplied: {str(key)[:100]}", param=str(key)[:100],
                           code="unrecognized_argument")
    if c.TOKENIZE not in loaded.signatures:
        raise ApiError(400, f"model '{name}' version {loaded.version} was exported before lmstack's OpenAI API "
                            "(it has no tokenize signature): export it again", param="model",
                       code="model_too_old")
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
    prompts, template_stops, echo, max_tokens, param = _prompts_of(kind, body, loaded, limits)
    logprobs = _logprobs_asked(kind, body, stream, name, loaded)
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
    seed = secrets.randbelow(SEED_RANGE) if seed is None else seed % SEED_RANGE
    ids = tokenize(loaded, prompts, limits)
    counts = [len(row) for row in ids]
    max_tokens = _fitted(max_tokens, param, max(counts), "messages" if kind == "chat" else "prompt", loaded.context,
                         limits)
    return Request(kind, body["model"], loaded, name, prompts, counts, ids, max_tokens, n,
                    {c.TEMPERATURE: temperature, c.TOP_K: max(0, top_k), c.TOP_P: top_p},
                    {k: v for k, v in penalties.items() if v}, seed,
                    stops + template_stops, echo, stream, bool(options.get("include_usage")), logprobs)


def tokenize(loaded: LoadedVersion, prompts: list[str], limits: Limits) -> list[list[int]]:
    """Each prompt's tokens as a generation reads it (an empty one is [EOS] alone)."""
    text_bytes = sum(len(p.encode("utf-8")) for p in prompts)
    if text_bytes > limits.max_text_bytes:
        raise ApiError(400, f"the prompt holds {text_bytes} bytes; this server takes at most "
                            f"{limits.max_text_bytes} (--max_text_bytes)", param="prompt")
    out = loaded.signatures[c.TOKENIZE](**{c.TEXT: tf.constant(prompts, tf.string)})
    ids, counts = out[c.TOKEN_IDS].numpy(), out[c.NUM_TOKENS].numpy()
    eos = ((loaded.info.get("tokenizer") or {}).get("special_ids") or {}).get("eos", -1)
    return [ids[i, :n].tolist() if n else [eos] for i, n in enumerate(counts)]


def _prompts_of(kind: str, body: dict[str, Any], loaded: LoadedVersion, limits: Limits):
    """(prompts, the template's stop strings, echo, max_tokens or None, the field max_tokens came from)."""
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
    return prompts, template_stops, echo, max_tokens, param


def _logprobs_asked(kind: str, body: dict[str, Any], stream: bool, name: str, loaded: LoadedVersion) -> int | None:
    """The alternatives to show at each token (0: the chosen token's alone), or None for no logprobs."""
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
    return logprobs


def _fitted(max_tokens: int | None, param: str, longest: int, what: str, context: int | None,
            limits: Limits) -> int:
    """max_tokens checked against the server's limit and the context (None: what they leave)."""
    if max_tokens is None:  # chat: the rest of the context, within the server's limit
        max_tokens = limits.max_new_tokens if context is None else min(limits.max_new_tokens, context - longest)
    if max_tokens < 0:
        raise ApiError(400, f"'{param}' must not be negative", param=param)
    if max_tokens > limits.max_new_tokens:
        raise ApiError(400, f"'{param}' is {max_tokens}; this server makes at most {limits.max_new_tokens} "
                            "tokens a request (--max_new_tokens_limit)", param=param)
    if context is not None and longest + max_tokens > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in the "
                            f"completion). Ask for at most {max(0, context - longest)} new tokens"
                            + (f", or shorten the prompt to {context - max_tokens} tokens." if max_tokens < context
                               else "."), param=param, code="context_length_exceeded")
    return max_tokens


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


def read_json(environ, limit: int) -> dict[str, Any]:
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
