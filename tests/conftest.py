"""Shared test setup. Triton kernels run under the interpreter when no GPU is present; that
switch must be set before any Triton kernel is defined, hence here, before the tests import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
