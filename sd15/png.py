"""PNG output people expect: the A1111 `parameters` text chunk, never a partial or clobbered file."""

import json
import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def _quote(value) -> str:
    # A1111 JSON-quotes values that would break its "Key: value, Key: value" line.
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict) -> str:
    """The text A1111, ComfyUI, civitai and friends read back: prompt, negative prompt, `Key: value` line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write `image` to `path` atomically; refuse to overwrite an existing file.

    The bytes go to a hidden temporary file in the same folder, which is then hard-linked to the final
    name (link fails if the name exists, so a concurrent writer cannot be clobbered either) and removed.
    An interrupted run leaves at most the temporary file's name behind, never a broken PNG.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; not overwriting it") from None
        except OSError:          # filesystems without hard links: check-then-rename is the best we can do
            if path.exists():
                raise FileExistsError(f"{path} already exists; not overwriting it") from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_parameters(path: Path) -> str | None:
    with Image.open(path) as img:
        return img.text.get("parameters")
