"""`python -m sd15.serve`: the A1111-compatible HTTP server (FastAPI + uvicorn; `pip install "sd15[server]"`).

    python -m sd15.serve --ckpt v1-5-pruned-emaonly.safetensors          # http://127.0.0.1:7861
    python -m sd15.serve --demo --port 0                                 # tiny random model, a free port
    python -m sd15.serve --models-dir models --host 0.0.0.0 --api-auth me:secret

Every argument is checked, and the port bound, before the model loads: a bad one prints one
`error: ...` line and exits with 2. Binding anything but a loopback address without --api-auth is
refused unless --insecure-no-auth is given (then with a warning): the server runs arbitrary prompts on
the machine's accelerator for whoever reaches it.
"""

import argparse
import ipaddress
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

CKPT_ENV, AUTH_ENV = "SD15_CKPT", "SD15_API_AUTH"
EXIT_USAGE = 2
log = logging.getLogger("sd15.serve")


class _Parser(argparse.ArgumentParser):
    def error(self, message):                 # one line, as the other sd15 commands
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sd15.serve",
                description="Serve a Stable Diffusion 1.x checkpoint over the AUTOMATIC1111 HTTP API (/sdapi/v1) "
                            "with a web page at /.")
    p.add_argument("--ckpt", default=os.environ.get(CKPT_ENV),
                   help=f"the checkpoint to load first: a file, or a name in --models-dir (default ${CKPT_ENV}; "
                        "without it, the first model of --models-dir)")
    p.add_argument("--demo", action="store_true",
                   help="serve a tiny random-weight checkpoint (no weights needed; the images are NOISE)")
    p.add_argument("--models-dir", help="folder of checkpoints clients may switch between (sd_model_checkpoint)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder that prompts' <lora:name> tags find LoRAs in; repeatable")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="folder of textual-inversion embeddings; repeatable")
    p.add_argument("--controlnet-dir", metavar="DIR",
                   help="folder of ControlNets that alwayson_scripts.ControlNet units name (A1111's extension API)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7861, help="port (default 7861, A1111's API port; 0: a free one)")
    p.add_argument("--api-auth", default=os.environ.get(AUTH_ENV), metavar="USER:PASS[,USER:PASS]",
                   help=f"HTTP Basic credentials required on every route (default ${AUTH_ENV}; the variable keeps "
                        "the password out of the process list)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --api-auth (anyone who reaches it can use it)")
    p.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN]",
                   help="web origins (http://host:port) whose pages may call the API; default none (CORS off)")
    p.add_argument("--allowed-hosts", metavar="NAME[,NAME]",
                   help="Host names to answer besides loopback ones (behind a reverse proxy); default none")
    p.add_argument("--outputs", metavar="DIR", help="folder for images of requests with save_images=true "
                                                    "(default: none, save_images is ignored)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, mps ...; default CUDA when available")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="model precision; auto = float16 on CUDA, float32 elsewhere")
    p.add_argument("--max-body-mb", type=float, default=50, help="largest request body in MB (default 50)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="jobs that may wait behind the running one; more get 503 + Retry-After (default 16)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return p


def parse_auth(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth must be USER:PASS[,USER:PASS] with a name and a password each")
        out[user] = password
    return out


def parse_origins(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and (not origin.startswith(("http://", "https://")) or "/" in origin.split("://", 1)[1]):
            raise ValueError(f"--cors-allow-origins: {origin!r} is not an origin such as http://localhost:3000")
    return origins


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(args) -> None:
    """Everything that can be wrong with the arguments, before anything loads."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    args.credentials = parse_auth(args.api_auth)
    args.origins = parse_origins(args.cors_allow_origins)
    args.hosts = tuple(h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip())
    if not is_loopback(args.host) and not args.credentials:
        if not args.insecure_no_auth:
            raise ValueError(f"--host {args.host} lets other machines in: give --api-auth USER:PASS (or "
                             f"${AUTH_ENV}), or --insecure-no-auth to serve without authentication")
        log.warning("serving %s WITHOUT authentication: anyone who can reach this address can use the server",
                    args.host)
    if "*" in args.origins:
        log.warning("--cors-allow-origins *: any web page the users of this server visit can call its API")
    if args.max_body_mb <= 0 or args.max_queue < 0:
        raise ValueError("--max-body-mb must be positive and --max-queue 0 or more")
    for flag, folders in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir),
                          ("--models-dir", [args.models_dir] if args.models_dir else []),
                          ("--controlnet-dir", [args.controlnet_dir] if args.controlnet_dir else [])):
        for folder in folders:
            if not Path(folder).is_dir():
                raise ValueError(f"{flag} {folder} does not exist or is not a folder")
    if not args.demo:
        in_models = args.models_dir and args.ckpt and (Path(args.models_dir) / args.ckpt).is_file()
        if args.ckpt and not Path(args.ckpt).is_file() and not in_models:
            raise ValueError(f"checkpoint {args.ckpt} does not exist")
        if not args.ckpt and not args.models_dir:
            raise ValueError(f"no checkpoint: pass --ckpt FILE (or set ${CKPT_ENV}), --models-dir DIR, or --demo")
    if args.outputs and Path(args.outputs).exists() and not Path(args.outputs).is_dir():
        raise ValueError(f"--outputs {args.outputs} exists and is not a folder")
    if args.device is not None:
        import torch
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {args.device}: not a device torch knows (cpu, cuda, cuda:1, mps, ...)") \
                from None


def initial_checkpoint(args, tmp: Path) -> Path:
    if args.demo:
        from ..models.demo import write_demo_checkpoint
        log.warning("DEMO: a tiny random-weight checkpoint; the images are noise")
        return write_demo_checkpoint(tmp / "tiny-random-demo.safetensors")
    if args.ckpt:
        path = Path(args.ckpt)
        if not path.is_file() and args.models_dir and (Path(args.models_dir) / args.ckpt).is_file():
            path = Path(args.models_dir) / args.ckpt
        if not path.is_file():
            raise ValueError(f"checkpoint {args.ckpt} does not exist")
        return path
    if args.models_dir:
        from .models import CHECKPOINT_EXTENSIONS, contained_files
        found = contained_files(Path(args.models_dir), CHECKPOINT_EXTENSIONS)
        if found:
            return found[0][1]
        raise ValueError(f"--models-dir {args.models_dir} holds no .safetensors or .ckpt file")
    raise ValueError(f"no checkpoint: pass --ckpt FILE (or set ${CKPT_ENV}), --models-dir DIR, or --demo")


def controlnet_folder(args, tmp: Path) -> Path | None:
    """--controlnet-dir; with --demo and none given, a folder holding one tiny random ControlNet for the demo
    checkpoint (control_demo_tiny), so the ControlNet API can be tried without weights too."""
    if args.controlnet_dir:
        return Path(args.controlnet_dir)
    if not args.demo:
        return None
    from ..models.demo import write_demo_controlnet
    folder = tmp / "controlnets"
    folder.mkdir()
    write_demo_controlnet(folder / "control_demo_tiny.safetensors")
    return folder


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def serve(args) -> None:
    check(args)
    sock = bind(args.host, args.port)          # before the model loads: a port in use fails at once
    try:
        _serve_on(sock, args)
    finally:
        sock.close()


def _serve_on(sock: socket.socket, args) -> None:
    try:
        import uvicorn

        from .app import build_app
        from .limits import Limits
        from .state import Access, PipelineLoader, ServerState
    except ImportError as e:
        raise ValueError(f"the server needs its extra: pip install \"sd15[server]\" ({e})") from None
    import torch

    with tempfile.TemporaryDirectory(prefix="sd15-serve-") as tmp:
        ckpt = initial_checkpoint(args, Path(tmp))
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        loader = PipelineLoader(args.device, dtype, [Path(d) for d in args.lora_dir],
                                [Path(d) for d in args.embeddings_dir])
        access = Access(args.credentials, args.origins, loopback_only=is_loopback(args.host), allowed_hosts=args.hosts)
        limits = Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_queue=args.max_queue)
        state = ServerState.start(ckpt, models_dir=Path(args.models_dir) if args.models_dir else None, loader=loader,
                                  access=access, limits=limits, outputs=Path(args.outputs) if args.outputs else None,
                                  controlnet_dir=controlnet_folder(args, Path(tmp)))
        try:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"sd15 serving {state.models.title(state.models.current_entry)} on http://{shown}:{port}/ "
                  f"(A1111 API at http://{shown}:{port}/sdapi/v1)", file=sys.stderr, flush=True)
            config = uvicorn.Config(build_app(state), log_level="info", access_log=args.access_log,
                                    timeout_keep_alive=5)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            state.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        serve(args)
    except KeyboardInterrupt:
        return 0
    except (ValueError, OSError) as e:        # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    from sd15.process import use_fast_memory
    use_fast_memory()          # before torch is imported: only where the process is ours
    sys.exit(main())
