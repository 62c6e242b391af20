"""``python -m iterators.build_rec`` keeps working: an alias of ``python -m iterators.tools.build_rec`` (see that module)."""
import sys

from iterators.tools.build_rec import main

if __name__ == "__main__":
    sys.exit(main())
