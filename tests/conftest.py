"""Shared test set-up: one torch thread per pytest-xdist worker (two workers share two cores)."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
torch.manual_seed(0)
