"""The `traflow` command: five subcommands over one engine."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings

import typer

from traflow_cli.cli import bench, distill, evaluate, options, sample, teacher

# torch's forward-mode AD loads decompositions through torch.jit.script, which warns on every
# run; it is torch's own internal use, nothing a traflow user can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

app = typer.Typer(
    name="traflow",
    help="Distill a rectified-flow teacher into a 1-4 step student with TraFlow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@app.callback()
def _setup() -> None:
    options.show_warnings()


app.add_typer(teacher.app, name="teacher")
app.command("distill")(distill.distill_command)
app.command("sample")(sample.sample_command)
app.add_typer(evaluate.app, name="eval")
app.command("bench")(bench.bench_command)


def main() -> None:
    # A script's background job (`traflow ... &`) starts with SIGINT ignored, and Python then
    # keeps it ignored: restore Ctrl-C's KeyboardInterrupt so that every subcommand stops with
    # its one line and exit code 130 there too (training, sample and eval fid also catch SIGTERM).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code: int = 1
    try:
        app()
    except SystemExit as exc:  # how click ends every command, with its exit code
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        # The command is over and its files are written: a Ctrl-C while the interpreter shuts
        # down (its atexit hooks) would print a traceback and keep the exit code; end at once
        # with the command's own code instead.
        signal.signal(signal.SIGINT, lambda *_: _exit_now(code))


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
