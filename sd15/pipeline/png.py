"""PNG output people expect: the A1111 `parameters` text chunk, never a partial or clobbered file."""

import os
import secrets
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write `image` to `path` atomically; refuse to overwrite an existing file.

    The bytes go to a hidden temporary file in the same folder, which is then hard-linked to the final
    name (link fails if the name exists, so a concurrent writer cannot be clobbered either) and removed.
    An interrupted run leaves at most the temporary file's name behind, never a broken PNG. The file is
    created with mode 0666 less the umask, like any other tool's output (a temporary-file helper would
    make it 0600, and the mode survives the link).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    """The A1111 infotext a PNG carries, or None."""
    with Image.open(path) as img:
        return img.text.get("parameters")
