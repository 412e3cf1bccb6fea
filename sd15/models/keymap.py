"""Original (CompVis/LDM) parameter names -> the names of our modules, as data.

It lives beside the models because it describes them: rename a module and this map changes with it,
while `sd15.files` (formats, families, `remap`'s checks) knows nothing of our module names. LoRA and
ControlNet files name the same original modules, so their loaders reuse these tables too.

Small tables of exact prefix and leaf renames, expanded by loops over the levels into one explicit
dict per component. `python -m tools.print_keymap` prints the whole map for review.

Source names are relative to the component (what `sd15.files.checkpoint` hands over):
UNet keys after `model.diffusion_model.`, VAE keys after `first_stage_model.` (canonical 4-D attention),
text keys after `cond_stage_model.transformer.` (always starting `text_model.`).
"""

from .config import ControlNetConfig, TextEncoderConfig, UNetConfig, VAEConfig

# ---- leaf tables: original leaf module name -> engine leaf module name -------------------------------

UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2"}
UNET_RES_SKIP = {"skip_connection": "skip"}

UNET_TRANSFORMER = {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out"}
for _i in (1, 2, 3):
    UNET_TRANSFORMER[f"transformer_blocks.0.norm{_i}"] = f"block.norm{_i}"
UNET_TRANSFORMER["transformer_blocks.0.ff.net.0.proj"] = "block.ff.proj"
UNET_TRANSFORMER["transformer_blocks.0.ff.net.2"] = "block.ff.out"
UNET_ATTN_NO_BIAS = ("to_q", "to_k", "to_v")   # q/k/v carry no bias in the UNet

VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
VAE_RES_SKIP = {"nin_shortcut": "skip"}
VAE_ATTN = {"q": "attn.to_q", "k": "attn.to_k", "v": "attn.to_v", "proj_out": "attn.to_out"}

CLIP_LAYER = {"self_attn.q_proj": "attn.to_q", "self_attn.k_proj": "attn.to_k",
              "self_attn.v_proj": "attn.to_v", "self_attn.out_proj": "attn.to_out",
              "layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}

WB = ("weight", "bias")


def _leaves(src: str, dst: str, table: dict[str, str], params=WB) -> dict[str, str]:
    return {f"{src}.{s}.{p}": f"{dst}.{d}.{p}" for s, d in table.items() for p in params}


def _unet_res(src: str, dst: str, has_skip: bool) -> dict[str, str]:
    return _leaves(src, dst, UNET_RES | (UNET_RES_SKIP if has_skip else {}))


def _unet_transformer(src: str, dst: str) -> dict[str, str]:
    out = _leaves(src, dst, UNET_TRANSFORMER)
    for attn in ("attn1", "attn2"):
        s, d = f"{src}.transformer_blocks.0.{attn}", f"{dst}.block.{attn}"
        out |= {f"{s}.{q}.weight": f"{d}.{q}.weight" for q in UNET_ATTN_NO_BIAS}
        out |= {f"{s}.to_out.0.{p}": f"{d}.to_out.{p}" for p in WB}
    return out


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    widths = [cfg.channels * m for m in cfg.channel_mult]
    last = len(widths) - 1
    m = {f"time_embed.0.{p}": f"time_embed.fc1.{p}" for p in WB}
    m |= {f"time_embed.2.{p}": f"time_embed.fc2.{p}" for p in WB}
    if cfg.time_cond_proj_dim:
        # LCM-distilled UNets in single-file form keep diffusers' name for the guidance projection: the
        # diffusers -> original conversion has no rule for it (stable-diffusion.cpp's list of tensors it
        # skips names this exact key).
        m["time_embedding.cond_proj.weight"] = "time_embed.cond_proj.weight"
    m |= {f"input_blocks.0.0.{p}": f"conv_in.{p}" for p in WB}

    block, ch = 1, cfg.channels                      # input_blocks are numbered across all levels
    for i, width in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            m |= _unet_res(f"input_blocks.{block}.0", f"down.{i}.res.{j}", has_skip=ch != width)
            if i in cfg.attention_levels:
                m |= _unet_transformer(f"input_blocks.{block}.1", f"down.{i}.attn.{j}")
            ch, block = width, block + 1
        if i < last:
            m |= {f"input_blocks.{block}.0.op.{p}": f"down.{i}.resample.conv.{p}" for p in WB}
            block += 1

    m |= _unet_res("middle_block.0", "mid.res1", has_skip=False)
    m |= _unet_transformer("middle_block.1", "mid.attn")
    m |= _unet_res("middle_block.2", "mid.res2", has_skip=False)

    block = 0
    for k, i in enumerate(reversed(range(len(widths)))):   # engine `up.k` runs deepest level first
        has_attn = i in cfg.attention_levels
        for j in range(cfg.num_res_blocks + 1):
            m |= _unet_res(f"output_blocks.{block}.0", f"up.{k}.res.{j}", has_skip=True)  # input is a concat
            if has_attn:
                m |= _unet_transformer(f"output_blocks.{block}.1", f"up.{k}.attn.{j}")
            if j == cfg.num_res_blocks and i > 0:        # the upsampler follows the level's last block
                slot = 2 if has_attn else 1
                m |= {f"output_blocks.{block}.{slot}.conv.{p}": f"up.{k}.resample.conv.{p}" for p in WB}
            block += 1

    m |= {f"out.0.{p}": f"norm_out.{p}" for p in WB}
    m |= {f"out.2.{p}": f"conv_out.{p}" for p in WB}
    return m


def _vae_mid(src: str, dst: str) -> dict[str, str]:
    m = _leaves(f"{src}.block_1", f"{dst}.res1", VAE_RES)
    m |= _leaves(f"{src}.attn_1", f"{dst}.attn", {"norm": "norm"} | VAE_ATTN)
    m |= _leaves(f"{src}.block_2", f"{dst}.res2", VAE_RES)
    return m


def vae_key_map(cfg: VAEConfig) -> dict[str, str]:
    widths = [cfg.channels * m for m in cfg.channel_mult]
    last = len(widths) - 1
    m = {}
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "norm_out", "conv_out"):
            m |= {f"{side}.{name}.{p}": f"{side}.{name}.{p}" for p in WB}
        m |= _vae_mid(f"{side}.mid", f"{side}.mid")
    for name in ("quant_conv", "post_quant_conv"):
        m |= {f"{name}.{p}": f"{name}.{p}" for p in WB}

    ch = cfg.channels
    for i, width in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            table = VAE_RES | (VAE_RES_SKIP if ch != width else {})
            m |= _leaves(f"encoder.down.{i}.block.{j}", f"encoder.down.{i}.res.{j}", table)
            ch = width
        if i < last:
            m |= {f"encoder.down.{i}.downsample.conv.{p}": f"encoder.down.{i}.resample.conv.{p}" for p in WB}

    # The original decoder stores `up` in reverse: up.{last} runs first and is our up.0.
    ch = widths[-1]
    for k, i in enumerate(reversed(range(len(widths)))):
        width = widths[i]
        for j in range(cfg.num_res_blocks + 1):
            table = VAE_RES | (VAE_RES_SKIP if ch != width else {})
            m |= _leaves(f"decoder.up.{i}.block.{j}", f"decoder.up.{k}.res.{j}", table)
            ch = width
        if i > 0:
            m |= {f"decoder.up.{i}.upsample.conv.{p}": f"decoder.up.{k}.resample.conv.{p}" for p in WB}
    return m


def vae_transforms(cfg: VAEConfig) -> dict[str, str]:
    """Source keys whose layout differs: the mid attention's 1x1 convs become our Linear layers."""
    return {f"{side}.mid.attn_1.{n}.weight": "conv1x1_to_linear"
            for side in ("encoder", "decoder") for n in ("q", "k", "v", "proj_out")}


def text_key_map(cfg: TextEncoderConfig) -> dict[str, str]:
    t = "text_model"
    m = {f"{t}.embeddings.token_embedding.weight": "token_embedding.weight",
         f"{t}.embeddings.position_embedding.weight": "position_embedding.weight"}
    for i in range(cfg.num_layers):
        m |= _leaves(f"{t}.encoder.layers.{i}", f"layers.{i}", CLIP_LAYER)
    m |= {f"{t}.final_layer_norm.{p}": f"final_norm.{p}" for p in WB}
    return m


# ---- ControlNet: the UNet encoder's names, plus the hint network and the zero convs ------------------

CONTROLNET_ENCODER = ("time_embed.", "input_blocks.", "middle_block.")   # the original UNet keys it copies


def controlnet_key_map(cfg: ControlNetConfig) -> dict[str, str]:
    """Keys after `control_model.` (or of a pruned file). The encoder copy is `unet_key_map`'s own entries
    for the original names it shares (our ControlNet names those modules as the UNet does); the hint network
    is the Sequential `input_hint_block` (convs at even indices, SiLU between) and each zero conv a 1x1 conv
    at index 0 of its Sequential."""
    m = {k: v for k, v in unet_key_map(cfg.unet).items() if k.startswith(CONTROLNET_ENCODER)}
    for j in range(2 * len(cfg.hint_widths)):
        m |= {f"input_hint_block.{2 * j}.{p}": f"hint.convs.{j}.{p}" for p in WB}
    skips = 1 + len(cfg.unet.channel_mult) * (cfg.unet.num_res_blocks + 1) - 1
    for i in range(skips):
        m |= {f"zero_convs.{i}.0.{p}": f"zero_convs.{i}.{p}" for p in WB}
    m |= {f"middle_block_out.0.{p}": f"mid_out.{p}" for p in WB}
    return m
