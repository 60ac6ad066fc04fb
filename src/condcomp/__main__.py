"""``python -m condcomp`` == the ``condcomp`` command."""

import sys

from condcomp.cli import main

sys.exit(main())
