"""The one error type for every checkpoint file we cannot or will not load."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, unsafe, or not a Stable Diffusion 1.x model.

    The message always names the file and what was wrong with it, so it can be shown to a user as is.
    """
