import sys

from dpoc.cli import main

sys.exit(main())
