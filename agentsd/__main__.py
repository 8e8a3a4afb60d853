import sys

from agentsd.tools.cli import main

sys.exit(main())
