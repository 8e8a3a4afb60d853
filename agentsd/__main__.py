import sys

from agentsd.cli import main

sys.exit(main())
