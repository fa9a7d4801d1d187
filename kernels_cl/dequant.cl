/* Dequantize rows of codes with one float32 scale per row (or none):
 *   out[row, j] = decode(codes[row, j]) * scale[row]
 * for the byte-per-element and unscaled formats. -DKVMMAP_FORMAT selects the format;
 * -DHEAD_DIM gives the row length. One work-item per element. */
#include "kvmmap_formats.h"

#ifndef KVMMAP_FORMAT
#define KVMMAP_FORMAT KVMMAP_INT8
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

__kernel void dequantize_rows(__global const uchar *codes, __global const float *scales,
                              __global float *out, const uint rows) {
    size_t i = get_global_id(0);
    if (i >= (size_t)rows * HEAD_DIM) return;
    size_t row = i / HEAD_DIM;
#if KVMMAP_FORMAT == KVMMAP_FP32
    out[i] = ((__global const float *)codes)[i];
#elif KVMMAP_FORMAT == KVMMAP_FP16
    out[i] = vload_half(i, (__global const half *)codes);
#elif KVMMAP_FORMAT == KVMMAP_BF16
    out[i] = kvmmap_bf16(((__global const ushort *)codes)[i]);
#elif KVMMAP_FORMAT == KVMMAP_INT8
    out[i] = (float)((__global const char *)codes)[i] * scales[row];
#elif KVMMAP_FORMAT == KVMMAP_FP8_E4M3
    out[i] = kvmmap_fp8_e4m3(codes[i]) * scales[row];
#elif KVMMAP_FORMAT == KVMMAP_FP8_E5M2
    out[i] = kvmmap_fp8_e5m2(codes[i]) * scales[row];
#else
#error "dequantize_rows: unsupported KVMMAP_FORMAT"
#endif
}
