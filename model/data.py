"""Reading the reference photos and their captions, refusing bad input with one clear sentence.

    refs = load_images("photos/", 512, captions_file=None)
    refs.images    # [N,3,512,512] float32 in [-1,1], in sorted file-name order
    refs.names     # ["01.jpg", "02.jpg", ...]: this order defines residual group i everywhere
    refs.captions  # ["a dog on grass", ...] or None when the folder has no captions
    refs.warnings  # things the script should print (e.g. upscaled images)

Images are files with an image extension; anything else (captions, .DS_Store, notes) is ignored,
as are hidden files (macOS leaves "._01.jpg" resource forks that are not images). Every image is
fully decoded, turned upright by its EXIF orientation, converted to RGB (alpha composited over
white, 16-bit scaled to 8-bit), then its centered square is resized to the resolution.

Captions follow the kohya convention (01.txt beside 01.jpg) or come from a JSON file mapping
file names to captions. Either every image has one or none does.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from model.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What the scripts condition on when the user gave no captions.
NEUTRAL_CAPTION = "a photo"
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass
class ReferenceSet:
    images: torch.Tensor  # [N,3,res,res] float32 in [-1,1]
    names: list  # file names, sorted
    captions: list | None  # one str per image, or None when there are no captions
    warnings: list = field(default_factory=list)


def load_images(folder, resolution, captions_file=None):
    """Read every image in `folder` (sorted by name) at `resolution` px, with captions if any."""
    image_paths, captions, warnings = list_images(folder, captions_file)
    pixels = []
    for path in image_paths:
        img = read_rgb(path)
        if min(img.size) < resolution:
            warnings.append(f"{path.name} is {img.size[0]}x{img.size[1]}, smaller than {resolution} px: it is "
                            f"upscaled, so expect softer detail (use a larger photo if you have one)")
        pixels.append(center_square(img, resolution))
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ReferenceSet(images, [p.name for p in image_paths], captions, warnings)


def list_images(folder, captions_file=None):
    """(image paths sorted by name, captions or None, warnings): everything about the folder that can
    be checked without decoding a picture, so a wrong path fails before a model is loaded."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"image folder {folder} does not exist; pass --images with the folder of your photos")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; pass --images with the folder that holds your photos")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot list image folder {folder} ({e.strerror}); check its permissions") from None
    image_paths = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not image_paths:
        others = f" (it holds {len(files)} other files, e.g. {files[0].name})" if files else ""
        raise UserError(f"no images in {folder}{others}; add photos with extensions {' '.join(IMAGE_EXTENSIONS)}")
    names = [p.name for p in image_paths]

    # Captions are cheap to check, and a mistake there should not wait for N decodes.
    warnings = []
    if captions_file is not None:
        captions = captions_from_json(Path(captions_file), names)
        if any(sidecar_path(files, p) for p in image_paths):
            warnings.append(f"captions come from {captions_file}; the .txt files in {folder} are ignored")
    else:
        captions = sidecar_captions(files, image_paths)
        missing = [n for n, c in zip(names, captions) if c is None]
        if len(missing) == len(names):
            captions = None
        elif missing:
            raise UserError(f"{len(missing)} of {len(names)} images in {folder} have no caption file beside them "
                            f"({first_few(missing)}); add a .txt with the same name for each, or remove all .txt files")
    return image_paths, captions, warnings


def read_rgb(path):
    """Decode one file completely and return it upright as 8-bit RGB."""
    # A truncated file must fail here, not become a half-grey training image; another library in
    # the process may have flipped this global, so pin it for the duration of the decode.
    allow_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()  # open() only reads the header; this decodes every pixel
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    # Pillow's decoders raise many unrelated types on corrupt data (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, DecompressionBombError...): all mean "this file is bad".
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); re-save it as PNG or JPEG, "
                        f"or remove it from the folder") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated


def to_rgb(img):
    if img.mode in SIXTEEN_BIT_MODES:
        # Grey at up to 16 bits (PNG): scale 0..65535 to 0..255; convert("L") would clip instead.
        values = np.asarray(img).astype(np.float64)
        grey = np.clip(np.round(values / 257), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ALPHA_MODES or img.mode == "P" or "transparency" in img.info:
        # Transparent pixels carry arbitrary colour underneath; white is what viewers show.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr: Pillow's conversions are exact enough


def center_square(img, resolution):
    """The largest centered square, resized to resolution x resolution. -> uint8 [res,res,3]"""
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    # Equivalent to "resize the shorter side, then center crop", in one resampling step;
    # Lanczos filters over the whole footprint, so downscaling is antialiased.
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box))


def sidecar_path(files, image_path):
    """The kohya convention: 01.txt (any case of .txt) beside 01.jpg, or None."""
    return next((p for p in files if p.stem == image_path.stem and p.suffix.lower() == ".txt"), None)


def sidecar_captions(files, image_paths):
    """One caption or None per image."""
    paths = [sidecar_path(files, p) for p in image_paths]
    return [None if p is None else read_text(p) for p in paths]


def read_text(path):
    try:
        # utf-8-sig: Windows editors often start UTF-8 files with a byte-order mark.
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read caption file {path} ({e.strerror}); check its permissions") from None


def captions_from_json(path, names):
    """A JSON object {"01.jpg": "a dog on grass", ...} with exactly one caption per image."""
    if not path.is_file():
        raise UserError(f"captions file {path} does not exist; pass --captions with a JSON file of "
                        f"{{\"file name\": \"caption\"}}")
    try:
        mapping = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"captions file {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        f"fix it or pass a different --captions file") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UserError(f"captions file {path} must be a JSON object mapping file names to caption strings, "
                        f"like {{\"{names[0]}\": \"a dog on grass\"}}")
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise UserError(f"captions file {path} names files that are not images in the folder "
                        f"({first_few(unknown)}); keys must be image file names like {names[0]}")
    missing = [n for n in names if n not in mapping]
    if missing:
        raise UserError(f"captions file {path} has no caption for {len(missing)} of {len(names)} images "
                        f"({first_few(missing)}); add one for each")
    return [mapping[n].strip() for n in names]


def first_few(names, limit=5):
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
