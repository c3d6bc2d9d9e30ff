import sys

from linattn.cli import main

sys.exit(main())
