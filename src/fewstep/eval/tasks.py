"""Old name of :mod:`fewstep.eval.benchmarks` (the benchmark registry), kept as an alias of the same module.

Renamed so that it no longer clashes with :mod:`fewstep.tasks` (the embedded synthetic task).
"""

import sys

from fewstep.eval import benchmarks

sys.modules[__name__] = benchmarks
