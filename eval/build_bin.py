"""``python -m eval.build_bin`` keeps working: an alias of ``python -m iterators.tools.build_bin`` (see that module)."""
import sys

from iterators.tools.build_bin import main

if __name__ == "__main__":
    sys.exit(main())
