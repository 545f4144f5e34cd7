import sys

from turnstorm.cli import main

sys.exit(main())
