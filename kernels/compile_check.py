"""Compile Triton kernels for NVIDIA GPUs on a machine without one, and read their resources.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin through the bundled ptxas) without a driver, and the bundled ``cuobjdump`` reports
registers, stack and spills. That catches GPU-only failures the interpreter cannot see (lowering
errors, register spills at production block sizes).

Under ``TRITON_INTERPRET=1`` (the CPU test suite) ``@triton.jit`` yields interpreter objects that
cannot be compiled, so the jobs then run in one subprocess with the interpreter off.

    job = CompileJob(my_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}, arch=90)
    [usage] = compile_for_gpu([job])
    assert usage.spill_bytes == 0

Every op module exports ``compile_jobs(arch)``: its kernels at the launchers' production block
sizes; :func:`all_jobs` collects them and :func:`check_all` compiles them and reports any that
spills or keeps a stack frame beyond its job's ``max_stack_bytes``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton


@dataclass(frozen=True)
class CompileJob:
    """One kernel at one set of compile-time constants for one architecture.

    ``signature`` maps every runtime argument to a Triton type (``"*fp32"``, ``"*bf16"``,
    ``"*i32"``, ``"*i64"``, ``"i32"``, ``"i64"``, ``"fp32"``); ``constexprs`` gives every
    ``tl.constexpr`` argument.
    """

    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    arch: int = 90
    num_warps: int = 4
    max_stack_bytes: int = 0  # a stack frame is a near-spill: none unless a job says so

    @property
    def name(self) -> str:
        return f"{_python_fn(self.fn).__name__}@sm_{self.arch}"


@dataclass(frozen=True)
class ResourceUsage:
    name: str
    registers: int
    stack_bytes: int
    spill_bytes: int  # LOCAL memory: register spills, must be 0 at production block sizes
    shared_bytes: int


def _python_fn(fn):
    """The plain Python function behind a JITFunction or an InterpretedFunction."""
    return getattr(fn, "fn", fn)


def _cuobjdump() -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path} (is this a CUDA build of triton?)")
    return path


def _parse_usage(text: str, name: str) -> ResourceUsage:
    """Parse ``cuobjdump --dump-resource-usage`` (``REG:40 STACK:0 SHARED:0 LOCAL:0 ...``)."""
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"could not read resource usage of {name} from cuobjdump:\n{text}")
    return ResourceUsage(name, int(fields["REG"]), int(fields.get("STACK", 0)),
                         int(fields.get("LOCAL", 0)), int(fields.get("SHARED", 0)))


def _compile_here(job: CompileJob) -> ResourceUsage:
    # deferred: Triton's internal compiler API, which moves between releases; every op module
    # imports this file (CompileJob), so only the compile check should fail if it does
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = job.fn
    signature = {**job.signature, **{name: "constexpr" for name in job.constexprs}}
    constants = {(fn.arg_names.index(name),): value for name, value in job.constexprs.items()}
    src = ASTSource(fn, signature, constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                              options={"num_warps": job.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True)
    return _parse_usage(out.stdout, job.name)


def _to_wire(job: CompileJob) -> dict:
    fn = _python_fn(job.fn)
    return {**dataclasses.asdict(dataclasses.replace(job, fn=None)),
            "module": fn.__module__, "qualname": fn.__name__}


def _compile_in_subprocess(jobs: list[CompileJob]) -> list[ResourceUsage]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check"],
                          input=json.dumps([_to_wire(j) for j in jobs]), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compile check failed:\n{proc.stderr[-6000:]}")
    return [ResourceUsage(**u) for u in json.loads(proc.stdout.splitlines()[-1])]


def compile_for_gpu(jobs: list[CompileJob]) -> list[ResourceUsage]:
    """Compile every job for its GPU architecture and return the resource usage of each."""
    if any(type(j.fn).__name__ == "InterpretedFunction" for j in jobs):
        return _compile_in_subprocess(jobs)
    return [_compile_here(j) for j in jobs]


OP_MODULES = ("topk", "batchtopk", "jumprelu", "decode", "molt")


def all_jobs(archs: tuple[int, ...] = (80, 90)) -> list[CompileJob]:
    """The ``compile_jobs(arch)`` of every op module, for each architecture."""
    modules = [importlib.import_module(f"kernels.{name}") for name in OP_MODULES]
    return [job for arch in archs for m in modules for job in m.compile_jobs(arch)]


def check_all(jobs: list[CompileJob] | None = None) -> tuple[list[ResourceUsage], list[str]]:
    """Compile ``jobs`` (default :func:`all_jobs`); returns the usages and one line per job that
    spills, keeps a stack frame beyond its ``max_stack_bytes`` or needs more than 255
    registers (empty when every kernel is fine)."""
    jobs = all_jobs() if jobs is None else jobs
    usages = compile_for_gpu(jobs)
    bad = [f"{u.name} {j.constexprs}: {u.registers} regs, stack {u.stack_bytes}, spill "
           f"{u.spill_bytes}"
           for j, u in zip(jobs, usages, strict=True)
           if u.spill_bytes or u.stack_bytes > j.max_stack_bytes or not 0 < u.registers <= 255]
    return usages, bad


def _main() -> None:
    """Subprocess entry: JSON jobs on stdin, JSON usages as the last line of stdout."""
    results = []
    for wire in json.loads(sys.stdin.read()):
        fn = getattr(importlib.import_module(wire.pop("module")), wire.pop("qualname"))
        results.append(dataclasses.asdict(_compile_here(CompileJob(**{**wire, "fn": fn}))))
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
