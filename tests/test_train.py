"""Training, evaluation and resumption, on a tiny model and a tiny corpus."""

import json
import math
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import models
from pipelines import prepare, tokenizers, train, training
from pipelines.errors import UserError
from tests.helpers import run_cli

TINY = ["--model=transformer", "--preset=tiny", "--warmup_steps=5", "--eval_every=10", "--eval_batches=2",
        "--checkpoint_every=10", "--batch_size=8", "--progress=none"]


@pytest.fixture
def workdir(tmp_path, english_text):
    (tmp_path / "corpus.txt").write_text(english_text * 3, encoding="utf-8")
    config = prepare.PrepareConfig(corpus=(str(tmp_path / "corpus.txt"),), tokenizer=tokenizers.TokenizerConfig("char"))
    prepare.prepare(config, tmp_path / "run")
    return tmp_path / "run"


def vocab(workdir):
    return json.loads((workdir / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]



def lmstack(*argv, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "app", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kw)


def checkpoint_steps(workdir):
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (workdir / "checkpoints").glob("ckpt-*.index"))


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_weight_decay_skips_biases_norms_and_positions(preset):
    # One AdamW step with zero gradients moves a weight only by its decay.
    model = models.build(models.make_config("transformer", preset, vocab_size=24, bias="all"))
    before = {v.name: v.numpy() for v in model.trainable_variables}
    optimizer = training.adamw(0.1, weight_decay=0.5, clip_norm=0.0)
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    decayed = {v.name for v in model.trainable_variables if (v.numpy() != before[v.name]).any()}
    kept = set(before) - decayed
    assert all(len(before[name].shape) == 2 and "positions" not in name for name in decayed), decayed
    assert all(len(before[name].shape) == 1 or "positions" in name for name in kept), kept


def test_train_writes_checkpoints_metrics_and_logs(workdir, capsys):
    defaults = [flag for flag in TINY if not flag.startswith("--warmup_steps")]  # a 30-step run needs no warmup flag
    code, out, err = run_cli(capsys, "train", f"--workdir={workdir}", *defaults, "--steps=30", "--profile_steps=3,5")
    assert code == 0, err
    assert checkpoint_steps(workdir) == [10, 20, 30]
    assert list((workdir / "logs" / "plugins" / "profile").rglob("*.xplane.pb"))  # the profiler trace
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["bits_per_char"] > 0
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-6)
    assert metrics["loss"] < math.log(vocab(workdir))  # learned something beyond uniform
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["family"] == "transformer" and config["train"]["steps"] == 30
    tags = {v.tag for f in (workdir / "logs" / "train").glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(f)) for v in event.summary.value}
    assert {"epoch_loss", "epoch_perplexity", "epoch_bits_per_char"} <= tags, tags  # derived from the loss
    assert "trained transformer" in err and "bits/char" in err
    assert json.loads(out) == {"workdir": str(workdir), **{k: metrics[k] for k in (
        "model", "params", "steps", "loss", "perplexity", "bits_per_char", "tokens_per_s", "wall_seconds", "dropout")}}

    # evaluate: one JSON object on stdout, also metrics.json
    code, out, err = run_cli(capsys, "evaluate", f"--workdir={workdir}")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"loss", "perplexity", "bits_per_char", "tokens", "chars"}
    assert math.isclose(result["loss"], metrics["loss"], rel_tol=1e-5)
    assert math.isclose(result["bits_per_char"], result["loss"] * result["tokens"] / result["chars"] / math.log(2),
                        rel_tol=1e-3)

    # a rerun with more steps continues from the last checkpoint
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=40")
    assert code == 0, err
    assert checkpoint_steps(workdir)[-1] == 40
    assert json.loads((workdir / "metrics.json").read_text())["trained_steps_this_run"] == 10


def test_evaluate_a_new_corpus_with_the_runs_tokenizer(workdir, capsys, tmp_path):
    run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=10")
    other = tmp_path / "other.txt"
    other.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 20)
    code, out, err = run_cli(capsys, "evaluate", f"--workdir={workdir}", f"--corpus={other}")
    assert code == 0, err
    result = json.loads(out)
    assert result["text"] == str(other) and result["tokens"] > 0
    assert result["chars"] <= len(other.read_text())


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(workdir, capsys):
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=10")
    assert code == 0, err
    before = checkpoint_steps(workdir)
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=60", "--learning_rate=1e30",
                           "--clip_norm=0")
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "the loss became nan" in lines[0].lower() and "Traceback" not in err
    assert checkpoint_steps(workdir) == before  # the diverged weights were never saved


@pytest.mark.parametrize("args, message", [
    (["--heads=3"], "does not divide into heads=3"),
    (["--steps=0"], "--steps=0"),
    (["--warmup_steps=50", "--steps=20"], "--warmup_steps=50"),
    (["--profile_steps=abc"], "--profile_steps"),
    (["--epochs=0"], "--epochs=0: must be at least 1"),
])
def test_bad_settings(workdir, capsys, args, message):
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=20", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (workdir / "checkpoints").exists()


def test_epochs_become_steps_over_the_training_windows():
    config = train.TrainConfig(epochs=2, batch_size=4)
    # 1,000 tokens make 100 windows of 9 + 1 tokens; 2 passes at 4 windows a step are 50 steps.
    assert config.for_data(train_tokens=1000, seq_len=9).steps == 50
    assert train.TrainConfig(steps=7).for_data(train_tokens=1000, seq_len=9).steps == 7  # no epochs: as given
    assert train.TrainConfig(epochs=1, batch_size=4).for_data(train_tokens=10, seq_len=9).steps == 1  # at least one


def test_unprepared_workdir(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", f"--workdir={tmp_path}", *TINY)
    assert code == 2 and "lmstack prepare" in err


def test_resume_with_other_settings_leaves_checkpoints_alone(workdir, capsys):
    run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=10")
    before = {p.name: p.read_bytes() for p in (workdir / "checkpoints").iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=20", "--layers=3")
    assert code == 2 and "layers=2 (now 3)" in err
    after = {p.name: p.read_bytes() for p in (workdir / "checkpoints").iterdir() if p.is_file()}
    assert after == before


def test_malformed_tf_config(workdir, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--strategy=multi_worker")
    assert code == 2 and "TF_CONFIG is malformed" in err


def test_learning_rate_schedule_warms_up_and_decays():
    config = train.TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3)
    schedule = training._learning_rate(config)
    values = [float(schedule(s)) for s in (0, 5, 10, 55, 100)]
    assert values[0] < values[1] < values[2] and math.isclose(values[2], 1e-3, rel_tol=1e-5)
    assert values[2] > values[3] > values[4] and math.isclose(values[4], 1e-4, rel_tol=1e-3)
    constant = training._learning_rate(train.TrainConfig(steps=100, warmup_steps=10, schedule="constant",
                                                      learning_rate=1e-3))
    assert math.isclose(float(constant(90)), 1e-3, rel_tol=1e-5)


@pytest.mark.parametrize("steps, warmup", [(30, 3), (60, 6), (1500, 100), (5, 0)])
def test_warmup_fits_the_run_unless_given(steps, warmup):
    config = train.TrainConfig(steps=steps, learning_rate=1e-3)
    config.validate()  # a short run with default flags is not refused
    assert config.warmup() == warmup
    schedule = training._learning_rate(config)
    assert math.isclose(float(schedule(warmup)), config.learning_rate, rel_tol=1e-5)  # the peak, after the warmup
    assert train.TrainConfig(steps=steps, warmup_steps=2).warmup() == 2
    with pytest.raises(UserError, match=f"^warmup_steps={steps}: leaves no steps to decay over"):
        train.TrainConfig(steps=steps, warmup_steps=steps).validate()  # a value the user gave is still checked


@pytest.mark.parametrize("intervals, expected", [((1000, 200, 200, 0), 10), ((60, 60, 200, 0), 10),
                                                  ((30, 10, 10, 0), 10), ((1001, 200, 200, 0), 1),
                                                  ((48, 48, 16, 32), 16)])
def test_steps_per_execution_divides_every_interval_the_loop_acts_on(intervals, expected):
    k = training.steps_per_execution(*intervals)
    assert k == expected and all(i % k == 0 for i in intervals)


def test_learning_rate_defaults_to_the_models_own():
    peak = lambda family, preset, **kw: train.TrainConfig().for_model(
        models.make_config(family, preset, vocab_size=30, **kw)).learning_rate
    assert peak("transformer", "small") == pytest.approx(3e-3) and peak("lstm", "small") == pytest.approx(5e-3)
    # wider models train at a lower peak: nanoGPT's 1e-3 at width 384, about GPT-3 Small's at 768
    assert peak("transformer", "base") == pytest.approx(1e-3) and peak("transformer", "small", d_model=768) < 6e-4
    assert peak("lstm", "base") < 5e-3 and peak("transformer", "tiny") == peak("transformer", "small")
    wide = models.make_config("transformer", "base", vocab_size=30)
    assert train.TrainConfig(learning_rate=5e-4).for_model(wide).learning_rate == 5e-4  # a given value is kept
    with pytest.raises(ValueError, match="for_model"):
        training._learning_rate(train.TrainConfig())


@pytest.mark.parametrize("given, epochs, resumed, expected", [
    (None, 1.2, None, 0.0), (None, 2.5, None, train.DROPOUT), (0.3, 0.5, None, 0.3), (None, 5.0, 0.0, 0.0)])
def test_dropout_follows_how_often_the_run_sees_its_data(given, epochs, resumed, expected):
    config = models.make_config("transformer", "small", vocab_size=30, dropout=given)
    old = None if resumed is None else models.make_config("transformer", "small", vocab_size=30, dropout=resumed)
    decided, why = train.run_dropout(config, epochs, old)
    assert decided.dropout == expected
    assert (why is None) == (given is not None)  # a value the user gave is theirs, unexplained


def test_train_decides_dropout_once_and_a_longer_rerun_keeps_it(workdir, capsys):
    # A 10-step run covers a fraction of the data: no dropout, said in the summary; rerun for
    # more than two epochs, it resumes with the dropout it was trained with (no resume refusal).
    flags = [f for f in TINY if f != "--preset=tiny"] + ["--preset=small", "--layers=1", "--d_model=16",
                                                        "--heads=1", "--seq_len=16", "--batch_size=64"]
    code, out, err = run_cli(capsys, "train", f"--workdir={workdir}", *flags, "--steps=10")
    assert code == 0, err
    assert re.search(r"dropout 0: the run sees its training data 0\.\d+ times, fewer than 2", err), err
    assert json.loads((workdir / "config.json").read_text())["model"]["dropout"] == 0.0
    train_tokens = json.loads((workdir / "data" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    steps = math.ceil(3 * train_tokens / (64 * 16))
    code, out, err = run_cli(capsys, "train", f"--workdir={workdir}", *flags, f"--steps={steps}")
    assert code == 0, err
    assert "dropout 0: as the run being resumed" in err
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == steps


def test_xla_on_two_cpu_replicas_is_refused(workdir):
    # XLA's CPU backend has no cross-device all-reduce: without the check this is a traceback mid-fit.
    result = lmstack("train", f"--workdir={workdir}", *TINY, "--steps=20", "--strategy=mirrored",
                     "--logical_cpus=2", "--jit_compile")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "--jit_compile=true: cannot train 2 replicas on CPU devices" in errors[0]
    assert not (workdir / "checkpoints").exists()


def test_accumulated_gradients_make_the_update_of_one_larger_batch():
    import numpy as np

    from models.backend import keras

    config = models.make_config("transformer", "tiny", vocab_size=24)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 24, [8, 16]).astype(np.int32)
    y = rng.integers(0, 24, [8, 16]).astype(np.int32)
    trained = {}
    for accumulate in (1, 4):  # one batch of 8; four of 2 added up
        keras.utils.set_random_seed(0)
        model = models.build(config)
        # Plain SGD: the update is the gradient itself, so a wrong scale shows (Adam would hide it).
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        training.accumulate_gradients(model, accumulate)
        losses = [model.train_on_batch(x, y) for _ in range(3)]
        trained[accumulate] = (model.get_weights(), losses, int(model.optimizer.iterations.numpy()))
    (one, one_losses, one_steps), (acc, acc_losses, acc_steps) = trained[1], trained[4]
    assert one_steps == acc_steps == 3  # one optimizer step per batch of 8, however it is cut
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)  # the loss: the mean of the parts'
    for a, b in zip(acc, one):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert one_losses[-1] < one_losses[0] - 0.05  # the steps did move the weights


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus(workdir, tmp_path, capsys):
    import shutil

    single = shutil.copytree(workdir, tmp_path / "single")
    default_progress = [flag for flag in TINY if flag not in ("--progress=none", "--batch_size=8")]
    # 2 replicas x 2 accumulated batches x 4 sequences: the update of one batch of 16
    result = lmstack("train", f"--workdir={workdir}", *default_progress, "--steps=20", "--strategy=mirrored",
                     "--logical_cpus=2", "--batch_size=4", "--grad_accum_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    # Into a pipe the progress bar is a line per epoch, not a redrawn bar (backspaces, carriage returns).
    out = result.stdout
    assert "\x08" not in out and "\r" not in out and "Epoch 2/2" in out, repr(out)
    assert "MirroredStrategy on 2 replica(s), global batch 16 x 16 (2 accumulated batches of 8)" in result.stderr
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["global_batch"] == 16 and metrics["steps"] == 20
    code, _, err = run_cli(capsys, "train", f"--workdir={single}", *TINY, "--steps=20", "--batch_size=16")
    assert code == 0, err
    alone = json.loads((single / "metrics.json").read_text())
    assert math.isclose(metrics["loss"], alone["loss"], rel_tol=1e-4)  # the same data, the same updates


@pytest.mark.slow
def test_kill_9_then_rerun_resumes(workdir):
    args = ["train", f"--workdir={workdir}", *TINY, "--steps=200", "--checkpoint_every=20"]
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not (workdir / "checkpoints").exists()
                                           or not checkpoint_steps(workdir) or checkpoint_steps(workdir)[-1] < 40):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_steps(workdir)[-1]
    assert 40 <= killed_at < 200
    result = lmstack(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in result.stderr.splitlines() if line.startswith("resuming from step")]
    assert resumed and int(resumed[0].split()[-1]) >= killed_at
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 200 and metrics["trained_steps_this_run"] <= 200 - killed_at


@pytest.mark.slow
def test_lora_trains_only_adapters_resumes_after_kill_9_and_merges_for_every_later_stage(workdir, capsys):
    LORA = ["--lora_rank=4", "--lora_targets=attention,mlp_in", "--batch_size=4", "--eval_every=0",
            "--progress=none"]
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", "--lora_rank=4", "--steps=10")
    assert code == 2 and "has none yet" in err and not (workdir / "checkpoints").exists()
    code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *TINY, "--steps=20")
    assert code == 0, err
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    base = {name: tf.train.load_variable(latest, name) for name, _ in tf.train.list_variables(latest)}
    config_before = (workdir / "config.json").read_text()
    for args, message in ((["--lora_rank=4", "--lora_targets=attn"], "'attn' names no layer"),
                          (["--lora_alpha=8"], "add --lora_rank=R"),
                          (["--lora_rank=4", "--layers=3"], "keeps its shape")):
        code, _, err = run_cli(capsys, "train", f"--workdir={workdir}", *args, "--steps=10")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (workdir / "config.json").read_text() == config_before

    args = ["train", f"--workdir={workdir}", *LORA, "--steps=120", "--checkpoint_every=20"]
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not [s for s in checkpoint_steps(workdir) if 40 <= s < 120]:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = lmstack(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in result.stderr.splitlines() if line.startswith("resuming from step")]
    assert resumed and int(resumed[0].split()[-1]) >= 40  # the adapters' own steps, from 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 120 and metrics["trained_steps_this_run"] <= 80

    # Only the adapters moved: every trained weight is the base checkpoint's, bit for bit.
    adapted = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    names = {name for name, _ in tf.train.list_variables(adapted) if name.startswith("model/")
             and "OPTIMIZER_SLOT" not in name}
    for name in names - {n for n in names if "lora_" in n}:
        np.testing.assert_array_equal(tf.train.load_variable(adapted, name), base[name])
    assert sum("lora_b" in n for n in names) == 2 * 5  # 2 blocks x query, key, value, attention_output, mlp_in
    assert all(np.abs(tf.train.load_variable(adapted, n)).max() > 0 for n in names if "lora_b" in n)

    # Every later stage loads it merged (`checkpoints.load_model`): a plain model with the adapted logits.
    from pipelines import checkpoints

    merged, config, step = checkpoints.load_model(workdir)
    unmerged, adapted_config, _ = checkpoints.load_model(workdir, merged=False)
    assert step == 120 and config.lora_rank == 0 and adapted_config.lora_rank == 4
    assert merged.count_params() < unmerged.count_params()
    ids = np.arange(16, dtype=np.int32)[None] % vocab(workdir)
    np.testing.assert_allclose(merged(ids).numpy(), unmerged(ids).numpy(), atol=1e-5)


def epoch_losses(output: str, prefix: str = "") -> list[float]:
    return [float(line.split(" - loss: ")[1].split()[0]) for line in output.splitlines()
            if line.startswith(prefix) and " - loss: " in line]


MULTI = ["--model=transformer", "--preset=tiny", "--warmup_steps=5", "--eval_every=10", "--eval_batches=2",
         "--checkpoint_every=10", "--progress=epoch", "--seed=3"]


@pytest.mark.slow
def test_two_workers_match_one_process_with_the_same_global_batch(workdir, tmp_path):
    import shutil
    single = tmp_path / "single"
    shutil.copytree(workdir, single)
    one = lmstack("train", f"--workdir={single}", *MULTI, "--steps=30", "--batch_size=16", "--strategy=default")
    assert one.returncode == 0, one.stderr[-3000:]
    two = lmstack("launch", "--workers=2", "--", "train", f"--workdir={workdir}", *MULTI, "--steps=30",
                  "--batch_size=4", "--grad_accum_steps=2", "--strategy=multi_worker")  # 2 workers x 2 x 4
    assert two.returncode == 0, two.stdout[-3000:]
    assert "CollectiveAllReduceStrategy on 2 replica(s), global batch 16" in two.stdout
    single_losses = epoch_losses(one.stdout + one.stderr)
    chief_losses = epoch_losses(two.stdout, "[worker 0]")
    assert len(single_losses) == len(chief_losses) == 3
    # Same model, seed and global batch; the workers read different shards (file
    # auto-sharding), so batches differ: trajectories agree within 5% per epoch.
    for a, b in zip(single_losses, chief_losses):
        assert abs(a - b) / a < 0.05, (single_losses, chief_losses)
    assert epoch_losses(two.stdout, "[worker 1]") == chief_losses  # all-reduced: one model
    assert checkpoint_steps(workdir) == [10, 20, 30]  # the chief's; workers wrote to temp dirs
    assert not any("worker" in p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_kill_one_worker_then_relaunch_resumes(workdir):
    args = ["launch", "--workers=2", "--", "train", f"--workdir={workdir}", *MULTI, "--steps=80",
            "--batch_size=8", "--strategy=multi_worker", "--checkpoint_every=10"]
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not (workdir / "checkpoints").exists()
                                           or not checkpoint_steps(workdir) or checkpoint_steps(workdir)[-1] < 20):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", f"app train --workdir={workdir}"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "stopping the others" in output
    killed_at = checkpoint_steps(workdir)[-1]
    assert killed_at < 80
    again = lmstack(*args[:-1])
    assert again.returncode == 0, again.stdout[-3000:]
    resumed = [line for line in again.stdout.splitlines() if "resuming from step" in line]
    assert resumed and int(resumed[0].split()[-1]) >= 20
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 80


@pytest.mark.slow
def test_mixed_precision_runs_evaluate_export_and_convert_like_any_run(workdir, tmp_path, capsys):
    # On Llama's block (rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied output):
    # the one end-to-end run of it, from `lmstack train --preset=llama-tiny` to the device.
    import shutil

    llama = [flag.replace("--preset=tiny", "--preset=llama-tiny") for flag in TINY] + ["--tie_embeddings=false"]
    for precision in ("bf16", "fp16"):  # fp16: loss scaling, here inside the accumulating step
        run = shutil.copytree(workdir, tmp_path / precision)
        # A subprocess: the mixed-precision policy is process-wide.
        result = lmstack("train", f"--workdir={run}", *llama, "--steps=10", "--batch_size=4", "--grad_accum_steps=2",
                         f"--mixed_precision={precision}")
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 10 and math.isfinite(metrics["loss"]) and metrics["loss"] < math.log(vocab(run))
        assert json.loads((run / "config.json").read_text())["train"]["mixed_precision"] == precision
        # The checkpoint holds float32 weights: float32 evaluation agrees with the run's own (16-bit) one.
        code, out, err = run_cli(capsys, "evaluate", f"--workdir={run}")
        assert code == 0 and math.isclose(json.loads(out)["loss"], metrics["loss"], rel_tol=1e-2), err
    run = tmp_path / "bf16"
    for argv in (["export"], ["tflite"]):
        code, _, err = run_cli(capsys, *argv, f"--workdir={run}")
        assert code == 0, err
    assert json.loads((run / "config.json").read_text())["model"]["positions"] == "rope"
    texts = {}
    for backend in ("keras", "savedmodel", "tflite"):
        code, out, err = run_cli(capsys, "generate", f"--workdir={run}", f"--backend={backend}", "--prompt=To be",
                                 "--max_new_tokens=12", "--sampler=greedy")
        assert code == 0, err
        texts[backend] = out
    assert texts["keras"] == texts["savedmodel"] == texts["tflite"] and len(texts["keras"]) == 12 + 1, texts
