"""`python -m flexo …` is `flexo …`."""

import sys

from flexo.cli import main

sys.exit(main())
