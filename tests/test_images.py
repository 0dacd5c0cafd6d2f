"""The image rule (threecad.io): EXIF orientation on sizes and pixels, 16-bit scaled by bit depth.

Every expectation is computed independently here: orientations with numpy (rot90 / flips /
transposes, written from the EXIF definitions), 16-bit scaling as ``round(v * 255 / 65535)``
in float64.
"""

from __future__ import annotations

import io
import json
import shutil
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from threecad.dataset.layout import list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.dataset.masks import read_mask
from threecad.dataset.verify import verify_dataset
from threecad.errors import ThreecadError
from threecad.ingest.hf_export import _rows
from threecad.ingest.import_folder import import_folder
from threecad.io import image_header, image_size, read_image

ORIENTATION = 0x0112
#: Displayed view of the stored array, per EXIF orientation (where stored row 0 / column 0 end up).
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right: mirrored
    3: lambda a: np.rot90(a, 2),  # row 0 bottom, column 0 right
    4: lambda a: a[::-1],  # row 0 bottom, column 0 left
    5: lambda a: a.swapaxes(0, 1),  # row 0 left, column 0 top
    6: lambda a: np.rot90(a, -1),  # row 0 right, column 0 top: a quarter turn clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # row 0 right, column 0 bottom
    8: lambda a: np.rot90(a, 1),  # row 0 left, column 0 bottom
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _stored(shape=(5, 7, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _ramp16() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)


def _scaled(a: np.ndarray) -> np.ndarray:
    return np.round(a.astype(np.float64) * 255 / 65535).astype(np.uint8)


# ------------------------------------------------------------------------------------ orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_orientation_applies_to_size_and_pixels(tmp_path, orientation):
    stored = _stored()
    path = tmp_path / "o.png"
    Image.fromarray(stored).save(path, exif=_exif(orientation))
    shown = DISPLAYED[orientation](stored)
    assert image_size(path) == (shown.shape[1], shown.shape[0])
    assert np.array_equal(read_image(path), shown)
    assert np.array_equal(read_image(path, "RGB"), shown)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_orientation_turns_the_stored_pixels(tmp_path, orientation):
    path = tmp_path / "o.jpg"
    Image.fromarray(_stored((16, 24, 3))).save(path, exif=_exif(orientation), quality=95)
    with Image.open(path) as raw:  # PIL's JPEG reader leaves the orientation alone
        stored = np.asarray(raw)
    shown = DISPLAYED[orientation](stored)
    assert image_size(path) == (shown.shape[1], shown.shape[0])
    assert np.array_equal(read_image(path), shown)


def test_png_exif_chunk_after_the_image_data_is_found(tmp_path):
    """The PNG extension allows eXIf after IDAT; PIL sees it only after decoding, LabelMe applies it."""
    stored = _stored((6, 10))
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    payload = _exif(6).tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    path = tmp_path / "late.png"
    path.write_bytes(data[:-12] + chunk + data[-12:])
    with Image.open(path) as probe:
        assert "exif" not in probe.info  # the hard case: nothing in the header before the pixels
    assert image_size(path) == (6, 10)
    assert np.array_equal(read_image(path), np.rot90(stored, -1))


def test_tiff_orientation_is_applied_once_or_refused(tmp_path):
    """PIL's TIFF reader turns TIFFs itself: never twice; a quarter turn it decodes wrongly is refused."""
    stored = _stored((4, 6))
    half = tmp_path / "half.tif"
    tifffile.imwrite(half, stored, extratags=[(ORIENTATION, "H", 1, 3, True)])
    assert image_size(half) == (6, 4)
    assert np.array_equal(read_image(half), np.rot90(stored, 2))
    quarter = tmp_path / "quarter.tif"
    tifffile.imwrite(quarter, stored, extratags=[(ORIENTATION, "H", 1, 6, True)])
    assert image_size(quarter) == (4, 6)
    try:
        pixels = read_image(quarter)
    except ThreecadError as exc:
        assert "orientation 6" in str(exc) and str(quarter) in str(exc)
    else:
        assert np.array_equal(pixels, np.rot90(stored, -1))


def test_exif_rotated_frame_loads_with_its_displayed_mask(tmp_path):
    """A defect drawn on the displayed view: verify, the loader, import and the HF rows all line up."""
    shown = np.full((20, 30), 40, np.uint8)
    shown[3:9, 18:27] = 220  # the defect, as the annotator saw it
    mask = np.zeros((20, 30), np.uint8)
    mask[3:9, 18:27] = 255
    root = tmp_path / "ds"
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / "Cat" / folder).mkdir(parents=True)
    Image.fromarray(np.full((20, 30), 40, np.uint8)).save(root / "Cat" / "train" / "good" / "n.png")
    Image.fromarray(np.full((20, 30), 41, np.uint8)).save(root / "Cat" / "test" / "good" / "g.png")
    # stored turned back a quarter, with orientation 6 saying "turn clockwise to display"
    Image.fromarray(np.rot90(shown, 1)).save(root / "Cat" / "test" / "crack" / "d.png", exif=_exif(6))
    Image.fromarray(mask).save(root / "Cat" / "ground_truth" / "crack" / "d.png")

    report = verify_dataset(root)
    assert report.ok, report.summary()
    item = next(i for i in AnomalyDataset(root, "Cat", "test", size=None, resize="native") if i["label"] == 1)
    pixels = item["image"][0].numpy() * 255
    inside = item["mask"][0].numpy() > 0.5
    assert inside.sum() == 54 and np.allclose(pixels[inside], 220) and np.allclose(pixels[~inside], 40)

    sample = next(s for s in list_samples(root, "Cat", "test") if s.label == 1)
    row = next(_rows([sample], str(root), {}))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"]))) > 0, mask > 0)

    src = tmp_path / "src"
    (src / "Free").mkdir(parents=True)
    (src / "Crack").mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 30), 40 + i, np.uint8)).save(src / "Free" / f"n{i}.png")
    shutil.copyfile(root / "Cat" / "test" / "crack" / "d.png", src / "Crack" / "d.png")
    Image.fromarray(mask).save(src / "Crack" / "d_mask.png")
    import_folder(src, tmp_path / "imported", category="Cat")
    written = read_mask(tmp_path / "imported" / "Cat" / "ground_truth" / "Crack" / "d.png")
    assert np.array_equal(written, mask > 0)


def test_masks_follow_their_own_orientation(tmp_path):
    stored = np.zeros((4, 9), np.uint8)
    stored[0, :3] = 255
    path = tmp_path / "m.png"
    Image.fromarray(stored).save(path, exif=_exif(8))
    assert np.array_equal(read_mask(path, expected_size=(4, 9)), np.rot90(stored, 1) > 0)


# ------------------------------------------------------------------------------------- bit depth
def test_16bit_ramp_is_scaled_by_bit_depth_never_clipped(tmp_path):
    ramp = _ramp16()
    expected = _scaled(ramp)
    png = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(png)
    big = tmp_path / "ramp_be.tif"
    tifffile.imwrite(big, ramp.astype(">u2"))
    wide = tmp_path / "ramp_i32.tif"
    tifffile.imwrite(wide, ramp.astype(np.int32))
    for path in (png, big, wide):
        assert image_header(path).bits in (16, 32)
        assert np.array_equal(read_image(path, "L"), expected), path
        rgb = read_image(path, "RGB")
        assert rgb.shape == (256, 256, 3) and all(np.array_equal(rgb[..., k], expected) for k in range(3))
    assert np.array_equal(read_image(png), ramp)  # no mode: kept as stored
    assert (expected == 255).mean() < 0.01  # PIL's convert made 99.6 % of these 255


def test_32bit_values_beyond_16_bits_are_refused(tmp_path):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ThreecadError, match="exceed 16 bits") as info:
        read_image(path, "RGB")
    assert str(path) in str(info.value)


def test_header_reports_16bit_colour(tmp_path):
    """PIL reduces 16-bit colour to 8 bits while decoding; the header still says what is stored."""
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 3), np.uint16), photometric="rgb")
    assert image_header(path) == (4, 3, "RGB", 16)


def test_loader_item_of_a_16bit_tile_is_not_saturated(tmp_path):
    ramp = _ramp16()
    root = tmp_path / "ds"
    (root / "Cat" / "train" / "good").mkdir(parents=True)
    Image.fromarray(ramp).save(root / "Cat" / "train" / "good" / "t.png")
    image = AnomalyDataset(root, "Cat", "train", size=None, resize="native")[0]["image"].numpy()
    assert image.shape == (3, 256, 256)
    assert np.allclose(image * 255, _scaled(ramp)[None].astype(np.float32), atol=1e-3)
    assert (image >= 1.0).mean() < 0.01


def test_verify_lists_16bit_images_without_failing(synth_root, tmp_path):
    root = shutil.copytree(synth_root, tmp_path / "ds")
    cat = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    target = sorted((root / cat / "train" / "good").glob("*.png"))[0]
    gray = np.asarray(Image.open(target).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(target)
    report_path = tmp_path / "report.json"
    report = verify_dataset(root, report_path=report_path)
    assert report.ok, report.summary()
    rel = f"train/good/{target.name}"
    assert report.bit_depth == {cat: {"images": 1, "example": rel, "modes": {"I;16, 16-bit": 1}}}
    notes = [w for w in report.warnings if w.check == "bit_depth"]
    assert len(notes) == 1 and notes[0].path == cat and "1 image has more than 8 bits" in notes[0].message and rel in notes[0].message
    assert json.loads(report_path.read_text())["bit_depth"] == report.bit_depth
    assert verify_dataset(root, decode=False).bit_depth == report.bit_depth
