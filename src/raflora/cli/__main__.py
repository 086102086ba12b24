"""``python -m raflora.cli``: the same as the ``raflora`` console script."""

import sys

from raflora.cli import main

sys.exit(main())
