"""``python -m emclip.cli``: same as the ``emclip`` command."""

import sys

from .main import main

sys.exit(main())
