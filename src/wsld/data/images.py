"""Image decoding shared by training, packing and verification.

Decoding goes through Pillow only. Everything that opens an image here keeps Pillow's
decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) on and turns an over-limit image into an
error instead of allocating it; truncated files stay errors (``LOAD_TRUNCATED_IMAGES`` is never
set), so a damaged file is reported rather than silently padded with grey.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo straight into a numpy array: same pixels as Pillow's decoder, about 35% faster
    import simplejpeg
except ImportError:  # pragma: no cover - optional speed-up; Pillow decodes everything without it
    simplejpeg = None

# the same extensions torchvision's ImageFolder accepts, matched case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# formats whose file extension is expected for each Pillow format name (for "PNG named .JPEG" notes)
_FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "PPM": (".ppm", ".pgm"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
}


def is_image_name(name: str) -> bool:
    """True for file names with an image extension, any letter case (``.JPEG``, ``.jpg``...)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


class ImageDecodeError(Exception):
    """An image that cannot be used: empty, truncated, corrupt, not an image, or too large."""


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes lazily (header only), refusing empty data and decompression bombs."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"refused as a decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - every decoder failure is the file's fault
        if "truncat" in str(e).lower() or isinstance(e, EOFError):
            raise ImageDecodeError(f"truncated file ({str(e) or 'unexpected end of data'})") from None
        raise ImageDecodeError(f"cannot read header: {_short(e)}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise ImageDecodeError(
            f"refused as a decompression bomb: {img.width}x{img.height} = {img.width * img.height} pixels "
            f"exceeds Pillow's limit of {limit}"
        )
    return img


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode the pixel data fully (``load``), mapping decoder failures to ``ImageDecodeError``."""
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(_describe_load_error(e)) from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, alpha and 16-bit images become RGB, as torchvision's loader does."""
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits first
            img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(f"cannot convert mode {img.mode} to RGB: {_short(e)}") from None


def decode_rgb(data: bytes) -> Image.Image:
    """Full-size decode of encoded bytes into an RGB image."""
    return to_rgb(load_pixels(open_image(data)))


_JPEG_SOI = b"\xff\xd8"
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")  # CMYK/YCCK go to Pillow, which handles Adobe inversion


def _check_pixels(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            f"refused as a decompression bomb: {width}x{height} = {width * height} pixels exceeds Pillow's limit of "
            f"{limit}"
        )


class EncodedImage:
    """Encoded image bytes with the header read: size now, pixels later at a chosen JPEG scale.

    JPEGs in YCbCr/grayscale are decoded by libjpeg-turbo (``simplejpeg``) when installed, anything
    else (PNG, CMYK JPEG, a JPEG the strict decoder rejects) by Pillow. Both refuse truncated data
    and decompression bombs.
    """

    __slots__ = ("data", "width", "height", "_pil", "_turbo")

    def __init__(self, data: bytes):
        self.data = data
        self._pil: Optional[Image.Image] = None
        self._turbo = False
        if simplejpeg is not None and data[:2] == _JPEG_SOI:
            try:
                h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                pass
            else:
                if colorspace in _TURBO_COLORSPACES and w > 0 and h > 0:
                    _check_pixels(w, h)
                    self.width, self.height, self._turbo = w, h, True
                    return
        self._pil = open_image(data)
        self.width, self.height = self._pil.size

    def decode(self, min_width: int = 0, min_height: int = 0) -> tuple[np.ndarray, float]:
        """RGB uint8 pixels (H, W, 3) and the scale decoded/original.

        With ``min_width``/``min_height`` a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale
        (libjpeg's DCT-domain scaling) that keeps at least that many pixels; other scales are
        slower than a full decode in libjpeg-turbo and are not used.
        """
        f = 1
        if min_width > 0 and min_height > 0:
            ratio = min(self.width // min_width, self.height // min_height)
            f = next((c for c in (8, 4, 2) if ratio >= c), 1)
        if self._turbo:
            try:
                arr = simplejpeg.decode_jpeg(self.data, "RGB", min_width=-(-self.width // f),
                                             min_height=-(-self.height // f))
                exact = arr.shape[1] == -(-self.width // f)
                return arr, (1.0 / f) if exact else arr.shape[1] / self.width
            except ValueError:  # strict decoder refused it: let Pillow decide (it may accept or explain)
                self._pil = open_image(self.data)
        img = self._pil
        assert img is not None
        scale = 1.0
        if f > 1 and img.format == "JPEG":
            res = img.draft("RGB", (-(-self.width // f), -(-self.height // f)))
            if res is not None:
                scale = res[1][2] / self.width  # the original extent in decoded pixels
        img = to_rgb(load_pixels(img))
        arr = np.asarray(img)
        if not arr.flags.writeable:  # torch wants writable memory
            arr = np.array(arr)
        return arr, scale


class ImageCheck(NamedTuple):
    """What ``check_image`` found: ``error`` is None when the image is usable; notes are informational."""

    error: Optional[str]
    notes: list[str]
    size: Optional[tuple[int, int]]
    format: Optional[str]


def check_image(data: bytes, name: str = "") -> ImageCheck:
    """Fully decode one image (not just its header) and describe anything unusual about it.

    Errors (unusable): empty, not an image, truncated, corrupt, decompression bomb.
    Notes (usable, converted to RGB in training): CMYK, grayscale, palette, alpha, 16-bit,
    and a format that disagrees with the file extension (e.g. a PNG named ``.JPEG``).
    """
    try:
        img = open_image(data)
    except ImageDecodeError as e:
        return ImageCheck(str(e), [], None, None)
    fmt, size, mode = img.format, img.size, img.mode
    notes: list[str] = []
    ext = os.path.splitext(name)[1].lower()
    if fmt and ext and ext not in _FORMAT_EXTENSIONS.get(fmt, (ext,)):
        notes.append(f"{fmt} file named {os.path.splitext(name)[1]}")
    if mode != "RGB":
        notes.append(f"{_mode_name(mode)} image, converted to RGB")
    try:
        to_rgb(load_pixels(img))
    except ImageDecodeError as e:
        return ImageCheck(str(e), notes, size, fmt)
    if fmt == "PNG":  # decoders skip the chunk checksums: a flipped byte would decode to other pixels
        error = png_checksum_error(data)
        if error:
            return ImageCheck(error, notes, size, fmt)
    return ImageCheck(None, notes, size, fmt)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_checksum_error(data: bytes) -> str | None:
    """The first PNG chunk whose CRC-32 does not match its bytes (a damaged file), or None."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, view = len(_PNG_SIGNATURE), memoryview(data)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return f"corrupt data: PNG chunk at byte {pos} runs past the end of the file"
        kind = bytes(view[pos + 4 : pos + 8])
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            return f"corrupt data: PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC-32 (a damaged file)"
        if kind == b"IEND":
            break
        pos = end + 4
    return None


def _mode_name(mode: str) -> str:
    return {
        "L": "grayscale",
        "LA": "grayscale+alpha",
        "1": "1-bit",
        "P": "palette",
        "PA": "palette+alpha",
        "CMYK": "CMYK",
        "YCbCr": "YCbCr",
        "RGBA": "RGBA (alpha dropped)",
        "I;16": "16-bit grayscale",
        "I;16B": "16-bit grayscale",
        "I;16L": "16-bit grayscale",
        "I": "32-bit grayscale",
        "F": "float grayscale",
    }.get(mode, f"mode {mode}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _describe_load_error(e: BaseException) -> str:
    msg = str(e)
    if "truncated" in msg or isinstance(e, EOFError):
        return f"truncated file ({msg or 'unexpected end of data'})"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a decompression bomb: {msg}"
    return f"corrupt image data ({_short(e)})"
