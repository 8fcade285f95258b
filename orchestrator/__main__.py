import sys

from orchestrator.cli import module_main

sys.exit(module_main())
