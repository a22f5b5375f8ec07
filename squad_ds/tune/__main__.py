"""`python -m squad_ds.tune …` is `squad-ds tune …`."""
import sys

from squad_ds.tune.search import main

sys.exit(main())
