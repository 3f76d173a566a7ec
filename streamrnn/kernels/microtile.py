"""A 6 x 16 float32 register tile in x86-64 AVX2/FMA assembly for ``cells.block_product``.

Why assembly: a tile needs 12 accumulators to keep both FMA pipes of Zen 3 busy (FMA latency
4 x 2 pipes = 8 chains in flight, so the 8 accumulators of a 4 x 16 tile leave no slack).
Written in Numba, a 6 x 16 tile is compiled with all six broadcasts hoisted, 20 live vector
registers for 16, and spills (36 GFLOP/s); the 4 x 16 tile LLVM does compile well reaches
60-75 GFLOP/s per core. This loop keeps 12 accumulators, 2 weight vectors and 2 broadcasts in
the 16 registers: 81-94 GFLOP/s per core on the same shapes (H=64, K=65).

Numbers: the same as the 4 x 16 tile's bit for bit. Each output starts from its bias and adds
the input terms, then the recurrent terms, in k order, one fused multiply-add (one rounding)
per term, as the Numba tile does (LLVM contracts ``t += v * w`` to the same vfmadd231ps).

Used only where it can run: an x86-64 host with AVX2 and FMA, Numba compiling for that host
(``NUMBA_CPU_NAME`` unset) and 16-column panels (``streamrnn.config.PANEL``). Elsewhere
``AVAILABLE`` is False and the Numba tiles run alone.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils, config as numba_config
from numba.extending import intrinsic

from streamrnn.config import PANEL

#: Rows and columns of the assembly tile (``tile6x8`` has half the columns).
ROWS = 6
COLS = 16
HALF = COLS // 2

# Parameter block the assembly reads (int64 slots; pointers are byte addresses, strides bytes).
_BIAS, _OUT, _LDO = 0, 1, 2
_X, _LDX, _WX, _WXS, _NX = 3, 4, 5, 6, 7
_H, _LDH, _WH, _WHS, _NH = 8, 9, 10, 11, 12
_N_PARAMS = 13


def _host_supports() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or PANEL != COLS:
        return False
    if numba_config.CPU_NAME or numba_config.CPU_FEATURES:  # compiling for another CPU
        return False
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        if not (features.get("avx2") and features.get("fma")):
            return False
        # Numba compiles inline assembly only with the host's assembly parser registered.
        binding.initialize_native_asmparser()
    except Exception:  # an unknown host or llvmlite: the Numba tiles are always correct
        return False
    return True


#: True when ``tile6x16`` can be compiled and run here.
AVAILABLE: bool = _host_supports()


def _k_loop(first: int, label: int, vecs: int = 2) -> list[str]:
    """acc rows += rows[:, k] * w[k, :8 * vecs] for k < count; ``first`` is the slot of the
    rows' pointer, followed by their stride, the weights' pointer, the weights' stride, the
    count. Row r accumulates in ymm(vecs * r) .. ymm(vecs * r + vecs - 1)."""
    rows, ld, w, ws, count = (8 * (first + i) for i in range(5))
    lines = [
        f"mov {count}($0), %r10",
        "test %r10, %r10",
        f"jz {label}f",
        f"mov {rows}($0), %rsi",
        f"mov {ld}($0), %rdx",
        f"mov {w}($0), %r8",
        f"mov {ws}($0), %r9",
        "lea (%rsi,%rdx,2), %r11",  # row 3 = row 0 + 3 strides; rows 4, 5 from it
        "add %rdx, %r11",
        f"{label + 1}:",
    ]
    lines += [f"vmovups {32 * v}(%r8), %ymm{12 + v}" for v in range(vecs)]
    sources = ["(%rsi)", "(%rsi,%rdx)", "(%rsi,%rdx,2)", "(%r11)", "(%r11,%rdx)", "(%r11,%rdx,2)"]
    for r, src in enumerate(sources):
        b = 14 + r % 2  # two broadcast registers alternate, so a load need not wait for FMAs
        lines.append(f"vbroadcastss {src}, %ymm{b}")
        lines += [f"vfmadd231ps %ymm{12 + v}, %ymm{b}, %ymm{vecs * r + v}" for v in range(vecs)]
    lines += ["add $$4, %rsi", "add $$4, %r11", "add %r9, %r8", "dec %r10", f"jnz {label + 1}b", f"{label}:"]
    return lines


def _assembly(vecs: int = 2) -> str:
    """The tile of ROWS x 8 * vecs columns (vecs 2: 16 columns, 1: 8)."""
    lines = [f"mov {8 * _BIAS}($0), %rax"] + [f"vmovups {32 * v}(%rax), %ymm{v}" for v in range(vecs)]
    for r in range(1, ROWS):
        lines += [f"vmovaps %ymm{v}, %ymm{vecs * r + v}" for v in range(vecs)]
    lines += _k_loop(_X, 10, vecs) + _k_loop(_H, 20, vecs)
    lines += [f"mov {8 * _OUT}($0), %rax", f"mov {8 * _LDO}($0), %rcx"]
    for r in range(ROWS):
        lines += [f"vmovups %ymm{vecs * r + v}, {32 * v}(%rax)" for v in range(vecs)]
        if r < ROWS - 1:
            lines.append("add %rcx, %rax")
    return "\n".join(lines)


_CONSTRAINTS = ",".join(
    ["r"] + [f"~{{{g}}}" for g in ("rax", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11")]
    + [f"~{{ymm{i}}}" for i in range(16)] + ["~{memory}", "~{dirflag}", "~{fpsr}", "~{flags}"])


def _tile_codegen(vecs: int):
    """Code generator of the tile with 8 * vecs columns (see ``tile6x16``)."""
    asm = _assembly(vecs)

    def codegen(context, builder, signature, values):
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        block = cgutils.alloca_once(builder, ir.ArrayType(i64, _N_PARAMS))
        for i, (v, ty) in enumerate(zip(values, signature.args)):
            slot = builder.gep(block, [ir.Constant(i32, 0), ir.Constant(i32, i)])
            builder.store(context.cast(builder, v, ty, types.int64), slot)
        ptr = builder.gep(block, [ir.Constant(i32, 0), ir.Constant(i32, 0)])
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type])
        builder.call(ir.InlineAsm(fnty, asm, _CONSTRAINTS, side_effect=True), [ptr])
        return context.get_dummy_value()

    return codegen


def _tile_signature(args):
    return types.void(*args) if all(isinstance(a, types.Integer) for a in args) else None


@intrinsic
def tile6x16(typingctx, bias, out, ldo, x, ldx, wx, wxs, nx, h, ldh, wh, whs, nh):
    """out[r, :16] = bias[:16] + sum_k x[r, k] wx[k, :16] + sum_k h[r, k] wh[k, :16], r < 6.

    All arguments int64: byte addresses of the first element and row strides in bytes
    (elements within a row contiguous), counts nx and nh (0 allowed). The memory clobber
    keeps the compiler from moving loads or stores of the operands across it."""
    sig = _tile_signature((bias, out, ldo, x, ldx, wx, wxs, nx, h, ldh, wh, whs, nh))
    return None if sig is None else (sig, _tile_codegen(2))


@intrinsic
def tile6x8(typingctx, bias, out, ldo, x, ldx, wx, wxs, nx, h, ldh, wh, whs, nh):
    """As ``tile6x16`` for 8 columns (a head of 8 outputs): 6 accumulator chains, against
    a Numba tile whose runtime width kept its accumulators in memory (~5x slower)."""
    sig = _tile_signature((bias, out, ldo, x, ldx, wx, wxs, nx, h, ldh, wh, whs, nh))
    return None if sig is None else (sig, _tile_codegen(1))


@intrinsic
def address(typingctx, arr):
    """Byte address of an array's first element, as int64."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, values):
        ary = context.make_array(signature.args[0])(context, builder, values[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return types.int64(arr), codegen
