"""``python -m ehap_fx``: the ``ehap`` command line."""

import sys

from ehap_fx.cli import main

if __name__ == "__main__":
    sys.exit(main())
