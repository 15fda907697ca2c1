"""Entry point of a tensor-parallel rank process: `python -m fdkit.engine.rank_worker ARGS_JSON`."""

import json
import sys

from fdkit.engine.tp_engine import rank_main

if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
