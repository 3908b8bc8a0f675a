"""`normfuse serve`: settings from NORMFUSE_* environment variables, overridden by the flags given."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)

# flag -> Settings field; only flags actually given override the environment
FLAGS = {
    "--repo": ("repo", str, "model repository (NORMFUSE_REPO)"),
    "--host": ("host", str, "bind address (NORMFUSE_HOST, default 127.0.0.1)"),
    "--port": ("port", int, "port (NORMFUSE_PORT, default 8000; 0 picks a free one)"),
    "--grpc-port": ("grpc_port", int, "OIP v2 over gRPC (NORMFUSE_GRPC_PORT, default 8001; 0 = no gRPC)"),
    "--backend": ("backend", str, "onnxruntime | tensorrt | torch (NORMFUSE_BACKEND)"),
    "--max-batch-size": ("max_batch_size", int, "rows per engine run (NORMFUSE_MAX_BATCH_SIZE)"),
    "--max-queue-delay-ms": ("max_queue_delay_ms", float, "batching window (NORMFUSE_MAX_QUEUE_DELAY_MS)"),
    "--preferred-batch-sizes": ("preferred_batch_sizes", str, "e.g. 4,8 (NORMFUSE_PREFERRED_BATCH_SIZES)"),
    "--max-queue-size": ("max_queue_size", int, "queued requests per variant before 503 (NORMFUSE_MAX_QUEUE_SIZE)"),
    "--default-variant": ("default_variant", str, "variant for requests without a version; default: the manifest's "
                          "(NORMFUSE_DEFAULT_VARIANT)"),
    "--shadow-rate": ("shadow_rate", float, "fraction of batches re-run on unfused (NORMFUSE_SHADOW_RATE)"),
    "--warmup-batch-sizes": ("warmup_batch_sizes", str, "e.g. 1,8 (NORMFUSE_WARMUP_BATCH_SIZES)"),
    "--intra-op-threads": ("intra_op_threads", int, "engine threads, 0 = default (NORMFUSE_INTRA_OP_THREADS)"),
    "--device": ("device", str, "torch backend: cpu | cuda (NORMFUSE_DEVICE)"),
    "--torch-mode": ("torch_mode", str, "torch backend: eager | compile (NORMFUSE_TORCH_MODE)"),
    "--ort-providers": ("ort_providers", str, "onnxruntime backend: e.g. cuda,tensorrt (NORMFUSE_ORT_PROVIDERS)"),
    "--log-level": ("log_level", str, "debug | info | warning | error (NORMFUSE_LOG_LEVEL)"),
}


# NORMFUSE_* variables read by other parts of normfuse, which the server must not call typos
NOT_SERVER_SETTINGS = {
    "NORMFUSE_CACHE_DIR",  # convert/models/vit_digits.py: where built-in model weights are cached
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model repository over the Open Inference Protocol v2",
                                   description=__doc__)
    for flag, (dest, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    parser.set_defaults(handler=serve)


def build_settings(args: argparse.Namespace):
    from service.settings import Settings

    overrides = {dest: getattr(args, dest) for dest, *_ in FLAGS.values() if getattr(args, dest, None) is not None}
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = build_settings(args)
    except ValidationError as exc:
        sys.stderr.write(f"normfuse serve: invalid settings:\n{exc}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in unknown_variables(os.environ):
        log.warning("%s is not a server setting (typo?); known: NORMFUSE_{%s}", name,
                    ",".join(f.upper() for f in type(settings).model_fields))
    build_server(settings).run()
    return 0


def unknown_variables(environ) -> list[str]:
    from service.settings import Settings

    return sorted(k for k in environ if k.startswith("NORMFUSE_") and k[9:].lower() not in Settings.model_fields
                  and k not in NOT_SERVER_SETTINGS)


def build_server(settings):
    """A uvicorn server for the app whose SIGTERM/SIGINT handler turns readiness false and stops gRPC from
    accepting calls before shutting down."""
    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)), access_log=False)
    server = uvicorn.Server(config)
    exit_handler = server.handle_exit

    def handle_exit(sig, frame) -> None:  # readiness goes false first, then uvicorn's graceful shutdown
        app.state.ready = False
        if app.state.grpc is not None:  # gRPC refuses new calls now too (the lifespan waits for accepted ones)
            app.state.grpc.stop_accepting()
        exit_handler(sig, frame)

    server.handle_exit = handle_exit
    return server
