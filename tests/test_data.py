"""data.py: robust decoding of odd image files, transform presets, labels.csv validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tune_rice import UserError
from tune_rice.data import images as data
from tune_rice.data.images import ImageDecodeError, load_image, read_labels


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ decoding
def test_exif_orientation_is_applied(tmp_path):
    # Stored 30 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90 deg clockwise
    # for display, so the decoded image is 20 wide x 30 high with red on top.
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, :15] = (255, 0, 0)
    arr[:, 15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)

    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (20, 30)
    px = np.asarray(image).astype(int)  # (30, 20, 3)
    top, bottom = px[:12].mean(axis=(0, 1)), px[18:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_greyscale_becomes_rgb(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    px = np.asarray(load_image(path))
    assert px.shape == (8, 8, 3) and px.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(px[..., c], grey)


def test_palette_without_transparency(tmp_path):
    src = Image.fromarray(_noise(10, 12)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert "transparency" not in src.info
    path = tmp_path / "palette.png"
    src.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(src.convert("RGB")))


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    idx = np.zeros((6, 6), dtype=np.uint8)
    idx[:, 3:] = 1
    src = Image.fromarray(idx, mode="P")
    src.putpalette([10, 20, 30, 200, 0, 0] + [0] * (254 * 3))
    path = tmp_path / "transparent.png"
    src.save(path, transparency=0)  # index 0 is fully transparent
    assert "transparency" in Image.open(path).info
    px = np.asarray(load_image(path))
    assert (px[:, :3] == 255).all()  # transparent -> white, not the palette's dark colour
    assert (px[:, 3:] == (200, 0, 0)).all()


def test_gif_palette(tmp_path):
    path = tmp_path / "anim.gif"
    Image.fromarray(_noise(9, 7)).convert("P").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (7, 9)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)
    rgba[0] = (0, 0, 0, 0)  # transparent -> white
    rgba[1] = (0, 0, 0, 255)  # opaque black stays black
    rgba[2] = (0, 0, 0, 128)  # half -> mid grey
    rgba[3] = (100, 100, 100, 255)
    src = Image.fromarray(rgba, mode="RGBA")
    if mode == "LA":
        src = src.convert("LA")
    path = tmp_path / f"alpha_{mode}.png"
    src.save(path)
    px = np.asarray(load_image(path)).astype(int)
    assert px.shape == (4, 3, 3)
    assert (px[0] == 255).all()
    assert (px[1] == 0).all()
    assert (abs(px[2] - 127) <= 2).all()
    assert (px[3] == 100).all()


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 12), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 12)
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 230 and g < 25 and b < 25


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    src = Image.fromarray(values)
    path = tmp_path / "deep.png"
    src.save(path)
    assert Image.open(path).mode == "I;16"
    px = np.asarray(load_image(path))
    assert px.shape == (3, 4, 3) and px.dtype == np.uint8
    np.testing.assert_allclose(px[0, :, 0], [0, 64, 128, 255], atol=1)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()


def test_16bit_png_blank_image(tmp_path):
    path = tmp_path / "blank16.png"
    Image.new("I;16", (5, 4)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert not np.asarray(image).any()


def test_float_tiff_in_unit_range(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32).repeat(2, axis=0)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    px = np.asarray(load_image(path))
    np.testing.assert_allclose(px[0, :, 0], [0, 64, 128, 255], atol=1)


def test_truncated_jpeg_raises_naming_the_path(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_noise(64, 64)).save(good, quality=90)
    payload = good.read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load_image(bad)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, UserError)  # a CLI shows it as one line
    # draft (reduced-scale) decoding still reads the whole stream, so it catches truncation too
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(bad, draft_size=16)


def test_zero_byte_jpg(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    with pytest.raises(ImageDecodeError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_draft_size_keeps_at_least_the_requested_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_noise(400, 640)).save(path)
    image = load_image(path, draft_size=100)
    assert image.mode == "RGB"
    assert min(image.size) >= 100 and image.size[0] < 640


# ---------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("policy", data.AUG_POLICIES)
def test_build_transform_shape_and_dtype(policy, train):
    image = Image.fromarray(_noise(50, 70))
    out = data.build_transform(32, train=train, policy=policy)(image)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_eval_transform_is_deterministic_and_normalised():
    image = Image.fromarray(_noise(48, 48))
    tf = data.build_transform(32, train=False)
    a, b = tf(image), tf(image)
    assert torch.equal(a, b)
    white = tf(Image.new("RGB", (40, 40), (255, 255, 255)))
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(white[:, 0, 0], expected)


def test_unknown_policy_names_the_choices():
    with pytest.raises(UserError, match="unknown augmentation policy 'wild'.*standard"):
        data.build_transform(32, train=True, policy="wild")


# --------------------------------------------------------------------------------------- read_labels
def _write_csv(path, text: str):
    path.write_text(text)
    return path


def test_read_labels_ok(tmp_path):
    csv = _write_csv(
        tmp_path / "labels.csv",
        "path,label,split,group,width\n"
        "b/1.jpg,b,train,g1,10\n"
        "a/1.jpg,a,train,g2,10\n"
        "a/2.jpg,a,valid,g3,10\n"
        "b/2.jpg,b,test,g4,10\n",
    )
    table = read_labels(csv)
    assert table.classes == ("a", "b")
    assert table.root == tmp_path.resolve()
    assert table.paths("train") == [tmp_path.resolve() / "b/1.jpg", tmp_path.resolve() / "a/1.jpg"]
    np.testing.assert_array_equal(table.targets("train"), [1, 0])
    assert len(table.split("test")) == 1
    other = tmp_path / "elsewhere"
    assert read_labels(csv, root=other).paths("test") == [other.resolve() / "b/2.jpg"]


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd", "a\\..\\x.jpg"])
def test_read_labels_refuses_paths_outside_root(tmp_path, bad_path):
    csv = _write_csv(tmp_path / "labels.csv", f"path,label,split,group\na/1.jpg,a,train,g1\n{bad_path},a,valid,g2\n")
    with pytest.raises(UserError, match="not inside the dataset root"):
        read_labels(csv)


def test_read_labels_missing_columns(tmp_path):
    csv = _write_csv(tmp_path / "labels.csv", "path,label\na/1.jpg,a\n")
    with pytest.raises(UserError, match="missing column.*split, group") as info:
        read_labels(csv)
    assert str(csv.resolve()) in str(info.value)


def test_read_labels_unknown_split(tmp_path):
    csv = _write_csv(tmp_path / "labels.csv", "path,label,split,group\na/1.jpg,a,training,g1\n")
    with pytest.raises(UserError, match=r"unknown split value.*'training'.*train, valid, test"):
        read_labels(csv)


def test_read_labels_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="not a readable CSV"):
        read_labels(_write_csv(tmp_path / "empty.csv", ""))
    with pytest.raises(UserError, match="no rows"):
        read_labels(_write_csv(tmp_path / "header.csv", "path,label,split,group\n"))
