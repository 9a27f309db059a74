"""`cdlm serve`: flags, `CDLM_*` environment variables (flag wins), and the uvicorn runner with
graceful drain on SIGTERM / SIGINT.

`cdlm/cli.py` calls `add_serve_arguments(parser)` and `run_serve(args)`; `python -m cdlm.server`
runs the same thing standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cdlm.engine import LLMEngine

logger = logging.getLogger("cdlm.server")


@dataclass(frozen=True)
class _Opt:
    flag: str
    env: str
    type: Callable[[str], Any]
    default: Any
    help: str


def _str_or_none(v: str) -> str | None:
    return v if v != "" else None


def _int_or_auto(v: str) -> int | None:
    return None if v.lower() in ("", "auto", "none") else int(v)


def _float_or_none(v: str) -> float | None:
    return None if v.lower() in ("", "auto", "none") else float(v)


def _dtype(v: str) -> str | None:
    return None if v.lower() in ("", "auto", "none") else v


def _origins(v: str) -> list[str]:
    return [o.strip() for o in v.split(",") if o.strip()]


def _flag(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


OPTIONS: tuple[_Opt, ...] = (
    _Opt("--model", "CDLM_MODEL", _str_or_none, None,
         "model directory or hub id (default: the bundled default model)"),
    _Opt("--lora", "CDLM_LORA", _str_or_none, None, "peft LoRA adapter directory or hub id"),
    _Opt("--served-model-name", "CDLM_SERVED_MODEL_NAME", _str_or_none, None,
         "name clients pass as `model` (default: cdlm-default, or the model dir/id)"),
    _Opt("--host", "CDLM_HOST", str, "127.0.0.1", "bind address"),
    _Opt("--port", "CDLM_PORT", int, 8000, "bind port"),
    _Opt("--api-key", "CDLM_API_KEY", _str_or_none, None,
         "require `Authorization: Bearer <key>` on /v1/* (default: no auth)"),
    _Opt("--dtype", "CDLM_DTYPE", _dtype, None,
         "float32 | bfloat16 | float16 | auto (fp32 on CPU, bf16 on CUDA)"),
    _Opt("--device", "CDLM_DEVICE", _str_or_none, None, "cpu | cuda | cuda:N (default: auto)"),
    _Opt("--threshold", "CDLM_THRESHOLD", _float_or_none, None,
         "default confidence threshold (requests may override with `threshold`; default: the "
         "checkpoint's generation_config.json, else 0.9)"),
    _Opt("--max-num-seqs", "CDLM_MAX_NUM_SEQS", int, 64, "running requests at most"),
    _Opt("--kv-cache-tokens", "CDLM_KV_CACHE_TOKENS", _int_or_auto, None,
         "KV cache budget in tokens (default: auto)"),
    _Opt("--max-queue", "CDLM_MAX_QUEUE", int, 256,
         "waiting requests at most; past it: 429 with Retry-After"),
    _Opt("--drain-timeout", "CDLM_DRAIN_TIMEOUT", float, 30.0,
         "seconds to let in-flight requests finish after SIGTERM"),
    _Opt("--max-model-len", "CDLM_MAX_MODEL_LEN", _int_or_auto, None,
         "context length (prompt + max_tokens); default: the model's"),
    _Opt("--num-threads", "CDLM_NUM_THREADS", _int_or_auto, None,
         "torch CPU threads (default: torch's choice; set it to the CPU limit in containers "
         "to avoid oversubscription)"),
    _Opt("--max-request-bytes", "CDLM_MAX_REQUEST_BYTES", int, 16 << 20,
         "request bodies larger than this are refused (413) before parsing"),
    _Opt("--allowed-origins", "CDLM_ALLOWED_ORIGINS", _origins, [],
         "comma-separated origins allowed by CORS (`*` for any); default: no CORS headers, "
         "so browsers block cross-origin reads"),
    _Opt("--chat-special-tokens", "CDLM_CHAT_SPECIAL_TOKENS", _flag, False,
         "true: special-token text inside chat message content becomes those special tokens "
         "(default false: it stays text)"),
    _Opt("--timeout-keep-alive", "CDLM_TIMEOUT_KEEP_ALIVE", float, 5.0,
         "seconds an idle keep-alive connection stays open"),
    _Opt("--log-level", "CDLM_LOG_LEVEL", str, "info", "debug | info | warning | error"),
)


def _dest(opt: _Opt) -> str:
    return opt.flag.lstrip("-").replace("-", "_")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags. Defaults are None here and resolved in `resolve_settings`, so
    that a flag beats its environment variable, which beats the built-in default."""
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=_dest(opt), type=opt.type, default=None,
                            help=f"{opt.help} [env {opt.env}; default {opt.default}]")


def resolve_settings(args: argparse.Namespace,
                     environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        dest = _dest(opt)
        value = getattr(args, dest, None)
        if value is None and environ.get(opt.env) not in (None, ""):
            try:
                value = opt.type(environ[opt.env])
            except ValueError as exc:
                raise SystemExit(f"invalid {opt.env}={environ[opt.env]!r}: {exc}") from exc
        out[dest] = value if value is not None else opt.default
    return out


def build_engine(settings: dict[str, Any]) -> "LLMEngine":
    from cdlm.config import EngineConfig
    from cdlm.engine import LLMEngine

    if settings.get("num_threads"):
        import torch
        torch.set_num_threads(settings["num_threads"])

    ecfg = EngineConfig(threshold=settings["threshold"], max_num_seqs=settings["max_num_seqs"],
                        kv_cache_tokens=settings["kv_cache_tokens"],
                        max_queue=settings["max_queue"], max_model_len=settings["max_model_len"],
                        dtype=settings["dtype"], device=settings["device"])
    return LLMEngine.from_pretrained(model=settings["model"], lora=settings["lora"],
                                     engine_config=ecfg)


def build_app(engine: "LLMEngine", settings: dict[str, Any]) -> "FastAPI":
    from .app import create_app
    from .async_engine import AsyncEngine
    from .metrics import ServerMetrics
    from .state import ServerConfig

    name = settings["served_model_name"]
    if name is None:
        name = settings["model"] or "cdlm-default"
    config = ServerConfig(served_model_names=[name], api_key=settings["api_key"],
                          drain_timeout=settings["drain_timeout"],
                          max_num_seqs=settings["max_num_seqs"],
                          model_root=settings["model"] or "cdlm-default",
                          max_request_bytes=settings["max_request_bytes"],
                          allowed_origins=settings["allowed_origins"],
                          chat_special_tokens_in_content=settings["chat_special_tokens"])
    return create_app(AsyncEngine(engine, ServerMetrics(name)), config)


def uvicorn_config(app: "FastAPI", *, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info", timeout_keep_alive: float = 5.0,
                   timeout_graceful_shutdown: float = 5.0) -> Any:
    """The uvicorn settings `cdlm serve` runs with (tests use the same)."""
    import uvicorn

    from .connections import BoundedH11Protocol

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          http=BoundedH11Protocol, timeout_keep_alive=timeout_keep_alive,
                          timeout_graceful_shutdown=timeout_graceful_shutdown)


def _make_server(app: "FastAPI", host: str, port: int, log_level: str, drain_timeout: float,
                 timeout_keep_alive: float):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: stop admission (503), drain up to the timeout, then exit.
        A second signal exits at once."""

        drain_started = False
        drained_ok = True

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_started:
                logger.warning("second signal %s: exiting now", sig)
                self.should_exit = True
                self.force_exit = True
                return
            self.drain_started = True
            logger.info("signal %s: draining (timeout %.1fs)", sig, drain_timeout)
            loop = self._loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def startup(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        async def _drain(self) -> None:
            state = getattr(app.state, "cdlm", None)
            if state is not None:
                self.drained_ok = await state.drain(drain_timeout)
            self.should_exit = True

    config = uvicorn_config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=timeout_keep_alive)
    return DrainingServer(config)


def run_serve(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("loading model %s", settings["model"] or "(bundled default)")
    try:
        engine = build_engine(settings)
    except (OSError, ValueError) as exc:  # bad path, bad config, bad dtype...
        logger.debug("model load failed", exc_info=True)
        logger.error("cannot load the model: %s", exc)
        return 1
    app = build_app(engine, settings)
    server = _make_server(app, settings["host"], settings["port"], settings["log_level"],
                          settings["drain_timeout"], settings["timeout_keep_alive"])
    server.run()
    if not server.started:
        return 1
    return 0


def exit_process(code: int) -> None:
    """Leave at once once the server has stopped: run the atexit handlers and flush the logs,
    then skip the interpreter's teardown of torch and the model (about 0.6 s spent freeing
    memory the OS reclaims anyway), so an idle server is gone well within a second of SIGTERM."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cdlm serve",
                                     description="OpenAI-compatible CDLM server")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
