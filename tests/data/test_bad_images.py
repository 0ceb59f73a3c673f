"""Unreadable and odd image files: load_image's errors and conversions, and a pretraining loader that
skips (or, strict, stops at) unreadable files without losing determinism or exact resume."""

import io
import logging
import pickle
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_research.data import UnreadableImageError, build_augmentation, build_pretrain_loader
from dino_research.data.datasets import FileList, ImageFolder, load_image
from dino_research.data.loader import MAX_CONSECUTIVE_UNREADABLE, PretrainLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loader import assert_batches_equal, take  # noqa: E402


# --------------------------------------------------------------------------------------- file makers
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, idat, ihdr=None, idat_length=None):
    """A PNG, 8-bit RGB per its IHDR, with ``idat`` as image data; ``idat_length`` overrides the length
    field of the IDAT chunk (a lie that makes the decoder read into garbage)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0) if ihdr is None else ihdr
    chunk = png_chunk(b"IDAT", idat)
    if idat_length is not None:
        chunk = struct.pack(">I", idat_length) + chunk[4:]
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + chunk + png_chunk(b"IEND", b"")


def jpeg_bytes(size=(32, 24)):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def noise_png_idat(width, height):
    rows = np.random.default_rng(1).integers(0, 256, (height, 1 + 3 * width), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "none"
    return zlib.compress(rows.tobytes())


# Unreadable files: name -> bytes. The exception Pillow raises (13.0) is in the comment.
BAD_FILES = {
    "truncated.jpg": jpeg_bytes()[: len(jpeg_bytes()) // 2],  # OSError: image file is truncated
    "empty.jpg": b"",  # UnidentifiedImageError
    "text.jpg": b"this is a text file, not a JPEG\n",  # UnidentifiedImageError
    # IHDR claims 30000x30000 = 9e8 pixels (> 2 x MAX_IMAGE_PIXELS): DecompressionBombError, not an
    # OSError, raised by Image.open before any pixel is allocated.
    "bomb.png": png_bytes(30000, 30000, zlib.compress(b"\x00" * 16)),
    # IDAT's length field 18 bytes short: the decoder reads on into a "chunk" of garbage: SyntaxError.
    "broken_stream.png": png_bytes(16, 16, noise_png_idat(16, 16), idat_length=len(noise_png_idat(16, 16)) - 18),
    "short_header.png": png_bytes(2, 2, b"", ihdr=b"\x00" * 5),  # ValueError: Truncated IHDR chunk
}


def write_bad(folder, names=BAD_FILES):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        (folder / name).write_bytes(BAD_FILES[name])
        paths.append(str(folder / name))
    return paths


def write_odd_modes(folder):
    """Readable images in every odd mode, each with the RGB its top-left pixel must load as (None: not
    checked). Tiny, except one large legal JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0, 10, 200, 30, 50, 60, 70] + [0] * (768 - 9)
    expected = {}

    def save(name, image, rgb, **kwargs):
        image.save(folder / name, **kwargs)
        expected[str(folder / name)] = rgb

    sixteen = np.full((6, 8), 257 * 100, dtype=np.uint16)
    sixteen[0, 0] = 65535
    save("i16.png", Image.fromarray(sixteen), (255, 255, 255))  # mode I;16: 65535 -> 255, not clipped
    save("cmyk.jpg", Image.new("CMYK", (8, 6), (255, 0, 0, 0)), (0, 255, 255))
    palette_image = Image.new("P", (8, 6), 1)
    palette_image.putpalette(palette)
    save("palette.png", palette_image, (10, 200, 30))
    save("palette_transparent.png", palette_image, (10, 200, 30), transparency=1)  # alpha dropped
    save("gray.png", Image.new("L", (8, 6), 77), (77, 77, 77))
    save("gray_alpha.png", Image.new("LA", (8, 6), (77, 10)), (77, 77, 77))
    save("rgba.png", Image.new("RGBA", (8, 6), (10, 20, 30, 0)), (10, 20, 30))
    save("bilevel.png", Image.new("1", (8, 6), 1), (255, 255, 255))
    save("large.jpg", Image.new("RGB", (4000, 3000), (100, 150, 200)), None)  # 12 Mpx, under the limit
    return expected


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """root/a: 9 readable files in odd modes; root/b: the 6 unreadable files and an RGB one. 16 files."""
    root = tmp_path_factory.mktemp("mixed")
    good = write_odd_modes(root / "a")
    bad = write_bad(root / "b")
    Image.new("RGB", (8, 6), (1, 2, 3)).save(root / "b" / "rgb.png")
    return root, good, bad


def multicrop_dataset(make_tiny_cfg, root):
    return ImageFolder(root=str(root), transform=build_augmentation(make_tiny_cfg()))


# ------------------------------------------------------------------------------------- load_image
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_image_raises_unreadable_naming_the_file(tmp_path, name):
    (path,) = write_bad(tmp_path, [name])
    with pytest.raises(UnreadableImageError) as info:
        load_image(path)
    error = info.value
    assert isinstance(error, OSError) and error.path == path
    assert str(error) == f"cannot read image {path!r}: {error.reason}"
    if name == "bomb.png":
        assert "DecompressionBombError" in error.reason and "900000000 pixels" in error.reason
        assert f"PIL.Image.MAX_IMAGE_PIXELS (= 2 x {Image.MAX_IMAGE_PIXELS})" in error.reason
    if name == "broken_stream.png":  # Pillow's SyntaxError is caught too
        assert error.reason.startswith("SyntaxError")


def test_load_image_missing_file_and_interrupt(tmp_path, monkeypatch):
    with pytest.raises(UnreadableImageError, match="FileNotFoundError"):
        load_image(str(tmp_path / "gone.png"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image, "open", interrupted)  # Ctrl-C while decoding must not become a skip
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    with pytest.raises(KeyboardInterrupt):
        load_image(str(tmp_path / "ok.png"))


def test_unreadable_image_error_pickles():
    error = pickle.loads(pickle.dumps(UnreadableImageError("/x.jpg", "OSError: broken", "a hint")))
    assert (error.path, error.reason, error.hint) == ("/x.jpg", "OSError: broken", "a hint")
    assert str(error) == "cannot read image '/x.jpg': OSError: broken. a hint"


def test_odd_modes_load_as_rgb_with_their_colors(tmp_path):
    for path, rgb in write_odd_modes(tmp_path).items():
        image = load_image(path)
        assert image.mode == "RGB", path
        if rgb is not None:
            assert np.allclose(np.asarray(image)[0, 0], rgb, atol=2), path  # atol: JPEG is lossy
    sixteen = np.asarray(load_image(str(tmp_path / "i16.png")))
    assert tuple(sixteen[1, 1]) == (100, 100, 100)  # 25700 = 257 x 100
    assert load_image(str(tmp_path / "large.jpg")).size == (4000, 3000)


def test_file_list_unreadable_reason_names_list_and_line(tmp_path):
    write_bad(tmp_path, ["text.jpg"])
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    (tmp_path / "list.txt").write_text("ok.png 0\n# comment\ntext.jpg 1\n")
    dataset = FileList(list_file=str(tmp_path / "list.txt"))
    assert dataset[0][0].size == (2, 2)
    with pytest.raises(UnreadableImageError) as info:
        dataset[1]
    assert info.value.path == str(tmp_path / "text.jpg")
    assert "UnidentifiedImageError" in info.value.reason and f"{tmp_path / 'list.txt'}:3" in info.value.reason


# --------------------------------------------------------------------------------- pretraining loader
class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_loader_skips_unreadable_files_and_reports_each_once_per_epoch(mixed_root, make_tiny_cfg):
    root, good, bad = mixed_root
    dataset = multicrop_dataset(make_tiny_cfg, root)
    assert len(dataset) == 16
    loader = PretrainLoader(dataset, batch_size=4, seed=3, num_workers=2)  # 4 batches use every image
    records, package_logger = Records(), logging.getLogger("dino_research")
    package_logger.addHandler(records)
    try:
        assert loader.batches_per_epoch == 4
        iterator = loader.iterate(0)
        for epoch in range(2):
            skipped = []
            for _ in range(loader.batches_per_epoch):
                crops, labels = next(iterator)
                assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
                assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
                assert labels.dtype == torch.int64 and tuple(labels.shape) == (4,)
                skipped += loader.take_skipped()
            # Exactly the unreadable files, each once: no odd-mode file was skipped.
            assert sorted(path for path, _ in skipped) == sorted(bad), epoch
            assert all(reason for _, reason in skipped)
        assert loader.take_skipped() == []
    finally:
        loader.close()
        package_logger.removeHandler(records)
    assert len(records.messages) == 2 * len(bad)
    bomb = next(m for m in records.messages if "bomb.png" in m)
    assert bomb.startswith(f"skipped unreadable image {root / 'b' / 'bomb.png'} (DecompressionBombError")
    assert bomb.endswith("); replaced by another sample. DATALOADER.STRICT True stops instead")


def test_loader_with_skips_is_deterministic_and_resumes_exactly(mixed_root, make_tiny_cfg):
    dataset = multicrop_dataset(make_tiny_cfg, mixed_root[0])
    in_process = PretrainLoader(dataset, batch_size=4, seed=3)
    reference = take(in_process.iterate(0), 6)  # 1.5 epochs
    skipped_reference = in_process.take_skipped()
    with_workers = PretrainLoader(dataset, batch_size=4, seed=3, num_workers=2)
    try:
        assert_batches_equal(take(with_workers.iterate(0), 6), reference)
        assert with_workers.take_skipped() == skipped_reference
        assert_batches_equal(take(with_workers.iterate(5), 1), reference[5:])  # resumed in epoch 1
    finally:
        with_workers.close()
    assert_batches_equal(take(PretrainLoader(dataset, batch_size=4, seed=3).iterate(2), 4), reference[2:])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_loader_stops_naming_the_file(tmp_path, make_tiny_cfg, num_workers):
    (tmp_path / "a").mkdir()
    for i in range(7):
        Image.new("RGB", (8, 6), (i, 0, 0)).save(tmp_path / "a" / f"{i}.png")
    (bad,) = write_bad(tmp_path / "a", ["truncated.jpg"])
    loader = PretrainLoader(multicrop_dataset(make_tiny_cfg, tmp_path), batch_size=4, num_workers=num_workers,
                            strict=True)
    try:
        with pytest.raises((UnreadableImageError, RuntimeError)) as info:
            take(loader.iterate(0), 2)  # one epoch: every image is read
    finally:
        loader.close()
    message = str(info.value)
    assert bad in message and "DATALOADER.STRICT False" in message
    if num_workers == 0:  # read in this process: the error itself, with its fields
        assert isinstance(info.value, UnreadableImageError) and info.value.path == bad


def test_strict_comes_from_config(make_tiny_cfg):
    dataset = [(torch.zeros(3, 4, 4), 0)] * 4
    cfg = make_tiny_cfg()
    assert cfg.DATALOADER.STRICT is False
    assert build_pretrain_loader(cfg, dataset, rank=0, world_size=1).strict is False
    cfg = make_tiny_cfg(**{"DATALOADER.STRICT": True})
    assert build_pretrain_loader(cfg, dataset, rank=0, world_size=1).strict is True


@pytest.mark.parametrize("bad_count", [MAX_CONSECUTIVE_UNREADABLE - 1, MAX_CONSECUTIVE_UNREADABLE])
def test_too_many_consecutive_unreadable_files_look_broken(tmp_path, bad_count):
    # Sorted names: the bad files are indices 0..bad_count-1, then good ones up to 36: 9 batches of 4
    # read every index, index 0 included.
    (tmp_path / "a").mkdir()
    for i in range(bad_count):
        (tmp_path / "a" / f"bad{i:02d}.jpg").write_bytes(b"")
    for i in range(36 - bad_count):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "a" / f"good{i}.png")
    dataset = ImageFolder(root=str(tmp_path), transform=lambda image: [torch.from_numpy(np.array(image))])
    loader = PretrainLoader(dataset, batch_size=4)
    epoch = loader.batches_per_epoch
    assert epoch == 9
    if bad_count < MAX_CONSECUTIVE_UNREADABLE:  # index 0 finds good0 after bad_count failures
        take(loader.iterate(0), epoch)
        assert len(loader.take_skipped()) == bad_count
    else:
        with pytest.raises(RuntimeError, match=r"32 consecutive images from index 0 .*bad00.jpg.*looks broken"):
            take(loader.iterate(0), epoch)
