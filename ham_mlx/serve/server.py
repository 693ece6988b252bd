"""Run the app with uvicorn until SIGTERM or Ctrl-C, then exit cleanly and quickly."""

from __future__ import annotations

import signal
import socket

import uvicorn
from fastapi import FastAPI

from ham_mlx.serve.engine import Engine


class Server(uvicorn.Server):
    """uvicorn's server, ending every generation as soon as the shutdown begins: the running and
    queued requests get a 503 at once instead of holding the shutdown up."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.close()
        await super().shutdown(sockets)


def _stopped(sig: int, frame: object) -> None:
    """After a graceful shutdown uvicorn raises the signal again for the previous handler: this
    one, so that the process exits with status 0."""


def run(app: FastAPI, engine: Engine, host: str, port: int) -> bool:
    """Serve until a stop signal; False when the server could not start (e.g. port in use)."""
    config = uvicorn.Config(app, host=host, port=port, access_log=False,
                            timeout_graceful_shutdown=5)  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    server = Server(config, engine)
    server.run()
    return server.started
