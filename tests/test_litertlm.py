"""`lmstack tflite --format=litertlm`: bundles that Google's LiteRT-LM engine runs, with lmstack's tokens.

The engine is the real one (`litert-lm-api`, its native library on the CPU backend). Its greedy
text must equal lmstack's device runtime's on the same file, for prompts shorter than, as long as
and longer than a prefill length: the runtime schedules the prefills as the engine does, so an int8
file (each signature with its own ranges) gives the same tokens too.
"""

import json

import pytest

from pipelines import prepare, tokenizers, train
from pipelines.errors import UserError
from serving import edge
from serving.edge import runtime
from serving.exporters import litertlm, tflite
from tests.helpers import bundled_lines, run_cli, tiny_export

lm = pytest.importorskip("litert_lm")
PREFILLS = (4, 8)  # and the tiny model's context, 16
# Prompts of 1, 3, 4, 5, 8, 9 and 11 tokens for a char tokenizer.
PROMPTS = ["R", "ROM", "ROME", "ROMEO", "ROMEO. I", "ROMEO. I ", "ROMEO. I am"]
NEW = 5
_WORKDIRS: dict = {}


def trained(kind: str, tmp_path_factory, preset: str = "tiny"):
    """A workdir of `kind` with a tiny transformer (GPT-2's block, or Llama's with `llama-tiny`) trained
    long enough to say more than spaces."""
    if (kind, preset) not in _WORKDIRS:
        import models

        root = tmp_path_factory.mktemp(f"litertlm-{kind}-{preset}")
        (root / "corpus.txt").write_text("".join(bundled_lines(2000, 400)), encoding="utf-8")
        tokenizer = tokenizers.TokenizerConfig(kind, 300 if kind == "bpe" else 0)
        prepare.prepare(prepare.PrepareConfig(corpus=(str(root / "corpus.txt"),), tokenizer=tokenizer), root / "run")
        vocab = json.loads((root / "run" / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        train.train(root / "run", models.make_config("transformer", preset, vocab),
                    train.TrainConfig(steps=300, batch_size=8, warmup_steps=5, eval_every=0, checkpoint_every=300),
                    verbose=0)
        _WORKDIRS[kind, preset] = root / "run"
    return _WORKDIRS[kind, preset]


def engine_text(engine, prompt: str, new: int, **sampler) -> str:
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=new, sampler_config=lm.SamplerConfig(
        **(sampler or {"top_k": 1, "top_p": 1.0, "temperature": 1.0, "seed": 0})))
    session.run_prefill([prompt])
    return session.run_decode().texts[0]


@pytest.mark.parametrize("kind, quantize, preset", [
    ("char", "none", "tiny"), ("char", "int8", "tiny"), ("byte", "none", "tiny"), ("char", "int8", "llama-tiny"),
    pytest.param("bpe", "none", "tiny", marks=pytest.mark.slow)])
def test_the_engine_generates_lmstacks_text(kind, quantize, preset, tmp_path_factory):
    """GPT-2's block and Llama's (RoPE, RMSNorm, SwiGLU, grouped-query attention)."""
    workdir = trained(kind, tmp_path_factory, preset)
    bundle = tflite.convert(workdir, tflite.TFLiteConfig(quantize=quantize, format="litertlm",
                                                         prefill_lengths=PREFILLS, calibration_windows=4))
    name = tflite.file_name("transformer", "", quantize)
    assert bundle == workdir / "tflite" / f"{name}.litertlm"
    ours = edge.EdgeModel(bundle.with_suffix(".tflite"))  # the very file the bundle holds
    assert sorted(ours._prefills) == [4, 8, 16]
    engine = lm.Engine(str(bundle), backend=lm.Backend.CPU(), cache_dir=str(tmp_path_factory.getbasetemp()))
    assert engine.eos_token_ids == [[ours.eos_id]]
    for text in ["ROMEO. I am", "What, ho! Juliet?\n", "naïve café ±", "[EOS] <|endoftext|>"]:
        assert engine.tokenize(text) == ours.tokenizer.encode(text), text
    lengths = set()
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        if len(ids) + NEW > ours.max_seq_len:
            continue
        lengths.add(len(ids))
        expected = ours.tokenizer.decode(ours.generate(ids, NEW, stop_ids=[ours.eos_id]))
        assert expected.strip()  # something to compare: a model that says only spaces would match trivially
        assert engine_text(engine, prompt, NEW) == expected, (prompt, len(ids))
    assert min(lengths) < 4 and {4, 5} & lengths and max(lengths) > 8, lengths
    # Sampled (the engine's own sampler): text of the asked length, or shorter if it chose [EOS].
    sampled = engine_text(engine, "ROMEO.", NEW, top_k=20, top_p=0.9, temperature=1.0, seed=3)
    assert 0 < len(ours.tokenizer.encode(sampled)) <= NEW


def test_the_engine_chats_with_the_workdirs_template(tmp_path_factory):
    """An imported checkpoint's chat template (WORKDIR/tokenizer/chat_template.json, Hugging Face's string
    content) goes into the bundle; the engine's Conversation lays a message out with it and answers
    with lmstack's continuation of that text, stopping at the template's stop string."""
    workdir = trained("char", tmp_path_factory)
    template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}{% if add_generation_prompt %}.{% endif %}"
    (workdir / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template, "stop": ["!"]}))
    try:
        bundle = tflite.convert(workdir, tflite.TFLiteConfig(format="litertlm", prefill_lengths=PREFILLS))
    finally:
        (workdir / "tokenizer" / "chat_template.json").unlink()
    engine = lm.Engine(str(bundle), backend=lm.Backend.CPU(), cache_dir=str(tmp_path_factory.getbasetemp()))
    assert engine.eos_token_ids == [[3], engine.tokenize("!")]
    conversation = engine.create_conversation()
    message = {"role": "user", "content": "romeo"}
    assert conversation.render_message_to_string(message) == "ROMEO."
    reply = conversation.send_message(message, max_output_tokens=NEW)
    ours = edge.EdgeModel(bundle.with_suffix(".tflite"))
    expected = ours.tokenizer.decode(ours.generate(ours.tokenizer.encode("ROMEO."), NEW,
                                                   stop_ids=[ours.eos_id, *engine.tokenize("!")]))
    assert reply.contents[0].text == expected and expected.strip()


def test_prefill_chunks_are_the_engines():
    """The schedule read off LiteRT-LM 0.18 (a file whose caches recorded which signature wrote
    each position): longest fitting chunks, one id held back per call, the last id to decode."""
    chunks = lambda n: runtime.prefill_chunks(n, [4, 8, 16, 32], 32)
    assert chunks(1) == []
    assert chunks(3) == [(4, 0, 2)]
    assert chunks(5) == [(4, 0, 3), (4, 3, 4)]
    assert chunks(7) == [(4, 0, 3), (4, 3, 6)]
    assert chunks(8) == [(8, 0, 7)]
    assert chunks(10) == [(8, 0, 7), (4, 7, 9)]
    assert chunks(16) == [(16, 0, 15)]


def test_what_the_engine_cannot_run_is_refused_in_one_line(tmp_path, capsys, tmp_path_factory, english_text):
    lstm, _ = tiny_export("lstm", tmp_path_factory, english_text)
    code, out, err = run_cli(capsys, "tflite", f"--workdir={lstm}", "--format=litertlm")
    assert code == 2 and "LiteRT-LM" in err and "recurrent" in err and len(err.strip().splitlines()) == 1, err
    assert not list((lstm / "tflite").glob("*.litertlm")) if (lstm / "tflite").exists() else True
    (tmp_path / "corpus.txt").write_text(english_text, encoding="utf-8")
    prepare.prepare(prepare.PrepareConfig(corpus=(str(tmp_path / "corpus.txt"),),
                                          tokenizer=tokenizers.TokenizerConfig("wordpiece", 200)), tmp_path / "wp")
    with pytest.raises(UserError, match="WordPiece"):
        litertlm.check_can_bundle("transformer", 1, tmp_path / "wp" / "tokenizer")
    with pytest.raises(UserError, match="batch_size"):
        litertlm.check_can_bundle("transformer", 2, tmp_path / "wp" / "tokenizer")
    code, out, err = run_cli(capsys, "tflite", f"--workdir={lstm}", "--format=onnx")
    assert code == 2 and "tflite|litertlm" in err, err
