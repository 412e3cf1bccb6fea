"""SD 1.x checkpoint layouts seen in the wild (docs/architecture.md, "Checkpoints in the wild"): split, normalised, or refused by name."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_writers import (CLIP, UNET, VAE, ema_name, key_table, sd1_state, write_lightning,
                          write_safetensors, write_torch)
from sd15.cli.inspect import main as inspect_main
from sd15.files import CheckpointError, detect_family, read_sd1_checkpoint, read_vae_file

FORMATS = ["safetensors", "torch-zip", "torch-legacy"]


def write(path, obj, fmt):
    if fmt == "safetensors":
        return write_safetensors(path, obj)
    return write_torch(path, obj, legacy=fmt == "torch-legacy")


def refused(path, *words, **kw):
    with pytest.raises(CheckpointError) as err:
        read_sd1_checkpoint(path, **kw)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture(scope="module")
def full_state():
    return sd1_state(full=True, dtype=torch.float16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_sd15_layout_splits_into_three_components(tmp_path, full_state, fmt):
    path = write(tmp_path / "v1-5.bin", full_state, fmt)
    ckpt = read_sd1_checkpoint(path)
    assert (len(ckpt.unet), len(ckpt.vae), len(ckpt.text_encoder)) == (686, 248, 196)
    assert ckpt.format == fmt and not ckpt.has_ema and ckpt.ema_parameters == 0
    assert all(k.startswith("text_model.") for k in ckpt.text_encoder)
    for prefix, part in ((UNET, ckpt.unet), (VAE, ckpt.vae), (CLIP, ckpt.text_encoder)):
        for key, t in part.items():
            assert t.dtype == torch.float16 and torch.equal(t, full_state[prefix + key]), key
    assert ckpt.vae["decoder.mid.attn_1.q.weight"].dim() == 4
    assert ckpt.quirks == ["tensor dtypes: float16 x1130"]


def test_detect_family_on_the_real_key_table():
    assert detect_family(key_table()) == "sd1"
    assert detect_family(list(key_table().items())) == "sd1"  # pairs work too
    vae_only = {k[len(VAE):]: s for k, s in key_table().items() if k.startswith(VAE)}
    assert detect_family(vae_only) == "sd1-vae"
    assert detect_family({k: s for k, s in key_table().items() if k.startswith(VAE)}) == "sd1-vae"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_are_kept(tmp_path, dtype):
    ckpt = read_sd1_checkpoint(write_safetensors(tmp_path / "m.safetensors", sd1_state(dtype=dtype)))
    assert {t.dtype for part in (ckpt.unet, ckpt.vae, ckpt.text_encoder) for t in part.values()} == {dtype}


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("wrap", [{}, {"nested_empty": True}, {"double_wrap": True}])
def test_lightning_wrappers(tmp_path, legacy, wrap):
    path = write_lightning(tmp_path / "last.ckpt", sd1_state(), legacy=legacy, **wrap)
    ckpt = read_sd1_checkpoint(path)
    assert len(ckpt.unet) == 6 and len(ckpt.text_encoder) == 3
    assert "ignored training entries: callbacks, epoch, global_step" in ckpt.quirks[0]
    if wrap.get("nested_empty"):
        assert "dropped an empty nested 'state_dict' entry" in ckpt.quirks


def test_tensors_beside_a_state_dict_are_ambiguous(tmp_path):
    obj = {"state_dict": sd1_state(), UNET + "extra.weight": torch.ones(1)}
    refused(write_torch(tmp_path / "m.ckpt", obj), "both inside and beside")


def test_not_a_dict(tmp_path):
    refused(write_torch(tmp_path / "m.ckpt", [torch.ones(1)]), "holds a list")


def test_clip_keys_without_text_model_level(tmp_path):
    ckpt = read_sd1_checkpoint(write_safetensors(tmp_path / "m.safetensors", sd1_state(text_model=False)))
    assert sorted(ckpt.text_encoder) == sorted(k[len(CLIP):] for k in sd1_state() if k.startswith(CLIP))
    assert any("lacked the 'text_model.' level: added to 3 keys" in q for q in ckpt.quirks)


@pytest.mark.parametrize("text_model", [True, False])
@pytest.mark.parametrize("ids,word", [(torch.arange(77).unsqueeze(0), "standard"),
                                      (torch.arange(77.0).unsqueeze(0) * 0.999, "non-standard"),
                                      (torch.zeros(3), "non-standard")])
def test_position_ids_are_dropped(tmp_path, text_model, ids, word):
    state = sd1_state(text_model=text_model, position_ids=ids)
    ckpt = read_sd1_checkpoint(write_torch(tmp_path / "m.ckpt", state))
    assert not any("position_ids" in k for k in ckpt.text_encoder)
    assert any("position_ids" in q and f"{word} " in q for q in ckpt.quirks), ckpt.quirks


@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip"])
def test_ema_default_off_and_selectable(tmp_path, fmt):
    state = sd1_state(ema=True)
    path = write(tmp_path / "m.bin", state, fmt)
    plain, ema = read_sd1_checkpoint(path), read_sd1_checkpoint(path, ema=True)
    assert plain.has_ema and ema.has_ema and plain.ema_parameters == sum(
        t.numel() for k, t in state.items() if k.startswith(UNET))
    for key, t in plain.unet.items():
        assert torch.equal(t, state[UNET + key])
        assert torch.equal(ema.unet[key], state[UNET + key] + 1000)
    assert any("EMA copy of the UNet present" in q for q in plain.quirks)
    assert any("using the EMA UNet weights" in q for q in ema.quirks)
    assert ema_name(UNET + "input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_ema_requested_but_absent(tmp_path):
    refused(write_safetensors(tmp_path / "m.safetensors", sd1_state()), "no EMA weights", ema=True)


def test_ema_that_does_not_match_the_unet(tmp_path):
    state = sd1_state(ema=True)
    del state[ema_name(UNET + "out.2.bias")]
    path = write_safetensors(tmp_path / "m.safetensors", state)
    refused(path, "do not match", ema=True)
    assert len(read_sd1_checkpoint(path).unet) == 6  # non-EMA load is unaffected


def test_ema_only_without_unet(tmp_path):
    state = {k: v for k, v in sd1_state(ema=True).items() if not k.startswith(UNET)}
    refused(write_safetensors(tmp_path / "m.safetensors", state), "no UNet weights", "EMA")


@pytest.mark.parametrize("layout", ["linear", "2d"])
def test_vae_attention_layouts_become_1x1_convs(tmp_path, layout):
    ckpt = read_sd1_checkpoint(write_safetensors(tmp_path / "m.safetensors", sd1_state(vae_attention=layout)))
    reference = read_sd1_checkpoint(write_safetensors(tmp_path / "c.safetensors", sd1_state()))
    assert sorted(ckpt.vae) == sorted(reference.vae)
    for k, t in reference.vae.items():
        assert ckpt.vae[k].shape == t.shape and torch.equal(ckpt.vae[k], t), k
    assert any("reshaped 8 to [C, C, 1, 1]" in q for q in ckpt.quirks)
    assert any("renamed 16" in q for q in ckpt.quirks) == (layout == "linear")


def test_vae_attention_in_both_namings_is_refused(tmp_path):
    state = sd1_state()
    state[VAE + "encoder.mid.attn_1.to_q.weight"] = torch.ones(2, 2)
    refused(write_safetensors(tmp_path / "m.safetensors", state), "appears twice")


def test_leftovers_are_ignored(tmp_path):
    state = sd1_state(schedule=True, ema=True)
    state.update({"logvar": torch.zeros(4), "loss.logvar": torch.zeros(()), "lvlb_weights": torch.ones(4),
                  "loss.discriminator.main.0.weight": torch.ones(1), VAE + "loss.logvar": torch.zeros(())})
    ckpt = read_sd1_checkpoint(write_torch(tmp_path / "m.ckpt", state))
    assert (len(ckpt.unet), len(ckpt.vae), len(ckpt.text_encoder)) == (6, 19, 3)
    assert any("ignored 19 schedule buffers" in q for q in ckpt.quirks), ckpt.quirks


def test_unknown_keys_are_listed(tmp_path):
    state = sd1_state()
    state["cond_stage_model.tokenizer.vocab"] = torch.ones(1)
    state["my_lora.alpha"] = torch.ones(1)
    refused(write_safetensors(tmp_path / "m.safetensors", state), "2 keys", "my_lora.alpha",
            "cond_stage_model.tokenizer.vocab")


def test_non_tensor_value_at_a_weight_key(tmp_path):
    state = sd1_state()
    state[UNET + "out.2.bias"] = "oops"
    refused(write_torch(tmp_path / "m.ckpt", state), "'model.diffusion_model.out.2.bias' holds a str")


def test_missing_vae(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", sd1_state(vae=False))
    refused(path, "no VAE weights", "separate VAE")
    ckpt = read_sd1_checkpoint(path, require_vae=False)
    assert ckpt.vae == {} and any("no VAE" in q for q in ckpt.quirks)


@pytest.mark.parametrize("drop,word", [(CLIP, "no text encoder"), (UNET, "no UNet")])
def test_missing_component(tmp_path, drop, word):
    state = {k: v for k, v in sd1_state().items() if not k.startswith(drop)}
    refused(write_safetensors(tmp_path / "m.safetensors", state), word)


def family_state(family):
    state = sd1_state()
    if family == "sd2-openclip":
        state = {k: v for k, v in state.items() if not k.startswith(CLIP)}
        state["cond_stage_model.model.token_embedding.weight"] = torch.ones(2, 2)
    elif family == "sd2-context":
        state = sd1_state(context=1024)
    elif family == "sd2-linear-proj":
        state[UNET + "input_blocks.1.1.proj_in.weight"] = torch.ones(2, 2)
    elif family == "sdxl-conditioner":
        state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(2)
    elif family == "sdxl-label-emb":
        state[UNET + "label_emb.0.0.weight"] = torch.ones(2, 2)
    elif family == "inpainting":
        state = sd1_state(in_channels=9)
    elif family == "pix2pix":
        state = sd1_state(in_channels=8)
    return state


@pytest.mark.parametrize("family,words", [
    ("sd2-openclip", ["Stable Diffusion 2.x"]), ("sd2-context", ["Stable Diffusion 2.x"]),
    ("sd2-linear-proj", ["Stable Diffusion 2.x"]), ("sdxl-conditioner", ["SDXL"]), ("sdxl-label-emb", ["SDXL"]),
    ("pix2pix", ["InstructPix2Pix", "8 input channels"])])
def test_other_families_are_refused_by_name(tmp_path, family, words):
    refused(write_safetensors(tmp_path / "m.safetensors", family_state(family)), *words)


def test_an_inpainting_checkpoint_is_read_as_sd1_with_9_input_channels(tmp_path):
    from sd15.files.checkpoint import read_sd1_checkpoint
    ckpt = read_sd1_checkpoint(write_safetensors(tmp_path / "m.safetensors", family_state("inpainting")))
    assert tuple(ckpt.unet["input_blocks.0.0.weight"].shape)[1] == 9


@pytest.mark.parametrize("state,words", [
    ({"down_blocks.0.resnets.0.conv1.weight": torch.ones(1), "conv_in.weight": torch.ones(1)}, ["diffusers-format"]),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(1)}, ["LoRA"]),
    ({"emb_params": torch.ones(2, 768)}, ["textual-inversion"]),
    ({"encoder.conv_in.weight": torch.ones(1), "decoder.conv_out.bias": torch.ones(1)}, ["standalone VAE"]),
    ({f"layer{i}.weight": torch.ones(1) for i in range(7)}, ["not a Stable Diffusion 1.x checkpoint: 7 tensors",
                                                              "'layer0.weight'"]),
])
def test_things_that_are_not_an_sd1_model(tmp_path, state, words):
    refused(write_safetensors(tmp_path / "m.safetensors", state), *words)


def test_dict_without_tensors(tmp_path):
    refused(write_torch(tmp_path / "m.ckpt", {"model": {"w": 1}, "step": 3}), "no tensors", "model (dict)")
    refused(write_safetensors(tmp_path / "e.safetensors", {}), "no tensors", "empty")


# ---- standalone VAE files -------------------------------------------------------------------

def bare_vae(**kw):
    return {k[len(VAE):]: v for k, v in sd1_state(**kw).items() if k.startswith(VAE)}


@pytest.mark.parametrize("variant", ["bare", "prefixed", "full-checkpoint", "linear-attention", "lightning"])
def test_vae_file_variants(tmp_path, variant):
    want = bare_vae()
    if variant == "bare":  # vae-ft-mse-840000-ema-pruned style
        state = {**want, "model_ema.decay": torch.tensor(0.99), "model_ema.num_updates": torch.tensor(5),
                 "loss.logvar": torch.zeros(())}
    elif variant == "prefixed":
        state = {VAE + k: v for k, v in want.items()}
    elif variant == "full-checkpoint":
        state = sd1_state(ema=True)
    else:
        state = bare_vae(vae_attention="linear")
    path = (write_lightning(tmp_path / "vae.ckpt", state) if variant == "lightning"
            else write_safetensors(tmp_path / "vae.safetensors", state))
    vae = read_vae_file(path)
    assert sorted(vae) == sorted(want)
    for k, t in want.items():
        assert torch.equal(vae[k], t), k


@pytest.mark.parametrize("state,words", [
    ({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.ones(1)}, ["diffusers-format"]),
    ({"foo.weight": torch.ones(1)}, ["not a VAE"]),
    ({**bare_vae(), "stray.weight": torch.ones(1)}, ["belong to no VAE", "stray.weight"]),
    (family_state("sdxl-conditioner"), ["SDXL"]),
    ({UNET + "input_blocks.0.0.weight": torch.ones(1)}, ["no VAE weights"]),
])
def test_vae_file_refusals(tmp_path, state, words):
    path = write_safetensors(tmp_path / "vae.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        read_vae_file(path)
    for w in words:
        assert w in str(err.value), str(err.value)


# ---- inspector ------------------------------------------------------------------------------

def test_inspector_reports_everything(tmp_path, capsys):
    path = write_lightning(tmp_path / "model.ckpt", sd1_state(ema=True, dtype=torch.float16,
                                                              position_ids=torch.arange(77)))
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    unet = sum(t.numel() for k, t in sd1_state().items() if k.startswith(UNET))
    for line in ["format:       torch-zip", "family:       sd1", "dtypes:       float16 x",
                 f"unet:         {unet:,} parameters in 6 tensors", f"ema:          yes, {unet:,} parameters",
                 "text_encoder: ", "sha256:       ", "dropped text position_ids", "wrapped in 'state_dict'"]:
        assert line in out, (line, out)


def test_inspector_names_refused_families(tmp_path, capsys):
    path = write_safetensors(tmp_path / "xl.safetensors", family_state("sdxl-conditioner"))
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:       sdxl" in out and "not loadable: is an SDXL checkpoint" in out


def test_inspector_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "sd15.inspect", str(tmp_path / "notes.txt")],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "text file" in r.stderr
