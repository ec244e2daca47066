import sys

from pyrossl.cli import console

sys.exit(console())
