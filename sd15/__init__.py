"""sd15: a Stable Diffusion 1.x inference engine written by hand in PyTorch.

    import sd15
    pipe = sd15.load("v1-5-pruned-emaonly.safetensors")
    image = pipe.txt2img("a lighthouse at dusk, oil painting", seed=42)[0]
    image = pipe.generate(sd15.Request("a lighthouse at dusk", steps=30, seed=42))[0]

Importing sd15 is cheap and changes nothing in the process: torch and the models load on first use of
a name below. Process-wide settings (huge pages) are an explicit call: see `sd15.process`.
The package's layout and the rule its imports follow: docs/architecture.md.
"""

import importlib as _importlib

# public name -> the module that defines it
_EXPORTS = {
    "load": "sd15.pipeline.loading", "Pipeline": "sd15.pipeline.pipeline",
    "Request": "sd15.pipeline.request", "ModelInfo": "sd15.pipeline.request", "FromInfotext": "sd15.pipeline.request",
    "DEFAULT_SAMPLER": "sd15.pipeline.request", "DEFAULT_STEPS": "sd15.pipeline.request",
    "DEFAULT_GUIDANCE": "sd15.pipeline.request", "ImageError": "sd15.pipeline.images",
    "CheckpointError": "sd15.files.errors", "Configs": "sd15.models.loading", "UNetConfig": "sd15.models.config",
    "VAEConfig": "sd15.models.config", "TextEncoderConfig": "sd15.models.config",
    "SAMPLERS": "sd15.sampling.registry", "resolve_sampler": "sd15.sampling.registry",
    "SCHEDULE_TYPES": "sd15.sampling.schedule_types", "Hires": "sd15.pipeline.hires",
    "Inpaint": "sd15.pipeline.masks", "Control": "sd15.pipeline.control",
    "load_controlnet": "sd15.pipeline.control", "ControlNetFile": "sd15.pipeline.control",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sd15' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value          # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if not n.startswith("_")} | set(__all__))
