"""A1111's `/sdapi/v1/options`: the few settings sd15 applies, and the model checkpoint.

    opts = Options()
    opts.as_dict(models)          # GET: {"sd_model_checkpoint": "name [hash10]", "CLIP_stop_at_last_layers": 1, ...}
    opts.update(body)             # POST: the keys sd15 uses are checked and set (the model: the caller's)

Clients post back what they read (Open WebUI posts the whole dict with one key changed), so keys sd15
does not use are accepted and ignored, as the issue asks. The values sd15 does use are checked before
any is set: a bad value leaves every setting as it was.
"""

import threading
from dataclasses import dataclass, field

from ..pipeline.validation import check_clip_skip

# What GET returns besides sd15's own settings: read by clients (samples_format by webuiapi users, sd_vae
# by SillyTavern); POSTing them changes nothing.
FIXED = {"samples_format": "png", "sd_vae": "Automatic", "live_previews_enable": True,
         "show_progress_type": "Approx cheap", "enable_pnginfo": True}


@dataclass
class Options:
    clip_skip: int = 1                 # A1111's CLIP_stop_at_last_layers
    noise_seed_delta: int = 0          # A1111's eta_noise_seed_delta (ENSD)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self, models) -> dict:
        entry = models.current_entry
        return {"sd_model_checkpoint": models.title(entry), "sd_checkpoint_hash": models.hashes.get(entry.path),
                "CLIP_stop_at_last_layers": self.clip_skip, "eta_noise_seed_delta": self.noise_seed_delta, **FIXED}

    def update(self, values: dict) -> None:
        """Set the settings sd15 uses from `values` (sd_model_checkpoint is the caller's: it switches
        models through the job queue). ValueError for a bad value, and nothing is set."""
        clip_skip = values.get("CLIP_stop_at_last_layers", self.clip_skip)
        check_clip_skip(clip_skip)
        ensd = values.get("eta_noise_seed_delta", self.noise_seed_delta)
        if not isinstance(ensd, int) or isinstance(ensd, bool) or not 0 <= ensd < 2**32:
            raise ValueError(f"eta_noise_seed_delta must be an integer in [0, 2**32), got {ensd!r}")
        with self._lock:
            self.clip_skip, self.noise_seed_delta = clip_skip, ensd
