import sys

from pyrossl.cli import main

sys.exit(main())
