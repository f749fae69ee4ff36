"""`lmstack export`: the SavedModel's four signatures, its layout, and the clients that call it."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import models
from pipelines import checkpoints, prepare, tokenizers
from pipelines.errors import ConfigError, UserError
from pipelines.generate import TextGenerator, encode
from pipelines.launch import free_ports
from serving import client as client_lib
from serving import contract as c
from serving import server
from serving.exporters import savedmodel
from tests.helpers import run_cli, tiny_export

PROMPTS = ["ROMEO.", "", "What light through yonder window breaks"]


@pytest.fixture(scope="module", params=["transformer", pytest.param("lstm", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory, english_text):
    """The signature tests run on both families."""
    workdir, path = tiny_export(request.param, tmp_path_factory, english_text)
    return workdir, path, tf.saved_model.load(str(path))


@pytest.fixture(scope="module")
def transformer(tmp_path_factory, english_text):
    """Layout, versions, reloading and clients do not depend on the family: the transformer only."""
    workdir, path = tiny_export("transformer", tmp_path_factory, english_text)
    return workdir, path, tf.saved_model.load(str(path))


def call(loaded, signature, **inputs):
    return {k: v.numpy() for k, v in loaded.signatures[signature](**inputs).items()}


def complete(loaded, prompts, max_new_tokens, signature=c.SERVING_DEFAULT):
    return call(loaded, signature, prompt=tf.constant(prompts), max_new_tokens=tf.constant(max_new_tokens, tf.int32))


def sample(loaded, prompts, seeds, temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=12, signature=c.GENERATE):
    n = len(prompts)
    as_row = lambda v, dtype: tf.constant(v, dtype) if isinstance(v, list) else tf.fill([n], tf.constant(v, dtype))
    return call(loaded, signature, prompt=tf.constant(prompts), max_new_tokens=tf.fill([n], max_new_tokens),
                temperature=as_row(temperature, tf.float32), top_k=as_row(top_k, tf.int32),
                top_p=as_row(top_p, tf.float32), seed=tf.constant(seeds, tf.int32))


def test_layout(transformer):
    workdir, path, _ = transformer
    assert path == workdir / "export" / "lm" / "1"
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    assert (path / "assets" / "vocabulary.json").is_file()  # the char tokenizer's vocabulary
    info = json.loads((path / c.ASSETS_EXTRA / c.CONFIG_FILE).read_text())
    assert info["checkpoint_step"] == 40
    assert info["model"] == models.config_to_json(checkpoints.read_model_config(workdir))
    assert set(info["signatures"]) == set(c.SIGNATURES)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_signature_shapes_and_dtypes(exported):
    workdir, _, loaded = exported
    assert set(loaded.signatures) == set(c.SIGNATURES)
    # The cache's rank is the model's: a transformer's keys and values, an LSTM's state.
    cache_rank = 5 if isinstance(checkpoints.read_model_config(workdir), models.GPTConfig) else 4
    rank = lambda t: cache_rank if t.rank is None else t.rank
    for name, contract in c.SIGNATURES.items():
        fn = loaded.signatures[name]
        inputs = fn.structured_input_signature[1]
        assert {k: (v.dtype.name, v.shape.rank) for k, v in inputs.items()} == {
            k: (t.dtype, rank(t)) for k, t in contract.inputs.items()}
        assert {k: (v.dtype.name, v.shape.rank) for k, v in fn.structured_outputs.items()} == {
            k: (t.dtype, rank(t)) for k, t in contract.outputs.items()}
    out = complete(loaded, PROMPTS, [12, 5, 0])
    assert out[c.COMPLETION].shape == (3,) and out[c.TOKEN_IDS].shape == (3, 12)
    assert out[c.COMPLETION][2] == b"" and not out[c.TOKEN_IDS][2].any()  # max_new_tokens=0


def test_greedy_equals_lmstack_generate_token_for_token(exported):
    workdir, _, loaded = exported
    generator = TextGenerator(workdir)
    out = complete(loaded, PROMPTS, [12] * 3)
    # `lmstack generate` streams; test_generate checks that streaming equals this batched loop.
    expected = generator.generate(PROMPTS, 12)
    for text, ids, reference in zip(out[c.COMPLETION], out[c.TOKEN_IDS], expected):
        assert text.decode("utf-8") == reference
        assert [int(i) for i in ids if i] == encode(generator.tokenizer, reference)


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(exported):
    _, _, loaded = exported
    first = sample(loaded, ["ROMEO.", "ROMEO.", "ROMEO."], [1, 1, 2])[c.COMPLETION]
    again = sample(loaded, ["ROMEO."], [1])[c.COMPLETION]
    assert first[0] == first[1] == again[0]
    assert first[0] != first[2]  # another seed, other text (temperature 1.5 on a barely trained model)
    # top_k=1 is greedy whatever the seed.
    greedy = complete(loaded, ["ROMEO."], [12])[c.COMPLETION]
    assert sample(loaded, ["ROMEO."], [5], top_k=1)[c.COMPLETION] == greedy


def test_compiled_signatures_answer_as_the_uncompiled_ones(exported):
    """The _xla signatures: same tokens, whether a request fits a bucket (padded) or not (run uncompiled)."""
    _, path, loaded = exported
    info = json.loads((path / c.ASSETS_EXTRA / c.CONFIG_FILE).read_text())
    assert info["xla_buckets"]["batch"] == [1, 4]
    # 1 row; 3 rows (padded to 4); 6 rows (past the largest bucket); lengths in and past the buckets.
    for prompts, new in [(["ROMEO."], [9]), (PROMPTS, [12, 5, 0]), (PROMPTS * 2, [3, 12, 7, 1, 0, 9]),
                         (["", "Enter"], [15, 2])]:
        plain, compiled = complete(loaded, prompts, new), complete(loaded, prompts, new, c.SERVING_DEFAULT_XLA)
        np.testing.assert_array_equal(compiled[c.TOKEN_IDS], plain[c.TOKEN_IDS])
        np.testing.assert_array_equal(compiled[c.COMPLETION], plain[c.COMPLETION])
    # Sampling: each row its own settings and seed; the same noise compiled or not.
    prompts = ["ROMEO.", "ROMEO.", "JULIET.", ""]
    settings = dict(seeds=[1, 2, 3, 4], temperature=[1.5, 0.0, 0.7, 2.0], top_k=[0, 0, 5, 3],
                    top_p=[1.0, 1.0, 0.9, 0.5])
    plain = sample(loaded, prompts, **settings)
    compiled = sample(loaded, prompts, **settings, signature=c.GENERATE_XLA)
    np.testing.assert_array_equal(compiled[c.TOKEN_IDS], plain[c.TOKEN_IDS])


def vocab_size(loaded) -> int:
    logits = call(loaded, c.NEXT_TOKEN_LOGITS, token_ids=tf.constant([[3]]), num_tokens=tf.constant([1]))
    return logits[c.LOGITS].shape[1]


def step_by_step(loaded, prompts, new, settings, compiled: bool, steps: int = 3, penalties=(0.0, 0.0)):
    """Generation through prefill, decode (at most `steps` per call, rows at their own positions) and
    detokenize, as a server's scheduler drives them: (texts, token lists, the token counts decode kept)."""
    suffix = c.XLA_SUFFIX if compiled else ""
    n = len(prompts)
    sampling = {k: tf.constant(v) for k, v in settings.items()}
    penalized = {c.PRESENCE_PENALTY: tf.fill([n], penalties[0]), c.FREQUENCY_PENALTY: tf.fill([n], penalties[1])}
    first = loaded.signatures[c.PREFILL + suffix](prompt=tf.constant(prompts), max_new_tokens=tf.constant(new),
                                                  **sampling)
    token, position, cache = first[c.TOKEN].numpy(), first[c.NUM_TOKENS].numpy().copy(), first[c.CACHE]
    stopped = first[c.FINISHED].numpy()
    tokens = [[] if stopped[i] or new[i] == 0 else [int(token[i])] for i in range(n)]
    counts = np.zeros([n, vocab_size(loaded)], np.float32)
    for i, row in enumerate(tokens):
        counts[i, row] = 1  # the first new token, chosen by prefill, counts for the penalties
    done = [bool(stopped[i]) or len(tokens[i]) >= new[i] for i in range(n)]
    while not all(done):
        want = np.array([0 if done[i] else min(steps, new[i] - len(tokens[i])) for i in range(n)], np.int32)
        out = loaded.signatures[c.DECODE + suffix](token=tf.constant(token), position=tf.constant(position),
                                                   cache=cache, steps=tf.constant(want), **sampling, **penalized,
                                                   token_counts=tf.constant(counts))
        ids, made, cache = out[c.TOKEN_IDS].numpy(), out[c.NUM_TOKENS].numpy(), out[c.CACHE]
        counts = out[c.TOKEN_COUNTS].numpy()
        for i in np.flatnonzero(want):
            tokens[i] += ids[i, :made[i]].tolist()
            token[i] = tokens[i][-1] if tokens[i] else token[i]
            position[i] += made[i]
            done[i] = made[i] < want[i] or len(tokens[i]) >= new[i]
    ids = np.zeros([n, max(map(len, tokens))], np.int32)
    for i, row in enumerate(tokens):
        ids[i, :len(row)] = row
    text = loaded.signatures[c.DETOKENIZE](token_ids=tf.constant(ids),
                                           num_tokens=tf.constant([len(t) for t in tokens]))[c.TEXT].numpy()
    return text, tokens, counts


@pytest.mark.parametrize("compiled", [False, True])
def test_step_signatures_make_generates_text(exported, compiled):
    """prefill + decode + detokenize, rows at different positions and stopping at different steps, give
    what generate gives, greedy and sampled (the contract a step-scheduling server relies on)."""
    _, _, loaded = exported
    prompts, new = PROMPTS + ["To be"], [12, 5, 0, 9]
    settings = {c.TEMPERATURE: [0.0, 1.5, 1.0, 0.8], c.TOP_K: [0, 0, 3, 5], c.TOP_P: [1.0, 0.9, 1.0, 1.0],
                c.SEED: [1, 2, 3, 4]}
    expected = call(loaded, c.GENERATE, prompt=tf.constant(prompts), max_new_tokens=tf.constant(new),
                    **{k: tf.constant(v) for k, v in settings.items()})
    text, tokens, counts = step_by_step(loaded, prompts, new, settings, compiled)
    assert list(text) == list(expected[c.COMPLETION])
    assert tokens == [[t for t in row if t] for row in expected[c.TOKEN_IDS].tolist()]  # 0 is [EOS]: never made
    assert sum(map(len, tokens)) > 10
    for row, kept in zip(tokens, counts):  # decode kept each row's counts of its new tokens
        assert kept.tolist() == np.bincount(row, minlength=len(kept)).tolist()


@pytest.mark.parametrize("compiled", [False, True])
def test_penalties_follow_openais_rule(exported, compiled):
    """With presence and frequency penalties, decode's greedy tokens are the argmax of next_token_logits
    less frequency x count and presence once seen, over the tokens generated so far."""
    _, _, loaded = exported
    presence, frequency = 0.7, 1.3
    # 6 + 10 tokens: the tiny transformer's context holds the whole prompt (the reference reads it all).
    _, (tokens,), _ = step_by_step(loaded, ["ROMEO."], [10], {c.TEMPERATURE: [0.0], c.TOP_K: [0], c.TOP_P: [1.0],
                                                            c.SEED: [0]}, compiled, penalties=(presence, frequency))
    prompt = call(loaded, c.TOKENIZE, text=tf.constant(["ROMEO."]))[c.TOKEN_IDS][0].tolist()
    counts = np.zeros(vocab_size(loaded))
    assert len(tokens) >= 6
    for t, token in enumerate(tokens):  # each token is the argmax of the penalized logits (up to rounding)
        ids = prompt + tokens[:t]
        logits = call(loaded, c.NEXT_TOKEN_LOGITS, token_ids=tf.constant([ids]), num_tokens=tf.constant([len(ids)]))
        penalized = logits[c.LOGITS][0] - frequency * counts - presence * (counts > 0)
        assert penalized[token] >= penalized.max() - 1e-5, (t, token, int(np.argmax(penalized)))
        counts[token] += 1
    assert len(set(tokens)) > 2  # the penalties push greedy decoding off its one favourite token


def test_tokenize_counts_the_tokens_a_generation_reads(exported):
    _, _, loaded = exported
    out = call(loaded, c.TOKENIZE, text=tf.constant(["ROMEO.", "", "To be"]))
    assert out[c.NUM_TOKENS].tolist() == [6, 0, 5]  # the char model: a token a character
    prefill = call(loaded, c.PREFILL, prompt=tf.constant(["ROMEO.", "To be"]), max_new_tokens=tf.constant([1, 1]),
                   temperature=tf.constant([0.0, 0.0]), top_k=tf.constant([0, 0]), top_p=tf.constant([1.0, 1.0]),
                   seed=tf.constant([0, 0]))
    assert prefill[c.NUM_TOKENS].tolist() == [6, 5]
    detokenized = call(loaded, c.DETOKENIZE, token_ids=tf.constant(out[c.TOKEN_IDS]), num_tokens=out[c.NUM_TOKENS])
    assert [t.decode() for t in detokenized[c.TEXT]] == ["ROMEO.", "", "To be"]


def test_token_logprobs_are_the_next_token_distributions(exported):
    """Each position's log-probability and top 5 are log_softmax of next_token_logits after the tokens before it."""
    _, _, loaded = exported
    rows = [[5, 9, 14, 7, 22], [8, 11, 0, 0, 0]]  # the second row has 2 tokens: the rest is padding
    out = call(loaded, c.TOKEN_LOGPROBS, token_ids=tf.constant(rows), num_tokens=tf.constant([5, 2]))
    assert out[c.LOGPROBS].shape == (2, 5) and out[c.TOP_TOKEN_IDS].shape == (2, 5, c.TOP_LOGPROBS)
    for i, row in enumerate(rows):
        for t in range(1, [5, 2][i]):
            logits = call(loaded, c.NEXT_TOKEN_LOGITS, token_ids=tf.constant([row[:t]]), num_tokens=tf.constant([t]))
            log_p = tf.nn.log_softmax(logits[c.LOGITS][0]).numpy()
            np.testing.assert_allclose(out[c.LOGPROBS][i, t], log_p[row[t]], atol=1e-4)
            np.testing.assert_allclose(out[c.TOP_LOGPROBS_OUTPUT][i, t], np.sort(log_p)[::-1][:c.TOP_LOGPROBS],
                                       atol=1e-4)
            assert out[c.TOP_TOKEN_IDS][i, t, 0] == np.argmax(log_p)
    assert not out[c.LOGPROBS][:, 0].any() and not out[c.LOGPROBS][1, 2:].any()  # nothing predicts these


def test_one_overflow_rule(exported):
    """max_new_tokens must stay below a transformer's context, as `lmstack generate` and the device require."""
    workdir, _, loaded = exported
    context = TextGenerator(workdir).decoder.max_length
    if context is None:  # the LSTM has none
        assert len(complete(loaded, ["ROMEO."], [40])[c.TOKEN_IDS][0]) <= 40
        return
    for signature in (c.SERVING_DEFAULT, c.SERVING_DEFAULT_XLA):
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"context of {context} tokens: ask for at most "
                                                                  f"{context - 1}"):
            complete(loaded, ["ROMEO.", "a"], [3, context], signature)
        assert complete(loaded, ["ROMEO."], [context - 1], signature)[c.TOKEN_IDS].shape[1] <= context - 1
    with pytest.raises(ConfigError, match=f"context of {context} tokens"):
        TextGenerator(workdir).generate(["ROMEO."], context)


def test_chunks_continue_as_one_call_would(exported):
    """generate_chunk, called again with the tokens so far (a stream), makes the tokens of one generate call
    (past the tiny transformer's context of 16 tokens too: the prompt's start is dropped as generate drops it)."""
    _, _, loaded = exported
    prompts = ["ROMEO.", "", "JULIET. Good night"]
    for temperature, signature in [(0.0, c.GENERATE_CHUNK), (1.5, c.GENERATE_CHUNK), (1.5, c.GENERATE_CHUNK_XLA)]:
        whole = sample(loaded, prompts, [4, 5, 6], temperature=temperature, max_new_tokens=11)
        generated = np.zeros([3, 0], np.int32)
        texts = None
        for size in (1, 2, 16):  # 11 tokens in chunks of 1, 2 and (at most) 16
            out = call(loaded, signature, prompt=tf.constant(prompts), max_new_tokens=tf.fill([3], 11),
                       chunk_tokens=tf.fill([3], size),
                       temperature=tf.fill([3], temperature), top_k=tf.fill([3], 0), top_p=tf.fill([3], 1.0),
                       seed=tf.constant([4, 5, 6]), generated=tf.constant(generated),
                       num_generated=tf.constant([generated.shape[1]] * 3))
            assert out[c.TOKEN_IDS].shape[1] == min(size, 11 - generated.shape[1]) and not out[c.FINISHED].any()
            generated = np.concatenate([generated, out[c.TOKEN_IDS]], axis=1)
            texts = out[c.COMPLETION]
        np.testing.assert_array_equal(generated, whole[c.TOKEN_IDS])
        np.testing.assert_array_equal(texts, whole[c.COMPLETION])


def keras_log_likelihood(model, ids: list[int]) -> float:
    sequence = [tokenizers.EOS_ID] + ids
    logits = model(tf.constant([sequence[:-1]]), training=False)[0]
    log_p = tf.nn.log_softmax(logits)
    return float(sum(log_p[i, t] for i, t in enumerate(sequence[1:])))


def test_score_equals_the_keras_models_log_likelihood(exported):
    workdir, _, loaded = exported
    generator = TextGenerator(workdir)
    texts = ["To be", "What light"]
    out = call(loaded, c.SCORE, text=tf.constant(texts))
    for text, ll, n in zip(texts, out[c.LOG_LIKELIHOOD], out[c.NUM_TOKENS]):
        ids = encode(generator.tokenizer, text)
        assert n == len(ids)
        assert ll == pytest.approx(keras_log_likelihood(generator.model, ids), rel=1e-4)


def test_score_reads_text_longer_than_the_context_in_windows(exported):
    workdir, _, loaded = exported
    generator = TextGenerator(workdir)
    text = "What light through yonder window breaks? It is the east"  # > 16 tokens, the tiny context
    ids = encode(generator.tokenizer, text)
    out = call(loaded, c.SCORE, text=tf.constant([text]))
    assert out[c.NUM_TOKENS][0] == len(ids)
    context = generator.decoder.max_length
    if context is None:  # the LSTM reads any length at once
        expected = keras_log_likelihood(generator.model, ids)
    else:
        sequence = [tokenizers.EOS_ID] + ids
        expected = 0.0
        for start in range(0, len(ids), context):
            window = sequence[start:start + context + 1]
            log_p = tf.nn.log_softmax(generator.model(tf.constant([window[:-1]]), training=False)[0])
            expected += float(sum(log_p[i, t] for i, t in enumerate(window[1:])))
    assert out[c.LOG_LIKELIHOOD][0] == pytest.approx(expected, rel=1e-4)


def test_next_token_logits_equal_the_keras_model(exported):
    workdir, _, loaded = exported
    generator = TextGenerator(workdir)
    ids = [encode(generator.tokenizer, "To be, or"), encode(generator.tokenizer, "not to be")]
    out = call(loaded, c.NEXT_TOKEN_LOGITS, token_ids=tf.constant(ids, tf.int32), num_tokens=tf.constant([9, 9]))
    expected = generator.model(tf.constant(ids), training=False)[:, -1, :].numpy()
    np.testing.assert_allclose(out[c.LOGITS], expected, rtol=1e-4, atol=1e-4)


def test_next_token_logits_ignore_tensorflow_servings_padding(exported):
    """A row padded as TF Serving pads it (its first element, to the batch's longest row) answers the same."""
    from serving.server.batching import pad_to

    workdir, _, loaded = exported
    generator = TextGenerator(workdir)
    context = generator.config.seq_len if models.family_of(generator.config) == "transformer" else None
    short = encode(generator.tokenizer, "To be")
    long_row = encode(generator.tokenizer, "A horse! a horse! my kingdom for a horse! " * 6)[:(context or 64) + 9]
    alone = call(loaded, c.NEXT_TOKEN_LOGITS, token_ids=tf.constant([short]), num_tokens=tf.constant([len(short)]))
    padded = pad_to(np.array([short], np.int32), (1, len(long_row)))
    assert (padded[0, len(short):] == short[0]).all()
    batch = call(loaded, c.NEXT_TOKEN_LOGITS, token_ids=tf.constant(np.concatenate([padded, [long_row]]), tf.int32),
                 num_tokens=tf.constant([len(short), len(long_row)]))
    np.testing.assert_allclose(batch[c.LOGITS][0], alone[c.LOGITS][0], rtol=1e-4, atol=1e-4)
    # The long row reads its last `context` tokens, as the model was trained to.
    tail = long_row[-context:] if context else long_row
    expected = generator.model(tf.constant([tail]), training=False)[0, -1, :].numpy()
    np.testing.assert_allclose(batch[c.LOGITS][1], expected, rtol=1e-4, atol=1e-4)


def test_warmup_records_are_prediction_logs_that_run(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, path, loaded = exported
    records = list(tf.data.TFRecordDataset(str(path / c.ASSETS_EXTRA / c.WARMUP_FILE)).as_numpy_iterator())
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    assert sorted(log.predict_log.request.model_spec.signature_name for log in logs) == sorted(
        name for name in c.SIGNATURES if not c.needs_xla(name))  # TF Serving without XLA loads it
    # The compiled signatures' records, which `lmstack serve --xla_cpu_compilation_enabled` replays: one per
    # bucket (serving_default_xla) and one generate_xla.
    xla = tf.data.TFRecordDataset(str(path / c.ASSETS_EXTRA / c.XLA_WARMUP_FILE)).as_numpy_iterator()
    xla_logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in xla]
    names = [log.predict_log.request.model_spec.signature_name for log in xla_logs]
    lengths = len(json.loads((path / c.ASSETS_EXTRA / c.CONFIG_FILE).read_text())["xla_buckets"]["length"])
    assert lengths == 1  # the tiny transformer's context is 16, the smallest bucket; an LSTM compiles one length
    assert names.count(c.SERVING_DEFAULT_XLA) == 2 * lengths and names.count(c.GENERATE_XLA) == 1
    for log in logs + xla_logs:
        request = log.predict_log.request
        assert request.model_spec.name == "lm"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        assert loaded.signatures[request.model_spec.signature_name](**inputs)


def test_versions_and_bad_input(transformer, tmp_path, capsys, english_text):
    workdir, _, _ = transformer
    base = tmp_path / "models" / "lm"
    (base / "7").mkdir(parents=True)  # an earlier version
    assert savedmodel.export(workdir, savedmodel.ExportConfig(export_base=str(base))) == base / "8"  # the next free one
    with pytest.raises(UserError, match="already exists"):
        savedmodel.export(workdir, savedmodel.ExportConfig(export_base=str(base), version=7))
    code, out, err = run_cli(capsys, "export", f"--workdir={workdir}", "--variant=pruned",
                             f"--export_base={tmp_path / 'other'}")
    assert code == 2 and "no optimized variant 'pruned'" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in base.iterdir()) == ["7", "8"]


def test_xla_warmup_export_needs_a_server_with_xla(transformer, tmp_path, capsys):
    """--xla_warmup: TF Serving's warm-up file compiles every bucket, and a server without XLA refuses the version."""
    from tests.helpers import TEST_BUCKETS

    workdir, _, _ = transformer
    base = tmp_path / "lm"
    buckets = ",".join(map(str, TEST_BUCKETS["batch_buckets"]))
    # A chat template as Hugging Face's tokenizer_config.json holds one (its eos_token an added-token object).
    template = tmp_path / "tokenizer_config.json"
    template.write_text(json.dumps({"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                                     "{% if add_generation_prompt %}<assistant>{% endif %}",
                                    "eos_token": {"content": "</s>"}, "stop": ["<user>"]}))
    code, out, err = run_cli(capsys, "export", f"--workdir={workdir}", f"--export_base={base}", "--xla_warmup",
                             f"--batch_buckets={buckets}", f"--chat_template={template}")
    assert code == 0, err
    extra = base / "1" / c.ASSETS_EXTRA
    from serving.server import chat

    carried = chat.ChatTemplate.from_export(json.loads((extra / c.CONFIG_FILE).read_text()))
    assert carried.stop == ("<user>",) and carried.eos_token == "</s>"
    assert carried.render([{"role": "user", "content": "Hi"}]) == "<user>Hi<assistant>"
    records = tf.data.TFRecordDataset(str(extra / c.WARMUP_FILE)).as_numpy_iterator()
    from tensorflow_serving.apis import prediction_log_pb2
    names = {prediction_log_pb2.PredictionLog.FromString(r).predict_log.request.model_spec.signature_name
             for r in records}
    assert {c.SERVING_DEFAULT_XLA, c.GENERATE_XLA, c.SERVING_DEFAULT} <= names
    assert not (extra / c.XLA_WARMUP_FILE).exists()
    without = server.ServedModel("lm", base, max_num_load_retries=0)
    without.refresh()
    assert "XLA compilation disabled" in without.failed[1] and "--xla_cpu_compilation_enabled" in without.failed[1]
    with_xla = server.ServedModel("lm", base, xla=True)
    assert with_xla.load_latest().version == 1
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }}")
    for argv, message in [(["--batch_buckets=0,4"], "each at least 1"), (["--length_buckets=a"], "integers"),
                          ([f"--chat_template={tmp_path / 'broken.jinja'}"], "does not compile"),
                          ([f"--chat_template={tmp_path / 'none.jinja'}"], "cannot read it")]:
        code, _, err = run_cli(capsys, "export", f"--workdir={workdir}", f"--export_base={tmp_path / 'x'}", *argv)
        assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_workdir_without_a_checkpoint(tmp_path, capsys, english_text):
    (tmp_path / "corpus.txt").write_text(english_text, encoding="utf-8")
    prepare.prepare(prepare.PrepareConfig(corpus=(str(tmp_path / "corpus.txt"),),
                                          tokenizer=tokenizers.TokenizerConfig("char")), tmp_path / "run")
    code, _, err = run_cli(capsys, "export", f"--workdir={tmp_path / 'run'}")
    assert code == 2 and "no trained model yet" in err
    assert not (tmp_path / "run" / "export").exists()



@pytest.mark.slow
def test_reloads_in_a_process_with_only_tensorflow_and_tensorflow_text(transformer):
    workdir, path, loaded = transformer
    script = f"""
import json, sys
import tensorflow as tf, tensorflow_text
m = tf.saved_model.load({str(path)!r})
out = m.signatures["serving_default"](prompt=tf.constant(["ROMEO."]), max_new_tokens=tf.constant([15]))
project = sorted(n for n in sys.modules if n.split(".")[0] in ("keras_nlp", "keras_hub", "tf_keras", "models",
                                                               "pipelines", "serving", "app"))
print(json.dumps({{"completion": out["completion"].numpy()[0].decode(), "project": project}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["project"] == []
    assert answer["completion"] == complete(loaded, ["ROMEO."], [15])[c.COMPLETION][0].decode()


@pytest.mark.slow
def test_saved_model_cli_shows_and_runs_it(transformer):
    _, path, loaded = transformer
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run([str(cli), "show", "--all", "--dir", str(path)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in c.SIGNATURES:
        assert f"signature_def['{name}']" in shown.stdout
    ran = subprocess.run([str(cli), "run", "--dir", str(path), "--tag_set", "serve",
                          "--signature_def", "score", "--input_exprs", "text=[b'To be']"],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    expected = call(loaded, c.SCORE, text=tf.constant(["To be"]))[c.LOG_LIKELIHOOD][0]
    assert f"{expected:.4f}"[:6] in ran.stdout.replace("\n", " ")


# ---------------------------------------------------------------------------
# Clients against the server (TensorFlow Serving's API), both protocols.


@pytest.fixture(scope="module")
def served(transformer):
    workdir, path, loaded = transformer
    running = server.Server.build_and_start(server.Options(model_base_path=str(path.parent), port=0, rest_api_port=0,
                                                           file_system_poll_wait_seconds=0))
    yield {"grpc": f"localhost:{running.grpc_port}", "rest": f"localhost:{running.rest_port}", "loaded": loaded}
    running.stop(grace=0)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_clients_generate_score_status_metadata(served, protocol):
    client = client_lib.connect(served[protocol], protocol)
    loaded = served["loaded"]
    assert client.generate(PROMPTS, max_new_tokens=10) == [
        t.decode() for t in complete(loaded, PROMPTS, [10] * 3)[c.COMPLETION]]
    sampled = client.generate(["ROMEO."], max_new_tokens=12, temperature=1.5, seed=1)
    assert sampled == [sample(loaded, ["ROMEO."], [1])[c.COMPLETION][0].decode()]
    (ll, n), = client.score(["To be"])
    direct = float(call(loaded, c.SCORE, text=tf.constant(["To be"]))[c.LOG_LIKELIHOOD][0])
    assert n == 5 and ll == pytest.approx(direct, rel=1e-5)
    assert client.status() == [{"version": int(loaded_version(served)), "state": "AVAILABLE", "error_code": "OK",
                                "error_message": ""}]
    signatures = client.metadata()["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == set(c.SIGNATURES)
    assert set(signatures[c.GENERATE]["inputs"]) == set(c.SIGNATURES[c.GENERATE].inputs)


def loaded_version(served):
    return client_lib.connect(served["grpc"], "grpc").status()[0]["version"]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_clients_raise_the_servers_message(served, protocol):
    client = client_lib.connect(served[protocol], protocol)
    with pytest.raises(client_lib.ServingError, match="at least one token per row") as e:
        client.next_token_logits([[]])
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(client_lib.ServingError, match="not found") as e:
        client_lib.connect(served[protocol], protocol, model_name="nope").status()
    assert e.value.code == "NOT_FOUND"


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_clients_retry_until_the_server_is_up(transformer, protocol):
    _, path, _ = transformer
    port, = free_ports(1)
    model = server.ServedModel("lm", path.parent)
    model.load_latest()
    core = server.ModelServer({"lm": model})
    started = {}

    def start_later():
        time.sleep(1.0)
        started["server"] = (server.start_grpc if protocol == "grpc" else server.start_rest)(core, port)[0]

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        client = client_lib.connect(f"localhost:{port}", protocol, retries=6, backoff=0.2, timeout=5)
        assert client.status()[0]["state"] == "AVAILABLE"
    finally:
        thread.join()
        s = started.get("server")
        if s is not None:
            s.stop(None) if protocol == "grpc" else s.shutdown()
    with pytest.raises(client_lib.ServingError) as e:
        client_lib.connect(f"localhost:{free_ports(1)[0]}", protocol, retries=1, backoff=0.01, timeout=2).status()
    assert e.value.code == "UNAVAILABLE"


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_cli_prints_the_completion(served, protocol, capsys):
    code, out, err = run_cli(capsys, "client", f"--target={served[protocol]}", f"--protocol={protocol}",
                             "--prompt=ROMEO.", "--max_new_tokens=10")
    assert code == 0, err
    assert out == complete(served["loaded"], ["ROMEO."], [10])[c.COMPLETION][0].decode() + "\n"
    code, _, err = run_cli(capsys, "client", f"--target={served[protocol]}", f"--protocol={protocol}",
                           "--model_name=nope", "--prompt=x")
    assert code == 2 and "NOT_FOUND" in err and "Traceback" not in err


def test_deploy_files_configure_tensorflow_serving():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    deploy = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "serving"
    config = text_format.Parse((deploy / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    model, = config.model_config_list.config
    assert model.name == c.DEFAULT_MODEL_NAME and model.model_platform == "tensorflow"
    compose = (deploy / "docker-compose.yml").read_text()
    kubernetes = (deploy / "kubernetes.yaml").read_text()
    for text in (compose, kubernetes):
        assert "--port=8500" in text and "--rest_api_port=8501" in text and "--enable_batching=true" in text
        assert "--xla_cpu_compilation_enabled=true" in text  # the *_xla signatures run
    # Every config file the server is pointed at is mounted from a file that exists.
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        mounted = compose.split(f"--{flag}=")[1].split()[0]
        assert f"./{pathlib.Path(mounted).name}:{mounted}" in compose
        assert (deploy / pathlib.Path(mounted).name).is_file()
    assert f"./models:{pathlib.PurePosixPath(model.base_path).parent}" in compose
