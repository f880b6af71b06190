import sys

from lora_engine.apps.cli import main

sys.exit(main())
