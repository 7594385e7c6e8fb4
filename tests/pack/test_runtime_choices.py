"""The accelerator choices of a packed step, decided without the accelerator at hand."""

from __future__ import annotations

import torch

from qt.runtime import autocast_dtype, compile_by_default, compile_mode, cpu_has_amx, enable_tf32

EPYC = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_amx_is_read_from_the_cpu_flags():
    assert not cpu_has_amx(EPYC)  # avx512_bf16 is not AMX
    assert cpu_has_amx(SAPPHIRE)
    assert not cpu_has_amx("flags : amx_bf16x\n")  # whole flags only


def test_bf16_autocast_only_on_cuda_or_a_cpu_with_amx():
    assert autocast_dtype("cuda") is torch.bfloat16
    assert autocast_dtype("cpu", amx=True) is torch.bfloat16
    assert autocast_dtype("cpu", amx=False) is None
    assert autocast_dtype("mps", amx=True) is None


def test_cuda_graphs_on_cuda_inductor_default_elsewhere():
    assert compile_mode("cuda") == "reduce-overhead"
    assert compile_mode("cpu") is None


def test_tf32_is_set_on_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not enable_tf32("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert enable_tf32("cuda")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_packs_compile_by_default_on_cuda_only():
    """A pack left to choose compiles on CUDA (launch-bound) and runs eagerly on the CPU, where
    compiling cost minutes and gained nothing; an explicit choice wins."""
    from qt.pack.module import PackedQTModule
    from tests.pack.conftest import SHARED

    assert compile_by_default("cuda") is True
    assert compile_by_default("cpu") is False
    chosen = {}
    for choice in (None, True, False):
        pack = PackedQTModule([dict(seed=1)], compile=choice, **SHARED)
        pack._step_fn()  # built for this module's device (the CPU), not run
        [(device, _, compiled)] = pack._step_fns
        chosen[choice] = (device, compiled)
    assert chosen == {None: ("cpu", False), True: ("cpu", True), False: ("cpu", False)}
