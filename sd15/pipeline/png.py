"""PNG output people expect: the A1111 `parameters` text chunk, never a partial or clobbered file.

    save_png(image, Path("out.png"), infotext)            # the CLI: never overwrites
    data = png_bytes(image, infotext)                      # encode once (batch runs hash the bytes) ...
    write_atomically(Path("out.png"), data, replace=True)  # ... and put them in place, replacing a broken file
"""

import io
import os
import re
import secrets
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# `.{stem}.{12 hex digits}.tmp`: what an interrupted write can leave behind (batch runs clean these up)
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The PNG file of `image`, with the A1111 `parameters` text chunk when given. PIL's encoder is
    deterministic: the same pixels and text give the same bytes."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write `image` to `path` atomically; refuse to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    return write_atomically(path, png_bytes(image, parameters))


def write_atomically(path: Path, data: bytes, *, replace: bool = False) -> Path:
    """Put `data` at `path` so that the name only ever holds a complete file.

    The bytes go to a hidden temporary file in the same folder (fsynced), which then takes the final
    name: by a hard link when `replace` is false (the link fails if the name exists, so a concurrent
    writer cannot be clobbered either), by os.replace when it is true; the folder is fsynced after, so
    the name survives a power cut. An interrupted run leaves at most the temporary file behind (its name
    matches TEMP_NAME), never a broken file. The file is created with mode 0666 less the umask, like any
    other tool's output (a temporary-file helper would make it 0600, and the mode survives the link).
    """
    path = Path(path)
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; not overwriting it") from None
    except OSError:          # filesystems without hard links: check-then-rename is the best we can do
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it") from None
        os.replace(tmp, path)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # e.g. Windows cannot open a folder: the rename is as durable as it gets there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_parameters(path: Path) -> str | None:
    """The A1111 infotext a PNG carries, or None."""
    with Image.open(path) as img:
        return img.text.get("parameters")
