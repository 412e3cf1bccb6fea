"""ControlNet: our module and loader against diffusers' `ControlNetModel` filled by its own converter.

Random tiny original-layout control models (the tiny UNet's encoder, a 4-width hint network) are written in
each layout found in the wild (pruned unprefixed .safetensors, v1.1 `control_model.` .safetensors, a v1.0
ControlLDM .pth bundling a whole SD model) and loaded by `sd15.models.loading.load_controlnet`; diffusers'
`convert_controlnet_checkpoint` is the independent witness of the layout. Parity: every one of the residuals
(rel err <= 1e-5), and the UNet fed them against diffusers' UNet with `down_block_additional_residuals` /
`mid_block_additional_residual`.
"""

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from ckpt_writers import payloads, write_torch
from reference import TINY, diffusers_unet_config, engine_models, reference_unet, rel_err
from sd15.files import CheckpointError
from sd15.files.controlnet import read_controlnet
from sd15.files.remap import invert_map
from sd15.models.config import ControlNetConfig, UNetConfig
from sd15.models.controlnet import ControlNet
from sd15.models.demo import TINY_CONTROLNET as CFG
from sd15.models.demo import TINY_UNET, random_controlnet_state, random_state_dict
from sd15.models.keymap import controlnet_key_map, unet_key_map
from sd15.models.loading import controlnet_config_from_shapes, load_controlnet

TOL = 1e-5
B, H, W = 2, 8, 8


def diffusers_controlnet_config(cfg: ControlNetConfig) -> dict:
    """`create_controlnet_diffusers_config_from_ldm`'s fields, from the UNet config translation the other tests use."""
    unet = diffusers_unet_config(cfg.unet)
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
            "freq_shift", "downsample_padding", "mid_block_scale_factor", "act_fn", "upcast_attention",
            "transformer_layers_per_block")
    return {k: unet[k] for k in keep} | dict(conditioning_channels=cfg.hint_channels,
                                             conditioning_embedding_out_channels=cfg.hint_widths,
                                             global_pool_conditions=False, controlnet_conditioning_channel_order="rgb")


def reference_controlnet(sd: dict, cfg: ControlNetConfig) -> ControlNetModel:
    config = diffusers_controlnet_config(cfg)
    with torch.device("meta"):
        model = ControlNetModel(**config)
    model.load_state_dict(convert_controlnet_checkpoint(sd, config), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, CFG.unet.in_channels, H, W, generator=gen)
    context = torch.randn(B, 7, CFG.unet.context_dim, generator=gen)
    hint = torch.rand(B, CFG.hint_channels, 8 * H, 8 * W, generator=gen)
    return x, torch.tensor([17.0, 803.0]), context, hint


@pytest.fixture(scope="module")
def state():
    return random_controlnet_state()


@pytest.fixture(scope="module")
def reference(state):
    return reference_controlnet(state, CFG)


# ---- the key map and the config ------------------------------------------------------------------------

def test_encoder_names_are_the_unet_key_maps():
    """The encoder copy maps through the UNet's own table; only the hint network and zero convs are new."""
    ours, unet = controlnet_key_map(CFG), unet_key_map(CFG.unet)
    shared = {k: v for k, v in ours.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert shared == {k: v for k, v in unet.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert set(ours) - set(shared) == {f"{p}.{w}" for p in [*(f"input_hint_block.{2 * j}" for j in range(8)),
                                                          *(f"zero_convs.{i}.0" for i in range(6)), "middle_block_out.0"]
                                       for w in ("weight", "bias")}


def test_sd15_sized_key_map_has_thirteen_outputs():
    full = ControlNetConfig()
    m = controlnet_key_map(full)
    assert {k.split(".")[1] for k in m if k.startswith("zero_convs.")} == {str(i) for i in range(12)}
    with torch.device("meta"):
        net = ControlNet(full)
    assert set(m.values()) == set(net.state_dict())
    assert [c.weight.shape[0] for c in net.zero_convs] == [320] * 4 + [640] * 3 + [1280] * 5
    assert net.mid_out.weight.shape[0] == 1280


def test_config_from_shapes(state):
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    base = dataclasses.replace(UNetConfig(), num_heads=TINY_UNET.num_heads, norm_groups=TINY_UNET.norm_groups)
    assert controlnet_config_from_shapes(shapes, base) == CFG
    with torch.device("meta"):
        full = {k: tuple(t.shape) for k, t in
                invert_map(controlnet_key_map(ControlNetConfig()), ControlNet(ControlNetConfig()).state_dict()).items()}
    assert controlnet_config_from_shapes(full) == ControlNetConfig()


# ---- forward parity ------------------------------------------------------------------------------------

def _write(tmp_path, state, layout: str):
    if layout == "pruned":
        path = tmp_path / "control_pruned.safetensors"
        save_file(state, str(path))
    elif layout == "prefixed":
        path = tmp_path / "control_v11.safetensors"
        save_file({"control_model." + k: t for k, t in state.items()}, str(path))
    else:                                            # v1.0: a whole ControlLDM, SD weights beside the control model
        path = tmp_path / "control_sd15_full.pth"
        full = random_state_dict(seed=3) | {"control_model." + k: t for k, t in state.items()}
        write_torch(path, {"state_dict": full | {"betas": torch.linspace(0, 1, 10)}})
    return path


@pytest.mark.parametrize("layout", ["pruned", "prefixed", "v1.0-full"])
def test_residual_parity(tmp_path, state, reference, layout):
    path = _write(tmp_path, state, layout)
    net, info = load_controlnet(path, unet=TINY_UNET, device="cpu", dtype=torch.float32)
    assert net.cfg == CFG
    if layout != "pruned":
        assert any("control_model." in q for q in info.quirks), info.quirks
    if layout == "v1.0-full":
        assert any("v1.0 ControlLDM" in q and "ignored" in q for q in info.quirks), info.quirks
    x, t, context, hint = inputs()
    with torch.no_grad():
        ours = net(x, t, context, hint)
        down, mid = reference(x, t, context, hint, return_dict=False)
    assert len(ours.skips) == len(down) == 6
    errors = [rel_err(o, r) for o, r in zip([*ours.skips, ours.mid], [*down, mid])]
    print(f"\n{layout}: per-residual rel err", " ".join(f"{e:.2e}" for e in errors))
    for i, (o, r) in enumerate(zip([*ours.skips, ours.mid], [*down, mid])):
        assert o.shape == r.shape, i
        assert r.abs().max() > 1e-3, i                    # the reference is not trivially zero
    assert max(errors) <= TOL, errors


def test_full_size_sd15_controlnet_parity(tmp_path):
    """A random SD 1.5-sized ControlNet (361 M parameters) in the v1.1 layout as a fp16 .safetensors, as the
    ControlNet-v1-1 fp16 files are: all 13 residuals against diffusers' ControlNetModel with SD 1.5's config
    (head dims 40/80/160, 768-wide text), at a 64x64 hint (8x8 latents), both in float32."""
    full = ControlNetConfig()
    config = diffusers_controlnet_config(full)
    assert (config["block_out_channels"], config["cross_attention_dim"], config["attention_head_dim"],
            config["layers_per_block"], config["conditioning_embedding_out_channels"]) == \
        ((320, 640, 1280, 1280), 768, 8, 2, (16, 32, 96, 256))
    sd = {k: t.half() for k, t in random_controlnet_state(full, seed=7).items()}
    path = tmp_path / "control_v11p_sd15_random_fp16.safetensors"
    save_file({"control_model." + k: t for k, t in sd.items()}, str(path))
    del sd
    net, _ = load_controlnet(path, device="cpu", dtype=torch.float32)
    from safetensors.torch import load_file
    reference = reference_controlnet({k: t.float() for k, t in load_file(str(path)).items()}, full)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        ours = net(x, 700.0, context, hint)
        down, mid = reference(x, torch.tensor([700.0]), context, hint, return_dict=False)
    assert len(ours.skips) == len(down) == 12
    errors = [rel_err(o, r) for o, r in zip([*ours.skips, ours.mid], [*down, mid])]
    print("\nfull-size per-residual rel err", " ".join(f"{e:.1e}" for e in errors))
    assert all(r.abs().max() > 1e-3 for r in [*down, mid])
    assert max(errors) <= TOL, errors


def test_scalar_timestep_and_bad_hint_size(state):
    net = ControlNet(CFG)
    net.load_state_dict({v: state[k] for k, v in controlnet_key_map(CFG).items()})
    x, _, context, hint = inputs()
    with torch.no_grad():
        a = net(x, 500, context, hint)
        b = net(x, torch.tensor([500.0, 500.0]), context, hint)
        assert all(torch.equal(p, q) for p, q in zip([*a.skips, a.mid], [*b.skips, b.mid]))
        with pytest.raises(ValueError, match="8x the latent size"):
            net(x, 500, context, hint[..., :32, :32])


def test_residuals_into_unet_match_diffusers(state, reference):
    """Our ControlNet's residuals into our UNet == diffusers' ControlNet's into diffusers' UNet."""
    sd = random_state_dict(seed=5)
    ref_unet, our_unet = reference_unet(sd, TINY.unet), engine_models(sd, TINY).unet
    net = ControlNet(CFG)
    net.load_state_dict({v: state[k] for k, v in controlnet_key_map(CFG).items()})
    x, t, context, hint = inputs(1)
    with torch.no_grad():
        residuals = net(x, t, context, hint)
        down, mid = reference(x, t, context, hint, return_dict=False)
        ours = our_unet(x, t, context, residuals=residuals)
        ref = ref_unet(x, t, context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
        plain = ref_unet(x, t, context).sample
        ours_plain = our_unet(x, t, context)
    assert rel_err(ours_plain, plain) <= TOL              # the shared way down leaves the UNet as it was
    err = rel_err(ours, ref)
    print(f"\nUNet with ControlNet residuals: rel err {err:.2e}; control moved the output by "
          f"{rel_err(plain, ref):.2e}")
    assert rel_err(plain, ref) > 1e-2                     # the residuals matter
    assert err <= TOL


# ---- refusals ------------------------------------------------------------------------------------------

def _refused(tmp_path, tensors: dict, *words):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) if isinstance(s, tuple) else s for k, s in tensors.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_controlnet(path, device="cpu")
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, (w, msg)


def test_refuses_other_kinds(tmp_path, state):
    hint = {k: t for k, t in state.items() if k.startswith(("input_hint_block.", "zero_convs."))}
    _refused(tmp_path, hint | {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 1024)}, "2.x")
    _refused(tmp_path, hint | {"input_blocks.1.1.proj_in.weight": (32, 32)}, "2.x")
    _refused(tmp_path, {"control_model." + k: t for k, t in hint.items()}
             | {"control_model.label_emb.0.0.weight": (8, 8)}, "SDXL")
    _refused(tmp_path, {"conv_in.weight": (320, 192, 3, 3), "body.0.block1.weight": (320, 320, 3, 3)}, "T2I-Adapter")
    _refused(tmp_path, {"adapter.conv_in.weight": (320, 192, 3, 3)}, "T2I-Adapter")
    _refused(tmp_path, hint | {"lora_controlnet": (1,)}, "Control-LoRA")
    _refused(tmp_path, {"difference": (1,)} | {"control_model." + k: t for k, t in hint.items()}, "difference")
    _refused(tmp_path, {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}, "diffusers-format")
    _refused(tmp_path, {k: t for k, t in random_state_dict().items() if k.startswith("model.")}, "not a ControlNet")
    _refused(tmp_path, {"foo.weight": (3,)}, "not a ControlNet")


def test_refuses_a_controlnet_for_another_unet(tmp_path, state):
    path = _write(tmp_path, state, "pruned")
    other = dataclasses.replace(TINY_UNET, channels=16)
    with pytest.raises(CheckpointError, match="not a copy of this UNet"):
        load_controlnet(path, unet=other, device="cpu")
    broken = dict(state)
    broken.pop("zero_convs.2.0.bias")
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="zero_convs.2.0.bias"):
        load_controlnet(tmp_path / "broken.safetensors", unet=TINY_UNET, device="cpu")


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_hostile_pth_is_refused(tmp_path, state, kind):
    canary = tmp_path / "CANARY"
    obj = {"state_dict": {"control_model." + k: t for k, t in state.items()}}
    obj["state_dict"]["control_model.zero_convs.0.0.weight"] = payloads(canary)[kind]
    path = write_torch(tmp_path / "control_v11p_sd15_canny.pth", obj)
    with pytest.raises(CheckpointError, match="refusing"):
        read_controlnet(path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_controlnet(path, device="cpu")
    assert not canary.exists()
