# Inline scalar conversions shared by the Cython kernels: float32 <-> fp16, bf16, fp8, and
# the round-to-nearest-even helper. Everything here is branch-light so that gcc can
# vectorize the loops that call it; nothing raises.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t

cdef union F32Bits:
    float f
    uint32_t u

cdef inline uint32_t f32_bits(float x) noexcept nogil:
    cdef F32Bits b
    b.f = x
    return b.u

cdef inline float bits_f32(uint32_t u) noexcept nogil:
    cdef F32Bits b
    b.u = u
    return b.f

cdef inline int32_t round_even(float x) noexcept nogil:
    # Adding 1.5 * 2**23 pushes the fraction bits out of a float32, so the FPU's
    # round-to-nearest-even does the rounding and the low mantissa bits hold the integer;
    # valid for |x| < 2**22, which every caller guarantees.
    return <int32_t>(f32_bits(x + <float>12582912.0) - <uint32_t>0x4B400000)

cdef inline uint32_t abs_bits(float x) noexcept nogil:
    # Bit pattern of |x|; its unsigned order equals the order of |x|, and any value at
    # or above 0x7F800000 is inf or NaN.
    return f32_bits(x) & 0x7FFFFFFF

cdef inline int32_t ordered_bits(float x) noexcept nogil:
    # An int32 whose signed order equals the float order of finite x, so that min / max
    # loops run as integer compares, which gcc vectorizes without -ffast-math.
    cdef int32_t b = <int32_t>f32_bits(x)
    return b ^ ((b >> 31) & 0x7FFFFFFF)

cdef inline float ordered_float(int32_t b) noexcept nogil:
    return bits_f32(<uint32_t>(b ^ ((b >> 31) & 0x7FFFFFFF)))

# ---- fp16 -------------------------------------------------------------------------

cdef inline uint16_t f32_to_f16(float x) noexcept nogil:
    """IEEE binary16 with round-to-nearest-even; overflow gives inf (callers check)."""
    cdef uint32_t u = f32_bits(x)
    cdef uint32_t sign = (u >> 16) & 0x8000
    cdef uint32_t a = u & 0x7FFFFFFF
    cdef uint32_t o
    if a >= 0x477FF000:            # rounds to >= 65520: inf (NaN keeps a payload bit)
        o = 0x7E00 if a > 0x7F800000 else 0x7C00
    elif a < 0x38800000:           # below 2**-14: fp16 subnormal or zero
        # Adding 0.5 aligns the value so that the float adder rounds at fp16's
        # subnormal step (2**-24); what is left in the low bits is the code.
        o = f32_bits(bits_f32(a) + <float>0.5) - <uint32_t>0x3F000000
    else:
        o = (a - <uint32_t>0x37FFF001 + ((a >> 13) & 1)) >> 13   # rebias 127 -> 15, round, shift
    return <uint16_t>(o | sign)

cdef inline float f16_to_f32(uint16_t h) noexcept nogil:
    # Every case is computed and one is selected, with no branch, so loops over rows of
    # codes vectorize.
    cdef uint32_t sign = (<uint32_t>h & 0x8000) << 16
    cdef uint32_t o = (<uint32_t>h & 0x7FFF) << 13
    cdef uint32_t e = o & 0x0F800000
    cdef uint32_t normal = o + 0x38000000            # rebias 15 -> 127
    cdef uint32_t special = o + 0x70000000           # inf / NaN: exponent all ones
    # subnormal: renormalize through the FPU
    cdef uint32_t sub = f32_bits(bits_f32(o + 0x38800000) - bits_f32(0x38800000))
    o = special if e == 0x0F800000 else (sub if e == 0 else normal)
    return bits_f32(o | sign)

cdef inline float f16_up(float x) noexcept nogil:
    """The smallest float16 value >= x (as float32); inf past 65504. Side data stored as
    float16 rounds scales up with it, so that no code clips."""
    cdef uint16_t h = f32_to_f16(x)
    if f16_to_f32(h) < x:          # a step up: +1 in magnitude, or -1 for a negative value
        h = h + 1 if h < 0x8000 else (0x0001 if h == 0x8000 else h - 1)
    return f16_to_f32(h)


cdef inline float f16_down(float x) noexcept nogil:
    """The largest float16 value <= x (as float32); -inf below -65504. Zero points stored
    as float16 round down with it, so that a group's minimum keeps a code."""
    cdef uint16_t h = f32_to_f16(x)
    if f16_to_f32(h) > x:
        h = h - 1 if (h < 0x8000 and h != 0) else (0x8001 if h == 0 else h + 1)
    return f16_to_f32(h)

# ---- bf16 -------------------------------------------------------------------------

cdef inline uint16_t f32_to_bf16(float x) noexcept nogil:
    cdef uint32_t u = f32_bits(x)
    return <uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)

cdef inline float bf16_to_f32(uint16_t h) noexcept nogil:
    return bits_f32((<uint32_t>h) << 16)

# ---- fp8 (OCP 8-bit floats) -----------------------------------------------------------
# e4m3 ("fn"): bias 7, 3 mantissa bits, no inf, max 448 = code 0x7E, NaN = 0x7F.
# e5m2: bias 15, 2 mantissa bits, max 57344 = code 0x7B, inf = 0x7C.
# Callers pass |x| <= the format's max, so the result never overflows.

cdef inline uint8_t f32_to_fp8(float x, int mant_bits, int bias, uint32_t max_code) noexcept nogil:
    cdef uint32_t u = f32_bits(x)
    cdef uint32_t sign = (u >> 24) & 0x80
    cdef uint32_t a = u & 0x7FFFFFFF
    cdef int shift = 23 - mant_bits
    cdef uint32_t normal = ((a + ((<uint32_t>1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift) \
        - (<uint32_t>(127 - bias) << mant_bits)
    # Subnormals: the code is |x| / 2**(1 - bias - mant_bits), rounded to nearest even; a
    # value that rounds up to 2**mant_bits lands on the smallest normal code, as it should.
    cdef uint32_t sub = <uint32_t>round_even(bits_f32(a) * bits_f32(<uint32_t>(127 + bias + mant_bits - 1) << 23))
    cdef uint32_t code = sub if a < (<uint32_t>(128 - bias) << 23) else normal
    if code > max_code:
        code = max_code
    return <uint8_t>(code | sign)
