import sys

from linmix.cli import main

sys.exit(main())
