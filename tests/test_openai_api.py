"""The OpenAI-compatible API, driven by the official `openai` client against a real `lmstack serve`."""

import http.client
import json
import shutil
import socket
import time

import numpy as np
import openai
import pytest
import tensorflow as tf

from serving import client as client_lib
from serving import contract as c
from serving import server

CHAT_TEMPLATE = {"template": "{% for m in messages %}{{ m.content }}{% endfor %}=", "stop": [" ", "e", "."],
                 "bos_token": "", "eos_token": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(served_bases, tmp_path_factory):
    """One server: "gpt" (context 16), "lstm" (no context), and "chatty", the transformer with its own
    chat template in its export's config (as `lmstack export --chat_template` writes it)."""
    root = tmp_path_factory.mktemp("openai")
    shutil.copytree(served_bases / "transformer", root / "chatty")
    config_file = root / "chatty" / "1" / c.ASSETS_EXTRA / c.CONFIG_FILE
    info = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**info, "chat_template": CHAT_TEMPLATE}))
    models = root / "models.config"
    models.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }}\n'
        for name, path in (("gpt", served_bases / "transformer"), ("lstm", served_bases / "lstm"),
                           ("chatty", root / "chatty"))) + "}\n")
    running = server.Server.build_and_start(server.Options(
        model_config_file=str(models), port=0, rest_api_port=0, openai_api_port=free_port(),
        file_system_poll_wait_seconds=0, max_request_bytes=1 << 20))
    yield running, openai.OpenAI(base_url=f"http://localhost:{running.openai_port}/v1", api_key="unused",
                                 max_retries=0, timeout=60)
    running.stop(grace=0)


def generate(running, model, prompts, new, temperature=0.0, seed=0, top_p=1.0):
    """The Predict API's `generate` signature on the same server: what the OpenAI answers must equal."""
    _, out = running.core.predict(model, None, c.GENERATE, {
        c.PROMPT: np.array(prompts, object), c.MAX_NEW_TOKENS: np.full([len(prompts)], new, np.int32),
        c.TEMPERATURE: np.full([len(prompts)], temperature, np.float32), c.TOP_K: np.zeros([len(prompts)], np.int32),
        c.TOP_P: np.full([len(prompts)], top_p, np.float32), c.SEED: np.array(seed, np.int32).reshape(-1)
        if np.ndim(seed) else np.full([len(prompts)], seed, np.int32)})
    return [t.decode() for t in out[c.COMPLETION]], [int(np.count_nonzero(row)) for row in out[c.TOKEN_IDS]]


def test_models_are_listed_and_picked_by_name_version_or_unknown(served):
    running, client = served
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"gpt", "lstm", "chatty"}
    assert listed["gpt"].owned_by == "lmstack" and listed["gpt"].model_extra["max_model_len"] == 16
    assert "max_model_len" not in listed["lstm"].model_extra
    assert client.models.retrieve("lstm:1").id == "lstm:1"
    for missing in ("nope", "lstm:7", "lstm:nolabel"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(missing)
        assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_greedy_completion_is_generates_text_with_exact_usage(served, model):
    running, client = served
    prompts = ["ROMEO.", "To be"]
    out = client.completions.create(model=model, prompt=prompts, max_tokens=9, temperature=0)
    texts, counts = generate(running, model, prompts, 9)
    assert [ch.text for ch in out.choices] == texts and [ch.index for ch in out.choices] == [0, 1]
    assert [ch.finish_reason for ch in out.choices] == ["stop" if n < 9 else "length" for n in counts]
    # The char model reads a character a token: 6 + 5 prompt tokens.
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (11, sum(counts))
    assert out.usage.total_tokens == 11 + sum(counts) and out.object == "text_completion" and out.model == model
    echoed = client.completions.create(model=model, prompt="ROMEO.", max_tokens=9, temperature=0, echo=True)
    assert echoed.choices[0].text == "ROMEO." + texts[0]


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_a_stream_adds_up_to_the_whole_answer(served, model):
    running, client = served
    whole = client.completions.create(model=model, prompt="ROMEO.", max_tokens=9, n=2, seed=11)
    chunks = list(client.completions.create(model=model, prompt="ROMEO.", max_tokens=9, n=2, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(ch.text for ch in mine) == whole.choices[i].text
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == [whole.choices[i].finish_reason]
        assert mine[-1].finish_reason is not None
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(ch.usage is None for ch in chunks[:-1]) and all(ch.object == "text_completion" for ch in chunks)


def test_n_choices_with_a_seed_are_the_signatures_and_reproducible(served):
    running, client = served
    first = client.completions.create(model="lstm", prompt="ROMEO.", max_tokens=12, n=3, seed=7, temperature=1.0)
    again = client.completions.create(model="lstm", prompt="ROMEO.", max_tokens=12, n=3, seed=7, temperature=1.0)
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]
    # Choice j is generate's row with seed + j: what a TF Serving client gets for the same settings.
    texts, _ = generate(running, "lstm", ["ROMEO."] * 3, 12, temperature=1.0, seed=np.array([7, 8, 9]))
    assert [ch.text for ch in first.choices] == texts
    assert len(set(texts)) > 1


def test_logprobs_are_the_models_next_token_distributions(served):
    running, client = served
    loaded = running.core.models["lstm"].get(None)
    out = client.completions.create(model="lstm", prompt="ROMEO.", max_tokens=6, temperature=0, logprobs=3)
    logprobs = out.choices[0].logprobs
    assert "".join(logprobs.tokens) == out.choices[0].text and len(logprobs.tokens) == out.usage.completion_tokens
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    # Independently: log_softmax of next_token_logits after the prompt and the tokens before.
    ids = loaded.signatures[c.TOKENIZE](text=tf.constant(["ROMEO." + out.choices[0].text]))[c.TOKEN_IDS]
    ids = ids.numpy()[0].tolist()
    for t, (token, value, top) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)):
        logits = loaded.signatures[c.NEXT_TOKEN_LOGITS](token_ids=tf.constant([ids[:6 + t]]),
                                                       num_tokens=tf.constant([6 + t]))[c.LOGITS]
        log_p = tf.nn.log_softmax(logits[0]).numpy()
        assert value == pytest.approx(float(log_p[ids[6 + t]]), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(float(log_p.max()), abs=1e-4)
        assert top[token] == pytest.approx(value, abs=1e-6)  # greedy: the chosen token is the likeliest
    # An eval harness's scoring call: the prompt echoed with its logprobs, nothing generated.
    scored = client.completions.create(model="lstm", prompt="To be", max_tokens=0, echo=True, logprobs=0)
    logprobs = scored.choices[0].logprobs
    assert logprobs.tokens == list("To be") and logprobs.token_logprobs[0] is None
    assert all(v < 0 for v in logprobs.token_logprobs[1:]) and logprobs.top_logprobs[1] == {}
    chat = client.chat.completions.create(model="lstm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode() == entry.token for entry in content)


def test_penalties_steer_greedy_decoding_the_same_whole_or_streamed(served):
    running, client = served
    loaded = running.core.models["lstm"].get(None)
    settings = dict(model="lstm", prompt="ROMEO.", max_tokens=10, temperature=0, frequency_penalty=1.5,
                    presence_penalty=0.5)
    plain = client.completions.create(**{**settings, "frequency_penalty": 0, "presence_penalty": 0})
    whole = client.completions.create(**settings)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**settings, stream=True))
    assert whole.choices[0].text == streamed != plain.choices[0].text
    # Each token is the argmax of the model's logits less the penalties of the tokens before it.
    ids = loaded.signatures[c.TOKENIZE](text=tf.constant(["ROMEO." + whole.choices[0].text]))[c.TOKEN_IDS]
    ids = ids.numpy()[0].tolist()
    counts = np.zeros(10_000)
    for t in range(6, len(ids)):
        logits = loaded.signatures[c.NEXT_TOKEN_LOGITS](token_ids=tf.constant([ids[:t]]),
                                                       num_tokens=tf.constant([t]))[c.LOGITS].numpy()[0]
        penalized = logits - 1.5 * counts[:len(logits)] - 0.5 * (counts[:len(logits)] > 0)
        assert penalized[ids[t]] >= penalized.max() - 1e-5
        counts[ids[t]] += 1
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**{**settings, "frequency_penalty": 2.5})


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them_even_across_tokens(served, stream):
    running, client = served
    (full,), _ = generate(running, "lstm", ["ROMEO."], 40, temperature=1.0, seed=3)
    stop = full[10:13]  # three characters: three tokens of the char model
    cut = full.index(stop)
    kwargs = dict(model="lstm", prompt="ROMEO.", max_tokens=40, temperature=1.0, seed=3, stop=["zzzzz", stop])
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        out = client.completions.create(**kwargs)
        text, reason, usage = out.choices[0].text, [out.choices[0].finish_reason], out.usage
    assert text == full[:cut] and reason == ["stop"]
    # Every token made until the stop was seen: at least those of the text and the stop.
    assert cut + len(stop) <= usage.completion_tokens < 40


def test_chat_applies_the_models_template_and_its_stop(served):
    running, client = served
    messages = [{"role": "system", "content": "Be"}, {"role": "user", "content": [{"type": "text", "text": "ROMEO"}]}]
    settings = dict(model="chatty", messages=messages, max_tokens=8, temperature=1.0, seed=5)
    out = client.chat.completions.create(**settings)
    # The template makes "BeROMEO=" (8 tokens), and the turn ends at its first stop.
    (full,), _ = generate(running, "chatty", ["BeROMEO="], 8, temperature=1.0, seed=5)
    cut = min(i for i in (full.find(s) for s in CHAT_TEMPLATE["stop"]) if i >= 0)
    assert out.choices[0].message.content == full[:cut] and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == 8 and out.object == "chat.completion"
    chunks = list(client.chat.completions.create(**settings, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Without a template of its own a model lays the conversation out as plain lines, and the
    # default max_tokens is what the context leaves (none here: the server's limit).
    plain = client.chat.completions.create(model="lstm", messages=[{"role": "user", "content": "Hi"}],
                                           max_completion_tokens=5, temperature=0)
    (full,), _ = generate(running, "lstm", ["User: Hi\nAssistant:"], 5)
    assert plain.choices[0].message.content == full.split("\nUser:")[0] and plain.usage.prompt_tokens == 19


@pytest.mark.parametrize("call, status, param, words", [
    (dict(prompt="ROMEO.", max_tokens=12), 400, "max_tokens", "maximum context length is 16 tokens"),
    (dict(prompt="ROMEO." * 3, max_tokens=1), 400, "max_tokens", "shorten the prompt to 15 tokens"),
    (dict(prompt="a", max_tokens=10**6), 400, "max_tokens", "--max_new_tokens_limit"),
    (dict(prompt="a", n=10**4), 400, "n", "'n' is 1 to 128"),
    (dict(prompt=["a"] * 100, n=3), 400, "n", "--max_request_rows"),
    (dict(prompt="a", stop=["x"] * 10_000), 400, "stop", "up to 4"),
    (dict(prompt="a", stop="x" * 300), 400, "stop", "1 to 256 characters"),
    (dict(prompt="a", temperature=7), 400, "temperature", "0 to 2"),
    (dict(prompt="a", max_tokens="9"), 400, "max_tokens", "an integer"),
    (dict(prompt=[1, 2, 3]), 400, "prompt", "not token ids"),
    (dict(prompt="a", suffix="b"), 400, "suffix", "not supported"),
    (dict(prompt="a", presence_penalty=-3), 400, "presence_penalty", "-2 to 2"),
    (dict(prompt="a", logprobs=6), 400, "logprobs", "0 to 5"),
    (dict(prompt="a", logprobs=2, stream=True), 400, "logprobs", "whole answers only"),
    (dict(prompt="a", extra_body={"tools": [{"type": "function"}]}), 400, "tools", "do not call tools"),
    (dict(prompt="a", extra_body={"colour": "blue"}), 400, "colour", "Unrecognized request argument"),
    (dict(prompt="a", stream_options={"include_usage": True}), 400, "stream_options", "only allowed when"),
])
def test_bad_requests_answer_one_openai_shaped_error(served, call, status, param, words):
    running, client = served
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="gpt", **call)
    assert e.value.status_code == status
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_hostile_bodies_get_an_error_and_the_server_keeps_answering(served):
    running, client = served
    port = running.openai_port

    def post(path, body: bytes, headers=None):
        connection = http.client.HTTPConnection("localhost", port, timeout=30)
        connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, json.loads(data)

    for body in (b"{not json", b"\xff\xfe\x00bad", b"[1, 2]", b'"text"'):
        status, answer = post("/v1/completions", body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    # A body past --max_request_bytes is refused from its Content-Length, before it is read.
    connection = http.client.HTTPConnection("localhost", port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    status, answer = post("/v1/chat/completions", json.dumps({"model": "lstm", "messages": [
        {"role": "tool", "content": "x"}]}).encode())
    assert status == 400 and "do not call tools" in answer["error"]["message"]
    status, answer = post("/v1/embeddings", b"{}")
    assert status == 404 and "Unknown route" in answer["error"]["message"]
    # A slow client: half a body, then nothing. The server answers the others meanwhile.
    slow = socket.create_connection(("localhost", port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":")
    assert client.completions.create(model="lstm", prompt="a", max_tokens=2).choices[0].text is not None
    slow.close()


def test_a_stream_whose_client_leaves_frees_its_slot(served):
    running, client = served
    scheduler = running.core.models["lstm"].get(None).scheduler
    body = json.dumps({"model": "lstm", "prompt": "ROMEO.", "max_tokens": 2000, "stream": True}).encode()
    connection = http.client.HTTPConnection("localhost", running.openai_port, timeout=30)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    response.close()
    connection.close()
    deadline = time.monotonic() + 30
    while scheduler._live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scheduler._live  # the generation left the pool long before its 2,000 tokens


def test_openai_and_tf_serving_requests_share_the_server(served):
    running, client = served
    import concurrent.futures

    rest = client_lib.connect(f"localhost:{running.rest_port}", "rest", model_name="lstm")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        openai_answers = [pool.submit(client.completions.create, model="lstm", prompt="ROMEO.", max_tokens=10,
                                      temperature=0) for _ in range(4)]
        tf_answers = [pool.submit(rest.predict, c.SERVING_DEFAULT, {c.PROMPT: ["ROMEO."], c.MAX_NEW_TOKENS: [10]})
                      for _ in range(4)]
        texts = {f.result().choices[0].text for f in openai_answers}
        texts |= {f.result()[c.COMPLETION][0] for f in tf_answers}
    assert len(texts) == 1


def test_keys_are_required_when_given_and_reread_when_changed(served_bases, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# the team's keys\nsk-first\n\n")
    running = server.Server.build_and_start(server.Options(
        model_base_path=str(served_bases / "lstm"), port=0, rest_api_port=0, openai_api_port=free_port(),
        openai_api_keys_file=str(keys), file_system_poll_wait_seconds=0))
    try:
        url = f"http://localhost:{running.openai_port}/v1"
        ask = lambda key: openai.OpenAI(base_url=url, api_key=key, max_retries=0).completions.create(
            model="lm", prompt="a", max_tokens=1)
        assert ask("sk-first").choices
        with pytest.raises(openai.AuthenticationError) as e:
            ask("sk-wrong")
        assert e.value.body["code"] == "invalid_api_key"
        keys.write_text("sk-second\n")
        time.sleep(0.01)
        assert ask("sk-second").choices
        with pytest.raises(openai.AuthenticationError):
            ask("sk-first")
        connection = http.client.HTTPConnection("localhost", running.openai_port, timeout=30)
        connection.request("GET", "/v1/models")  # no Authorization header at all
        assert connection.getresponse().status == 401
    finally:
        running.stop(grace=0)
