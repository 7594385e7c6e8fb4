"""`python -m qt.datagen NAME ...`: see `qt.datagen.make`."""

import sys

from qt.datagen.make import main

sys.exit(main())
