"""The ``streamer`` command: serve | demo | ask | make-tiny-model.

Heavy imports (torch, transformers, uvicorn) happen inside the commands that need them, so
``streamer ask`` and ``--help`` start instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from streamer import __version__
from streamer.config import DEMO_CONFIG, ConfigError, Settings, apply_overrides, read_config_file

EXIT_CONFIG = 2


def _say(message: str) -> None:
    print(f"streamer: {message}", file=sys.stderr, flush=True)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument(
        "--source",
        action="append",
        metavar="NAME=URL",
        help="add or replace a source; URL is 'demo', a webcam index, a file path or rtsp://... (repeatable)",
    )
    p.add_argument("--model", metavar="HUB_ID_OR_PATH", help="model to load (hub id, local folder, or 'tiny-random')")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8765; 0 picks a free one)")
    p.add_argument(
        "--token",
        action="append",
        metavar="TOKEN",
        help="require this access token (repeatable; or STREAMER_TOKENS=a,b)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        metavar="ORIGIN",
        help="browser Origin (scheme://host[:port]) allowed besides the server's own; '*' for any (repeatable)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="Host name accepted besides localhost and loopback addresses (repeatable)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="certificate: serve wss:// and https://")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--data-dir", metavar="DIR", help="where events.db is kept (default: STREAMER_DATA, else XDG)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Answer questions about live video with Qwen2-VL.")
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the configured sources and model over WebSocket")
    _add_serve_flags(serve)

    demo = sub.add_parser("demo", help="serve a synthetic test pattern with the tiny random model (offline)")
    _add_serve_flags(demo)

    sub.add_parser("ask", help="ask a running server a question and print the streamed answer", add_help=False)
    sub.add_parser("bench", help="measure streamer against the reference pipeline (--quick: minutes)", add_help=False)

    tiny = sub.add_parser("make-tiny-model", help="build the tiny random-weight Qwen2-VL into a folder")
    tiny.add_argument("dir", type=Path, help="output folder")
    tiny.add_argument("--force", action="store_true", help="write even if the folder is not empty")
    return parser


def settings_from_args(args: argparse.Namespace, base: dict[str, Any] | None) -> Settings:
    """Config file (or ``base``) plus flags, validated."""
    if args.config:
        data, origin = read_config_file(args.config), args.config
    elif base is not None:
        data, origin = base, "built-in demo config"
    elif args.source:
        data, origin = {}, "command line"
    else:
        raise ConfigError("give --config FILE, or at least one --source NAME=URL")
    return apply_overrides(
        data,
        sources=args.source,
        model=args.model,
        host=args.host,
        port=args.port,
        tokens=args.token,
        allowed_origins=args.allowed_origin,
        allowed_hosts=args.allowed_host,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        log_json=args.log_json,
        data_dir=args.data_dir,
        origin=origin,
    )


def _banner(settings: Settings, note: str | None, host: str, port: int, device: str) -> str:
    tls = settings.server.tls_cert is not None
    url = f"{'wss' if tls else 'ws'}://{host}:{port}/ws"
    first = settings.sources[0].name
    url_flag = "" if (host, port) == ("127.0.0.1", 8765) else f" --url {url}"
    token_flag = " --token TOKEN" if settings.server.tokens else ""
    lines = [
        f"streamer {__version__} is serving on {url}",
        "  streams: " + ", ".join(f"{s.name} ({s.kind})" for s in settings.sources),
        f"  model:   {settings.model.id} on {device}",
    ]
    if note:
        lines.append(f"  NOTE:    {note}")
    lines += [
        f"  health:  {'https' if tls else 'http'}://{host}:{port}/healthz  (metrics: /metrics)",
        "Ask from another terminal:",
        f'  streamer ask --stream {first}{url_flag}{token_flag} "What is moving?"',
    ]
    rule = "=" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def run_server(settings: Settings) -> int:
    from streamer.inference.loader import ModelLoadError
    from streamer.inference.registry import engine_device
    from streamer.server.app import make_server
    from streamer.server.runtime import Runtime

    runtime = Runtime(settings)
    runtime.start_capture()
    try:
        engine = runtime.load_engine(progress=_say)
    except ModelLoadError as err:
        runtime.stop()
        print(f"error: {err}", file=sys.stderr)
        return 1
    runtime.start_inference()
    try:
        runtime.start_monitoring()
    except ValueError as err:
        runtime.stop()
        print(f"error: {err}", file=sys.stderr)
        return 1
    device = engine_device(engine)

    def on_listening(host: str, port: int) -> None:
        print(_banner(settings, engine.note, host, port, device), file=sys.stderr, flush=True)

    server = make_server(runtime, on_listening)
    try:
        server.run()
    finally:
        runtime.stop()
    return 0


def make_tiny_model(out: Path, force: bool) -> int:
    from streamer.inference.tiny import GIBBERISH_NOTE, build_tiny_model

    if out.exists() and any(out.iterdir()) and not force:
        print(f"error: {out} is not empty (use --force to write into it anyway)", file=sys.stderr)
        return 1
    build_tiny_model(out, progress=_say)
    _say(f"wrote {out}: load it with --model {out}")
    _say(f"NOTE: {GIBBERISH_NOTE}")
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ask":
        from streamer_client import main as ask_main

        return ask_main(argv[1:])
    if argv and argv[0] == "bench":
        from streamer.benchmark.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny-model":
        return make_tiny_model(args.dir, args.force)
    from streamer.inference.registry import engine_factory  # imports no engine (no torch)

    try:
        settings = settings_from_args(args, DEMO_CONFIG if args.command == "demo" else None)
        engine_factory(settings.model.backend)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(args.log_level, settings.server.log_json)
    if settings.model.is_tiny:
        _say(
            f"using the tiny random-weight model {settings.model.id!r}: "
            "its answers are gibberish (it exercises the pipeline)"
        )
    return run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
