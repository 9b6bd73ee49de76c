"""NeMo-Run experiment: the SFT warm start alone (`megatron-rl sft`; the trainer's SFT needs the synthetic task, so the tiny config). See launchers/common.py for the options.

python -m launchers.sft --executor local
python -m launchers.sft --executor slurm --help
"""

import sys

from launchers.common import main

if __name__ == "__main__":
    sys.exit(main("sft"))
