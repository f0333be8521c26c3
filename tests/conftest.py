"""Suite-wide settings: one CPU thread per test process (CI has 2 cores; oversubscription is 4-7x slower)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # commands run in-process keep torch's one thread (docs/cli.md)

import torch

torch.set_num_threads(1)
