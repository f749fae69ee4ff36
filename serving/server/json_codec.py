"""TensorFlow Serving's JSON for tensors: request bodies to numpy arrays, outputs back to JSON.

As TensorFlow Serving's REST API (`util/json_tensor.cc`) reads and writes them:

- a tensor is a value or nested lists of one kind: numbers, booleans, strings,
  or {"b64": "..."} objects for bytes; lists at one depth have one length;
- requests are columnar ({"inputs": {name: tensor}} or a bare tensor for a
  one-input signature) or rows ({"instances": [{name: value}, ...]} or a
  list of values), and the response uses the same format ("outputs" or
  "predictions");
- an output whose name ends in `_bytes` is written as {"b64": ...}; other
  strings as UTF-8 text.

Anything else answers INVALID_ARGUMENT naming the input; nothing here raises
another exception on a client's body.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from serving.contract import ServingError

MAX_DEPTH = 32  # nesting of a tensor's lists (TensorFlow's own rank limit is 254)


def parse_body(data: bytes) -> dict:
    """A request body as a JSON object."""
    try:
        body = json.loads(data or b"{}")
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser takes
        raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(body, dict):
        raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
    return body


def signature_name(body: dict) -> str:
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
    return name


def to_array(key: str, value: Any, max_elements: int) -> np.ndarray:
    """One JSON tensor -> a numpy array (object array of bytes for strings)."""
    shape: list[int] = []
    leaves: list[Any] = []
    rank: list[int] = []  # the depth of the first value: every value must sit at it

    def walk(v, depth):
        if isinstance(v, list):
            if depth >= MAX_DEPTH:
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} nests lists deeper than {MAX_DEPTH}")
            if rank and depth >= rank[0]:
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} mixes values and lists at depth {depth}")
            if depth == len(shape):
                shape.append(len(v))
            elif shape[depth] != len(v):
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} is ragged: lists at depth {depth} have "
                                                       f"lengths {shape[depth]} and {len(v)}")
            for x in v:
                walk(x, depth + 1)
            return
        if not rank:
            rank.append(depth)
        if depth != rank[0] or depth != len(shape):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} mixes values and lists at depth {depth}")
        if len(leaves) >= max_elements:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} has more than {max_elements} elements "
                                                   f"(--max_tensor_elements)")
        leaves.append(_leaf(key, v))

    walk(value, 0)
    kinds = {type(x) for x in leaves}
    if bytes in kinds and len(kinds) > 1:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} mixes strings and numbers")
    if bytes in kinds:
        array = np.empty(len(leaves), dtype=object)
        array[:] = leaves
        return array.reshape(shape)
    if float in kinds:
        return np.array(leaves, dtype=np.float64).reshape(shape)
    if int in kinds:
        try:
            return np.array(leaves, dtype=np.int64).reshape(shape)
        except OverflowError:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} holds an integer outside int64") from None
    return np.array(leaves, dtype=bool).reshape(shape)


def _leaf(key: str, v: Any):
    if isinstance(v, str):
        return v.encode("utf-8", errors="surrogatepass")
    if isinstance(v, dict):
        if set(v) != {"b64"} or not isinstance(v["b64"], str):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r}: objects in a tensor must be {{\"b64\": \"...\"}}")
        try:
            return base64.b64decode(v["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r}: {{\"b64\": ...}} is not valid base64") from None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v
    raise ServingError("INVALID_ARGUMENT", f"input {key!r}: null is not a tensor value")


def request_inputs(body: dict, only_input, max_elements: int) -> tuple[dict[str, np.ndarray], bool, int | None]:
    """A :predict body's inputs -> ({name: array}, row format?, rows of the row format).

    `only_input()` names the signature's single input, for bodies that give a bare tensor.
    """
    if ("instances" in body) == ("inputs" in body):
        raise ServingError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key" if "instances" not in body
                           else "Only one of 'inputs' or 'instances' may be given")
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict) or (inputs and set(inputs) == {"b64"}):
            inputs = {only_input(): inputs}
        return {str(k): to_array(str(k), v, max_elements) for k, v in inputs.items()}, False, None
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
    named = [isinstance(r, dict) and set(r) != {"b64"} for r in rows]
    if any(named):
        if not all(named):
            raise ServingError("INVALID_ARGUMENT", "every instance must be a JSON object naming the inputs")
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise ServingError("INVALID_ARGUMENT", "every instance must name the same inputs")
        columns = {k: [r[k] for r in rows] for k in keys}
    else:
        columns = {only_input(): rows}
    return {str(k): to_array(str(k), v, max_elements) for k, v in columns.items()}, True, len(rows)


def json_value(name: str, array: np.ndarray):
    """An output as JSON: strings as text, or {"b64": ...} for outputs named *_bytes."""
    if array.dtype.kind in ("O", "S"):
        if name.endswith("_bytes"):
            encode = lambda b: {"b64": base64.b64encode(b).decode("ascii")}
        else:
            encode = lambda b: b.decode("utf-8", errors="replace") if isinstance(b, bytes) else b
        flat = [encode(b) for b in array.flat]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(array.shape).tolist()
    return array.tolist()


def response_body(outputs: dict[str, np.ndarray], rows_format: bool, rows: int | None) -> dict:
    values = {k: json_value(k, v) for k, v in outputs.items()}
    if not rows_format:
        return {"outputs": values if len(values) > 1 else next(iter(values.values()))}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    return {"predictions": [{k: v[i] for k, v in values.items()} for i in range(rows)]}


def _feature(name: str, value):
    """A JSON feature value (a value or a list; {"b64": ...} for bytes) -> a tf.train.Feature."""
    import tensorflow as tf

    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, str) or isinstance(v, dict) for v in values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_leaf(name, v) for v in values]))
    if all(isinstance(v, (int, bool)) for v in values):
        try:
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        except ValueError:
            raise ServingError("INVALID_ARGUMENT", f"feature {name!r} holds an integer outside int64") from None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
    raise ServingError("INVALID_ARGUMENT", f"feature {name!r}: expected strings, numbers or lists of one type")


def classify_examples(body: dict) -> list[bytes]:
    """A :classify body ("examples", optional "context") -> serialized tf.Examples."""
    import tensorflow as tf

    rows, context = body.get("examples"), body.get("context", {})
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ServingError("INVALID_ARGUMENT", "'examples' must be a non-empty list of JSON objects")
    if not isinstance(context, dict):
        raise ServingError("INVALID_ARGUMENT", "'context' must be a JSON object")
    examples = []
    for row in rows:
        shared = sorted(set(row) & set(context))
        if shared:
            raise ServingError("INVALID_ARGUMENT", f"features {shared[:5]} appear in both the context and an example")
        features = {str(k): _feature(str(k), v) for k, v in {**context, **row}.items()}
        examples.append(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return examples


def classify_body(classes, scores) -> dict:
    """{"result": [[[label, score], ...], ...]} as TensorFlow Serving answers :classify."""
    count = len(scores if scores is not None else classes)
    width = len(scores[0] if scores is not None else classes[0]) if count else 0
    return {"result": [[[classes[i][j].decode("utf-8", errors="replace") if classes is not None else str(j),
                         float(scores[i][j]) if scores is not None else 0.0] for j in range(width)]
                       for i in range(count)]}
