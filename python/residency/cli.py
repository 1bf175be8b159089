"""The ``residency`` command line: one ``_add_<command>`` function per subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from residency import __version__

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="residency",
        description="Keeps the right LLMs resident in GPU or host memory and swaps them on demand.",
    )
    parser.add_argument("--version", action="version", version=f"residency {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


# Each entry adds one subcommand and sets `handler` (a Handler) as its default.
_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from residency import server

    parser = sub.add_parser(
        "serve",
        help="serve the Ollama and OpenAI APIs (default 127.0.0.1:11434)",
        description="Serve the Ollama API (/api/*) and the OpenAI API (/v1/*) over the scheduler.",
    )
    server.add_arguments(parser)
    parser.set_defaults(handler=server.run)


_COMMANDS.append(_add_serve)


def _add_devices(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from residency.memory import add_devices_command

    add_devices_command(sub)


_COMMANDS.append(_add_devices)


def _add_estimate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from residency.estimate.cli import add_parser

    add_parser(sub)


_COMMANDS.append(_add_estimate)


def _add_client_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from residency.cli_client import add_commands

    add_commands(sub)


_COMMANDS.append(_add_client_verbs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
