import sys

from squad_ds.search.command import main

sys.exit(main())
