"""The serving contract: signature, tensor and file names shared by the exporter, the server and the clients.

An exported language model answers fifteen signatures (TensorFlow Serving's
`signature_name`); every tensor's first dimension is the batch:

    serving_default    prompt string [B], max_new_tokens int32 [B]
                       -> completion string [B], token_ids int32 [B, L]   (greedy)
    generate           the same + temperature float [B], top_k int32 [B], top_p float [B], seed int32 [B]
                       -> completion, token_ids                            (sampled; same seed, same text)
    score              text string [B] -> log_likelihood float [B], num_tokens int32 [B]
    next_token_logits  token_ids int32 [B, T], num_tokens int32 [B]
                       -> logits float [B, V]                             (no tokenizer)
                       (the logits after each row's first num_tokens tokens; what follows them is
                       ignored, so rows of different lengths pad to one [B, T] — and TensorFlow
                       Serving's pad_variable_length_inputs changes no answer)
    token_logprobs     token_ids int32 [B, T], num_tokens int32 [B]
                       -> logprobs float [B, T], top_token_ids int32 [B, T, 5], top_logprobs float [B, T, 5]
                       (for each position t from 1 to num_tokens - 1: log p(token t | the tokens
                       before it), and the 5 likeliest tokens there with theirs; position 0 and
                       what follows num_tokens are 0. One forward pass over the rows, which a
                       transformer's context must hold: what an OpenAI request's `logprobs` shows)
    generate_chunk     the inputs of generate + generated int32 [B, G], num_generated int32 [B],
                       chunk_tokens int32 [B]
                       -> completion string [B], token_ids int32 [B, C], finished bool [B]
                       (the next chunk_tokens of the max_new_tokens that generate would make,
                       after the first num_generated of them, given in `generated`: the same
                       tokens, chunk by chunk; completion is the text of all the tokens so far;
                       finished: the row stopped at [EOS]. A client calls it again with the
                       tokens so far to stream; `lmstack serve`'s streaming extension does that)
    serving_default_xla, generate_xla, generate_chunk_xla
                       the same as serving_default, generate, generate_chunk (same inputs, same tokens),
                       with the decoding loop XLA-compiled: several times faster, for servers
                       that allow XLA (TensorFlow Serving: --xla_cpu_compilation_enabled, or
                       --xla_gpu_compilation_enabled on GPUs; `lmstack serve` the same). They
                       compile once per shape bucket (batch and length rounded up), at load
                       from the warm-up requests. (score is one forward pass, already as fast
                       uncompiled: it has no compiled twin.)

Three more let a server schedule generation step by step (continuous batching: `lmstack serve`
keeps each sequence's cache between calls; TensorFlow Serving has no use for them, but serves
them like any other):

    prefill            the inputs of generate
                       -> cache float [B, ...], token int32 [B], num_tokens int32 [B], finished bool [B]
                       (each row laid out as generate lays it out for its max_new_tokens, in a new
                       cache: `num_tokens` tokens of it, [EOS] alone for an empty prompt; `token` is
                       its first new token, chosen as generate chooses it, at position num_tokens;
                       finished: that token is [EOS], so the row has no new tokens)
    decode             token int32 [B], position int32 [B], cache, steps int32 [B], temperature,
                       top_k, top_p, seed float/int [B], presence_penalty, frequency_penalty float [B],
                       token_counts float [B, V]
                       -> token_ids int32 [B, 64], num_tokens int32 [B], cache, token_counts
                       (up to steps[i] <= 64 more tokens for each row, every row at its own position:
                       its last token `token` sits at `position` and is not in its cache yet; the
                       same tokens generate makes, whatever else is in the batch. A row stops at
                       [EOS] (num_tokens < steps) or after its steps; a row with steps 0 is left
                       alone. The next call continues from its last new token, at position +
                       num_tokens)
    detokenize         token_ids int32 [B, T], num_tokens int32 [B] -> text string [B]
                       (the text of each row's first num_tokens ids)
    tokenize           text string [B] -> token_ids int32 [B, T], num_tokens int32 [B]
                       (each text's tokens, zero-padded: what a prompt costs in the context. A
                       generation reads an empty prompt as [EOS] alone, one token)
    prefill_xla, decode_xla   the same, XLA-compiled over the export's shape buckets.

(`tokenize` is here too: a server counts a prompt's tokens with it before it runs, as the
OpenAI-compatible API's limits and usage counts need.)

The cache is a transformer's keys and values, `[B, layers, 2, length, d_model]` (any length up to
the context; a prefill makes it the context), or an LSTM's state `[B, layers, 2, units]`.

A classifier export (`lmstack finetune`, then `lmstack export`) answers two:

    serving_default    text string [B] -> label string [B], scores float [B, C]
    classify           inputs: serialized tf.Example string [B] with a bytes feature `text`
                       -> classes string [B, C], scores float [B, C]
                       (method name tensorflow/serving/classify: TensorFlow Serving's Classify API)

This module imports nothing but the standard library, so a client can use it
without TensorFlow.
"""

from __future__ import annotations

import dataclasses

DEFAULT_MODEL_NAME = "lm"

# Signature names.
SERVING_DEFAULT = "serving_default"
GENERATE = "generate"
SCORE = "score"
NEXT_TOKEN_LOGITS = "next_token_logits"
TOKEN_LOGPROBS = "token_logprobs"
TOP_LOGPROBS = 5  # the alternatives token_logprobs gives at each position
GENERATE_CHUNK = "generate_chunk"
# The same three, XLA-compiled (a server must allow XLA: --xla_cpu_compilation_enabled).
XLA_SUFFIX = "_xla"
SERVING_DEFAULT_XLA = SERVING_DEFAULT + XLA_SUFFIX
GENERATE_XLA = GENERATE + XLA_SUFFIX
GENERATE_CHUNK_XLA = GENERATE_CHUNK + XLA_SUFFIX
PREFILL = "prefill"
DECODE = "decode"
DETOKENIZE = "detokenize"
TOKENIZE = "tokenize"
PREFILL_XLA = PREFILL + XLA_SUFFIX
DECODE_XLA = DECODE + XLA_SUFFIX
DECODE_STEPS = 64  # the most tokens one decode call makes per row (the width of its token_ids)

# Tensor names.
PROMPT = "prompt"
MAX_NEW_TOKENS = "max_new_tokens"
TEMPERATURE = "temperature"
TOP_K = "top_k"
TOP_P = "top_p"
SEED = "seed"
COMPLETION = "completion"
TOKEN_IDS = "token_ids"
TEXT = "text"
LOG_LIKELIHOOD = "log_likelihood"
NUM_TOKENS = "num_tokens"
LOGITS = "logits"
LOGPROBS = "logprobs"
TOP_TOKEN_IDS = "top_token_ids"
TOP_LOGPROBS_OUTPUT = "top_logprobs"
GENERATED = "generated"
NUM_GENERATED = "num_generated"
CHUNK_TOKENS = "chunk_tokens"
FINISHED = "finished"
CACHE = "cache"
TOKEN = "token"
POSITION = "position"
STEPS = "steps"
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
TOKEN_COUNTS = "token_counts"

# The classifier's signatures and tensors (TensorFlow Serving's names for the Classify API).
CLASSIFY = "classify"
CLASSIFY_INPUTS = "inputs"
CLASSES = "classes"
SCORES = "scores"
LABEL = "label"
CLASSIFY_METHOD = "tensorflow/serving/classify"
PREDICT_METHOD = "tensorflow/serving/predict"

# lmstack serve's streaming extension over gRPC: a PredictRequest in, a stream of PredictResponses out.
STREAM_SERVICE = "lmstack.serving.StreamingService"
STREAM_METHOD = f"/{STREAM_SERVICE}/StreamGenerate"

# Files inside an export's version directory.
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"  # TensorFlow Serving reads assets.extra/ + this name
XLA_WARMUP_FILE = "lmstack_xla_warmup_requests"  # the _xla signatures' records, which `lmstack serve` replays
CONFIG_FILE = "lmstack_config.json"  # the run's config, the tokenizer's and the export's own


class ServingError(Exception):
    """A request failed, as TensorFlow Serving reports it.

    Attributes:
        code: the gRPC status name ('INVALID_ARGUMENT', 'NOT_FOUND', 'UNAVAILABLE', ...).
        message: the server's message.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# The HTTP status TensorFlow Serving's REST API answers for each gRPC status.
HTTP_STATUS = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
               "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
               "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output of a signature: dtype name (as in TensorFlow) and rank (None: the model's
    cache, whose rank depends on the model)."""
    dtype: str
    rank: int | None


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


_COMPLETION_OUTPUTS = {COMPLETION: Tensor("string", 1), TOKEN_IDS: Tensor("int32", 2)}

_GREEDY = Signature(inputs={PROMPT: Tensor("string", 1), MAX_NEW_TOKENS: Tensor("int32", 1)},
                   outputs=_COMPLETION_OUTPUTS)
_SAMPLED = Signature(inputs={PROMPT: Tensor("string", 1), MAX_NEW_TOKENS: Tensor("int32", 1),
                             TEMPERATURE: Tensor("float32", 1), TOP_K: Tensor("int32", 1),
                             TOP_P: Tensor("float32", 1), SEED: Tensor("int32", 1)},
                     outputs=_COMPLETION_OUTPUTS)
_CHUNK = Signature(inputs={**_SAMPLED.inputs, GENERATED: Tensor("int32", 2), NUM_GENERATED: Tensor("int32", 1),
                           CHUNK_TOKENS: Tensor("int32", 1)},
                   outputs={**_COMPLETION_OUTPUTS, FINISHED: Tensor("bool", 1)})
_SAMPLING = {k: _SAMPLED.inputs[k] for k in (TEMPERATURE, TOP_K, TOP_P, SEED)}
_CACHE = Tensor("float32", None)  # the model's own shape (see above)
_PREFILL = Signature(inputs=_SAMPLED.inputs,
                     outputs={CACHE: _CACHE, TOKEN: Tensor("int32", 1), NUM_TOKENS: Tensor("int32", 1),
                              FINISHED: Tensor("bool", 1)})
_DECODE = Signature(inputs={TOKEN: Tensor("int32", 1), POSITION: Tensor("int32", 1), CACHE: _CACHE,
                            STEPS: Tensor("int32", 1), **_SAMPLING, PRESENCE_PENALTY: Tensor("float32", 1),
                            FREQUENCY_PENALTY: Tensor("float32", 1), TOKEN_COUNTS: Tensor("float32", 2)},
                    outputs={TOKEN_IDS: Tensor("int32", 2), NUM_TOKENS: Tensor("int32", 1), CACHE: _CACHE,
                             TOKEN_COUNTS: Tensor("float32", 2)})
_SCORE = Signature(inputs={TEXT: Tensor("string", 1)},
                   outputs={LOG_LIKELIHOOD: Tensor("float32", 1), NUM_TOKENS: Tensor("int32", 1)})

SIGNATURES: dict[str, Signature] = {
    SERVING_DEFAULT: _GREEDY,
    GENERATE: _SAMPLED,
    SCORE: _SCORE,
    GENERATE_CHUNK: _CHUNK,
    SERVING_DEFAULT_XLA: _GREEDY,
    GENERATE_XLA: _SAMPLED,
    GENERATE_CHUNK_XLA: _CHUNK,
    NEXT_TOKEN_LOGITS: Signature(
        inputs={TOKEN_IDS: Tensor("int32", 2), NUM_TOKENS: Tensor("int32", 1)},
        outputs={LOGITS: Tensor("float32", 2)}),
    TOKEN_LOGPROBS: Signature(
        inputs={TOKEN_IDS: Tensor("int32", 2), NUM_TOKENS: Tensor("int32", 1)},
        outputs={LOGPROBS: Tensor("float32", 2), TOP_TOKEN_IDS: Tensor("int32", 3),
                 TOP_LOGPROBS_OUTPUT: Tensor("float32", 3)}),
    PREFILL: _PREFILL,
    DECODE: _DECODE,
    PREFILL_XLA: _PREFILL,
    DECODE_XLA: _DECODE,
    DETOKENIZE: Signature(inputs={TOKEN_IDS: Tensor("int32", 2), NUM_TOKENS: Tensor("int32", 1)},
                          outputs={TEXT: Tensor("string", 1)}),
    TOKENIZE: Signature(inputs={TEXT: Tensor("string", 1)},
                        outputs={TOKEN_IDS: Tensor("int32", 2), NUM_TOKENS: Tensor("int32", 1)}),
}
GENERATION_SIGNATURES = (SERVING_DEFAULT, GENERATE, SERVING_DEFAULT_XLA, GENERATE_XLA)  # what a scheduler runs
STEP_SIGNATURES = (PREFILL, DECODE, DETOKENIZE)  # what a step scheduler needs (with the _xla twins, faster)



def needs_xla(signature: str) -> bool:
    """Whether a signature runs XLA-compiled functions (which a server must allow)."""
    return signature.endswith(XLA_SUFFIX)


CLASSIFIER_SIGNATURES: dict[str, Signature] = {
    SERVING_DEFAULT: Signature(
        inputs={TEXT: Tensor("string", 1)},
        outputs={LABEL: Tensor("string", 1), SCORES: Tensor("float32", 2)}),
    CLASSIFY: Signature(
        inputs={CLASSIFY_INPUTS: Tensor("string", 1)},
        outputs={CLASSES: Tensor("string", 2), SCORES: Tensor("float32", 2)}),
}
