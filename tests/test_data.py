"""model.data: every bad-input case that concerns the reference photos and captions."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from model.data import list_images, load_images, to_rgb
from model.errors import UserError

RES = 32


def smooth_rgb(w, h, seed):
    """Random but smooth content (JPEG keeps it nearly intact); never blank. -> uint8 [h,w,3]"""
    coarse = np.random.default_rng(seed).integers(30, 226, size=(4, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


def save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def as_uint8(images):
    """[N,3,H,W] in [-1,1] -> uint8 [N,H,W,3], undoing the loader's scaling."""
    return np.round((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)


def load_one(folder):
    refs = load_images(folder, RES)
    assert refs.images.shape == (1, 3, RES, RES)
    return as_uint8(refs.images)[0]


# ------------------------------------------------------------------------------------------------
# folders and files

def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_images(tmp_path / "nope", RES)


def test_folder_is_a_file(tmp_path):
    path = save(tmp_path / "01.png", smooth_rgb(RES, RES, 0))
    with pytest.raises(UserError, match="01.png is a file"):
        load_images(path, RES)


def test_empty_folder_and_folder_without_images(tmp_path):
    with pytest.raises(UserError, match="no images in"):
        load_images(tmp_path, RES)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt"):
        load_images(tmp_path, RES)


def test_one_image(tmp_path):
    pixels = smooth_rgb(RES, RES, 1)
    save(tmp_path / "only.png", pixels)
    refs = load_images(tmp_path, RES)
    assert refs.names == ["only.png"] and refs.captions is None and refs.warnings == []
    assert refs.images.dtype == refs.images.float().dtype and -1 <= refs.images.min() <= refs.images.max() <= 1
    assert np.array_equal(as_uint8(refs.images)[0], pixels)


def test_stray_files_ignored_and_extensions_case_insensitive(tmp_path):
    save(tmp_path / "a.PNG", smooth_rgb(RES, RES, 2))
    save(tmp_path / "b.Jpeg", smooth_rgb(RES, RES, 3), quality=95)
    save(tmp_path / "c.webp", smooth_rgb(RES, RES, 4), lossless=True)
    save(tmp_path / "d.bmp", smooth_rgb(RES, RES, 5))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(64)))
    (tmp_path / "._a.PNG").write_bytes(b"\x00\x05\x16\x07 mac resource fork")  # hidden: not an image
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "z.png", smooth_rgb(RES, RES, 6))
    refs = load_images(tmp_path, RES)
    assert refs.names == ["a.PNG", "b.Jpeg", "c.webp", "d.bmp"]
    assert np.array_equal(as_uint8(refs.images)[3], smooth_rgb(RES, RES, 5))


def test_text_with_image_extension(tmp_path):
    save(tmp_path / "good.png", smooth_rgb(RES, RES, 7))
    (tmp_path / "x.jpg").write_text("this is not a JPEG")
    with pytest.raises(UserError, match="x.jpg"):
        load_images(tmp_path, RES)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    good = tmp_path / f"whole.{fmt.lower()}"
    save(good, np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8), format=fmt)
    data = good.read_bytes()
    (tmp_path / f"cut.{fmt.lower()}").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="cut"):
        load_images(tmp_path, RES)
    # Another library may have set Pillow's permissive global; a truncated file must still fail.
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(UserError, match="cut"):
            load_images(tmp_path, RES)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored, not changed behind the caller's back
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


# ------------------------------------------------------------------------------------------------
# pixel formats

def test_cmyk_jpeg(tmp_path):
    pixels = smooth_rgb(RES, RES, 9)
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
    got = load_one(tmp_path).astype(int)
    # JPEG is lossy; an inverted or channel-swapped conversion would be off by ~100.
    assert np.abs(got - pixels).mean() < 4


def test_palette_png_with_and_without_transparency(tmp_path):
    palette_img = Image.fromarray(smooth_rgb(RES, RES, 10)).quantize(16)
    palette_img.save(tmp_path / "p.png")
    assert np.array_equal(load_one(tmp_path), np.asarray(palette_img.convert("RGB")))

    index = np.asarray(palette_img)
    clear = int(index[0, 0])
    palette_img.save(tmp_path / "p.png", transparency=clear)
    got = load_one(tmp_path)
    transparent = index == clear
    assert transparent.any() and not transparent.all()
    assert (got[transparent] == 255).all()
    assert np.array_equal(got[~transparent], np.asarray(palette_img.convert("RGB"))[~transparent])


def test_16_bit_png_scaled_not_clipped(tmp_path):
    levels = np.random.default_rng(11).integers(0, 256, (RES, RES))
    levels[0, :3] = [0, 128, 255]
    Image.fromarray((levels * 257).astype(np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    got = load_one(tmp_path)
    assert np.array_equal(got, np.repeat(levels[..., None], 3, axis=2).astype(np.uint8))


@pytest.mark.parametrize("mode", ["I", "I;16", "I;16B"])
def test_16_bit_modes(mode):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]])
    dtype = {"I": np.int32, "I;16": np.uint16, "I;16B": ">u2"}[mode]
    img = Image.fromarray(values.astype(dtype))
    assert img.mode == mode
    got = np.asarray(to_rgb(img))
    assert got.shape == (2, 4, 3)
    assert np.array_equal(got[..., 1], np.round(values / 257).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_over_white(tmp_path, mode):
    rgb = smooth_rgb(RES, RES, 12)
    alpha = np.random.default_rng(13).integers(0, 256, (RES, RES), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha])).convert(mode).save(tmp_path / "alpha.png")
    colour = rgb if mode == "RGBA" else np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
    a = alpha[..., None] / 255.0
    expected = colour * a + 255 * (1 - a)
    got = load_one(tmp_path).astype(float)
    assert np.abs(got - expected).max() <= 1.0
    assert (got[0, 0] == 255).all()


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel(tmp_path, mode):
    img = Image.fromarray(smooth_rgb(RES, RES, 14)).convert(mode)
    img.save(tmp_path / "grey.png")
    grey = np.asarray(img.convert("L"))
    assert np.array_equal(load_one(tmp_path), np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("orientation, upright", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_rotation(tmp_path, orientation, upright):
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = smooth_rgb(RES + 16, RES, 15)  # landscape as stored; portrait once upright
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "phone.jpg") as img:
        stored = img.convert("RGB")  # decoded pixels, ignoring the tag
    expected = np.asarray(stored.transpose(upright).crop((0, 8, RES, RES + 8)))
    got = load_one(tmp_path)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, np.asarray(stored.crop((8, 0, RES + 8, RES))))


def test_small_image_upscaled_with_warning(tmp_path):
    save(tmp_path / "tiny.png", smooth_rgb(12, 20, 16))
    refs = load_images(tmp_path, RES)
    assert refs.images.shape == (1, 3, RES, RES)
    assert len(refs.warnings) == 1 and "tiny.png" in refs.warnings[0] and "12x20" in refs.warnings[0]


def test_resize_shorter_side_then_center_crop(tmp_path):
    pixels = smooth_rgb(3 * RES, 2 * RES, 17)
    pixels[:, :RES // 2] = [255, 0, 0]  # outside the centered square: must not show
    pixels[:, -RES // 2:] = [0, 0, 255]
    save(tmp_path / "wide.png", pixels)
    got = load_one(tmp_path).astype(float)
    # Literally: shorter side 64 -> 32 (so 96 -> 48), then the centered 32 columns.
    reference = Image.fromarray(pixels).resize((3 * RES // 2, RES), Image.Resampling.LANCZOS)
    reference = np.asarray(reference.crop((RES // 4, 0, 5 * RES // 4, RES))).astype(float)
    assert np.abs(got - reference).max() <= 1
    assert got[:, 2:-2, 0].max() < 240 and got[:, 2:-2, 2].max() < 240  # no red or blue band


def test_many_images(tmp_path):
    for i in range(70):
        save(tmp_path / f"{i:03d}.png", smooth_rgb(8, 8, 100 + i))
    refs = load_images(tmp_path, 8)
    assert refs.images.shape == (70, 3, 8, 8) and refs.names[-1] == "069.png"
    assert np.array_equal(as_uint8(refs.images)[42], smooth_rgb(8, 8, 142))


# ------------------------------------------------------------------------------------------------
# captions

def test_sidecar_captions_in_sorted_order(tmp_path):
    for name, seed in [("b.png", 20), ("a.jpg", 21), ("c.png", 22)]:
        save(tmp_path / name, smooth_rgb(RES, RES, seed))
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "a.txt").write_text("  a dog on grass\n")
    (tmp_path / "c.TXT").write_bytes("\ufeffcafé au lait ☕".encode("utf-8"))  # BOM, as Notepad writes
    (tmp_path / "readme.txt").write_text("not a caption")
    refs = load_images(tmp_path, RES)
    assert refs.names == ["a.jpg", "b.png", "c.png"]
    assert refs.captions == ["a dog on grass", "", "café au lait ☕"]
    assert np.array_equal(as_uint8(refs.images)[1], smooth_rgb(RES, RES, 20))


def test_no_captions(tmp_path):
    save(tmp_path / "01.png", smooth_rgb(RES, RES, 23))
    save(tmp_path / "02.png", smooth_rgb(RES, RES, 24))
    assert load_images(tmp_path, RES).captions is None


def test_caption_count_mismatch(tmp_path):
    for i in range(8):
        save(tmp_path / f"{i:02d}.png", smooth_rgb(8, 8, 30 + i))
    (tmp_path / "03.txt").write_text("a dog")
    with pytest.raises(UserError, match=r"7 of 8 images .* \(00.png, 01.png, 02.png, 04.png, 05.png, \.\.\.\)"):
        load_images(tmp_path, 8)


def test_caption_not_utf8(tmp_path):
    save(tmp_path / "01.png", smooth_rgb(RES, RES, 25))
    (tmp_path / "01.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="01.txt is not UTF-8"):
        load_images(tmp_path, RES)


@pytest.fixture
def two_images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    save(folder / "01.png", smooth_rgb(RES, RES, 26))
    save(folder / "02.png", smooth_rgb(RES, RES, 27))
    return folder


def test_captions_json(two_images, tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"02.png": " a cat ", "01.png": "a dog"}))
    (two_images / "01.txt").write_text("ignored")
    refs = load_images(two_images, RES, path)
    assert refs.captions == ["a dog", "a cat"]
    assert any("captions.json" in w and "ignored" in w for w in refs.warnings)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"01.png": "a dog",', "not valid JSON"),
    ('["a dog", "a cat"]', "JSON object mapping"),
    ('{"01.png": "a dog", "02.png": 3}', "JSON object mapping"),
    ('{"01.png": "a dog", "02.png": "a cat", "03.png": "a cow"}', r"not images in the folder \(03.png\)"),
    ('{"01.png": "a dog"}', r"no caption for 1 of 2 images \(02.png\)"),
])
def test_bad_captions_json(two_images, tmp_path, content, message):
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_images(two_images, RES, path)
    assert "captions.json" in str(info.value)


def test_list_images_checks_without_decoding(tmp_path):
    """The folder and caption checks stage 1 runs before loading a model: a picture that would not
    decode is not opened yet (load_images names it later)."""
    save(tmp_path / "01.jpg", smooth_rgb(40, 40, 0))
    (tmp_path / "02.jpg").write_text("not a picture")
    paths, captions, warnings = list_images(tmp_path)
    assert [p.name for p in paths] == ["01.jpg", "02.jpg"] and captions is None and warnings == []
    with pytest.raises(UserError, match="does not exist"):
        list_images(tmp_path / "nope")
