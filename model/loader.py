"""Load Stable Diffusion from the original single file, a diffusers folder, or a hub id.

The modules are built on the meta device (no memory, no init) and the weights are attached with
`load_state_dict(assign=True)`, so the only copy of each weight is the one read from disk.
Tensors are read one at a time with plain file reads into their final dtype: no mmap of the
whole file stays resident, and peak memory is the weights plus one tensor in flight.

Layouts:
  - original single file: keys under `model.diffusion_model.`, `first_stage_model.` and
    `cond_stage_model.transformer.text_model.`; our module paths are those keys, so it is a copy.
    Files we write ourselves carry each component's config as JSON in the safetensors metadata.
  - diffusers folder: `unet/`, `vae/`, `text_encoder/` (+ `tokenizer/`), renamed key by key with
    each component's `diffusers_name`.
"""
import json
import os
import re
import struct
import dataclasses
from dataclasses import asdict

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from model import clip, unet, vae
from model.errors import UserError
from model.schedule import PREDICTION_TYPES
from model.schedule import alphas_cumprod as make_alphas_cumprod
from model.tokenizer import Tokenizer

# name -> (module, class, original prefix, diffusers subfolder)
COMPONENTS = {
    "unet": (unet, unet.UNet, "model.diffusion_model.", "unet"),
    "vae": (vae, vae.VAE, "first_stage_model.", "vae"),
    "text_encoder": (clip, clip.build, "cond_stage_model.transformer.text_model.", "text_encoder"),
}
# SD 2.x's text encoder (OpenCLIP's tower) lives under its own prefix in the original file.
OPENCLIP_PREFIX = "cond_stage_model.model."
# diffusers' single-file loader reads an SD 2 file as epsilon prediction only when its `global_step`
# is SD 2 base's (875,000), else as v prediction; without that key nothing in the file says which.
SD2_BASE_GLOBAL_STEP = 875000
# The DDPM schedule buffers of the original file: the schedule is rebuilt from its formula.
SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}  # the format's dtype codes


# What validation grids and sample.py draw when the user names no prompt. A model file we wrote may
# carry its own (the toy model's world has no beaches), with the guidance scale it samples best at.
SD_PROMPTS = ("a photo of <v>", "a photo of <v> on the beach", "a photo of <v> in the snow",
              "an oil painting of <v>")


class StableDiffusion:
    """The loaded model: .unet, .vae, .text_encoder, .tokenizer, .alphas_cumprod (float32 [1000]),
    and the model's own defaults: .resolution, .prompts (with <v>), .guidance, and
    .prediction_type: what the UNet predicts, "epsilon" or "v_prediction" (SD 2's 768-v), or None
    when the checkpoint does not say (an SD 2 single file): then the caller must ask the user and
    call set_prediction_type, which also fills in .resolution (None until then)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod, resolution=512, prompts=SD_PROMPTS,
                 guidance=7.5, prediction_type="epsilon"):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.alphas_cumprod = tokenizer, alphas_cumprod
        self.resolution = resolution  # the image size the model was trained at
        self.prompts, self.guidance = list(prompts), guidance
        self.prediction_type = prediction_type

    def set_prediction_type(self, prediction_type):
        """Say what the UNet predicts (a user's --prediction_type for a file that does not say);
        an unknown resolution becomes that of SD 2's models of that kind: 768 for v, 512 for epsilon."""
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        if self.resolution is None:
            self.resolution = _sd2_resolution(prediction_type)


def _sd2_resolution(prediction_type):
    """SD 2.x's image size by kind: the 768-v models and the 512 base models; unknown when the kind is."""
    return {"v_prediction": 768, "epsilon": 512}.get(prediction_type)


# ---------------------------------------------------------------------------------------------
# safetensors, read one tensor at a time

class SafetensorsFile:
    """Header of a .safetensors file and a reader for single tensors (format: u64 header length,
    JSON header, raw little-endian data). Every way a file can be broken becomes a UserError.

    Why not safetensors' own `safe_open`: it maps the whole file and hands out tensors in their
    stored dtype, so loading a 4 GB fp32 checkpoint as bf16 would hold the mapping's pages and a
    converted copy at once. Here each tensor is read with a plain file read into a buffer of its
    own and converted to its final dtype and device before the next one is read: peak memory is
    the loaded weights plus one tensor in flight (tests/test_loader.py measures it)."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise UserError(f"{path} is not a safetensors file (bad header); re-download or re-export it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{path} is not a safetensors file (header is not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise UserError(f"{path} is truncated ({size} bytes, the header needs {self.data_start + end}); "
                            "the download or copy did not finish")

    def keys(self):
        return self.entries.keys()

    def shape(self, key):
        return torch.Size(self.entries[key]["shape"])

    def read(self, key, f, dtype=None, device="cpu"):
        e = self.entries[key]
        begin, end = e["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        f.seek(self.data_start + begin)
        f.readinto(raw.numpy())
        t = raw.view(SAFETENSORS_DTYPES[e["dtype"]]).reshape(e["shape"])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


def read_safetensors(path):
    """(every tensor on the CPU in its stored dtype, the metadata dict) of a .safetensors file.
    Any way the file can fail (missing, unreadable, not safetensors, truncated, a bad entry) is a
    UserError naming it."""
    path = str(path)
    try:
        st = SafetensorsFile(path)
        with open(path, "rb") as f:
            tensors = {key: st.read(key, f) for key in st.keys()}
    except UserError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, struct.error) as e:
        raise UserError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    return tensors, dict(st.metadata)


def save_safetensors(tensors, path, metadata=None):
    """Write atomically: a killed process leaves the old file or none, never half a file. A write
    that fails (a full disk, a file-size limit) removes its temporary file, keeps the previous
    `path` as it was and raises a UserError naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        # safetensors creates its file private (0600); outputs are meant for other tools and users,
        # so they get the mode any new file gets here (0644 under the usual umask), as PNGs do.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too: no temporary file outlives a failed write
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, SafetensorError)):  # safetensors wraps I/O failures in its own
            raise
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
        raise UserError(f"cannot write {path} ({_reason(e)}); {kept}. Free some disk space and run again "
                        "(training runs continue with --resume)") from None


def _reason(error):
    """The OS's words for a failed write ("No space left on device"), wherever they are wrapped."""
    text = getattr(error, "strerror", None) or str(error)
    found = re.search(r"I/O error: (.*?) \(os error \d+\)", text)
    return found.group(1) if found else text


def current_umask():
    """The process's umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable read is a set and a set back
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# building and filling the modules

def _build(name, cfg, tensors):
    """Module on the meta device, then the loaded tensors attached as its parameters."""
    module_lib, cls, _, _ = COMPONENTS[name]
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise UserError(f"{name} weights do not match a Stable Diffusion {name}: {'; '.join(parts)} keys")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise UserError(f"{name} weight {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(tensors, assign=True)
    return model.eval().requires_grad_(False)


def _fit(t, shape):
    """Linear <-> 1x1 conv weights differ only by trailing unit dims."""
    return t.reshape(shape) if t.shape != shape and t.numel() == shape.numel() else t


def _load_single_file(path, device, dtype):
    st = SafetensorsFile(path)
    by_component = {name: {} for name in COMPONENTS}
    unknown, openclip = [], {}
    for key in st.keys():
        if key in SCHEDULE_KEYS or key == "global_step" or key.startswith("model_ema.") or key.endswith("position_ids"):
            continue
        if key.startswith(OPENCLIP_PREFIX):  # SD 2.x's text encoder
            openclip[key[len(OPENCLIP_PREFIX):]] = key
            continue
        for name, (_, _, prefix, _) in COMPONENTS.items():
            if key.startswith(prefix):
                by_component[name][key[len(prefix):]] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{path}: {len(unknown)} keys are not Stable Diffusion 1.x or 2.x weights: "
                        f"{', '.join(unknown[:3])}")
    if openclip:
        if by_component["text_encoder"]:
            raise UserError(f"{path} holds two text encoders (SD 1.x's and SD 2.x's): it is no one model")
        by_component["text_encoder"] = openclip
    models = {"resolution": int(st.metadata.get("resolution", 512)),
              "prompts": json.loads(st.metadata.get("prompts", "null")) or SD_PROMPTS,
              "guidance": float(st.metadata.get("guidance", 7.5))}
    with open(path, "rb") as f:
        for name, keys in by_component.items():
            if not keys:
                raise UserError(f"{path} has no {name} weights (no keys under '{COMPONENTS[name][2]}')")
            module_lib = COMPONENTS[name][0]
            # Shapes that fit no layout fail while the config is inferred or the modules are built
            # (GroupNorm of 61 channels, a head count that does not divide): one line naming the file.
            try:
                if f"{name}_config" in st.metadata:
                    fields = json.loads(st.metadata[f"{name}_config"])
                    cfg = type(module_lib.TINY)(**{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in fields.items()})
                elif keys is openclip:
                    cfg = clip.openclip_config_from_state_dict({k: _Shape(st.shape(full)) for k, full in keys.items()})
                else:
                    cfg = module_lib.config_from_state_dict({k: _Shape(st.shape(full)) for k, full in keys.items()})
                    if name == "unet" and openclip:  # SD 2's original code computes attention in fp32
                        cfg = dataclasses.replace(cfg, upcast_attention=True)
                if keys is openclip:  # SD 2 reads 23 of the tower's 24 blocks and not its projection
                    keys = {k: full for k, full in keys.items() if not clip.openclip_unused(k, cfg)}
                tensors = {k: st.read(full, f, dtype, device) for k, full in keys.items()}
                models[name] = _build(name, cfg, tensors)
            except UserError as e:
                raise UserError(f"{path}: {e}") from None
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError, ZeroDivisionError) as e:
                raise UserError(f"{path}: the {name} weights fit no Stable Diffusion layout "
                                f"({type(e).__name__}: {e})") from None
    _check_components_fit(path, models)
    sd2 = models["text_encoder"].config.layout == "openclip"
    models["prediction_type"] = _single_file_prediction_type(st, path, sd2)
    if "resolution" not in st.metadata and sd2:
        models["resolution"] = _sd2_resolution(models["prediction_type"])
    return models


def _single_file_prediction_type(st, path, sd2):
    """What the UNet of a single file predicts, as far as the file says. Files we write say it in
    their metadata. SD 1.x (OpenAI's CLIP text tower) predicts noise. An SD 2.x file (OpenCLIP's
    tower) says it only through a `global_step` entry (what diffusers' single-file loader reads:
    SD 2 base's 875,000 steps mean epsilon, any other v); without one it is None, unknown, and the
    user must say."""
    if st.metadata.get("prediction_type"):
        return st.metadata["prediction_type"]
    if not sd2:
        return "epsilon"
    if "global_step" not in st.keys():
        return None
    with open(path, "rb") as f:
        step = int(st.read("global_step", f).reshape(-1)[0])
    return "epsilon" if step == SD2_BASE_GLOBAL_STEP else "v_prediction"


def _check_components_fit(path, models):
    """Each component may be valid alone and still not fit the others (an SD 2.x UNet reading
    1024-wide text beside a 768-wide encoder): that would fail inside the first UNet call."""
    unet_cfg, vae_cfg = models["unet"].config, models["vae"].config
    width = models["text_encoder"].config.width
    if unet_cfg.context_dim != width:
        raise UserError(f"{path}: the UNet reads {unet_cfg.context_dim}-wide text but the text encoder writes "
                        f"{width}-wide: these weights do not belong together")
    if not unet_cfg.in_channels == unet_cfg.out_channels == vae_cfg.z_channels:
        raise UserError(f"{path}: the UNet takes {unet_cfg.in_channels} latent channels and predicts "
                        f"{unet_cfg.out_channels}, the VAE has {vae_cfg.z_channels}: these weights do not "
                        "belong together")


class _Shape:
    """Stands in for a tensor where only .shape is needed (config inference from a header)."""

    def __init__(self, shape):
        self.shape = shape


def _component_files(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UserError(_pickle_message(os.path.join(folder, pickles[0])))
        raise UserError(f"{folder} holds no .safetensors weights")
    # Prefer full-precision files over variants (model.fp16.safetensors) when both are there.
    plain = [f for f in files if not re.search(r"\.(fp16|bf16|fp32|non_ema)\.safetensors$", f)]
    return [os.path.join(folder, f) for f in (plain or files)]


def _load_diffusers_folder(path, device, dtype):
    models = {}
    for name, (module_lib, _, _, sub) in COMPONENTS.items():
        folder = os.path.join(path, sub)
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{path} is a diffusers folder without {sub}/config.json")
        with open(config_path) as f:
            config = json.load(f)
        cfg = module_lib.config_from_diffusers(config)
        if name == "vae":  # the VAE's sample_size is in pixels (SD1.5: 512)
            models["resolution"] = config.get("sample_size", 512)
        tensors = {}
        for file in _component_files(folder):
            st = SafetensorsFile(file)
            with open(file, "rb") as f:
                for key in st.keys():
                    if key.endswith("position_ids"):
                        continue
                    try:  # the text encoder is renamed (and SD 2's fused) as a whole, below
                        ours = key if name == "text_encoder" else module_lib.diffusers_name(key, cfg)
                    except KeyError:
                        ours = key  # reported below as unexpected
                    tensors[ours] = st.read(key, f, dtype, device)
        if name == "text_encoder":
            tensors = clip.from_transformers(tensors, cfg)
        with torch.device("meta"):
            shapes = COMPONENTS[name][1](cfg).state_dict()
        tensors = {k: _fit(v, shapes[k].shape) if k in shapes else v for k, v in tensors.items()}
        models[name] = _build(name, cfg, tensors)
    models["prediction_type"] = _folder_prediction_type(path, models["text_encoder"].config.layout == "openclip")
    return models


def _folder_prediction_type(path, sd2):
    """scheduler/scheduler_config.json says what the UNet predicts (no prediction_type there:
    diffusers' default, epsilon). Without the file, SD 1.x is epsilon and SD 2.x unknown (None)."""
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                prediction_type = json.load(f).get("prediction_type") or "epsilon"
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{config_path} cannot be read as JSON") from None
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"{config_path}: prediction_type {prediction_type!r} is not supported "
                            f"({', '.join(PREDICTION_TYPES)} are)")
        return prediction_type
    return None if sd2 else "epsilon"


# ---------------------------------------------------------------------------------------------
# the entry point

def _pickle_message(path):
    return (f"{path} is a pickle file: loading one runs whatever code it contains, so it is refused. "
            "Convert it once in a trusted environment to .safetensors (e.g. torch.load, then "
            "safetensors.torch.save_file(state_dict)) or use the model's .safetensors release")


def _resolve(path):
    """A local file or folder, or a hub id resolved through huggingface_hub's cache."""
    if os.path.exists(path):
        return path
    looks_like_file = path.endswith((".safetensors", ".json") + PICKLE_SUFFIXES)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith(".") and not looks_like_file:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise UserError(f"{path} is not a local path, and huggingface_hub (needed for hub ids) is not "
                            "installed: pip install huggingface_hub") from None
        patterns = ["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]
        try:
            return snapshot_download(path, allow_patterns=patterns, local_files_only=True)
        except Exception:
            pass
        try:
            return snapshot_download(path, allow_patterns=patterns)
        except Exception as e:
            raise UserError(f"model {path}: no such file or folder, and not a hub id in the local cache or "
                            f"downloadable ({type(e).__name__})") from None
    raise UserError(f"model path {path} does not exist")


def load(path, device="cpu", dtype=torch.float32):
    """Stable Diffusion from a single .safetensors file, a diffusers folder, or a hub id."""
    path = _resolve(str(path))
    if path.endswith(PICKLE_SUFFIXES) and os.path.isfile(path):
        raise UserError(_pickle_message(path))
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UserError(f"{path}: expected a .safetensors file or a diffusers folder")
        models = _load_single_file(path, device, dtype)
        tokenizer = Tokenizer.from_clip_bpe(pad=_default_pad(models))
    elif os.path.isdir(os.path.join(path, "unet")):
        models = _load_diffusers_folder(path, device, dtype)
        tok_dir = os.path.join(path, "tokenizer")
        has_files = os.path.isfile(os.path.join(tok_dir, "vocab.json"))
        tokenizer = Tokenizer.from_folder(tok_dir) if has_files else Tokenizer.from_clip_bpe(pad=_default_pad(models))
    else:
        raise UserError(f"{path} is neither a .safetensors file nor a diffusers folder (no unet/ inside)")
    return StableDiffusion(models["unet"], models["vae"], models["text_encoder"], tokenizer,
                           make_alphas_cumprod(), models["resolution"], models.get("prompts", SD_PROMPTS),
                           models.get("guidance", 7.5), models["prediction_type"])


def _default_pad(models):
    """The padding token of the model's own tokenizer: SD 2's (OpenCLIP's) pads with "!", SD 1's with
    the end token. It decides what the UNet reads past the prompt, so it must be the model's."""
    return "!" if models["text_encoder"].config.layout == "openclip" else "<|endoftext|>"


def save(sd, path, dtype=None, resolution=None):
    """Write a model as one original-layout .safetensors file with its configs and its sampling
    defaults (resolution, example prompts, guidance) as metadata."""
    tensors = {}
    metadata = {"resolution": str(resolution or sd.resolution), "prompts": json.dumps(sd.prompts),
                "guidance": str(sd.guidance)}
    if sd.prediction_type is not None:
        metadata["prediction_type"] = sd.prediction_type
    for name, (_, _, prefix, _) in COMPONENTS.items():
        module = getattr(sd, name)
        if name == "text_encoder" and module.config.layout == "openclip":
            prefix = OPENCLIP_PREFIX
        metadata[f"{name}_config"] = json.dumps(asdict(module.config))
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.to(dtype) if dtype is not None else v
    save_safetensors(tensors, path, metadata)
