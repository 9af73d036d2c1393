"""``python -m batchnorm``: the same as the ``batchnorm`` command."""

from batchnorm.cli import main

raise SystemExit(main())
