"""`python -m toolkit.rollout.server --profile P --gpus …|cpu --dp N --tp N --host H --port P [--set …]`.

The guard matters: DP workers are spawned, and spawn re-imports this module as `__mp_main__`.
"""

from toolkit.rollout.server.cli import main

if __name__ == "__main__":
    main()
