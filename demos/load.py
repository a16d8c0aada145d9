#!/usr/bin/env python
"""Load test for `badger serve` (the module lives in the package: badger_runtime/serve/load.py).

    python demos/load.py --policy guessing-converge-v2 --clients 4 --steps 500 --experts 32 --dims 3 --rounds 4
"""

from badger_runtime.serve.load import main

if __name__ == "__main__":
    main()
