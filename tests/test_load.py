"""`sd15.load` on real files: every layout and quirk of docs/architecture.md, "Checkpoints in the wild" gives the same models as the canonical file.

The reference is the canonical tiny checkpoint (fp32 .safetensors written by tools.make_checkpoint, tiny
configs in its metadata) loaded through `sd15.load`. Every variant is written to disk, loaded through
`sd15.load`, and compared with it twice: parameter by parameter (bit patterns, so -0.0/NaN cannot hide)
and by fixed outputs (text encoder on token ids, UNet on a latent/timestep/context, VAE encode and decode).
Variants that hold *other* values (EMA copies, a separate VAE, half-precision roundings) are compared
with a reference built the same way from exactly those values.
"""

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sd15
from ckpt_writers import SCHEDULE, ema_name, write_lightning, write_safetensors, write_torch
from reference import TINY, engine_models, rel_err
from sd15.models.unet import UNet
from sd15.models.demo import PREFIX, TINY_TEXT, random_state_dict, tiny_metadata

REPO = Path(__file__).resolve().parents[1]
CONFIGS = TINY   # for torch files, which carry no config metadata
UNET, VAE, CLIP = PREFIX["unet"], PREFIX["vae"], PREFIX["text_encoder"]
POSITION_IDS = CLIP + "text_model.embeddings.position_ids"

# ---- fixed inputs and what we compare -------------------------------------------------------------

_gen = torch.Generator().manual_seed(1234)
IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 25602, 49407] + [49407] * 69])   # [1, 77]
LATENT = torch.randn(1, 4, 8, 8, generator=_gen)
TIMESTEP = 421
CONTEXT = torch.randn(1, 77, TINY_TEXT.width, generator=_gen)
IMAGE = torch.rand(1, 3, 32, 32, generator=_gen) * 2 - 1
Z = torch.randn(1, 4, 4, 4, generator=_gen)


@torch.no_grad()
def outputs(pipe, *, in_place=False):
    """The fixed outputs, computed on copies of the models in freshly allocated memory.

    CPU kernels (oneDNN/MKL GEMM and convolution) round differently depending on where the weights lie
    in memory: a tensor read from a safetensors file lies at whatever offset its header gives it (not
    64-byte aligned), and the same weights at another alignment give outputs that differ in the last bits. The loaded
    parameters are compared bit for bit separately; copying them into fresh (aligned) memory before
    running makes the output comparison exact too. `in_place=True` runs the loaded models themselves.
    """
    models = pipe if in_place else {name: copy.deepcopy(getattr(pipe, name))
                                    for name in ("text_encoder", "unet", "vae")}
    get = (lambda name: getattr(models, name)) if in_place else models.__getitem__
    return {"text": get("text_encoder")(IDS), "unet": get("unet")(LATENT, TIMESTEP, CONTEXT),
            "encode": get("vae").encode(IMAGE), "decode": get("vae").decode(Z)}


def params(models):
    """Every parameter and buffer of the three models (a Pipeline or a reference.Models), by name."""
    return {f"{part}.{k}": v for part in ("text_encoder", "unet", "vae")
            for k, v in getattr(models, part).state_dict().items()}


def bits(t):
    """The tensor's bit patterns (exact equality that -0.0 == 0.0 or NaN != NaN cannot blur)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bit_equal(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), what


def assert_same_params(pipe, ref, parts=("text_encoder", "unet", "vae")):
    got, want = params(pipe), params(ref)
    assert got.keys() == want.keys()
    for k in got:
        if k.split(".")[0] in parts:
            assert_bit_equal(got[k], want[k], k)


def assert_same_outputs(got, want, keys=("text", "unet", "encode", "decode")):
    for k in keys:
        assert_bit_equal(got[k], want[k], k)


# ---- writing files ---------------------------------------------------------------------------------

def write_canonical(path, sd):
    """The canonical layout: flat fp32-or-whatever .safetensors with the tiny configs in its metadata."""
    return write_safetensors(path, sd, metadata=tiny_metadata())


def component(sd, prefix):
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def load(path, **kwargs):
    """sd15.load on the CPU: this machine's default, made explicit so a CUDA host runs the same checks.
    (test_device_and_dtype_defaults_and_choices calls sd15.load itself.)"""
    return sd15.load(path, **{"device": "cpu", **kwargs})


def reference_for(tmp_path, sd):
    """The reference pipeline for a state dict holding other values: its canonical fp32 file, loaded."""
    sd = {k: v.float() for k, v in sd.items()}
    n = len(list(tmp_path.glob("reference-*.safetensors")))   # never rewrite a file a loaded model may map
    return load(write_canonical(tmp_path / f"reference-{n}.safetensors", sd))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's forwards on one thread. These models are tiny: with two OpenMP threads on a
    shared two-core machine each forward waits on busy cores (seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def canonical(one_thread, tmp_path_factory, tiny_state_dict):
    """(state dict, file, pipeline, outputs) of the canonical tiny checkpoint."""
    path = write_canonical(tmp_path_factory.mktemp("canonical") / "tiny.safetensors", tiny_state_dict)
    pipe = load(path)
    return tiny_state_dict, path, pipe, outputs(pipe)


@pytest.fixture(scope="module")
def other_state_dict():
    """Same layout, different random values (EMA copies, a separate VAE)."""
    return random_state_dict(seed=1)


def test_canonical_file_holds_exactly_the_written_tensors(canonical):
    """Anchor: the reference itself equals models built in memory from the dict (no file, no sd15.load)."""
    sd, path, pipe, out = canonical
    in_memory = engine_models(sd, TINY)
    assert_same_params(pipe, in_memory)
    assert pipe.quirks == [] and pipe.checkpoint_path == path and pipe.vae_path is None
    for name in ("text", "unet", "encode", "decode"):
        assert torch.isfinite(out[name]).all() and out[name].abs().max() > 0, name
    assert_same_outputs(outputs(in_memory), out)


# ---- lossless variants: same tensors, other containers / names ----------------------------------------

def strip_text_model(sd):
    return {(CLIP + k[len(CLIP + "text_model."):] if k.startswith(CLIP + "text_model.") else k): v
            for k, v in sd.items()}


def vae_attention_as(sd, style):
    """Mid-block attention q/k/v/proj_out [C,C,1,1] -> Linear to_q/.../to_out.0 [C,C], or 2-D q/k/v/proj_out."""
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for k, v in sd.items():
        for part in ("encoder", "decoder"):
            for old, new in names.items():
                stem = f"{VAE}{part}.mid.attn_1.{old}."
                if k.startswith(stem):
                    v = v[:, :, 0, 0].contiguous() if v.dim() == 4 else v
                    k = f"{VAE}{part}.mid.attn_1.{new if style == 'linear' else old}." + k[len(stem):]
        out[k] = v
    return out


def with_leftovers(sd):
    """Schedule buffers, loss.* and first_stage_model.loss.* training leftovers, standard position_ids."""
    extra = {name: torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64) for name in SCHEDULE}
    extra |= {"lvlb_weights": torch.ones(1000), "logvar": torch.zeros(1000), "loss.logvar": torch.zeros(1000),
              VAE + "loss.logvar": torch.zeros(()),
              VAE + "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
              VAE + "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
              POSITION_IDS: torch.arange(77)[None]}
    return sd | extra


def broken_position_ids(sd, *, text_model=True):
    """A merge-damaged float position_ids (0.5, 1.5, ...): must be ignored, positions stay 0..76."""
    key = POSITION_IDS if text_model else CLIP + "embeddings.position_ids"
    return sd | {key: torch.arange(77, dtype=torch.float32)[None] + 0.5}


# name -> (write(dir, sd) -> path, sd15.load keywords, a quirk the loader must report (or None))
LOSSLESS = {
    "torch-zip .ckpt (plain dict)": (lambda d, sd: write_torch(d / "m.ckpt", sd), {"configs": CONFIGS}, None),
    "lightning .ckpt + nested empty state_dict": (
        lambda d, sd: write_torch(d / "m.ckpt", {"state_dict": sd | {"state_dict": {}}, "global_step": 470000,
                                                 "epoch": 6}),
        {"configs": CONFIGS}, "dropped an empty nested 'state_dict'"),
    "lightning .ckpt with callbacks/numpy extras": (
        lambda d, sd: write_lightning(d / "last.ckpt", sd, nested_empty=True), {"configs": CONFIGS},
        "ignored training entries"),
    "legacy non-zip torch file": (lambda d, sd: write_torch(d / "m.ckpt", sd, legacy=True), {"configs": CONFIGS},
                                  None),
    "legacy lightning file": (lambda d, sd: write_lightning(d / "m.ckpt", sd, legacy=True), {"configs": CONFIGS},
                              "weights wrapped in 'state_dict'"),
    "torch zip named .safetensors": (lambda d, sd: write_torch(d / "m.safetensors", sd), {"configs": CONFIGS}, None),
    "safetensors named .ckpt": (lambda d, sd: write_canonical(d / "m.ckpt", sd), {}, None),
    "CLIP keys without text_model.": (lambda d, sd: write_canonical(d / "m.safetensors", strip_text_model(sd)), {},
                                      "lacked the 'text_model.' level"),
    "float position_ids with 0.5 offsets": (
        lambda d, sd: write_canonical(d / "m.safetensors", broken_position_ids(sd)), {}, "non-standard values"),
    "no text_model. + broken position_ids (.ckpt)": (
        lambda d, sd: write_torch(d / "m.ckpt", broken_position_ids(strip_text_model(sd), text_model=False)),
        {"configs": CONFIGS}, "non-standard values"),
    "VAE attention as Linear to_q/to_k/to_v/to_out.0": (
        lambda d, sd: write_canonical(d / "m.safetensors", vae_attention_as(sd, "linear")), {},
        "saved as Linear to_q"),
    "VAE attention as 2-D q/k/v/proj_out": (
        lambda d, sd: write_canonical(d / "m.safetensors", vae_attention_as(sd, "2d")), {}, "stored 2-D"),
    "schedule buffers, loss.* leftovers, position_ids": (
        lambda d, sd: write_canonical(d / "m.safetensors", with_leftovers(sd)), {},
        "schedule buffers / EMA counters / loss.* leftovers"),
    "leftovers in a lightning .ckpt": (
        lambda d, sd: write_lightning(d / "m.ckpt", with_leftovers(sd)), {"configs": CONFIGS}, "loss.* leftovers"),
}


@pytest.mark.parametrize("case", LOSSLESS)
def test_lossless_variant_loads_the_same_models(tmp_path, canonical, case):
    sd, _path, ref, ref_out = canonical
    write, kwargs, quirk = LOSSLESS[case]
    path = write(tmp_path, sd)
    pipe = load(path, **kwargs)
    if quirk is not None:
        assert any(quirk in q for q in pipe.quirks), pipe.quirks
    assert (pipe.device, pipe.dtype) == (torch.device("cpu"), torch.float32)
    assert_same_params(pipe, ref)
    assert_same_outputs(outputs(pipe), ref_out)
    # The loaded models as they are (weights wherever the file put them): equal up to kernel rounding.
    for k, v in outputs(pipe, in_place=True).items():
        assert rel_err(v, ref_out[k]) < 1e-5, (k, rel_err(v, ref_out[k]))


def test_variants_really_differ_from_the_canonical_file(tmp_path, canonical):
    """The lossless cases are not the canonical bytes under another name (the comparisons are not vacuous)."""
    sd, path, _ref, _out = canonical
    written = {}
    for i, case in enumerate(LOSSLESS):
        (tmp_path / str(i)).mkdir()
        written[case] = LOSSLESS[case][0](tmp_path / str(i), sd)
    digest = hashlib.sha256(path.read_bytes()).digest()
    for case, p in written.items():
        if case != "safetensors named .ckpt":   # that one is the canonical content under a .ckpt name
            assert hashlib.sha256(p.read_bytes()).digest() != digest, case
    assert written["safetensors named .ckpt"].suffix == ".ckpt"
    assert written["safetensors named .ckpt"].read_bytes()[8:9] == b"{"          # a safetensors header
    assert written["torch zip named .safetensors"].read_bytes()[:4] == b"PK\x03\x04"   # a torch zip
    assert written["legacy non-zip torch file"].read_bytes()[:2] == b"\x80\x02"        # a bare pickle stream
    names = set(load_file(written["CLIP keys without text_model."]))
    assert CLIP + "embeddings.token_embedding.weight" in names and not any("text_model" in n for n in names)
    linear = load_file(written["VAE attention as Linear to_q/to_k/to_v/to_out.0"])
    assert linear[VAE + "decoder.mid.attn_1.to_out.0.weight"].dim() == 2
    assert VAE + "decoder.mid.attn_1.q.weight" not in linear


# ---- half precision ----------------------------------------------------------------------------------

class OpLog(TorchDispatchMode):
    """Records (op, device type, dtype) of every tensor each ATen op produces while active.

    Instrumentation of torch's dispatcher, not a mock: the code under test runs unchanged.
    """

    def __init__(self):
        super().__init__()
        self.produced = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.produced += [(str(func), t.device.type, t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def real(self):
        """Ops that produced tensors with storage (the meta-device build produces only meta tensors)."""
        return [p for p in self.produced if p[1] != "meta"]


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_file_loaded_as_float32(tmp_path, canonical, half):
    sd, _path, _ref, ref_out = canonical
    stored = {k: v.to(half) for k, v in sd.items()}
    pipe = load(write_canonical(tmp_path / "half.safetensors", stored))
    assert (pipe.device, pipe.dtype) == (torch.device("cpu"), torch.float32)
    assert {t.dtype for t in params(pipe).values()} == {torch.float32}
    assert any(f"{str(half)[6:]} x" in q for q in pipe.quirks), pipe.quirks
    # Exactly the file's values, widened: the reference built from the same rounded tensors, bit for bit.
    rounded = reference_for(tmp_path, stored)
    assert_same_params(pipe, rounded)
    out = outputs(pipe)
    assert_same_outputs(out, outputs(rounded))
    # ... and within half-precision rounding of the fp32 original.
    tol = {torch.float16: 5e-3, torch.bfloat16: 4e-2}[half]
    for k in out:
        assert rel_err(out[k], ref_out[k]) < tol, (k, rel_err(out[k], ref_out[k]))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_file_loaded_as_half_is_not_copied_through_float32(tmp_path, canonical, half):
    sd, _path, _ref, _out = canonical
    stored = {k: v.to(half) for k, v in sd.items()}
    path = write_canonical(tmp_path / "half.safetensors", stored)
    with OpLog() as log:
        pipe = load(path, dtype=half)
    assert pipe.dtype == half and {t.dtype for t in params(pipe).values()} == {half}
    # Bit-equal to the file's tensors (models built in memory straight from the file's dict, no cast)...
    assert_same_params(pipe, engine_models(load_file(str(path)), TINY))
    # ... and nothing on a real device was ever float32 while loading: no widen-then-narrow round trip
    # (which would be bit-identical for these values, so only the op log can tell).
    assert log.real(), "the op log saw nothing: instrumentation broken"
    assert not [p for p in log.real() if p[2] == torch.float32]
    assert not [p for p in log.real() if "_to_copy" in p[0]]   # no cast at all: the file's tensors are assigned


def test_float32_file_loaded_as_half_is_cast_once(tmp_path, canonical):
    sd, path, _ref, _out = canonical
    with OpLog() as log:
        pipe = load(path, dtype=torch.float16)
    assert {t.dtype for t in params(pipe).values()} == {torch.float16}
    assert_same_params(pipe, engine_models({k: v.half() for k, v in sd.items()}, TINY))
    casts = [p for p in log.real() if "_to_copy" in p[0]]
    assert len(casts) == len(params(pipe)) and {p[2] for p in casts} == {torch.float16}


def mixed(sd):
    """Every third tensor fp16, every third bf16, the rest fp32 (sorted key order)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    return {k: sd[k].to(dtypes[i % 3]) for i, k in enumerate(sorted(sd))}


def test_mixed_dtype_file(tmp_path, canonical):
    sd, _path, _ref, _out = canonical
    stored = mixed(sd)
    assert {v.dtype for v in stored.values()} == {torch.float32, torch.float16, torch.bfloat16}
    path = write_canonical(tmp_path / "mixed.safetensors", stored)

    pipe = load(path)
    assert {t.dtype for t in params(pipe).values()} == {torch.float32}
    assert any(q.startswith("tensor dtypes:") and "float32" in q and "float16" in q and "bfloat16" in q
               for q in pipe.quirks), pipe.quirks
    rounded = reference_for(tmp_path, stored)
    assert_same_params(pipe, rounded)
    assert_same_outputs(outputs(pipe), outputs(rounded))

    # As fp16: fp16 tensors kept bit for bit, fp32 and bf16 ones rounded to fp16 (once, directly).
    half = load(path, dtype=torch.float16)
    assert half.dtype == torch.float16
    in_memory = engine_models(load_file(str(path)), TINY)
    assert {t.dtype for t in params(in_memory).values()} == {torch.float32, torch.float16, torch.bfloat16}
    got, want = params(half), params(in_memory)
    for k in got:
        assert_bit_equal(got[k], want[k].to(torch.float16), k)


# ---- EMA -----------------------------------------------------------------------------------------------

def with_ema(sd, ema_values):
    """model_ema.* copies of the UNet (EMA name: 'model_ema.' + key after 'model.' without dots)."""
    ema = {ema_name(k): ema_values[k] for k in component(sd, UNET)}
    assert len(ema) == len(component(sd, UNET))
    return sd | ema | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000)}


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_ema_copies(tmp_path, canonical, other_state_dict, fmt):
    sd, _path, ref, ref_out = canonical
    state = with_ema(sd, other_state_dict)
    assert "model_ema.diffusion_modelinput_blocks00weight" in state
    if fmt == "safetensors":
        path, kwargs = write_canonical(tmp_path / "ema.safetensors", state), {}
    else:
        path, kwargs = write_lightning(tmp_path / "ema.ckpt", state), {"configs": CONFIGS}

    # Default: the regular weights, as diffusers and A1111 do.
    pipe = load(path, **kwargs)
    assert any("EMA copy of the UNet present" in q for q in pipe.quirks), pipe.quirks
    assert_same_params(pipe, ref)
    assert_same_outputs(outputs(pipe), ref_out)

    # ema=True: the EMA UNet, the checkpoint's text encoder and VAE.
    ema_ref = reference_for(tmp_path, sd | component(other_state_dict, UNET))
    ema = load(path, ema=True, **kwargs)
    assert any("using the EMA UNet weights" in q for q in ema.quirks), ema.quirks
    assert_same_params(ema, ema_ref)
    assert_same_params(ema, ref, parts=("text_encoder", "vae"))
    out = outputs(ema)
    assert_same_outputs(out, outputs(ema_ref))
    assert_same_outputs(out, ref_out, keys=("text", "encode", "decode"))
    assert not torch.equal(out["unet"], ref_out["unet"])


def test_ema_requested_from_a_file_without_ema(canonical):
    _sd, path, _ref, _out = canonical
    with pytest.raises(sd15.CheckpointError, match="no EMA weights"):
        load(path, ema=True)


# ---- separate VAE ----------------------------------------------------------------------------------------

def bare_vae_file(path, sd):
    """Like vae-ft-mse-840000-ema-pruned: encoder.*/decoder.*/quant_conv.*/post_quant_conv.* + EMA counters."""
    state = {k[len(VAE):]: v for k, v in component(sd, VAE).items()}
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    state |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    if path.suffix == ".safetensors":
        return write_safetensors(path, state)
    return write_torch(path, {"state_dict": state, "global_step": 840000})


@pytest.mark.parametrize("name", ["vae-ft-mse.safetensors", "vae-ft-mse.ckpt"])
def test_separate_vae_file_replaces_the_checkpoint_vae(tmp_path, canonical, other_state_dict, name):
    sd, path, ref, ref_out = canonical
    vae_path = bare_vae_file(tmp_path / name, other_state_dict)
    pipe = load(path, vae=vae_path)
    assert pipe.vae_path == vae_path
    vae_ref = reference_for(tmp_path, sd | component(other_state_dict, VAE))
    assert_same_params(pipe, vae_ref)
    assert_same_params(pipe, ref, parts=("text_encoder", "unet"))
    out = outputs(pipe)
    assert_same_outputs(out, outputs(vae_ref))
    assert_same_outputs(out, ref_out, keys=("text", "unet"))
    assert not torch.equal(out["decode"], ref_out["decode"])


def test_checkpoint_without_vae(tmp_path, canonical, other_state_dict):
    sd, _path, _ref, ref_out = canonical
    no_vae = {k: v for k, v in sd.items() if not k.startswith(VAE)}
    path = write_canonical(tmp_path / "no-vae.safetensors", no_vae)
    with pytest.raises(sd15.CheckpointError, match=r"no VAE weights \(first_stage_model\.\*\)") as err:
        load(path)
    assert str(path) in str(err.value) and "separate VAE" in str(err.value)

    vae_path = bare_vae_file(tmp_path / "vae.safetensors", other_state_dict)
    pipe = load(path, vae=vae_path)
    assert any("no VAE in the file" in q for q in pipe.quirks), pipe.quirks
    vae_ref = reference_for(tmp_path, sd | component(other_state_dict, VAE))
    assert_same_params(pipe, vae_ref)
    assert_same_outputs(outputs(pipe), outputs(vae_ref))


# ---- device, dtype, no random initialisation --------------------------------------------------------

def test_device_and_dtype_defaults_and_choices(canonical):
    _sd, path, _pipe, _out = canonical
    pipe = sd15.load(path)
    cuda = torch.cuda.is_available()
    default = (torch.device("cuda", 0), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    assert (pipe.device, pipe.dtype) == default
    if not cuda:   # this CPU machine: cpu + float32, everywhere
        assert {(t.device.type, t.dtype) for t in params(pipe).values()} == {("cpu", torch.float32)}
    for device in ("cpu", torch.device("cpu")):
        for dtype in (torch.float32, torch.bfloat16):
            chosen = sd15.load(path, device=device, dtype=dtype)
            assert (chosen.device, chosen.dtype) == (torch.device("cpu"), dtype)
            assert {(t.device.type, t.dtype) for t in params(chosen).values()} == {("cpu", dtype)}
            assert not any(t.requires_grad for t in params(chosen).values())
            assert not (chosen.unet.training or chosen.vae.training or chosen.text_encoder.training)


RANDOM_OPS = ("uniform_", "normal_", "random_", "bernoulli", "exponential_", "randn", "rand.", "randint")


def test_no_random_initialisation(canonical):
    """Models are built on the meta device: their constructors' init calls run, but on meta tensors only.

    Patching torch.nn.init to raise would not tell the two apart (nn.Linear calls kaiming_uniform_ on meta
    too), so the dispatcher is watched instead: every random-fill op it sees while sd15.load runs must act
    on a meta tensor, i.e. no real memory is ever filled with random numbers (and then thrown away).
    """
    _sd, path, _pipe, _out = canonical
    with OpLog() as log:
        pipe = load(path)
    random_fills = [p for p in log.produced if any(r in p[0] for r in RANDOM_OPS)]
    assert random_fills and {p[1] for p in random_fills} == {"meta"}   # the init ran, on meta
    assert not any(t.is_meta for t in params(pipe).values())
    # The detector is not blind: an ordinary (CPU) build of the tiny UNet fills real memory randomly.
    with OpLog() as log:
        UNet(TINY.unet)
    assert any(r in p[0] for p in log.real() for r in RANDOM_OPS)


# ---- errors ----------------------------------------------------------------------------------------------

ONE_KEY_PER_COMPONENT = [UNET + "input_blocks.1.1.proj_in.weight", VAE + "decoder.conv_out.bias",
                         CLIP + "text_model.encoder.layers.1.mlp.fc1.weight"]
COMPONENT_NAME = {UNET: "UNet", VAE: "VAE", CLIP: "text encoder"}


@pytest.mark.parametrize("key", ONE_KEY_PER_COMPONENT)
def test_misshaped_tensor_is_named(tmp_path, canonical, key):
    sd, _path, _ref, _out = canonical
    assert key in sd
    bad = sd | {key: torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)}
    path = write_canonical(tmp_path / "bad.safetensors", bad)
    with pytest.raises(sd15.CheckpointError, match="wrong shape") as err:
        load(path)
    prefix = next(p for p in COMPONENT_NAME if key.startswith(p))
    msg = str(err.value)
    assert msg.startswith(f"{path}: {COMPONENT_NAME[prefix]}:") and key[len(prefix):] in msg, msg
    assert f"{tuple(bad[key].shape)} (expected {tuple(sd[key].shape)})" in msg, msg


@pytest.mark.parametrize("key", ONE_KEY_PER_COMPONENT)
def test_missing_tensor_is_named(tmp_path, canonical, key):
    sd, _path, _ref, _out = canonical
    path = write_canonical(tmp_path / "bad.safetensors", {k: v for k, v in sd.items() if k != key})
    with pytest.raises(sd15.CheckpointError, match="1 tensor\\(s\\) missing") as err:
        load(path)
    prefix = next(p for p in COMPONENT_NAME if key.startswith(p))
    msg = str(err.value)
    assert msg.startswith(f"{path}: {COMPONENT_NAME[prefix]}:") and key[len(prefix):] in msg, msg


def test_tiny_ckpt_without_configs_is_a_checkpoint_error(tmp_path, canonical):
    """A .ckpt has no metadata: sizes come from the tensors, head and group counts are SD1.5's. The tiny
    VAE's 16-wide first level cannot hold 32 GroupNorm groups: a CheckpointError that says so, no crash."""
    sd, _path, _ref, _out = canonical
    path = write_torch(tmp_path / "tiny.ckpt", sd)
    with pytest.raises(sd15.CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: VAE: its tensors give widths 16, 32, 32, 32, which 32 GroupNorm groups do "
                          "not divide"), msg
    assert "configs=" in msg, msg
    assert load(path, configs=TINY).unet.cfg == TINY.unet      # with its configs it loads


def test_configs_come_from_the_shapes(tmp_path, canonical):
    """The real SD1.5 key table gives SD1.5's configs; the tiny file's shapes give the tiny configs even
    where its metadata is stripped down to the two facts shapes cannot tell (heads, groups)."""
    from sd15.models.loading import text_config_from_shapes, unet_config_from_shapes, vae_config_from_shapes
    from tools.make_checkpoint import read_key_table
    table = read_key_table()
    parts = {name: {k[len(p):]: s for k, s in table.items() if k.startswith(p)} for name, p in PREFIX.items()}
    assert unet_config_from_shapes(parts["unet"]) == sd15.UNetConfig()
    assert vae_config_from_shapes(parts["vae"]) == sd15.VAEConfig()
    assert text_config_from_shapes(parts["text_encoder"]) == sd15.TextEncoderConfig()
    sd, _path, _ref, _out = canonical
    minimal = {"sd15.unet_config": json.dumps({"num_heads": TINY.unet.num_heads, "norm_groups": TINY.unet.norm_groups}),
               "sd15.vae_config": json.dumps({"norm_groups": TINY.vae.norm_groups}),
               "sd15.text_encoder_config": json.dumps({"num_heads": TINY.text_encoder.num_heads})}
    path = tmp_path / "minimal.safetensors"
    save_file(dict(sd), str(path), metadata=minimal)
    pipe = load(path)
    assert (pipe.unet.cfg, pipe.vae.cfg, pipe.text_encoder.cfg) == (TINY.unet, TINY.vae, TINY.text_encoder)


# ---- the tools.make_checkpoint CLI ----------------------------------------------------------------------

def test_make_checkpoint_cli_writes_a_loadable_file_and_never_overwrites(tmp_path, canonical):
    _sd, _path, ref, ref_out = canonical
    out = tmp_path / "cli.safetensors"
    cli = [sys.executable, "-m", "tools.make_checkpoint", str(out)]
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "wrote" in done.stdout
    pipe = load(out)
    # Default seed 0: the very tensors of the canonical file.
    assert_same_params(pipe, ref)
    assert_same_outputs(outputs(pipe), ref_out)

    before = out.read_bytes()
    again = subprocess.run(cli + ["--seed", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr
    assert out.read_bytes() == before
