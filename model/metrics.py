"""DreamBench's three scores as the personalisation papers compute them, not as the hub's image
processors happen to.

    scorer = Scorer("openai/clip-vit-base-patch32", "facebook/dino-vits16", "cuda")
    dino = mean_cosine(scorer.dino(generated), scorer.dino(real))             # DINO
    clip_i = mean_cosine(scorer.clip_image(generated), scorer.clip_image(real))  # CLIP-I
    clip_t = mean_cosine(scorer.clip_image(generated), scorer.clip_text([text]))  # CLIP-T
    oracle = mean_cosine(scorer.dino(real), scorer.dino(real), exclude_self=True)

DINO: ViT-S/16 trained with DINO; the image resized so its short side is 256 (bicubic), centre
crop 224, ImageNet mean/std (the torchvision transform of DreamBooth-era evaluation code), and the
CLS token of the last hidden state (after the final LayerNorm, as DINO's own forward returns it).
Not the pooler: a DINO checkpoint never trained one, so transformers initialises it at random. The
hub's preprocessor for facebook/dino-vits16 squashes the whole image to 224x224 instead.

CLIP-I and CLIP-T: CLIP's own preprocessing (OpenAI's `clip.load` transform: short side to the
model's input size, bicubic, centre crop, CLIP's mean/std) and its projected embeddings.

The crop follows torchvision, top = round((H - 224) / 2) with Python's round; transformers' image
processors floor instead, one pixel apart when the margin is odd. Every embedding is L2-normalised,
so a dot product is a cosine; means are taken in float64.
"""
import numpy as np
import torch
from PIL import Image

from model.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINO_RESIZE = 256  # short side before the 224 crop, as the DINO evaluation transform
DEFAULT_CLIP, DEFAULT_DINO = "openai/clip-vit-base-patch32", "facebook/dino-vits16"


# -------------------------------------------------------------------------------------------------
# preprocessing

def preprocess(image, resize, crop, mean, std):
    """RGB PIL image -> float32 [3, crop, crop]: short side to `resize` (bicubic, aspect kept),
    centre crop, scale to [0, 1], normalise."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(resize * long / short)  # truncated, as torchvision's Resize(int)
    size = (resize, new_long) if w <= h else (new_long, resize)
    image = image.resize(size, Image.Resampling.BICUBIC)
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    pixels = np.asarray(image, dtype=np.float32)[top:top + crop, left:left + crop] / 255.0
    pixels = (pixels - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def preprocess_dino(image, crop=224):
    return preprocess(image, DINO_RESIZE * crop // 224, crop, IMAGENET_MEAN, IMAGENET_STD)


def preprocess_clip(image, crop=224):
    return preprocess(image, crop, crop, CLIP_MEAN, CLIP_STD)


# -------------------------------------------------------------------------------------------------
# similarities

def mean_cosine(a, b, exclude_self=False):
    """Mean cosine over every pair (a_i, b_j) of L2-normalised rows. exclude_self: `a` and `b` are
    the same set and the pairs (i, i) are left out (the real-image oracle)."""
    sims = a.double() @ b.double().T
    if not exclude_self:
        return sims.mean().item()
    n = len(a)
    if n < 2:
        raise UserError("the real-vs-real score needs at least two images of the subject")
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


# -------------------------------------------------------------------------------------------------
# the two models

def _download_hint(name, default):
    """How to get a model: its hub id when `name` looks like one, else the default's."""
    hub_id = name if name.count("/") == 1 and not name.startswith((".", "/", "~")) else default
    return (f"get it with `hf download {hub_id}` (`huggingface-cli download {hub_id}` on older huggingface_hub), "
            f"or pass a folder that holds it")


def _load(cls, name, model_type, flag, default, **kwargs):
    """A transformers model from a folder or the Hugging Face cache, never from the network; a
    missing, wrong-kind or incomplete model is a UserError naming the flag."""
    from transformers import AutoConfig  # imported here: the training scripts never need it
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name}: no model there or in the Hugging Face cache ({str(e).splitlines()[0]}); "
                        f"{_download_hint(name, default)}") from None
    if config.model_type != model_type:
        raise UserError(f"{flag} {name} is a '{config.model_type}' model, not '{model_type}' ({default} is one)")
    try:
        model, info = cls.from_pretrained(name, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name}: its weights cannot be read ({str(e).splitlines()[0]}); "
                        f"{_download_hint(name, default)}") from None
    # transformers fills missing weights with random ones and only logs it: a score from those
    # would look like a number and mean nothing.
    if info["missing_keys"]:
        raise UserError(f"{flag} {name} lacks {len(info['missing_keys'])} weights (e.g. {info['missing_keys'][0]}); "
                        f"{_download_hint(name, default)}")
    return model.eval()


class Scorer:
    """CLIP and DINO loaded once; images are RGB PIL images, texts plain strings; every method
    returns L2-normalised float32 embeddings [N, D] on the CPU."""

    def __init__(self, clip=DEFAULT_CLIP, dino=DEFAULT_DINO, device="cpu", batch=32):
        from transformers import AutoTokenizer, CLIPModel, ViTModel
        self.device, self.batch = device, batch
        self.clip = _load(CLIPModel, clip, "clip", "--clip", DEFAULT_CLIP).to(device)
        self.dino_model = _load(ViTModel, dino, "vit", "--dino", DEFAULT_DINO, add_pooling_layer=False).to(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(clip, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"--clip {clip}: its tokenizer files cannot be read ({str(e).splitlines()[0]}); "
                            f"{_download_hint(clip, DEFAULT_CLIP)}") from None
        self.clip_size = self.clip.config.vision_config.image_size
        self.dino_size = self.dino_model.config.image_size

    @torch.no_grad()
    def _images(self, images, preprocess_one, forward):
        out = []
        for start in range(0, len(images), self.batch):
            pixels = torch.stack([preprocess_one(im) for im in images[start:start + self.batch]]).to(self.device)
            out.append(torch.nn.functional.normalize(forward(pixels).float(), dim=-1).cpu())
        return torch.cat(out)

    def dino(self, images):
        return self._images(images, lambda im: preprocess_dino(im, self.dino_size),
                            lambda x: self.dino_model(pixel_values=x).last_hidden_state[:, 0])

    def clip_image(self, images):
        return self._images(images, lambda im: preprocess_clip(im, self.clip_size),
                            lambda x: self.clip.visual_projection(self.clip.vision_model(pixel_values=x).pooler_output))

    @torch.no_grad()
    def clip_text(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.clip.config.text_config.max_position_embeddings, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        pooled = self.clip.text_model(**tokens).pooler_output
        return torch.nn.functional.normalize(self.clip.text_projection(pooled).float(), dim=-1).cpu()
