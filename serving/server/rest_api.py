"""REST: TensorFlow Serving's HTTP API over the core, served by waitress.

    POST /v1/models/NAME[/versions/N | /labels/L]:predict    ("inputs" columnar or "instances" rows)
    POST /v1/models/NAME[/versions/N | /labels/L]:classify   ("examples" + optional "context")
    POST /v1/models/NAME[/versions/N | /labels/L]:stream     (lmstack extension: server-sent events)
    GET  /v1/models/NAME[/versions/N | /labels/L]            (version status)
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   (signatures)
    GET  the --monitoring_config_file path                   (Prometheus metrics)

HTTP itself is waitress, a maintained production WSGI server: a fixed pool of
`--rest_api_num_threads` workers runs the requests, while one I/O thread reads
and writes every connection, so slow or half-sent requests hold no worker;
framing is strict (a malformed or oversized Content-Length, or a bad chunked
body, is answered 400/413/501 and the connection closed), chunked bodies are
read whole, and idle connections close after `idle_timeout` seconds. Each
request runs under `--rest_api_timeout_in_ms` (TF Serving's default 30 s),
after which its work is cancelled. Every error answers TF Serving's HTTP
status with {"error": "..."}, waitress's own included; an unexpected one is
logged on one line.
"""

from __future__ import annotations

import json
import re
import threading

from serving.contract import HTTP_STATUS, SERVING_DEFAULT, ServingError
from serving.server import json_codec
from serving.server.core import ModelServer, internal_error
from serving.server.deadlines import Call

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]{1,18})|/labels/(?P<label>[^/:]+))?"
                   r"(?P<rest>/metadata|:predict|:classify|:regress|:stream)?$")


class RestApi:
    """The WSGI application: routes a request to the core and writes TF Serving's JSON.

    Args:
        core: the server's models.
        timeout: seconds a request may run (None: no limit).
    """

    def __init__(self, core: ModelServer, timeout: float | None = 30.0):
        self.core = core
        self.timeout = timeout

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if method == "POST" and path.endswith(":stream"):
            return self._stream(path, environ, start_response)
        with self.core.track():
            try:
                status, body, content_type = self._answer(method, path, environ)
            except ServingError as e:
                status, body, content_type = HTTP_STATUS.get(e.code, 500), {"error": e.message}, "application/json"
            except Exception as e:  # a bug must not drop the connection or print a traceback
                body = {"error": internal_error(f"{method} {path[:200]}", e)}
                status, content_type = 500, "application/json"
        return respond(start_response, status, body, content_type)

    def _answer(self, method: str, path: str, environ):
        core = self.core
        if method == "GET" and core.metrics_path and path == core.metrics_path:
            return 200, core.metrics.render().encode("utf-8"), "text/plain; version=0.0.4"
        match = _PATH.match(path)
        if not match:
            raise ServingError("NOT_FOUND", f"Malformed request: {method} {path[:200]}")
        name, rest, label = match["name"], match["rest"], match["label"]
        version = int(match["version"]) if match["version"] else None
        if method == "POST" and rest in (":predict", ":classify"):
            api = rest[1:]
            with core.counted(name, api, "REST"):
                body = json_codec.parse_body(_read_body(environ, core.limits.max_request_bytes))
                signature = json_codec.signature_name(body)
                call = Call(self.timeout)
                if api == "predict":
                    inputs, rows_format, rows = json_codec.request_inputs(
                        body, lambda: _only_input(core, name, version, signature, label),
                        core.limits.max_tensor_elements)
                    _, outputs = core.predict(name, version, signature, inputs, label, call)
                    return 200, json_codec.response_body(outputs, rows_format, rows), "application/json"
                _, classes, scores = core.classify(name, version, signature, json_codec.classify_examples(body),
                                                   label, call)
                return 200, json_codec.classify_body(classes, scores), "application/json"
        if method == "POST" and rest == ":regress":
            raise ServingError("UNIMPLEMENTED", "lmstack exports no regression signatures")
        if method == "GET" and rest is None:
            statuses = core.status(name, version, label)
            return 200, {"model_version_status": [
                {"version": str(s["version"]), "state": s["state"],
                 "status": {"error_code": s["error_code"], "error_message": s["error_message"]}}
                for s in statuses]}, "application/json"
        if method == "GET" and rest == "/metadata":
            from google.protobuf import json_format

            served, signatures = core.signature_defs(name, version, label)
            return 200, {"model_spec": {"name": name, "signature_name": "", "version": str(served)},
                         "metadata": {"signature_def": json_format.MessageToDict(
                             signatures, preserving_proto_field_name=True)}}, "application/json"
        raise ServingError("NOT_FOUND", f"Malformed request: {method} {path[:200]}")


    def _stream(self, path: str, environ, start_response):
        """`:stream` (lmstack extension): one prompt's continuation as server-sent events.

        The body is a predict body with one prompt: {"inputs": {"prompt": "...", "max_new_tokens": 50,
        "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0}} (all but the prompt optional).
        A bad request answers as :predict does (status + {"error": ...}); once streaming, each chunk
        is `data: {"text": ..., "token_ids": [...]}`, the end `event: done` with
        `data: {"completion": ..., "finished": ...}`, a failure `event: error` with
        `data: {"error": ...}`. A client that disconnects stops the generation.
        """
        core = self.core
        match = _PATH.match(path)
        try:
            if not match:
                raise ServingError("NOT_FOUND", f"Malformed request: POST {path[:200]}")
            name, label = match["name"], match["label"]
            version = int(match["version"]) if match["version"] else None
            with core.counted(name, "stream", "REST"):
                body = json_codec.parse_body(_read_body(environ, core.limits.max_request_bytes))
                inputs = body.get("inputs") if isinstance(body, dict) else None
                if not isinstance(inputs, dict):
                    raise ServingError("INVALID_ARGUMENT", 'a stream\'s body is {"inputs": {"prompt": "...", ...}}')
                disconnected = environ.get("waitress.client_disconnected")
                call = Call(self.timeout, is_active=(lambda: not disconnected()) if disconnected else None)
                _, chunks = core.stream(name, version, inputs, label, call)
        except ServingError as e:
            return respond(start_response, HTTP_STATUS.get(e.code, 500), {"error": e.message})
        except Exception as e:  # as in __call__: one log line, a 500, no traceback
            return respond(start_response, 500, {"error": internal_error(f"POST {path[:200]}", e)})
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return self._events(chunks, call)

    def _events(self, chunks, call: Call):
        with self.core.track():
            try:
                for chunk in chunks:
                    event = "event: done\n" if "completion" in chunk else ""
                    yield f"{event}data: {json.dumps(chunk)}\n\n".encode("utf-8")
            except ServingError as e:
                yield f"event: error\ndata: {json.dumps({'error': e.message})}\n\n".encode("utf-8")
            except Exception as e:  # one log line and an error event, not a traceback
                yield f"event: error\ndata: {json.dumps({'error': internal_error('stream', e)})}\n\n".encode()
            finally:
                call.gone.set()  # a client that left (waitress closes this generator) stops the chunk in flight


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            409: "Conflict", 429: "Too Many Requests", 499: "Client Closed Request", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout"}


def respond(start_response, status: int, body, content_type: str = "application/json") -> list[bytes]:
    """A whole response: `body` is bytes or a JSON value."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    start_response(f"{status} {_REASONS.get(status, 'Error')}",
                   [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


def _read_body(environ, limit: int) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ServingError("INVALID_ARGUMENT", "Content-Length is not a number") from None
    if length > limit:  # waitress refuses these first; kept for any other WSGI server
        raise ServingError("INVALID_ARGUMENT", f"request body of {length} bytes is larger than the {limit} accepted")
    return environ["wsgi.input"].read(length) if length > 0 else b""


def _only_input(core: ModelServer, name: str, version: int | None, signature: str, label: str | None) -> str:
    loaded = core.model(name).get(version, label)
    signature = signature or SERVING_DEFAULT
    specs = list(loaded.input_specs(signature)) if signature in loaded.signatures else []
    if len(specs) != 1:
        raise ServingError("INVALID_ARGUMENT", f"the signature takes inputs {specs}: name them in a JSON object")
    return specs[0]


def _tf_serving_error(code: int, reason: str, detail: str) -> bytes:
    return json.dumps({"error": f"{reason}: {detail}"}).encode("utf-8")


def _json_framing_errors(error_body=_tf_serving_error):
    """A waitress channel whose own errors (bad framing, oversized bodies) answer JSON too:
    `error_body(code, reason, detail)` (TF Serving's {"error": ...} by default)."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            body = error_body(error.code, error.reason, error.body)
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()  # what follows a malformed request cannot be trusted
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel


class RestServer:
    """A waitress server for `RestApi` (or another WSGI `app` over the core) in a thread of its own.

    Args:
        core: the server's models.
        port: the port (0: a free one).
        host: the address to bind ('0.0.0.0' every IPv4 interface, '::' every interface).
        threads: workers running requests (TF Serving's --rest_api_num_threads).
        timeout: seconds a request may run.
        idle_timeout: seconds an idle keep-alive connection stays open.
        app: the WSGI application (None: `RestApi(core, timeout)`), and `error_body(code, reason,
            detail)` the JSON bytes of waitress's own errors.
    """

    def __init__(self, core: ModelServer, port: int, host: str = "0.0.0.0", threads: int = 8,
                 timeout: float | None = 30.0, idle_timeout: float = 30.0, app=None, error_body=_tf_serving_error):
        from waitress.server import create_server

        self._server = create_server(
            app or RestApi(core, timeout), host=host, port=port, threads=threads, ident="lmstack-serving",
            max_request_body_size=core.limits.max_request_bytes, channel_timeout=int(max(1, idle_timeout)),
            cleanup_interval=int(max(1, idle_timeout)), channel_request_lookahead=1,
            connection_limit=1000, asyncore_use_poll=True, expose_tracebacks=False, clear_untrusted_proxy_headers=True,
            backlog=1024)
        self._server.channel_class = _json_framing_errors(error_body)
        self.port = self._server.effective_port
        self._thread = threading.Thread(target=self._server.run, name="rest", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Closes the listening socket; open connections are still answered."""
        self._server.del_channel()
        self._server.socket.close()

    def shutdown(self) -> None:
        """Stops accepting connections and closes the open ones (after the core has drained)."""
        from waitress import wasyncore

        if self._server.socket is not None and self._server.socket.fileno() >= 0:
            self.stop_accepting()
        self._server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
        wasyncore.close_all(self._server._map)
        self._thread.join(timeout=5)


def start_rest(core: ModelServer, port: int, **options) -> tuple[RestServer, int]:
    """Starts the REST server on `port` (0: a free one) in a thread; returns (server, port)."""
    server = RestServer(core, port, **options)
    return server, server.port
