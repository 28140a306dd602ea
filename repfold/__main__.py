import sys

from repfold.cli import main

sys.exit(main())
