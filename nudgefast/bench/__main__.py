"""`python -m nudgefast.bench ...` is `nudgefast bench ...`."""
import sys

from .cli import main

sys.exit(main())
