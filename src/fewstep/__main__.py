"""``python -m fewstep`` runs the same CLI as the ``fewstep`` console script."""

import sys

from fewstep.cli import main

sys.exit(main())
