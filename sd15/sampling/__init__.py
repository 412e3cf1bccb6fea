"""Sampling: the noise schedule, the sampler table, the denoiser seam, noise sources and guidance.

Pure math over tensors: the UNet arrives as a callable; from the models only its timestep convention
(`models.unet.batch_timesteps`) is used.
"""

from .denoiser import Denoiser, EpsModel, ModelCall, predicted_x0
from .guidance import guided
from .noise import GeneratorNoise, NoiseSource
from .plan import Plan, denoise, hires_schedule, kept_steps, make_plan, noised, sample, start_latents
from .registry import SAMPLERS, Option, SamplerSpec, resolve_sampler, resolve_schedule_type
from .schedule import ScheduleConfig
from .schedule_types import SCHEDULE_TYPES, ScheduleType

__all__ = ["Denoiser", "EpsModel", "ModelCall", "predicted_x0", "guided", "GeneratorNoise", "NoiseSource", "Plan",
           "denoise", "hires_schedule", "kept_steps", "make_plan", "noised", "sample", "start_latents", "SAMPLERS", "Option",
           "SamplerSpec", "resolve_sampler", "resolve_schedule_type", "ScheduleConfig", "SCHEDULE_TYPES",
           "ScheduleType"]
