"""Running an lmstack TFLite file the way an app on a device does: ai-edge-litert only.

    model = EdgeModel("runs/x/tflite/transformer-int8.tflite", num_threads=2)
    ids = model.generate(prompt_ids, max_new_tokens=100, stop_ids=[model.eos_id])

Needs nothing of lmstack but the file and its JSON sidecar (written by
`serving.exporters.tflite`): token ids in, token ids out; the app tokenizes with the
files in tflite/tokenizer/. The transformer runs `prefill` once on the
right-padded prompt and `decode` per new token; the LSTM runs `step` per
token. `window_logits` scores a whole window (`prefill` or the fused
`sequence`), for evaluation.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np


class EdgeModel:
    """A TFLite language model in the ai-edge-litert interpreter (XNNPACK on CPU).

    Args:
        path: the .tflite file; its sidecar is the same name with .json.
        num_threads: interpreter threads (None: the runtime's default).
    """

    def __init__(self, path: str | pathlib.Path, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = pathlib.Path(path)
        self.info = json.loads(self.path.with_suffix(".json").read_text())
        self.family = self.info["family"]
        self.max_seq_len = int(self.info["max_seq_len"])
        self.eos_id = int(self.info["eos_id"])
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
        names = ("prefill", "decode") if self.family == "transformer" else ("sequence", "step")
        self._window, self._step = (self.interpreter.get_signature_runner(n) for n in names)
        if self.family == "lstm":
            shape = self._step.get_input_details()["state"]["shape"]
            self._zero_state = np.zeros(shape, np.float32)
            # Run both once: reset_all_variables needs every subgraph's tensors allocated.
            self._step(token=np.zeros([1, 1], np.int32), state=self._zero_state)
            self._window(tokens=np.zeros([1, self.max_seq_len], np.int32))

    @property
    def max_prompt_and_new_tokens(self) -> int | None:
        """The transformer's fixed cache length; None for the LSTM (its state has no limit)."""
        return self.max_seq_len if self.family == "transformer" else None

    def window_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits `[T, V]` for one window of `max_seq_len` token ids."""
        tokens = np.asarray(tokens, np.int32).reshape(1, self.max_seq_len)
        if self.family == "lstm":
            # The fused sequence-LSTM kernel keeps its state in variable tensors between calls.
            self.interpreter.reset_all_variables()
        return self._window(tokens=tokens)["logits"][0]

    def steps(self, prompt: Sequence[int]):
        """A generator protocol: yields next-token logits `[V]`, receives the chosen token.

        Stops when the transformer's cache is full.
        """
        if not prompt:
            raise ValueError("the prompt needs at least one token (start with EOS for none)")
        if self.family == "transformer":
            n = len(prompt)
            if n > self.max_seq_len:
                raise ValueError(f"a prompt of {n} tokens does not fit max_seq_len={self.max_seq_len}")
            tokens = np.zeros([1, self.max_seq_len], np.int32)
            tokens[0, :n] = prompt
            out = self._window(tokens=tokens)
            logits, cache = out["logits"][0, n - 1], out["cache"]
            for position in range(n, self.max_seq_len):
                token = yield logits
                out = self._step(token=np.array([[token]], np.int32), cache=cache,
                                 position=np.array(position, np.int32))
                logits, cache = out["logits"][0], out["cache"]
            yield logits
            return
        state = self._zero_state
        for token in prompt[:-1]:
            state = self._step(token=np.array([[token]], np.int32), state=state)["state"]
        token = prompt[-1]
        while True:
            out = self._step(token=np.array([[token]], np.int32), state=state)
            state = out["state"]
            token = yield out["logits"][0]

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 temperature: float = 0.0, top_k: int = 0, seed: int | None = None) -> list[int]:
        """Continues `prompt`: greedy when `temperature` is 0, else sampled (optionally top-k).

        A transformer prompt longer than the cache allows keeps its last tokens.
        """
        limit = self.max_prompt_and_new_tokens
        if limit is not None:
            if max_new_tokens >= limit:
                raise ValueError(f"max_new_tokens={max_new_tokens} does not fit max_seq_len={limit}")
            prompt = list(prompt)[-(limit - max_new_tokens):]
        rng = np.random.default_rng(seed)
        steps = self.steps(list(prompt))
        logits = next(steps)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = choose(logits, temperature, top_k, rng)
            if token in stop_ids:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            logits = steps.send(token)
        steps.close()
        return new


def choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """The next token: argmax at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        cut = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(scaled.size, p=probs / probs.sum()))
