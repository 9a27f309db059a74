"""`cdlm serve`: flags, `CDLM_*` environment variables (flag wins), and the uvicorn runner with
graceful drain on SIGTERM / SIGINT.

`cdlm/cli.py` calls `add_serve_arguments(parser)` and `run_serve(args)`; `python -m server`
runs the same thing standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

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


def _engine_limits(engine: Any) -> tuple[int | None, int | None]:
    """(max_model_len, vocab_size) of a loaded engine, read defensively."""
    max_len = None
    for holder in (engine, getattr(engine, "config", None), getattr(engine, "engine_config", None)):
        if holder is not None and getattr(holder, "max_model_len", None):
            max_len = int(holder.max_model_len)
            break
    mcfg = getattr(engine, "model_config", None)
    if mcfg is None:
        mcfg = getattr(getattr(engine, "model", None), "config", None)
    if max_len is None and mcfg is not None:
        max_len = getattr(mcfg, "max_position_embeddings", None)
    vocab = getattr(mcfg, "vocab_size", None) if mcfg is not None else None
    return max_len, vocab


def build_engine(settings: dict[str, Any]) -> Any:
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


def build_app(engine: Any, settings: dict[str, Any]):
    from .app import ServerConfig, create_app
    from .async_engine import AsyncEngine
    from .metrics import ServerMetrics

    name = settings["served_model_name"]
    if name is None:
        name = settings["model"] or "cdlm-default"
    max_len, vocab = _engine_limits(engine)
    config = ServerConfig(served_model_names=[name], api_key=settings["api_key"],
                          drain_timeout=settings["drain_timeout"], max_model_len=max_len,
                          vocab_size=vocab, max_num_seqs=settings["max_num_seqs"],
                          model_root=settings["model"] or "cdlm-default")
    async_engine = AsyncEngine(engine, ServerMetrics(name))
    return create_app(async_engine, config)


def _make_server(app: Any, host: str, port: int, log_level: str, drain_timeout: float):
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

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
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
                          settings["drain_timeout"])
    server.run()
    if not server.started:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cdlm serve",
                                     description="OpenAI-compatible CDLM server")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
