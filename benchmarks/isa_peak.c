/* The instruction ceiling of this CPU: multiply-adds per second from one dot-product instruction issued back to
 * back on every thread, with no memory traffic. No library reaches it; it bounds what any kernel can do.
 *
 *   gcc -O2 -march=native -pthread benchmarks/isa_peak.c -o isa_peak && ./isa_peak THREADS
 *
 * Prints one line per precision: "<name> <ops per second>" (a multiply-add counts as 2 operations).
 * int8: u8 x s8 -> s32 dot products (VPDPBUSD, AVX512-VNNI on zmm or AVX-VNNI on ymm; without VNNI the
 * VPMADDUBSW + VPMADDWD + VPADDD sequence onnxruntime and oneDNN use on AVX2). fp32: FMA on zmm or ymm.
 * benchmarks/cpu_peak.py compiles and runs it. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12 /* the accumulators EACH names below */
#define STEPS 4000000L

#if defined(__AVX512F__)
typedef __m512i vi;
typedef __m512 vf;
#define LANES_BYTES 64
#define SET1_I8 _mm512_set1_epi8
#define SET1_F _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD_I32 _mm512_add_epi32
#define REDUCE_I(v) _mm512_reduce_add_epi32(v)
#define REDUCE_F(v) _mm512_reduce_add_ps(v)
#if defined(__AVX512VNNI__)
#define DOT(acc, a, b) _mm512_dpbusd_epi32(acc, a, b)
#define INT8_NAME "int8-vpdpbusd-zmm"
#endif
#else
typedef __m256i vi;
typedef __m256 vf;
#define LANES_BYTES 32
#define SET1_I8 _mm256_set1_epi8
#define SET1_F _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD_I32 _mm256_add_epi32
static int reduce_i(__m256i v) { int s[8]; _mm256_storeu_si256((__m256i *)s, v); return s[0] + s[7]; }
static float reduce_f(__m256 v) { float s[8]; _mm256_storeu_ps(s, v); return s[0] + s[7]; }
#define REDUCE_I(v) reduce_i(v)
#define REDUCE_F(v) reduce_f(v)
#if defined(__AVXVNNI__)
#define DOT(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#define INT8_NAME "int8-vpdpbusd-ymm"
#endif
#endif

#ifndef DOT /* no VNNI: u8 x s8 pairs to s16 (saturating), pairs of s16 to s32, add */
#if defined(__AVX512F__)
#define DOT(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)))
#define INT8_NAME "int8-vpmaddubsw-zmm"
#else
#define DOT(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
#define INT8_NAME "int8-vpmaddubsw-ymm"
#endif
#endif

static volatile long sink;

/* Twelve independent accumulators, named one by one so that they live in registers (an array goes through the
 * stack): enough to cover latency x ports on current x86 cores. `keep` stops the compiler folding the loop. */
#define EACH(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11)
#define keep(v) __asm__ volatile("" : "+v"(v))

static void *int8_chains(void *unused) {
    (void)unused;
    vi a = SET1_I8((char)(1 + (sink & 1))), b = SET1_I8(3);
#define DECLARE(j) vi acc##j = SET1_I8(0);
#define STEP(j) acc##j = DOT(acc##j, a, b); keep(acc##j);
#define SUM(j) total = ADD_I32(total, acc##j);
    EACH(DECLARE)
    for (long i = 0; i < STEPS; i++) { EACH(STEP) }
    vi total = SET1_I8(0);
    EACH(SUM)
    sink += REDUCE_I(total);
    return NULL;
#undef DECLARE
#undef STEP
#undef SUM
}

static void *fp32_chains(void *unused) {
    (void)unused;
    vf a = SET1_F(1.0f + (float)(sink & 1)), b = SET1_F(0.999f);
#define DECLARE(j) vf acc##j = SET1_F(0.0f);
#define STEP(j) acc##j = FMA(acc##j, b, a); keep(acc##j);
#define SUM(j) total += REDUCE_F(acc##j);
    EACH(DECLARE)
    for (long i = 0; i < STEPS; i++) { EACH(STEP) }
    float total = 0;
    EACH(SUM)
    sink += (long)total;
    return NULL;
#undef DECLARE
#undef STEP
#undef SUM
}

static double seconds_for(void *(*body)(void *), int threads) {
    pthread_t ids[256];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, body, NULL);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) return 2;
    double steps = (double)STEPS * CHAINS * threads;
    double best_int8 = 1e30, best_fp32 = 1e30;
    for (int rep = 0; rep < 3; rep++) { /* best of three: the ceiling, not the average under a noisy host */
        double s = seconds_for(int8_chains, threads);
        if (s < best_int8) best_int8 = s;
        s = seconds_for(fp32_chains, threads);
        if (s < best_fp32) best_fp32 = s;
    }
    printf("%s %.6g\n", INT8_NAME, steps * LANES_BYTES * 2 / best_int8);       /* 1 MAC per input byte pair */
    printf("fp32-fma-%s %.6g\n", LANES_BYTES == 64 ? "zmm" : "ymm", steps * (LANES_BYTES / 4) * 2 / best_fp32);
    return 0;
}
