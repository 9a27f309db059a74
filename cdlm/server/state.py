"""What the handlers share: the server's settings and its admission/drain state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from .async_engine import AsyncEngine
from .errors import draining, engine_dead, model_not_found

logger = logging.getLogger("cdlm.server")

DEFAULT_CHAT_MAX_TOKENS = 256        # chat without max_tokens: the paper's generation length,
                                     # clipped to the context left after the prompt
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
DEFAULT_TOKENIZER_THREADS = 2


@dataclass
class ServerConfig:
    served_model_names: list[str] = field(default_factory=lambda: ["cdlm-default"])
    api_key: str | None = None
    drain_timeout: float = 30.0
    max_num_seqs: int = 64
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    model_root: str | None = None    # what /v1/models reports as `root` (path or hub id)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # request bodies past it: 413
    tokenizer_threads: int = DEFAULT_TOKENIZER_THREADS  # tokenization off the event loop
    allowed_origins: list[str] = field(default_factory=list)   # CORS; empty: no CORS headers
    # Chat message content is text: special-token strings in it are not control tokens.
    chat_special_tokens_in_content: bool = False

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must not be empty")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if self.tokenizer_threads < 1:
            raise ValueError("tokenizer_threads must be at least 1")


class ServerState:
    """Admission state shared by the handlers, the drain logic and /health."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    # --- admission ----------------------------------------------------------------------
    def check_admission(self) -> None:
        if self.draining:
            self.engine.metrics.observe_failure("rejected")
            raise draining()
        if not self.engine.healthy:
            self.engine.metrics.observe_failure("rejected")
            raise engine_dead(self.engine.dead_reason or "")

    def check_model(self, model: str | None) -> str:
        names = self.config.served_model_names
        if model is None or model == "":
            return names[0]
        if model not in names:
            raise model_not_found(model, names)
        return model

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    # --- drain --------------------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Stop admission, wait for in-flight requests up to `timeout`; abort the rest.

        Returns True when everything finished in time."""
        self.draining = True
        logger.info("draining: %d request(s) in flight, timeout %.1fs", self.inflight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            logger.warning("drain timeout: aborting %d request(s)", self.inflight)
            self.engine.abort_all("server shutting down: drain timeout reached")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=5.0)
            return False
