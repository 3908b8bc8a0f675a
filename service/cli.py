"""`normfuse serve`: settings from NORMFUSE_* environment variables, overridden by the flags given."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)

SECRET = {"restricted_api"}  # settings whose values carry keys: an error names the setting, never shows the value
SEMICOLON_JOINED = {"restricted_api"}  # repeatable settings whose values contain ',' themselves

# NORMFUSE_* variables read by other parts of normfuse, which the server must not call typos
NOT_SERVER_SETTINGS = {
    "NORMFUSE_CACHE_DIR",  # convert/models/vit_digits.py: where built-in model weights are cached
}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def register(subparsers: argparse._SubParsersAction) -> None:
    """`normfuse serve`'s flags, made by pydantic-settings' CLI source from the Settings fields: one flag per field
    (list fields repeatable, each value may still be "a,b"); only flags actually given override the environment."""
    from pydantic_settings import CliSettingsSource

    from service.settings import Settings

    parser = subparsers.add_parser("serve", help="serve a model repository over the Open Inference Protocol v2",
                                   description=__doc__)
    source = CliSettingsSource(Settings, root_parser=parser, cli_prog_name="normfuse serve", cli_kebab_case=True,
                               cli_hide_none_type=True, add_argument_method=_add_argument)
    parser.set_defaults(handler=serve, settings_source=source)


def _add_argument(parser: argparse.ArgumentParser, *names: str, **kwargs):
    """How the CLI source adds a field's flag: our help (description, variable, default) and lenient numbers."""
    from service.settings import Settings

    field = Settings.model_fields.get(kwargs.get("dest", ""))
    if field is not None:
        kwargs["help"] = _help(kwargs["dest"], field)
        kwargs["default"] = None  # a flag not given reads None (not absent); build_settings passes on the rest
        if field.annotation in (int, float):
            kwargs["type"] = _lenient(field.annotation)
    return parser.add_argument(*names, **kwargs)


def _help(name: str, field) -> str:
    """'DESCRIPTION (NORMFUSE_NAME; default: VALUE)', or '(NORMFUSE_NAME; required)'."""
    from pydantic_core import PydanticUndefined

    if field.is_required():
        default = "required"
    elif field.default is not PydanticUndefined:
        default = f"default: {field.default if field.default is not None else 'none'}"
    else:
        default = f"default: {field.default_factory() or 'none'}"
    choices = getattr(field.annotation, "__args__", None) if "Literal" in str(field.annotation) else None
    what = field.description or (" | ".join(map(str, choices)) if choices else "")
    return f"{what} (NORMFUSE_{name.upper()}; {default})".replace("%", "%%").lstrip(" ")


def _lenient(kind: type):
    """int/float for numeric settings, but a value that does not parse is passed on as given, so the settings
    report every bad value at once (one line each, the number as a number) instead of argparse stopping at the
    first."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    parse.__name__ = kind.__name__
    return parse


def build_settings(args: argparse.Namespace):
    """Settings from the flags given (through the CLI source `register` made), then NORMFUSE_*, then defaults."""
    from service.settings import Settings

    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields and value is not None}
    for name in SEMICOLON_JOINED.intersection(given):  # the CLI source joins a repeated flag with ',', which these
        given[name] = ";".join(given[name])  # values use themselves (API[,API]:HEADER=VALUE): ';' as in the env
    return Settings(_cli_settings_source=args.settings_source(parsed_args=given))


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = build_settings(args)
    except ValidationError as exc:
        sys.stderr.write("normfuse serve: invalid settings:\n" + "\n".join(setting_errors(exc)) + "\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in unknown_variables(os.environ):
        log.warning("%s is not a server setting (typo?); known: NORMFUSE_{%s}", name,
                    ",".join(f.upper() for f in type(settings).model_fields))
    build_server(settings).run()
    return 0


def setting_errors(exc) -> list[str]:
    """One line per invalid setting: its flag and variable, the value given, what is allowed."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f"{flag_of(name)} / NORMFUSE_{name.upper()}" if name else "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            lines.append(f"  {where}: required, not given")
        elif error["type"] == "extra_forbidden":
            lines.append(f"  {name}: not a setting")
        elif name in SECRET:
            lines.append(f"  {where}: {message}")
        else:
            lines.append(f"  {where} = {error.get('input')!r}: {message}")
    return lines


def unknown_variables(environ) -> list[str]:
    from service.settings import Settings

    return sorted(k for k in environ if k.startswith("NORMFUSE_") and k[9:].lower() not in Settings.model_fields
                  and k not in NOT_SERVER_SETTINGS)


def build_server(settings, loader=None):
    """A uvicorn server for the app whose SIGTERM/SIGINT handler turns readiness false and stops gRPC from
    accepting calls before shutting down. `loader`: how engines are opened (create_app's; default engines.load)."""
    import uvicorn

    from service.app import create_app

    app = create_app(settings, loader)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)), access_log=False,
                            limit_concurrency=settings.max_connections)  # more connections -> 503 from uvicorn
    server = uvicorn.Server(config)
    exit_handler = server.handle_exit

    def handle_exit(sig, frame) -> None:  # readiness goes false first, then uvicorn's graceful shutdown
        app.state.ready = False
        if app.state.grpc is not None:  # gRPC refuses new calls now too (the lifespan waits for accepted ones)
            app.state.grpc.stop_accepting()
        exit_handler(sig, frame)

    server.handle_exit = handle_exit
    return server
