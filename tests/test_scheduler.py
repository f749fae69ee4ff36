"""Continuous batching: `lmstack serve`'s step scheduler against the call-by-call path it replaces."""

import functools
import threading
import time

import numpy as np
import pytest

from serving import client as client_lib
from serving import contract as c
from serving import server
from serving.contract import ServingError
from serving.server import scheduler
from serving.server.deadlines import Call
from tests.helpers import tiny_export
from tests.test_serve import start


def scheduled_core(base, **options):
    """A ModelServer whose versions schedule generation step by step (uncompiled, as most tests run)."""
    make = functools.partial(scheduler.for_version, options=scheduler.SchedulerOptions(**options), xla=False,
                             warm_up=False)
    core = server.ModelServer({"lm": server.ServedModel("lm", base, scheduler=make)})
    core.refresh()
    return core


def close(core):
    for loaded in core.models["lm"].versions.values():
        loaded.scheduler.close()


@pytest.fixture(scope="module")
def transformer(tmp_path_factory, english_text):
    _, exported = tiny_export("transformer", tmp_path_factory, english_text)
    scheduled, plain = scheduled_core(exported.parent, slots=32), server.ModelServer(
        {"lm": server.ServedModel("lm", exported.parent)})
    plain.refresh()
    yield scheduled, plain
    close(scheduled)


@pytest.fixture(scope="module")
def lstm(tmp_path_factory, english_text):
    """The LSTM has no context: a generation can run long enough to hold its slot."""
    _, exported = tiny_export("lstm", tmp_path_factory, english_text)
    return exported.parent


PROMPTS = np.array([b"ROMEO.", b"", b"To be, or not", b"What light through yonder window breaks"], object)
SAMPLED = {c.PROMPT: PROMPTS, c.MAX_NEW_TOKENS: np.array([9, 5, 12, 0], np.int32),
           c.TEMPERATURE: np.array([0.0, 1.3, 0.9, 1.0], np.float32), c.TOP_K: np.array([0, 5, 0, 0], np.int32),
           c.TOP_P: np.array([1.0, 1.0, 0.9, 1.0], np.float32), c.SEED: np.array([1, 2, 3, 4], np.int32)}


def test_scheduled_answers_equal_the_signatures_own(transformer):
    scheduled, plain = transformer
    loaded = scheduled.models["lm"].get(None)
    assert loaded.scheduler is not None and loaded.scheduler.slots == 32
    for signature, inputs in [(c.GENERATE, SAMPLED),
                              (c.SERVING_DEFAULT, {c.PROMPT: PROMPTS, c.MAX_NEW_TOKENS: np.array([15, 3, 7, 1])})]:
        _, got = scheduled.predict("lm", None, signature, inputs)
        _, want = plain.predict("lm", None, signature, inputs)
        assert set(got) == set(want)
        assert list(got[c.COMPLETION]) == list(want[c.COMPLETION])
        np.testing.assert_array_equal(got[c.TOKEN_IDS], want[c.TOKEN_IDS])  # the same shape, zero-padded
    _, empty = scheduled.predict("lm", None, c.SERVING_DEFAULT, {c.PROMPT: PROMPTS[:0],
                                                                 c.MAX_NEW_TOKENS: np.zeros([0], np.int32)})
    assert empty[c.COMPLETION].shape == (0,) and empty[c.TOKEN_IDS].shape == (0, 0)


def test_a_requests_text_does_not_depend_on_what_else_runs(transformer):
    """The same seed gives the same text alone or among 31 other sequences at other positions."""
    scheduled, _ = transformer
    one = {k: v[2:3] for k, v in SAMPLED.items()}
    _, alone = scheduled.predict("lm", None, c.GENERATE, one)
    results = {}

    def request(i):
        inputs = one if i == 0 else {**{k: v[i % 3:i % 3 + 1] for k, v in SAMPLED.items()},
                                     c.SEED: np.array([100 + i], np.int32),
                                     c.MAX_NEW_TOKENS: np.array([1 + i % 15], np.int32)}
        results[i] = scheduled.predict("lm", None, c.GENERATE, inputs)[1][c.COMPLETION][0]

    threads = [threading.Thread(target=request, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32
    assert results[0] == alone[c.COMPLETION][0] and len(alone[c.COMPLETION][0]) > 5


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_streams_come_from_the_slot_as_tokens_are_made(transformer, protocol):
    scheduled, _ = transformer
    grpc_server, rest_server, grpc_target, rest_target = start(scheduled)
    try:
        client = client_lib.connect(grpc_target if protocol == "grpc" else rest_target, protocol)
        for prompt, settings in [("ROMEO.", {}), ("", {}), ("To be", dict(temperature=1.4, top_k=20, seed=9))]:
            pieces = list(client.stream(prompt, 14, **settings))
            assert len(pieces) > 1  # the first token alone, then the rest as decoding calls make them
            assert "".join(pieces) == client.generate([prompt], 14, **settings)[0]
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)


def _slots_in_use(core) -> int:
    sched = core.models["lm"].get(None).scheduler
    with sched._cond:
        return sched.slots - len(sched._free)


def _wait_for(condition, seconds=30):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end
        time.sleep(0.02)


def test_a_full_queue_answers_resource_exhausted_and_a_stream_left_frees_its_slot(lstm):
    core = scheduled_core(lstm, slots=1, max_waiting=1)
    try:
        _, events = core.stream("lm", None, {c.PROMPT: "ROMEO.", c.MAX_NEW_TOKENS: 2000})
        assert next(events)["token_ids"]  # the first token: the one slot is taken
        waiting = threading.Thread(target=lambda: core.predict("lm", None, c.SERVING_DEFAULT, {
            c.PROMPT: np.array([b"To be"], object), c.MAX_NEW_TOKENS: np.array([5], np.int32)}))
        waiting.start()
        _wait_for(lambda: len(core.models["lm"].get(None).scheduler._waiting) == 1)
        with pytest.raises(ServingError) as full:
            core.predict("lm", None, c.SERVING_DEFAULT, {c.PROMPT: np.array([b"A"], object),
                                                         c.MAX_NEW_TOKENS: np.array([5], np.int32)})
        assert full.value.code == "RESOURCE_EXHAUSTED" and "--generation_max_waiting" in full.value.message
        assert c.HTTP_STATUS[full.value.code] == 429
        events.close()  # the client stops reading: the stream leaves at the next call
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        _wait_for(lambda: _slots_in_use(core) == 0)
    finally:
        close(core)


def test_a_passed_deadline_frees_the_slot_at_the_next_call(lstm):
    core = scheduled_core(lstm, slots=1)
    try:
        began = time.monotonic()
        with pytest.raises(ServingError) as late:
            core.predict("lm", None, c.SERVING_DEFAULT, {c.PROMPT: np.array([b"ROMEO."], object),
                                                         c.MAX_NEW_TOKENS: np.array([2000], np.int32)},
                         call=Call(timeout=0.05))
        assert late.value.code == "DEADLINE_EXCEEDED"
        _wait_for(lambda: _slots_in_use(core) == 0, seconds=10)
        assert time.monotonic() - began < 10  # it did not run its 2,000 tokens to the end
        _, out = core.predict("lm", None, c.SERVING_DEFAULT, {c.PROMPT: np.array([b"To be"], object),
                                                              c.MAX_NEW_TOKENS: np.array([6], np.int32)})
        assert np.count_nonzero(out[c.TOKEN_IDS]) > 0
    finally:
        close(core)


def test_closing_fails_what_is_left_with_unavailable(lstm):
    core = scheduled_core(lstm, slots=1)
    errors = []

    def long_request():
        try:
            core.predict("lm", None, c.SERVING_DEFAULT, {c.PROMPT: np.array([b"ROMEO."], object),
                                                         c.MAX_NEW_TOKENS: np.array([2000], np.int32)})
        except ServingError as e:
            errors.append(e.code)

    thread = threading.Thread(target=long_request)
    thread.start()
    _wait_for(lambda: _slots_in_use(core) == 1)
    close(core)
    thread.join(timeout=30)
    assert errors == ["UNAVAILABLE"]


@pytest.mark.slow
def test_memory_is_bounded_by_the_slot_pool(transformer):
    """Resident memory after 1,000 mixed requests stays within 10 % of what it was after the first 10."""
    from concurrent.futures import ThreadPoolExecutor

    scheduled, _ = transformer

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def request(i):
        inputs = {k: v[i % 3:i % 3 + 1] for k, v in SAMPLED.items()}
        inputs[c.MAX_NEW_TOKENS] = np.array([(8, 15, 3, 12)[i % 4]], np.int32)
        inputs[c.SEED] = np.array([i], np.int32)
        scheduled.predict("lm", None, c.GENERATE, inputs)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(request, range(10)))
        after_10 = rss()
        list(pool.map(request, range(10, 1000)))
    assert rss() < 1.1 * after_10, (after_10, rss())
    sched = scheduled.models["lm"].get(None).scheduler
    assert not sched._live and not sched._active and len(sched._free) == sched.slots  # nothing held on to
