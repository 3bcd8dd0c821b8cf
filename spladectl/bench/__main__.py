"""The child process of run_bench(isolate=True): one precision's row, asked for on stdin."""

import sys

from spladectl.bench.run import child_main

sys.exit(child_main())
