"""``python -m batchnorm.bench``."""

from batchnorm.bench import main

raise SystemExit(main())
