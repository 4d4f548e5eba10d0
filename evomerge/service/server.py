"""Running the app under uvicorn, with a shutdown that leaves every search resumable.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits for open ones; an event stream would keep it
waiting, and the runners would only hear of the shutdown after that. :class:`Server` therefore tells the
controller at the signal itself: runners start to checkpoint and stop at once, event streams end, and the
lifespan's shutdown then waits for the runners (see :mod:`evomerge.service.controller`).
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import uvicorn

from evomerge.service.app import create_app
from evomerge.service.settings import Settings

GRACEFUL_S = 10  # seconds uvicorn waits for open requests after a signal


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.evomerge_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        controller = getattr(self.evomerge_app.state, "controller", None)
        if controller is not None:
            controller.begin_shutdown()
        super().handle_exit(sig, frame)


def run_server(settings: Settings, *, access_log: bool = True, log_level: str = "info") -> None:
    """Serve ``settings``' app until a signal; returns after the controller has stopped its runners."""
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host.strip("[]"), port=settings.port, log_level=log_level,
                            access_log=access_log, timeout_graceful_shutdown=GRACEFUL_S, proxy_headers=False,
                            server_header=False)
    Server(config, app).run()


__all__ = ["Server", "run_server"]
