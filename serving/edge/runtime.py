"""Running an lmstack TFLite file the way an app on a device does: ai-edge-litert only.

    model = EdgeModel("runs/x/tflite/transformer-int8.tflite", num_threads=2)
    text = model.complete("ROMEO.", max_new_tokens=100)            # text in, text out
    ids = model.generate(prompt_ids, max_new_tokens=100, stop_ids=[model.eos_id])

`EdgeClassifier` runs a classifier file (`lmstack tflite` on a `lmstack finetune`
workdir): texts (or their token ids) in, class scores out.

Needs nothing of lmstack but the .tflite: its TFLite Metadata describes the model and
its packed files hold the tokenizer and the sidecar's content (`serving.edge.metadata`;
files of format 1 read the JSON sidecar and tflite/tokenizer/ next to them).
`model.tokenizer` turns text into ids without TensorFlow. The transformer runs the
shortest `prefill_N` that holds the right-padded prompt, then `decode` per new token
(LiteRT-LM's signatures; files before format 4: `prefill` and `decode` over one cache);
the LSTM runs `step` per token. `window_logits` scores a whole window (the whole
cache's prefill, or `sequence`), for evaluation.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from serving.edge import metadata as tflite_metadata
from serving.edge.tokenizer import EdgeTokenizer

SIDECAR = "lmstack.json"  # the sidecar's content, packed in the file (serving.exporters.edge_metadata)
# The layout of lmstack's .tflite files, recorded in the sidecar as "format" (files without it are older):
#   1  nothing packed: NAME.json and tokenizer/ sit next to the file
#   2  the sidecar packed as lmstack.json, with the tokenizer's config in it
#   3  the sidecar packed as lmstack.json; the tokenizer's config is the packed tokenizer.json
#   4  as 3; the transformer's signatures are LiteRT-LM's (prefill_N and decode over kv_cache_k_i,
#      kv_cache_v_i; before: prefill and decode over one `cache`)
FORMAT = 4


def _read(path: str) -> bytes:
    """A file's bytes: local, or on a TensorFlow filesystem (`gs://...`; needs TensorFlow, a device does not)."""
    if "://" in path and not path.startswith("file://"):
        import tensorflow as tf
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    return pathlib.Path(path.removeprefix("file://")).read_bytes()


def _open(path: str | pathlib.Path, num_threads: int | None, classifier: bool):
    """(path, sidecar, tokenizer, interpreter) of an lmstack TFLite file; ValueError for the other kind."""
    from ai_edge_litert.interpreter import Interpreter

    path = str(path)
    flat = _read(path)
    files = tflite_metadata.packed_files(flat)  # the app's runtime needs these, not the metadata's text
    if SIDECAR in files:
        info = json.loads(files[SIDECAR])
        if info.get("format", 2) >= 3:
            info["tokenizer"] = json.loads(files["tokenizer.json"])
    else:  # format 1 (or a file over 2 GB, which TFLite Metadata cannot hold): read what sits next to it
        info = json.loads(_read(path[:-len(".tflite")] + ".json"))
        folder = path[:path.rfind("/") + 1] + info.get("tokenizer_dir", "tokenizer") + "/"
        files = {name: _read(folder + name) for name in _tokenizer_file_names(info["tokenizer"])}
    if (info["family"] == "classifier") != classifier:
        kind, other = ("an LM", "EdgeModel") if classifier else ("a classifier", "EdgeClassifier")
        raise ValueError(f"{path} holds {kind}; use {other}")
    return path, info, EdgeTokenizer(info["tokenizer"], files), Interpreter(model_content=flat, num_threads=num_threads)


def _tokenizer_file_names(config: dict) -> list[str]:
    return {"char": ["vocabulary.json"], "byte": [], "wordpiece": ["vocabulary.txt"],
            "sentencepiece": ["sentencepiece.model"], "bpe": ["vocab.json", "merges.txt"]}[config["kind"]]


class EdgeModel:
    """A TFLite language model in the ai-edge-litert interpreter (XNNPACK on CPU).

    Args:
        path: the .tflite file (its settings and tokenizer are packed inside it).
        num_threads: interpreter threads (None: the runtime's default).
    """

    def __init__(self, path: str | pathlib.Path, num_threads: int | None = None):
        self.path, self.info, self.tokenizer, self.interpreter = _open(path, num_threads, classifier=False)
        self.family = self.info["family"]
        self.max_seq_len = int(self.info["max_seq_len"])
        self.eos_id = int(self.info["eos_id"])
        self.batch_size = int(self.info.get("batch_size", 1))  # rows per call, decoded in lockstep
        signatures = self.interpreter.get_signature_list()
        self._prefills: dict[int, object] = {}  # LiteRT-LM's convention (format 4): length -> prefill_N
        if self.family == "transformer" and "prefill" not in signatures:
            self._prefills = {int(name.split("_")[1]): self.interpreter.get_signature_runner(name)
                              for name in signatures if name.startswith("prefill_")}
            self._window, self._step = self._prefills[self.max_seq_len], self.interpreter.get_signature_runner("decode")
            self._zero_caches = {name: np.zeros(detail["shape"], np.float32)
                                 for name, detail in self._step.get_input_details().items()
                                 if name.startswith("kv_cache_")}
        else:
            names = ("prefill", "decode") if self.family == "transformer" else ("sequence", "step")
            self._window, self._step = (self.interpreter.get_signature_runner(n) for n in names)
        if self.family == "lstm":  # its state: h and c per layer (older files: one `state` holding both)
            self._zero_state = {name: np.zeros(detail["shape"], np.float32)
                                for name, detail in self._step.get_input_details().items() if name != "token"}
        # Older files scored an LSTM window with TFLite's fused sequence kernel (their op counts
        # name it), which keeps its state in variable tensors between calls: reset before each window.
        self._stateful = bool(self.info.get("ops", {}).get("UNIDIRECTIONAL_SEQUENCE_LSTM"))
        if self._stateful:  # reset_all_variables needs every subgraph's tensors allocated
            self._step(token=np.zeros([1, 1], np.int32), **self._zero_state)
            self._window(tokens=np.zeros([1, self.max_seq_len], np.int32))

    @property
    def max_prompt_and_new_tokens(self) -> int | None:
        """The transformer's fixed cache length; None for the LSTM (its state has no limit)."""
        return self.max_seq_len if self.family == "transformer" else None

    def window_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits `[T, V]` for one window of `max_seq_len` token ids."""
        tokens = np.repeat(np.asarray(tokens, np.int32).reshape(1, self.max_seq_len), self.batch_size, axis=0)
        if self._stateful:
            self.interpreter.reset_all_variables()
        if self._prefills:
            return self._window(tokens=tokens, input_pos=np.arange(self.max_seq_len, dtype=np.int32),
                                **self._zero_caches)["logits"][0]
        return self._window(tokens=tokens)["logits"][0]

    def steps(self, prompt: Sequence[int]):
        """A generator protocol: yields next-token logits `[V]`, receives the chosen token.

        Stops when the transformer's cache is full.
        """
        rows = self.batch_steps([prompt])
        token = None
        while True:
            try:
                logits = rows.send(None if token is None else [token] * self.batch_size)
            except StopIteration:
                return
            token = yield logits[0]

    def batch_steps(self, prompts: Sequence[Sequence[int]]):
        """`steps` for up to `batch_size` prompts of one length, decoded in lockstep (the file's
        `--batch_size` rows; missing rows repeat the last prompt): yields logits `[batch_size, V]`,
        receives a token per row (`generate_batch` feeds a longer prompt's rest through it)."""
        if not all(prompts):
            raise ValueError("a prompt needs at least one token (start with EOS for none)")
        if not prompts or len({len(p) for p in prompts}) != 1 or len(prompts) > self.batch_size:
            raise ValueError(f"this file decodes 1 to {self.batch_size} prompts of one length in lockstep; "
                             f"got lengths {[len(p) for p in prompts]}")
        rows = np.array([*prompts, *[prompts[-1]] * (self.batch_size - len(prompts))], np.int32)  # (B, n)
        n = rows.shape[1]
        if self.family == "transformer":
            if n > self.max_seq_len:
                raise ValueError(f"a prompt of {n} tokens does not fit max_seq_len={self.max_seq_len}")
            if self._prefills:
                yield from self._cached_steps(rows)
                return
            tokens = np.zeros([self.batch_size, self.max_seq_len], np.int32)
            tokens[:, :n] = rows
            out = self._window(tokens=tokens)
            logits, cache = out["logits"][:, n - 1], out["cache"]
            for position in range(n, self.max_seq_len):
                chosen = yield logits
                out = self._step(token=np.array(chosen, np.int32).reshape(-1, 1), cache=cache,
                                 position=np.array(position, np.int32))
                logits, cache = out["logits"], out["cache"]
            yield logits
            return
        state = self._zero_state
        for column in rows.T[:-1]:
            out = self._step(token=column.reshape(-1, 1), **state)
            state = {name: out[name] for name in state}
        chosen = rows[:, -1]
        while True:
            out = self._step(token=np.array(chosen, np.int32).reshape(-1, 1), **state)
            state = {name: out[name] for name in state}
            chosen = yield out["logits"]

    def _cached_steps(self, rows: np.ndarray):
        """`batch_steps` on LiteRT-LM's signatures, scheduled as the LiteRT-LM engine schedules them, so
        that an int8 file (whose signatures each have their own ranges) gives the engine's tokens:
        `prefill_chunks` through the prefills, the last prompt token and each new one through `decode`,
        the caches passed from call to call."""
        n = rows.shape[1]
        caches = self._zero_caches
        for length, start, stop in prefill_chunks(n, sorted(self._prefills), self.max_seq_len):
            tokens = np.zeros([self.batch_size, length], np.int32)
            tokens[:, :stop - start] = rows[:, start:stop]
            out = self._prefills[length](tokens=tokens, input_pos=np.arange(start, start + length, dtype=np.int32),
                                         **caches)
            caches = {name: out[name] for name in caches}
        chosen = rows[:, -1]
        for position in range(n - 1, self.max_seq_len):
            out = self._step(tokens=np.array(chosen, np.int32).reshape(-1, 1),
                             input_pos=np.array([position], np.int32), **caches)
            caches = {name: out[name] for name in caches}
            chosen = yield out["logits"][:, 0]

    def complete(self, prompt: str, max_new_tokens: int, **sampling) -> str:
        """The text that follows `prompt` (a new document when it is empty), up to [EOS].

        `sampling`: `generate`'s temperature, top_k, top_p and seed.
        """
        ids = self.tokenizer.encode(prompt) if prompt else [self.eos_id]
        return self.tokenizer.decode(self.generate(ids, max_new_tokens, stop_ids=[self.eos_id], **sampling))

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> list[int]:
        """Continues `prompt`: greedy when `temperature` is 0, else sampled (top-k, then top-p) as
        `models.samplers.sample_next` samples, with the same noise: the same tokens as the
        SavedModel and in-process generation for the same seed. The presence and frequency
        penalties lower the logits of the tokens generated so far first (`models.samplers.penalize`).

        A transformer prompt longer than the cache allows keeps its last tokens.
        """
        limit = self.max_prompt_and_new_tokens
        if limit is not None:
            if max_new_tokens >= limit:
                raise ValueError(f"max_new_tokens={max_new_tokens} does not fit max_seq_len={limit}")
            prompt = list(prompt)[-(limit - max_new_tokens):]
        steps = self.steps(list(prompt))
        logits = next(steps)
        new: list[int] = []
        counts = np.zeros([logits.size], np.float32)
        while len(new) < max_new_tokens:
            if presence_penalty or frequency_penalty:
                logits = penalize(logits, counts, presence_penalty, frequency_penalty)
            token = choose(logits, len(prompt) + len(new), temperature, top_k, top_p, seed)
            if token in stop_ids:
                break
            new.append(token)
            counts[token] += 1
            if len(new) == max_new_tokens:
                break
            logits = steps.send(token)
        steps.close()
        return new


    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seeds: Sequence[int] = (), presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0) -> list[list[int]]:
        """`generate` for up to `batch_size` prompts in one pass per token: row i samples with
        `seeds[i]` (default its index), so it gives `generate(prompts[i], ..., seed=seeds[i])`'s tokens.
        N samples of one prompt: `generate_batch([prompt] * N, ..., seeds=range(N))`.

        The rows share one position (the file decodes in lockstep): all run the shortest prompt
        together, then a longer prompt's row feeds its own next token while the others generate,
        as the SavedModel's decoding loop does.
        """
        seeds = list(seeds) or list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not 1 <= len(prompts) <= self.batch_size:
            raise ValueError(f"this file decodes 1 to {self.batch_size} prompts a call; got {len(prompts)}")
        limit = self.max_prompt_and_new_tokens
        if limit is not None:
            if max_new_tokens >= limit:
                raise ValueError(f"max_new_tokens={max_new_tokens} does not fit max_seq_len={limit}")
            prompts = [list(p)[-(limit - max_new_tokens):] for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens <= 0:
            return new
        position = min(len(p) for p in prompts)  # of the token being chosen
        rows = self.batch_steps([p[:position] for p in prompts])
        logits = next(rows)
        done = [False] * len(prompts)
        counts = np.zeros([len(prompts), logits.shape[-1]], np.float32)
        while True:
            fed = []
            for i, prompt in enumerate(prompts):
                if position < len(prompt):  # still in its prompt
                    fed.append(prompt[position])
                    continue
                row = logits[i]
                if presence_penalty or frequency_penalty:
                    row = penalize(row, counts[i], presence_penalty, frequency_penalty)
                token = choose(row, position, temperature, top_k, top_p, seeds[i])
                if not done[i]:
                    done[i] = token in stop_ids
                    if not done[i]:
                        new[i].append(token)
                        counts[i, token] += 1
                        done[i] = len(new[i]) == max_new_tokens
                fed.append(token)
            if all(done):
                break
            logits = rows.send(fed + [fed[-1]] * (self.batch_size - len(fed)))
            position += 1
        rows.close()
        return new


def prefill_chunks(n: int, lengths: Sequence[int], context: int) -> list[tuple[int, int, int]]:
    """How the LiteRT-LM engine (0.18) prefills a prompt of `n` tokens: `(prefill length, start, stop)`
    per call, tokens `start .. stop - 1` right-padded to the length. Read off the engine by running a
    file whose caches record which signature wrote each position (docs/guide.md):

    - the prompt's ids are cut into chunks, each the longest prefill length that the ids left fill
      and the cache holds from there, and a last one right-padded into the shortest that takes the rest;
    - a call holds its chunk's ids but the last, which waits for the next call (before that chunk's
      ids), and the prompt's last id goes to `decode`.
    """
    chunks, pending, start = [], 0, 0
    while start < n:
        fitting = [k for k in lengths if k <= n - start and start + k <= context]
        length = max(fitting) if fitting else min(k for k in lengths if k >= n - start)
        stop = min(start + length, n)
        if stop - 1 > pending:  # its tokens: the one waiting, and the chunk's ids but its last
            chunks.append((length, pending, stop - 1))
        pending, start = stop - 1, stop
    return chunks


class EdgeClassifier:
    """A `lmstack tflite` classifier file in ai-edge-litert: token ids of each text in, class scores out.

    The ids are the tokenizer's for the text alone; `encode` adds what the model was trained on
    ([EOS] first, the first `max_length - 1` tokens, [PAD]s after), as `pipelines.classifiers.encode`.

    Args:
        path: the .tflite file (its settings and tokenizer are packed inside it).
        num_threads: interpreter threads (None: the runtime's default).
    """

    def __init__(self, path: str | pathlib.Path, num_threads: int | None = None):
        self.path, self.info, self.tokenizer, self.interpreter = _open(path, num_threads, classifier=True)
        self.labels: list[str] = list(self.info["labels"])
        self.max_length, self.batch_size = int(self.info["max_length"]), int(self.info["batch_size"])
        self.eos_id, self.pad_id = int(self.info["eos_id"]), int(self.info["pad_id"])
        self._classify = self.interpreter.get_signature_runner("classify")

    def encode(self, ids: Sequence[int]) -> np.ndarray:
        row = np.full([self.max_length], self.pad_id, np.int32)
        kept = [self.eos_id, *ids][:self.max_length]
        row[:len(kept)] = kept
        return row

    def scores(self, texts_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Class probabilities `[N, C]`, `batch_size` texts per call (a short last call is padded)."""
        rows = np.stack([self.encode(ids) for ids in texts_ids]) if texts_ids else np.zeros([0, self.max_length])
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), axis=0)])
            out.append(self._classify(tokens=padded.astype(np.int32))["scores"][:len(chunk)])
        return np.concatenate(out) if out else np.zeros([0, len(self.labels)], np.float32)

    def classify(self, texts_ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.labels[i] for i in np.argmax(self.scores(texts_ids), axis=-1)]

    def classify_texts(self, texts: Sequence[str]) -> list[str]:
        """The label of each text, tokenized by the tokenizer packed in the file."""
        return self.classify([self.tokenizer.encode(text) for text in texts])


_MASK = 0xFFFFFFFF


def _mix32(x: np.ndarray) -> np.ndarray:
    """`models.samplers._mix32` in numpy (uint64 holding 32-bit values)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def uniform_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """`models.samplers.uniform_noise` for one row: the same float32 bits."""
    row = _mix32(np.uint64(seed & _MASK) ^ _mix32(np.uint64((position + 0x9E3779B9) & _MASK)))
    ids = (np.arange(vocab, dtype=np.uint64) * np.uint64(0x85EBCA6B)) & np.uint64(_MASK)
    bits = _mix32(row ^ ids)
    return ((bits >> 8).astype(np.float32) + np.float32(0.5)) / np.float32(1 << 24)


def penalize(logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """`models.samplers.penalize` for one row: float32, the same operations in the same order."""
    logits = logits.astype(np.float32)
    return (logits - np.float32(frequency) * counts) - np.float32(presence) * (counts > 0).astype(np.float32)


def choose(logits: np.ndarray, position: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
           seed: int = 0) -> int:
    """The next token, as `models.samplers.sample_next` picks it for one row (see there)."""
    logits = logits.astype(np.float32)
    if temperature <= 0:
        return int(np.argmax(logits))
    vocab = logits.size
    scaled = logits / np.float32(temperature)
    ranked = -np.sort(-scaled)
    k = min(top_k, vocab) if top_k > 0 else vocab
    in_top_k = np.arange(vocab) < k
    masked = np.where(in_top_k, ranked, -np.inf)
    probabilities = np.exp(masked - masked.max())
    probabilities /= probabilities.sum()
    mass_before = np.cumsum(probabilities) - probabilities
    p = top_p if 0 < top_p < 1 else 1.0
    kept = int(np.sum(in_top_k & (mass_before < p)))
    filtered = np.where(scaled >= ranked[kept - 1], scaled, -np.inf)
    noise = uniform_noise(seed, position, vocab)
    return int(np.argmax(filtered - np.log(-np.log(noise))))
