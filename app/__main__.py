"""`python -m app`: serve the playground page (http://127.0.0.1:7860 unless told otherwise)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from engines.cli.common import add_model_argument
from engines.protocol import EngineError

DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    # No default here: $PORT is read when the app starts, so a bad $PORT cannot break --help.
    parser.add_argument("--port", type=int, default=None, help=f"port (default $PORT or {DEFAULT_PORT})")
    add_model_argument(parser, default="PLAYGROUND_MODEL or the embedded SmolLM2-135M-Instruct, in chat mode")
    parser.add_argument("--max-panes", type=int, default=6, help="most engines shown side by side (default 6)")
    parser.add_argument("--refresh-hz", type=float, default=5.0,
                        help="page updates per second while streaming (default 5; 4-10 is sensible)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait in Gradio's queue before visitors get 'queue full' (default 16)")
    return parser


def resolve_port(port: int | None, environ=os.environ) -> int:
    """The --port value, else $PORT, else 7860; ValueError with a message for the user when it is no port."""
    if port is None:
        text = environ.get("PORT", "").strip()
        if not text:
            return DEFAULT_PORT
        if not text.isdigit():
            raise ValueError(f"PORT must be a whole number from 1 to 65535, got {text!r}")
        port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"the port must be from 1 to 65535, got {port}")
    return port


def config_from_args(args: argparse.Namespace, environ=os.environ):
    """The AppConfig that `python -m app` serves; ValueError with a message for the user on bad options."""
    from app.callbacks import AppConfig
    if not 1 <= args.max_panes <= 12 or not 0.5 <= args.refresh_hz <= 20 or args.max_queue < 1:
        raise ValueError("--max-panes must be 1-12, --refresh-hz 0.5-20 and --max-queue at least 1")
    return AppConfig(model=args.model, host=args.host, port=resolve_port(args.port, environ),
                     max_panes=args.max_panes, refresh_hz=args.refresh_hz, max_queue=args.max_queue)


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is this machine only; a name other than localhost counts as not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def apply_exposure_policy(host: str, environ=os.environ) -> str:
    """A page that listens beyond loopback applies the hosted mode's allow-lists (PLAYGROUND_HOSTED=1, read
    by engines.models.catalog.is_hosted) unless the operator set PLAYGROUND_HOSTED themselves; the line
    to tell the operator, or "" on loopback."""
    if is_loopback(host):
        return ""
    if environ.get("PLAYGROUND_HOSTED", "").strip() == "":
        environ["PLAYGROUND_HOSTED"] = "1"
    if environ["PLAYGROUND_HOSTED"] == "1" or environ.get("SPACE_ID"):  # catalog.is_hosted's rule
        return (f"listening on {host}, beyond this machine: hosted mode is on, so only allowed models and folders "
                f"are read (PLAYGROUND_ALLOWED_MODELS, PLAYGROUND_ALLOWED_MODEL_DIRS); PLAYGROUND_HOSTED=0 turns "
                f"it off")
    return (f"listening on {host}, beyond this machine, with hosted mode off (PLAYGROUND_HOSTED="
            f"{environ['PLAYGROUND_HOSTED']}): visitors may name any model or path this machine can read")


def create(config):
    """Build the Blocks and its launch options for one AppConfig; every handle lives in the result."""
    demo, options, _ = _build(config)
    return demo, options


def _build(config, preload: bool = True):
    """The page for `config`; its model is --model, else app.session.app_default_model(). With preload, the
    page's default engines start loading in a background thread now, so the first Run finds them ready."""
    from app.callbacks import Playground
    from app.layout import build_app, launch_options
    from app.session import EnginePool, app_default_model, build_choices
    playground = Playground(config, EnginePool(config.model or app_default_model(), build_choices()))
    demo = build_app(playground)
    if preload and os.environ.get("PLAYGROUND_PRELOAD", "1") != "0":
        playground.start_preload()
    return demo, launch_options(playground), playground


def serve(config) -> int:
    """Build and launch the page (blocks until it stops); shared by `python -m app` and app/space.py.
    A model that cannot be used, a port in use or a host not of this machine is one line on stderr, exit 2.
    SIGTERM, SIGINT and Ctrl-C close the page, unload the engines and end every process they started
    (engines.cli.ProcessOwner), within 10 s; a watchdog does it if the app is killed outright."""
    from engines.cli import ProcessOwner
    note = apply_exposure_policy(config.host)
    if note:
        print(note, file=sys.stderr)
    with ProcessOwner() as owner:
        try:
            demo, options, playground = _build(config)
        except EngineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return owner.exit_status
        owner.unload = playground.pool.unload_all
        try:
            demo.launch(**options)  # returns when a signal interrupts it (Gradio closes the server)
        except KeyboardInterrupt:
            pass
        except OSError:
            # Gradio's own text for a port it cannot bind suggests Gradio settings, not this app's options.
            if _is_port_taken(config.port):
                print(f"error: port {config.port} is in use (set --port or PORT)", file=sys.stderr)
            else:
                print(f"error: cannot listen on {config.host}:{config.port}; --host must be an address of this "
                      f"machine (127.0.0.1, or 0.0.0.0 for all)", file=sys.stderr)
            return 2
    return owner.exit_status


def _is_port_taken(port: int) -> bool:
    """Whether something listens on the port; Gradio probes loopback the same way before binding the host."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
