"""``python -m clipadapt.cli``: the same as the ``clipadapt`` command."""

import sys

from clipadapt.cli.main import main

sys.exit(main())
