"""Compile a launch for an NVIDIA GPU without one, and read what the cubin says about it.

The triton wheel bundles ``ptxas`` / ``ptxas-blackwell``, ``cuobjdump`` and ``nvdisasm``, so a
kernel compiles for sm_90a / sm_100a on a machine with no GPU and no driver. :func:`compile_launch`
specializes a launch exactly as ``kernel[grid](*args, **kwargs)`` would on a GPU (Triton's own
argument binder: constexprs, ints equal to 1, 16-divisible ints and 16-aligned pointers), and
:func:`inspect_cubin` reads registers, spills and the SASS: the widths of global loads and stores,
calls (a 64-bit division is a call into a software routine) and the instruction count.

Run it in a process without ``TRITON_INTERPRET=1`` (the kernels must be ``JITFunction``s).
Imports triton only. :func:`specialize` calls Triton's binder through two internal names
(``create_function_from_signature``, ``JITFunction._pack_args``, as of Triton 3.9): a Triton that
renames them fails the SASS test loudly, it cannot make it pass wrongly.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

TARGETS = {"sm_90a": GPUTarget("cuda", 90, 32), "sm_100a": GPUTarget("cuda", 100, 32)}
TOOLS = ("ptxas", "ptxas-blackwell", "cuobjdump", "nvdisasm")
DIV64_PTX = re.compile(r"\b(?:div|rem)\.[su]64\b")
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)")


def missing_tools() -> list[str]:
    """The bundled toolchain binaries Triton cannot find (each named with its env override)."""
    missing = []
    for name in TOOLS:
        try:  # the knob resolves the path and runs ``--version`` on access
            getattr(triton.knobs.nvidia, name.replace("-", "_"))
        except RuntimeError:
            missing.append(f"{name} (TRITON_{name.upper().replace('-', '_')}_PATH)")
    return missing


def specialize(fn, args: tuple, kwargs: dict, target: GPUTarget) -> tuple:
    """``(signature, constexprs, attrs, options)`` of ``fn[grid](*args, **kwargs)`` on a
    ``target`` GPU, from Triton's own binder: what the JIT compiles, and its cache key."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return signature, constexprs, attrs, options


def specialization_key(spec: tuple) -> str:
    """A hashable text of a :func:`specialize` result (launches equal in it compile alike)."""
    signature, constexprs, attrs, options = spec
    return repr((sorted(signature.items()), sorted((k, str(v)) for k, v in constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))


def compile_launch(fn, args: tuple, kwargs: dict, target: GPUTarget):
    """``fn`` (a ``triton.jit`` function) compiled for ``target`` as ``fn[grid](*args,
    **kwargs)`` would compile it on such a GPU: the same binder, specialization and options."""
    return compile_spec(fn, specialize(fn, args, kwargs, target), target)


def compile_spec(fn, spec: tuple, target: GPUTarget):
    """Compile a :func:`specialize` result of ``fn`` for ``target``."""
    from triton.compiler.compiler import ASTSource

    signature, constexprs, attrs, options = spec
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


@dataclass
class CubinReport:
    """What one compiled kernel does, from its cubin and PTX."""

    arch: str  # the cubin's own .target, e.g. sm_90a
    registers: int
    local_bytes: int  # per-thread local memory: spills (and stack arrays) live there
    spill_instructions: int  # STL / LDL in the SASS
    shared_bytes: int  # static shared memory (a layout conversion between loads and stores)
    barriers: int  # BAR instructions (warps waiting for each other)
    instructions: int
    calls: int  # CALL instructions (64-bit division and other software routines)
    div64_in_ptx: int  # div/rem .s64/.u64 in the PTX
    loads: Counter = field(default_factory=Counter)  # LDG opcode -> count
    stores: Counter = field(default_factory=Counter)  # STG opcode -> count

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.spill_instructions > 0

    def widths(self, op: str) -> dict[int, int]:
        """Access width in bits -> count, for ``op`` "LDG" or "STG"."""
        out: Counter = Counter()
        for opcode, n in (self.loads if op == "LDG" else self.stores).items():
            out[_bits(opcode)] += n
        return dict(out)

    def row(self) -> dict:
        """Flat fields for a CSV row."""
        return dict(sass_target=self.arch, registers=self.registers, local_bytes=self.local_bytes,
                    spill_instructions=self.spill_instructions, shared_bytes=self.shared_bytes,
                    barriers=self.barriers, instructions=self.instructions,
                    calls=self.calls, div64_in_ptx=self.div64_in_ptx,
                    loads=" ".join(f"{k}x{v}" for k, v in sorted(self.loads.items())),
                    stores=" ".join(f"{k}x{v}" for k, v in sorted(self.stores.items())),
                    store_bits=" ".join(str(b) for b in sorted(self.widths("STG"))))


def inspect_cubin(kernel) -> CubinReport:
    """Registers, local memory, spills, calls and global access widths of a compiled kernel."""
    with tempfile.TemporaryDirectory(prefix="gpukv-cubin-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        sass = _run(triton.knobs.nvidia.cuobjdump.path, "-res-usage", "-sass", str(path))
    regs = re.search(r"REG:(\d+)", sass)
    local = re.search(r"LOCAL:(\d+)", sass)
    stack = re.search(r"STACK:(\d+)", sass)
    shared = re.search(r"SHARED:(\d+)", sass)
    target = re.search(r"\.target\s+(sm_\w+)", sass)
    if regs is None or local is None or target is None:
        raise RuntimeError(f"cuobjdump printed no REG/LOCAL/.target:\n{sass[:2000]}")
    opcodes = [m.group(1) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    return CubinReport(
        arch=target.group(1),
        registers=int(regs.group(1)),
        local_bytes=int(local.group(1)) + (int(stack.group(1)) if stack else 0),
        spill_instructions=sum(op.startswith(("STL", "LDL")) for op in opcodes),
        shared_bytes=int(shared.group(1)) if shared else 0,
        barriers=sum(op.startswith("BAR") for op in opcodes),
        instructions=len(opcodes),
        calls=sum(op.startswith("CALL") for op in opcodes),
        div64_in_ptx=len(DIV64_PTX.findall(kernel.asm["ptx"])),
        loads=Counter(op for op in opcodes if op.startswith("LDG")),
        stores=Counter(op for op in opcodes if op.startswith("STG")))


def _bits(opcode: str) -> int:
    """Width of a LDG/STG opcode: ``.128``/``.64`` suffixes, ``.U16``/``.S8``..., else 32."""
    for part in opcode.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
    return 32


def _run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[:2000]}")
    return out.stdout
