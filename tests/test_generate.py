"""`lmstack generate` on a workdir with a freshly built (untrained) model."""

import pytest
import tensorflow as tf

import models
from app.main import main
from pipelines import checkpoints, prepare, tokenizers
from pipelines.generate import TextGenerator
from tests.helpers import run_cli


@pytest.fixture(scope="module", params=["transformer", "lstm"])
def workdir(request, tmp_path_factory, english_text):
    root = tmp_path_factory.mktemp(request.param)
    (root / "corpus.txt").write_text(english_text, encoding="utf-8")
    config = prepare.PrepareConfig(corpus=(str(root / "corpus.txt"),), tokenizer=tokenizers.TokenizerConfig("char"))
    manifest = prepare.prepare(config, root / "run").manifest
    model_config = models.make_config(request.param, "tiny", vocab_size=manifest["tokenizer"]["vocab_size"])
    tf.keras.utils.set_random_seed(0)  # some random weights choose [EOS] first: these do not
    checkpoints.save(root / "run", models.build(model_config), model_config, step=7)
    return root / "run"



def test_loads_the_newest_checkpoint(workdir):
    generator = TextGenerator(workdir)
    assert generator.step == 7


@pytest.mark.slow
def test_streamed_text_equals_batched_text(workdir):
    generator = TextGenerator(workdir)
    streamed = "".join(generator.stream("To be", 10))
    assert streamed == generator.generate(["To be"], 10)[0]
    assert streamed  # an untrained model still writes characters of the vocabulary


@pytest.mark.slow
def test_cli_prints_the_continuation(capsys, workdir):
    generator = TextGenerator(workdir)
    code, out, err = run_cli(capsys, "generate", f"--workdir={workdir}", "--prompt=To be", "--max_new_tokens=10")
    assert code == 0, err
    assert out == generator.generate(["To be"], 10)[0] + "\n"


@pytest.mark.slow
def test_cli_seeded_sampling_repeats(capsys, workdir):
    args = [f"--workdir={workdir}", "--prompt=", "--max_new_tokens=12", "--sampler=top_p", "--temperature=3",
            "--seed=4"]
    first = run_cli(capsys, "generate", *args)
    again = run_cli(capsys, "generate", *args)
    other = run_cli(capsys, "generate", *args[:-1], "--seed=5")
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1] != other[1]


@pytest.mark.parametrize("args, message", [
    (["--max_new_tokens=0"], "--max_new_tokens=0"),
    (["--temperature=0"], "--temperature=0.0 must be positive"),
    (["--presence_penalty=3"], "--presence_penalty=3.0 must be in [-2, 2]"),
    (["--top_p=1.5"], "--top_p=1.5"),
])
def test_bad_flags(capsys, workdir, args, message):
    code, _, err = run_cli(capsys, "generate", f"--workdir={workdir}", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_workdir_without_a_model(capsys, tmp_path, english_text):
    (tmp_path / "c.txt").write_text(english_text)
    main_args = ["prepare", f"--corpus={tmp_path / 'c.txt'}", f"--workdir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit):
        main(main_args)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "generate", f"--workdir={tmp_path / 'run'}")
    assert code == 2 and "lmstack train" in err
