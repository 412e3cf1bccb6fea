"""A real sd15 server (uvicorn, the real app) on a free 127.0.0.1 port in a thread, for the server tests.

    with running_server(ckpt, models_dir=folder) as srv:
        requests.get(srv.url + "/sdapi/v1/sd-models")
        webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
"""

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from sd15.serve.app import build_app
from sd15.serve.limits import Limits
from sd15.serve.state import Access, PipelineLoader, ServerState


@dataclass
class RunningServer:
    state: ServerState
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_server(ckpt: Path, *, models_dir: Path | None = None, access: Access | None = None,
                   limits: Limits | None = None, outputs: Path | None = None, lora_dirs=(), embedding_dirs=(),
                   controlnet_dir: Path | None = None):
    state = ServerState.start(ckpt, models_dir=models_dir, access=access, limits=limits, outputs=outputs,
                              controlnet_dir=controlnet_dir,
                              loader=PipelineLoader(lora_dirs=list(lora_dirs), embedding_dirs=list(embedding_dirs)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(state, sock.getsockname()[1])
    finally:
        server.should_exit = True
        state.close()
        thread.join(10)
        sock.close()
