"""Send a prompt to a TensorFlow Serving endpoint (or `lmstack serve`) and print the completion.

The same --prompt, --max_new_tokens and sampler flags as `lmstack generate`:
greedy (the serving_default signature) by default, else sampled by --sampler
(the generate signature; the same --seed gives the same text).
--stream prints the text as the server makes it (`lmstack serve`'s streaming
extension). --score prints the text's log-likelihood instead; --classify sends the prompt
to a classifier export (`lmstack finetune`) through TensorFlow Serving's
Classify API and prints each class's score; --status and --metadata print
what the server says about the model, as JSON.

example:
  lmstack client --target=localhost:8500 --prompt="ROMEO." --max_new_tokens=80
  lmstack client --target=localhost:8501 --protocol=rest --prompt="ROMEO." --sampler=top_k --temperature=0.8 --seed=3
  lmstack client --target=localhost:8501 --protocol=rest --prompt="ROMEO." --stream
  lmstack client --model_name=reviews --classify --prompt="A dark, dull thriller."
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings
from pipelines.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
    from serving.client import Connection

    settings.define(fv, Connection)
    settings.define_generation(fv)
    flags.DEFINE_bool("compiled", False, "call the XLA-compiled signatures (serving_default_xla, generate_xla): "
                      "the same text, faster, from a server started with --xla_cpu_compilation_enabled",
                      flag_values=fv)
    flags.DEFINE_bool("stream", False, "print the text as it is made (lmstack serve's streaming extension)",
                      flag_values=fv)
    flags.DEFINE_bool("score", False, "print the prompt's log-likelihood instead of a completion", flag_values=fv)
    flags.DEFINE_bool("classify", False, "classify the prompt (a classifier export's Classify API)", flag_values=fv)
    flags.DEFINE_bool("status", False, "print the model's version status", flag_values=fv)
    flags.DEFINE_bool("metadata", False, "print the model's signatures", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from serving import client as client_lib

    sampler = settings.sampler(fv)
    temperature, top_k, top_p = sampler.settings()  # the signatures' per-row settings: temperature 0 is greedy
    seed = sampler.draw_seed()
    client = settings.build(fv, client_lib.Connection).connect()
    try:
        if fv.status:
            print(json.dumps(client.status()))
        elif fv.metadata:
            print(json.dumps(client.metadata(), indent=2))
        elif fv.classify:
            (pairs,) = client.classify([fv.prompt])
            print(json.dumps({"label": max(pairs, key=lambda p: p[1])[0], "scores": dict(pairs)}))
        elif fv.score:
            (log_likelihood, tokens), = client.score([fv.prompt])
            print(json.dumps({"log_likelihood": log_likelihood, "num_tokens": tokens}))
        elif fv.stream:
            for piece in client.stream(fv.prompt, fv.max_new_tokens, temperature, top_k, top_p, seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            completion, = client.generate([fv.prompt], fv.max_new_tokens, temperature, top_k, top_p, seed,
                                          compiled=fv.compiled)
            print(completion)
    except client_lib.ServingError as e:
        raise UserError(f"{fv.target} ({fv.protocol}) answered {e.code}: {e.message}") from None
    return 0
