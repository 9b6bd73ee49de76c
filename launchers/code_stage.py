"""NeMo-Run experiment: Code-only RL stages (24K -> 32K), after the math stages. See launchers/common.py for the options.

python -m launchers.code_stage --executor local
python -m launchers.code_stage --executor slurm --help
"""

import sys

from launchers.common import main

if __name__ == "__main__":
    sys.exit(main("code"))
