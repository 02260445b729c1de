"""``python -m codestop.cli``."""

import sys

from codestop.cli.main import main

sys.exit(main())
