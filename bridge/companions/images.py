"""Images from clients, checked and decoded in the server before any reaches llama.cpp.

ST's Caption extension sends a `data:image/...;base64,...` URL in an OpenAI `image_url` part; KoboldCpp's
API takes bare base64 strings in `images`. Each is decoded here with Pillow (Python exceptions, a pixel
limit checked from the header before any pixel is decoded) into RGB pixels, scaled down to at most
MAX_SIDE on its longer side (as ST does for KoboldCpp), so the worker never parses a file format and a
bad image is a 400 that says why: not base64 or cut short, not an image, too large, truncated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..engine.types import MEDIA_MARKER, ImageInput
from ..errors import BadRequest

MAX_SIDE = 2048  # longer side after scaling down; projectors resize to a few hundred pixels anyway
MAX_PIXELS = 50_000_000  # larger images are refused from their header (a decompression bomb, or a scan)
MAX_IMAGES = 8
DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*(?P<b64>;base64)?,", re.I)


def from_data_url(url: Any, where: str = "image_url") -> ImageInput:
    """A `data:` URL with base64 data, as ST sends; remote URLs are refused (the bridge fetches nothing)."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where} needs a data: URL holding the image")
    match = DATA_URL.match(url)
    if match is None:
        kind = "a remote URL" if url.lower().startswith(("http:", "https:")) else "not a data: URL"
        raise BadRequest(f"{where} is {kind}: send the image inline as data:image/png;base64,... "
                         "(the bridge fetches nothing from the network)")
    if not match.group("b64"):
        raise BadRequest(f"{where} is a data: URL without ;base64: send the image base64-encoded")
    return from_base64(url[match.end():], where)


def from_base64(data: Any, where: str = "image") -> ImageInput:
    if not isinstance(data, str) or not data.strip():
        raise BadRequest(f"{where} is empty: send the image as base64")
    if data.startswith("data:"):
        return from_data_url(data, where)
    compact = re.sub(r"\s+", "", data)
    if bad := re.search(r"[^A-Za-z0-9+/=]", compact):
        raise BadRequest(f"{where}: the data is not base64 (it holds {bad.group()!r} at {bad.start()})")
    if len(compact) % 4:
        raise BadRequest(f"{where}: the base64 data is cut short ({len(compact)} characters, not a whole "
                         "number of 4-character groups)")
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: the data is not base64 ({exc})") from exc
    return decode(raw, where)


def decode(raw: bytes, where: str = "image") -> ImageInput:
    """RGB pixels of an encoded image (PNG, JPEG, WEBP, GIF, BMP ...), scaled to at most MAX_SIDE."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        limit = f"the largest accepted is {MAX_PIXELS / 1e6:.0f} MP"
        raise BadRequest(f"{where} is too large: {limit} ({exc})") from exc
    except UnidentifiedImageError:
        raise BadRequest(f"{where} is not an image the bridge can read ({_sniff(raw)}); send PNG, JPEG, "
                         "WEBP, GIF or BMP") from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{where} could not be read: {exc}") from exc
    width, height = image.size
    if width * height > MAX_PIXELS or width <= 0 or height <= 0:
        raise BadRequest(f"{where} is {width}x{height} pixels ({width * height / 1e6:.0f} MP): the largest "
                         f"accepted is {MAX_PIXELS / 1e6:.0f} MP; scale it down first")
    try:
        image.load()
        rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"{where} is damaged or truncated ({image.format} data ends early: {exc})") from exc
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    pixels = rgb.tobytes()
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + pixels).hexdigest()
    return ImageInput(width=rgb.width, height=rgb.height, rgb=pixels, digest=digest)


def _sniff(raw: bytes) -> str:
    if not raw:
        return "no bytes"
    head = raw[:64]
    if head.lstrip().startswith((b"<", b"{", b"[")) or all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return "it looks like text"
    return f"{len(raw)} bytes of an unknown format"


# --- messages with images --------------------------------------------------------------------------------


def split_chat(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[ImageInput]]:
    """OpenAI chat messages whose content may be a list of parts, as plain-text messages for the model's
    template, each image replaced by the media marker where it stood, and the images in order."""
    images: list[ImageInput] = []
    plain = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message = message | {"content": _flatten(content, images)}
        plain.append(message)
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"{len(images)} images in one request; at most {MAX_IMAGES} are accepted")
    return plain, images


def _flatten(parts: list[Any], images: list[ImageInput]) -> str:
    text = []
    for part in parts:
        if not isinstance(part, dict):
            raise BadRequest("each part of a message's content is an object with a `type`")
        kind = part.get("type")
        if kind == "text":
            text.append(str(part.get("text") or ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(from_data_url(url, f"image {len(images) + 1}"))
            text.append(MEDIA_MARKER)
        else:
            raise BadRequest(f"content parts of type {kind!r} are not supported: send text and image_url "
                             "parts")
    return "\n".join(text)


def kobold_prompt(prompt: str, images: Any) -> tuple[str, list[ImageInput]]:
    """KoboldCpp's `images` (bare base64 strings): placed before the prompt, one marker each."""
    if images is None or images == []:
        return prompt, []
    if not isinstance(images, list) or len(images) > MAX_IMAGES:
        raise BadRequest(f"`images` is a list of at most {MAX_IMAGES} base64 strings")
    decoded = [from_base64(item, f"image {i + 1}") for i, item in enumerate(images)]
    return "".join(f"{MEDIA_MARKER}\n" for _ in decoded) + prompt, decoded
