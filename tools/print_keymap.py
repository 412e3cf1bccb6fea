"""Print the whole SD1.5 key map, one `original_name -> engine_name [transform]` per line, for review.

    python -m tools.print_keymap                 # all three components (1,130 lines)
    python -m tools.print_keymap unet            # or vae, text_encoder

Original names are full checkpoint keys (with the component's prefix); engine names are the component
module's `state_dict` names. A `[transform]` suffix names the layout change `sd15.files.transforms` applies.
"""

import argparse

from sd15.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sd15.models.demo import PREFIX
from sd15.models.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms

COMPONENTS = {
    "unet": lambda: (unet_key_map(UNetConfig()), {}),
    "vae": lambda: (vae_key_map(VAEConfig()), vae_transforms(VAEConfig())),
    "text_encoder": lambda: (text_key_map(TextEncoderConfig()), {}),
}


def lines(component: str) -> list[str]:
    key_map, transforms = COMPONENTS[component]()
    out = []
    for src, dst in key_map.items():
        suffix = f" [{transforms[src]}]" if src in transforms else ""
        out.append(f"{PREFIX[component]}{src} -> {dst}{suffix}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("component", nargs="?", choices=list(COMPONENTS), help="print only this component's map")
    args = p.parse_args(argv)
    for name in [args.component] if args.component else COMPONENTS:
        print("\n".join(lines(name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
