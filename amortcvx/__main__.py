"""``python -m amortcvx``: see :mod:`amortcvx.cli`."""

import sys

from amortcvx.cli import main

if __name__ == "__main__":  # worker processes (spawned) import this module without running it
    sys.exit(main())
