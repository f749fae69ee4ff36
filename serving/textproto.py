"""A reader for the protobuf text format of TensorFlow Serving's batching and monitoring configs.

TensorFlow Serving reads `--batching_parameters_file` (BatchingParameters)
and `--monitoring_config_file` (MonitoringConfig) as text protos, but those
messages do not ship in the tensorflow-serving-api wheel. This reads the
same text, field names checked against the documented schema:

    max_batch_size { value: 16 }          # a wrapper message (google.protobuf.Int64Value)
    pad_variable_length_inputs: true
    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }
"""

from __future__ import annotations

import ast
import re
from typing import Any

_TOKEN = re.compile(r'\s*(?:#[^\n]*|(?P<string>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|(?P<punct>[{}:;,\[\]])'
                    r'|(?P<word>[A-Za-z0-9_.+-]+))')


class TextProtoError(ValueError):
    pass


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            if text[position:].strip() == "":
                break
            raise TextProtoError(f"unexpected {text[position:position + 20]!r} at character {position}")
        position = match.end()
        token = match["string"] or match["punct"] or match["word"]
        if token:
            tokens.append(token)
    return tokens


def _value(token: str) -> Any:
    if token[0] in "\"'":
        return ast.literal_eval(token)  # the quotes and escapes of Python and text protos agree
    if token in ("true", "True"):
        return True
    if token in ("false", "False"):
        return False
    try:
        return int(token)
    except ValueError:
        try:
            return float(token)
        except ValueError:
            return token  # an enum name


def parse(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Parses `text` into a dict; `schema` maps field names to a type or a nested schema.

    A field named twice becomes a list (repeated fields). Unknown fields raise
    `TextProtoError` naming them.
    """
    result, _ = _message(_tokens(text), 0, schema, top=True)
    return result


def _message(tokens: list[str], i: int, schema: dict[str, Any], top: bool = False) -> tuple[dict, int]:
    out: dict[str, Any] = {}
    while i < len(tokens):
        token = tokens[i]
        if token == "}":
            if top:
                raise TextProtoError("unbalanced '}'")
            return out, i + 1
        if token in (",", ";"):
            i += 1
            continue
        if token not in schema:
            raise TextProtoError(f"unknown field {token!r} (known: {', '.join(sorted(schema))})")
        kind = schema[token]
        i += 1
        if i < len(tokens) and tokens[i] == ":":
            i += 1
        if i >= len(tokens):
            raise TextProtoError(f"field {token!r} has no value")
        if isinstance(kind, dict):
            if tokens[i] != "{":
                raise TextProtoError(f"field {token!r} expects {{ ... }}")
            value, i = _message(tokens, i + 1, kind)
        else:
            if tokens[i] in "{}[]":
                raise TextProtoError(f"field {token!r} expects a value")
            value = _value(tokens[i])
            if kind is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TextProtoError(f"field {token!r} expects {kind.__name__}, got {tokens[i]!r}")
            i += 1
        if token in out:
            out[token] = (out[token] if isinstance(out[token], list) else [out[token]]) + [value]
        else:
            out[token] = value
    if not top:
        raise TextProtoError("missing '}'")
    return out, i
