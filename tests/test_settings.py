"""A setting is written once: the dataclass field makes the flag, the pipeline key and the docs."""

import dataclasses
import typing

import pytest
from absl import flags

from app import finetune, optimize, pipeline_stages, prepare, settings, train
from app import export as export_cmd
from app import client as client_cmd
from app import evaluate as evaluate_cmd
from app import generate as generate_cmd
from app import serve as serve_cmd
from app import tflite as tflite_cmd
from app.main import main
from pipelines import evaluate as evaluate_lib
from pipelines import finetune as finetune_lib
from pipelines import optimize as optimize_lib
from pipelines import prepare as prepare_lib
from pipelines import tokenizers
from pipelines import train as train_lib
from pipelines.errors import ConfigError
from models.samplers import SamplerConfig
from serving import client as client_lib
from serving import server
from serving.exporters import savedmodel, tflite

# command -> the config dataclasses its flags come from, with the fields it fills in itself.
COMMANDS = {
    train: [(train_lib.TrainConfig, ())],
    finetune: [(finetune_lib.FinetuneConfig, ())],
    optimize: [(optimize_lib.OptimizeConfig, ())],
    prepare: [(prepare_lib.PrepareConfig, ("tokenizer",)), (tokenizers.TokenizerConfig, ())],
    export_cmd: [(savedmodel.ExportConfig, ())],
    tflite_cmd: [(tflite.TFLiteConfig, ())],
    serve_cmd: [(server.Options, ())],
    evaluate_cmd: [(evaluate_lib.EvaluateConfig, ())],
    generate_cmd: [(SamplerConfig, ("name",))],
    client_cmd: [(client_lib.Connection, ()), (SamplerConfig, ("name",))],
}
# What a command takes besides its dataclasses' fields: where it works and what it does.
OWN = {
    serve_cmd: {"version"},  # and TensorFlow Serving's flags that change nothing here (NO_EFFECT)
    evaluate_cmd: {"backend", "quantize"},
    generate_cmd: {"prompt", "max_new_tokens", "sampler", "variant", "backend", "quantize", "export_dir",
                   "num_threads"},
    client_cmd: {"prompt", "max_new_tokens", "sampler", "compiled", "stream", "score", "classify", "status",
                 "metadata"},
}


def command_flags(module) -> flags.FlagValues:
    fv = flags.FlagValues()
    module.define_flags(fv)
    return fv


@pytest.mark.parametrize("module", COMMANDS, ids=lambda m: m.__name__)
def test_every_field_is_a_flag_with_its_default_type_and_help(module):
    fv = command_flags(module)
    for cls, exclude in COMMANDS[module]:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in exclude:
                continue
            name = prepare.TOKENIZER.get(field.name, field.name) if module is prepare else field.name
            flag = fv[name]
            default = None if field.default is dataclasses.MISSING else field.default
            assert flag.default == (list(default) if isinstance(default, tuple) else default), name
            assert flag.help and "override" not in flag.help, name
            choices = settings.choices(cls, field.name)
            if choices:
                assert list(flag.parser.enum_values) == list(choices), name
            elif hints[field.name] in (int, "int"):
                assert flag.flag_type() == "int", name
    # Nothing else but the command's own (workdir, progress, ...).
    own = {"workdir", "progress", "overwrite", "model", "preset", "runner", "beam_options", *OWN.get(module, ())}
    if module is serve_cmd:  # TensorFlow Serving's flags that change nothing here, accepted with a warning
        own |= set(serve_cmd.NO_EFFECT)
    names = {prepare.TOKENIZER.get(f.name, f.name) for cls, exclude in COMMANDS[module]
             for f in dataclasses.fields(cls) if f.name not in exclude}
    extra = set(fv) - names - own
    if module is train:  # the model overrides, made from the model configs' fields
        import models
        extra -= {f.name for cls in models.FAMILIES.values() for f in dataclasses.fields(cls)}
    assert not extra, extra


def test_generate_and_client_take_one_set_of_generation_flags():
    """The prompt, the length and the sampler mean the same in this process and from a server."""
    from models.samplers import SamplerConfig

    here, served = command_flags(generate_cmd), command_flags(client_cmd)
    names = {"prompt", "max_new_tokens", "sampler"} | {f.name for f in dataclasses.fields(SamplerConfig)} - {"name"}
    for name in names:
        assert (here[name].default, here[name].help) == (served[name].default, served[name].help), name
    assert served["sampler"].default == SamplerConfig().name == "greedy"
    assert served["max_new_tokens"].default == settings.MAX_NEW_TOKENS


def test_the_pipeline_takes_the_same_settings_as_the_flags():
    declared = pipeline_stages.stage_settings()
    assert {cls for cls, _ in declared["train"]} == {train_lib.TrainConfig}
    assert {cls for cls, _ in declared["optimize"]} == {optimize_lib.OptimizeConfig}
    assert {cls for cls, _ in declared["export"]} == {savedmodel.ExportConfig}
    assert tflite.TFLiteConfig in {cls for cls, _ in declared["tflite"]}
    for stage, parts in declared.items():
        for cls, _ in parts:
            assert set(settings.field_help(cls)) >= {f.name for f in dataclasses.fields(cls)}, (stage, cls)


def test_shared_settings_have_one_definition():
    """train and finetune take --strategy, --mixed_precision, ... from one dataclass, with one meaning."""
    train_flags, finetune_flags = command_flags(train), command_flags(finetune)
    for name in ("strategy", "logical_cpus", "mixed_precision", "jit_compile", "progress"):
        a, b = train_flags[name], finetune_flags[name]
        assert (a.help, a.default, a.flag_type()) == (b.help, b.default, b.flag_type()), name
    assert list(train_flags["strategy"].parser.enum_values) == ["auto", "default", "mirrored", "multi_worker"]


def test_field_help_reads_google_style_attributes():
    @dataclasses.dataclass
    class Example:
        """Something.

        Attributes:
            a, b: shared text that runs
                over two lines.
            c: its own.

        More prose.
        """
        a: int = 0
        b: int = 0
        c: str = ""

    assert settings.field_help(Example) == {"a": "shared text that runs over two lines.",
                                            "b": "shared text that runs over two lines.", "c": "its own."}


def test_a_bad_setting_is_said_in_each_front_ends_words(tmp_path, capsys):
    error = ConfigError("steps", 0, "must be at least 1")
    assert str(error) == "steps=0: must be at least 1"
    assert error.as_flag() == "--steps=0: must be at least 1"
    assert error.as_key("train") == "train.steps: must be at least 1 (got 0)"
    with pytest.raises(ConfigError, match=r"^steps=0: must be at least 1$"):
        train_lib.TrainConfig(steps=0).validate()
    with pytest.raises(ConfigError, match=r"^kind=unigram: expected one of char\|byte\|wordpiece\|sentencepiece\|bpe$"):
        tokenizers.TokenizerConfig("unigram").validate()
    # A renamed flag: TokenizerConfig.kind is prepare's --tokenizer.
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n" * 50)
    with pytest.raises(SystemExit):
        main(["prepare", f"--corpus={corpus}", f"--workdir={tmp_path / 'run'}", "--vocab_size=3"])
    assert capsys.readouterr().err.strip() == (
        "lmstack prepare: error: --vocab_size=3: too small: char needs the 4 reserved tokens "
        "[PAD] [UNK] [BOS] [EOS] plus at least one token of text; use 5 or more")
    # In a pipeline file, before any stage runs.
    config = tmp_path / "run.yaml"
    config.write_text(f"workdir: run\ncorpus: [{corpus}]\nmodels: {{lstm: {{}}}}\ntrain: {{steps: 0}}\n")
    with pytest.raises(SystemExit) as e:
        main(["pipeline", f"--config={config}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"lmstack pipeline: error: --config={config}: train.steps: must be at least 1 (got 0)")
    assert not (tmp_path / "run").exists()


def test_library_errors_do_not_speak_in_flags():
    """pipelines/ and serving/ raise ConfigError(field, ...), never UserError("--field=...")."""
    import ast

    from tests.helpers import ROOT

    offenders = []
    for path in [p for folder in ("pipelines", "serving", "models") for p in (ROOT / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("UserError", "ConfigError"):
                first = node.args[0] if node.args else None
                text = (first.value if isinstance(first, ast.Constant) else
                        first.values[0].value if isinstance(first, ast.JoinedStr) and first.values
                        and isinstance(first.values[0], ast.Constant) else "")
                if isinstance(text, str) and text.startswith("--"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
