"""`python -m dblayer.scaffold TARGET --package NAME` (see the package's docstring)."""

import sys

from dblayer.scaffold import main

sys.exit(main())
