"""What the three scripts share about a run folder: one-line errors, atomic files, the JSONL log,
checkpoints that resume exactly, and the learned-token file.

A run folder (`--out`) holds one run: stage 1 writes tokens.safetensors, stage 2 lora.*.safetensors,
sample.py reads both. A file named DONE_<stage> marks a finished stage; it is never overwritten
silently.
"""
import json
import os
import sys

import torch
from safetensors import safe_open

from model.errors import UserError
from model.loader import save_safetensors

TOKENS_FILE = "tokens.safetensors"
TARGET_TOKEN = "<v>"
PLACEHOLDERS = ("{V}", "*")  # other spellings of <v> accepted in prompts


def report_user_errors():
    """Uncaught UserError -> its message as one line on stderr and exit 1, no traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.stderr)
            sys.exit(1)
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted; finished checkpoints are kept (continue with --resume)", file=sys.stderr)
            sys.exit(130)
        previous(kind, value, tb)

    sys.excepthook = hook


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


def prepare_out(out, stage, resume, overwrite):
    """Make sure `out` may receive this stage: never silently over a finished one."""
    done = os.path.join(out, f"DONE_{stage}")
    checkpoint = os.path.join(out, f"{stage}_checkpoint.safetensors")
    if os.path.exists(done) and not overwrite:
        raise UserError(f"{out} already holds a finished {stage} run; choose another --out or pass --overwrite")
    if os.path.exists(checkpoint) and not (resume or overwrite):
        raise UserError(f"{out} holds an unfinished {stage} run; pass --resume to continue it or --overwrite "
                        "to start again")
    if resume and not os.path.exists(checkpoint):
        raise UserError(f"--resume: no {stage} checkpoint in {out}")
    os.makedirs(out, exist_ok=True)
    if overwrite and not resume:
        for name in (done, checkpoint, os.path.join(out, f"{stage}_log.jsonl")):
            if os.path.exists(name):
                os.remove(name)
    return checkpoint


def mark_done(out, stage):
    with open(os.path.join(out, f"DONE_{stage}"), "w") as f:
        f.write("finished\n")


class Log:
    """One JSON object per line; a resumed run truncates entries past its checkpoint."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif os.path.exists(path):
            os.remove(path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


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
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); remove it or start with --overwrite") from None
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


def save_tokens(out, target, residual, metadata):
    """tokens.safetensors (everything), plus the target token alone in the two forms other tools
    load: diffusers' load_textual_inversion ({"<v>": [n,768]}) and A1111/ComfyUI ({"emb_params": ...})."""
    target = target.detach().float().cpu()
    save_safetensors({"target": target, "residual": residual.detach().float().cpu()},
                     os.path.join(out, TOKENS_FILE), {k: json.dumps(v) for k, v in metadata.items()})
    save_safetensors({TARGET_TOKEN: target}, os.path.join(out, "v.diffusers.safetensors"))
    save_safetensors({"emb_params": target}, os.path.join(out, "v.a1111.safetensors"),
                     {"name": "v", "step": str(metadata.get("steps", ""))})


def load_tokens(out):
    """(target [n,768], residual [N,8,768], metadata) from a stage-1 run folder."""
    path = os.path.join(out, TOKENS_FILE)
    if not os.path.exists(path):
        raise UserError(f"{out} has no {TOKENS_FILE}: run stage1_tokens.py with --out {out} first")
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return f.get_tensor("target"), f.get_tensor("residual"), meta


def with_target_token(prompt):
    """Accept `*` and `{V}` as spellings of <v>."""
    for placeholder in PLACEHOLDERS:
        prompt = prompt.replace(placeholder, TARGET_TOKEN)
    return prompt
