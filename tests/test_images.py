"""Reading image files: 16-bit pixels scaled to 8 bits, entries that are no regular files
skipped (a FIFO would block), and splits with no readable image refused, in every command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import swinv2
from swinv2 import predict as P
from swinv2.cli import main
from swinv2.data.datasets import ImageFolderDataset, LabelledSubset, require_readable
from swinv2.data.images import NotAFileError, is_regular_file, open_rgb, to_rgb
from swinv2.data.transforms import eval_transform

FAST = ["--model", "swinv2_debug", "--img-size", "32", "--window", "4", "--batch-size", "4", "--workers", "0",
        "--threads", "1", "--no-progress", "--no-tensorboard"]


class Hung(BaseException):
    """Raised by :func:`deadline`; not an Exception, so that no ``except Exception`` takes it for
    an unreadable image and goes on."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (opening a FIFO blocks until a writer comes)."""

    def expired(*_):
        raise Hung(f"still running after {seconds} s: an open() blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def photo(size: int = 40, grey: bool = False, seed: int = 0) -> Image.Image:
    """A crop of a real photograph (scikit-learn's china.jpg)."""
    from sklearn.datasets import load_sample_images

    a = load_sample_images().images[0]
    y, x = 60 + 37 * seed % 300, 90 + 53 * seed % 500
    img = Image.fromarray(a[y:y + size, x:x + size])
    return img.convert("L") if grey else img


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)) written by hand: Pillow writes 16-bit
    grey but not 16-bit colour."""
    h, w = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def grey16(value) -> np.ndarray:
    return np.full((8, 8), value, dtype=np.uint16) if np.isscalar(value) else np.asarray(value, dtype=np.uint16)


def save16(path: Path, pixels: np.ndarray) -> Path:
    """16-bit grey pixels as a PNG, TIFF or PGM file (by the suffix)."""
    if path.suffix == ".png":
        path.write_bytes(png16(pixels))
    else:
        Image.fromarray(pixels).save(path)
    return path


RAMP = np.arange(65536, dtype=np.uint32).reshape(256, 256).astype(np.uint16)


# -- 16-bit pixels ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
def test_16_bit_grey_files_are_scaled_to_8_bits(tmp_path, suffix):
    mid = open_rgb(save16(tmp_path / f"mid{suffix}", grey16(32768)))
    assert mid.mode == "RGB" and mid.getextrema() == ((128, 128),) * 3  # not clipped to white
    ramp = np.asarray(open_rgb(save16(tmp_path / f"ramp{suffix}", RAMP)))
    assert (ramp == ramp[..., :1]).all()  # grey
    values = ramp[..., 0].ravel()
    assert (np.diff(values.astype(int)) >= 0).all() and values[0] == 0 and values[-1] == 255
    assert set(values.tolist()) == set(range(256))
    assert (values == 255).mean() == pytest.approx(1 / 256)  # saturation only at the top level


def test_16_bit_pixel_modes(tmp_path):
    ramp = RAMP.reshape(-1)[::257].reshape(16, 16)  # v * 257: exactly the 8-bit value v in 16 bits
    want = np.arange(256, dtype=np.uint8).reshape(16, 16)
    images = {
        "I;16": Image.fromarray(ramp),
        "I;16B": Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes()),
        "I": Image.fromarray(ramp.astype(np.int32)),
    }
    for mode, img in images.items():
        assert img.mode == mode
        assert (np.asarray(to_rgb(img))[..., 1] == want).all(), mode
    # a 16-bit PGM comes as a 32-bit image spread over 0..65535, dark or not
    dark = Image.open(save16(tmp_path / "dark.pgm", grey16(200)))
    assert dark.mode == "I" and np.asarray(to_rgb(dark)).max() == 0
    # 8-bit values in a 32-bit image (e.g. convert("I") of a grey image) stay as they are
    eight = photo(grey=True)
    assert to_rgb(eight.convert("I")).tobytes() == eight.convert("RGB").tobytes()
    with pytest.raises(ValueError, match="no known 8-bit scale"):
        to_rgb(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)))


def test_16_bit_grey_reads_as_16_bit_colour_does(tmp_path):
    """Pillow itself decodes 16-bit colour to 8 bits by the high byte: grey agrees."""
    pixels = np.asarray(photo(grey=True)).astype(np.uint16) * 251 + 97  # low bytes of all kinds
    (tmp_path / "grey.png").write_bytes(png16(pixels))
    (tmp_path / "colour.png").write_bytes(png16(np.stack([pixels] * 3, axis=-1)))
    grey, colour = open_rgb(tmp_path / "grey.png"), open_rgb(tmp_path / "colour.png")
    assert Image.open(tmp_path / "colour.png").mode == "RGB"
    assert grey.tobytes() == colour.tobytes() == np.repeat((pixels >> 8).astype(np.uint8), 3).tobytes()


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "RGBA", "CMYK", "YCbCr", "F", "RGB"])
def test_other_modes_convert_as_pillow_does(mode):
    img = photo().convert(mode)
    assert to_rgb(img).tobytes() == img.convert("RGB").tobytes()


def _model_file(tmp_path: Path, num_classes: int) -> Path:
    from helpers import randomize_

    model = randomize_(swinv2.create_model("swinv2_debug", num_classes=num_classes, img_size=32, window_size=4))
    return swinv2.save_pretrained(model.eval(), tmp_path / "model.safetensors")


def _twin_folders(tmp_path: Path) -> tuple[Path, Path]:
    """The same grey photos as 8-bit PNGs and as 16-bit PNGs (each value v stored as 257 v)."""
    for bits in (8, 16):
        for c in ("a", "b"):
            (tmp_path / f"d{bits}" / c).mkdir(parents=True)
            for k in range(3):
                img = photo(grey=True, seed=k + (3 if c == "b" else 0))
                path = tmp_path / f"d{bits}" / c / f"{k}.png"
                if bits == 8:
                    img.save(path)
                else:
                    path.write_bytes(png16(np.asarray(img).astype(np.uint16) * 257))
    return tmp_path / "d8", tmp_path / "d16"


def test_16_bit_images_in_the_dataset_eval_and_predict(tmp_path, capsys):
    d8, d16 = _twin_folders(tmp_path)
    ds8, ds16 = ImageFolderDataset(d8), ImageFolderDataset(d16)
    assert Image.open(ds16.samples[0][0]).mode == "I;16"
    for i in range(len(ds8)):
        assert ds16[i][0].tobytes() == ds8[i][0].tobytes()
        assert 10 < np.asarray(ds16[i][0]).mean() < 245

    weights = _model_file(tmp_path, 2)
    results = []
    for folder in (d8, d16):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(weights), "--data", str(folder), "--img-size", "32",
                     "--workers", "0", "--threads", "1", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["images"] == results[1]["images"] == 6
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], abs=1e-6)

    model = swinv2.create_model("swinv2_debug", pretrained=str(weights))
    tf = eval_transform(32)
    rows8 = P.predict(model, [d8], transform=tf)
    rows16 = P.predict(model, [d16], transform=tf)
    assert all(r["ok"] for r in rows8 + rows16)
    for r8, r16 in zip(rows8, rows16):
        assert [p["prob"] for p in r16["topk"]] == pytest.approx([p["prob"] for p in r8["topk"]], abs=1e-6)


# -- entries that are no regular files ---------------------------------------------------------


def _photo_classes(root: Path, per_class: int = 6) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            photo(seed=k + (per_class if c == "b" else 0)).save(root / c / f"{k}.png")
    return root


def _specials(folder: Path) -> list[Path]:
    """A FIFO and a broken link named like images, and a directory named like one."""
    fifo, link = folder / "x.png", folder / "y.jpg"
    os.mkfifo(fifo)
    link.symlink_to(folder / "missing.png")
    (folder / "z.png").mkdir()
    return [fifo, link]


def test_open_rgb_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    assert not is_regular_file(tmp_path / "x.png") and not is_regular_file(tmp_path)
    with deadline(20), pytest.raises(NotAFileError, match="FIFO"):
        open_rgb(tmp_path / "x.png")
    with pytest.raises(NotAFileError, match="directory"):
        open_rgb(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_rgb(tmp_path / "missing.png")


def test_folder_scan_skips_and_counts_entries_that_are_no_files(tmp_path):
    root = _photo_classes(tmp_path / "data")
    specials = _specials(root / "b")
    with pytest.warns(UserWarning, match=r"skipping 2 entries .* not regular files"):
        ds = ImageFolderDataset(root)
    assert len(ds) == 12 and sorted(ds.not_files) == sorted(map(str, specials))
    assert all(ds[i][0] is not None for i in range(len(ds)))


@pytest.mark.filterwarnings("ignore:skipping 2 entries")
@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_train_and_eval_with_a_fifo_in_a_class_folder_complete(tmp_path, capsys):
    root = _photo_classes(tmp_path / "data")
    _specials(root / "a")
    # One whole epoch, in a loader worker: every image is visited (a batch of 4 leaves no tail,
    # whether or not the two entries count as images), so the FIFO would be opened if listed.
    with deadline(120):
        assert main(["train", "--data", str(root), *FAST, "--workers", "1", "--epochs", "1",
                     "--output", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["updates"] == 2 and summary["skipped_images"] == 0
    with deadline(120):
        assert main(["eval", "--checkpoint", str(tmp_path / "run" / "model-last.safetensors"), "--data", str(root),
                     "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == 12


def test_predict_skips_fifos_in_folders_and_refuses_one_named(tmp_path, capsys):
    root = _photo_classes(tmp_path / "data", per_class=1)
    _specials(root / "a")
    with deadline(60):
        files = P.find_images([root])
    assert [f.name for f in files] == ["0.png", "0.png"]
    assert "skipping 2 entries" in capsys.readouterr().err
    with deadline(60), pytest.raises(ValueError, match="FIFO"):
        P.find_images([root / "a" / "x.png"])
    with deadline(60):
        assert main(["predict", str(root / "a" / "x.png"), "--model", "swinv2_debug", "--quiet"]) == 2
    assert "FIFO" in capsys.readouterr().err


# -- no readable image in a split ----------------------------------------------------------------


def _corrupt_classes(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "0.png").write_bytes(b"")
        (root / c / "1.jpg").write_bytes(b"not an image\n")
        (root / c / "2.png").write_bytes(png16(RAMP)[:2000])  # truncated
    return root


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("swinv2: error: "), err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_train_pretrain_finetune_refuse_a_split_without_readable_images(tmp_path, capsys):
    bad = _corrupt_classes(tmp_path / "bad")
    for task, extra in (("train", []), ("pretrain", ["--mask-patch", "16"]),
                        ("finetune", ["--checkpoint", str(_model_file(tmp_path, 2))])):
        out = tmp_path / f"run-{task}"
        capsys.readouterr()
        assert main([task, "--data", str(bad), *FAST, *extra, "--max-steps", "2", "--output", str(out)]) == 2
        _one_line_error(capsys, "no readable image in the training split of", str(bad), "all 4 of its image files")
        assert not list(out.glob("checkpoint-*")) and not list(out.glob("model-*"))
    # a readable training folder with a validation folder of corrupt files
    good = _photo_classes(tmp_path / "good")
    assert main(["train", "--data", str(good), "--val", str(bad), *FAST, "--max-steps", "2",
                 "--output", str(tmp_path / "run-val")]) == 2
    _one_line_error(capsys, "no readable image in the validation folder", str(bad))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_a_held_out_split_of_unreadable_files_is_refused(tmp_path):
    root = _photo_classes(tmp_path / "data", per_class=2)
    (root / "a" / "bad.png").write_bytes(b"")
    ds = ImageFolderDataset(root)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("bad.png")]
    require_readable(LabelledSubset(ds, [0, *bad]), "validation")
    with pytest.raises(ValueError, match=r"no readable image in the validation split of .*: all 1 of"):
        require_readable(LabelledSubset(LabelledSubset(ds, bad + [0]), [0]), "validation")


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_eval_refuses_unreadable_folders_and_counts_unreadable_images(tmp_path, capsys):
    weights = _model_file(tmp_path, 2)
    bad = _corrupt_classes(tmp_path / "bad")
    args = ["eval", "--checkpoint", str(weights), "--img-size", "32", "--workers", "0", "--threads", "1"]
    assert main([*args, "--data", str(bad)]) == 2
    _one_line_error(capsys, "no readable image in the evaluation folder", str(bad))

    mixed = _photo_classes(tmp_path / "mixed", per_class=3)
    (mixed / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main([*args, "--data", str(mixed), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 6 and result["skipped_images"] == 1
    assert main([*args, "--data", str(mixed)]) == 0
    assert "on 6 images" in (out := capsys.readouterr().out) and "1 unreadable images skipped" in out


def test_the_reconstruct_reader_refuses_a_fifo(tmp_path, monkeypatch, capsys):
    """``swinv2 reconstruct`` reads its images through open_rgb (the checkpoint is not needed to see it)."""
    import swinv2.reconstruct as R

    os.mkfifo(tmp_path / "x.png")
    monkeypatch.setattr(R, "load_simmim", lambda *a, **k: (None, dict(img_size=32)))
    with deadline(60):
        assert main(["reconstruct", "ckpt.pt", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, "FIFO", "x.png")
