# Typed loops of paged decode attention on the CPU (kvmmap/attention.py checks and prepares
# every argument). One query token per sequence attends over that sequence's sealed pages,
# read in place from the pool, plus its open tail page (passed as float32).
#
# Work is cut into items (sequence b, token range [t0, t1)); each item runs online softmax
# over its range a block of pages at a time, every kv head in turn, and leaves
# unnormalised partials (running max m, sum l, accumulator acc) for every query head. A
# K/V block of one kv head is decoded once for all query heads of its GQA group. Items run
# in parallel with prange; merge_partials combines the items of one sequence by
# log-sum-exp (flash-decoding).
# A score or sum that overflows float32 (finite inputs can: |q . k| up to D * 3.4e38**2)
# leaves NaN or inf in its output row, never a wrong finite value; attention.py then
# recomputes that row in float64. Nothing here raises or allocates Python objects.

from cython.parallel cimport prange
from libc.math cimport expf, INFINITY
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc

from kvmmap.codecs._convert cimport bits_f32, f16_to_f32, round_even
from kvmmap.codecs._pages cimport Side, decode_rows, init_side
from kvmmap.codecs._rows cimport FMT_FP8_E4M3, FMT_FP8_E5M2, FMT_INT4, FMT_INT8, fill_fp8_table, load_side, side_at

cdef float[2][256] FP8_TABLES
fill_fp8_table(FP8_TABLES[0], FMT_FP8_E4M3)
fill_fp8_table(FP8_TABLES[1], FMT_FP8_E5M2)


cdef inline float fast_exp(float x) noexcept nogil:
    """e**x for x <= 0: relative error ~2e-7 down to float32's smallest normal number,
    below it gradual underflow to subnormals and to exactly 0 (from about -103.3), as
    IEEE expf; NaN gives NaN.

    Branch-free so that the loops calling it vectorize (libm's expf does not). 2**i is
    applied as two factors 2**(i >> 1) and 2**(i - (i >> 1)), each a normal float32, so
    a result below 2**-126 is rounded once by the last multiply instead of wrapping the
    exponent bits. The clamp at -110 (where e**x is already 0) only bounds i; it is
    written so that NaN passes it (NaN weights are how an overflowed score is detected).
    """
    cdef float y, f, r
    cdef int32_t i, h
    x = <float>-110.0 if x < <float>-110.0 else x
    y = x * <float>1.4426950408889634                 # x / ln 2
    i = round_even(y)                          # -159 .. 0
    f = y - i                                  # f in [-0.5, 0.5]
    # 2**f by its Taylor series in f ln 2, degree 6
    r = <float>1.5403530393381606e-4
    r = r * f + <float>1.3333558146428443e-3
    r = r * f + <float>9.618129107628477e-3
    r = r * f + <float>5.550410866482158e-2
    r = r * f + <float>2.402265069591007e-1
    r = r * f + <float>6.931471805599453e-1
    r = r * f + <float>1.0
    h = i >> 1                                 # -80 .. 0, and i - h in -79 .. 0
    return (r * bits_f32(<uint32_t>(h + 127) << 23)) * bits_f32(<uint32_t>(i - h + 127) << 23)


ctypedef fused row_t:
    # K / V rows as the loops read them: decoded float32, or int8 codes used as they are
    float
    int8_t


cdef inline void scores(const float* q, const row_t* k, Py_ssize_t n, Py_ssize_t D,
                        float* s) noexcept nogil:
    """s[t] = q . k[t] for n rows k [n, D]; four rows at a time so that the four dot
    products run as independent vector chains."""
    cdef Py_ssize_t t = 0, j
    cdef float a0, a1, a2, a3
    cdef const row_t* k0
    while t + 4 <= n:
        k0 = k + t * D
        a0 = a1 = a2 = a3 = 0
        for j in range(D):
            a0 = a0 + q[j] * k0[j]
            a1 = a1 + q[j] * k0[D + j]
            a2 = a2 + q[j] * k0[2 * D + j]
            a3 = a3 + q[j] * k0[3 * D + j]
        s[t], s[t + 1], s[t + 2], s[t + 3] = a0, a1, a2, a3
        t += 4
    while t < n:
        a0 = 0
        for j in range(D):
            a0 = a0 + q[j] * k[t * D + j]
        s[t] = a0
        t += 1


cdef inline void accumulate(float* acc, const float* p, const row_t* v, Py_ssize_t n,
                            Py_ssize_t D) noexcept nogil:
    """acc[D] += sum_t p[t] * v[t, :], four rows per pass over acc."""
    cdef Py_ssize_t t = 0, j
    cdef float p0, p1, p2, p3
    cdef const row_t* v0
    while t + 4 <= n:
        p0, p1, p2, p3 = p[t], p[t + 1], p[t + 2], p[t + 3]
        v0 = v + t * D
        for j in range(D):
            acc[j] = acc[j] + (p0 * v0[j] + p1 * v0[D + j]) + (p2 * v0[2 * D + j] + p3 * v0[3 * D + j])
        t += 4
    while t < n:
        p0 = p[t]
        for j in range(D):
            acc[j] = acc[j] + p0 * v[t * D + j]
        t += 1


cdef inline void scores2(const float* q0, const float* q1, const float* k, Py_ssize_t n,
                         Py_ssize_t D, float* s0, float* s1) noexcept nogil:
    """scores() for two query rows at once: each K row loaded serves both (GQA)."""
    cdef Py_ssize_t t = 0, j
    cdef float a0, a1, a2, a3, b0, b1, b2, b3
    cdef const float* k0
    while t + 4 <= n:
        k0 = k + t * D
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = 0
        for j in range(D):
            a0 = a0 + q0[j] * k0[j]
            a1 = a1 + q0[j] * k0[D + j]
            a2 = a2 + q0[j] * k0[2 * D + j]
            a3 = a3 + q0[j] * k0[3 * D + j]
            b0 = b0 + q1[j] * k0[j]
            b1 = b1 + q1[j] * k0[D + j]
            b2 = b2 + q1[j] * k0[2 * D + j]
            b3 = b3 + q1[j] * k0[3 * D + j]
        s0[t], s0[t + 1], s0[t + 2], s0[t + 3] = a0, a1, a2, a3
        s1[t], s1[t + 1], s1[t + 2], s1[t + 3] = b0, b1, b2, b3
        t += 4
    if t < n:
        scores(q0, k + t * D, n - t, D, s0 + t)
        scores(q1, k + t * D, n - t, D, s1 + t)


cdef inline void accumulate2(float* acc0, float* acc1, const float* p0, const float* p1,
                             const float* v, Py_ssize_t n, Py_ssize_t D) noexcept nogil:
    """accumulate() for two query rows at once: each V row loaded serves both."""
    cdef Py_ssize_t t = 0, j
    cdef float w0, w1, w2, w3, u0, u1, u2, u3, x0, x1, x2, x3
    cdef const float* v0
    while t + 4 <= n:
        w0, w1, w2, w3 = p0[t], p0[t + 1], p0[t + 2], p0[t + 3]
        u0, u1, u2, u3 = p1[t], p1[t + 1], p1[t + 2], p1[t + 3]
        v0 = v + t * D
        for j in range(D):
            x0, x1, x2, x3 = v0[j], v0[D + j], v0[2 * D + j], v0[3 * D + j]
            acc0[j] = acc0[j] + (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)
            acc1[j] = acc1[j] + (u0 * x0 + u1 * x1) + (u2 * x2 + u3 * x3)
        t += 4
    if t < n:
        accumulate(acc0, p0 + t, v + t * D, n - t, D)
        accumulate(acc1, p1 + t, v + t * D, n - t, D)


cdef inline void scores_int4(const float* qe, const float* qo, float c0, const uint8_t* codes,
                             Py_ssize_t stride, Py_ssize_t n, Py_ssize_t D2, float* s) noexcept nogil:
    """s[t] = c0 + sum_j qe[j] * lo(codes[t, j]) + qo[j] * hi(codes[t, j]) for n rows of
    int4 codes (row t at codes + t * stride, D2 = head_dim / 2 bytes): the scores of int4
    keys whose per-channel scales are folded into the query (qe / qo: even / odd channels)
    and whose zero points are folded into c0. Four rows at a time, as scores()."""
    cdef Py_ssize_t t = 0, j
    cdef float a0, a1, a2, a3
    cdef const uint8_t* r0
    cdef const uint8_t* r1
    cdef const uint8_t* r2
    cdef const uint8_t* r3
    while t + 4 <= n:
        r0 = codes + t * stride
        r1, r2, r3 = r0 + stride, r0 + 2 * stride, r0 + 3 * stride
        a0 = a1 = a2 = a3 = 0
        for j in range(D2):
            a0 = a0 + qe[j] * (r0[j] & 15) + qo[j] * (r0[j] >> 4)
            a1 = a1 + qe[j] * (r1[j] & 15) + qo[j] * (r1[j] >> 4)
            a2 = a2 + qe[j] * (r2[j] & 15) + qo[j] * (r2[j] >> 4)
            a3 = a3 + qe[j] * (r3[j] & 15) + qo[j] * (r3[j] >> 4)
        s[t], s[t + 1], s[t + 2], s[t + 3] = c0 + a0, c0 + a1, c0 + a2, c0 + a3
        t += 4
    while t < n:
        r0 = codes + t * stride
        a0 = 0
        for j in range(D2):
            a0 = a0 + qe[j] * (r0[j] & 15) + qo[j] * (r0[j] >> 4)
        s[t] = c0 + a0
        t += 1


cdef inline void accumulate_int4(float* ae, float* ao, const float* w, Py_ssize_t w_stride,
                                 const uint8_t* codes, Py_ssize_t stride, Py_ssize_t n,
                                 Py_ssize_t nb) noexcept nogil:
    """ae[j] += sum_t w[t] * lo(codes[t, j]), ao[j] likewise with the high nibbles, for the
    nb bytes of one group of n int4 rows (row t at codes + t * stride; its weight at
    w[t * w_stride]): the even / odd elements of a group, weighted by probability x scale.
    Four rows per pass over ae / ao."""
    cdef Py_ssize_t t = 0, j
    cdef float w0, w1, w2, w3
    cdef const uint8_t* r0
    cdef const uint8_t* r1
    cdef const uint8_t* r2
    cdef const uint8_t* r3
    while t + 4 <= n:
        w0, w1, w2, w3 = w[t * w_stride], w[(t + 1) * w_stride], w[(t + 2) * w_stride], w[(t + 3) * w_stride]
        r0 = codes + t * stride
        r1, r2, r3 = r0 + stride, r0 + 2 * stride, r0 + 3 * stride
        # two loops, one store each: with both stores in one loop the codes (char, which
        # may alias anything) need more overlap checks than gcc versions a loop for, and
        # it stays scalar
        for j in range(nb):
            ae[j] = ae[j] + ((w0 * (r0[j] & 15) + w1 * (r1[j] & 15)) + (w2 * (r2[j] & 15) + w3 * (r3[j] & 15)))
        for j in range(nb):
            ao[j] = ao[j] + ((w0 * (r0[j] >> 4) + w1 * (r1[j] >> 4)) + (w2 * (r2[j] >> 4) + w3 * (r3[j] >> 4)))
        t += 4
    while t < n:
        w0 = w[t * w_stride]
        r0 = codes + t * stride
        for j in range(nb):
            ae[j] = ae[j] + w0 * (r0[j] & 15)
        for j in range(nb):
            ao[j] = ao[j] + w0 * (r0[j] >> 4)
        t += 1


cdef inline void page_scores_int4(const uint8_t* page, const Side* ks, const float* q, Py_ssize_t h,
                                  Py_ssize_t a, Py_ssize_t n, Py_ssize_t P, Py_ssize_t D,
                                  float* scratch, float* s) noexcept nogil:
    """Scores of rows a .. a+n-1 of head h of a sealed page of int4 keys (per channel over
    the page, group 0), read in place: k[t, c] = code * scale[c] + zero[c], so
    q . k[t] = sum_c (q[c] scale[c]) code[t, c] + sum_c q[c] zero[c]. ``scratch``: D floats."""
    cdef Py_ssize_t j, D2 = D // 2
    cdef float* qe = scratch
    cdef float* qo = scratch + D2
    cdef float c0 = 0
    cdef const void* sc = side_at(page + ks.scales_off, h * D, ks.half)
    cdef const void* zp = side_at(page + ks.zeros_off, h * D, ks.half)
    for j in range(D2):
        qe[j] = q[2 * j] * load_side(sc, 2 * j, ks.half)
        qo[j] = q[2 * j + 1] * load_side(sc, 2 * j + 1, ks.half)
    for j in range(D):
        c0 = c0 + q[j] * load_side(zp, j, ks.half)
    scores_int4(qe, qo, c0, page + ks.codes_off + (h * P + a) * ks.code_row_bytes, ks.code_row_bytes, n, D2, s)


cdef inline void page_accumulate_int4(const uint8_t* page, const Side* vs, const float* p, Py_ssize_t h,
                                      Py_ssize_t a, Py_ssize_t n, Py_ssize_t P, Py_ssize_t D,
                                      float* scratch, float* acc) noexcept nogil:
    """acc[D] += sum_t p[t] v[t] over rows a .. a+n-1 of head h of a sealed page of int4
    values (per token in groups of vs.group along head_dim), read in place:
    v[t, c] = code * scale[t, g] + zero[t, g], so the weights p[t] scale[t, g] multiply the
    codes and sum_t p[t] zero[t, g] is one constant per group. ``scratch``: D + n * D / 2 +
    D / 2 floats (n <= the block)."""
    cdef Py_ssize_t j, t, g, D2 = D // 2, ng = D // vs.group, gb = vs.group // 2
    cdef Py_ssize_t row = h * P + a
    cdef float* ae = scratch
    cdef float* ao = scratch + D2
    cdef float* zsum = scratch + D
    cdef float* w = scratch + D + D2
    cdef float z
    cdef const void* sc = side_at(page + vs.scales_off, row * ng, vs.half)
    cdef const void* zp = side_at(page + vs.zeros_off, row * ng, vs.half)
    for j in range(D):
        ae[j] = 0
    if ng == 1 and vs.half:      # one group per row (the default): contiguous loops that vectorize
        z = 0
        for t in range(n):
            w[t] = p[t] * f16_to_f32((<const uint16_t*>sc)[t])
        for t in range(n):
            z = z + p[t] * f16_to_f32((<const uint16_t*>zp)[t])
        zsum[0] = z
    else:
        for g in range(ng):
            z = 0
            for t in range(n):
                w[t * ng + g] = p[t] * load_side(sc, t * ng + g, vs.half)
                z = z + p[t] * load_side(zp, t * ng + g, vs.half)
            zsum[g] = z
    for g in range(ng):
        accumulate_int4(ae + g * gb, ao + g * gb, w + g, ng, page + vs.codes_off + row * vs.code_row_bytes + g * gb,
                        vs.code_row_bytes, n, gb)
    for j in range(D2):
        z = zsum[(2 * j) // vs.group]
        acc[2 * j] = acc[2 * j] + (ae[j] + z)
        acc[2 * j + 1] = acc[2 * j + 1] + (ao[j] + z)


cdef inline Py_ssize_t gather(const uint8_t* arena, Py_ssize_t page_bytes, const Side* side,
                              const int32_t* pages, Py_ssize_t num_pages, const float* tail,
                              Py_ssize_t pos, Py_ssize_t end, Py_ssize_t h, Py_ssize_t P,
                              Py_ssize_t D, float* dst) noexcept nogil:
    """Decode positions pos .. end-1 (whole pages or parts, then the tail) into dst [n, D]."""
    cdef Py_ssize_t logical, a, n, done = 0, j
    cdef const float* src
    while pos < end:
        logical = pos // P
        a = pos - logical * P
        n = min(P - a, end - pos)
        if logical < num_pages:
            decode_rows(arena + <Py_ssize_t>pages[logical] * page_bytes, side, h, a, n, P, D, dst + done * D, D)
        else:
            src = tail + (h * P + a) * D
            for j in range(n * D):
                dst[done * D + j] = src[j]
        done += n
        pos += n
    return done


cdef void attend_item(
    const uint8_t* arena, Py_ssize_t page_bytes, const Side* ks, const Side* vs,
    const int32_t* pages, Py_ssize_t num_pages, const float* tail_k, const float* tail_v,
    Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t H, Py_ssize_t P, Py_ssize_t D,
    const float* q, Py_ssize_t G, Py_ssize_t block,
    float* m_out, float* l_out, float* acc, float* work, float* scratch4,
) noexcept nogil:
    """Online softmax over logical positions [t0, t1) of one sequence, every head.

    q [H * G, D]: the query rows, already multiplied by the softmax scale. Outputs
    m_out, l_out [H * G] and acc [H * G, D] (unnormalised). A block of ``block`` tokens
    is finished for every head before the next, so each page is read from memory once
    and nearly in order; per head, K then V of the block are decoded into ``work``
    (block * D floats), followed by the probabilities [G, block] and one scratch row [block].
    ``scratch4``: 2 * D + block * D / 2 floats for int4 pages read in place.
    """
    cdef float* buf = work
    cdef float* p = work + block * D
    cdef float* pw = p + G * block
    cdef Py_ssize_t pos = t0, n, g, t, j, h, r, a = 0
    cdef float mnew, alpha, lsum
    cdef float* pg
    cdef float* ag
    cdef const uint8_t* page
    for r in range(H * G):
        m_out[r] = -INFINITY
        l_out[r] = 0
    for j in range(H * G * D):
        acc[j] = 0
    while pos < t1:
        n = min(block - pos % block, t1 - pos)     # blocks aligned to whole pages
        # With one query head per KV head (MHA), int8 and int4 rows inside one sealed page
        # are used as they are, with no decode pass (scales folded into the query or the
        # weights); with more, converting the codes once per query head costs more than
        # decoding them once into the buffer.
        page = NULL
        if G == 1 and pos // P == (pos + n - 1) // P and pos // P < num_pages:
            page = arena + <Py_ssize_t>pages[pos // P] * page_bytes
            a = pos % P
        for h in range(H):
            if page != NULL and ks.fmt == FMT_INT8:
                scores(q + h * D, <const int8_t*>(page + ks.codes_off) + (h * P + a) * D, n, D, p)
                for t in range(n):
                    p[t] = p[t] * load_side(page + ks.scales_off, h * P + a + t, ks.half)
            elif page != NULL and ks.fmt == FMT_INT4:
                page_scores_int4(page, ks, q + h * D, h, a, n, P, D, scratch4, p)
            else:
                gather(arena, page_bytes, ks, pages, num_pages, tail_k, pos, pos + n, h, P, D, buf)
                g = 0
                while g + 2 <= G:
                    scores2(q + (h * G + g) * D, q + (h * G + g + 1) * D, buf, n, D,
                            p + g * block, p + (g + 1) * block)
                    g += 2
                if g < G:
                    scores(q + (h * G + g) * D, buf, n, D, p + g * block)
            for g in range(G):
                r = h * G + g
                pg = p + g * block
                mnew = m_out[r]
                for t in range(n):
                    mnew = pg[t] if pg[t] > mnew else mnew
                lsum = 0
                for t in range(n):
                    pg[t] = fast_exp(pg[t] - mnew)
                    lsum = lsum + pg[t]
                if mnew > m_out[r]:       # rescale what was accumulated under the old max
                    alpha = fast_exp(m_out[r] - mnew)
                    ag = acc + r * D
                    for j in range(D):
                        ag[j] = ag[j] * alpha
                    l_out[r] = l_out[r] * alpha
                    m_out[r] = mnew
                l_out[r] = l_out[r] + lsum
            if page != NULL and vs.fmt == FMT_INT8:
                for t in range(n):      # fold each row's scale into its weight
                    pw[t] = p[t] * load_side(page + vs.scales_off, h * P + a + t, vs.half)
                accumulate(acc + h * D, pw, <const int8_t*>(page + vs.codes_off) + (h * P + a) * D, n, D)
            elif page != NULL and vs.fmt == FMT_INT4:
                page_accumulate_int4(page, vs, p, h, a, n, P, D, scratch4, acc + h * D)
            else:
                gather(arena, page_bytes, vs, pages, num_pages, tail_v, pos, pos + n, h, P, D, buf)
                g = 0
                while g + 2 <= G:
                    accumulate2(acc + (h * G + g) * D, acc + (h * G + g + 1) * D,
                                p + g * block, p + (g + 1) * block, buf, n, D)
                    g += 2
                if g < G:
                    accumulate(acc + (h * G + g) * D, p + g * block, buf, n, D)
        pos += n


def attend(
    const uint8_t[::1] arena, Py_ssize_t page_bytes,
    int k_fmt, Py_ssize_t k_codes_off, Py_ssize_t k_scales_off, Py_ssize_t k_zeros_off, Py_ssize_t k_row_bytes,
    bint k_side_half,
    int v_fmt, Py_ssize_t v_codes_off, Py_ssize_t v_scales_off, Py_ssize_t v_zeros_off, Py_ssize_t v_row_bytes,
    bint v_side_half, Py_ssize_t v_group,
    const int64_t[::1] page_indptr, const int32_t[::1] page_indices,
    const float[:, :, :, ::1] tail_k, const float[:, :, :, ::1] tail_v,
    const int64_t[:, ::1] items, const float[:, :, ::1] q, float sm_scale, Py_ssize_t block,
    float[:, ::1] m, float[:, ::1] l, float[:, :, ::1] acc, int nthreads,
):
    """Run every work item; its partial results go to m, l [N, H * G] and acc [N, H * G, D].

    ``k_fmt`` .. ``k_side_half`` and ``v_fmt`` .. ``v_side_half``: ``PageLayout.side_offsets``
    of K and of V (side data float16 where ``*_side_half``, else float32).

    items [N, 3]: (sequence index b, first logical position, end position), ranges starting
    on multiples of ``block`` (a multiple of the page size) except a sequence's first.
    q [B, H * G, D] float32 (query head j uses kv head j // G); tail_k/v [B, H, P, D].
    """
    cdef Py_ssize_t N = items.shape[0], H = tail_k.shape[1], P = tail_k.shape[2], D = tail_k.shape[3]
    cdef Py_ssize_t Hq = q.shape[1], G = Hq // H, i, b, j
    cdef Side ks, vs
    cdef float* work
    cdef float* qs
    # int4 keys are grouped per channel over the page: group 0
    init_side(&ks, k_fmt, k_codes_off, k_scales_off, k_zeros_off, k_row_bytes, k_side_half, 0, D,
              &FP8_TABLES[0][0], &FP8_TABLES[1][0])
    init_side(&vs, v_fmt, v_codes_off, v_scales_off, v_zeros_off, v_row_bytes, v_side_half, v_group, D,
              &FP8_TABLES[0][0], &FP8_TABLES[1][0])
    cdef const uint8_t* base = &arena[0] if arena.shape[0] else NULL
    if N == 0:
        return
    for i in prange(N, nogil=True, schedule="dynamic", num_threads=max(1, min(nthreads, N))):
        b = items[i, 0]
        work = <float*>malloc((block * D + (G + 1) * block + Hq * D + 2 * D + block * (D // 2)) * sizeof(float))
        if work == NULL:
            m[i, 0] = 0.0 / 0.0        # reported as an allocation failure by the caller
            continue
        qs = work + block * D + (G + 1) * block
        for j in range(Hq * D):
            qs[j] = q[b, j // D, j % D] * sm_scale
        attend_item(base, page_bytes, &ks, &vs,
                    &page_indices[0] + page_indptr[b], page_indptr[b + 1] - page_indptr[b],
                    &tail_k[b, 0, 0, 0], &tail_v[b, 0, 0, 0],
                    items[i, 1], items[i, 2], H, P, D, qs, G, block,
                    &m[i, 0], &l[i, 0], &acc[i, 0, 0], work, qs + Hq * D)
        free(work)


cdef inline void merge_row(const float[:, ::1] m, const float[:, ::1] l, const float[:, :, ::1] acc,
                           Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t r, float* o,
                           Py_ssize_t D) noexcept nogil:
    """Row ``r`` of the partial results of items ``k0 .. k1 - 1`` combined by log-sum-exp
    into ``o[0 .. D - 1]`` (items with an empty sum take no part)."""
    cdef Py_ssize_t k, j
    cdef float mx = -INFINITY, wsum = 0, w
    for k in range(k0, k1):
        if l[k, r] != 0:
            mx = m[k, r] if m[k, r] > mx else mx
    for j in range(D):
        o[j] = 0
    for k in range(k0, k1):
        if l[k, r] == 0:
            continue
        w = expf(m[k, r] - mx)
        wsum = wsum + w * l[k, r]
        for j in range(D):
            o[j] = o[j] + w * acc[k, r, j]
    # wsum >= 1 (the item holding the maximum has weight 1 and l >= 1) unless a score or a
    # sum overflowed float32: then the NaN or inf it carries must reach the output, where
    # the caller sees it and recomputes the row
    for j in range(D):
        o[j] = o[j] / wsum


def merge_partials(const int64_t[:, ::1] items, const float[:, ::1] m, const float[:, ::1] l,
                   const float[:, :, ::1] acc, float[:, :, ::1] out):
    """Combine the items of each sequence by log-sum-exp into out [B, H * G, D].

    Items of one sequence must be adjacent in ``items``.
    """
    cdef Py_ssize_t N = items.shape[0], Hq = m.shape[1], D = out.shape[2]
    cdef Py_ssize_t i = 0, k, e, b, r, j
    cdef float mx, wsum, w
    cdef float* o
    with nogil:
        while i < N:
            b = items[i, 0]
            e = i
            while e < N and items[e, 0] == b:
                e += 1
            for r in range(Hq):
                merge_row(m, l, acc, i, e, r, &out[b, r, 0], D)
            i = e


# ---------------------------------------------------------------------------------
# Paged attention of several query tokens per sequence (prefill, chunked prefill,
# speculative verification). Work items are (sequence, kv head, block of query tokens,
# range of key positions); an item keeps the block's queries (every GQA head) in a
# buffer and passes once over its key range a block of pages at a time: K of the block
# decoded and transposed, scores S = Q K^T as a small matrix product, online softmax
# row by row under the causal / window mask, then acc += P V. The items of one
# (sequence, kv head, query block) are merged by log-sum-exp (merge_query_blocks).

cdef enum:
    MR = 4      # rows of the register tile of gemm()
    NR = 16     # columns of the register tile (two AVX2 vectors, one AVX-512 vector)


cdef inline void gemm(const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                      float* C, Py_ssize_t ldc, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                      bint add) noexcept nogil:
    """C[M, N] = A[M, K] @ B[K, N] (``add``: C += A @ B), all row-major with leading
    dimensions lda, ldb, ldc. An MR x NR tile of C stays in registers over the K loop,
    so each B row loaded serves MR rows of A and no partial sum goes through memory."""
    cdef Py_ssize_t i, j, k, u, r, mr, nr
    cdef float c[MR][NR]
    cdef float a0, a1, a2, a3
    cdef const float* bk
    i = 0
    while i < M:
        mr = min(MR, M - i)
        j = 0
        while j < N:
            nr = min(NR, N - j)
            if mr == MR and nr == NR:
                for r in range(MR):
                    for u in range(NR):
                        c[r][u] = C[(i + r) * ldc + j + u] if add else 0
                for k in range(K):
                    bk = B + k * ldb + j
                    a0, a1, a2, a3 = A[i * lda + k], A[(i + 1) * lda + k], A[(i + 2) * lda + k], A[(i + 3) * lda + k]
                    for u in range(NR):
                        c[0][u] = c[0][u] + a0 * bk[u]
                        c[1][u] = c[1][u] + a1 * bk[u]
                        c[2][u] = c[2][u] + a2 * bk[u]
                        c[3][u] = c[3][u] + a3 * bk[u]
                for r in range(MR):
                    for u in range(NR):
                        C[(i + r) * ldc + j + u] = c[r][u]
            else:
                for r in range(mr):
                    for u in range(nr):
                        c[0][u] = C[(i + r) * ldc + j + u] if add else 0
                    for k in range(K):
                        a0 = A[(i + r) * lda + k]
                        bk = B + k * ldb + j
                        for u in range(nr):
                            c[0][u] = c[0][u] + a0 * bk[u]
                    for u in range(nr):
                        C[(i + r) * ldc + j + u] = c[0][u]
            j += NR
        i += MR


cdef void attend_queries_item(
    const uint8_t* arena, Py_ssize_t page_bytes, const Side* ks, const Side* vs,
    const int32_t* pages, Py_ssize_t num_pages, const float* tail_k, const float* tail_v,
    Py_ssize_t h, Py_ssize_t H, Py_ssize_t P, Py_ssize_t D, Py_ssize_t G,
    const float* q, Py_ssize_t nq, const int64_t* lo, const int64_t* hi,
    Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t block,
    float* m_out, float* l_out, float* acc, float* work,
) noexcept nogil:
    """Online softmax of ``nq`` query tokens (rows i * G + g, already scaled, q [nq * G, D])
    over key positions [t0, t1) of kv head h; token i sees positions lo[i] .. hi[i]
    (both non-decreasing in i). Outputs m_out, l_out [nq * G] and acc [nq * G, D],
    unnormalised; a row that saw no position in [t0, t1) has l = 0.

    work: the decoded block [block, D], its transpose [D, nb] and the scores [nq * G, nb]
    (nb: block rounded up to NR)."""
    cdef Py_ssize_t R = nq * G, nb = (block + NR - 1) // NR * NR
    cdef float* buf = work
    cdef float* kt = buf + block * D
    cdef float* s = kt + D * nb
    cdef Py_ssize_t pos = t0, n, ncol, i, ia, ib, ta, tb, t, j, r, g
    cdef float mnew, alpha, lsum, mold
    cdef float* sr
    for r in range(R):
        m_out[r] = -INFINITY
        l_out[r] = 0
    for j in range(R * D):
        acc[j] = 0
    ia = 0
    ib = 0
    while pos < t1:
        n = min(block - pos % block, t1 - pos)
        # the query tokens that see some position of this block: a contiguous range,
        # since lo and hi grow with the token
        while ia < nq and hi[ia] < pos:
            ia += 1
        ib = ia
        while ib < nq and lo[ib] < pos + n:
            ib += 1
        while ib > ia and hi[ib - 1] < pos:
            ib -= 1
        if ia >= ib:
            pos += n
            continue
        ncol = (n + NR - 1) // NR * NR
        gather(arena, page_bytes, ks, pages, num_pages, tail_k, pos, pos + n, h, P, D, buf)
        for j in range(D):
            for t in range(n):
                kt[j * nb + t] = buf[t * D + j]
            for t in range(n, ncol):
                kt[j * nb + t] = 0
        gemm(q + ia * G * D, D, kt, nb, s + ia * G * nb, nb, (ib - ia) * G, ncol, D, False)
        for i in range(ia, ib):
            ta = max(lo[i], pos) - pos
            tb = min(hi[i] + 1, pos + n) - pos
            for g in range(G):
                r = i * G + g
                sr = s + r * nb
                if ta >= tb:
                    for t in range(n):
                        sr[t] = 0
                    continue
                mold = m_out[r]
                mnew = mold
                for t in range(ta, tb):
                    mnew = sr[t] if sr[t] > mnew else mnew
                for t in range(ta):
                    sr[t] = 0
                lsum = 0
                for t in range(ta, tb):
                    sr[t] = fast_exp(sr[t] - mnew)
                    lsum = lsum + sr[t]
                for t in range(tb, n):
                    sr[t] = 0
                if mnew > mold:       # rescale what was accumulated under the old max
                    alpha = fast_exp(mold - mnew)
                    for j in range(D):
                        acc[r * D + j] = acc[r * D + j] * alpha
                    l_out[r] = l_out[r] * alpha
                    m_out[r] = mnew
                l_out[r] = l_out[r] + lsum
        gather(arena, page_bytes, vs, pages, num_pages, tail_v, pos, pos + n, h, P, D, buf)
        gemm(s + ia * G * nb, nb, buf, D, acc + ia * G * D, D, (ib - ia) * G, D, n, True)
        pos += n


def attend_queries(
    const uint8_t[::1] arena, Py_ssize_t page_bytes,
    int k_fmt, Py_ssize_t k_codes_off, Py_ssize_t k_scales_off, Py_ssize_t k_zeros_off, Py_ssize_t k_row_bytes,
    bint k_side_half,
    int v_fmt, Py_ssize_t v_codes_off, Py_ssize_t v_scales_off, Py_ssize_t v_zeros_off, Py_ssize_t v_row_bytes,
    bint v_side_half, Py_ssize_t v_group,
    const int64_t[::1] page_indptr, const int32_t[::1] page_indices,
    const float[:, :, :, ::1] tail_k, const float[:, :, :, ::1] tail_v,
    const int64_t[:, ::1] items, const float[:, :, :, ::1] q, const int64_t[:, ::1] lo,
    const int64_t[:, ::1] hi, float sm_scale, Py_ssize_t block,
    float[:, ::1] m, float[:, ::1] l, float[:, :, ::1] acc, int nthreads,
):
    """Run every work item of paged attention of several query tokens.

    items [N, 6]: (sequence index b, kv head h, first query token i0, end token i1, first
    key position t0, end position t1), key ranges cut on multiples of ``block`` (a
    multiple of the page size). q [B, T, H * G, D] float32 (query head j uses kv head
    j // G); lo, hi [B, T]: the first and last key position token i of sequence b sees.
    Partials go to m, l [N, QB * G] and acc [N, QB * G, D], row (i - i0) * G + g, for
    QB >= i1 - i0. ``k_fmt`` .. ``v_group`` as in :func:`attend`.
    """
    cdef Py_ssize_t N = items.shape[0], H = tail_k.shape[1], P = tail_k.shape[2], D = tail_k.shape[3]
    cdef Py_ssize_t Hq = q.shape[2], G = Hq // H, RMAX = m.shape[1], i, b, h, i0, nq, r, j
    cdef Py_ssize_t nb = (block + NR - 1) // NR * NR
    cdef Side ks, vs
    cdef float* work
    cdef float* qs
    init_side(&ks, k_fmt, k_codes_off, k_scales_off, k_zeros_off, k_row_bytes, k_side_half, 0, D,
              &FP8_TABLES[0][0], &FP8_TABLES[1][0])
    init_side(&vs, v_fmt, v_codes_off, v_scales_off, v_zeros_off, v_row_bytes, v_side_half, v_group, D,
              &FP8_TABLES[0][0], &FP8_TABLES[1][0])
    cdef const uint8_t* base = &arena[0] if arena.shape[0] else NULL
    if N == 0:
        return
    for i in prange(N, nogil=True, schedule="dynamic", num_threads=max(1, min(nthreads, N))):
        b, h, i0 = items[i, 0], items[i, 1], items[i, 2]
        nq = items[i, 3] - i0
        work = <float*>malloc((block * D + D * nb + RMAX * nb + RMAX * D) * sizeof(float))
        if work == NULL:
            m[i, 0] = 0.0 / 0.0        # reported as an allocation failure by the caller
            continue
        qs = work + block * D + D * nb + RMAX * nb
        for r in range(nq * G):
            for j in range(D):
                qs[r * D + j] = q[b, i0 + r // G, h * G + r % G, j] * sm_scale
        attend_queries_item(base, page_bytes, &ks, &vs,
                            &page_indices[0] + page_indptr[b], page_indptr[b + 1] - page_indptr[b],
                            &tail_k[b, 0, 0, 0], &tail_v[b, 0, 0, 0], h, H, P, D, G,
                            qs, nq, &lo[b, i0], &hi[b, i0], items[i, 4], items[i, 5], block,
                            &m[i, 0], &l[i, 0], &acc[i, 0, 0], work)
        free(work)


def merge_query_blocks(const int64_t[:, ::1] items, const int64_t[::1] group_ptr,
                       const float[:, ::1] m, const float[:, ::1] l, const float[:, :, ::1] acc,
                       Py_ssize_t G, float[:, :, :, ::1] out, int nthreads):
    """Combine the items group_ptr[k] .. group_ptr[k + 1] - 1 (one sequence, kv head and
    query block, split over key ranges) by log-sum-exp into out [B, T, H * G, D]."""
    cdef Py_ssize_t NG = group_ptr.shape[0] - 1, D = out.shape[3]
    cdef Py_ssize_t grp, k, e, i0, b, h, r, j, R, s0
    cdef float mx, wsum, w
    cdef float* o
    if NG == 0:
        return
    for grp in prange(NG, nogil=True, schedule="static", num_threads=max(1, min(nthreads, NG))):
        s0 = group_ptr[grp]
        e = group_ptr[grp + 1]
        b, h, i0 = items[s0, 0], items[s0, 1], items[s0, 2]
        R = (items[s0, 3] - i0) * G
        for r in range(R):
            merge_row(m, l, acc, s0, e, r, &out[b, i0 + r // G, h * G + r % G, 0], D)
