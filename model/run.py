"""What the three scripts share about a run folder: one-line errors, atomic files, the JSONL log,
checkpoints that resume exactly, and the learned-token file.

A run folder (`--out`) holds one run: stage 1 writes tokens.safetensors, stage 2 lora.*.safetensors,
sample.py reads both. A file named DONE_<stage> marks a finished stage; it is never overwritten
silently. A training stage holds run.lock while it writes, so two runs never interleave in one
folder. paths.json is the run's only local file: where the photos and the model are on this
machine; everything else in the folder can be shared as it is.
"""
import argparse
import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import signal
import sys

import torch
import torch.distributed as dist

from model.errors import UserError
from model.loader import read_safetensors, save_safetensors

TOKENS_FILE = "tokens.safetensors"
TARGET_TOKEN = "<v>"
PLACEHOLDERS = ("{V}", "*")  # other spellings of <v> accepted in prompts


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, once what it leaves behind is known: the message says what was kept. A subclass of
    KeyboardInterrupt, so a caller of main() (toybench) still sees a Ctrl-C."""


def report_user_errors(interrupted="interrupted; finished checkpoints are kept (continue with --resume)"):
    """Uncaught UserError -> its message as one line on stderr and exit 1, no traceback. Ctrl-C ->
    one line and exit 130: an Interrupted's own message, or `interrupted` for a Ctrl-C that came
    before the script had anything to keep."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.stderr)
            sys.exit(1)
        if issubclass(kind, KeyboardInterrupt):
            print(f"interrupted: {value}" if issubclass(kind, Interrupted) else interrupted, file=sys.stderr)
            sys.exit(130)
        previous(kind, value, tb)

    sys.excepthook = hook


class StepBoundary:
    """Ctrl-C during training: it interrupts at once, except while a step's results are being
    applied and recorded (optimizer step, log line, checkpoint), where it waits until they are. So
    whenever KeyboardInterrupt reaches the loop, the parameters, the optimizer and the log are
    those of the last finished step, which the loop then saves for --resume.

        boundary = StepBoundary()
        with boundary:                    # installs the SIGINT handler, restores the old one
            ... forward ...
            with boundary.deferred():     # a Ctrl-C in here is raised on leaving
                optimizer step, log, finished = step + 1
    """

    def __init__(self):
        self.deferring, self.pending, self.previous = False, False, None

    def _handler(self, signum, frame):
        if self.deferring:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Python delivers no signals here anyway
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def hold(self):
        """From now on every Ctrl-C waits (for the save of an interrupted run)."""
        self.deferring = True

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default shown once: argparse's "(default: X)" is added unless the help
    already names the default in words ("default: the model's") or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_and_dtype(device, precision):
    """The --device/--precision defaults: CUDA when present, bf16 there and fp32 on the CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device")
    precision = precision or ("bf16" if device.startswith("cuda") else "fp32")
    return device, precision, PRECISIONS[precision]


def optimizer_step(loss, optimizer, scaler, params, max_norm=1.0):
    """Backward, unscale (a no-op unless fp16), clip the gradient norm, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(optimizer)
    scaler.update()


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def check_out(out, stage, resume, overwrite, check_lock=True):
    """Whether `out` may receive this stage, before anything is loaded or created: never silently
    over a finished stage, never beside an unfinished one without --resume or --overwrite."""
    done = os.path.join(out, f"DONE_{stage}")
    checkpoint = os.path.join(out, f"{stage}_checkpoint.safetensors")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a run folder")
    if os.path.exists(done) and not overwrite:
        raise UserError(f"{out} already holds a finished {stage} run; choose another --out or pass --overwrite")
    if os.path.exists(checkpoint) and not (resume or overwrite):
        raise UserError(f"{out} holds an unfinished {stage} run; pass --resume to continue it or --overwrite "
                        "to start again")
    if resume and not os.path.exists(checkpoint):
        raise UserError(f"--resume: no {stage} checkpoint in {out}")
    holder = RunLock.holder(out) if check_lock else None
    if holder is not None:
        raise UserError(RunLock.busy_message(out, holder))
    return checkpoint


@contextlib.contextmanager
def claim_out(out, stage, resume, overwrite):
    """The run folder for this stage, created only now (after every input was checked) and locked
    until the block ends; yields the checkpoint path. The checks run again under the lock, since
    another run may have started or finished meanwhile."""
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        lock = RunLock(out)
    except UserError:
        if created:
            os.rmdir(out)
        raise
    try:
        checkpoint = check_out(out, stage, resume, overwrite, check_lock=False)  # the lock is ours
        remove_stale_temporaries(out)
        if overwrite and not resume:
            for name in (f"DONE_{stage}", f"{stage}_checkpoint.safetensors", f"{stage}_log.jsonl"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        yield checkpoint
    finally:
        lock.release()


def remove_stale_temporaries(out):
    """Temporary files of a killed write (name.tmp<pid>, name.tmp<pid>.png): under the lock no
    other process writes here, so they are debris; the files they were meant to replace are intact."""
    for name in os.listdir(out):
        if re.search(r"\.tmp\d+(\.png)?$", name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


class RunLock:
    """run.lock in the run folder, held with flock while a stage writes there. The kernel drops an
    flock when its process ends, however it ends, so a lock file left by a killed run (kill -9, a
    crash, a power cut) blocks nothing: the next run takes the lock. The file holds the holder's
    PID, for the message a second run prints. POSIX only (fcntl), like the rest of the tooling."""

    NAME = "run.lock"

    def __init__(self, out):
        path = os.path.join(out, self.NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(self.busy_message(out, self._read_pid(path))) from None
            # The holder we waited on may have removed the file as we opened it: then our lock is on
            # a file nobody else will see; take the lock again on the file that is there now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd, self.path = fd, path

    def release(self):
        if self.fd is not None:
            os.remove(self.path)  # before the unlock: a run that waited finds no file, or a new one
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def _read_pid(path):
        try:
            with open(path) as f:
                return f.read().strip() or "?"
        except OSError:
            return "?"

    @classmethod
    def holder(cls, out):
        """The PID (as text) of a live process holding the folder's lock, or None."""
        path = os.path.join(out, cls.NAME)
        if not os.path.exists(path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # a file a killed run left: nobody holds it
        except OSError:
            return cls._read_pid(path)
        finally:
            os.close(fd)

    @staticmethod
    def busy_message(out, pid):
        return (f"{out} is in use by another run (process {pid}); wait for it to finish or choose another --out")


def mark_done(out, stage):
    try:
        with open(os.path.join(out, f"DONE_{stage}"), "w") as f:
            f.write("finished\n")
    except OSError as e:
        raise UserError(f"cannot write {out}/DONE_{stage} ({e.strerror}); every output is written: free some disk "
                        "space and run again with --resume to mark the stage finished") from None


# ---------------------------------------------------------------------------------------------
# what stage 2 and sample.py need to find on this machine, kept out of every shared file

PATHS_FILE = "paths.json"
DEFAULT_MODEL_NAME = "default"  # the embedded toy model, in shared metadata


def model_name(path, default_path):
    """How shared metadata names the model: the toy model as `default`, a hub id as it is, a local
    file or folder by its last component only (the rest is the user's directory layout)."""
    if os.path.abspath(path) == os.path.abspath(default_path):
        return DEFAULT_MODEL_NAME
    if os.path.exists(path):
        return os.path.basename(os.path.normpath(path))
    return path


def save_paths(out, **paths):
    """paths.json: absolute local paths (images, model), so later stages run from any directory."""
    known = read_paths(out)
    known.update({k: os.path.abspath(v) for k, v in paths.items() if v is not None and os.path.exists(v)})
    tmp = os.path.join(out, f"{PATHS_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(known, f, indent=1)
    os.replace(tmp, os.path.join(out, PATHS_FILE))


def read_paths(out):
    try:
        with open(os.path.join(out, PATHS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def find_model(out, given, settings, default_path):
    """The model a later stage loads: --model, else the local path stage 1 used, else what the
    shared metadata names (the default model or a hub id)."""
    if given:
        return given
    local = read_paths(out).get("model")
    if local and os.path.exists(local):  # (a moved model falls through to the name)
        return local
    name = settings.get("model")
    if name in (None, DEFAULT_MODEL_NAME):
        return default_path
    if os.path.exists(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    raise UserError(f"{out} was trained on {name}, but this machine does not know where it is (no "
                    f"{PATHS_FILE} in the run folder): pass --model with its path")


def find_images(out, given):
    """The photos stage 2 trains on: --images, else the folder stage 1 read (from paths.json)."""
    if given:
        return given
    local = read_paths(out).get("images")
    if local:
        return local
    raise UserError(f"{out} does not say where its photos are on this machine (no {PATHS_FILE} in the run "
                    "folder): pass --images with the folder stage 1 learned from")


class Log:
    """One JSON object per line; a resumed run truncates entries past its checkpoint."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            keep = [line for line in open(path) if (record := _parse(line)) and record.get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif os.path.exists(path):
            os.remove(path)

    def write(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({e.strerror}); the last checkpoint is kept: free some "
                            "disk space and continue with --resume") from None


def _parse(line):
    """A log line, or None for a line a killed or full-disk write cut short (it is dropped)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and line.endswith("\n") else None


# ---------------------------------------------------------------------------------------------
# checkpoints: parameters, optimizer moments and the RNG state, so --resume is exact

def save_checkpoint(path, params, optimizer, generator, step, meta=None):
    tensors = {f"param.{name}": p.detach() for name, p in params.items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"opt.{index}.{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = generator.get_state()
    metadata = {"step": str(step), "param_groups": json.dumps(state["param_groups"]), **(meta or {})}
    save_safetensors(tensors, path, metadata)


def load_checkpoint(path, params, optimizer, generator):
    """Restore into the given objects; returns (step, metadata)."""
    tensors, metadata = read_safetensors(path)  # a broken file: one line naming it
    missing = [f"param.{name}" for name in params if f"param.{name}" not in tensors] + \
        [k for k in ("rng",) if k not in tensors] + [k for k in ("step", "param_groups") if k not in metadata]
    if missing:
        raise UserError(f"checkpoint {path} is not a checkpoint of this stage (no {', '.join(missing[:3])}); "
                        "remove it or start again with --overwrite")
    device = next(iter(params.values())).device
    with torch.no_grad():
        for name, p in params.items():
            if tensors[f"param.{name}"].shape != p.shape:
                raise UserError(f"checkpoint {path} is from a different setup ({name} has another shape)")
            p.copy_(tensors[f"param.{name}"])
    state = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, slot = key.split(".", 2)
            state["state"].setdefault(int(index), {})[slot] = value.to(device) if slot != "step" else value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng"])
    return int(metadata["step"]), metadata


# ---------------------------------------------------------------------------------------------
# the learned tokens

def residual_names(n_images, per_image):
    return [[f"<r{i}_{k}>" for k in range(per_image)] for i in range(n_images)]


RESIDUAL_NAME = re.compile(r"<r\d+_\d+>")


def check_token_name(name):
    """--token: one word that a prompt can hold and that names none of the residual tokens (whether
    the model's vocabulary already has it is the tokenizer's check, Tokenizer.add_tokens)."""
    if not name or any(c.isspace() for c in name):
        raise UserError(f"--token {name!r} must be one word without spaces, like <v> or <dog>")
    if RESIDUAL_NAME.fullmatch(name.lower()) or re.search(r"_\d+$", name):
        raise UserError(f"--token {name}: names like <r0_1> and endings like _1 are taken (residual tokens, a "
                        "token's further vectors); pick a name like <dog>")
    return name


def save_tokens(out, target, residual, metadata):
    """tokens.safetensors (everything), plus the target token alone in the two forms other tools
    load: diffusers' load_textual_inversion ({"<v>": [n,width]}, under the token's name,
    metadata["target_token"]) and A1111/ComfyUI ({"emb_params": ...})."""
    target = target.detach().float().cpu()
    token = token_name(metadata)
    save_safetensors({"target": target, "residual": residual.detach().float().cpu()},
                     os.path.join(out, TOKENS_FILE), {k: json.dumps(v) for k, v in metadata.items()})
    save_safetensors({token: target}, os.path.join(out, "v.diffusers.safetensors"))
    save_safetensors({"emb_params": target}, os.path.join(out, "v.a1111.safetensors"),
                     {"name": token.strip("<>") or token, "step": str(metadata.get("steps", ""))})


def load_tokens(out):
    """(target [n,width], residual [N,8,width], metadata) from a stage-1 run folder; the token's name
    is token_name(metadata)."""
    path = os.path.join(out, TOKENS_FILE)
    if not os.path.exists(path):
        raise UserError(f"{out} has no {TOKENS_FILE}: run stage1_tokens.py with --out {out} first")
    tensors, metadata = read_safetensors(path)
    try:
        meta = {k: json.loads(v) for k, v in metadata.items()}
        return tensors["target"], tensors["residual"], meta
    except (KeyError, ValueError):
        raise UserError(f"{path} is not a tokens file stage 1 wrote (no target/residual tensors or unreadable "
                        "metadata); run stage1_tokens.py again") from None


def describe_model(path, default_path):
    """The model as the first lines of a script name it."""
    if os.path.abspath(str(path)) == os.path.abspath(default_path):
        return f"the embedded toy model ({os.path.relpath(default_path)})"
    return str(path)


def token_name(meta):
    """The learned token's name a tokens file's metadata gives (stage 1's --token; runs made before
    the flag: <v>)."""
    return meta.get("target_token") or TARGET_TOKEN


def check_token_width(target, sd, out):
    """The tokens of `out` must be as wide as the model's words (768 for SD 1.x, 1024 for SD 2.x)."""
    width = sd.text_encoder.config.width
    if target.shape[-1] != width:
        raise UserError(f"{out} holds {target.shape[-1]}-wide token vectors, but this model's words are {width} "
                        "wide: it was learned on another model (pass that one with --model)")


def with_target_token(prompt, token=TARGET_TOKEN):
    """Accept `*` and `{V}` (and <v>, for a token with another name) as spellings of the token."""
    for placeholder in PLACEHOLDERS + ((TARGET_TOKEN,) if token != TARGET_TOKEN else ()):
        prompt = prompt.replace(placeholder, token)
    return prompt


def set_prediction_type(sd, given, model_path):
    """What the UNet predicts: `given` (--prediction_type, or what stage 1 stored), else what the model
    says; a model that does not say (an SD 2.x single file without global_step) needs the flag.
    Returns it; also fills in sd.resolution where that waited for the answer."""
    if given:
        if sd.prediction_type not in (None, given):
            warn(f"{model_path} says it predicts {sd.prediction_type}; using {given} as asked")
        sd.set_prediction_type(given)
    elif sd.prediction_type is None:
        raise UserError(f"{model_path} does not say what its UNet predicts: pass --prediction_type v_prediction "
                        "for a 768-v model (SD 2.x at 768 px) or --prediction_type epsilon for a 512 base model")
    return sd.prediction_type


# -------------------------------------------------------------------------------------------------
# several processes (torchrun)

def start_distributed():
    """(rank, world size, device) for a script that shares out independent jobs (dreambench.py,
    toy/toybench.py). Under torchrun each rank takes the GPU of its LOCAL_RANK (device "cuda:<k>"; on
    a CPU-only machine None, and gloo); without torchrun, (0, 1, None): one process does everything."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    local_rank = int(os.environ["LOCAL_RANK"])
    device = None
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                            "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)  # the stage scripts' "cuda" is then this rank's GPU
        device = f"cuda:{local_rank}"
    # One rank may wait hours at the gather for the others' jobs: the 30-minute default would end a
    # healthy run.
    dist.init_process_group("nccl" if device else "gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), world, device
