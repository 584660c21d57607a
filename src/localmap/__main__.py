import sys

from localmap.cli import main

sys.exit(main())
