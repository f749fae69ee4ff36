"""Serve exported models over TensorFlow Serving's REST and gRPC APIs.

The flags are `tensorflow_model_server`'s: --port (gRPC), --rest_api_port,
--model_name and --model_base_path (a directory of integer versions, as
`lmstack export` writes them). The newest version is loaded with TensorFlow's
SavedModel loader; clients written for TensorFlow Serving work unchanged.

example:
  lmstack serve --model_name=lm --model_base_path=runs/shakespeare/export/lm
  curl -d '{"inputs": {"prompt": ["ROMEO."], "max_new_tokens": [40]}}' localhost:8501/v1/models/lm:predict
"""

from __future__ import annotations

import signal
import sys
import threading

from absl import flags

from pipelines.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port)", flag_values=fv)
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: any free port)", flag_values=fv)
    flags.DEFINE_string("model_name", "lm", "the name requests use", flag_values=fv)
    flags.DEFINE_string("model_base_path", None, "directory holding the model's version directories",
                        flag_values=fv)
    flags.mark_flags_as_required(["model_base_path"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from serving import server
    from serving.contract import ServingError

    model = server.ServedModel(fv.model_name, fv.model_base_path)
    try:
        loaded = model.load_latest()
    except ServingError as e:
        raise UserError(f"--model_base_path={fv.model_base_path}: {e.message}") from None
    core = server.ModelServer({fv.model_name: model})
    try:
        grpc_server, grpc_port = server.start_grpc(core, fv.port)
        rest_server, rest_port = server.start_rest(core, fv.rest_api_port)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot listen: {e}; choose other --port/--rest_api_port") from None
    print(f"serving {fv.model_name} version {loaded.version} from {loaded.path}: "
          f"gRPC on port {grpc_port}, REST on port {rest_port}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping", file=sys.stderr, flush=True)
    rest_server.shutdown()
    grpc_server.stop(grace=5).wait()
    return 0
