"""`python -m pathoscope.app.bench` = `pathoscope bench` (the RSS section's children use it)."""

import sys

from pathoscope.app.bench.run import main

sys.exit(main())
