"""The sm_80 / sm_90 compile check works on this CPU machine, through the interpreter too."""

import importlib
import sys
import textwrap

import pytest

from kernels.compile_check import CompileJob, _parse_usage, compile_for_gpu

DEMO = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(y_ptr + offs, x * 2, mask=mask)
''')


@pytest.fixture
def demo_kernel(tmp_path, monkeypatch):
    (tmp_path / "clt_demo_kernel.py").write_text(DEMO)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = importlib.import_module("clt_demo_kernel")
    yield module._scale_kernel
    sys.modules.pop("clt_demo_kernel", None)


def test_compiles_for_sm80_and_sm90_without_spills(demo_kernel):
    sig = {"x_ptr": "*bf16", "y_ptr": "*fp32", "n": "i32"}
    jobs = [CompileJob(demo_kernel, sig, {"BLOCK": 1024}, arch=arch) for arch in (80, 90)]
    usages = compile_for_gpu(jobs)
    assert [u.name for u in usages] == ["_scale_kernel@sm_80", "_scale_kernel@sm_90"]
    for usage in usages:
        assert 0 < usage.registers <= 255 and usage.spill_bytes == 0


def test_compile_errors_are_reported(demo_kernel):
    bad = CompileJob(demo_kernel, {"x_ptr": "*bf16", "y_ptr": "*fp32", "n": "i32"},
                     {"BLOCK": 1000})  # arange needs a power of two
    with pytest.raises(RuntimeError, match="power of 2|power of two"):
        compile_for_gpu([bad])


def test_parse_usage_reads_spills():
    text = "Function _k:\nREG:64 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:560 TEXTURE:0"
    usage = _parse_usage(text, "_k")
    assert (usage.registers, usage.stack_bytes, usage.spill_bytes) == (64, 16, 8)
    with pytest.raises(RuntimeError, match="could not read"):
        _parse_usage("garbage", "_k")


def test_every_op_kernel_compiles_for_sm80_sm90_without_spills():
    """The jobs each op module exports (``compile_jobs``) cover every kernel of that module, and
    all compile at the launchers' production block sizes with no spills and no stack frame
    beyond what the job allows."""
    import importlib

    from kernels.compile_check import OP_MODULES, all_jobs, check_all

    jobs = all_jobs()
    for name in OP_MODULES:
        module = importlib.import_module(f"kernels.{name}")
        kernels_here = {n for n, v in vars(module).items()
                        if n.endswith("_kernel") and type(v).__name__ in ("JITFunction",
                                                                          "InterpretedFunction")}
        covered = {j.name.split("@")[0] for j in jobs}
        assert kernels_here and kernels_here <= covered, (name, kernels_here - covered)
    usages, bad = check_all(jobs)
    print("\n".join(f"{u.name}: {u.registers} regs, stack {u.stack_bytes}, spill "
                    f"{u.spill_bytes}" for u in usages))
    assert len(usages) == len(jobs) and not bad, "\n".join(bad)
