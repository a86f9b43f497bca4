"""What a user meets around the scripts: Ctrl-C, sampling again, failed and concurrent runs, a full
disk, kill -9 during a save, file modes, private paths, --help and the first lines printed. Runs
that should succeed call main() in this process; the cases whose point is an exit code, a signal
or a resource limit run as a user runs them, in a subprocess."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import accord_losses
import model
import sample
import stage1_tokens
import stage2_lora
from model import run
from model.loader import current_umask, read_safetensors, save_safetensors
from tests.helpers import ROOT, assert_one_line_error, photo_folder, run_main, script, user_error


def stage1_args(tiny_model, images, out, *extra):
    return ["--images", images, "--model", tiny_model, "--out", out, "--val_steps", 0, *extra]


def start(name, *args, env=None, **popen):
    """A script as a background process (one thread, so two runs compute the same bits)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}, **popen)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for_log_lines(process, log, lines, timeout=600):
    """Until the run has finished `lines` steps (it must not have ended)."""
    deadline = time.time() + timeout
    while not (os.path.exists(log) and len(open(log).readlines()) >= lines):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the run wrote no log line in time"
        time.sleep(0.1)


def last_line(stderr):
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


# -------------------------------------------------------------------------------------------------
# Ctrl-C

@pytest.mark.slow
def test_ctrl_c_saves_the_last_finished_step_and_resume_matches_an_uninterrupted_run(tiny_model, tmp_path):
    """With no checkpoint due for a thousand steps, SIGINT still leaves one: the state after the last
    step the log records; --resume then ends where an uninterrupted run ends, bit for bit."""
    images = photo_folder(tmp_path / "photos")
    parts = str(tmp_path / "parts")
    first = start("stage1_tokens.py", *stage1_args(tiny_model, images, parts, "--steps", 1000, "--save_every", 1000))
    wait_for_log_lines(first, os.path.join(parts, "stage1_log.jsonl"), 2)
    first.send_signal(signal.SIGINT)
    result = finish(first)
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    done = len(open(os.path.join(parts, "stage1_log.jsonl")).readlines())
    checkpoint = os.path.join(parts, "stage1_checkpoint.safetensors")
    assert last_line(result.stderr) == (f"interrupted: stage 1 stopped after step {done} of 1000; that state is "
                                        f"saved in {checkpoint}: continue with --resume")
    _, metadata = read_safetensors(checkpoint)
    assert metadata["step"] == str(done)
    assert sorted(os.listdir(parts)) == ["paths.json", "stage1_checkpoint.safetensors", "stage1_log.jsonl"]

    steps = done + 2  # the uninterrupted run to compare with stops there too
    resumed = finish(start("stage1_tokens.py", *stage1_args(tiny_model, images, parts, "--steps", steps, "--resume")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = str(tmp_path / "whole")
    straight = finish(start("stage1_tokens.py", *stage1_args(tiny_model, images, whole, "--steps", steps)))
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_file(os.path.join(parts, run.TOKENS_FILE)), load_file(os.path.join(whole, run.TOKENS_FILE))
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["residual"], b["residual"])
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(folder, "stage1_log.jsonl"))]
              for folder in (parts, whole)]
    assert losses[0] == losses[1] and len(losses[0]) == steps


def test_ctrl_c_waits_for_the_step_being_recorded():
    """A Ctrl-C while a step's results are applied is raised once they are, not halfway."""
    boundary, applied = run.StepBoundary(), []
    before = signal.getsignal(signal.SIGINT)  # not always Python's default: `cmd &` starts with SIGINT ignored
    with boundary:
        with pytest.raises(KeyboardInterrupt):
            with boundary.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here and must not raise
                applied.append("step")
    assert applied == ["step"]
    assert signal.getsignal(signal.SIGINT) is before


# -------------------------------------------------------------------------------------------------
# sampling again

@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A stage-1 run (one step, no grid) and what stage 1 printed."""
    root = tmp_path_factory.mktemp("trained")
    out = str(root / "run")
    printed = run_main(stage1_tokens.main, *stage1_args(tiny_model, photo_folder(root / "photos"), out, "--steps", 1))
    return out, printed


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.slow  # 3 s
def test_sampling_again_keeps_every_earlier_result(trained, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    run_main(sample.main, "--out", out, "--prompt", "a photo of <v>", "--prompt", "<v> in the snow", "--n", 3,
             "--steps", 2)
    assert "4/4" in capsys.readouterr().err.replace("\r", "\n")  # the bar: 2 batches (4 + 2 images) x 2 steps
    first = snapshot(os.path.join(out, "samples", "000"))
    printed = run_main(sample.main, "--out", out, "--prompt", "a photo of <v> on the beach", "--n", 1, "--steps", 2)
    assert printed.strip().endswith(os.path.join(out, "samples", "001"))
    assert snapshot(os.path.join(out, "samples", "000")) == first  # untouched
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["000", "001"]  # no temporary folder left
    expected = {"000": (["00: a photo of <v>", "01: <v> in the snow"], 3),
                "001": (["00: a photo of <v> on the beach"], 1)}
    for name, (prompts, n) in expected.items():  # each folder: exactly the pictures its prompts.txt lists
        folder = os.path.join(out, "samples", name)
        assert open(os.path.join(folder, "prompts.txt")).read().splitlines() == prompts
        pictures = {f"{p:02d}_{k:02d}.png" for p in range(len(prompts)) for k in range(n)}
        assert set(os.listdir(folder)) == pictures | {"grid.png", "prompts.txt", "settings.json"}
        assert json.load(open(os.path.join(folder, "settings.json")))["n"] == n


@pytest.mark.slow
def test_sampling_into_an_existing_folder_needs_overwrite(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    mine = tmp_path / "mine"
    os.makedirs(mine)
    (mine / "keep.txt").write_text("my notes")
    result = script("sample.py", "--out", out, "--samples", mine, "--n", 1, "--steps", 1, check=False)
    assert_one_line_error(result, "--samples", "already exists", "--overwrite")
    assert result.returncode == 1 and os.listdir(mine) == ["keep.txt"]
    run_main(sample.main, "--out", out, "--samples", mine, "--overwrite", "--n", 1, "--steps", 1)
    assert "keep.txt" not in os.listdir(mine) and "grid.png" in os.listdir(mine)


# -------------------------------------------------------------------------------------------------
# failed runs leave nothing behind

@pytest.mark.parametrize("case", ["missing images", "fake image", "bad model", "empty folder"])
def test_a_failed_run_leaves_no_run_folder(tiny_model, tmp_path, case):
    images, weights = str(tmp_path / "photos"), tiny_model
    if case == "missing images":
        images = str(tmp_path / "does_not_exist")
    elif case == "fake image":
        photo_folder(images, n=2, captions=False)
        (tmp_path / "photos" / "02.jpg").write_text("not a picture")
    elif case == "bad model":
        photo_folder(images, n=2)
        weights = str(tmp_path / "sd15.safetensors")
    else:
        os.makedirs(images)
    out = tmp_path / "runs" / "new"
    with pytest.raises(model.UserError):
        run_main(stage1_tokens.main, *stage1_args(weights, images, out, "--steps", 1))
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
def test_a_failed_run_as_the_user_sees_it(tiny_model, tmp_path):
    images = photo_folder(tmp_path / "photos", n=2, captions=False)
    (tmp_path / "photos" / "02.jpg").write_text("not a picture")
    result = script("stage1_tokens.py", *stage1_args(tiny_model, images, tmp_path / "out", "--steps", 1), check=False)
    assert_one_line_error(result, "02.jpg")
    assert result.returncode == 1 and not os.path.exists(tmp_path / "out")


def test_stage2_with_wrong_images_writes_nothing(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    before = snapshot(out)
    with pytest.raises(model.UserError, match="not the ones stage 1 learned from"):
        run_main(stage2_lora.main, "--out", out, "--images", photo_folder(tmp_path / "other", n=2), "--steps", 1)
    assert snapshot(out) == before


# -------------------------------------------------------------------------------------------------
# what the files are: modes, and nothing private in what is shared

@pytest.mark.slow  # 2 s
def test_outputs_get_the_usual_file_mode(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    run_main(stage2_lora.main, "--out", out, "--steps", 1, "--val_steps", 1)
    run_main(sample.main, "--out", out, "--n", 1, "--steps", 1)
    mode = 0o666 & ~current_umask()  # what a new file gets here (0644 under the usual umask 022)
    written = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]
    assert any(f.endswith(".safetensors") for f in written) and any(f.endswith(".png") for f in written)
    for path in written:
        assert os.stat(path).st_mode & 0o777 == mode, path


@pytest.mark.slow  # 3 s
def test_shared_files_hold_no_local_path(tiny_model, tmp_path, tmp_path_factory):
    """Every file of a finished run, but the local paths.json, is free of the user's directories
    (photos, model, run folder); a copy without paths.json still samples when told the model."""
    private = str(tmp_path_factory.getbasetemp())  # above the photos, the model and the run folder
    out = str(tmp_path / "run")
    run_main(stage1_tokens.main, *stage1_args(tiny_model, photo_folder(tmp_path / "photos"), out, "--steps", 2,
                                              "--save_every", 1))
    run_main(stage2_lora.main, "--out", out, "--steps", 1, "--val_steps", 1)
    run_main(sample.main, "--out", out, "--n", 1, "--steps", 1)
    shared = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f != run.PATHS_FILE]
    assert {"tokens.safetensors", "v.diffusers.safetensors", "v.a1111.safetensors", "lora.peft.safetensors",
            "lora.kohya.safetensors", "stage1_checkpoint.safetensors"} <= {os.path.basename(f) for f in shared}
    for path in shared:
        assert private.encode() not in open(path, "rb").read(), path
        if path.endswith(".safetensors"):
            assert private not in json.dumps(read_safetensors(path)[1]), path
    assert run.load_tokens(out)[2]["settings"]["model"] == "tiny.safetensors"
    assert json.load(open(os.path.join(out, run.PATHS_FILE)))["model"] == tiny_model

    copy = str(tmp_path / "received")
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(run.PATHS_FILE, "samples"))
    with pytest.raises(model.UserError, match="pass --model"):
        run_main(sample.main, "--out", copy, "--n", 1, "--steps", 1)
    run_main(sample.main, "--out", copy, "--model", tiny_model, "--n", 1, "--steps", 1)
    assert os.path.exists(os.path.join(copy, "samples", "000", "grid.png"))


# -------------------------------------------------------------------------------------------------
# a model file that fits no layout

def test_weights_that_fit_no_layout_end_in_one_line(tiny_model, tmp_path):
    tensors, metadata = read_safetensors(tiny_model)
    metadata = {k: v for k, v in metadata.items() if not k.endswith("_config")}  # shapes decide the layout
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.zeros(61, *tensors[key].shape[1:])
    bad = str(tmp_path / "odd.safetensors")
    save_safetensors(tensors, bad, metadata)
    message = user_error(stage1_tokens.main, *stage1_args(bad, photo_folder(tmp_path / "photos", n=2),
                                                          tmp_path / "out", "--steps", 1)).lower()
    assert all(word in message for word in (bad, "unet", "layout", "61")), message
    assert not os.path.exists(tmp_path / "out")


# -------------------------------------------------------------------------------------------------
# a full disk, two runs at once, kill -9 during a save

def nan_at(monkeypatch, step):
    real, calls = accord_losses.total, []

    def total(terms, weights):
        calls.append(1)
        return real(terms, weights) * (float("nan") if len(calls) == step + 1 else 1.0)

    monkeypatch.setattr(accord_losses, "total", total)


def file_size_limit(limit):
    def apply():  # in the child: a write past `limit` bytes fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    images, out = photo_folder(tmp_path / "photos"), str(tmp_path / "out")
    with monkeypatch.context() as patch:  # an unfinished run: stopped (by a NaN) before step 2
        nan_at(patch, 2)
        with pytest.raises(model.UserError):
            run_main(stage1_tokens.main, *stage1_args(tiny_model, images, out, "--steps", 4))
    checkpoint = os.path.join(out, "stage1_checkpoint.safetensors")
    before = open(checkpoint, "rb").read()
    # Room for the log and the token files, not for a new checkpoint.
    result = finish(start("stage1_tokens.py", *stage1_args(tiny_model, images, out, "--steps", 4, "--resume"),
                          preexec_fn=file_size_limit(len(before) - 1)))
    assert_one_line_error(result, checkpoint, "File too large", "previous file is unchanged")
    assert result.returncode == 1
    assert open(checkpoint, "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f] and not os.path.exists(os.path.join(out, "DONE_stage1"))
    run_main(stage1_tokens.main, *stage1_args(tiny_model, images, out, "--steps", 4, "--resume"))
    assert os.path.exists(os.path.join(out, "DONE_stage1"))
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "stage1_log.jsonl"))] == [1, 2, 3, 4]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    """A real failed write (a file-size limit), in a forked child so the limit stays out of pytest:
    no interpreter start, no imports to pay."""
    path = str(tmp_path / "x.safetensors")
    save_safetensors({"a": torch.ones(4)}, path)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: write, report the error's message through the pipe, never return to pytest
        code = 0
        try:
            file_size_limit(1000)()
            save_safetensors({"a": torch.zeros(1000)}, path)
        except model.UserError as e:
            os.write(write, str(e).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.close(read)
    assert os.waitpid(child, 0)[1] != 0
    assert message.startswith(f"cannot write {path}") and "previous file is unchanged" in message
    assert torch.equal(load_file(path)["a"], torch.ones(4)) and os.listdir(tmp_path) == ["x.safetensors"]


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_refuses_and_a_killed_ones_lock_blocks_nothing(tiny_model, tmp_path):
    images, out = photo_folder(tmp_path / "photos"), str(tmp_path / "out")
    first = start("stage1_tokens.py", *stage1_args(tiny_model, images, out, "--steps", 1000, "--save_every", 1000))
    try:
        wait_for_log_lines(first, os.path.join(out, "stage1_log.jsonl"), 1)
        second = script("stage1_tokens.py", *stage1_args(tiny_model, images, out, "--steps", 1, "--overwrite"),
                        check=False)
        assert_one_line_error(second, out, "in use by another run", f"process {first.pid}")
        assert second.returncode == 1 and first.poll() is None  # the first runs on, its folder untouched
        assert open(os.path.join(out, run.RunLock.NAME)).read().strip() == str(first.pid)
    finally:
        first.kill()  # SIGKILL: no chance to release the lock
        first.wait()
    assert os.path.exists(os.path.join(out, run.RunLock.NAME))  # left behind, held by nobody
    run_main(stage1_tokens.main, *stage1_args(tiny_model, images, out, "--steps", 1, "--overwrite"))
    assert os.path.exists(os.path.join(out, "DONE_stage1")) and not os.path.exists(os.path.join(out, run.RunLock.NAME))


def test_a_lock_is_refused_in_process_and_released(tmp_path):
    out = str(tmp_path / "out")
    with run.claim_out(out, "stage1", False, False):
        assert run.RunLock.holder(out) == str(os.getpid())
        with pytest.raises(model.UserError, match="in use by another run"):
            run.check_out(out, "stage1", False, False)
        with pytest.raises(model.UserError, match="in use by another run"):
            with run.claim_out(out, "stage1", False, False):
                pass
    assert run.RunLock.holder(out) is None and os.listdir(out) == []


KILLED_DURING_SAVE = """
import os, signal, sys
from model import loader
real, saves = loader.save_file, []

def save_file(tensors, path, metadata=None):
    if "checkpoint" in path:
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint: half of it on disk, then kill -9
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)

loader.save_file = save_file
import stage1_tokens
stage1_tokens.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tiny_model, tmp_path):
    images, out = photo_folder(tmp_path / "photos"), str(tmp_path / "out")
    argv = stage1_args(tiny_model, images, out, "--steps", 4, "--save_every", 1)
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, *map(str, argv)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert killed.returncode == -signal.SIGKILL
    checkpoint = os.path.join(out, "stage1_checkpoint.safetensors")
    _, metadata = read_safetensors(checkpoint)  # the first checkpoint, whole
    assert metadata["step"] == "1"
    assert [f for f in os.listdir(out) if ".tmp" in f]  # the half-written temporary file
    run_main(stage1_tokens.main, *argv, "--resume")
    assert os.path.exists(os.path.join(out, "DONE_stage1"))
    assert not [f for f in os.listdir(out) if ".tmp" in f or f == run.RunLock.NAME]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "stage1_log.jsonl"))] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------------
# --help and the first lines

@pytest.mark.parametrize("script_module", [stage1_tokens, stage2_lora, sample])
def test_help_shows_the_defaults(script_module, capsys):
    with pytest.raises(SystemExit):
        script_module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 42)" in text or "(default: 0)" in text  # the seed
    assert "(default: False)" in text  # a flag


def test_first_lines_say_what_is_happening(trained, tiny_model):
    out, printed = trained
    first, second = printed.splitlines()[:2]
    assert first.startswith("stage 1: learning <v> from 3 photos in ") and first.endswith(f"run folder {out}")
    assert second == f"model: {tiny_model} on cpu, fp32"
