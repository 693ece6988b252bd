"""One log line per request: method, path, status, tokens (prompt+completion), seconds, and the
prompt tokens reused from an earlier request ("(n cached)")."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ham_mlx.serve")


class RequestLog:
    """ASGI middleware; it logs when the response (a whole stream included) has been sent.

    Handlers leave the usage in `request.state.usage`.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = "-"

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except BaseException:
            status += " (aborted)"
            raise
        finally:
            usage = scope.get("state", {}).get("usage")
            tokens = f"{usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else "-"
            cached = (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens")
            seconds = time.perf_counter() - start
            log.info("%s %s %s %s tok %.3fs%s", scope["method"], scope["path"], status, tokens,
                     seconds, f" ({cached} cached)" if cached else "")  # fmt: skip
