"""``python -m router.cli``: the ``stellwerk`` command without the installed console script."""

import sys

from router.cli import main

sys.exit(main())
