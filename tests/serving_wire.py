"""Clients that speak the TensorFlow Serving wire formats as they are, for the serving tests."""

import json
import re
import socket

import grpc
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc


def raw_http(address, data: bytes, timeout: float = 10) -> tuple[int, bytes, bool]:
    """Sends bytes as they are; returns (status, body, whether the server closed the connection)."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head else 0
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        while length and len(body) < int(length[1]):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        if length:
            body = body[:int(length[1])]  # a pipelined second answer may follow
        s.settimeout(0.5)
        try:
            closed = s.recv(1) == b""
        except (socket.timeout, ConnectionResetError):
            closed = False
        return status, body, closed


def post(address, path: str, body, headers: str = "") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, reply, _ = raw_http(address, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                                         f"{headers}\r\n".encode() + data)
    return status, json.loads(reply)


def stub(target):
    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))


def predict_request(model: str, signature: str, **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=signature))
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value if isinstance(value, type(request.inputs[key])) else
                                     tf.make_tensor_proto(value))
    return request
