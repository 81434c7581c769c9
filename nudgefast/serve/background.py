"""A server on a free loopback port in a background thread, for tests and benchmarks: started
with `with BackgroundServer(app) as url:`, stopped (bounded wait) when the block ends."""
from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 60.0, stop_timeout: float = 15.0):
        import uvicorn

        # Bind first and hand uvicorn the socket: no window in which another process takes the port.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"nudgefast-serve-{self.port}")
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.stop_timeout)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
