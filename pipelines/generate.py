"""Text in, text out: generation from a workdir's newest checkpoint.

Prompts are tokenized by the workdir's tokenizer; an empty prompt starts
after [EOS], which is what precedes every document in the training stream.
Generation stops at [EOS] or after `max_new_tokens`.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import tensorflow as tf

import models
from models import decoding, samplers
from pipelines import checkpoints, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.tokenize(tf.constant(text))
    return [int(i) for i in (ids.numpy() if hasattr(ids, "numpy") else ids)]


def decode(tokenizer, ids: Sequence[int]) -> str:
    text = tokenizer.detokenize(tf.constant(list(ids), tf.int32))
    if hasattr(text, "numpy"):
        text = text.numpy()
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class TextGenerator:
    """A workdir's tokenizer and newest model, ready to continue text.

    Args:
        workdir: a workdir with a trained model (checkpoints/).
        variant: an optimized variant's name (WORKDIR/optimized/NAME) instead of the trained model.
    """

    def __init__(self, workdir: str | os.PathLike, variant: str = ""):
        wd = workdir_lib.Workdir(workdir)
        wd.read_config()  # a clear error for a directory that is not a prepared workdir
        self.tokenizer = tokenizers.load(wd.tokenizer_dir)
        self.model, self.config, self.step = checkpoints.load_model(checkpoints.model_dir(workdir, variant))
        self.decoder = models.decoder(self.model, self.config)
        self.generator = decoding.Generator(self.decoder)  # its compiled functions serve every call

    def prompt_ids(self, prompt: str) -> list[int]:
        return encode(self.tokenizer, prompt) if prompt else [self.tokenizer.eos_id]

    def generate(self, prompts: Sequence[str], max_new_tokens: int,
                 sampler: samplers.SamplerConfig = samplers.SamplerConfig()) -> list[str]:
        """Continuations of a batch of prompts."""
        _check(max_new_tokens, self.decoder.max_length)
        ids = self.generator.generate([self.prompt_ids(p) for p in prompts], max_new_tokens, sampler,
                                      stop_token_ids=[self.tokenizer.eos_id])
        return [decode(self.tokenizer, row) for row in ids]

    def stream(self, prompt: str, max_new_tokens: int,
               sampler: samplers.SamplerConfig = samplers.SamplerConfig()) -> Iterator[str]:
        """Yields pieces of the continuation as tokens are chosen.

        Text is decoded from all tokens so far and only the new part is
        yielded; a piece that ends in an incomplete character (byte
        tokenizer) waits for the next token.
        """
        _check(max_new_tokens, self.decoder.max_length)
        shown, tokens = "", []
        for token in self.generator.stream(self.prompt_ids(prompt), max_new_tokens, sampler,
                                           stop_token_ids=[self.tokenizer.eos_id]):
            tokens.append(token)
            text = decode(self.tokenizer, tokens)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                yield text[len(shown):]
                shown = text
        text = decode(self.tokenizer, tokens)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]


def _check(max_new_tokens: int, max_length: int | None) -> None:
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be at least 1")
    if max_length is not None and max_new_tokens >= max_length:
        raise ConfigError("max_new_tokens", max_new_tokens, f"does not fit the model's context of {max_length} "
                          f"tokens; use at most {max_length - 1}")
