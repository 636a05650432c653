"""``python -m fedsafe``."""

import sys

from fedsafe.cli.main import main

sys.exit(main())
