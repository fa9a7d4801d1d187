/* Decoding of kvmmap storage formats, shared by every kernel. Core OpenCL 1.2 only:
 * fp16 goes through vload_half (no cl_khr_fp16 needed); everything accumulates in float.
 * The host passes -DKVMMAP_FORMAT=<id> with the ids of kvmmap/formats.py. */
#ifndef KVMMAP_FORMATS_H
#define KVMMAP_FORMATS_H

#define KVMMAP_FP32 0
#define KVMMAP_FP16 1
#define KVMMAP_BF16 2
#define KVMMAP_INT8 3
#define KVMMAP_INT4 4
#define KVMMAP_FP8_E4M3 5
#define KVMMAP_FP8_E5M2 6

inline float kvmmap_bf16(ushort h) { return as_float(((uint)h) << 16); }

/* OCP fp8: e4m3 (bias 7, no inf, 0x7F NaN) and e5m2 (bias 15, IEEE-like). */
inline float kvmmap_fp8(uchar c, int mant_bits, int bias) {
    uint e = (c & 0x7F) >> mant_bits;
    uint m = c & ((1u << mant_bits) - 1u);
    float v = e == 0 ? (float)m * ldexp(1.0f, 1 - bias - mant_bits)
                     : ldexp(1.0f + (float)m / (float)(1u << mant_bits), (int)e - bias);
    return (c & 0x80) ? -v : v;
}
inline float kvmmap_fp8_e4m3(uchar c) { return kvmmap_fp8(c, 3, 7); }
inline float kvmmap_fp8_e5m2(uchar c) { return kvmmap_fp8(c, 2, 15); }

#endif
