"""Adapter file key -> (component, our module): the LoRA naming schemes, mapped through the key map.

A LoRA names the original modules it changes, in one of several spellings:

    lora_unet_input_blocks_1_1_proj_in            kohya / A1111, original (LDM) names, dots as "_"
    lora_unet_down_blocks_0_attentions_0_proj_in  kohya / A1111, diffusers names, dots as "_" (most files)
    lora_te_text_model_encoder_layers_0_mlp_fc1   kohya text encoder (also lora_te1_: SDXL-style prefix)
    unet.down_blocks.0.attentions.0.proj_in       diffusers / PEFT (then .lora_A.weight, .lora_B.weight)
    text_encoder.text_model.encoder.layers.0...   diffusers / PEFT text encoder
    unet....attn1.processor.to_q_lora             diffusers' old attention-processor format

Every spelling is brought to the LDM module name with underscores, and that is looked up in an index
built from `models.keymap`: the same table the checkpoint loader uses, so a LoRA reaches exactly the
modules a checkpoint fills. The one extra piece is diffusers' block numbering (`down_blocks_i_resnets_j`),
turned into the LDM one by the rules below; the text encoder's names are the same in both worlds.
"""

import re
from dataclasses import dataclass
from functools import cache

from ..models.config import TextEncoderConfig, UNetConfig
from ..models.keymap import text_key_map, unet_key_map

UNET, TEXT = "unet", "text_encoder"

# diffusers' ResnetBlock2D leaves -> the LDM ResBlock's
_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


@dataclass(frozen=True)
class ModuleIndex:
    """LDM module name with "_" for "." -> (component, our module path), for one pair of configs."""
    modules: dict[str, tuple[str, str]]
    unet: UNetConfig

    def find(self, underscored: str) -> tuple[str, str] | None:
        return self.modules.get(underscored)


@cache
def module_index(unet: UNetConfig, text: TextEncoderConfig) -> ModuleIndex:
    modules: dict[str, tuple[str, str]] = {}
    for component, key_map, prefix in ((UNET, unet_key_map(unet), ""), (TEXT, text_key_map(text), "")):
        for src, dst in key_map.items():
            if not src.endswith(".weight"):
                continue
            name = (prefix + src.removesuffix(".weight")).replace(".", "_")
            if name in modules and modules[name] != (component, dst.removesuffix(".weight")):
                raise AssertionError(f"two modules spell {name}")      # the underscore spelling must be unique
            modules[name] = (component, dst.removesuffix(".weight"))
    return ModuleIndex(modules, unet)


def diffusers_to_ldm(name: str, cfg: UNetConfig) -> str:
    """A diffusers-named UNet module, dots as "_" (down_blocks_0_resnets_1_conv1), as its LDM name."""
    per_down, per_up = cfg.num_res_blocks + 1, cfg.num_res_blocks + 1
    levels = len(cfg.channel_mult)

    def resnet(rest: str) -> str:
        for leaf, ldm in _RESNET.items():
            if rest == leaf or rest.startswith(leaf + "_"):
                return ldm + rest[len(leaf):]
        return rest

    rules = (
        (r"down_blocks_(\d+)_attentions_(\d+)_(.+)", lambda i, j, r: f"input_blocks_{1 + per_down * i + j}_1_{r}"),
        (r"down_blocks_(\d+)_resnets_(\d+)_(.+)", lambda i, j, r: f"input_blocks_{1 + per_down * i + j}_0_{resnet(r)}"),
        (r"down_blocks_(\d+)_downsamplers_0_conv(.*)", lambda i, r: f"input_blocks_{per_down * (i + 1)}_0_op{r}"),
        (r"mid_block_attentions_0_(.+)", lambda r: f"middle_block_1_{r}"),
        (r"mid_block_resnets_(\d+)_(.+)", lambda j, r: f"middle_block_{2 * j}_{resnet(r)}"),
        (r"up_blocks_(\d+)_attentions_(\d+)_(.+)", lambda i, j, r: f"output_blocks_{per_up * i + j}_1_{r}"),
        (r"up_blocks_(\d+)_resnets_(\d+)_(.+)", lambda i, j, r: f"output_blocks_{per_up * i + j}_0_{resnet(r)}"),
        (r"up_blocks_(\d+)_upsamplers_0_conv(.*)",
         lambda i, r: f"output_blocks_{per_up * i + per_up - 1}_{2 if levels - 1 - i in cfg.attention_levels else 1}_conv{r}"),
        (r"conv_in(.*)", lambda r: f"input_blocks_0_0{r}"),
        (r"conv_out(.*)", lambda r: f"out_2{r}"),
        (r"time_embedding_linear_(\d+)(.*)", lambda n, r: f"time_embed_{2 * n - 2}{r}"),
    )
    for pattern, to_ldm in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return to_ldm(*(int(g) if g.isdigit() else g for g in m.groups()))
    return name


# The "network part" a key ends in, after the module name: longest first, so ".lora_down.weight" is not
# read as ".weight".
_PARTS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight", "alpha",
          "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
          "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "scale",
          "on_input", "weight", "bias", "oft_blocks", "oft_diag", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
          "w_norm", "b_norm")
_PARTS = tuple(sorted(_PARTS, key=len, reverse=True))      # longest first: ".a1.weight" before ".weight"
_OLD_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def split_key(key: str) -> tuple[str, str, str] | None:
    """(component, module name in LDM spelling with "_", part) of an adapter key; None if not an adapter key.

    part is the file's own suffix ("lora_down.weight", "alpha", "hada_w1_a", ...), with PEFT's lora_A/B
    and the old processor format's down/up given as lora_down/lora_up."""
    m = _OLD_PROCESSOR.fullmatch(key)
    if m:                                              # diffusers' attention processors (pre-PEFT)
        module = m[1].removeprefix("unet.") + "." + (m[2] if m[2] != "to_out" else "to_out.0")
        return UNET, module.replace(".", "_"), f"lora_{m[3]}.weight"
    for prefix, component in (("lora_unet_", UNET), ("lycoris_", UNET), ("lora_te1_", TEXT), ("lora_te_", TEXT),
                              ("unet.", UNET), ("text_encoder.", TEXT)):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            break
    else:
        return None
    for part in _PARTS:
        if rest.endswith("." + part):
            module, part = rest[: -len(part) - 1], part
            break
    else:
        return None
    part = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}.get(part, part)
    return component, module.replace(".", "_"), part


def our_module(index: ModuleIndex, component: str, module: str) -> str | None:
    """Our module path for an adapter's module name (either spelling), or None."""
    if component == UNET:
        found = index.find(module) or index.find(diffusers_to_ldm(module, index.unet))
    else:
        found = index.find(module if module.startswith("text_model_") else "text_model_" + module)
    return found[1] if found and found[0] == component else None
