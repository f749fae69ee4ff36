"""`lmstack import`: GPT-2 checkpoints (keras-hub preset, Hugging Face) against keras-hub's own GPT-2.

The checkpoints are tiny ones built here with keras-hub: `save_to_preset`
writes the preset, `export_to_transformers` the Hugging Face directory (with
GPT2LMHeadModel's `transformer.` names), and a copy with the Hub's plain names
and no `lm_head` stands for the downloaded `gpt2`. Their weights are drawn
large enough (std 1) that GELU's two forms give different logits, so the
parity check can tell them apart.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from pipelines import checkpoints, pretrained, tokenizers
from pipelines.generate import encode
from tests.helpers import bundled_lines, run_cli

TEXT = ("ROMEO: But soft, what light through yonder window breaks?<|endoftext|>It is the east,\n\n"
        "  and Juliet is the sun. 1234 caf\u00e9 \u65e5\u672c tab\tend")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, english_text):
    """{format: checkpoint directory} and keras-hub's GPT2CausalLM they hold."""
    import keras
    import keras_hub
    import tokenizers as hf

    root = tmp_path_factory.mktemp("gpt2")
    bpe = hf.Tokenizer(hf.models.BPE())
    bpe.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(english_text.splitlines(keepends=True), hf.trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens([pretrained.END_OF_TEXT])  # last, as in GPT-2's vocabulary
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=bpe.get_vocab_size(), num_layers=2, num_heads=2,
                                             hidden_dim=32, intermediate_dim=128, max_sequence_length=32)
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0.0, 1.0, variable.shape).astype(np.float32))
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=bpe.get_vocab(), merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=32, add_start_token=False)
    reference = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    reference.save_to_preset(str(root / "keras_hub"))
    reference.export_to_transformers(str(root / "hf"))
    # A chat template, as a chat checkpoint's tokenizer_config.json carries one.
    tokenizer_config = json.loads((root / "hf" / "tokenizer_config.json").read_text()) \
        if (root / "hf" / "tokenizer_config.json").is_file() else {}
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({
        **tokenizer_config, "eos_token": pretrained.END_OF_TEXT,
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}"}))
    hub = shutil.copytree(root / "hf", root / "hf_hub")  # the Hub's gpt2: plain names, no lm_head
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(hub / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"},
              str(hub / "model.safetensors"))
    return {"keras_hub": root / "keras_hub", "hf": root / "hf", "hf_hub": hub}, reference


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    dirs, _ = sources
    root = tmp_path_factory.mktemp("imported")
    return {name: (pretrained.import_checkpoint(path, root / name), root / name)[1] for name, path in dirs.items()}


@pytest.mark.parametrize("name", ["keras_hub", "hf", "hf_hub"])
def test_logits_equal_keras_hubs_gpt2(sources, imported, name):
    import dataclasses

    import models

    _, reference = sources
    ids = np.random.default_rng(1).integers(0, reference.backbone.vocabulary_size, [2, 32]).astype(np.int32)
    want = reference({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}).numpy()
    model, config, step = checkpoints.load_model(imported[name])
    assert step == 0 and config.activation == "gelu_tanh" and config.vocab_size == reference.backbone.vocabulary_size
    np.testing.assert_allclose(model(ids).numpy(), want, atol=1e-4)
    # The check can fail: the same weights with the exact GELU are off by more than twice the tolerance.
    exact = models.build(dataclasses.replace(config, activation="gelu"))
    exact.set_weights(model.get_weights())
    assert np.abs(exact(ids).numpy() - want).max() > 2e-4


def test_tokenizer_and_greedy_continuation_match_keras_hub(sources, imported):
    from models.samplers import SamplerConfig
    from pipelines.generate import TextGenerator

    _, reference = sources
    for name in ("keras_hub", "hf"):
        tok = tokenizers.load(imported[name] / "tokenizer")
        assert encode(tok, TEXT) == np.asarray(reference.preprocessor.tokenizer(TEXT)).tolist()
        assert tok.eos_id == tok.pad_id == reference.preprocessor.tokenizer.end_token_id
    import keras_hub

    from pipelines.generate import decode

    prompt = encode(tok, "But soft, what light")
    n = len(prompt)
    greedy = keras_hub.models.GPT2CausalLM(backbone=reference.backbone, preprocessor=None)
    greedy.compile(sampler="greedy")
    ids = np.zeros([1, n + 12], np.int32)
    ids[0, :n] = prompt
    out = greedy.generate({"token_ids": ids, "padding_mask": ids > -1 & (np.arange(n + 12) < n)}, stop_token_ids=None)
    want = decode(tok, out["token_ids"][0, n:].tolist())
    got = TextGenerator(imported["hf"]).generate(["But soft, what light"], 12, SamplerConfig(name="greedy"))[0]
    assert got == want and len(got) > 0


def test_qat_quantizes_gpt2s_tanh_gelu(imported):
    from pipelines import mot

    model, _, _ = checkpoints.load_model(imported["hf"])
    quantized = mot.quantize(model)
    names = [layer.name for layer in quantized.layers]
    assert "quant_block0_mlp_act" in names and "quant_block0_mlp_in" in names  # the GELU layer has its quantizer
    wrapper = quantized.get_layer("quant_block0_mlp_act")
    assert wrapper.quantize_config.get_output_quantizers(wrapper.layer)  # an 8-bit range on its output
    assert np.isfinite(quantized(np.arange(16, dtype=np.int32)[None]).numpy()).all()


def test_bad_checkpoints_are_one_line_and_write_nothing(sources, tmp_path, capsys):
    dirs, _ = sources

    def broken(name, edit):
        path = shutil.copytree(dirs[name], tmp_path / f"src-{len(list(tmp_path.iterdir()))}")
        edit(path)
        return path

    def set_config(key, value):
        def edit(path):
            config = json.loads((path / "config.json").read_text())
            config[key] = value
            (path / "config.json").write_text(json.dumps(config))
        return edit

    cases = [
        (broken("keras_hub", set_config("class_name", "GemmaBackbone")), "keras-hub 'GemmaBackbone' preset"),
        (broken("hf", set_config("model_type", "gemma")), "Hugging Face 'gemma' model"),
        (broken("hf", lambda p: (p / "merges.txt").unlink()), "lacks merges.txt"),
        (broken("hf", set_config("n_embd", 64)), "shape [321, 32], its config.json says [321, 64]"),
        (broken("hf", set_config("vocab_size", 500)), "shape [321, 32], its config.json says [500, 32]"),
        (tmp_path / "nowhere", "not a directory"),
    ]
    for source, message in cases:
        workdir = tmp_path / "run"
        code, _, err = run_cli(capsys, "import", f"--checkpoint={source}", f"--workdir={workdir}")
        assert code == 2, err
        (line,) = [line for line in err.splitlines() if "error:" in line]  # after progress notes, if any
        assert message in line and "Traceback" not in err, err
        assert not workdir.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "import", f"--checkpoint={dirs['hf']}", f"--workdir={tmp_path / 'full'}")
    assert code == 2 and "not empty" in err and (tmp_path / "full" / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_the_whole_path_on_an_imported_llama(llama_sources, tmp_path, capsys):
    """import -> prepare -> continue pre-training -> prune -> export -> serve -> TFLite int8 -> LiteRT-LM.

    On a Llama 3 checkpoint: GPT-2's block takes every stage in the rest of the suite (a classifier on
    Llama's block: test_finetune's LoRA classifier)."""
    from serving import client as client_lib
    from serving import server
    from tests.test_serve import start

    dirs, _ = llama_sources
    run = tmp_path / "llama"
    (tmp_path / "plays.txt").write_text("".join(bundled_lines(5000, 300)), encoding="utf-8")

    def cli(*argv):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    cli("import", f"--checkpoint={dirs['llama3_hf']}", f"--workdir={run}")
    code, _, err = run_cli(capsys, "train", f"--workdir={run}", "--steps=4")
    assert code == 2 and "no data yet; run `lmstack prepare" in err
    code, _, err = run_cli(capsys, "prepare", f"--workdir={run}", f"--corpus={tmp_path / 'plays.txt'}",
                           "--tokenizer=wordpiece")
    assert code == 2 and "its own tokenizer" in err
    prepared = cli("prepare", f"--workdir={run}", f"--corpus={tmp_path / 'plays.txt'}", "--min_train_shards=2")
    assert prepared["vocab_size"] == 326 and (run / "checkpoints" / "ckpt-0.index").is_file()  # the model stays
    before = cli("evaluate", f"--workdir={run}")
    trained = cli("train", f"--workdir={run}", "--steps=8", "--batch_size=4", "--eval_every=0", "--progress=none")
    config = json.loads((run / "config.json").read_text())
    assert trained["steps"] == 8 and config["train"]["learning_rate"] == pytest.approx(3e-3 / 10)
    assert trained["loss"] < before["loss"]  # continued pre-training on this text lowers its loss

    pruned = cli("optimize", f"--workdir={run}", "--method=prune", "--steps=6", "--batch_size=4",
                 "--progress=none")
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.02)

    exported = pathlib.Path(cli("export", f"--workdir={run}", "--variant=pruned50")["path"])
    from serving.server import chat

    info = json.loads((exported / "assets.extra" / "lmstack_config.json").read_text())
    template = chat.ChatTemplate.from_export(info)
    assert template.stop == ("<|eot_id|>",)  # the checkpoint's own template came along
    assert template.render([{"role": "user", "content": "Hi"}]) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    core = server.ModelServer({"lm": server.ServedModel("lm", exported.parent)})
    core.refresh()
    grpc_server, rest_server, _, rest_target = start(core)
    try:
        served = client_lib.RestClient(rest_target, "lm").generate(["But soft, what light"], max_new_tokens=8)[0]
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)
    code, local, err = run_cli(capsys, "generate", f"--workdir={run}", "--variant=pruned50",
                               "--prompt=But soft, what light", "--max_new_tokens=8", "--sampler=greedy")
    assert code == 0 and served == local.removesuffix("\n") and served, err

    bundle = pathlib.Path(cli("tflite", f"--workdir={run}", "--variant=pruned50", "--quantize=int8",
                              "--format=litertlm", "--prefill_lengths=8")["path"])
    code, on_device, err = run_cli(capsys, "generate", f"--workdir={run}", "--variant=pruned50", "--backend=tflite",
                                   "--quantize=int8", "--prompt=But soft", "--max_new_tokens=6")
    assert code == 0 and on_device.strip(), err  # ai-edge-litert runs the int8 Llama with its BPE tokenizer
    # Google's LiteRT-LM engine loads the bundle (Llama's block, BPE, chat template) and generates. Its
    # tokens are not compared: this untrained int8 model's logits are so nearly tied that ai-edge-litert's
    # own XNNPACK and reference kernels pick other tokens on 4 of 10 prompts (test_litertlm holds trained
    # models to lmstack's text).
    import litert_lm

    engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(), cache_dir=str(tmp_path))
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=6, sampler_config=(
        litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=1.0, seed=0)))
    session.run_prefill(["But soft"])
    assert session.run_decode().texts[0] and engine.tokenize("But soft") == encode(
        tokenizers.load(run / "tokenizer"), "But soft")
    scored = cli("evaluate", f"--workdir={run}", "--variant=pruned50", "--backend=tflite", "--quantize=int8")
    assert np.isfinite(scored["bits_per_char"])


# -- Llama-family checkpoints: Llama 3 and Qwen2, as keras-hub builds and writes them --

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|endoftext|>"]  # what keras-hub's Llama3Tokenizer and QwenTokenizer ask the vocabulary for


# Llama 3's chat template, shortened (no system-prompt date line).
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
                   "{{ m.content }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")


@pytest.fixture(scope="module")
def llama_sources(tmp_path_factory, english_text):
    """{name: checkpoint directory} for Llama 3 and Qwen2 in both formats, and keras-hub's CausalLM of each.

    Weights drawn with std 0.5, so the rotary layout, the grouped heads and the biases each change the logits.
    """
    import keras
    import keras_hub
    import tokenizers as hf

    root = tmp_path_factory.mktemp("llama")
    bpe = hf.Tokenizer(hf.models.BPE())
    bpe.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(english_text.splitlines(keepends=True), hf.trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens(LLAMA_SPECIALS)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    import io

    import sentencepiece

    proto = io.BytesIO()  # Mistral's kind of tokenizer: a SentencePiece BPE with byte fallback
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(english_text.splitlines()), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    dirs, references = {}, {}
    for name, kind in (("llama3", "Llama3"), ("qwen", "Qwen"), ("mistral", "Mistral")):
        keras.utils.set_random_seed(0)
        backbone = getattr(keras_hub.models, f"{kind}Backbone")(
            vocabulary_size=400 if kind == "Mistral" else bpe.get_vocab_size(), num_layers=2, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=32, intermediate_dim=64,
            **({"sliding_window": 24} if kind == "Mistral" else {}))
        rng = np.random.default_rng(0)
        for variable in backbone.weights:
            variable.assign(rng.normal(0.0, 0.5, variable.shape).astype(np.float32))
        tokenizer = keras_hub.models.MistralTokenizer(proto=proto.getvalue()) if kind == "Mistral" else \
            getattr(keras_hub.models, f"{kind}Tokenizer")(vocabulary=bpe.get_vocab(), merges=merges)
        preprocessor = getattr(keras_hub.models, f"{kind}CausalLMPreprocessor")(tokenizer, sequence_length=32)
        reference = getattr(keras_hub.models, f"{kind}CausalLM")(backbone=backbone, preprocessor=preprocessor)
        reference.save_to_preset(str(root / f"{name}_keras_hub"))
        reference.export_to_transformers(str(root / f"{name}_hf"))
        # A short context (keras-hub writes Llama 3's 8,192), and a chat model's template and end of turn.
        edits = [("config.json", {"max_position_embeddings": 32})] * (name != "mistral") + [
            ("tokenizer_config.json", {"eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE})] * (
            name == "llama3")
        for file, extra in edits:
            path = root / f"{name}_hf" / file
            path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
        dirs |= {f"{name}_keras_hub": root / f"{name}_keras_hub", f"{name}_hf": root / f"{name}_hf"}
        references[name] = reference
    return dirs, references


@pytest.fixture(scope="module")
def llama_imported(llama_sources, tmp_path_factory):
    dirs, _ = llama_sources
    root = tmp_path_factory.mktemp("llama_imported")
    return {name: (pretrained.import_checkpoint(path, root / name), root / name)[1] for name, path in dirs.items()}


@pytest.mark.parametrize("name", ["llama3_keras_hub", "llama3_hf", "qwen_keras_hub", "qwen_hf", "mistral_keras_hub",
                                  "mistral_hf"])
def test_logits_and_tokens_equal_keras_hubs_llama_qwen_and_mistral(llama_sources, llama_imported, name):
    _, references = llama_sources
    reference = references[name.split("_")[0]]
    ids = np.random.default_rng(1).integers(0, 320, [2, 24]).astype(np.int32)
    want = np.asarray(reference({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))
    model, config, step = checkpoints.load_model(llama_imported[name])
    assert step == 0 and config.positions == "rope" and config.num_kv_heads == 2
    assert config.bias == ("qkv" if name.startswith("qwen") else "none")
    if name.startswith("mistral"):  # no longer than its sliding window, where that is full attention
        assert config.seq_len == 24 and tokenizers.load_config(llama_imported[name] / "tokenizer")["kind"] == \
            "sentencepiece"
    np.testing.assert_allclose(model(ids).numpy(), want, atol=1e-4)
    tok = tokenizers.load(llama_imported[name] / "tokenizer")
    # Special tokens written in the text stay whole (a BPE's; SentencePiece reads them as text, as keras-hub does).
    text = TEXT + "<|begin_of_text|><|eot_id|><|endoftext|>"
    assert encode(tok, text) == np.asarray(reference.preprocessor.tokenizer(text)).tolist()
    # The end of a document: the checkpoint's eos_token, <|eot_id|> for the chat model's files.
    eos = "<|eot_id|>" if name == "llama3_hf" else reference.preprocessor.tokenizer.end_token
    assert tok.eos_id == reference.preprocessor.tokenizer.token_to_id(eos)


def test_greedy_continuation_of_an_imported_llama_matches_keras_hub(llama_sources, llama_imported):
    import keras_hub

    import models
    from models import decoding

    _, references = llama_sources
    tok = tokenizers.load(llama_imported["llama3_hf"] / "tokenizer")
    prompt = encode(tok, "But soft, what light")
    n = len(prompt)
    greedy = keras_hub.models.Llama3CausalLM(backbone=references["llama3"].backbone, preprocessor=None)
    greedy.compile(sampler="greedy")
    ids = np.zeros([1, n + 12], np.int32)
    ids[0, :n] = prompt
    out = greedy.generate({"token_ids": ids, "padding_mask": np.arange(n + 12)[None] < n}, stop_token_ids=None)
    model, config, _ = checkpoints.load_model(llama_imported["llama3_hf"])
    got = decoding.Generator(models.decoder(model, config)).generate([prompt], 12)[0]  # no stop token
    assert got == out["token_ids"][0, n:].tolist()


def test_llama_checkpoints_lmstack_cannot_hold_are_one_line(llama_sources, tmp_path, capsys):
    dirs, _ = llama_sources

    def changed(edit):
        path = shutil.copytree(dirs["llama3_hf"], tmp_path / f"src-{len(list(tmp_path.iterdir()))}")
        for file, update in edit.items():
            data = json.loads((path / file).read_text())
            (path / file).write_text(json.dumps(update(data)))
        return path

    cases = [
        (changed({"config.json": lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}}),
         "rope_scaling 'llama3'"),
        (changed({"config.json": lambda c: {**c, "num_local_experts": 8}}), "a mixture of experts"),
        (changed({"config.json": lambda c: {**c, "head_dim": 16}}), "head_dim 16"),
        (changed({"tokenizer.json": lambda t: {**t, "pre_tokenizer": {"type": "Metaspace"}}}),
         "not a byte-level BPE tokenizer"),
    ]
    for source, message in cases:
        workdir = tmp_path / "run"
        code, _, err = run_cli(capsys, "import", f"--checkpoint={source}", f"--workdir={workdir}")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not workdir.exists()


def test_bfloat16_safetensors_read_as_their_float32_values(tmp_path):
    # Llama-family checkpoints ship in bfloat16, which numpy lacks: read as the float32 they widen to.
    import ml_dtypes
    from safetensors.numpy import save_file

    from pipelines import pretrained_llama

    values = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    save_file({"model.a": values.astype(ml_dtypes.bfloat16), "model.b": values.astype(np.float16)},
              str(tmp_path / "model.safetensors"))
    read = pretrained_llama.read_hugging_face_weights(tmp_path)
    np.testing.assert_array_equal(read["a"], values.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(read["b"], values.astype(np.float16).astype(np.float32))
    assert read["a"].dtype == np.float32 and not np.array_equal(read["a"], values)  # rounded, as stored
