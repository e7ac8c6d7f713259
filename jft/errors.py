"""User-facing errors: one line that names the file, field or key, and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class JftError(Exception):
    """A problem with the user's input (path, file contents, config key).

    The message is shown to the user as is, on one line, so it must name the file,
    field or key and say what would be valid.
    """


class ConfigValueError(JftError):
    """A config key's value found wrong only once the model is known (e.g. targets that
    match no module). `key` is its dotted name, so a CLI can name the config file too."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs a CLI entry point; bad input becomes one stderr line and exit 2.

    `--debug` anywhere in argv keeps the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        return int(main(argv) or 0)
    except JftError as error:
        if debug:
            raise
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
