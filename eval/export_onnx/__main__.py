"""``python -m eval.export_onnx``: see :mod:`eval.export_onnx.cli`."""
import sys

from .cli import main

sys.exit(main())
