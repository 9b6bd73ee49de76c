"""NeMo-Run experiment: Math-only RL stages (8K -> 16K -> 24K -> 32K). See launchers/common.py for the options.

python -m launchers.math_stage --executor local
python -m launchers.math_stage --executor slurm --help
"""

import sys

from launchers.common import main

if __name__ == "__main__":
    sys.exit(main("math"))
