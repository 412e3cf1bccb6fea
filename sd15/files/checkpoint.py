"""Turn a community SD 1.x checkpoint into three plain state dicts (UNet, VAE, text encoder).

Everything listed in docs/architecture.md, "Checkpoints in the wild" is handled here, once:
`state_dict` wrappers and Lightning extras, CLIP keys with or without `text_model.`, stray
`position_ids`, `model_ema.*` copies, VAE attention saved as Linear layers, schedule buffers and
`loss.*` leftovers. Other model families are named and refused. Key names *inside* each component
are not checked here: the engine's remap() does that.
"""

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import torch

from .errors import CheckpointError
from .readers import RawCheckpoint, read_checkpoint_file

UNET, VAE, CLIP, EMA = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "model_ema."
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# LatentDiffusion's registered buffers: recomputed by the engine (docs/architecture.md, "Numerics"), never trusted.
SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 lvlb_weights logvar".split())
EMA_SCALARS = frozenset({"model_ema.decay", "model_ema.num_updates"})
LIGHTNING_KEYS = frozenset({"epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states",
                            "lr_schedulers", "loops", "hparams_name", "hyper_parameters", "hparams_type"})

FAMILY_PROBLEMS = {
    "sd2": "is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder / 1024-wide cross-attention); "
           "this engine runs SD 1.x only",
    "sdxl": "is an SDXL checkpoint (conditioner.*, label_emb); this engine runs SD 1.x only",
    "instruct-pix2pix": "is an InstructPix2Pix checkpoint (its UNet takes 8 input channels); not supported",
    "sd1-vae": "is a standalone VAE, not a full model; pass it as the separate VAE together with a full "
               "SD 1.x checkpoint",
    "diffusers": "holds diffusers-format weights (down_blocks/...); this engine loads the original "
                 "single-file checkpoint layout (model.diffusion_model.*, first_stage_model.*, ...)",
    "lora": "is a LoRA (lora_unet_*/lora_te_*), not a full model",
    "textual-inversion": "is a textual-inversion embedding, not a full model",
}


@dataclass
class SD1Checkpoint:
    unet: dict          # keys after 'model.diffusion_model.', e.g. 'input_blocks.0.0.weight'
    vae: dict           # keys after 'first_stage_model.', canonical 1x1-conv mid attention q/k/v/proj_out
    text_encoder: dict  # keys after 'cond_stage_model.transformer.', always 'text_model.*'
    quirks: list        # human-readable notes on what was found and normalised
    has_ema: bool
    format: str = ""         # "safetensors" | "torch-zip" | "torch-legacy"
    ema_parameters: int = 0  # parameters in the file's EMA UNet copy (0 when none)
    metadata: dict = field(default_factory=dict)  # safetensors __metadata__ (strings), empty for pickles


def _is_ignored(key: str) -> bool:
    return key in SCHEDULE_BUFFERS or key in EMA_SCALARS or key.startswith("loss.")


def _sample(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _unwrap(name: str, root: object, quirks: list[str]) -> Mapping[object, object]:
    """Find the flat {name: tensor} level inside (possibly nested) `state_dict` wrappers."""
    if not isinstance(root, Mapping):
        raise CheckpointError(f"{name}: holds a {type(root).__name__}, not a dict of tensors")
    level = root
    for _ in range(4):
        inner = level.get("state_dict")
        if not isinstance(inner, Mapping):
            break
        if not inner:
            quirks.append("dropped an empty nested 'state_dict' entry")
            level = {k: v for k, v in level.items() if k != "state_dict"}
            break
        if any(isinstance(v, torch.Tensor) for v in level.values()):
            raise CheckpointError(f"{name}: has tensors both inside and beside its 'state_dict' entry; "
                                  "cannot tell which are the model")
        extras = sorted(str(k) for k in level if k != "state_dict")  # Lightning's epoch, callbacks, ...
        quirks.append("weights wrapped in 'state_dict'"
                      + (f"; ignored training entries: {', '.join(extras)}" if extras else ""))
        level = inner
    return level


def read_state(path: str | os.PathLike[str]) -> tuple[str, dict[str, object], list[str]]:
    """Read a file and return (format, {key: tensor}, quirks), state_dict wrappers removed."""
    return state_from_raw(read_checkpoint_file(path))


def state_from_raw(raw: RawCheckpoint) -> tuple[str, dict[str, object], list[str]]:
    """read_state for a file already read by read_checkpoint_file."""
    name, quirks = raw.path, []
    level = _unwrap(name, raw.root, quirks)
    state, others, training = {}, [], []
    for k, v in level.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{name}: has a {type(k).__name__} key where tensor names belong")
        if isinstance(v, torch.Tensor):
            state[k] = v
        elif k in LIGHTNING_KEYS:
            training.append(k)
        elif not _is_ignored(k):
            others.append(k)
    if training:
        quirks.append(f"ignored training entries beside the weights: {', '.join(sorted(training))}")
    if not state:
        listing = _sample(f"{k} ({type(level[k]).__name__})" for k in others)
        raise CheckpointError(f"{name}: no tensors found, so not a Stable Diffusion checkpoint"
                              + (f" (entries: {listing})" if others else " (the file is empty)"))
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state.values())
    if set(dtypes) != {"float32"}:
        quirks.append("tensor dtypes: " + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common()))
    state.update({k: level[k] for k in others})  # non-tensors: kept so the callers can name and refuse them
    return raw.format, state, quirks


def _shapes(state: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_family(keys_and_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]) -> str:
    """Name the model family from key names and a few shapes: 'sd1', 'sd1-vae', 'sd2', 'sdxl',
    'sd1-inpainting', 'instruct-pix2pix', 'diffusers', 'lora', 'textual-inversion' or 'unknown'."""
    shapes = dict(keys_and_shapes)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has("conditioner.") or has(UNET + "label_emb."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    unet = {k: s for k, s in shapes.items() if k.startswith(UNET)}
    context = {s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
    if 1024 in context or any(k.endswith(".proj_in.weight") and len(s) == 2 for k, s in unet.items()):
        return "sd2"
    if 2048 in context:
        return "sdxl"
    if unet:  # SD 1.x layout; only the known variants are told apart (tiny test models pass as sd1)
        first = unet.get(UNET + "input_blocks.0.0.weight", ())
        channels = first[1] if len(first) == 4 else None
        return {8: "instruct-pix2pix", 9: "sd1-inpainting"}.get(channels, "sd1")
    if has(CLIP) or has(EMA + "diffusion_model"):
        return "sd1"
    if has("lora_unet_") or has("lora_te") or any(".lora_" in k or "lora_down" in k for k in shapes):
        return "lora"
    if has("string_to_param") or has("emb_params") or (shapes and set(shapes) <= {"clip_l", "clip_g"}):
        return "textual-inversion"
    if has("down_blocks.") or has("encoder.down_blocks.") or has("unet.") or has(VAE + "encoder.down_blocks."):
        return "diffusers"
    bare = [k for k in shapes if not _is_ignored(k)]
    if bare and all(k.startswith(VAE_PARTS) or k.startswith(VAE) for k in bare) and (
            has("encoder.") or has("decoder.") or has(VAE)):
        return "sd1-vae"
    return "unknown"


def _refuse_family(name: str, family: str, state: Mapping[str, object]) -> NoReturn:
    if family == "unknown":
        raise CheckpointError(f"{name}: not a Stable Diffusion 1.x checkpoint: {len(state)} tensors, "
                              f"e.g. {_sample(state, 4)}")
    raise CheckpointError(f"{name}: {FAMILY_PROBLEMS[family]}")


_VAE_ATTN = re.compile(r"((?:encoder|decoder)\.mid\.attn_1)\.(to_q|to_k|to_v|to_out\.0|q|k|v|proj_out)\.(weight|bias)")
_VAE_ATTN_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def canonical_vae(name: str, vae: Mapping[str, torch.Tensor], quirks: list[str]) -> dict[str, torch.Tensor]:
    """Mid-block attention as 1x1 convs named q/k/v/proj_out, whatever layout the file used."""
    out, renamed, reshaped = {}, 0, 0
    for k, t in vae.items():
        m = _VAE_ATTN.fullmatch(k)
        if m:
            renamed += m[2] in _VAE_ATTN_NAMES
            k = f"{m[1]}.{_VAE_ATTN_NAMES.get(m[2], m[2])}.{m[3]}"
            if m[3] == "weight" and t.dim() == 2:
                t, reshaped = t.reshape(*t.shape, 1, 1), reshaped + 1
        if k in out:
            raise CheckpointError(f"{name}: VAE key {k!r} appears twice (in both Linear and conv naming)")
        out[k] = t
    if renamed:
        quirks.append(f"VAE attention saved as Linear to_q/to_k/to_v/to_out.0: renamed {renamed} tensors")
    if reshaped:
        quirks.append(f"VAE attention weights stored 2-D: reshaped {reshaped} to [C, C, 1, 1]")
    return out


def _text_encoder(name: str, clip: Mapping[str, torch.Tensor], quirks: list[str]) -> dict[str, torch.Tensor]:
    out, added = {}, 0
    for k, t in clip.items():
        if k.endswith("embeddings.position_ids"):
            standard = t.numel() == 77 and torch.equal(t.reshape(-1).double(), torch.arange(77.0, dtype=torch.float64))
            quirks.append(f"dropped text position_ids ({str(t.dtype).removeprefix('torch.')}, "
                          f"{'standard 0..76' if standard else 'non-standard values'}); 0..76 is always used")
            continue
        if not k.startswith("text_model."):
            k, added = "text_model." + k, added + 1
        if k in out:
            raise CheckpointError(f"{name}: text encoder key {k!r} appears both with and without 'text_model.'")
        out[k] = t
    if added:
        quirks.append(f"CLIP keys lacked the 'text_model.' level: added to {added} keys")
    return out


def _ema_unet(name: str, unet: dict[str, torch.Tensor], ema_raw: Mapping[str, torch.Tensor], use_ema: bool,
              quirks: list[str]) -> dict[str, torch.Tensor]:
    """Map 'model_ema.diffusion_modelinput_blocks00weight' back to 'input_blocks.0.0.weight'."""
    by_ema_name = {("diffusion_model." + k).replace(".", ""): k for k in unet}
    matched = {by_ema_name[r]: t for r, t in ema_raw.items() if r in by_ema_name}
    if not use_ema:
        quirks.append(f"EMA copy of the UNet present ({len(ema_raw)} tensors): ignored, using the "
                      "non-EMA weights (ema=True uses it)")
        return unet
    if len(by_ema_name) != len(unet) or len(matched) != len(ema_raw) or len(matched) != len(unet):
        raise CheckpointError(f"{name}: its EMA weights do not match its UNet one-to-one ({len(ema_raw)} EMA "
                              f"tensors for {len(unet)} UNet tensors); load it without ema=True")
    quirks.append(f"using the EMA UNet weights ({len(matched)} tensors)")
    return matched


def read_sd1_checkpoint(path: str | os.PathLike[str], *, ema: bool = False,
                        require_vae: bool = True) -> SD1Checkpoint:
    """Read an original-layout SD 1.x checkpoint (.safetensors/.ckpt) into its three components.

    ema=True takes the UNet from the file's `model_ema.*` copy (CheckpointError if it has none).
    require_vae=False accepts a file without first_stage_model.* (the caller supplies a VAE).
    """
    raw = read_checkpoint_file(path)
    fmt, state, quirks = state_from_raw(raw)
    ckpt = split_sd1(str(path), fmt, state, quirks, ema=ema, require_vae=require_vae)
    ckpt.metadata = dict(raw.metadata or {})
    return ckpt


def split_sd1(name: str, fmt: str, state: Mapping[str, object], quirks: list[str], *, ema: bool = False,
              require_vae: bool = True) -> SD1Checkpoint:
    """read_sd1_checkpoint after the file is read: refuse other families, split, normalise."""
    family = detect_family(_shapes(state))
    if family not in ("sd1", "sd1-inpainting"):    # an inpainting UNet is an SD1 UNet with 9 input channels
        _refuse_family(name, family, state)
    parts: dict[str, dict[str, torch.Tensor]] = {UNET: {}, VAE: {}, CLIP: {}, EMA: {}}
    unknown, ignored = [], 0
    for k, t in state.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if _is_ignored(k) or k.startswith(VAE + "loss."):
            ignored += 1
        elif prefix is None:
            unknown.append(k)
        elif not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}: entry {k!r} holds a {type(t).__name__}, not a tensor")
        else:
            parts[prefix][k[len(prefix):]] = t
    if unknown:
        raise CheckpointError(f"{name}: has {len(unknown)} keys that belong to no SD 1.x component: {_sample(unknown)}")
    if ignored:
        quirks.append(f"ignored {ignored} schedule buffers / EMA counters / loss.* leftovers")
    unet, ema_raw = parts[UNET], parts[EMA]
    if not unet:
        raise CheckpointError(f"{name}: has no UNet weights (model.diffusion_model.*)"
                              + (" - only an EMA copy, whose names cannot be mapped without them" if ema_raw else ""))
    if not parts[CLIP]:
        raise CheckpointError(f"{name}: has no text encoder weights (cond_stage_model.transformer.*)")
    if not parts[VAE]:
        if require_vae:
            raise CheckpointError(f"{name}: has no VAE weights (first_stage_model.*); supply a separate VAE file")
        quirks.append("no VAE in the file (a separate VAE is supplied)")
    if ema and not ema_raw:
        raise CheckpointError(f"{name}: ema=True, but the file has no EMA weights (model_ema.*)")
    ema_parameters = sum(t.numel() for t in ema_raw.values())
    if ema_raw:
        unet = _ema_unet(name, unet, ema_raw, ema, quirks)
    return SD1Checkpoint(unet=unet, vae=canonical_vae(name, parts[VAE], quirks),
                         text_encoder=_text_encoder(name, parts[CLIP], quirks), quirks=quirks,
                         has_ema=bool(ema_raw), format=fmt, ema_parameters=ema_parameters)


def read_vae_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A standalone VAE (bare encoder.*/decoder.*/quant_conv.*/post_quant_conv.*, or with the
    'first_stage_model.' prefix, or a full SD checkpoint whose VAE we take) in canonical layout."""
    _, state, quirks = read_state(path)
    return vae_from_state(str(path), state, quirks)


def vae_from_state(name: str, state: Mapping[str, object], quirks: list[str]) -> dict[str, torch.Tensor]:
    """read_vae_file after the file is read."""
    family = detect_family(_shapes(state))
    if family in ("sdxl", "diffusers", "lora", "textual-inversion"):
        _refuse_family(name, family, state)
    if any(k.startswith(VAE) for k in state):
        vae = {k[len(VAE):]: t for k, t in state.items() if k.startswith(VAE) and not k.startswith(VAE + "loss.")}
    else:
        vae = {k: t for k, t in state.items() if k.startswith(VAE_PARTS)}
        rest = [k for k in state if k not in vae and not _is_ignored(k) and not k.startswith(EMA)]
        if not vae and any(k.startswith((UNET, CLIP)) for k in state):
            raise CheckpointError(f"{name}: has no VAE weights (first_stage_model.*)")
        if not vae:
            raise CheckpointError(f"{name}: not a VAE: {len(state)} tensors, none named encoder.*/decoder.*; "
                                  f"e.g. {_sample(state, 4)}")
        if rest:
            raise CheckpointError(f"{name}: VAE file has {len(rest)} keys that belong to no VAE: {_sample(rest)}")
    bad = [k for k, t in vae.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: VAE entries that are not tensors: {_sample(bad)}")
    if not vae:
        raise CheckpointError(f"{name}: has no VAE weights (first_stage_model.*)")
    return canonical_vae(name, vae, quirks)
