"""``python -m iterators.datasets`` keeps working: an alias of ``python -m iterators.tools.datasets`` (see that module)."""
import sys

from iterators.tools.datasets import main

if __name__ == "__main__":
    sys.exit(main())
