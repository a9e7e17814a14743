"""`python -m pathoscope.app.bench` = `pathoscope bench` (the RSS section's children use it)."""

import sys

from pathoscope.app.bench.run import main
from pathoscope.app.cpu import keep_freed_memory

keep_freed_memory()  # as `pathoscope bench` (pathoscope.app.cpu)
sys.exit(main())
