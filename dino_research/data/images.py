"""Reading one image file: decoded, turned upright by its EXIF orientation, converted to 8-bit RGB.

:func:`load_image` is the one place files become pixels (every dataset that reads files, and
``tools/visualize_attention.py``, call it); any failure is an :class:`UnreadableImageError` naming the
file, which the pretraining loader skips or stops on (``DATALOADER.STRICT``).
"""

from __future__ import annotations

import logging

import numpy as np
from iopath.common.file_io import g_pathmgr
from PIL import Image, UnidentifiedImageError

from ..utils.errors import UserError

__all__ = ["UnreadableImageError", "apply_exif_orientation", "load_image", "to_rgb"]

logger = logging.getLogger("dino_research")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB ``PIL.Image`` (the same object when it already is one).

    - 16-bit grayscale (``I;16*``, and ``I``, which Pillow uses for 16-bit PNG/TIFF data) is scaled
      to 8 bits as ``round(v / 257)`` (0 -> 0, 65535 -> 255); Pillow's own conversion clips every
      value above 255 to white. ``I`` values outside [0, 65535] are clipped first.
    - Palette images with a transparency entry go through RGBA (same colors, no Pillow warning).
    - Everything else (L, LA, P, RGBA, CMYK, YCbCr, 1, F...) uses Pillow's ``convert("RGB")``: alpha
      is dropped, not composited, as torchvision's loader does.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        values = (np.clip(values, 0, 65535) + 128) // 257  # integer round(v / 257)
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class UnreadableImageError(UserError, OSError):
    """An image file that cannot be opened, decoded or converted to RGB (missing, truncated, not an
    image, over Pillow's decompression-bomb limit...). Message: ``cannot read image {path!r}: {reason}``,
    followed by ``hint`` when one is given.

    An ``OSError``, so code that caught ``load_image``'s ``OSError`` before still catches it.

    Attributes:
        path (str): the file, as given to :func:`load_image`.
        reason (str): what failed, e.g. ``"OSError: image file is truncated (150 bytes not processed)"``.
        hint (str): what to do about it ("" when none); not part of ``reason``.
    """

    def __init__(self, path: str, reason: str, hint: str = ""):
        message = f"cannot read image {path!r}: {reason}"
        super().__init__(f"{message}. {hint}" if hint else message)
        self.path, self.reason, self.hint = path, reason, hint

    def __reduce__(self):  # OSError pickles its message alone; rebuild from the fields instead
        return type(self), (self.path, self.reason, self.hint)


# EXIF Orientation (tag 0x0112, values 1-8) -> the transposition that turns the stored pixels upright:
# the table of PIL.ImageOps.exif_transpose. 1 (or no tag) is upright already.
_ORIENTATION_TAG = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def apply_exif_orientation(image: Image.Image, path: str = "") -> Image.Image:
    """``image`` turned upright as its EXIF Orientation tag says, as image viewers show it.

    The transposition is ``PIL.ImageOps.exif_transpose``'s, applied to the pixels only: Pillow's
    function also rewrites the EXIF block and raises (``TypeError``, ``struct.error``) on some broken
    blocks whose orientation is perfectly readable, e.g. a tag stored with the wrong type. No tag or a
    value outside 2..8: ``image`` itself. A block Pillow cannot parse at all: a warning naming
    ``path``, and the pixels as stored (a damaged metadata block must not cost the image).
    """
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as e:  # Pillow's EXIF parser signals damage with many types, as its decoders do
        logger.warning("%s: EXIF block unreadable (%s: %s): orientation not applied, pixels used as stored",
                       path or image, type(e).__name__, e)
        return image
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def load_image(path: str, exif_transpose: bool = True) -> Image.Image:
    """Read the image at ``path`` (local or iopath URI), fully decoded, as RGB (see :func:`to_rgb`).

    ``exif_transpose`` (config ``INPUT.EXIF_TRANSPOSE``): rotate/flip the pixels as the file's EXIF
    Orientation tag says (:func:`apply_exif_orientation`), so a phone's portrait photo is portrait;
    False returns them as stored in the file (what torchvision's loader, hence the reference, does).

    Raises:
        UnreadableImageError: naming ``path``, for any failure to open, decode or convert the file.
    """
    try:
        with g_pathmgr.open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode while the file is open: PIL reads lazily
        if exif_transpose:
            image = apply_exif_orientation(image, path)
        return to_rgb(image)
    except Image.DecompressionBombError as e:  # not an OSError: raised by Image.open before decoding
        raise UnreadableImageError(
            path,
            f"DecompressionBombError: {e} Pillow refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS "
            f"(= 2 x {Image.MAX_IMAGE_PIXELS}) pixels; raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine",
        ) from e
    except UnidentifiedImageError as e:  # Pillow's message only repeats the path (as a file object)
        raise UnreadableImageError(
            path, "UnidentifiedImageError: Pillow cannot identify it as an image (empty, not an image, corrupt header?)"
        ) from e
    except Exception as e:
        # Pillow signals broken files with many types besides OSError: SyntaxError (PNG chunks),
        # ValueError (short headers), EOFError, struct.error, MemoryError... Exception, not
        # BaseException: KeyboardInterrupt and SystemExit pass.
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
