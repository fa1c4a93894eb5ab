"""`python -m ember.cli` (what torchrun launches) runs the `ember` command."""

import sys

from .main import main

sys.exit(main())
