"""``python -m recognition.train_softmax``: insightface's softmax/margin-softmax trainer (thin entry point).

parse flags -> config (:mod:`recognition.config`) -> :func:`recognition.engine.fit`. Exit status 0 when
training ends (``--max-steps`` or ``--end-epoch``), 1 on a configuration error or non-finite loss.
"""
import logging
import sys

from eval.runtime import configure_threads
from iterators.formats.cli import run_cli
from recognition.hooks import NonFiniteError
from recognition.config import ConfigError, parse_args
from recognition.engine import LOG_FORMAT, fit


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m recognition.train_softmax")


def _main(argv=None):
    """Console entry point (``insightface-train-softmax``)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        config = parse_args(argv)
        configure_threads(ctx=config.ctx)
        result = fit(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"finished at global step {result.global_step} ({result.stopped}); run directory {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
