"""`lmstack tflite`: built-in-op TFLite files that generate on ai-edge-litert like the Keras model."""

import itertools
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from models.samplers import SamplerConfig
from pipelines import evaluate, optimize
from pipelines.errors import UserError
from pipelines.generate import TextGenerator, encode
from serving import contract as c
from serving import edge
from serving.edge import metadata as tflite_metadata
from serving.exporters import backends, tflite
from tests.helpers import run_cli, tiny_export
from tests.test_workdir import umask

PROMPTS = ["ROMEO.", "", "What light through yonder window"]
# Validation perplexity of a quantized file may exceed the float32 file's by at most this much.
TOLERANCE = {"float16": 0.005, "dynamic": 0.03, "int8": 0.05}
# The LSTM's own path is int8 (its step and window loop); the other modes are family-independent.
MODES = {"transformer": ("float16", "dynamic", "int8"), "lstm": ("dynamic", "int8")}
_FILES: dict = {}


@pytest.fixture(scope="module", params=["transformer", pytest.param("lstm", marks=pytest.mark.slow)])
def run(request, tmp_path_factory, english_text):
    """(family, workdir with a trained tiny model and its export, its float32 TFLite file)."""
    family = request.param
    if family not in _FILES:
        workdir, export_path = tiny_export(family, tmp_path_factory, english_text)
        _FILES[family] = (workdir, export_path, tflite.convert(workdir, tflite.TFLiteConfig()))
    return (family, *_FILES[family])


def test_signatures_shapes_and_built_in_ops(run):
    family, workdir, _, path = run
    info = json.loads(path.with_suffix(".json").read_text())
    assert path.name == f"{family}-float32.tflite" and info["quantize"] == "none"
    assert info["format"] == edge.FORMAT  # what the device runtime keys older layouts by
    model = info["model"]
    t = info["max_seq_len"]
    assert t == model["seq_len"]
    sigs = info["signatures"]
    if family == "transformer":
        assert set(sigs) == {f"prefill_{t}", "decode"}  # the default prefill lengths are past this context
        cache = [1, 1, t, model["d_model"]]
        names = {f"kv_cache_{kind}_{i}" for i in range(model["layers"]) for kind in "kv"}
        for name, length in ((f"prefill_{t}", t), ("decode", 1)):
            inputs, outputs = sigs[name]["inputs"], sigs[name]["outputs"]
            assert set(inputs) == {"tokens", "input_pos"} | names and set(outputs) == {"logits"} | names
            assert inputs["tokens"] == {"shape": [1, length], "dtype": "int32"}
            assert inputs["input_pos"] == {"shape": [length], "dtype": "int32"}
            assert outputs["logits"]["shape"] == [1, length, model["vocab_size"]]
            assert all(inputs[n]["shape"] == outputs[n]["shape"] == cache for n in names)
        # No slice of a cache: TFLite's STRIDED_SLICE copies element by element (5x slower decoding).
        for signature in sigs:
            assert max(sliced_sizes(path.read_bytes(), signature), default=0) < 2 * t * model["d_model"], signature
    else:
        assert set(sigs) == {"sequence", "step"}
        assert set(sigs["step"]["inputs"]) == {"token"} | {f"{k}{i}" for i in range(model["layers"]) for k in "hc"}
        assert sigs["step"]["inputs"]["c1"]["shape"] == sigs["step"]["outputs"]["h0"]["shape"] == [1, model["units"]]
        # `sequence` loops over the step's arithmetic: one set of weights, not the fused kernel's copy.
        assert info["ops"]["WHILE"] == 1 and "UNIDIRECTIONAL_SEQUENCE_LSTM" not in info["ops"]
    assert tflite.non_builtin_ops(path.read_bytes()) == []
    # Each weight once (signatures share them): float32 bytes ~ 4 x parameters, plus the graph.
    params = TextGenerator(workdir).model.count_params()
    assert 4 * params < info["bytes"] < 4 * params * 1.1 + 100_000, (info["bytes"], params)
    assert (workdir / "tflite" / "tokenizer" / "tokenizer.json").is_file()
    check_metadata(path, info, workdir)
    # The app's build copies the folder: it must be readable like any other (mkdtemp's is 0700).
    assert (workdir / "tflite" / "tokenizer").stat().st_mode & 0o777 == 0o777 & ~umask()
    assert not [p.name for p in (workdir / "tflite").iterdir() if p.name.startswith(".")]


def check_metadata(path, info, workdir):
    """TFLite Metadata as the official tools read it (bench/tflite_metadata_official.py checks that with
    MediaPipe's): the first subgraph's tensors described in the subgraph's order, the tokenizer's files
    and the sidecar's content packed."""
    from ai_edge_litert.interpreter import Interpreter

    packed = tflite_metadata.read(path.read_bytes())
    meta = packed.metadata
    assert meta["name"] == f"lmstack {info['family']} language model" and meta["author"] == "lmstack"
    assert meta["version"] == f"step {info['checkpoint_step']}" and meta["min_parser_version"] == "1.0.1"
    graph = meta["subgraph_metadata"][0]
    runner = Interpreter(model_content=path.read_bytes()).get_signature_runner(graph["name"])
    for side, details in (("input", runner.get_input_details()), ("output", runner.get_output_details())):
        described = graph[f"{side}_tensor_metadata"]
        assert sorted(t["name"] for t in described) == sorted(details) and all(t["description"] for t in described)
    assert {f["name"]: f.get("type", 0) for f in meta["associated_files"]} == {
        "tokenizer.json": 0, "vocabulary.json": tflite_metadata.VOCABULARY, "lmstack.json": 0}
    for name in ("tokenizer.json", "vocabulary.json"):
        assert packed.files[name] == (workdir / "tokenizer" / name).read_bytes()
    # The settings once: the signatures and ops are the model's, the tokenizer's config is tokenizer.json.
    assert json.loads(packed.files["lmstack.json"]) == {k: v for k, v in info.items() if k not in (
        "bytes", "signatures", "ops", "tokenizer", "tokenizer_dir")}
    assert json.loads(packed.files["tokenizer.json"]) == info["tokenizer"]
    assert info["bytes"] == path.stat().st_size


def test_the_tflite_file_alone_generates_text(run, tmp_path):
    """An app ships the .tflite alone: it reads its tokenizer and settings from the file."""
    family, workdir, _, path = run
    (tmp_path / path.name).write_bytes(path.read_bytes())
    model = edge.EdgeModel(tmp_path / path.name)
    assert model.complete("ROMEO.", 12) == TextGenerator(workdir).generate(["ROMEO."], 12)[0]


def test_a_transformer_file_of_format_3_still_generates(run, tmp_path):
    """Files written before LiteRT-LM's signatures (`prefill`, `decode` over one cache) still run."""
    import models
    from pipelines import checkpoints
    from serving.exporters import edge_metadata

    family, workdir, _, path = run
    if family == "lstm":
        pytest.skip("the LSTM's signatures did not change")
    model, config, _ = checkpoints.load_model(checkpoints.model_dir(workdir, ""))
    decoder, t = models.decoder(model, config), config.seq_len
    cache = tf.TensorSpec(decoder.init_cache(1, t).shape, tf.float32, name="cache")

    def prefill(tokens):
        logits, cache = decoder.call_with_cache(tokens, decoder.init_cache(1, t), tf.minimum(tokens[0, 0], 0))
        return {"logits": logits, "cache": cache}

    def decode(token, cache, position):
        logits, cache = decoder.call_with_cache(token, cache, position)
        return {"logits": logits[:, 0], "cache": cache}

    holder = tf.Module()
    holder.model = model
    flat = tflite.convert_functions({
        "prefill": tf.function(prefill, input_signature=[tf.TensorSpec([1, t], tf.int32, name="tokens")]),
        "decode": tf.function(decode, input_signature=[tf.TensorSpec([1, 1], tf.int32, name="token"), cache,
                                                       tf.TensorSpec([], tf.int32, name="position")])},
        trackable=holder)
    info = {**json.loads(path.with_suffix(".json").read_text()), "format": 3}
    files = {p.name: p.read_bytes() for p in (workdir / "tokenizer").iterdir()}
    (tmp_path / "old.tflite").write_bytes(edge_metadata.populate(flat, info, files))
    old = edge.EdgeModel(tmp_path / "old.tflite")
    assert set(old.interpreter.get_signature_list()) == {"prefill", "decode"}
    assert old.complete("ROMEO.", 12) == edge.EdgeModel(path).complete("ROMEO.", 12)
    window = np.arange(t, dtype=np.int32) % 7
    np.testing.assert_allclose(old.window_logits(window), edge.EdgeModel(path).window_logits(window), atol=1e-4)


def test_float32_greedy_is_the_same_on_keras_savedmodel_and_tflite(run):
    family, workdir, export_path, path = run
    generator = TextGenerator(workdir)
    keras_text = generator.generate(PROMPTS, 12)
    loaded = tf.saved_model.load(str(export_path))
    saved = loaded.signatures[c.SERVING_DEFAULT](prompt=tf.constant(PROMPTS),
                                                 max_new_tokens=tf.constant([12] * 3, tf.int32))[c.COMPLETION]
    model = edge.EdgeModel(path)
    for prompt, expected, from_saved in zip(PROMPTS, keras_text, saved.numpy()):
        ids = model.generate(generator.prompt_ids(prompt), 12, stop_ids=[model.eos_id])
        assert ids == encode(generator.tokenizer, expected)
        assert from_saved.decode() == expected
    # Not only the argmax: the logits agree.
    window = np.arange(model.max_seq_len, dtype=np.int32) % generator.config.vocab_size
    reference = generator.model(window[None])[0].numpy()
    np.testing.assert_allclose(model.window_logits(window), reference, atol=1e-4)
    np.testing.assert_allclose(model.window_logits(window), reference, atol=1e-4)  # no state left over


def test_quantized_files_are_smaller_and_within_tolerance(run):
    family, workdir, _, path = run
    float_model = edge.EdgeModel(path)
    reference = evaluate.evaluate_logits(workdir, float_model.window_logits, float_model.max_seq_len)
    keras = evaluate.evaluate(workdir)
    assert reference["perplexity"] == pytest.approx(keras["perplexity"], rel=1e-4)
    for quantize in MODES[family]:
        tolerance = TOLERANCE[quantize]
        quantized = tflite.convert(workdir, tflite.TFLiteConfig(quantize=quantize, calibration_windows=8))
        assert quantized.name == f"{family}-{quantize}.tflite"
        assert quantized.stat().st_size < path.stat().st_size
        model = edge.EdgeModel(quantized)
        result = evaluate.evaluate_logits(workdir, model.window_logits, model.max_seq_len)
        assert result["perplexity"] <= reference["perplexity"] * (1 + tolerance), quantize
        assert model.generate([1, 2, 3], 5)  # generates
        if quantize == "int8":  # one scale per weight matrix (--per_channel gives one per output channel)
            assert model.info["per_channel"] is False and max_scales(quantized.read_bytes()) == 1
            if family == "lstm":  # h (within ±1) keeps its 8 bits: no tensor carries it with c
                scales = input_scales(quantized.read_bytes(), "step")
                assert max(scales[f"h{i}"] for i in range(2)) < 1.01 / 127 < min(scales[f"c{i}"] for i in range(2))
                assert model.info["cell_clip"] == tflite.CELL_CLIP  # the memory's range, so its scale


def test_the_int8_lstm_clips_its_memory_not_its_output(run):
    """`cell_clip` bounds the c each token passes on; h (tanh of c) stays what the cell computes."""
    family, workdir, _, _ = run
    if family != "lstm":
        pytest.skip("the LSTM's cell state")
    generator = TextGenerator(workdir)
    config = generator.config
    state = {f"{k}{i}": tf.fill([1, config.units], 50.0 if k == "c" else 0.0)
             for i in range(config.layers) for k in "hc"}
    token = tf.constant([[3]])
    plain = tflite.signature_functions(generator.model, config, 8)["step"](token, *state.values())
    clipped = tflite.signature_functions(generator.model, config, 8, cell_clip=2.0)["step"](token, *state.values())
    for i in range(config.layers):
        assert np.abs(plain[f"c{i}"]).max() > 2.0 >= np.abs(clipped[f"c{i}"]).max()
        np.testing.assert_allclose(clipped[f"h{i}"], plain[f"h{i}"], atol=1e-6)


def max_scales(flat: bytes) -> int:
    """The most quantization scales any tensor of a TFLite file has."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flat, 0))
    return max(len(t.quantization.scale) for g in model.subgraphs for t in g.tensors
               if t.quantization is not None and t.quantization.scale is not None)


def signature_ops(flat: bytes, signature: str, op: str) -> tuple:
    """(subgraph, signature, ops of builtin kind `op`, e.g. "QUANTIZE") of a signature in a TFLite file."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(flat, 0))
    sig = next(s for s in model.signatureDefs if s.signatureKey.decode() == signature)
    graph, code = model.subgraphs[sig.subgraphIndex], getattr(schema.BuiltinOperator, op)
    kind = lambda o: max(model.operatorCodes[o.opcodeIndex].builtinCode,
                         model.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)
    return graph, sig, [o for o in graph.operators if kind(o) == code]


def sliced_sizes(flat: bytes, signature: str) -> list[int]:
    """The element counts of the tensors a signature's STRIDED_SLICE ops read."""
    graph, _, ops = signature_ops(flat, signature, "STRIDED_SLICE")
    return [int(np.prod(graph.tensors[op.inputs[0]].shape)) for op in ops]


def input_scales(flat: bytes, signature: str) -> dict[str, float]:
    """The int8 scale each float input of a signature is quantized with on entry."""
    graph, sig, ops = signature_ops(flat, signature, "QUANTIZE")
    by_tensor = {op.inputs[0]: graph.tensors[op.outputs[0]].quantization.scale[0] for op in ops}
    return {t.name.decode(): by_tensor[t.tensorIndex] for t in sig.inputs if t.tensorIndex in by_tensor}


def test_a_batch_file_decodes_rows_in_lockstep(run):
    """--batch_size=2: each row samples as one-row generation with its seed, prompts of one length
    or not; a window scores the same."""
    family, workdir, _, path = run
    single = edge.EdgeModel(path)
    batch = edge.EdgeModel(tflite.convert(workdir, tflite.TFLiteConfig(batch_size=2)))
    assert batch.path.endswith(f"{family}-float32-batch2.tflite") and batch.batch_size == 2
    prompt = TextGenerator(workdir).prompt_ids("ROMEO.")
    rows = batch.generate_batch([prompt, prompt], 10, temperature=1.5, top_p=0.9, seeds=[3, 4])
    assert rows == [single.generate(prompt, 10, temperature=1.5, top_p=0.9, seed=s) for s in (3, 4)]
    assert rows[0] != rows[1]  # two samples, not one twice
    window = np.arange(single.max_seq_len, dtype=np.int32) % 7
    np.testing.assert_allclose(batch.window_logits(window), single.window_logits(window), atol=1e-5)
    # Prompts of different lengths: the longer row feeds its prompt while the shorter generates.
    other = TextGenerator(workdir).prompt_ids("JULIET. O Romeo")
    rows = batch.generate_batch([prompt, other], 10, temperature=1.5, seeds=[5, 6])
    assert rows == [single.generate(p, 10, temperature=1.5, seed=s) for p, s in ((prompt, 5), (other, 6))]
    stop = rows[1][0]  # the other row's first token ends it at once; the first row goes on
    kept = list(itertools.takewhile(lambda t: t != stop, rows[0]))  # (10 new tokens: the same prompt cut)
    assert batch.generate_batch([other, prompt], 10, stop_ids=[stop], temperature=1.5, seeds=[6, 5]) == [[], kept]
    with pytest.raises(ValueError, match="1 to 2 prompts"):
        batch.generate_batch([prompt] * 3, 4)
    with pytest.raises(ValueError, match="at least one token"):
        single.generate([], 4)
    assert "generate_batch" in tflite.describe(tflite.find(workdir).with_name(pathlib.Path(batch.path).name))


def test_a_flex_op_is_rejected_with_its_name():
    f = tf.function(lambda x: {"y": tf.strings.to_number(tf.strings.as_string(x))},
                    input_signature=[tf.TensorSpec([3], tf.float32)])
    with pytest.raises(UserError, match=r"tf\.AsString.*ai-edge-litert"):
        tflite.convert_functions({"f": f})


@pytest.mark.slow
def test_a_qat_variant_converts(run):
    family, workdir, _, _ = run
    if family == "lstm":
        pytest.skip("QAT covers the Dense layers, which both families convert alike")
    optimize.optimize(workdir, optimize.OptimizeConfig("qat", steps=4, batch_size=8, name="qat-edge"), verbose=0)
    for variant, quantize in (("qat-edge", "int8"),):  # float32 conversion is the dense path
        path = tflite.convert(workdir, tflite.TFLiteConfig(variant=variant, quantize=quantize, calibration_windows=4))
        assert path.name == f"{family}-{variant}-{'float32' if quantize == 'none' else quantize}.tflite"
        model = edge.EdgeModel(path)
        result = evaluate.evaluate_logits(workdir, model.window_logits, model.max_seq_len)
        keras = evaluate.evaluate(workdir, variant=variant)
        assert result["perplexity"] == pytest.approx(keras["perplexity"], rel=0.05), (variant, quantize)



def test_seeded_sampling_is_the_same_on_keras_savedmodel_and_tflite(run):
    """One sampling rule (top-k, then top-p, Gumbel noise keyed by seed and position) on every backend."""
    _, workdir, export_path, path = run
    generator = TextGenerator(workdir)
    loaded = tf.saved_model.load(str(export_path))
    generate = loaded.signatures[c.GENERATE]
    model = edge.EdgeModel(path)
    prompt = generator.prompt_ids("ROMEO.")
    for sampler in (SamplerConfig("top_p", temperature=1.5, top_p=0.8, seed=3),
                    SamplerConfig("top_k", temperature=2.0, top_k=5, seed=11), SamplerConfig("random", seed=7),
                    SamplerConfig("top_k", temperature=1.2, top_k=8, seed=5, presence_penalty=0.6,
                                  frequency_penalty=1.1),
                    SamplerConfig("greedy", presence_penalty=-0.5, frequency_penalty=1.5)):
        keras_text = generator.generate(["ROMEO."], 12, sampler)[0]
        assert keras_text  # an empty text would match trivially
        temperature, top_k, top_p = sampler.settings()
        if sampler.penalized:  # generate's inputs are TF Serving's: penalties go through the step signatures
            saved = backends.generate_steps(loaded, "ROMEO.", 12, sampler)
            assert "".join(generator.stream("ROMEO.", 12, sampler)) == keras_text, sampler
        else:
            saved = generate(prompt=tf.constant(["ROMEO."]), max_new_tokens=tf.constant([12]),
                             temperature=tf.constant([temperature]), top_k=tf.constant([top_k]),
                             top_p=tf.constant([top_p]), seed=tf.constant([sampler.seed]))[c.COMPLETION]
            saved = saved.numpy()[0].decode()
        assert saved == keras_text, sampler
        device = model.generate(prompt, 12, stop_ids=[model.eos_id], temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=sampler.seed or 0, presence_penalty=sampler.presence_penalty,
                                frequency_penalty=sampler.frequency_penalty)
        assert device == encode(generator.tokenizer, keras_text), sampler
    penalized = generator.generate(["ROMEO."], 12, SamplerConfig("greedy", frequency_penalty=1.5))[0]
    assert penalized != generator.generate(["ROMEO."], 12, SamplerConfig("greedy"))[0]  # the penalty steers


def test_cli(run, capsys):
    family, workdir, _, _ = run
    code, out, err = run_cli(capsys, "generate", f"--workdir={workdir}", "--backend=tflite", "--prompt=ROMEO.",
                    "--max_new_tokens=8")
    assert code == 0
    assert out.rstrip("\n") == TextGenerator(workdir).generate(["ROMEO."], 8)[0]
    code, out, err = run_cli(capsys, "evaluate", f"--workdir={workdir}", "--backend=tflite")
    assert code == 0 and json.loads(out)["backend"] == f"tflite ({family}-float32.tflite)"
    for argv, message in [
        (["tflite", f"--workdir={workdir}", "--quantize=int4"], "none|float16|dynamic|int8"),
        (["tflite", f"--workdir={workdir}", "--variant=nope"], "no optimized variant 'nope'"),
        (["generate", f"--workdir={workdir}", "--backend=tflite", "--quantize=float16", "--variant=nope"],
         "no optimized variant"),
        (["evaluate", f"--workdir={workdir}", "--backend=tflite", "--quantize=int4"], "none|float16|dynamic|int8"),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
