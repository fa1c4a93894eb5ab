"""Moved to `ember.args.parser`; this name stays for scripts that import it."""

from ember.args.parser import *  # noqa: F403
from ember.args.parser import __all__ as __all__
