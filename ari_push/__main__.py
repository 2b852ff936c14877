import sys

from ari_push.cli import main

sys.exit(main())
