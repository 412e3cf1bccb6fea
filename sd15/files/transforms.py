"""Named one-line tensor transforms for keys whose layout differs between the file and the engine.

Each has an inverse so tools can write original-layout files from engine weights.
"""

import torch

FORWARD = {
    "conv1x1_to_linear": lambda w: w.reshape(w.shape[0], w.shape[1]),   # [O,I,1,1] -> [O,I]
}
INVERSE = {
    "conv1x1_to_linear": lambda w: w.reshape(w.shape[0], w.shape[1], 1, 1),
}


def apply(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return FORWARD[name](tensor)


def invert(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return INVERSE[name](tensor)
