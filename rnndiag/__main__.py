import sys

from rnndiag.cli import main

sys.exit(main())
