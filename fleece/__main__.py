import sys

from fleece.cli import main

sys.exit(main())
