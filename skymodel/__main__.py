import sys

from skymodel.cli import main

sys.exit(main())
