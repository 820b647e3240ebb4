"""Trainer tests: one intra-op thread (the test machines have 2 shared cores)."""

import torch

torch.set_num_threads(1)
