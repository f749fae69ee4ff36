"""`lmstack SUBCOMMAND [--flag=value ...]`: the one command line of lmstack."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

import app  # noqa: F401  (sets the environment before TensorFlow loads)
from app import cli

# name -> (module, one-line summary). Modules load on demand so that
# `lmstack --help` does not pay for importing TensorFlow.
SUBCOMMANDS = {
    "import": ("app.import_checkpoint", "a pre-trained GPT-2 (keras-hub preset or Hugging Face) -> a new workdir"),
    "prepare": ("app.prepare", "corpus -> tokenizer -> train/val token shards in a workdir"),
    "train": ("app.train", "train the workdir's model under a tf.distribute strategy (resumable)"),
    "evaluate": ("app.evaluate", "validation loss, perplexity and bits/char (a classifier: accuracy, per-class F1)"),
    "generate": ("app.generate", "continue a prompt with the workdir's newest model, streaming"),
    "finetune": ("app.finetune", "fine-tune a trained run into a text classifier (transfer learning)"),
    "optimize": ("app.optimize", "TF-MOT pruning, quantization-aware training or clustering into a variant"),
    "report": ("app.report", "compare the trained model and its variants: size, quality, latency, plots"),
    "export": ("app.export", "SavedModel for TensorFlow Serving: text in, text out (a classifier: the Classify API)"),
    "tflite": ("app.tflite", "TFLite for on-device generation: prefill/decode or sequence/step, built-in ops"),
    "serve": ("app.serve", "serve exported models over TensorFlow Serving's REST and gRPC APIs"),
    "client": ("app.client", "send a prompt to a TensorFlow Serving (or lmstack serve) endpoint"),
    "monitor": ("app.monitor", "compare a served model's request logs with its training data: drift, exit 1"),
    "pipeline": ("app.pipeline", "run every stage from one YAML/JSON config; finished stages are not redone"),
    "doctor": ("app.doctor", "check versions, the Keras setting, GPUs and the runtimes; say how to fix"),
    "launch": ("app.launch", "start N local workers of a command with TF_CONFIG (multi-worker dev)"),
    "data-service": ("app.data_service", "run a tf.data service (dispatcher, workers) that prepares training batches"),
}


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    rows = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in SUBCOMMANDS.items())
    return (
        "usage: lmstack SUBCOMMAND [--flag=value ...]\n\n"
        "Raw text to a language model: tokenize, train, slim, serve, ship.\n\n"
        f"subcommands:\n{rows}\n\n"
        "`lmstack SUBCOMMAND --help` explains that subcommand's flags.")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else cli.EXIT_USAGE)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.exit(cli.fail("lmstack", f"unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}"))
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sys.exit(cli.run_subcommand(f"lmstack {name}", module, rest))
