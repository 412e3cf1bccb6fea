"""The FastAPI app: A1111's /sdapi/v1 routes over a `ServerState`, the web page at /, the guards.

    app = build_app(state)          # then uvicorn serves it (sd15/serve/__main__.py)

Generation routes validate and map the body first (a 422 at once), then queue a job and wait for it,
checking every quarter second whether the client is still there: one that went away cancels its job.
Everything heavy (decoding images, building requests, encoding PNGs) runs in worker threads, never on
the event loop, so /progress and /interrupt answer while a job runs.
"""

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from . import a1111, controlnet, lists
from .errors import ApiError, bad_input, install
from .generation import Generation, run
from .images import decode_image, encode_png, latent_preview
from .jobs import Cancelled, Job, QueueFull
from .models import ModelNotFound
from .security import BasicAuth, BodyLimit, HostCheck, SameOrigin, SecurityHeaders
from .state import ServerState

STATIC = Path(__file__).parent / "static"
PLACEHOLDER = ("<!doctype html><title>sd15</title><p>sd15 server: the API is at /sdapi/v1/ "
               "(the web page is not installed)")
# The page loads only its own files (it has no inline script or style) and talks only to this server.
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
POLL_SECONDS = 0.25


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="sd15", description="Stable Diffusion 1.x with the A1111 API", docs_url=None,
                  redoc_url=None, version=a1111.version())
    app.state.sd15 = state
    install(app)
    _page_routes(app)
    _generation_routes(app, state)
    _control_routes(app, state)
    _list_routes(app, state)
    controlnet.routes(app, state.controlnets)
    _guards(app, state)
    return app


def _guards(app: FastAPI, state: ServerState) -> None:
    """Added innermost first: CORS (if asked) is outermost, so a preflight is answered before auth."""
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes)
    app.add_middleware(SameOrigin, allowed_origins=state.access.cors_origins)
    if state.access.credentials:
        app.add_middleware(BasicAuth, credentials=state.access.credentials)
    app.add_middleware(HostCheck, allowed=state.access.host_allowed)
    if state.access.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(state.access.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    app.add_middleware(SecurityHeaders, headers=HEADERS)


def _page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        index = STATIC / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html; charset=utf-8")
        return HTMLResponse(PLACEHOLDER)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False, follow_symlink=False), name="static")


async def _until_done(request: Request, job: Job):
    """The job's result; cancels it when the client disconnects first."""
    waiting = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=POLL_SECONDS)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            job.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())   # nobody waits for it now
            raise ApiError(499, "the client went away; its job was cancelled", "Cancelled")


async def _queued(request: Request, state: ServerState, job: Job):
    try:
        state.jobs.submit(job)
    except QueueFull as e:
        raise ApiError(503, f"the server is busy ({state.jobs.waiting()} jobs waiting, the most it queues); "
                       f"retry in {e.retry_after} s", "QueueFull", {"Retry-After": str(e.retry_after)})
    except Cancelled as e:
        raise ApiError(503, str(e), "Cancelled")
    try:
        return await _until_done(request, job)
    except Cancelled as e:
        raise ApiError(503, str(e), "Cancelled")


def _context(state: ServerState) -> a1111.Context:
    def is_loaded(name: str) -> bool:
        try:
            return state.models.find(name).path == state.models.current_entry.path
        except ModelNotFound:
            return False
    return a1111.Context(state.limits, clip_skip=state.options.clip_skip,
                         noise_seed_delta=state.options.noise_seed_delta, model_aliases=is_loaded,
                         can_save=state.outputs is not None,
                         controlnet=lambda name: state.controlnets.load(name, state.models.current))


def _generation_routes(app: FastAPI, state: ServerState) -> None:
    async def generate(request: Request, body, kind: str) -> dict:
        def plan() -> Generation:
            try:
                return a1111.plan(body, kind, _context(state))
            except ValueError as e:   # a ControlNet file that will not load names its absolute path
                raise ApiError(422, state.scrub(str(e)), type(e).__name__) from None
        gen = await run_in_threadpool(plan)
        try:
            outcome = await _queued(request, state, Job(kind, lambda ctx: run(gen, state.models.current, ctx)))
        except ValueError as e:       # found while running: a <lora:...> tag naming no file, ...
            raise ApiError(422, state.scrub(str(e)), type(e).__name__) from None
        if outcome.interrupted and not outcome.images:
            raise ApiError(409, "interrupted (POST /sdapi/v1/interrupt) before any image was finished", "Interrupted")

        def answer() -> dict:
            if gen.save_images and state.outputs is not None:
                for image in outcome.images:
                    state.outputs.save(image)
            return a1111.response(gen, outcome, encode_png)
        return await run_in_threadpool(answer)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request, body: a1111.Txt2ImgBody):
        return await generate(request, body, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request, body: a1111.Img2ImgBody):
        return await generate(request, body, "img2img")


def _progress(state: ServerState, skip_current_image: bool) -> dict:
    """A1111's progressapi: progress 0..1 over the batches and steps, eta_relative in seconds."""
    idle_state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                  "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    ctx = state.jobs.current()
    if ctx is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle_state, "current_image": None, "textinfo": None,
                "queued": state.jobs.waiting()}
    s = ctx.snapshot()
    progress = 0.01 + s["job_no"] / s["job_count"]
    if s["sampling_steps"] > 0:
        progress += s["sampling_step"] / s["sampling_steps"] / s["job_count"]
    elapsed = time.time() - s["started"]
    eta = elapsed / progress - elapsed
    image = None
    if not skip_current_image and s["latents"] is not None and (preview := latent_preview(s["latents"])):
        image = encode_png(preview)
    job_state = idle_state | {k: s[k] for k in ("job", "job_count", "job_no", "sampling_step", "sampling_steps",
                                                 "interrupted", "skipped")}
    job_state["job_timestamp"] = time.strftime("%Y%m%d%H%M%S", time.localtime(s["started"]))
    return {"progress": min(progress, 1.0), "eta_relative": eta, "state": job_state, "current_image": image,
            "textinfo": None, "queued": state.jobs.waiting()}


def _control_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return _progress(state, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        state.jobs.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        state.jobs.skip()
        return None

    @app.get("/sdapi/v1/options")
    def get_options():
        return state.options.as_dict(state.models)

    # Switches queued and not yet done, oldest first (touched only on the event loop). A request compares
    # its model with the last of them, not with the one loaded now: "A" asked after a queued switch to
    # "B" must switch back, not answer at once and leave B loaded.
    pending_switches = []

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request, body: dict[str, Any] = Body(...)):
        try:         # everything checked before anything is set
            wanted = body.get("sd_model_checkpoint")
            entry = state.models.find(wanted) if wanted is not None else None
            state.options.update(body)
        except ValueError as e:
            raise bad_input(e) from None
        latest = pending_switches[-1][1] if pending_switches else state.models.current_entry
        if entry is not None and entry.path != latest.path:
            job = Job("switch model", lambda ctx: state.models.switch(entry))
            pending_switches.append((job, entry))
            try:
                await _queued(request, state, job)
            except ValueError as e:                 # SwitchFailed: the old model is still loaded
                raise bad_input(e) from None
            finally:
                pending_switches[:] = [p for p in pending_switches if p[0] is not job]
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: dict[str, Any] = Body(...)):
        image = body.get("image")
        if image is None or (isinstance(image, str) and not image.strip()):
            return {"info": "", "items": {}, "parameters": {}}

        def read() -> dict:
            try:
                return lists.png_info(decode_image(image, "image", state.limits.max_image_pixels))
            except ValueError as e:
                raise bad_input(e) from None
        return await run_in_threadpool(read)

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        state.models.start_hashing()          # the listing itself is read fresh on every call
        return None

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None


def _list_routes(app: FastAPI, state: ServerState) -> None:
    fixed = {"samplers": lists.samplers, "schedulers": lists.schedulers, "upscalers": lists.upscalers,
             "latent-upscale-modes": lists.latent_upscale_modes, "memory": lists.memory,
             "scripts": lambda: lists.scripts(controlnet=state.controlnets.folder is not None)}
    for name, make in fixed.items():
        app.add_api_route(f"/sdapi/v1/{name}", make, methods=["GET"], name=name)
    for name in ("sd-vae", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles", "extensions",
                 "script-info"):
        app.add_api_route(f"/sdapi/v1/{name}", lambda: [], methods=["GET"], name=name)

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return state.models.rows()

    @app.get("/sdapi/v1/loras")
    def loras():
        return lists.loras(state.loader.lora_dirs)

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return lists.embeddings(state.models.current.embeddings, state.loader.skipped_embeddings)
