"""``python -m carddeck``: the ``carddeck`` command (:mod:`carddeck.commands.cli`)."""

import sys

from carddeck.commands.cli import main

sys.exit(main())
