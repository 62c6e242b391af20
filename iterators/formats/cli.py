"""The error boundary of every command-line entry point: one clear line per bad input, ``--debug`` for the traceback.

Every ``python -m ...`` tool of the project (training, evaluation, dataset tools) runs its ``main`` through
:func:`run_cli`: an exception (a malformed ``.rec``/``.bin``/``property``, a missing or unreadable file, a bad
value, a full disk, a held lock, an MXNet error) ends the process with status 1 and ONE line on stderr,
``<prog>: error: <message>``; ``--debug`` anywhere on the command line prints the traceback as well. It lives with
the formats because every package (eval, iterators, recognition) may import this one home.
"""
import os
import sys
import traceback

DEBUG_FLAG = "--debug"


def one_line(exc):
    """The informative single line of an exception's message (MXNetError puts a C++ stack first)."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename and exc.strerror and exc.filename not in text.split(":")[0]:
        text = f"{exc.strerror}: {exc.filename}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and ("Traceback" in lines[0] or "Stack trace" in text):
        return lines[-1]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def run_cli(main, argv=None, prog=None):
    """Call ``main(argv)`` (argv without ``--debug``) and turn any exception into one line; returns the exit status.

    ``SystemExit`` (argparse's usage errors, ``--help``) passes through; Ctrl-C gives status 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("INSIGHTFACE_MX_DEBUG") == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]
    prog = prog or os.path.basename(sys.argv[0] or "insightface-mx")
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes one line
        if debug:
            traceback.print_exc()
        kind = "" if isinstance(exc, (OSError, ValueError, RuntimeError, KeyError)) else f" ({type(exc).__name__})"
        hint = "" if debug else f" [{DEBUG_FLAG} shows the traceback]"
        print(f"{prog}: error: {one_line(exc)}{kind}{hint}", file=sys.stderr)
        return 1
