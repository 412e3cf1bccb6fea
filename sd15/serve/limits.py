"""What one request may ask of the server; checked before anything is decoded or queued.

The request validation (`sd15.pipeline.validation`) already bounds sides (8192), batches (64) and steps
(1000); these are the server's own, tighter where a stranger could otherwise tie up the machine or its
memory with one request.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 50 * 1024 * 1024      # the JSON body (base64 images included)
    max_queue: int = 16                         # jobs waiting behind the running one; more get 503
    max_images: int = 64                        # batch_size x n_iter of one request
    max_pixels: int = 2048 * 2048               # width x height generated (the hires target included)
    max_image_pixels: int = 4096 * 4096         # an uploaded image, read from its header before decoding
    # all the images of one request together (init images, mask, control images): 64 plain-colour 4096²
    # PNGs fit in a 3 MB body and would decode to 3.2 GB
    max_request_pixels: int = 4 * 4096 * 4096
    max_init_images: int = 64
    max_prompt_chars: int = 20_000              # per prompt: ~4000 tokens, 50+ CLIP chunks already

    def __post_init__(self):
        for name in ("max_body_bytes", "max_images", "max_pixels", "max_image_pixels", "max_request_pixels",
                     "max_init_images",
                     "max_prompt_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {self.max_queue!r}")
