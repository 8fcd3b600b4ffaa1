"""Run the Triton kernels in Triton's interpreter when there is no GPU.

Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when `kernels.*` is
first imported, reading TRITON_INTERPRET at that moment. pytest loads this conftest before it
imports any test module of this directory, so setting the variable here is early enough,
unless another conftest or test collected earlier already imported `kernels`; the
`interpreted` fixture catches that case and says so. On a CUDA machine the variable is left
alone: the GPU tests there need compiled kernels, and the interpreter tests are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def interpreted() -> None:
    from kernels.blockwise import kernel_is_interpreted

    if torch.cuda.is_available() and not kernel_is_interpreted():
        pytest.skip("CUDA machine: the kernels are compiled; see test_gpu.py")
    if not kernel_is_interpreted():
        pytest.fail(
            "kernels was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1 "
            "(or it is set to 0): run with TRITON_INTERPRET=1"
        )
