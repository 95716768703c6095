"""`python -m drp.bench`: see drp/bench/run.py."""

import sys

from .run import main

sys.exit(main())
