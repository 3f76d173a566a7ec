"""``python -m daemon --bootstrap HOST:PORT --input T --alerts T --model M --group G --state-dir D``:
the same as ``streamrnn daemon``."""

import sys

from daemon.cli import main

sys.exit(main())
