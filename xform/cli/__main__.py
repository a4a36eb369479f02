"""``python -m xform.cli``: the ``xform`` command line."""

import sys

from xform.cli import main

if __name__ == "__main__":
    sys.exit(main())
