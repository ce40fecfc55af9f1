import sys

from bmretriever_jax.cli.main import main

sys.exit(main())
