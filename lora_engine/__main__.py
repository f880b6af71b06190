import sys

from lora_engine.cli import main

sys.exit(main())
