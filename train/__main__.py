"""`python -m train CONFIG.yaml [--resume] ...`, the entry point torchrun launches on every rank:

    torchrun --nproc-per-node 8 -m train manifests/xgenmm/pipeline.yaml
"""

import sys

from cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    main()
