"""Explicit 8-lane vectors for Numba kernels: `f32x8` (LLVM `<8 x float>`) and `f64x8`
(`<8 x double>`), with intrinsics that load, store, broadcast, add, multiply-add, widen and
mask them.

Why: LLVM splits small register tiles written as loops over local arrays into scalars, and
leaves short strided loops with per-element branches scalar. Values of these types are plain
SSA vectors, so they stay in registers. The 8-lane width legalizes on any target: one ymm
(f32x8) or two (f64x8) on AVX2, two or four q registers on Arm NEON.

Addresses are flat element indices into C-contiguous arrays; loads and stores are unaligned.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic, models, register_model

W = 8  # lanes

_LLVM = {types.float32: ir.FloatType(), types.float64: ir.DoubleType()}


class Vec(types.Type):
    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"{'f32' if dtype == types.float32 else 'f64'}x{W}")


f32x8 = Vec(types.float32)
f64x8 = Vec(types.float64)
_VEC = {types.float32: f32x8, types.float64: f64x8}


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
    """The f32x8 zero."""
    return f32x8(), lambda context, builder, sig, args: ir.Constant(_ir(f32x8), None)


@intrinsic
def vzero64(typingctx):
    """The f64x8 zero."""
    return f64x8(), lambda context, builder, sig, args: ir.Constant(_ir(f64x8), None)


@intrinsic
def vload(typingctx, a, i):
    """a.flat[i:i+8] as a vector of a's dtype."""
    vt = _array(a, i)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_addr(context, builder, sig, args), _ir(vt).as_pointer())
        return builder.load(p, align=vt.dtype.bitwidth // 8)
    return vt(a, i), codegen


@intrinsic
def vbroadcast(typingctx, a, i):
    """a.flat[i] in all 8 lanes."""
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
    """a.flat[i:i+8] = v."""
    vt = _array(a, i)
    if vt is None or v != vt:
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_addr(context, builder, sig, args[:2]), _ir(vt).as_pointer())
        builder.store(args[2], p, align=vt.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


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
    """f32x8 -> f64x8, exactly."""
    if a != f32x8:
        return None
    return f64x8(a), lambda context, builder, sig, args: builder.fpext(args[0], _ir(f64x8))


@intrinsic
def vwhere_pos(typingctx, v, m):
    """v where m > 0, else 0 (lane by lane): a ReLU mask without branches."""
    if not _same(v, m):
        return None

    def codegen(context, builder, sig, args):
        pos = builder.fcmp_ordered(">", args[1], ir.Constant(_ir(m), None))
        return builder.select(pos, args[0], ir.Constant(_ir(v), None))
    return v(v, m), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Hint: the cache line of a.flat[i] will be read and written soon."""
    if _array(a, i) is None:
        return None

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3),
            "llvm.prefetch.p0")
        i32 = lambda v: ir.Constant(ir.IntType(32), v)
        builder.call(fn, [builder.bitcast(_addr(context, builder, sig, args), i8p), i32(1),
                          i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(a, i), codegen


def _stable_identities():
    """Deterministic uuids for the intrinsics: conv hooks that use them are closure variables
    of the conv engines, and Numba keys a closure's on-disk cache entry by pickling them (an
    intrinsic pickles as a random uuid otherwise: a recompile in every process)."""
    for name, obj in globals().items():
        if isinstance(obj, _Intrinsic):
            obj._set_uuid(f"bnff:bnff.engine.vec.{name}")


_stable_identities()
