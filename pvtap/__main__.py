import sys

from pvtap.cli import main

sys.exit(main())
