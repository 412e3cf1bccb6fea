"""Write small checkpoint files with real SD 1.x key names, every quirk and hostile variant on demand.

Tensors are tiny (shapes shrunk to 1-2 per dimension) except the few dimensions family detection
reads: the UNet's input channels and the cross-attention context width.
"""

import contextlib
import io
import os
import pickletools
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

KEY_TABLE = Path(__file__).resolve().parents[1] / "tools" / "sd15_ldm_keys.tsv"
UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
SCHEDULE = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2"]
MINI_KEYS = {  # a few keys of each component, real names and ranks
    UNET + "time_embed.0.weight": (1280, 320), UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "input_blocks.0.0.bias": (320,), UNET + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET + "out.2.bias": (4,),
    VAE + "encoder.conv_in.weight": (128, 3, 3, 3), VAE + "quant_conv.weight": (8, 8, 1, 1),
    VAE + "post_quant_conv.weight": (4, 4, 1, 1),
    **{VAE + f"{part}.mid.attn_1.{w}.{p}": ((512, 512, 1, 1) if p == "weight" else (512,))
       for part in ("encoder", "decoder") for w in ("q", "k", "v", "proj_out") for p in ("weight", "bias")},
    CLIP + "text_model.embeddings.token_embedding.weight": (49408, 768),
    CLIP + "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    CLIP + "text_model.final_layer_norm.weight": (768,),
}


def key_table():
    """The 1,130 (key, shape) pairs of an original SD1.5 checkpoint."""
    table = {}
    for line in KEY_TABLE.read_text().splitlines():
        key, shape, _ = line.split("\t")
        table[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return table


def small_shape(key, shape, in_channels=4, context=768):
    if key == UNET + "input_blocks.0.0.weight":
        return (2, in_channels, 1, 1)
    if key.endswith("attn2.to_k.weight") or key.endswith("attn2.to_v.weight"):
        return (1, context)
    if key.endswith(".proj_in.weight") and context == 1024:
        return (2, 2)  # SD 2.1: Linear proj_in
    return tuple(min(d, 2) for d in shape)


def ema_name(unet_key):
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def sd1_state(*, full=False, dtype=torch.float32, in_channels=4, context=768, ema=False, text_model=True,
              position_ids=None, vae_attention="conv", schedule=False, vae=True):
    """An original-layout SD 1.x state dict with every tensor distinct (value = its index)."""
    keys = key_table() if full else MINI_KEYS
    state = {}
    for i, (key, shape) in enumerate(keys.items()):
        if key.startswith(VAE) and not vae:
            continue
        t = torch.full(small_shape(key, shape, in_channels, context), float(i), dtype=dtype)
        if key.startswith(VAE) and ".mid.attn_1." in key and t.dim() == 4 and vae_attention != "conv":
            t = t[:, :, 0, 0].contiguous()
        if key.startswith(VAE) and vae_attention == "linear":
            for old, new in ((".q.", ".to_q."), (".k.", ".to_k."), (".v.", ".to_v."), (".proj_out.", ".to_out.0.")):
                if ".mid.attn_1" + old in key:
                    key = key.replace(".mid.attn_1" + old, ".mid.attn_1" + new)
        if key.startswith(CLIP) and not text_model:
            key = CLIP + key[len(CLIP + "text_model."):]
        state[key] = t
    if position_ids is not None:
        level = "text_model." if text_model else ""
        state[CLIP + level + "embeddings.position_ids"] = position_ids
    if ema:
        for key in [k for k in state if k.startswith(UNET)]:
            state[ema_name(key)] = state[key] + 1000
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    if schedule:
        for name in SCHEDULE:
            state[name] = torch.linspace(0, 1, 4, dtype=torch.float64)
    return state


def write_safetensors(path, state, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def write_torch(path, obj, *, legacy=False):
    torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
    return path


# ---- Lightning-style extras without pytorch_lightning --------------------------------------

@contextlib.contextmanager
def fake_modules(*classes):
    """Make classes picklable under their (fake) __module__ names for the duration of a save."""
    added = []
    for cls in classes:
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


class ModelCheckpoint:
    def __init__(self):
        self.monitor, self.save_top_k = "val/loss", 3
        self.best_model_score = torch.tensor(0.125)
        self.kth_value = np.float64(1.5)
        self.best_k_models = {"epoch=1.ckpt": np.float32(0.25)}
        self.dtype = np.dtype("float32")
        self.arr = np.arange(3)


ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"


def lightning_checkpoint(state, *, nested_empty=False, double_wrap=False):
    inner = dict(state)
    if nested_empty:
        inner["state_dict"] = {}
    if double_wrap:
        inner = {"state_dict": inner}
    return {"state_dict": inner, "epoch": 6, "global_step": np.int64(470000),
            "pytorch-lightning_version": "1.4.2", "callbacks": {ModelCheckpoint: ModelCheckpoint()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
            "lr_schedulers": []}


def write_lightning(path, state, *, legacy=False, **kw):
    with fake_modules(ModelCheckpoint):
        return write_torch(path, lightning_checkpoint(state, **kw), legacy=legacy)


# ---- hostile payloads ----------------------------------------------------------------------

class Reduce:
    """An object that pickles as `func(*args)` (func itself may be another Reduce)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *a):  # pickle wants the reduce target to be callable
        raise AssertionError("never called")


def payloads(canary):
    """name -> object whose unpickling creates the file `canary` (a plain pickle.loads would)."""
    import builtins
    import subprocess
    touch = f"open({str(canary)!r}, 'w').close()"
    return {
        "os.system": Reduce(os.system, f"touch '{canary}'"),
        "builtins.exec": Reduce(builtins.exec, touch),
        "builtins.eval": Reduce(builtins.eval, touch),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(canary)]),
        "getattr-chain": Reduce(Reduce(builtins.getattr, Reduce(builtins.__import__, "os"), "system"),
                                f"touch '{canary}'"),
    }


def raw_global_call(module, name, arg):
    """Protocol-2 pickle bytes: module.name(arg) with a GLOBAL opcode (e.g. 'os system')."""
    s = arg.encode()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
            + b"X" + struct.pack("<I", len(s)) + s + b"\x85R.")


def zip_with(path, members, top="archive"):
    """A zip with the given {relative name: bytes} members under one top folder (stored)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{top}/{name}", data)
    return path


def torch_zip_members(obj):
    """What torch.save writes, as {relative name: bytes}."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def legacy_parts(obj):
    """A legacy torch file split into its five pickles and the raw storage tail."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    f = io.BytesIO(data)
    parts = []
    for _ in range(5):
        start = f.tell()
        for op, _arg, _pos in pickletools.genops(f):  # walk to STOP without unpickling
            pass
        parts.append(data[start:f.tell()])
    return parts, data[f.tell():]


# ---- hand-assembled pickles (protocol 2 opcodes) -------------------------------------------

def op_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(n):
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(*, offset=0, size=(2, 3), stride=(3, 1), numel=6, storage_type="FloatStorage", key="0",
                  pid=None, rebuild=("torch._utils", "_rebuild_tensor_v2")):
    """data.pkl for {'model.diffusion_model.x': tensor} with every field under the caller's control."""
    pid = pid if pid is not None else op_tuple(op_str("storage"), op_global("torch", storage_type), op_str(key),
                                               op_str("cpu"), op_int(numel))
    args = (pid + b"Q" + op_int(offset) + op_tuple(*map(op_int, size)) + op_tuple(*map(op_int, stride))
            + b"\x89" + op_global("collections", "OrderedDict") + b")R")
    return (b"\x80\x02}" + op_str("model.diffusion_model.x") + op_global(*rebuild) + b"(" + args + b"tR"
            + b"s.")


def torch_zip_bytes_members(pkl, records=None):
    """Members of a torch zip around a hand-made data.pkl: {'data/0': 24 bytes} unless given."""
    members = {"data.pkl": pkl, "byteorder": b"little", "version": b"3\n"}
    for key, data in (records if records is not None else {"0": bytes(24)}).items():
        members[f"data/{key}"] = data
    return members
