"""segreplay: replay Segment archive exports into Braze's /users/track.

The package is importable as a library; `segreplay.cli` is the only module that knows click.
"""

__version__ = "0.1.0"
