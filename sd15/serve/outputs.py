"""save_images: where a request's images are written when the client asks and the server allows it.

    folder = OutputFolder(Path("outputs"))        # --outputs; without it, save_images is ignored
    folder.save(image)                            # outputs/00012-1234.png, with the infotext chunk

Names are the server's (a counter and the seed), never the client's, so nothing a request says can put
a file anywhere else; files are written with sd15's PNG writer (atomic, never overwriting).
"""

import re
import threading
from pathlib import Path

from PIL import Image

from ..pipeline.png import save_png


class OutputFolder:
    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        taken = [int(m[1]) for p in self.folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
        self._next = max(taken, default=-1) + 1

    def save(self, image: Image.Image) -> Path:
        seed = image.info.get("seed")
        with self._lock:
            while True:
                path = self.folder / f"{self._next:05d}-{int(seed) if seed is not None else 'x'}.png"
                self._next += 1
                if not path.exists():
                    break
            return save_png(image, path, image.info.get("parameters"))
