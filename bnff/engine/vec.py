"""Explicit W-lane vectors for Numba kernels: `f32v` (LLVM `<W x float>`) and `f64v`
(`<W x double>`), with intrinsics that load, store, broadcast, add, multiply-add, widen and
mask them.

Why: LLVM splits small register tiles written as loops over local arrays into scalars, and
leaves short strided loops with per-element branches scalar. Values of these types are plain
SSA vectors, so they stay in registers.

The width is the host's, chosen when this module loads: W = 16 float32 lanes (one zmm) where
the CPU Numba compiles for has AVX-512F, else W = 8 (one ymm on AVX2, two q registers on Arm
NEON: 8 lanes legalize on any target). The environment variable BNFF_VEC_WIDTH=8|16 forces
it, so the tests run every width on any machine and compare. VREGS is how many W-lane float32
vectors the register file holds (32 zmm or ymm with AVX-512, 16 ymm with AVX2, 32 q = 16
8-lane vectors on AArch64, half as many when W is forced above the native width): register
tiles are sized from it. A forced width other than the host's compiles into its own Numba
cache directory (`numba-w<W>` beside the default one): Numba keys a cached function by its own
bytecode, not by the globals (W, NR) it inlines, so one cache would serve code of the wrong
width.

Addresses are flat element indices into C-contiguous arrays; loads and stores are unaligned,
except the non-temporal store (vstore_nt), which needs its vector's alignment.
"""
from __future__ import annotations

import os
import platform

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic, models, register_model

WIDTHS = (8, 16)
ENV = "BNFF_VEC_WIDTH"


def _has_avx512f() -> bool:
    """Whether the CPU Numba compiles for has AVX-512F (NUMBA_CPU_FEATURES when set)."""
    if numba.config.CPU_FEATURES is not None:
        return "+avx512f" in numba.config.CPU_FEATURES.split(",")
    try:
        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:  # features unknown to LLVM on this host
        return False


def host_width() -> int:
    """16 float32 lanes with AVX-512F, else 8."""
    return 16 if _has_avx512f() else 8


def _width() -> int:
    forced = os.environ.get(ENV, "").strip()
    if not forced:
        return host_width()
    if forced not in {str(w) for w in WIDTHS}:
        raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(map(str, WIDTHS))}")
    return int(forced)


def _vregs(w: int) -> int:
    """W-lane float32 vectors the register file holds."""
    if _has_avx512f():
        regs, bits = 32, 512
    elif platform.machine().lower() in ("aarch64", "arm64"):
        regs, bits = 32, 128
    else:
        regs, bits = 16, 256
    return regs * min(bits, 32 * w) // (32 * w)


W = _width()  # lanes
VREGS = _vregs(W)

if W != host_width():  # forced: a cache of its own (see the module docstring)
    numba.config.CACHE_DIR = os.path.join(
        numba.config.CACHE_DIR or os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "__pycache__"), f"numba-w{W}")

_LLVM = {types.float32: ir.FloatType(), types.float64: ir.DoubleType()}


class Vec(types.Type):
    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"{'f32' if dtype == types.float32 else 'f64'}x{W}")


f32v = Vec(types.float32)
f64v = Vec(types.float64)
_VEC = {types.float32: f32v, types.float64: f64v}


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_LLVM[fe_type.dtype], W))


def _ir(vt):
    return ir.VectorType(_LLVM[vt.dtype], W)


def _addr(context, builder, sig, args):
    """Pointer to element args[1] (flat index) of the C-contiguous array args[0]."""
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    i = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.gep(data, [i])


def _array(a, i):
    """The vector type for a C-contiguous float32/float64 array indexed by integer i, or None."""
    if isinstance(a, types.Array) and a.layout == "C" and a.dtype in _VEC and \
            isinstance(i, types.Integer):
        return _VEC[a.dtype]
    return None


def _same(*vs):
    return isinstance(vs[0], Vec) and all(v == vs[0] for v in vs)


@intrinsic
def vzero(typingctx):
    """The f32v zero."""
    return f32v(), lambda context, builder, sig, args: ir.Constant(_ir(f32v), None)


@intrinsic
def vzero64(typingctx):
    """The f64v zero."""
    return f64v(), lambda context, builder, sig, args: ir.Constant(_ir(f64v), None)


@intrinsic
def vload(typingctx, a, i):
    """a.flat[i:i+W] as a vector of a's dtype."""
    vt = _array(a, i)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_addr(context, builder, sig, args), _ir(vt).as_pointer())
        return builder.load(p, align=vt.dtype.bitwidth // 8)
    return vt(a, i), codegen


@intrinsic
def vbroadcast(typingctx, a, i):
    """a.flat[i] in all W lanes."""
    vt = _array(a, i)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        x = builder.load(_addr(context, builder, sig, args))
        t = _ir(vt)
        v = builder.insert_element(ir.Constant(t, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, ir.Constant(t, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), W), None))
    return vt(a, i), codegen


@intrinsic
def vstore(typingctx, a, i, v):
    """a.flat[i:i+W] = v."""
    vt = _array(a, i)
    if vt is None or v != vt:
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_addr(context, builder, sig, args[:2]), _ir(vt).as_pointer())
        builder.store(args[2], p, align=vt.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


@intrinsic
def vstore_nt(typingctx, a, i, v):
    """a.flat[i:i+W] = v by a non-temporal store (x86 vmovntps: the line is written without
    being read for ownership first, and not kept in the caches). The address must be aligned
    to the vector's size (W * itemsize bytes), else the store faults: callers check it.
    Follow the stores with `store_fence()` before other threads read what they wrote."""
    vt = _array(a, i)
    if vt is None or v != vt:
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_addr(context, builder, sig, args[:2]), _ir(vt).as_pointer())
        st = builder.store(args[2], p, align=W * vt.dtype.bitwidth // 8)
        st.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


def aligned_empty(shape, dtype, align=64):
    """np.empty(shape, dtype) whose data starts on an `align`-byte boundary (numpy gives 16):
    a C-contiguous array whose rows of a multiple of `align` bytes all start aligned, as
    vstore_nt needs."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(n + align, np.uint8)
    o = -buf.ctypes.data % align
    return buf[o:o + n].view(dtype).reshape(shape)


@intrinsic
def store_fence(typingctx):
    """A sequentially consistent fence (x86 mfence): the non-temporal stores before it are
    visible to every thread after it."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, fused."""
    if not _same(a, b, c):
        return None

    def codegen(context, builder, sig, args):
        t = _ir(a)
        name = f"llvm.fma.v{W}f{a.dtype.bitwidth}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t] * 3), name)
        return builder.call(fn, args)
    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b."""
    if not _same(a, b):
        return None
    return a(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


@intrinsic
def vwiden(typingctx, a):
    """f32v -> f64v, exactly."""
    if a != f32v:
        return None
    return f64v(a), lambda context, builder, sig, args: builder.fpext(args[0], _ir(f64v))


@intrinsic
def vwhere_pos(typingctx, v, m):
    """v where m > 0, else 0 (lane by lane): a ReLU mask without branches."""
    if not _same(v, m):
        return None

    def codegen(context, builder, sig, args):
        pos = builder.fcmp_ordered(">", args[1], ir.Constant(_ir(m), None))
        return builder.select(pos, args[0], ir.Constant(_ir(v), None))
    return v(v, m), codegen


def _prefetch(rw, doc):
    """A prefetch intrinsic of a.flat[i]'s cache line into L1 (rw: 1 = for writing, 0 = for
    reading)."""
    def pf(typingctx, a, i):
        if _array(a, i) is None:
            return None

        def codegen(context, builder, sig, args):
            i8p = ir.IntType(8).as_pointer()
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3),
                "llvm.prefetch.p0")
            i32 = lambda v: ir.Constant(ir.IntType(32), v)
            builder.call(fn, [builder.bitcast(_addr(context, builder, sig, args), i8p), i32(rw),
                              i32(3), i32(1)])
            return context.get_dummy_value()
        return types.void(a, i), codegen
    pf.__doc__ = doc
    return intrinsic(pf)


prefetch = _prefetch(1, "Hint: the cache line of a.flat[i] will be read and written soon.")
prefetch_read = _prefetch(0, "Hint: the cache line of a.flat[i] will be read soon.")


@intrinsic
def _f32ptr(typingctx, addr):
    """An integer address as a float32 pointer."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))
    return types.CPointer(types.float32)(addr), codegen


@numba.njit(inline="always")
def row_span(a):
    """(the float32 memory from a[0, 0] to a[-1, -1] as a C-contiguous 1-D array, the row
    stride in elements) of a 2-D float32 array with unit column stride, such as a channel
    slice of a wider buffer: row r, column j is at r * stride + j. The span borrows a's
    memory (the caller keeps a alive) and includes what lies between a's rows."""
    rs = a.strides[0] // 4
    n = (a.shape[0] - 1) * rs + a.shape[1] if a.shape[0] > 0 else 0
    return numba.carray(_f32ptr(a.ctypes.data), n), rs


def _stable_identities():
    """Deterministic uuids for the intrinsics: conv hooks that use them are closure variables
    of the conv engines, and Numba keys a closure's on-disk cache entry by pickling them (an
    intrinsic pickles as a random uuid otherwise: a recompile in every process)."""
    for name, obj in globals().items():
        if isinstance(obj, _Intrinsic):
            obj._set_uuid(f"bnff:bnff.engine.vec.{name}")


_stable_identities()
