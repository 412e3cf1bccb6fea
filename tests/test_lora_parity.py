"""LoRA / LyCORIS parity: `sd15.adapters` against diffusers + peft, lycoris-lora's functional API and
formulas written here (docs: the reference sheet's sections 10 and 11.3).

Every adapter file is random and written to disk in the format under test. Its key names are derived
independently of sd15's key map: from the module tree of the reference models (diffusers'
UNet2DConditionModel, transformers' CLIPTextModel) as kohya's sd-scripts names them (children of
Transformer2DModel for LoRA; ResnetBlock2D convs, time_emb_proj, conv_shortcut and the down/upsamplers
for LoCon; q/k/v/out_proj/fc1/fc2 of the text encoder), and for the LDM-named form from the original
checkpoint's own keys through diffusers' converter (tensors matched by identity). Our side reads the
files as users do: `sd15.load(ckpt, lora_dirs=[...])` with `<lora:stem:te:unet>` tags or
`Request(loras=[(path, te, unet)])`, or `read_adapter` + `merged` / `on_the_fly`.

  1. diffusers + peft (`load_lora_weights`, then `set_adapters(..., adapter_weights=[{"unet": u,
     "text_encoder": t}])` or `fuse_lora(lora_scale=m)`), tiny reference pipeline: kohya LoRA (UNet +
     TE), LoCon, no alpha with mixed ranks and 2-D factors on the 1x1 proj convs, partial alphas, two
     LoRAs with separate and negative strengths, the PEFT format, the old attention-processor format, the
     LDM-named form; both sd15 lora modes. Compared: text-encoder states, one UNet call, txt2img latents
     per step, decoded images and pixels (test_pipeline_parity's metrics). Once at full SD1.5 size: all
     192 UNet + 72 TE kohya modules plus LoCon on every resnet and sampler, per component.
  2. LoHa, LoKr (full, decomposed, both decomposed, Tucker), LoCon Tucker and DoRA, which diffusers cannot
     load: merged weights against lycoris.functional (`loha/lokr/locon.diff_weight`) or A1111's DoRA
     written here, and one UNet output against diffusers' UNet holding those weights.
  3. Merge round trip: bit-exact originals afterwards (fp32, fp16, bf16), one rounding of W + sum m*dW.
  4. Hostile and mismatched files.   5. `python -m sd15.inspect` on a LoRA.

Measured on the test CPU (torch 2.13, diffusers 0.42.1, peft 0.21.2, lycoris-lora 4.1.3, one intra-op
thread for the tiny cases; ~30 s for the file, ~60 s under load); `pytest -s` prints each case's figures.
rel err = max|ours - ref| / max|ref|:
  - tiny, per component, 9 cases x 2 modes: TE states <= 8.3e-7, one UNet call <= 2.0e-6;
  - tiny txt2img (64x64, DPM++ 2M Karras, 4 steps, CFG 7.5): latents <= 5.1e-6, decoded <= 5.0e-6, pixels
    max diff <= 1, >= 99.95 % identical, PSNR >= 81 dB (the LDM-named case bit-identical pixels);
  - full size: TE merged 1.2e-6, TE on the fly 1.0e-6, UNet on the fly 1.8e-6;
  - LyCORIS kinds and DoRA: merged weights bit-identical to lycoris / the formulas (LoCon Tucker 1.2e-7),
    UNet output <= 1.8e-6 in both modes, TE <= 2.9e-7.
Bounds: per component and txt2img 1e-5 (test_pipeline_parity's), merged weights 1e-6; the round trip and
the one-rounding merge exact.

Engine bugs this file found and that are now fixed (each test below fails on the old code): LoKr on a 3x3
conv in LyCORIS' non-Tucker layout and every Tucker LoKr were refused; a shape mismatch did not name the
module (merge) or was a bare torch RuntimeError from inside the UNet (on the fly); GLoRA was refused under
the wrong name.
diffusers pitfalls met (worked around, see the `loras` fixture): per-module alphas that differ on attention
modules get mis-spelled peft alpha_pattern keys and are silently ignored.
"""

import copy
import gc
import hashlib
import logging
import math
import os
import pickle
import re
import runpy
import struct
import sys
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextModel
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import (FULL, TINY, clip_text_config, diffusers_unet_config, engine_models, pixel_stats,
                       reference_models, reference_scheduler, rel_err)
from sd15.adapters import Loras, Use, merged, on_the_fly, read_adapter
from sd15.adapters.names import module_index
from sd15.models.latents import LATENT_SCALE
from tools.make_checkpoint import read_key_table

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

COMPONENT_TOL = 1e-5        # text states and one UNet call
LATENT_TOL = 1e-5           # txt2img latents per step and decoded images (test_pipeline_parity's)
WEIGHT_TOL = 1e-6           # merged weights against lycoris / the formulas (float32)
PIXEL_MAX_DIFF, PIXEL_IDENTICAL, PIXEL_PSNR = 1, 0.995, 60.0
MIN_EFFECT = 0.02           # a LoRA must change what it touches by more than this (rel), or the test proves nothing

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, low quality"
MODES = ["merge", "on_the_fly"]
UNET, TEXT = "unet", "text_encoder"


# =====================================================================================================
# 0. Random adapters named from the reference models' module trees
# =====================================================================================================

def lora_targets(unet: nn.Module, text_encoder: nn.Module, locon: bool = False) -> dict[tuple[str, str], nn.Module]:
    """{(component, path): module} that kohya's sd-scripts (networks/lora.py) wraps, read off diffusers'
    UNet and transformers' CLIPTextModel: Linear/Conv2d children of Transformer2DModel; with `locon`
    also ResnetBlock2D's conv1, conv2, time_emb_proj, conv_shortcut and the samplers' conv; the text
    encoder's CLIPAttention / CLIPMLP Linears. TE paths are spelled from `text_model.` on, as the files
    spell them (transformers >= 5.6 flattened CLIPTextModel)."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            kids = {c: m for c, m in module.named_modules() if c and isinstance(m, (nn.Linear, nn.Conv2d))}
        elif locon and isinstance(module, ResnetBlock2D):
            kids = {c: getattr(module, c) for c in ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
                    if getattr(module, c, None) is not None}
        elif locon and isinstance(module, (Downsample2D, Upsample2D)):
            kids = {"conv": module.conv}
        else:
            continue
        out.update({(UNET, f"{name}.{c}"): m for c, m in kids.items()})
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    for name, module in text_encoder.named_modules():
        if type(module).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
            out.update({(TEXT, f"{prefix}{name}.{c}"): m for c, m in module.named_children()
                        if isinstance(m, nn.Linear)})
    return out


def reference_module(unet, text_encoder, component, path):
    if component == UNET:
        return unet.get_submodule(path)
    return text_encoder.get_submodule(path if hasattr(text_encoder, "text_model") else path.removeprefix("text_model."))


@dataclass(frozen=True)
class LoraModule:
    """One module of a random LoRA / LoCon, in kohya's factor layout."""
    component: str
    path: str                   # diffusers / transformers module path
    down: torch.Tensor          # [r, in] Linear; [r, in, 1, 1] 1x1 conv; [r, in, k, k] LoCon
    up: torch.Tensor            # [out, r] or [out, r, 1, 1]
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank        # section 10.3: no alpha = scale 1

    def delta(self, shape) -> torch.Tensor:
        """scale * dW (section 10.3: U @ D reshaped), float32."""
        return (self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.rank, -1)).reshape(shape) * self.scale


def random_lora(targets, seed: int, rank_alpha, magnitude: float = 0.5) -> list[LoraModule]:
    """Factors sized so scale*dW is a sizeable fraction of W (W ~ 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for i, ((component, path), module) in enumerate(sorted(targets.items())):
        rank, alpha = rank_alpha(i, path, module)
        out_ch, in_ch, *kernel = module.weight.shape
        down = torch.randn(rank, in_ch, *kernel, generator=gen) / math.sqrt(in_ch * math.prod(kernel))
        up = torch.randn(out_ch, rank, *[1] * len(kernel), generator=gen) * magnitude / math.sqrt(rank)
        mods.append(LoraModule(component, path, down, up, alpha))
    return mods


def kohya_name(component: str, path: str) -> str:
    return ("lora_te_" if component == TEXT else "lora_unet_") + path.replace(".", "_")


def kohya_dict(mods, ldm_names: dict[str, str] | None = None, flat_1x1: bool = False,
               bake_scale: bool = False) -> dict[str, torch.Tensor]:
    """kohya / A1111 keys. ldm_names: diffusers path -> LDM path (the LDM-named form); flat_1x1: 2-D
    factors on 1x1 convs (A1111 reshapes them); bake_scale: scale * up and no alpha (scale 1), the same
    dW spelled without per-module alphas."""
    out = {}
    for m in mods:
        path = ldm_names[m.path] if ldm_names is not None and m.component == UNET else m.path
        name = kohya_name(m.component, path)
        down, up = m.down, m.up * m.scale if bake_scale else m.up
        if flat_1x1 and down.dim() == 4 and down.shape[-1] == 1:
            down, up = down.flatten(1), up.flatten(1)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        if m.alpha is not None and not bake_scale:
            out[f"{name}.alpha"] = torch.tensor(float(m.alpha))
    return out


def peft_dict(mods) -> dict[str, torch.Tensor]:
    """diffusers / PEFT keys: `unet.<path>.lora_A.weight` (down), `.lora_B.weight` (up); no alpha (= r)."""
    assert all(m.alpha is None for m in mods)
    return {f"{m.component}.{m.path}.lora_{ab}.weight": t.contiguous()
            for m in mods for ab, t in (("A", m.down), ("B", m.up))}


def attn_procs_dict(mods) -> dict[str, torch.Tensor]:
    """diffusers' old attention-processor format: `unet.<attn>.processor.to_q_lora.down.weight`."""
    out = {}
    for m in mods:
        block, proj = m.path.rsplit(".to_", 1)
        proj = "to_" + proj.removesuffix(".0")
        out[f"unet.{block}.processor.{proj}_lora.down.weight"] = m.down.contiguous()
        out[f"unet.{block}.processor.{proj}_lora.up.weight"] = m.up.contiguous()
    return out


def ldm_module_names(state_dict: dict, unet_cfg) -> dict[str, str]:
    """diffusers UNet module path -> original (LDM) module path: diffusers' own converter run on the
    checkpoint, each converted tensor traced back to its original key by identity."""
    converted = convert_ldm_unet_checkpoint(state_dict, diffusers_unet_config(unet_cfg))
    prefix = "model.diffusion_model."
    original = {t.data_ptr(): k[len(prefix):] for k, t in state_dict.items() if k.startswith(prefix)}
    return {k.removesuffix(".weight"): original[t.data_ptr()].removesuffix(".weight")
            for k, t in converted.items() if k.endswith(".weight")}


KOHYA_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                  "ss_base_model_version": "sd_v1", "ss_output_name": "plain", "ss_clip_skip": "2",
                  "ss_network_args": '{"conv_dim": "2", "conv_alpha": "1"}',
                  "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "modelspec.architecture":
                  "stable-diffusion-v1/lora"}


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def addnet_hash(path) -> str:
    """A1111's "Lora hashes" value for a .safetensors: sha256 of the bytes after the header, 12 hex digits."""
    data = open(path, "rb").read()
    return hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]


def is_3x3(module) -> bool:
    return module.weight.dim() == 4 and module.weight.shape[-1] > 1


@dataclass(frozen=True)
class LoraFile:
    path: object
    mods: list
    diffusers: dict             # what diffusers' load_lora_weights gets for the same LoRA


@pytest.fixture(scope="module")
def loras(tiny_models, tiny_state_dict, tmp_path_factory) -> dict[str, LoraFile]:
    """The tiny cases' files, in one LoRA folder; names derived from the pristine reference models."""
    folder = tmp_path_factory.mktemp("loras")
    ref = tiny_models[0]
    plain = lora_targets(ref.unet, ref.text_encoder)
    locon = lora_targets(ref.unet, ref.text_encoder, locon=True)
    attn = {k: m for k, m in plain.items() if re.search(r"\.attn[12]\.to_(q|k|v|out\.0)$", k[1])}
    ldm = ldm_module_names(tiny_state_dict, TINY.unet)
    conv_rank = lambda i, p, m: (2, 1.0) if is_3x3(m) else (4, 4.0)             # noqa: E731 (conv_dim/alpha)
    mods = {
        "plain": random_lora(plain, 1, lambda i, p, m: (4, 2.0)),
        "locon": random_lora(locon, 2, conv_rank),
        "mixed": random_lora(plain, 3, lambda i, p, m: (1 + i % 6, None)),        # no alpha anywhere, ranks 1..6
        "partial": random_lora(plain, 4, lambda i, p, m: (4, 1.0) if i % 3 else (8, None)),
        "ldm": random_lora(locon, 5, conv_rank),
        "peft": random_lora(plain, 6, lambda i, p, m: (4, None)),
        "procs": random_lora(attn, 7, lambda i, p, m: (4, None)),
    }
    assert len(mods["procs"]) == 4 * 2 * 7 and len(mods["plain"]) == 12 * 7 + 6 * 2
    files = {
        # stem: (the file sd15 reads, what diffusers loads)
        "plain": (kohya_dict(mods["plain"]), kohya_dict(mods["plain"])),
        "locon": (kohya_dict(mods["locon"]), kohya_dict(mods["locon"])),
        # 2-D factors on the 1x1 proj_in/proj_out: A1111 and sd15 reshape them, PEFT rejects them ("size
        # mismatch for ...proj_in.lora_A.a.weight: copying a param with shape [4, 32] ... [4, 32, 1, 1]"):
        # diffusers gets the 4-D spelling.
        "mixed": (kohya_dict(mods["mixed"], flat_1x1=True), kohya_dict(mods["mixed"])),
        # Partial alphas: diffusers gives the alpha-less modules the most common alpha (get_peft_kwargs),
        # A1111 scale 1 (section 11.3). Writing alpha = rank for those does not help: where attention
        # modules' alphas differ from the most common one, diffusers 0.42.1 spells peft's alpha_pattern keys
        # wrongly ("...attn1.processor.to_out_lora.down.weight", "text_model.encoder.layers.0.self_attn";
        # peft warns they "did not match any targeted module" and uses the default alpha; UNet rel err 0.13 to
        # 0.25 measured). So diffusers gets each module's A1111 scale baked into lora_up and no alpha at all
        # (then alpha = r everywhere, as in the no-alpha case): the same dW, no alpha_pattern needed.
        "partial": (kohya_dict(mods["partial"]), kohya_dict(mods["partial"], bake_scale=True)),
        # LDM-named keys: diffusers maps them only with unet_config and then mis-maps the up_blocks.0
        # upsampler (it assumes SDXL's block layout, section 11.3): diffusers gets the same tensors under
        # their diffusers names instead, so sd15's LDM naming is held to diffusers' diffusers naming.
        "ldm": (kohya_dict(mods["ldm"], ldm_names=ldm), kohya_dict(mods["ldm"])),
        "peft": (peft_dict(mods["peft"]), peft_dict(mods["peft"])),
        "procs": (attn_procs_dict(mods["procs"]), attn_procs_dict(mods["procs"])),
    }
    out = {}
    for stem, (ours, theirs) in files.items():
        metadata = KOHYA_METADATA if stem == "locon" else None
        out[stem] = LoraFile(write(folder / f"{stem}.safetensors", ours, metadata), mods[stem], theirs)
    assert any(k.startswith("lora_unet_output_blocks_1_1_conv") for k in files["ldm"][0])   # up_blocks.0's upsampler
    return out


@pytest.fixture(scope="module")
def ours(tiny_ckpt_file, loras):
    return sd15.load(tiny_ckpt_file, device="cpu", lora_dirs=[loras["plain"].path.parent])


@pytest.fixture(scope="module")
def tokenizer(reference_tokenizer_files):
    return ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77)


# =====================================================================================================
# 1. Against diffusers + peft
# =====================================================================================================

@dataclass(frozen=True)
class Case:
    loras: tuple                # ((stem, te, unet), ...)
    via: str = "tag"            # how sd15 is told: "tag" (<lora:stem:te:unet> in the prompt) or "request"
    diffusers: str = "set_adapters"     # or "fuse": fuse_lora(lora_scale=m), one m for both parts


CASES = {
    "lora-unet-te": Case((("plain", 0.8, 0.8),)),
    "lora-fused": Case((("plain", 0.7, 0.7),), via="request", diffusers="fuse"),
    "locon": Case((("locon", 1.0, 0.9),)),
    "no-alpha-mixed-ranks-2d-1x1": Case((("mixed", 1.0, 1.0),), via="request"),
    "partial-alpha": Case((("partial", 0.6, 0.6),)),
    "two-loras-te-unet-negative": Case((("plain", 0.5, 1.2), ("locon", -0.7, -0.4))),
    "peft-format": Case((("peft", 0.9, 1.1),), via="request"),
    "attn-procs-format": Case((("procs", 1.0, 0.75),)),
    "ldm-named": Case((("ldm", 1.0, 1.0),)),
}


def tags(case: Case) -> str:
    return "".join(f" <lora:{stem}:{te:g}:{unet:g}>" for stem, te, unet in case.loras)


def request_loras(case: Case, loras):
    return [(str(loras[stem].path), te, unet) for stem, te, unet in case.loras] if case.via == "request" else []


def diffusers_pipe(tiny_models, tokenizer, case: Case, loras, sampler="dpmpp_2m_karras"):
    """diffusers' txt2img pipeline over a private copy of the tiny reference models, the case's LoRAs
    loaded through peft and weighted as the case says."""
    ref = copy.deepcopy(tiny_models[0])
    pipe = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=tokenizer, unet=ref.unet,
                                   scheduler=reference_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for stem, _, _ in case.loras:
        pipe.load_lora_weights({k: v.clone() for k, v in loras[stem].diffusers.items()}, adapter_name=stem)
    if case.diffusers == "fuse":
        (stem, te, unet), = case.loras
        assert te == unet
        pipe.fuse_lora(lora_scale=te)
    else:
        # diffusers' per-component weights are a dict; A1111's tag order is te then unet (section 10.8)
        pipe.set_adapters([stem for stem, _, _ in case.loras],
                          adapter_weights=[{"unet": unet, "text_encoder": te} for _, te, unet in case.loras])
    return pipe


def token_ids(tokenizer, text=PROMPT):
    return tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids


def unet_inputs(context_dim, batch=2, size=8, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=gen), 601,
            torch.randn(batch, 77, context_dim, generator=gen))


@pytest.fixture(scope="module")
def reference_runs(tiny_models, tokenizer, loras):
    """Per case, diffusers' outputs (computed once, shared by both sd15 modes)."""
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name]
            pipe = diffusers_pipe(tiny_models, tokenizer, case, loras)
            x, t, context = unet_inputs(TINY.unet.context_dim)
            with torch.inference_mode():
                te = pipe.text_encoder(token_ids(tokenizer)).last_hidden_state
                unet = pipe.unet(x, t, encoder_hidden_states=context).sample
            latents = []

            def on_step_end(_pipe, _i, _t, tensors):
                latents.append(tensors["latents"].clone())
                return {}

            images = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                          width=64, height=64, generator=torch.Generator().manual_seed(1234),
                          callback_on_step_end=on_step_end, output_type="pil").images
            cache[name] = dict(te=te, unet=unet, latents=latents, images=images, vae=pipe.vae)
        return cache[name]
    return get


def uses_of(case: Case, loras, index):
    return [Use(read_adapter(loras[stem].path, index), te, unet) for stem, te, unet in case.loras]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_components_match_diffusers(ours, loras, tokenizer, reference_runs, name, mode):
    """Text-encoder states and one UNet call with the case's LoRAs applied, sd15 (either mode) vs peft."""
    case, ref = CASES[name], reference_runs(name)
    uses = uses_of(case, loras, module_index(ours.unet.cfg, ours.text_encoder.cfg))
    assert all(not u.adapter.unmatched for u in uses)
    ids = token_ids(tokenizer)
    x, t, context = unet_inputs(TINY.unet.context_dim)
    apply = merged if mode == "merge" else on_the_fly
    with torch.inference_mode():
        base_te, base_unet = ours.text_encoder(ids), ours.unet(x, t, context)
        with apply(ours.text_encoder, ours.unet, uses):
            te, unet = ours.text_encoder(ids), ours.unet(x, t, context)
    te_err, unet_err = rel_err(te, ref["te"]), rel_err(unet, ref["unet"])
    print(f"{name} [{mode}]: TE {te_err:.1e}, UNet {unet_err:.1e}")
    assert unet_err <= COMPONENT_TOL and te_err <= COMPONENT_TOL
    assert rel_err(base_unet, ref["unet"]) > MIN_EFFECT
    if any(m.component == TEXT for stem, _, _ in case.loras for m in loras[stem].mods):
        assert rel_err(base_te, ref["te"]) > MIN_EFFECT
    else:
        assert torch.equal(te, base_te)         # a UNet-only file leaves the text encoder alone


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_txt2img_matches_diffusers(ours, loras, reference_runs, name, mode):
    """The whole pipeline: sd15's generate with the LoRAs from tags or the request, vs diffusers' txt2img."""
    case, ref = CASES[name], reference_runs(name)
    prompt = PROMPT + (tags(case) if case.via == "tag" else "")
    latents = []
    ours.lora_mode = mode
    try:
        images = ours.generate(sd15.Request(prompt, negative_prompt=NEGATIVE, loras=request_loras(case, loras),
                                            sampler="dpmpp_2m_karras", seed=1234, steps=4, guidance_scale=7.5,
                                            width=64, height=64),
                               progress=lambda i, n, x: latents.append(x.clone()))
    finally:
        ours.lora_mode = "merge"
    assert len(latents) == len(ref["latents"]) == 4
    errors = [rel_err(a, b) for a, b in zip(latents, ref["latents"])]
    with torch.inference_mode():
        decoded = rel_err(ours.decode(latents[-1]), ref["vae"].decode(ref["latents"][-1] / LATENT_SCALE).sample)
    identical, max_diff, psnr = pixel_stats(images, ref["images"])
    print(f"{name} [{mode}]: latents {max(errors):.1e}, decoded {decoded:.1e}, identical {identical:.5f}, "
          f"max diff {max_diff}, PSNR {psnr:.1f} dB")
    assert max(errors) <= LATENT_TOL and decoded <= LATENT_TOL
    assert max_diff <= PIXEL_MAX_DIFF and identical >= PIXEL_IDENTICAL and psnr >= PIXEL_PSNR
    info = images[0].info["parameters"]
    for stem, _, _ in case.loras:
        assert f"{stem}: {addnet_hash(loras[stem].path)}" in info, info       # A1111's "Lora hashes"


def fast_full_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """SD1.5's 1,130 tensors (tools.make_checkpoint's key table), random as sd15.models.demo.random_tensor
    draws them, filled in place (twice as fast as random_full_state_dict; the values differ)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in read_key_table().items():
        t = torch.empty(shape)
        if len(shape) >= 2:
            t.normal_(0, 1 / math.sqrt(math.prod(shape[1:])), generator=gen)
        elif "norm" in key and key.endswith("weight"):
            t.normal_(1, 0.1, generator=gen)
        else:
            t.normal_(0, 0.05, generator=gen)
        out[key] = t
    return out


def test_full_size_all_kohya_modules_match_diffusers(tmp_path, tokenizer):
    """Full SD1.5 size (random weights): a kohya LoRA on all 192 UNet attention modules and 72 TE modules,
    plus LoCon on every resnet conv / time_emb_proj / conv_shortcut and every sampler. Every module maps
    (none unmatched; exactly the reference's modules are touched), and the TE states and one UNet call
    match diffusers + peft.

    Per component rather than a whole txt2img, and the UNet on the fly only: merging this file into the
    full UNet took 22 s on the test CPU and the first UNet pass over the new weights 13 s, which the file's
    time budget does not hold; the mapping is the same in both modes (apply.targets), the merge arithmetic
    is held to diffusers by every tiny case, and the TE is checked merged and on the fly here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    sd = fast_full_state_dict()
    ref, engine = reference_models(sd, FULL), engine_models(sd, FULL)
    del sd
    try:
        attention = lora_targets(ref.unet, ref.text_encoder)
        targets = lora_targets(ref.unet, ref.text_encoder, locon=True)
        assert sum(c == UNET for c, _ in attention) == 192 and sum(c == TEXT for c, _ in attention) == 72
        # One alpha per kind of module: per-module alphas trip diffusers' alpha_pattern (see "partial" above)
        mods = random_lora(targets, 11, lambda i, p, m: (2, 1.0) if is_3x3(m) else (4, 2.0))
        path = write(tmp_path / "full.safetensors", kohya_dict(mods))
        adapter = read_adapter(path, module_index(FULL.unet, FULL.text_encoder))
        # LoCon: 22 resnets x (conv1, conv2, time_emb_proj), 14 conv_shortcuts, 6 samplers
        assert adapter.unmatched == () and len(adapter.modules) == len(targets) == 192 + 72 + 86
        touched = {(engine.unet if c == UNET else engine.text_encoder).get_submodule(p).weight.data_ptr()
                   for c, p in adapter.modules}
        assert touched == {m.weight.data_ptr() for m in targets.values()}      # the very tensors diffusers holds

        pipe = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=tokenizer, unet=ref.unet,
                                       scheduler=reference_scheduler("euler"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.load_lora_weights(kohya_dict(mods), adapter_name="full")
        pipe.set_adapters(["full"], adapter_weights=[{"unet": 0.6, "text_encoder": 0.8}])
        uses = [Use(adapter, te=0.8, unet=0.6)]
        text_part = replace(adapter, modules={k: f for k, f in adapter.modules.items() if k[0] == TEXT})
        text_only = [Use(text_part, te=0.8, unet=0.6)]
        ids = token_ids(tokenizer)
        x, t, context = unet_inputs(FULL.unet.context_dim, batch=1)
        with torch.inference_mode():
            ref_te, ref_unet = pipe.text_encoder(ids).last_hidden_state, pipe.unet(x, t, context).sample
            base_te = engine.text_encoder(ids)
            with merged(engine.text_encoder, engine.unet, text_only):
                te = engine.text_encoder(ids)
            with on_the_fly(engine.text_encoder, engine.unet, uses):
                te_fly, unet_fly = engine.text_encoder(ids), engine.unet(x, t, context)
        errors = dict(te=rel_err(te, ref_te), te_on_the_fly=rel_err(te_fly, ref_te),
                      unet_on_the_fly=rel_err(unet_fly, ref_unet))
        print("full size: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        assert max(errors.values()) <= COMPONENT_TOL
        assert rel_err(base_te, ref_te) > MIN_EFFECT
    finally:
        del ref, engine
        gc.collect()
        torch.set_num_threads(threads)


# =====================================================================================================
# 2. LyCORIS kinds diffusers cannot load: lycoris.functional and A1111's DoRA
# =====================================================================================================

@pytest.fixture(scope="module")
def twins(tiny_state_dict):
    """Reference and engine models sharing one private copy of the tiny tensors, and a way to find our
    module for a reference module through the weight tensor they share (no sd15 mapping involved)."""
    sd = {k: v.clone() for k, v in tiny_state_dict.items()}
    ref, ours_ = reference_models(sd, TINY), engine_models(sd, TINY)
    by_tensor = {m.weight.data_ptr(): m for model in (ours_.unet, ours_.text_encoder) for m in model.modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor)}

    def ours_of(component, path):
        return by_tensor[reference_module(ref.unet, ref.text_encoder, component, path).weight.data_ptr()]
    return ref, ours_, ours_of


SPOTS = {   # where each kind is put: a Linear, a TE Linear, a 1x1 conv, 3x3 convs (resnet, upsampler)
    "linear": (UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),             # 32 x 32
    "ff": (UNET, "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"),               # 512 x 64
    "te": (TEXT, "text_model.encoder.layers.1.mlp.fc1"),                                       # 128 x 32
    "conv1x1": (UNET, "mid_block.attentions.0.proj_in"),                                       # 64 x 64 x 1 x 1
    "conv3x3": (UNET, "down_blocks.1.resnets.0.conv1"),                                        # 64 x 32 x 3 x 3
    "upsampler": (UNET, "up_blocks.0.upsamplers.0.conv"),                                      # 64 x 64 x 3 x 3
}


def _g(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


def kron_split(n: int) -> tuple[int, int]:
    """LyCORIS' factorization(n) for the shapes here: the factor pair closest to sqrt(n)."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def loha(shape, gen, tucker=False):
    out_ch, in_ch, *k = shape
    r, alpha = 3, 1.5
    s = (0.3 / math.prod(shape[1:])) ** 0.25
    if tucker:      # hada_w1_a [r, out], hada_w1_b [r, in], hada_t1 [r, r, kh, kw]
        f = {"hada_w1_a": _g(gen, r, out_ch, std=s), "hada_w1_b": _g(gen, r, in_ch, std=s),
             "hada_t1": _g(gen, r, r, *k, std=1 / r), "hada_w2_a": _g(gen, r, out_ch, std=s),
             "hada_w2_b": _g(gen, r, in_ch, std=s), "hada_t2": _g(gen, r, r, *k, std=1 / r)}
        t1, t2 = f["hada_t1"], f["hada_t2"]
    else:           # hada_w1_a [out, r], hada_w1_b [r, in*kh*kw]
        f = {"hada_w1_a": _g(gen, out_ch, r, std=s), "hada_w1_b": _g(gen, r, math.prod(shape[1:]), std=s),
             "hada_w2_a": _g(gen, out_ch, r, std=s), "hada_w2_b": _g(gen, r, math.prod(shape[1:]), std=s)}
        t1 = t2 = None
    f["alpha"] = torch.tensor(alpha)
    delta = ly_loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], t1, t2,
                                gamma=alpha / r, backend="torch")
    return f, delta.reshape(shape)


def lokr(shape, gen, w1="full", w2="full", alpha=2.0):
    """LyCORIS' file layouts (modules/lokr.py): w1 [a, c] or w1_a [a, r] @ w1_b [r, c]; w2 [b, d(, k, k)],
    or w2_a [b, r] @ w2_b [r, d*k*k], or Tucker t2 [r, r, k, k], w2_a [r, b], w2_b [r, d]."""
    out_ch, in_ch, *k = shape
    (a, b), (c, d) = kron_split(out_ch), kron_split(in_ch)
    r = 2
    f = {"alpha": torch.tensor(alpha)}
    if w1 == "full":
        f["lokr_w1"] = _g(gen, a, c)
    else:
        f["lokr_w1_a"], f["lokr_w1_b"] = _g(gen, a, r, std=r ** -0.5), _g(gen, r, c)
    s = 0.5 / math.sqrt(d * math.prod(k))
    if w2 == "full":
        f["lokr_w2"] = _g(gen, b, d, *k, std=s)
    elif w2 == "tucker":
        f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"] = _g(gen, r, r, *k, std=1 / r), _g(gen, r, b), _g(gen, r, d, std=s)
    else:
        f["lokr_w2_a"], f["lokr_w2_b"] = _g(gen, b, r, std=r ** -0.5), _g(gen, r, d * math.prod(k), std=s)
    args = [f.get(n) for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
    # lycoris' quirk (section 11.3): lokr.diff_weight takes alpha as gamma and divides by the rank itself,
    # reading the rank as w1_a.shape[1], else w2_a.shape[1] (= b, not r, for Tucker's [r, b] w2_a), else gamma
    # (both full: scale 1). For Tucker the gamma that makes its scale alpha / r is alpha * b / r.
    gamma = alpha * b / r if w2 == "tucker" and w1 == "full" else alpha
    delta = ly_lokr.diff_weight(*args, gamma=gamma, backend="torch")
    return f, delta.reshape(shape)


def locon_tucker(shape, gen):
    """LoCon with lora_mid: down [r, in, 1, 1], mid [r, r, k, k], up [out, r, 1, 1]; scale alpha / r."""
    out_ch, in_ch, *k = shape
    r, alpha = 3, 2.0
    f = {"lora_down.weight": _g(gen, r, in_ch, 1, 1, std=in_ch ** -0.5),
         "lora_mid.weight": _g(gen, r, r, *k, std=1 / (r * math.prod(k)) ** 0.5),
         "lora_up.weight": _g(gen, out_ch, r, 1, 1, std=0.5 / r ** 0.5), "alpha": torch.tensor(alpha)}
    delta = ly_locon.diff_weight(f["lora_down.weight"], f["lora_up.weight"], f["lora_mid.weight"],
                                 gamma=alpha / r, backend="torch")
    return f, delta.reshape(shape)


def plain_lora(shape, gen):
    out_ch, in_ch, *k = shape
    r, alpha = 4, 2.0
    f = {"lora_down.weight": _g(gen, r, in_ch, *k, std=math.prod(shape[1:]) ** -0.5),
         "lora_up.weight": _g(gen, out_ch, r, *[1] * len(k), std=0.5 / r ** 0.5), "alpha": torch.tensor(alpha)}
    delta = ly_locon.diff_weight(f["lora_down.weight"], f["lora_up.weight"], None, gamma=alpha / r, backend="torch")
    return f, delta.reshape(shape)


KINDS = {   # name -> (factors builder, spots)
    "loha": (loha, ["linear", "te", "conv1x1", "conv3x3"]),
    "loha-tucker": (lambda s, g: loha(s, g, tucker=True), ["conv3x3", "upsampler"]),
    "lokr-both-full-alpha-ignored": (lambda s, g: lokr(s, g, alpha=7.0), ["linear", "te", "conv1x1", "conv3x3"]),
    "lokr-w2-decomposed": (lambda s, g: lokr(s, g, w2="lora"), ["linear", "ff", "te", "conv1x1"]),
    "lokr-both-decomposed": (lambda s, g: lokr(s, g, w1="lora", w2="lora"), ["ff", "te"]),
    "lokr-tucker": (lambda s, g: lokr(s, g, w2="tucker"), ["conv3x3", "upsampler"]),
    "locon-tucker": (locon_tucker, ["conv3x3", "upsampler"]),
    "lora-1x1-and-3x3": (plain_lora, ["conv1x1", "conv3x3", "linear"]),
}
KINDS["lokr-w2-decomposed-conv3x3"] = (lambda s, g: lokr(s, g, w2="lora"), ["conv3x3", "upsampler"])


def write_kind(folder, name, builder, spots, ref, seed):
    """A kohya-named file putting one kind on the given spots; returns (path, {spot: reference dW})."""
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for spot in spots:
        component, path = SPOTS[spot]
        shape = reference_module(ref.unet, ref.text_encoder, component, path).weight.shape
        factors, deltas[spot] = builder(shape, gen)
        tensors.update({f"{kohya_name(component, path)}.{part}": t.contiguous() for part, t in factors.items()})
    return write(folder / f"{name}.safetensors", tensors), deltas


def check_kind(twins, tmp_path, name, builder, spots, strengths=(0.7, 1.3)):
    ref, ours_, ours_of = twins
    te_m, unet_m = strengths
    path, deltas = write_kind(tmp_path, name, builder, spots, ref, seed=len(name))
    adapter = read_adapter(path, module_index(TINY.unet, TINY.text_encoder))
    assert len(adapter.modules) == len(spots) and not adapter.unmatched
    uses = [Use(adapter, te=te_m, unet=unet_m)]
    expected = {}
    for spot in spots:
        component, p = SPOTS[spot]
        w = reference_module(ref.unet, ref.text_encoder, component, p).weight
        expected[spot] = w + (te_m if component == TEXT else unet_m) * deltas[spot]
    x, t, context = unet_inputs(TINY.unet.context_dim)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    with torch.inference_mode():
        base = ours_.unet(x, t, context)
        with merged(ours_.text_encoder, ours_.unet, uses):
            weight_errs = {s: rel_err(ours_of(*SPOTS[s]).weight, expected[s]) for s in spots}
            unet_merged, te_merged = ours_.unet(x, t, context), ours_.text_encoder(ids)
        with on_the_fly(ours_.text_encoder, ours_.unet, uses):
            unet_fly, te_fly = ours_.unet(x, t, context), ours_.text_encoder(ids)
        originals = {}
        try:        # diffusers' UNet / transformers' TE holding the expected weights
            for spot in spots:
                module = reference_module(ref.unet, ref.text_encoder, *SPOTS[spot])
                originals[spot] = module.weight
                module.weight = nn.Parameter(expected[spot], requires_grad=False)
            ref_unet, ref_te = ref.unet(x, t, context).sample, ref.text_encoder(ids).last_hidden_state
        finally:
            for spot, w in originals.items():
                reference_module(ref.unet, ref.text_encoder, *SPOTS[spot]).weight = w
    errors = dict(weights=max(weight_errs.values()), unet=rel_err(unet_merged, ref_unet),
                  unet_on_the_fly=rel_err(unet_fly, ref_unet), te=rel_err(te_merged, ref_te),
                  te_on_the_fly=rel_err(te_fly, ref_te))
    print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors["weights"] <= WEIGHT_TOL, weight_errs
    assert max(v for k, v in errors.items() if k != "weights") <= COMPONENT_TOL
    for spot in spots:          # each change is sizeable
        w = reference_module(ref.unet, ref.text_encoder, *SPOTS[spot]).weight
        assert rel_err(expected[spot], w) > MIN_EFFECT
    if any(SPOTS[s][0] == UNET for s in spots):
        assert rel_err(base, ref_unet) > MIN_EFFECT / 10


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(KINDS))
def test_lycoris_kind_matches_lycoris_functional(twins, tmp_path, name):
    builder, spots = KINDS[name]
    check_kind(twins, tmp_path, name, builder, spots)


def test_lokr_both_full_ignores_alpha(twins, tmp_path):
    """Section 10.6: with both factors full the scale is 1 whatever alpha says (7 here, rank unknowable)."""
    ref, ours_, ours_of = twins
    shape = ref.unet.get_submodule(SPOTS["linear"][1]).weight.shape
    gen = torch.Generator().manual_seed(5)
    w1, w2 = _g(gen, 4, 4), _g(gen, 8, 8, std=0.1)
    tensors = {f"{kohya_name(*SPOTS['linear'])}.{k}": v for k, v in
               {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}.items()}
    adapter = read_adapter(write(tmp_path / "lokrfull.safetensors", tensors),
                           module_index(TINY.unet, TINY.text_encoder))
    w = ours_of(*SPOTS["linear"]).weight
    with torch.inference_mode(), merged(ours_.text_encoder, ours_.unet, [Use(adapter, 1.0, 1.0)]):
        assert rel_err(ours_of(*SPOTS["linear"]).weight, w + torch.kron(w1, w2).reshape(shape)) <= WEIGHT_TOL


def a1111_dora(weight, delta, dora_scale, m):
    """A1111's DoRA (network.NetworkModule.apply_weight_decompose; section 10.7), written here:
    Wc = W + delta; n = ||Wc|| per input column; W' = W + m * (Wc * dora_scale / n - W)."""
    wc = weight + delta
    n = wc.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return weight + m * (wc * (dora_scale.reshape(shape) / n.reshape(shape)) - weight)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_dora_per_input_matches_a1111(twins, tmp_path, kind):
    """dora_scale [1, in] / [1, in, 1, 1] (A1111's per-input convention) on a LoRA or LoHa, strength 0.6
    on the UNet and 1.4 on the TE (A1111's multiplier acts outside the normalisation)."""
    ref, ours_, ours_of = twins
    spots = ["linear", "te", "conv3x3"]
    gen = torch.Generator().manual_seed(21)
    tensors, expected = {}, {}
    for spot in spots:
        component, path = SPOTS[spot]
        w = reference_module(ref.unet, ref.text_encoder, component, path).weight
        factors, delta = (plain_lora if kind == "lora" else loha)(w.shape, gen)
        column_norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        dora = (column_norm * (1 + 0.2 * torch.randn(w.shape[1], generator=gen))).reshape(1, -1, *[1] * (w.dim() - 2))
        factors["dora_scale"] = dora
        tensors.update({f"{kohya_name(component, path)}.{p}": t.contiguous() for p, t in factors.items()})
        expected[spot] = a1111_dora(w, delta, dora, 1.4 if component == TEXT else 0.6)
    adapter = read_adapter(write(tmp_path / f"dora{kind}.safetensors", tensors),
                           module_index(TINY.unet, TINY.text_encoder))
    assert any("DoRA" in k for k in adapter.kinds)
    x, t, context = unet_inputs(TINY.unet.context_dim)
    uses = [Use(adapter, te=1.4, unet=0.6)]
    with torch.inference_mode():
        with merged(ours_.text_encoder, ours_.unet, uses):
            errs = {s: rel_err(ours_of(*SPOTS[s]).weight, expected[s]) for s in spots}
            unet_merged = ours_.unet(x, t, context)
        with on_the_fly(ours_.text_encoder, ours_.unet, uses):
            unet_fly = ours_.unet(x, t, context)
        originals = {}
        try:
            for spot in spots:
                module = reference_module(ref.unet, ref.text_encoder, *SPOTS[spot])
                originals[spot] = module.weight
                module.weight = nn.Parameter(expected[spot], requires_grad=False)
            ref_unet = ref.unet(x, t, context).sample
        finally:
            for spot, w in originals.items():
                reference_module(ref.unet, ref.text_encoder, *SPOTS[spot]).weight = w
    print(f"dora {kind}: weights {max(errs.values()):.1e}, unet {rel_err(unet_merged, ref_unet):.1e}, "
          f"on the fly {rel_err(unet_fly, ref_unet):.1e}")
    assert max(errs.values()) <= WEIGHT_TOL, errs
    assert rel_err(unet_merged, ref_unet) <= COMPONENT_TOL and rel_err(unet_fly, ref_unet) <= COMPONENT_TOL


def test_dora_per_output_is_refused(twins, tmp_path, ours):
    """LyCORIS' wd_on_out / PEFT convention (dora_scale [out, 1]): refused with a ValueError naming it."""
    ref, ours_, _ = twins
    component, path = SPOTS["ff"]
    w = ref.unet.get_submodule(path).weight
    factors, _ = plain_lora(w.shape, torch.Generator().manual_seed(2))
    factors["dora_scale"] = w.norm(dim=1, keepdim=True)             # [out, 1]: one magnitude per output row
    file = write(tmp_path / "doraout.safetensors",
                 {f"{kohya_name(component, path)}.{p}": t.contiguous() for p, t in factors.items()})
    adapter = read_adapter(file, module_index(TINY.unet, TINY.text_encoder))
    for apply in (merged, on_the_fly):
        with pytest.raises(ValueError, match="output channel") as info:
            with torch.inference_mode(), apply(ours_.text_encoder, ours_.unet, [Use(adapter)]):
                pass
        assert "wd_on_out" in str(info.value) or "PEFT" in str(info.value)
    with pytest.raises(ValueError, match="output channel"):
        ours.generate(sd15.Request(PROMPT, loras=[(str(file), 1.0)], steps=1, width=64, height=64, seed=1))


# =====================================================================================================
# 3. Merge round trip: the originals come back bit for bit; one rounding of W + sum m*dW
# =====================================================================================================

def snapshot(pipe):
    return {f"{part}.{n}": (p, p.detach().clone()) for part in ("text_encoder", "unet")
            for n, p in getattr(pipe, part).named_parameters()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_merge_round_trip_is_bit_exact(tiny_ckpt_file, tiny_models, loras, dtype):
    pipe = sd15.load(tiny_ckpt_file, device="cpu", dtype=dtype, lora_dirs=[loras["plain"].path.parent])
    ref = tiny_models[0]
    # our module for each LoRA module: the one holding the same values (found by value, not sd15's names)
    ours_mods = [m for model in (pipe.unet, pipe.text_encoder) for m in model.modules()
                 if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2]
    mods = {}
    for stem, te, unet in (("plain", 0.8, 1.1), ("locon", -0.5, 0.6)):
        for lm in loras[stem].mods:
            w = reference_module(ref.unet, ref.text_encoder, lm.component, lm.path).weight
            match = [m for m in ours_mods if m.weight.shape == w.shape and torch.equal(m.weight, w.to(dtype))]
            assert len(match) == 1
            mods.setdefault(match[0], []).append((lm, te if lm.component == TEXT else unet))

    def run(prompt, seen=None):
        latents = []

        def progress(i, n, x):
            latents.append(x.clone())
            if seen is not None and i == 1:          # inside the generation: the merged weights
                seen.update({m: m.weight.detach().clone() for m in mods})
        request = sd15.Request(prompt, negative_prompt=NEGATIVE, seed=77, steps=3, width=64, height=64,
                               sampler="euler_a")
        return pipe.generate(request, progress=progress), latents

    before = snapshot(pipe)
    first, first_latents = run(PROMPT)
    seen = {}
    second, _ = run(PROMPT + " <lora:plain:0.8:1.1> <lora:locon:-0.5:0.6>", seen)
    third, third_latents = run(PROMPT)

    assert np.asarray(third[0]).tobytes() == np.asarray(first[0]).tobytes()
    assert torch.equal(bits(third_latents[-1]), bits(first_latents[-1]))
    assert np.asarray(second[0]).tobytes() != np.asarray(first[0]).tobytes()
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for name, (p, copy_) in before.items():
        q = after[name][0]
        assert q is p, f"{name}: a different tensor object after the merge"
        assert q.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        assert torch.equal(bits(q), bits(copy_)), f"{name}: bytes changed"

    # one rounding: (W.float() + sum m*dW).to(dtype), the deltas summed in float32, in tag order
    assert len(seen) == len(mods)
    two_roundings_differ = 0
    for module, changes in mods.items():
        before_weight, = [copy_ for p, copy_ in before.values() if p is module.weight]
        w32 = before_weight.float()
        twice = before_weight
        for lm, m in changes:
            d = lm.delta(w32.shape)
            w32 = w32 + m * d
            twice = (twice.float() + (m * d).to(dtype).float()).to(dtype)
        assert seen[module].dtype == dtype
        assert torch.equal(bits(seen[module]), bits(w32.to(dtype))), "not W + sum m*dW rounded once"
        two_roundings_differ += int((twice != w32.to(dtype)).sum())
    if dtype != torch.float32:
        assert two_roundings_differ > 0         # the check above can tell one rounding from two


# =====================================================================================================
# 4. Hostile and mismatched files
# =====================================================================================================

class RunsCommand:
    """Unpickling this runs a shell command (what a malicious LoRA .pt does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _pair(name, down_in=32, out=32, r=4):
    gen = torch.Generator().manual_seed(len(name) + down_in + out)
    return {f"{name}.lora_down.weight": torch.randn(r, down_in, generator=gen) / down_in ** 0.5,
            f"{name}.lora_up.weight": torch.randn(out, r, generator=gen) / r ** 0.5}


@pytest.fixture
def fresh(ours, tmp_path):
    """A pipeline over the same models with tmp_path as its LoRA folder."""
    return sd15.Pipeline(tokenizer=ours.tokenizer, text_encoder=ours.text_encoder, unet=ours.unet, vae=ours.vae,
                         device=ours.device, dtype=ours.dtype, loras=Loras([tmp_path]))


def quick(prompt, **kwargs):
    return sd15.Request(prompt, steps=1, width=64, height=64, seed=1, sampler="euler", **kwargs)


@pytest.mark.parametrize("how", ["request", "tag"])
def test_pickle_lora_payload_is_refused(fresh, tmp_path, how):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({f"{Q}.lora_down.weight": RunsCommand(f"touch '{marker}'"),
                f"{Q}.lora_up.weight": torch.zeros(32, 4)}, path)
    with pytest.raises(sd15.CheckpointError) as info:
        fresh.generate(quick(PROMPT + " <lora:evil:1>") if how == "tag" else quick(PROMPT, loras=[(str(path), 1)]))
    assert "evil.pt" in str(info.value) and "system" in str(info.value), str(info.value)
    assert not marker.exists(), "the pickle's payload ran"
    (tmp_path / "bare.pt").write_bytes(pickle.dumps({"x": RunsCommand(f"touch '{marker}'")}, protocol=2))
    with pytest.raises(sd15.CheckpointError):
        fresh.generate(quick(PROMPT + " <lora:bare:1>"))
    assert not marker.exists()


FAMILY = {  # name -> (tensors, metadata, words)
    "sdxl-te2-keys": ({**_pair(Q), **_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", 1280, 5120)}, None,
                      ("SDXL",)),
    "sdxl-metadata": (_pair(Q), {"ss_base_model_version": "sdxl_base_v1-0"}, ("SDXL",)),
    "sd2-1024-context": (_pair(K2, down_in=1024), None, ("SD 2.x",)),
    "sd2-metadata": (_pair(Q), {"ss_v2": "True"}, ("SD 2.x",)),
}


@pytest.mark.parametrize("case", list(FAMILY))
def test_other_family_lora_is_refused(fresh, tmp_path, case):
    tensors, metadata, words = FAMILY[case]
    write(tmp_path / "other.safetensors", tensors, metadata)
    with pytest.raises(sd15.CheckpointError) as info:
        fresh.generate(quick(PROMPT + " <lora:other:1>"))
    assert all(w in str(info.value) for w in words), str(info.value)


def test_lora_matching_no_module_is_refused(fresh, tmp_path):
    write(tmp_path / "nothing.safetensors", {**_pair("lora_unet_down_blocks_9_attentions_0_proj_in"),
                                             **_pair("lora_unet_foo_bar")})
    with pytest.raises(sd15.CheckpointError, match="none of its 2 modules"):
        fresh.generate(quick(PROMPT + " <lora:nothing:1>"))


@pytest.mark.usefixtures("one_thread")
def test_lora_with_a_few_stray_modules_warns_and_applies_the_rest(fresh, loras, tmp_path, caplog):
    strays = ["lora_unet_down_blocks_9_attentions_0_proj_in", "lora_te_text_model_encoder_layers_11_mlp_fc1",
              "lora_unet_foo_bar"]
    good = kohya_dict(loras["plain"].mods)
    write(tmp_path / "good.safetensors", good)
    write(tmp_path / "stray.safetensors", {**good, **{k: v for s in strays for k, v in _pair(s).items()}})
    outputs = {}
    for stem in ("good", "stray"):
        latents = []
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sd15"):
            fresh.generate(quick(PROMPT + f" <lora:{stem}:0.9>"), progress=lambda i, n, x: latents.append(x))
        outputs[stem] = (latents[-1], caplog.text)
    assert "match none" not in outputs["good"][1]
    warning = outputs["stray"][1]
    assert "3 of its modules" in warning and all(s in warning for s in strays), warning
    assert torch.equal(outputs["stray"][0], outputs["good"][0])      # the rest applied, exactly as without strays


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["linear", "conv"])
def test_shape_mismatch_names_module_and_shapes(fresh, tmp_path, mode, where):
    """A ValueError before any step, naming the module (the file's or our spelling) and both shapes."""
    if where == "linear":        # to_q is [32, 32]; the file's down reads 48 inputs
        name, tensors, shapes = Q, _pair(Q, down_in=48), ["(32, 32)", "48"]
    else:                        # proj_in is [32, 32, 1, 1]; the file's up writes 48 outputs
        name = "lora_unet_down_blocks_0_attentions_0_proj_in"
        tensors, shapes = _pair(name, out=48), ["(32, 32, 1, 1)", "48"]
    path = write(tmp_path / "wrongshape.safetensors", tensors)
    (ours_path,) = [p for _, p in read_adapter(path, module_index(TINY.unet, TINY.text_encoder)).modules]
    fresh.lora_mode = mode
    steps = []
    with pytest.raises(ValueError) as info:
        fresh.generate(quick(PROMPT + " <lora:wrongshape:1>"), progress=lambda i, n, x: steps.append(i))
    message = str(info.value)
    assert not steps
    assert any(n in message for n in (name, name.removeprefix("lora_unet_"), ours_path)), f"no module: {message}"
    assert all(s in message for s in shapes), f"shapes not named: {message}"


@pytest.mark.parametrize("part,kind", [("oft_blocks", "OFT"), ("oft_diag", "OFT"),
                                       ("a1.weight", "GLoRA"), ("b2.weight", "GLoRA")])
def test_unsupported_adapter_kind_is_named(fresh, tmp_path, part, kind):
    write(tmp_path / "odd.safetensors", {f"{Q}.{part}": torch.zeros(4, 8, 8), f"{Q}.alpha": torch.tensor(1.0)})
    with pytest.raises(sd15.CheckpointError) as info:
        fresh.generate(quick(PROMPT + " <lora:odd:1>"))
    assert kind in str(info.value) and f"{Q}.{part}" in str(info.value), str(info.value)


# =====================================================================================================
# 5. The inspector
# =====================================================================================================

def test_inspect_prints_kind_ranks_alphas_counts_hash_metadata(tmp_path, capsys, monkeypatch):
    """`python -m sd15.inspect FILE` (run as __main__) on a real-shaped SD1.5 LoRA + LoCon with kohya
    metadata; module names from diffusers' full-size UNet and CLIPTextModel built on the meta device."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(FULL.unet))
        text_encoder = CLIPTextModel(clip_text_config(FULL.text_encoder))
    targets = lora_targets(unet, text_encoder, locon=True)        # meta weights: shapes only
    mods = random_lora(targets, 4, lambda i, p, m: (2, 1.0) if is_3x3(m) else (4, 2.0))
    path = write(tmp_path / "inspectme.safetensors", kohya_dict(mods), KOHYA_METADATA)
    monkeypatch.setattr(sys, "argv", ["sd15.inspect", str(path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("sd15.inspect", run_name="__main__")
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    print(out)
    unet_count = sum(c == UNET for c, _ in targets)
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert lines["base model"] == "SD 1.x"
    assert "LoRA" in lines["kind"] and "LoCon" in lines["kind"]
    assert lines["modules"].startswith(f"{unet_count} UNet, 72 text encoder") and "unmatched" not in lines["modules"]
    assert lines["ranks"] == "2, 4" and lines["alphas"] == "1, 2"
    assert lines["lora hash"].startswith(addnet_hash(path))
    for key, value in KOHYA_METADATA.items():
        if key.startswith("ss_"):
            assert lines[key] == value

