"""The CLI's ControlNet options: repeatable, each `--control-*` option belonging to the `--controlnet`
before it.

    --controlnet canny.safetensors --control-image edges.png --control-strength 0.8
    --controlnet depth.safetensors --control-image depth.png --control-end 0.6

Everything is checked before any model loads; the ControlNets load after the pipeline, whose device,
dtype and UNet they follow.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..pipeline.control import MODES, RESIZE_MODES, Control, check_settings, load_controlnet

OPTIONS = {   # setting -> (flag, type, help)
    "image": ("--control-image", str, "its control image (default: the --init-image)"),
    "strength": ("--control-strength", float, "its weight (default 1)"),
    "start": ("--control-start", float, "fraction of the steps before it starts (default 0)"),
    "end": ("--control-end", float, "fraction of the steps after which it stops (default 1)"),
    "mode": ("--control-mode", str, f"{', '.join(MODES)} (A1111's control modes; default balanced)"),
    "preprocess": ("--control-preprocess", str, "none, canny, invert or inpaint; parameters after a colon: "
                   "canny:low=50,high=150 (default none: the image is the control map)"),
    "resize_mode": ("--control-resize", str, f"{' or '.join(RESIZE_MODES)} (default Crop and Resize)"),
}


class _NewUnit(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        units = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, units + [{"file": value}])


class _UnitOption(argparse.Action):
    """Sets its value on the last --controlnet unit; an error before any, or twice for one."""
    def __call__(self, parser, namespace, value, option_string=None):
        units = getattr(namespace, "controlnet") or []
        if not units:
            parser.error(f"{option_string} belongs to a --controlnet FILE given before it")
        if self.dest in units[-1]:
            parser.error(f"{option_string} given twice for --controlnet {units[-1]['file']}")
        units[-1][self.dest] = value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlnet", action=_NewUnit, metavar="FILE",
                   help="apply a ControlNet (.safetensors/.pth); repeat for several, each followed by its own "
                        "--control-* options")
    for setting, (flag, kind, text) in OPTIONS.items():
        p.add_argument(flag, dest=setting, action=_UnitOption, type=kind, default=argparse.SUPPRESS,
                       help=f"ControlNet: {text}")


@dataclass(frozen=True)
class Unit:
    """One --controlnet and its options, checked but not loaded."""
    path: Path
    settings: dict

    def control(self, pipe) -> Control:
        return Control(load_controlnet(self.path, pipe), **self.settings)


def preprocess_argument(text: str) -> tuple[str, dict[str, float]]:
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--control-preprocess {text!r}: parameters are key=number, such as "
                             "canny:low=50,high=150") from None
        if not eq:
            raise ValueError(f"--control-preprocess {text!r}: write parameters as key=number")
    return name.strip(), params


def units(args) -> list[Unit]:
    """The ControlNet units of the arguments, every value checked."""
    out = []
    for given in args.controlnet or []:
        path = Path(given["file"])
        if not path.is_file():
            raise ValueError(f"ControlNet file {path} does not exist")
        settings = {k: v for k, v in given.items() if k != "file"}
        if "preprocess" in settings:
            settings["preprocess"], settings["params"] = preprocess_argument(settings["preprocess"])
        if "image" in settings and not Path(settings["image"]).is_file():
            raise ValueError(f"control image {settings['image']} does not exist")
        if "image" not in settings and getattr(args, "init_image", None) is None:
            raise ValueError(f"--controlnet {path}: give its --control-image (only img2img and inpainting can use "
                             "the --init-image as the control image)")
        check_settings({k: v for k, v in settings.items() if k != "image"})     # the image loads later
        out.append(Unit(path, settings))
    return out
