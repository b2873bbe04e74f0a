"""`python -m npuserve ...`: the same as the `npuserve` console script."""

import sys

from npuserve.cli import main

sys.exit(main())
