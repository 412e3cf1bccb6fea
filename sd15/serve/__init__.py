"""sd15's HTTP server: the AUTOMATIC1111 API (/sdapi/v1) that chat front ends, bots and `webuiapi`
scripts speak, plus a web page at /. Needs the `server` extra (FastAPI, uvicorn).

    python -m sd15.serve --ckpt v1-5-pruned-emaonly.safetensors        # http://127.0.0.1:7861

    from sd15.serve.app import build_app                               # in your own ASGI setup
    from sd15.serve.state import ServerState
    app = build_app(ServerState.start(Path("model.safetensors")))

Modules: `app` (routes), `a1111` (A1111 JSON <-> Request), `generation` (a job's batches), `jobs` (the
queue: one generation at a time, progress, interrupt), `models` (the models folder, switching, path
containment), `options`, `lists` (the list endpoints), `images` (safe base64 decoding, PNG encoding),
`security` (auth, same-origin, host and body-size guards), `errors` (A1111's error shape), `limits`,
`outputs` (save_images), `state`, `__main__` (the command line). Importing this package imports nothing.
"""
