/* Window attention on AVX-512 CPUs, inference only, for float32 or bfloat16 q, k, v.
 *
 * out = softmax(q k^T + bias) v for every (window, head), with 32-wide heads and any window
 * length N. q, k and v are read in place through their strides (views of the qkv GEMM's
 * output); the output is written as (windows, N, heads, 32), the layout the projection
 * after it reads. Each OpenMP thread takes a contiguous range of (window, head) pairs; per pair
 * k is transposed once into a scratch buffer, then 4 query rows at a time get their scores
 * (kept in registers when N <= 64), softmax and output rows.
 *
 * bfloat16 inputs are widened to float32 as they are read (exactly: a bfloat16 is the top half
 * of a float32) and everything is computed in float32, the bias included; only the output is
 * rounded to bfloat16 (to nearest, ties to even).
 *
 * With per-head scales (cosine attention, SwinV2) each q row is first scaled to
 * scale[h] / max(||q||, eps) and each k row to 1 / max(||k||, eps), as F.normalize and the
 * logit scale do: the products then see the same rounded q and k as PyTorch's path.
 *
 * NaN and infinities go where PyTorch's attention takes them: every max, floor and clamp below
 * keeps a NaN operand (the AVX-512 max returns its second operand when either is NaN, so the
 * value that may be NaN goes second), a row holding a NaN score is NaN, a NaN or infinite v
 * reaches every output it is weighed into, and a row whose every score is -inf (fully masked)
 * gets all-zero weights, as scaled_dot_product_attention gives it.
 *
 * Built and loaded by swinv2/native.py, which also checks it against PyTorch before use.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* Below this, float32's e^x rounds to 0 (e^x <= 2^-150, x <= -150 ln 2). */
#define EXP_ZERO (-103.972076f)

/* e^x for x <= 0 (scores after the row maximum is subtracted): x = n ln2 + r with |r| <= ln2/2,
 * a degree-7 polynomial for e^r, then scaled by 2^n. Inputs from -87 down to EXP_ZERO give
 * e^-87 (~1e-38, the smallest normal float32: no denormal reaches the products, which some
 * CPUs handle in slow microcode); below it, -inf included, exactly 0, as PyTorch's exp, so that
 * a weight of 0 times an infinite v is NaN in both. A NaN stays NaN. */
static inline __m512 exp_neg(__m512 x) {
    const __mmask16 nonzero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_ZERO), _CMP_NLT_UQ);  /* or NaN */
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  /* x second: a NaN x is kept */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps(nonzero, p, n);
}

typedef struct {
    const void *q, *k, *v; const float *bias; void *o;  /* q, k, v, o: float32 or bfloat16 */
    const float *scale;            /* cosine attention: per-head logit scales, or NULL */
    float eps;                     /* cosine attention: the floor of the q and k norms */
    int64_t B, H, N, nb;           /* windows, heads, tokens, bias windows (1 or nW) */
    int64_t sqb, sqh, sqn;         /* q/k/v strides (elements): window, head, token; d contiguous */
    int64_t skb, skh, skn, svb, svh, svn;
    int64_t sob, soh, son;         /* output strides */
    int64_t begin, end;            /* task range: task = b*H + h */
    int status;                    /* 0, or -1 when scratch memory could not be allocated */
} job_t;

#define D 32
#define R 4

/* The products of R query rows (qr) with key columns cb*16 .. cb*16 + nc*16 - 1 of the
 * transposed keys kt (rows of stride ld): acc[r][c], nc <= 4 blocks of 16. */
static inline __attribute__((always_inline)) void products(__m512 acc[R][4], const float *const qr[R],
                                                           const float *kt, int64_t ld, int64_t cb, int nc) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int c = 0; c < D; c++) {
        const float *kc = kt + c * ld + cb * 16;
        __m512 kv0 = _mm512_load_ps(kc);
        __m512 kv1 = nc > 1 ? _mm512_load_ps(kc + 16) : kv0;
        __m512 kv2 = nc > 2 ? _mm512_load_ps(kc + 32) : kv0;
        __m512 kv3 = nc > 3 ? _mm512_load_ps(kc + 48) : kv0;
        for (int r = 0; r < R; r++) {
            __m512 qb = _mm512_set1_ps(qr[r][c]);
            acc[r][0] = _mm512_fmadd_ps(qb, kv0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(qb, kv1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(qb, kv2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(qb, kv3, acc[r][3]);
        }
    }
}

/* A row of 32 bfloat16 as two float32 vectors (exact). */
static inline __attribute__((always_inline)) void widen_bf16(const uint16_t *p, __m512 *lo, __m512 *hi) {
    const __m512i x = _mm512_loadu_si512(p);
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16));
    *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16));
}

/* 16 float32 rounded to bfloat16, to nearest with ties to even; NaN stays a (quiet) NaN. */
static inline __attribute__((always_inline)) __m256i round_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

/* The row maximum to subtract before the exponentials: 0 for a fully masked row (every score
 * -inf), whose weights are then all e^-inf = 0 instead of e^(-inf + inf) = NaN. A NaN in the
 * row may or may not win the reduction; either way its own exponential is NaN, and the row's. */
static inline __m512 row_max(__m512 mx) {
    const float m = _mm512_reduce_max_ps(mx);
    return _mm512_set1_ps(m == -INFINITY ? 0.0f : m);
}

/* 1 / the row's sum of weights; 0 for a fully masked row (sum 0), whose output is then its all-0
 * weights times v: 0, or NaN where v holds a NaN or an infinity, as in PyTorch. */
static inline float row_inv(__m512 sum) {
    const float t = _mm512_reduce_add_ps(sum);
    return t == 0.0f ? 0.0f : 1.0f / t;
}

/* K transposed into kt (rows of stride ld) for keys n0 .. n0+cnt-1, one at a time: for token
 * strides whose byte offsets within a block of 16 keys do not fit the gathers' 32-bit indices.
 * Lanes past cnt are 0. Returns the 16 keys' sums of squares, one per lane. */
static __m512 transpose_keys_scalar(float *kt, int64_t ld, const char *kb, int64_t step, int64_t cnt, int bf16) {
    __m512 ss = _mm512_setzero_ps();
    for (int c = 0; c < D; c++) {
        float *row = kt + c * ld;
        for (int64_t l = 0; l < 16; l++) {
            float x = 0.0f;
            if (l < cnt) {
                const char *p = kb + l * step;
                if (bf16) {
                    const uint32_t u = (uint32_t)((const uint16_t *)p)[c] << 16;
                    memcpy(&x, &u, sizeof x);
                } else {
                    x = ((const float *)p)[c];
                }
            }
            row[l] = x;
        }
        const __m512 g = _mm512_load_ps(row);
        ss = _mm512_fmadd_ps(g, g, ss);
    }
    return ss;
}

/* bf16 is a compile-time constant in each caller: the two element types get their own code. */
static inline __attribute__((always_inline)) void run_typed(job_t *j, const int bf16) {
    const int64_t N = j->N, NB = (N + 15) / 16, esz = bf16 ? 2 : 4;
    float *kt = aligned_alloc(64, sizeof(float) * D * NB * 16);
    float *s = aligned_alloc(64, sizeof(float) * R * NB * 16);
    float *qs = aligned_alloc(64, sizeof(float) * R * D);
    float *vf = bf16 ? aligned_alloc(64, sizeof(float) * D * N) : 0;  /* v widened, rows of 32 */
    if (!kt || !s || !qs || (bf16 && !vf)) {
        free(kt); free(s); free(qs); free(vf);
        j->status = -1;
        return;
    }
    for (int64_t i = 0; i < D * NB * 16; i++) kt[i] = 0.f;
    for (int64_t t = j->begin; t < j->end; t++) {
        const int64_t b = t / j->H, h = t % j->H;
        /* element pointers: bytes, with the element size (strides are in elements) */
        const char *q = (const char *)j->q + (b * j->sqb + h * j->sqh) * esz;
        const char *k = (const char *)j->k + (b * j->skb + h * j->skh) * esz;
        const char *v = (const char *)j->v + (b * j->svb + h * j->svh) * esz;
        const float *bias = j->bias ? j->bias + ((b % j->nb) * j->H + h) * N * N : 0;
        char *o = (char *)j->o + (b * j->sob + h * j->soh) * esz;
        const int64_t sqn = j->sqn * esz, svn = j->svn * esz, son = j->son * esz;  /* row strides, bytes */
        if (t + 1 < j->end) {
            /* ask for the next pair's q, k and v rows (two cache lines each) while this pair
             * computes: its strided rows otherwise arrive one load at a time (~20% of the time) */
            const int64_t b2 = (t + 1) / j->H, h2 = (t + 1) % j->H;
            const char *q2 = (const char *)j->q + (b2 * j->sqb + h2 * j->sqh) * esz;
            const char *k2 = (const char *)j->k + (b2 * j->skb + h2 * j->skh) * esz;
            const char *v2 = (const char *)j->v + (b2 * j->svb + h2 * j->svh) * esz;
            for (int64_t n = 0; n < N; n++) {
                const int64_t qo = n * j->sqn * esz, ko = n * j->skn * esz, vo = n * j->svn * esz;
                _mm_prefetch(q2 + qo, _MM_HINT_T0);
                _mm_prefetch(q2 + qo + 64, _MM_HINT_T0);
                _mm_prefetch(k2 + ko, _MM_HINT_T0);
                _mm_prefetch(k2 + ko + 64, _MM_HINT_T0);
                _mm_prefetch(v2 + vo, _MM_HINT_T0);
                _mm_prefetch(v2 + vo + 64, _MM_HINT_T0);
            }
        }
        /* K transposed: kt[c][n], rows padded to NB*16 (padding stays 0) */
        for (int64_t cb = 0; cb < NB; cb++) {
            const int64_t n0 = cb * 16, cnt = (N - n0) < 16 ? (N - n0) : 16;
            const __mmask16 m = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
            const int64_t step = j->skn * esz;  /* bytes from one key to the next */
            const char *kb = k + n0 * step;
            __m512 ss = _mm512_setzero_ps();
            /* the gathers' lane offsets (up to 15 steps, in bytes) are 32-bit */
            const int narrow = step <= INT32_MAX / 15;
            const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15),
                                                   _mm512_set1_epi32(narrow ? (int)step : 0));
            if (!narrow) {
                ss = transpose_keys_scalar(kt + n0, NB * 16, kb, step, cnt, bf16);
            } else if (bf16) {
                /* one 32-bit gather brings channels c and c+1 of 16 keys: c in the low half
                 * (little-endian), c+1 in the high half; a bfloat16 is a float32's high half */
                for (int c = 0; c < D; c += 2) {
                    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, kb + 2 * c, 1);
                    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(g, 16));
                    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(g, _mm512_set1_epi32((int)0xFFFF0000u)));
                    _mm512_store_ps(kt + c * NB * 16 + n0, even);
                    _mm512_store_ps(kt + (c + 1) * NB * 16 + n0, odd);
                    ss = _mm512_fmadd_ps(odd, odd, _mm512_fmadd_ps(even, even, ss));
                }
            } else {
                for (int c = 0; c < D; c++) {
                    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, kb + 4 * c, 1);
                    _mm512_store_ps(kt + c * NB * 16 + n0, g);
                    ss = _mm512_fmadd_ps(g, g, ss);
                }
            }
            if (j->scale) {
                /* 16 keys' norms at once, one lane each; padded lanes stay 0 */
                const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(j->eps), _mm512_sqrt_ps(ss)));
                for (int c = 0; c < D; c++) {
                    float *kc = kt + c * NB * 16 + n0;
                    _mm512_store_ps(kc, _mm512_mul_ps(_mm512_load_ps(kc), inv));
                }
            }
        }
        if (bf16)
            for (int64_t n = 0; n < N; n++) {
                __m512 a, c;
                widen_bf16((const uint16_t *)(v + n * svn), &a, &c);
                _mm512_store_ps(vf + n * D, a);
                _mm512_store_ps(vf + n * D + 16, c);
            }
        for (int64_t i0 = 0; i0 < N; i0 += R) {
            const int rows = (N - i0) < R ? (int)(N - i0) : R;
            const float *qr[R];
            for (int r = 0; r < R; r++) qr[r] = (const float *)(q + (i0 + (r < rows ? r : 0)) * sqn);
            if (j->scale || bf16) {
                /* q rows into a contiguous float32 block: scaled to scale / max(||q||, eps) for
                 * cosine attention, widened for bfloat16 */
                const float sh = j->scale ? j->scale[h] : 1.0f;
                for (int r = 0; r < R; r++) {
                    __m512 a, b;
                    if (bf16) widen_bf16((const uint16_t *)qr[r], &a, &b);
                    else a = _mm512_loadu_ps(qr[r]), b = _mm512_loadu_ps(qr[r] + 16);
                    if (j->scale) {
                        const float norm = sqrtf(_mm512_reduce_add_ps(_mm512_fmadd_ps(a, a, _mm512_mul_ps(b, b))));
                        const __m512 f = _mm512_set1_ps(sh * (1.0f / (norm < j->eps ? j->eps : norm)));  /* NaN kept */
                        a = _mm512_mul_ps(a, f), b = _mm512_mul_ps(b, f);
                    }
                    _mm512_store_ps(qs + r * D, a);
                    _mm512_store_ps(qs + r * D + 16, b);
                    qr[r] = qs + r * D;
                }
            }
            float inv[R];
            const __mmask16 tail = (N % 16) ? (__mmask16)((1u << (N % 16)) - 1) : (__mmask16)0xFFFF;
            if (NB <= 4) {
                /* N <= 64: the row block's scores stay in registers from the products to the
                 * exponentials; the bias is added to the finished products (adding the products
                 * onto it would round every partial sum at the bias's magnitude) */
                __m512 acc[R][4];
                products(acc, qr, kt, NB * 16, 0, (int)NB);
                const __m512 ninf = _mm512_set1_ps(-INFINITY);
                for (int r = 0; r < R; r++) {
                    const float *br = bias ? bias + (i0 + (r < rows ? r : 0)) * N : 0;
                    for (int c = 0; c < 4; c++) {
                        __mmask16 m = c < NB - 1 ? (__mmask16)0xFFFF : (c == NB - 1 ? tail : 0);
                        if (br) acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_maskz_loadu_ps(m, br + c * 16));
                        acc[r][c] = _mm512_mask_blend_ps(m, ninf, acc[r][c]);
                    }
                    __m512 mx = _mm512_max_ps(_mm512_max_ps(acc[r][0], acc[r][1]), _mm512_max_ps(acc[r][2], acc[r][3]));
                    const __m512 mxv = row_max(mx);
                    __m512 sum = _mm512_setzero_ps();
                    for (int c = 0; c < 4; c++) {
                        if (c >= NB) break;
                        __mmask16 m = c < NB - 1 ? (__mmask16)0xFFFF : tail;
                        __m512 e = _mm512_maskz_mov_ps(m, exp_neg(_mm512_sub_ps(acc[r][c], mxv)));
                        _mm512_store_ps(s + r * NB * 16 + c * 16, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    inv[r] = row_inv(sum);
                }
            } else {
            /* scores, 4 column blocks of 16 at a time */
            for (int64_t cb = 0; cb < NB; cb += 4) {
                const int nc = (NB - cb) < 4 ? (int)(NB - cb) : 4;
                __m512 acc[R][4];
                products(acc, qr, kt, NB * 16, cb, nc);
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < nc; c++) _mm512_store_ps(s + r * NB * 16 + (cb + c) * 16, acc[r][c]);
            }
            /* bias, softmax numerators, row sums */
            for (int r = 0; r < rows; r++) {
                float *sr = s + r * NB * 16;
                const float *br = bias ? bias + (i0 + r) * N : 0;
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int64_t cb = 0; cb < NB; cb++) {
                    __mmask16 m = cb == NB - 1 ? tail : 0xFFFF;
                    __m512 x = _mm512_maskz_load_ps(m, sr + cb * 16);
                    if (br) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, br + cb * 16));
                    x = _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), x);
                    _mm512_store_ps(sr + cb * 16, x);
                    mx = _mm512_max_ps(mx, x);
                }
                const __m512 mxv = row_max(mx);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t cb = 0; cb < NB; cb++) {
                    __mmask16 m = cb == NB - 1 ? tail : 0xFFFF;
                    __m512 e = _mm512_maskz_mov_ps(m, exp_neg(_mm512_sub_ps(_mm512_load_ps(sr + cb * 16), mxv)));
                    _mm512_store_ps(sr + cb * 16, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[r] = row_inv(sum);
            }
            }
            /* out = P V */
            __m512 oa[R][2];
            for (int r = 0; r < R; r++) oa[r][0] = oa[r][1] = _mm512_setzero_ps();
            for (int64_t n = 0; n < N; n++) {
                const float *vr = bf16 ? vf + n * D : (const float *)(v + n * svn);
                __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16);
                for (int r = 0; r < R; r++) {
                    __m512 p = _mm512_set1_ps(s[r * NB * 16 + n]);
                    oa[r][0] = _mm512_fmadd_ps(p, v0, oa[r][0]);
                    oa[r][1] = _mm512_fmadd_ps(p, v1, oa[r][1]);
                }
            }
            for (int r = 0; r < rows; r++) {
                char *orow = o + (i0 + r) * son;
                __m512 f = _mm512_set1_ps(inv[r]);
                if (bf16) {
                    _mm256_storeu_si256((__m256i *)orow, round_bf16(_mm512_mul_ps(oa[r][0], f)));
                    _mm256_storeu_si256((__m256i *)(orow + 32), round_bf16(_mm512_mul_ps(oa[r][1], f)));
                } else {
                    _mm512_storeu_ps((float *)orow, _mm512_mul_ps(oa[r][0], f));
                    _mm512_storeu_ps((float *)orow + 16, _mm512_mul_ps(oa[r][1], f));
                }
            }
        }
    }
    free(kt); free(s); free(qs); free(vf);
}

static void run_f32(job_t *j) { run_typed(j, 0); }
static void run_bf16(job_t *j) { run_typed(j, 1); }

/* q, k, v and o: float32 (bf16 = 0) or bfloat16 (bf16 = 1); bias: float32 or NULL.
 * scale: NULL for softmax(q k^T + bias) v as given, or H per-head factors for cosine attention
 * (q and k normalised with the floor eps, q times its head's factor).
 * st: the strides of q, k, v (window, head, token) and o (window, head, token), in elements.
 * Returns 0 on success, -1 when scratch memory ran out (the output is then incomplete).
 * The (window, head) pairs are split evenly over `threads` OpenMP threads: linked against the
 * OpenMP runtime PyTorch has already loaded, this is PyTorch's own thread pool. */
int window_attention(const void *q, const void *k, const void *v, const float *bias, void *o,
                     const float *scale, float eps, int bf16,
                     int64_t B, int64_t H, int64_t N, int64_t nb, const int64_t *st, int threads) {
    const int64_t tasks = B * H;
    int status = 0;
    if (tasks <= 0 || N <= 0) return 0;  /* nothing to compute (and no scratch of size 0 to ask for) */
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = tasks > 0 ? (int)tasks : 1;
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
        job_t j = {q, k, v, bias, o, scale, eps, B, H, N, nb, st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8],
                   st[9], st[10], st[11], tasks * i / n, tasks * (i + 1) / n, 0};
        if (bf16) run_bf16(&j);
        else run_f32(&j);
        status |= j.status;
    }
    return status;
}
