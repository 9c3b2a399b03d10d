"""`python -m blip3.train CONFIG.yaml [--resume] ...`, the entry point torchrun launches on every rank:

    torchrun --nproc-per-node 8 -m blip3.train manifests/xgenmm/pipeline.yaml
"""

import sys

from blip3.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    main()
