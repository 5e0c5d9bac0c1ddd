"""The devices the tests run on: the CPU always, CUDA when present."""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
