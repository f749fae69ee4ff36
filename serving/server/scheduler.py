"""Continuous batching: generation scheduled one decoding step at a time over a pool of cache slots.

TensorFlow Serving batches a generation request like any other: the requests that arrive within
the batch timeout run as one `generate` call, which lasts as long as its longest row, while later
requests wait for all of it. LLM servers (vLLM, text-generation-inference, TensorRT-LLM) schedule
decoding steps instead, and so does this module, for every loaded version that has the step
signatures (`serving.contract`: prefill, decode, detokenize):

    requests ──► waiting rows ──► prefill thread: a free slot per row; prefill → first token out
                                      │ (the row's cache, staged)
                                      ▼
    pool     slot 0 │ slot 1 │ slot 2 │ ... │ slot P-1      one KV cache (an LSTM's state) per
                                      ▲                     sequence, kept between calls
                                      │
    decode thread: one call = up to `steps_per_call` steps for every active slot, each row at its
    own position (gathered from the pool, compiled per batch bucket, scattered back). A row that
    meets [EOS] or its max_new_tokens frees its slot at the end of the call and its answer (or its
    stream's last event) goes out; staged rows join the next call.

A row's tokens do not depend on what else is in the pool: each is chosen by the one sampling rule
from its own logits, position, settings and seed (`models.samplers`), so the text is the text of
the `generate` signature. The prefill runs on its own thread while the decode thread steps the
others, so a new request's first token does not wait for the running call.

A request's rows queue one by one; past `max_waiting` queued rows a request fails with
RESOURCE_EXHAUSTED. A request whose client has gone or whose deadline passed leaves the pool at
the next call (its slot is free again), and closing the scheduler fails what is left with
UNAVAILABLE.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import threading
import time
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from serving import contract as c
from serving.contract import ServingError
from serving.server.core import op_error_message
from serving.server.metrics import Registry
from serving.server.versions import LoadedVersion

log = logging.getLogger("lmstack.serve")

CACHE_BUDGET_BYTES = 1 << 30  # what the default pool may hold: 1 GiB of caches
MAX_DEFAULT_SLOTS = 32
FULL_BATCH = 16  # the batch `steps_per_call` is given for
_GREEDY = {c.TEMPERATURE: 0.0, c.TOP_K: 0, c.TOP_P: 1.0, c.SEED: 0}


@dataclasses.dataclass(frozen=True)
class SchedulerOptions:
    """How a server schedules generation (`lmstack serve`'s --generation_* flags).

    Attributes:
        slots: sequences decoded at once, each holding a cache (0: as many as 1 GiB of caches
            holds, at most 32 and at most the export's largest compiled batch).
        steps_per_call: decoding steps one call runs at a batch of 16 or more, before finished rows
            leave and waiting rows join (1 to 64): more spreads each call's fixed cost, fewer lets
            rows join sooner. A smaller batch, whose steps cost less, runs proportionally more (up
            to 64), so that a call takes about as long.
        max_waiting: rows that may wait for a slot; a request past it fails with RESOURCE_EXHAUSTED
            (0: 8 per slot).
    """
    slots: int = 0
    steps_per_call: int = 8
    max_waiting: int = 0

    def __post_init__(self):
        if self.slots < 0 or self.max_waiting < 0:
            raise ValueError("--generation_slots and --generation_max_waiting take 0 (the default) or more")
        if not 1 <= self.steps_per_call <= c.DECODE_STEPS:
            raise ValueError(f"--generation_steps_per_call={self.steps_per_call}: takes 1 to {c.DECODE_STEPS}")

    def steps(self, batch: int) -> int:
        """The steps of a call over `batch` sequences (see `steps_per_call`)."""
        return min(c.DECODE_STEPS, self.steps_per_call * max(1, FULL_BATCH // batch))


def for_version(loaded: LoadedVersion, options: SchedulerOptions, xla: bool, warm_up: bool, model_name: str = "",
                metrics: Registry | None = None) -> Scheduler | None:
    """A loaded version's scheduler, or None when its export has no step signatures (an export made
    before them, or a classifier): its generation requests then run call by call."""
    if not all(name in loaded.signatures for name in c.STEP_SIGNATURES):
        return None
    return Scheduler(loaded, options, xla, warm_up, model_name, metrics)


@dataclasses.dataclass(eq=False)
class _Row:
    """One sequence being generated: a row of a request."""
    generation: Generation
    prompt: bytes
    max_new: int
    sampling: tuple[float, int, float, int]
    penalties: tuple[float, float]  # presence, frequency
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1
    token: int = 0  # the last token, at `position`, not yet in the cache
    position: int = 0
    stopped: bool = False  # met [EOS]
    queued_at: float = 0.0  # time.monotonic() when it arrived
    last_at: float = 0.0  # ... when its last token was made


class Generation:
    """One request's rows on their way through the scheduler: wait for them, or read them as they grow."""

    def __init__(self, call, rows: int):
        self.call = call
        self.rows: list[_Row] = []
        self.error: ServingError | None = None
        self.cancelled = False
        self.streamed = False
        self._cond = threading.Condition()
        self._pending = rows

    def _update(self, done_rows: int = 0) -> None:
        with self._cond:
            self._pending -= done_rows
            self._cond.notify_all()

    def _fail(self, error: ServingError) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._pending <= 0 or self.error is not None

    def wait(self, row: _Row | None = None, seen: int = 0) -> bool:
        """Until every row is done, or (with `row`) until it holds more than `seen` tokens; returns
        whether every row is done. Raises the request's error (its own, or its call's when the
        client went away or the deadline passed: the rows then leave the pool at the next call)."""
        while True:
            with self._cond:
                if not self.done and (row is None or len(row.tokens) <= seen):
                    self._cond.wait(timeout=0.05)
                done = self.done
            if self.error is not None:
                raise self.error
            if self.call.abandoned():
                self.cancelled = True
                self.call.check()
                raise ServingError("CANCELLED", "the request was abandoned")
            if done or (row is not None and len(row.tokens) > seen):
                return done


class Scheduler:
    """The step scheduler of one loaded version (see the module docstring).

    Args:
        loaded: the version, with the step signatures.
        options: slots, steps per call, queue bound.
        xla: use the compiled signatures (prefill_xla, decode_xla).
        warm_up: compile decode_xla's batch buckets now (with `xla`).
        model_name, metrics: where its figures go (time to first token, time per output token, token
            counts, slots in use and waiting, decoding batch sizes, cancellations); None: nowhere.
    """

    def __init__(self, loaded: LoadedVersion, options: SchedulerOptions = SchedulerOptions(), xla: bool = False,
                 warm_up: bool = True, model_name: str = "", metrics: Registry | None = None):
        self.name = f"version {loaded.version}"
        self.model_name, self.metrics = model_name, metrics
        self._prefill = loaded.signatures[c.PREFILL_XLA if xla else c.PREFILL]
        self._decode = loaded.signatures[c.DECODE_XLA if xla else c.DECODE]
        self._detokenize = loaded.signatures[c.DETOKENIZE]
        spec = loaded.input_specs(c.DECODE)[c.CACHE]
        shape = list(spec.shape)
        if len(shape) == 5:  # a transformer's cache: its length is the context
            shape[3] = loaded.context
        self.batch_buckets = loaded.batch_buckets
        per_slot = int(np.prod(shape[1:])) * spec.dtype.size
        self.slots = options.slots or max(1, min(MAX_DEFAULT_SLOTS, self.batch_buckets[-1],
                                                 CACHE_BUDGET_BYTES // per_slot))
        self.options = options
        self.max_waiting = options.max_waiting or 8 * self.slots
        self._pool = tf.Variable(tf.zeros([self.slots] + shape[1:], spec.dtype), trainable=False)
        # Each slot's counts of the tokens it generated, for the presence and frequency penalties
        # (an export made before them has none: its requests take no penalties).
        vocab = (loaded.info.get("model") or {}).get("vocab_size")
        self._penalized = c.TOKEN_COUNTS in loaded.input_specs(c.DECODE) and vocab is not None
        self._counts = tf.Variable(tf.zeros([self.slots, vocab if self._penalized else 0]), trainable=False)
        self._step = tf.function(self._step_fn, reduce_retracing=True)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._free = list(range(self.slots))  # a heap: the lowest free slot first
        self._staged: list[tuple[list[_Row], tf.Tensor, tf.Tensor]] = []
        self._active: dict[int, _Row] = {}  # slot -> row
        self._live: set[Generation] = set()  # requests not yet done, wherever their rows are
        self._closed = False
        self._retiring = False
        if xla and warm_up:
            self._warm_up()
        self._threads = [threading.Thread(target=self._prefill_loop, name="prefill", daemon=True),
                         threading.Thread(target=self._decode_loop, name="decode", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("%s: generation scheduled step by step over %d slots (%.1f MB of caches), %d steps per call "
                 "at a batch of %d", self.name, self.slots, self.slots * per_slot / 1e6, options.steps_per_call,
                 FULL_BATCH)

    # -- requests --------------------------------------------------------------

    def generate(self, inputs: dict[str, np.ndarray], call) -> dict[str, np.ndarray]:
        """Runs a validated generate / serving_default request; returns its outputs as the signature does."""
        return self._outputs([r.tokens for r in self.run(inputs, call).rows])

    def run(self, inputs: dict[str, np.ndarray], call) -> Generation:
        """Runs a validated generate / serving_default request to its end: each of its `rows` holds its
        `tokens` and whether it `stopped` at [EOS]."""
        generation = self.submit(inputs, call)
        try:
            while not generation.wait():
                pass
        finally:
            generation.cancelled = generation.cancelled or not generation.done
        return generation


    def stream(self, inputs: dict[str, np.ndarray], call) -> Iterator[dict[str, Any]]:
        """One prompt's tokens as they are made: `{"text", "token_ids"}` events, then the last
        `{"completion", "finished"}` (the events of `ModelServer.stream`). Queues it now (a full
        queue fails here, before the first event)."""
        generation = self.submit(inputs, call)
        generation.streamed = True
        return self._events(generation)

    def _events(self, generation: Generation) -> Iterator[dict[str, Any]]:
        (row,) = generation.rows
        sent, shown, text = 0, "", ""
        try:
            done = generation.done
            while not done or sent < len(row.tokens):
                done = generation.wait(row, sent)
                new = row.tokens[sent:]
                if not new:
                    continue
                sent += len(new)
                text = self.texts([row.tokens[:sent]])[0]
                piece = ""
                if text.startswith(shown) and not text.endswith("\ufffd"):  # not half a character
                    piece, shown = text[len(shown):], text
                yield {"text": piece, "token_ids": new}
        finally:
            if not generation.done:
                generation.cancelled = True  # the client stopped reading: its slot frees at the next call
        if text != shown and text.startswith(shown):
            yield {"text": text[len(shown):], "token_ids": []}
        yield {"completion": text, "finished": row.stopped}

    def submit(self, inputs: dict[str, np.ndarray], call) -> Generation:
        """Queues a request's rows (validated inputs of generate or serving_default)."""
        prompts = inputs[c.PROMPT]
        generation = Generation(call, len(prompts))
        arrived = time.monotonic()
        settings = [np.broadcast_to(inputs.get(k, np.asarray(v)), prompts.shape) for k, v in _GREEDY.items()]
        penalties = [np.broadcast_to(inputs.get(k, np.float32(0)), prompts.shape)
                     for k in (c.PRESENCE_PENALTY, c.FREQUENCY_PENALTY)]
        if not self._penalized and any(p.any() for p in penalties):
            raise ServingError("FAILED_PRECONDITION", f"{self.name} was exported before lmstack took presence and "
                                                      "frequency penalties: export it again")
        for i, prompt in enumerate(prompts):
            prompt = prompt.encode() if isinstance(prompt, str) else bytes(prompt)
            generation.rows.append(_Row(generation, prompt, int(inputs[c.MAX_NEW_TOKENS][i]),
                                        tuple(s[i].item() for s in settings), tuple(float(p[i]) for p in penalties),
                                        queued_at=arrived))
        with self._cond:
            if self._closed:
                raise ServingError("UNAVAILABLE", "the server is shutting down")
            if len(self._waiting) + len(prompts) > self.max_waiting:
                raise ServingError("RESOURCE_EXHAUSTED", f"{len(self._waiting)} rows are waiting for the "
                                                         f"{self.slots} generation slots; the queue holds "
                                                         f"{self.max_waiting} (--generation_max_waiting): retry later")
            for row in generation.rows:
                if row.max_new <= 0:
                    generation._pending -= 1
                else:
                    self._waiting.append(row)
            if not generation.done:
                self._live.add(generation)
            self._cond.notify_all()
        return generation

    def retire(self) -> None:
        """Stops once the rows it holds are done (its version was unloaded; requests that hold it finish)."""
        with self._cond:
            self._retiring = True
            self._cond.notify_all()

    def close(self) -> None:
        """Fails what is waiting or running with UNAVAILABLE and stops the threads."""
        with self._cond:
            self._closed = True
            live, self._live = self._live, set()
            self._waiting.clear()
            self._cond.notify_all()
        for generation in live:  # waiting, in a prefill, staged or in the pool
            generation._fail(ServingError("UNAVAILABLE", "the server is shutting down"))

    # -- the two threads -------------------------------------------------------

    def _prefill_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._waiting and self._free):
                    self._cond.wait()
                if self._closed:
                    return
                rows = []
                while self._waiting and self._free:
                    row = self._waiting.popleft()
                    if not self._abandoned(row):
                        row.slot = heapq.heappop(self._free)
                        rows.append(row)
            if rows:
                self._run_prefill(rows)

    def _run_prefill(self, rows: list[_Row]) -> None:
        started = time.monotonic()
        try:
            out = self._prefill(**{c.PROMPT: tf.constant([r.prompt for r in rows]),
                                   c.MAX_NEW_TOKENS: tf.constant([r.max_new for r in rows], tf.int32),
                                   **self._sampling(rows)})
            first, counts, stopped = out[c.TOKEN].numpy(), out[c.NUM_TOKENS].numpy(), out[c.FINISHED].numpy()
        except Exception as e:
            self._fail(rows, e)
            return
        staying, stay_rows = [], []
        now = time.monotonic()
        for i, row in enumerate(rows):
            row.position = int(counts[i])
            row.token, row.stopped = int(first[i]), bool(stopped[i])
            if not row.stopped:
                row.tokens.append(row.token)
                row.last_at = now
            if self.metrics is not None:
                streamed = "true" if row.generation.streamed else "false"
                self.metrics.queuing_latency.observe(self.model_name, value=(started - row.queued_at) * 1e6)
                self.metrics.prompt_tokens.observe(self.model_name, value=row.position)
                if not row.stopped:
                    self.metrics.time_to_first_token.observe(self.model_name, streamed, value=now - row.queued_at)
            if row.stopped or len(row.tokens) >= row.max_new:
                self._finish(row)
            else:
                staying.append(i)
                stay_rows.append(row)
            row.generation._update()
        if stay_rows:
            cache = out[c.CACHE] if len(staying) == len(rows) else tf.gather(out[c.CACHE], staying)
            counts = tf.one_hot([r.token for r in stay_rows], self._counts.shape[1])  # the first new token
            with self._cond:
                self._staged.append((stay_rows, cache, counts))
                self._cond.notify_all()

    def _decode_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._active and not self._staged:
                    if self._retiring and not self._waiting and len(self._free) == self.slots:
                        self._closed = True  # unloaded and idle: the threads end, the pool goes
                        self._cond.notify_all()
                        break
                    self._cond.wait(timeout=1.0 if self._retiring else None)
                if self._closed:
                    self._pool = None
                    return
                staged, self._staged = self._staged, []
            try:
                for rows, cache, counts in staged:
                    self._pool.scatter_nd_update([[r.slot] for r in rows], cache)
                    self._counts.scatter_nd_update([[r.slot] for r in rows], counts)
                with self._cond:
                    for rows, _, _ in staged:
                        self._active.update((r.slot, r) for r in rows)
                    for row in [r for r in self._active.values() if self._abandoned(r)]:
                        self._free_slot(row)
                    rows = sorted(self._active.values(), key=lambda r: r.slot)
                    spare = [s for s in range(self.slots) if s not in self._active]
                    waiting = bool(self._waiting)
                    self._gauges(len(rows))
                if rows:
                    self._run_decode(rows, spare, waiting)
            except Exception as e:  # a bug or a TensorFlow error: the rows in the pool fail, the server goes on
                with self._cond:
                    rows = list(self._active.values())
                self._fail(rows, e)

    def _run_decode(self, rows: list[_Row], spare: list[int], waiting: bool) -> None:
        remaining = [r.max_new - len(r.tokens) for r in rows]
        size = next((b for b in self.batch_buckets if b >= len(rows)), len(rows))
        steps = self.options.steps(size)
        if waiting:  # rows wait for a slot: stop when the first row can finish, so it frees its slot
            steps = min(steps, min(remaining))
        pad = size - len(rows)
        slots = [r.slot for r in rows] + spare[:pad]
        ids, counts = self._step(
            tf.constant(slots, tf.int32), tf.constant([r.token for r in rows] + [0] * pad, tf.int32),
            tf.constant([r.position for r in rows] + [0] * pad, tf.int32),
            tf.constant([min(steps, n) for n in remaining] + [0] * pad, tf.int32), self._sampling(rows, pad),
            self._penalties(rows, pad))
        ids, counts = ids.numpy(), counts.numpy()
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_size.observe(self.model_name, value=len(rows))
        for i, row in enumerate(rows):
            count = int(counts[i])
            wanted = min(steps, remaining[i])
            if count:
                row.tokens.extend(ids[i, :count].tolist())
                row.token, row.position = row.tokens[-1], row.position + count
                if self.metrics is not None:
                    self.metrics.time_per_output_token.observe(
                        self.model_name, "true" if row.generation.streamed else "false",
                        value=(now - row.last_at) / count)
                row.last_at = now
            row.stopped = count < wanted
            if row.stopped or len(row.tokens) >= row.max_new:
                self._finish(row)
            row.generation._update()

    def _step_fn(self, slots, token, position, steps, sampling, penalties):
        if self._penalized:
            penalties = {**penalties, c.TOKEN_COUNTS: tf.gather(self._counts, slots)}
        out = self._decode(**{c.TOKEN: token, c.POSITION: position, c.CACHE: tf.gather(self._pool, slots),
                              c.STEPS: steps, **sampling, **penalties})
        self._pool.scatter_nd_update(slots[:, tf.newaxis], out[c.CACHE])
        if self._penalized:
            self._counts.scatter_nd_update(slots[:, tf.newaxis], out[c.TOKEN_COUNTS])
        return out[c.TOKEN_IDS], out[c.NUM_TOKENS]

    def _warm_up(self) -> None:
        """Compiles decode_xla for every batch bucket up to the pool's size (a call of no steps)."""
        for size in [b for b in self.batch_buckets if b <= self.slots]:
            zeros = tf.zeros([size], tf.int32)
            self._step(tf.range(size), zeros, zeros, zeros, self._sampling([], size), self._penalties([], size))

    # -- helpers -----------------------------------------------------------------

    def _sampling(self, rows: list[_Row], pad: int = 0) -> dict[str, tf.Tensor]:
        values = [r.sampling for r in rows] + [tuple(_GREEDY.values())] * pad
        columns = list(zip(*values)) if values else [()] * 4
        return {c.TEMPERATURE: tf.constant(columns[0], tf.float32), c.TOP_K: tf.constant(columns[1], tf.int32),
                c.TOP_P: tf.constant(columns[2], tf.float32), c.SEED: tf.constant(columns[3], tf.int32)}

    def _penalties(self, rows: list[_Row], pad: int = 0) -> dict[str, tf.Tensor]:
        if not self._penalized:
            return {}
        values = [r.penalties for r in rows] + [(0.0, 0.0)] * pad
        return {c.PRESENCE_PENALTY: tf.constant([v[0] for v in values], tf.float32),
                c.FREQUENCY_PENALTY: tf.constant([v[1] for v in values], tf.float32)}

    def _gauges(self, active: int) -> None:
        """Sequences in the slots and waiting for one, on the metrics page (called under the lock)."""
        if self.metrics is not None:
            self.metrics.waiting_rows.set(self.model_name, value=len(self._waiting))
            self.metrics.active_rows.set(self.model_name, value=active)

    def _abandoned(self, row: _Row) -> bool:
        """A row of a request that failed, was given up or whose call was abandoned (called under the lock)."""
        g = row.generation
        if g.error is None and not g.cancelled and not g.call.abandoned():
            return False
        self._live.discard(g)
        if g.error is None:
            if self.metrics is not None:
                reason = "deadline" if g.call.expired() else "disconnect" if g.call.abandoned() else "stopped_reading"
                self.metrics.cancelled_requests.inc(self.model_name, reason)
            try:
                g.call.check()
                g._fail(ServingError("CANCELLED", "the request was abandoned"))
            except ServingError as e:
                g._fail(e)
        return True

    def _free_slot(self, row: _Row) -> None:
        """Gives a row's slot back, whether it was in the pool or only prefilled (under the lock)."""
        if row.slot >= 0:
            self._active.pop(row.slot, None)
            heapq.heappush(self._free, row.slot)
            row.slot = -1
            self._cond.notify_all()

    def _finish(self, row: _Row) -> None:
        """A row is done: its slot frees, and its request completes once every row is."""
        if self.metrics is not None:
            self.metrics.generated_tokens.observe(self.model_name, value=len(row.tokens))
        with self._cond:
            self._free_slot(row)
            self._gauges(len(self._active))  # before its request hears it is done
        row.generation._update(done_rows=1)
        if row.generation.done:
            with self._cond:
                self._live.discard(row.generation)

    def _fail(self, rows: list[_Row], error: Exception) -> None:
        if isinstance(error, ServingError):
            failure = error
        elif isinstance(error, tf.errors.OpError):
            failure = ServingError("INTERNAL", op_error_message(error.message))
        else:
            log.error("generation failed: %s: %s", type(error).__name__, str(error).splitlines()[:1])
            failure = ServingError("INTERNAL", f"internal error: {type(error).__name__}")
        with self._cond:
            for row in rows:
                self._free_slot(row)
            self._live.difference_update(row.generation for row in rows)
        for row in rows:
            row.generation._fail(failure)

    def texts(self, token_lists: list[list[int]]) -> list[str]:
        """The text of each list of tokens."""
        return [t.decode("utf-8", errors="replace") for t in self._outputs(token_lists)[c.COMPLETION]]

    def _outputs(self, token_lists: list[list[int]]) -> dict[str, np.ndarray]:
        """The signature's outputs for these rows' tokens: their text, and the ids zero-padded."""
        ids, counts = _padded(token_lists)
        if not token_lists:
            return {c.COMPLETION: np.zeros([0], object), c.TOKEN_IDS: ids}
        out = self._detokenize(**{c.TOKEN_IDS: tf.constant(ids), c.NUM_TOKENS: tf.constant(counts)})
        return {c.COMPLETION: out[c.TEXT].numpy(), c.TOKEN_IDS: ids}


def _padded(token_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(t) for t in token_lists), default=0)
    ids = np.zeros([len(token_lists), width], np.int32)
    for i, tokens in enumerate(token_lists):
        ids[i, :len(tokens)] = tokens
    return ids, np.array([len(t) for t in token_lists], np.int32)
