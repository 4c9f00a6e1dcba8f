#include <math.h>
#include <stdlib.h>
#include <string.h>
typedef float real;

#include <stdint.h>
static inline float exp_f(float x) {
    float c = x < 88.73f ? x : 88.73f;
    c = c > -104.0f ? c : -104.0f;
    float n = floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * z + r + 1.0f;
    int32_t k = (int32_t)n;
    int32_t half = k >> 1;  /* 2^k as two factors, so that k = 128 and k < -126 stay exact */
    union { int32_t i; float f; } s1, s2;
    s1.i = (half + 127) << 23;
    s2.i = (k - half + 127) << 23;
    float result = y * s1.f * s2.f;
    return x != x ? x : result;
}
static inline float tanh_f(float x) {
    float a = fabsf(x);
    float z = x * x;
    float p = -5.70498872745E-3f;
    p = p * z + 2.06390887954E-2f;
    p = p * z - 5.37397155531E-2f;
    p = p * z + 1.33314422036E-1f;
    p = p * z - 3.33332819422E-1f;
    float small = p * z * x + x;
    float large = 1 - 2 / (exp_f(2 * a) + 1);
    large = x < 0 ? -large : large;
    return a < 0.625f ? small : large;
}

#define EXP exp_f
#define LOG logf
#define SQRT sqrtf
#define FABS fabsf
#define TANH tanh_f
#define COS cosf
#define SIN sinf
#define LOG1P log1pf
#define EXPM1 expm1f
#define POW powf

static inline real sigmoid_(real x) { return 1 / (1 + EXP(-x)); }
static inline real logsigmoid_(real x) { return (x < 0 ? x : (real)0) - LOG1P(EXP(-FABS(x))); }
static inline real softplus_(real x) { return x > 20 ? x : LOG1P(EXP(x)); }
static inline real silu_(real x) { return x / (1 + EXP(-x)); }
static inline real relu_(real x) { return x < 0 ? (real)0 : x; }
static inline real sign_(real x) { return x > 0 ? (real)1 : (x < 0 ? (real)-1 : (real)0); }
static inline real maximum_(real a, real b) { return (a > b || a != a) ? a : b; }
static inline real minimum_(real a, real b) { return (a < b || a != a) ? a : b; }
static inline real logaddexp_(real a, real b) {
    if (isinf(a) && a == b) return a;
    real m = a > b ? a : b;
    return m + LOG1P(EXP(-FABS(a - b)));
}

/* C[n, 0:M] (+)= A[n, 0:K] @ W[K, M] for n < N (row strides lda, ldc).  Blocks of 4 rows x 16
   columns are accumulated in registers over k, so W is read once per 4 rows and C written once. */
#define ROWS 4
#define COLUMNS 16
static void matmul_rows(long N, long K, long M, const real *restrict A, long lda, const real *restrict W, real *restrict C, long ldc, int accumulate) {
    long j0 = 0;
    for (; j0 + COLUMNS <= M; j0 += COLUMNS) {
        for (long n0 = 0; n0 < N; n0 += ROWS) {
            real acc[ROWS][COLUMNS];
            for (int r = 0; r < ROWS; r++) for (int c = 0; c < COLUMNS; c++) acc[r][c] = 0;
            if (n0 + ROWS <= N) {
                for (long k = 0; k < K; k++) {
                    const real *w = W + k * M + j0;
                    for (int r = 0; r < ROWS; r++) {
                        const real a = A[(n0 + r) * lda + k];
                        for (int c = 0; c < COLUMNS; c++) acc[r][c] += a * w[c];
                    }
                }
            } else {
                for (long k = 0; k < K; k++) {
                    const real *w = W + k * M + j0;
                    for (int r = 0; r < ROWS; r++) {
                        const real a = n0 + r < N ? A[(n0 + r) * lda + k] : (real)0;
                        for (int c = 0; c < COLUMNS; c++) acc[r][c] += a * w[c];
                    }
                }
            }
            for (int r = 0; r < ROWS && n0 + r < N; r++) {
                real *out = C + (n0 + r) * ldc + j0;
                for (int c = 0; c < COLUMNS; c++) out[c] = accumulate ? out[c] + acc[r][c] : acc[r][c];
            }
        }
    }
    for (long n = 0; n < N; n++) {
        for (long j = j0; j < M; j++) {
            real sum = 0;
            for (long k = 0; k < K; k++) sum += A[n * lda + k] * W[k * M + j];
            C[n * ldc + j] = accumulate ? C[n * ldc + j] + sum : sum;
        }
    }
}

static void __attribute__((noinline)) forward_4_24(long N, real *restrict V24, const real *restrict G0, const real *restrict HP0, const real *restrict LC0, const real *restrict LC1, const real *restrict LC2, const real *restrict LV0, const real *restrict LV1, const real *restrict LV2) {
    for (long n = 0; n < N; n++)
    #pragma GCC ivdep
    for (long j = 0; j < 8; j++) {
        const real v4 = (LV0[n * 8 + j] + G0[n * 24 + 0 + j]);
        const real v6 = (v4 + LC0[j]);
        const real v7 = sigmoid_(v6);
        const real v8 = (((real)1.0) - v7);
        const real v12 = (LV2[n * 8 + j] + G0[n * 24 + 8 + j]);
        const real v14 = (v12 + LC1[j]);
        const real v15 = sigmoid_(v14);
        const real v18 = (G0[n * 24 + 16 + j] + LC2[j]);
        const real v19 = (v15 * v18);
        const real v20 = (LV1[n * 8 + j] + v19);
        const real v21 = TANH(v20);
        const real v22 = (v8 * v21);
        const real v23 = (v7 * HP0[n * 8 + j]);
        const real v24 = (v22 + v23);
        V24[n * 8 + j] = v24;
    }
}
static void __attribute__((noinline)) recompute_4_24(long N, real *restrict V12, real *restrict V14, real *restrict V15, real *restrict V18, real *restrict V19, real *restrict V20, real *restrict V21, real *restrict V22, real *restrict V23, real *restrict V24, real *restrict V4, real *restrict V6, real *restrict V7, real *restrict V8, const real *restrict G0, const real *restrict HP0, const real *restrict LC0, const real *restrict LC1, const real *restrict LC2, const real *restrict LV0, const real *restrict LV1, const real *restrict LV2) {
    for (long n = 0; n < N; n++)
    #pragma GCC ivdep
    for (long j = 0; j < 8; j++) {
        const real v4 = (LV0[n * 8 + j] + G0[n * 24 + 0 + j]);
        V4[n * 8 + j] = v4;
        const real v6 = (v4 + LC0[j]);
        V6[n * 8 + j] = v6;
        const real v7 = sigmoid_(v6);
        V7[n * 8 + j] = v7;
        const real v8 = (((real)1.0) - v7);
        V8[n * 8 + j] = v8;
        const real v12 = (LV2[n * 8 + j] + G0[n * 24 + 8 + j]);
        V12[n * 8 + j] = v12;
        const real v14 = (v12 + LC1[j]);
        V14[n * 8 + j] = v14;
        const real v15 = sigmoid_(v14);
        V15[n * 8 + j] = v15;
        const real v18 = (G0[n * 24 + 16 + j] + LC2[j]);
        V18[n * 8 + j] = v18;
        const real v19 = (v15 * v18);
        V19[n * 8 + j] = v19;
        const real v20 = (LV1[n * 8 + j] + v19);
        V20[n * 8 + j] = v20;
        const real v21 = TANH(v20);
        V21[n * 8 + j] = v21;
        const real v22 = (v8 * v21);
        V22[n * 8 + j] = v22;
        const real v23 = (v7 * HP0[n * 8 + j]);
        V23[n * 8 + j] = v23;
        const real v24 = (v22 + v23);
        V24[n * 8 + j] = v24;
    }
}
static void __attribute__((noinline)) backward_4_24(long N, real *restrict DG0, real *restrict DHP0, real *restrict DLC0, real *restrict DLC1, real *restrict DLC2, real *restrict DLV0, real *restrict DLV1, real *restrict DLV2, const real *restrict DV24, const real *restrict G0, const real *restrict HP0, const real *restrict LC0, const real *restrict LC1, const real *restrict LC2, const real *restrict LV0, const real *restrict LV1, const real *restrict LV2, const real *restrict V12, const real *restrict V14, const real *restrict V15, const real *restrict V18, const real *restrict V19, const real *restrict V20, const real *restrict V21, const real *restrict V22, const real *restrict V23, const real *restrict V24, const real *restrict V4, const real *restrict V6, const real *restrict V7, const real *restrict V8) {
    for (long n = 0; n < N; n++)
    #pragma GCC ivdep
    for (long j = 0; j < 8; j++) {
        real d4 = 0;
        real d6 = 0;
        real d7 = 0;
        real d8 = 0;
        real d12 = 0;
        real d14 = 0;
        real d15 = 0;
        real d18 = 0;
        real d19 = 0;
        real d20 = 0;
        real d21 = 0;
        real d22 = 0;
        real d23 = 0;
         {
            const real g = DV24[n * 8 + j];
            const real r = V24[n * 8 + j];
            (void)r;
            d22 += g;
            d23 += g;
        }
         {
            const real g = d23;
            const real r = V23[n * 8 + j];
            (void)r;
            d7 += (g * HP0[n * 8 + j]);
            DHP0[n * 8 + j] += (g * V7[n * 8 + j]);
        }
         {
            const real g = d22;
            const real r = V22[n * 8 + j];
            (void)r;
            d8 += (g * V21[n * 8 + j]);
            d21 += (g * V8[n * 8 + j]);
        }
         {
            const real g = d21;
            const real r = V21[n * 8 + j];
            (void)r;
            d20 += (g * (((real)1.0) - (r * r)));
        }
         {
            const real g = d20;
            const real r = V20[n * 8 + j];
            (void)r;
            DLV1[n * 8 + j] += g;
            d19 += g;
        }
         {
            const real g = d19;
            const real r = V19[n * 8 + j];
            (void)r;
            d15 += (g * V18[n * 8 + j]);
            d18 += (g * V15[n * 8 + j]);
        }
         {
            const real g = d18;
            const real r = V18[n * 8 + j];
            (void)r;
            DG0[n * 24 + 16 + j] += g;
            DLC2[j] += g;
        }
         {
            const real g = d15;
            const real r = V15[n * 8 + j];
            (void)r;
            d14 += ((g * (((real)1.0) - r)) * r);
        }
         {
            const real g = d14;
            const real r = V14[n * 8 + j];
            (void)r;
            d12 += g;
            DLC1[j] += g;
        }
         {
            const real g = d12;
            const real r = V12[n * 8 + j];
            (void)r;
            DLV2[n * 8 + j] += g;
            DG0[n * 24 + 8 + j] += g;
        }
         {
            const real g = d8;
            const real r = V8[n * 8 + j];
            (void)r;
            d7 += (-g);
        }
         {
            const real g = d7;
            const real r = V7[n * 8 + j];
            (void)r;
            d6 += ((g * (((real)1.0) - r)) * r);
        }
         {
            const real g = d6;
            const real r = V6[n * 8 + j];
            (void)r;
            d4 += g;
            DLC0[j] += g;
        }
         {
            const real g = d4;
            const real r = V4[n * 8 + j];
            (void)r;
            DLV0[n * 8 + j] += g;
            DG0[n * 24 + 0 + j] += g;
        }
    }
}
int recdsl_forward(long T, long N, int save, void **p) {
    const real *lv0 = (real *)p[0];
    const real *lv1 = (real *)p[1];
    const real *lv2 = (real *)p[2];
    const real *LC0 = (real *)p[3];
    const real *LC1 = (real *)p[4];
    const real *LC2 = (real *)p[5];
    const real *W0 = (real *)p[6];
    const real *init0 = (real *)p[7];
    real *seq0 = (real *)p[8];
    real *gseq0 = (real *)p[9];
    real *scratch = (real *)calloc((size_t)N * 136, sizeof(real));
    if (!scratch) return 1;
    real *V4 = scratch + N * 0;
    real *V6 = scratch + N * 8;
    real *V7 = scratch + N * 16;
    real *V8 = scratch + N * 24;
    real *V12 = scratch + N * 32;
    real *V14 = scratch + N * 40;
    real *V15 = scratch + N * 48;
    real *V18 = scratch + N * 56;
    real *V19 = scratch + N * 64;
    real *V20 = scratch + N * 72;
    real *V21 = scratch + N * 80;
    real *V22 = scratch + N * 88;
    real *V23 = scratch + N * 96;
    real *V24 = scratch + N * 104;
    real *gstep0 = scratch + N * 112;
    for (long t = 0; t < T; t++) {
        const real *LV0 = lv0 + t * N * 8;
        const real *LV1 = lv1 + t * N * 8;
        const real *LV2 = lv2 + t * N * 8;
        const real *HP0 = t ? seq0 + (t - 1) * N * 8 : init0;
        real *G0 = save ? gseq0 + t * N * 24 : gstep0;
        matmul_rows(N, 8, 24, HP0, 8, W0, G0, 24, 0);
        forward_4_24(N, V24, G0, HP0, LC0, LC1, LC2, LV0, LV1, LV2);
        for (long n = 0; n < N; n++)
        #pragma GCC ivdep
        for (long j = 0; j < 8; j++) {
            seq0[t * N * 8 + n * 8 + j] = V24[n * 8 + j];
        }
    }
    free(scratch);
    return 0;
}
int recdsl_backward(long T, long N, void **p) {
    const real *lv0 = (real *)p[0];
    const real *lv1 = (real *)p[1];
    const real *lv2 = (real *)p[2];
    const real *LC0 = (real *)p[3];
    const real *LC1 = (real *)p[4];
    const real *LC2 = (real *)p[5];
    const real *W0 = (real *)p[6];
    const real *WT0 = (real *)p[7];
    const real *init0 = (real *)p[8];
    const real *seq0 = (real *)p[9];
    const real *gseq0 = (real *)p[10];
    const real *dseq0 = (real *)p[11];
    real *dlv0 = (real *)p[12];
    real *dlv1 = (real *)p[13];
    real *dlv2 = (real *)p[14];
    real *DLC0 = (real *)p[15];
    real *DLC1 = (real *)p[16];
    real *DLC2 = (real *)p[17];
    real *dgseq0 = (real *)p[18];
    real *lseq0 = (real *)p[19];
    real *dinit0 = (real *)p[20];
    real *scratch = (real *)calloc((size_t)N * 240, sizeof(real));
    if (!scratch) return 1;
    real *V4 = scratch + N * 0;
    real *DV4 = scratch + N * 8;
    real *V6 = scratch + N * 16;
    real *DV6 = scratch + N * 24;
    real *V7 = scratch + N * 32;
    real *DV7 = scratch + N * 40;
    real *V8 = scratch + N * 48;
    real *DV8 = scratch + N * 56;
    real *V12 = scratch + N * 64;
    real *DV12 = scratch + N * 72;
    real *V14 = scratch + N * 80;
    real *DV14 = scratch + N * 88;
    real *V15 = scratch + N * 96;
    real *DV15 = scratch + N * 104;
    real *V18 = scratch + N * 112;
    real *DV18 = scratch + N * 120;
    real *V19 = scratch + N * 128;
    real *DV19 = scratch + N * 136;
    real *V20 = scratch + N * 144;
    real *DV20 = scratch + N * 152;
    real *V21 = scratch + N * 160;
    real *DV21 = scratch + N * 168;
    real *V22 = scratch + N * 176;
    real *DV22 = scratch + N * 184;
    real *V23 = scratch + N * 192;
    real *DV23 = scratch + N * 200;
    real *V24 = scratch + N * 208;
    real *DV24 = scratch + N * 216;
    real *DHP0 = scratch + N * 224;
    real *DHN0 = scratch + N * 232;
    for (long t = T - 1; t >= 0; t--) {
        const real *LV0 = lv0 + t * N * 8;
        real *DLV0 = dlv0 + t * N * 8;
        const real *LV1 = lv1 + t * N * 8;
        real *DLV1 = dlv1 + t * N * 8;
        const real *LV2 = lv2 + t * N * 8;
        real *DLV2 = dlv2 + t * N * 8;
        const real *HP0 = t ? seq0 + (t - 1) * N * 8 : init0;
        const real *G0 = gseq0 + t * N * 24;
        real *DG0 = dgseq0 + t * N * 24;
        /* recompute the step's values from the saved products */
        recompute_4_24(N, V12, V14, V15, V18, V19, V20, V21, V22, V23, V24, V4, V6, V7, V8, G0, HP0, LC0, LC1, LC2, LV0, LV1, LV2);
        for (long n = 0; n < N; n++)
        #pragma GCC ivdep
        for (long j = 0; j < 8; j++) {
            lseq0[t * N * 8 + n * 8 + j] = (HP0)[n * 8 + j];
        }
        memset(DV24, 0, sizeof(real) * N * 8);
        memset(DHP0, 0, sizeof(real) * N * 8);
        /* adjoints arriving at this step: outputs, and the next step's reading of the states */
        for (long n = 0; n < N; n++)
        #pragma GCC ivdep
        for (long j = 0; j < 8; j++) {
            const real g = DHN0[n * 8 + j] + dseq0[t * N * 8 + n * 8 + j];
            DV24[n * 8 + j] += g;
        }
        /* reverse sweep */
        backward_4_24(N, DG0, DHP0, DLC0, DLC1, DLC2, DLV0, DLV1, DLV2, DV24, G0, HP0, LC0, LC1, LC2, LV0, LV1, LV2, V12, V14, V15, V18, V19, V20, V21, V22, V23, V24, V4, V6, V7, V8);
        matmul_rows(N, 24, 8, DG0, 24, WT0, DHP0, 8, 1);
        { real *swap = DHN0; DHN0 = DHP0; DHP0 = swap; }
    }
    memcpy(dinit0, DHN0, sizeof(real) * N * 8);
    free(scratch);
    return 0;
}
