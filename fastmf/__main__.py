import sys

from fastmf.cli import main

sys.exit(main())
