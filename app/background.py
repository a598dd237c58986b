"""A loop on a daemon thread that a `stop` ends and waits for: the driver's progress lines, its metrics'
refresh and the output lease's heartbeats each run one."""

import threading
from typing import Callable


class BackgroundLoop:
    """Runs `loop(stopping)` on a daemon thread named `name` from `start()`; `stop()` sets `stopping`
    (the loop waits on it between rounds, so that it ends at once) and waits for the loop to return."""

    def __init__(self, name: str, loop: Callable[[threading.Event], None]):
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=loop, args=(self.stopping,), name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.ident is not None:  # started
            self.thread.join()
