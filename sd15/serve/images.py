"""Images over HTTP: base64 in (decoded safely), base64 PNGs with the infotext out, a cheap live preview.

    img = decode_image(payload["init_images"][0], "init_images[0]", max_pixels=4096 * 4096)
    text = encode_png(image, image.info["parameters"])           # raw base64, as A1111 sends it

Decoding never trusts the bytes: the string may be raw base64 or a `data:image/...;base64,` URL (A1111
accepts both); a URL to fetch is refused (A1111's URL loader lets a request make the server fetch any
address: an SSRF hole). Only PNG, JPEG and WebP are opened (Pillow would otherwise try every format it
knows, some through external programs). Pillow reads the header lazily, so the image's size is checked
against the pixel limit before a single pixel is decompressed: a PNG "bomb" (a few KB declaring
30000x30000) is refused by its header.
"""

import base64
import binascii
import io
import re

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def decode_image(text, what: str, max_pixels: int, spend=None) -> Image.Image:
    """A base64 image (raw or data URL) as a loaded PIL image; ValueError naming `what` and the problem.
    `spend(pixels, what)`, when given, is charged the image's size (read from its header) before it is
    decoded: a request's budget over all its images (`Context.spend`)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what}: expected a base64 image (PNG, JPEG or WebP), got {type(text).__name__}")
    text = text.strip()
    if text[:8].lower().startswith(("http://", "https:/", "file:/", "ftp:/")):
        raise ValueError(f"{what}: this server never fetches URLs; send the image itself, base64-encoded")
    if text[:5].lower() == "data:":
        m = DATA_URL.match(text)
        if not m:
            raise ValueError(f"{what}: a data URL must look like data:image/png;base64,...")
        text = text[m.end():]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ValueError(f"{what}: the image declares too many pixels (at most {max_pixels} here)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError(f"{what}: not a PNG, JPEG or WebP image") from None
    width, height = img.size
    if width * height > max_pixels or width <= 0 or height <= 0:
        raise ValueError(f"{what}: {width}x{height} is too large (at most {max_pixels} pixels here)")
    if spend is not None:
        spend(width * height, what)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what}: the image data is broken or truncated ({e})") from None
    return img


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Raw base64 of a PNG carrying `parameters` as its A1111 text chunk (no data: prefix: webuiapi
    decodes the string as is, and a prefix would corrupt the bytes)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return base64.b64encode(out.getvalue()).decode("ascii")


def text_chunks(img: Image.Image) -> dict[str, str]:
    """The string metadata an image carries: PNG text chunks; for JPEG/WebP A1111's EXIF UserComment
    (as "parameters")."""
    items = {k: v for k, v in getattr(img, "text", img.info).items() if isinstance(k, str) and isinstance(v, str)}
    if "parameters" not in items:
        comment = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        if isinstance(comment, bytes) and len(comment) > 8:
            head, body = comment[:8], comment[8:]
            codec = "utf-16-be" if head.startswith(b"UNICODE") else "utf-8"
            items["parameters"] = body.decode(codec, errors="replace").rstrip("\x00")
    return items


def to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> [3,H,W] float32 in [0, 1] (the Python API's tensor convention)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


# A1111's "Approx cheap" live preview (sd_vae_approx.cheap_approximation, SD 1.x): latent channels -> RGB
_CHEAP = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


def latent_preview(latents: torch.Tensor) -> Image.Image | None:
    """A latent-sized RGB picture of [4,h,w] latents, without the VAE; None for other latent shapes."""
    if latents.dim() != 3 or latents.shape[0] != _CHEAP.shape[0]:
        return None
    rgb = torch.einsum("lhw,lr->hwr", latents.float().cpu(), _CHEAP)
    pixels = ((rgb / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels)
