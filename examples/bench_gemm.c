/* bench_gemm: times codir_gemm on the products of a BERT-style encoder layer and on
   square matrices, on 1 thread and on all threads, printing one line per case:

       gemm op=<name> trans=<NN|NT|TN> M=<m> N=<n> K=<k> threads=<t> gflops=<median>

   Build and run (from the repository root):

       cc -std=c11 -O2 -fopenmp examples/bench_gemm.c -o bench_gemm -lm
       ./bench_gemm            all cases, a few minutes on 2 cores
       ./bench_gemm --quick    rows = 2048 only, hidden 256 and 768, smaller squares

   With OpenBLAS (Debian: apt-get install libopenblas-dev) it also times cblas_sgemm on
   the same case in the same run and appends blas_gflops=<x>:

       cc -std=c11 -O2 -fopenmp -DCODIR_BENCH_CBLAS examples/bench_gemm.c -o bench_gemm -lopenblas -lm

   Layer products, for rows R = batch x sequence and hidden size H (weights W[out,in]):
       qkv       out = 3H, in = H        attn_out  out = H,  in = H
       ffn_up    out = 4H, in = H        ffn_down  out = H,  in = 4H
   Each is timed in the three layouts a linear layer uses:
       NT  forward   y[R,out]   = x[R,in] W^T       M = R,   N = out, K = in
       NN  backward  dx[R,in]   = dy[R,out] W       M = R,   N = in,  K = out
       TN  backward  dW[out,in] = dy^T x            M = out, N = in,  K = R
   gflops is 2*M*N*K / time of one call, the median of at least 5 timed calls after
   one warm-up call. */
#define CODIR_IMPLEMENTATION
#include "../codir.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef CODIR_BENCH_CBLAS
#include <cblas.h>
#endif

#define BENCH_MIN_RUNS 5
#define BENCH_MAX_RUNS 15
/* Cases shorter than this per call are repeated up to BENCH_MAX_RUNS times. */
#define BENCH_MIN_SECONDS 0.5

typedef struct bench_case {
    const char *op;
    int trans_a, trans_b;
    int m, n, k;
} bench_case;

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_doubles(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static void fill_uniform(float *x, size_t n, unsigned long long seed)
{
    size_t i;
    for (i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(seed >> 40) / (double)(1ull << 24)) - 0.5f;
    }
}

static void set_threads(int threads)
{
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
#ifdef CODIR_BENCH_CBLAS
    openblas_set_num_threads(threads);
#endif
    (void)threads;
}

/* The implementations run_once can time. */
enum { BENCH_CODIR, BENCH_CBLAS_SGEMM };

static void run_once(int implementation, codir_gemm_ws *ws, const bench_case *bc, const float *a, const float *b, float *c)
{
    int lda = bc->trans_a ? bc->m : bc->k;
    int ldb = bc->trans_b ? bc->k : bc->n;
    if (implementation == BENCH_CODIR) {
        int status = codir_gemm(ws, bc->trans_a, bc->trans_b, bc->m, bc->n, bc->k, 1.0f, a, lda, b, ldb, 0.0f, c, bc->n);
        if (status != CODIR_OK) {
            fprintf(stderr, "bench_gemm: codir_gemm failed on op=%s M=%d N=%d K=%d: %s\n", bc->op, bc->m, bc->n, bc->k,
                    codir_last_error());
            exit(1);
        }
        return;
    }
#ifdef CODIR_BENCH_CBLAS
    cblas_sgemm(CblasRowMajor, bc->trans_a ? CblasTrans : CblasNoTrans, bc->trans_b ? CblasTrans : CblasNoTrans, bc->m,
                bc->n, bc->k, 1.0f, a, lda, b, ldb, 0.0f, c, bc->n);
#endif
}

/* Returns the median GFLOP/s of `implementation` on the case, after one warm-up call. */
static double time_case(int implementation, codir_gemm_ws *ws, const bench_case *bc, const float *a, const float *b, float *c,
                        int min_runs)
{
    double seconds[BENCH_MAX_RUNS], total = 0.0, flops = 2.0 * bc->m * (double)bc->n * bc->k;
    int runs = 0;
    run_once(implementation, ws, bc, a, b, c);
    while (runs < BENCH_MAX_RUNS && (runs < min_runs || total < BENCH_MIN_SECONDS)) {
        double start = now_seconds();
        run_once(implementation, ws, bc, a, b, c);
        seconds[runs] = now_seconds() - start;
        total += seconds[runs];
        runs++;
    }
    qsort(seconds, (size_t)runs, sizeof seconds[0], compare_doubles);
    return flops / seconds[runs / 2] * 1e-9;
}

static void bench_one(codir_gemm_ws *ws, const bench_case *bc, int threads, int min_runs)
{
    size_t a_size = (size_t)bc->m * bc->k, b_size = (size_t)bc->k * bc->n, c_size = (size_t)bc->m * bc->n;
    float *a = (float *)malloc(a_size * sizeof(float));
    float *b = (float *)malloc(b_size * sizeof(float));
    float *c = (float *)malloc(c_size * sizeof(float));
    double gflops;
    if (!a || !b || !c) {
        fprintf(stderr, "bench_gemm: out of memory for op=%s M=%d N=%d K=%d\n", bc->op, bc->m, bc->n, bc->k);
        exit(1);
    }
    fill_uniform(a, a_size, 1);
    fill_uniform(b, b_size, 2);
    memset(c, 0, c_size * sizeof(float));

    set_threads(threads);
    gflops = time_case(BENCH_CODIR, ws, bc, a, b, c, min_runs);
    printf("gemm op=%s trans=%s M=%d N=%d K=%d threads=%d gflops=%.1f", bc->op,
           bc->trans_a ? "TN" : (bc->trans_b ? "NT" : "NN"), bc->m, bc->n, bc->k, threads, gflops);
#ifdef CODIR_BENCH_CBLAS
    printf(" blas_gflops=%.1f", time_case(BENCH_CBLAS_SGEMM, ws, bc, a, b, c, min_runs));
#endif
    printf("\n");
    fflush(stdout);
    free(a);
    free(b);
    free(c);
}

/* Appends the NT, NN and TN products of one linear layer with weights W[out,in]. */
static int add_layer_cases(bench_case *cases, int count, const char *op, int rows, int out, int in)
{
    bench_case forward = {op, 0, 1, rows, out, in};
    bench_case backward_input = {op, 0, 0, rows, in, out};
    bench_case backward_weight = {op, 1, 0, out, in, rows};
    cases[count++] = forward;
    cases[count++] = backward_input;
    cases[count++] = backward_weight;
    return count;
}

int main(int argc, char **argv)
{
    static const int hidden_full[] = {256, 384, 768}, hidden_quick[] = {256, 768};
    static const int rows_full[] = {2048, 8192}, rows_quick[] = {2048};
    static const int square_full[] = {512, 1024, 2048}, square_quick[] = {512, 1024};
    bench_case cases[128];
    const int *hidden = hidden_full, *rows = rows_full, *square = square_full;
    int hidden_count = 3, rows_count = 2, square_count = 3;
    int count = 0, max_threads = 1, h, r, s, i, t;
    codir_gemm_ws *ws;

    if (argc > 1 && strcmp(argv[1], "--quick") == 0) {
        hidden = hidden_quick;
        hidden_count = 2;
        rows = rows_quick;
        rows_count = 1;
        square = square_quick;
        square_count = 2;
    } else if (argc > 1) {
        fprintf(stderr, "usage: %s [--quick]\n  --quick  time rows = 2048 and hidden 256, 768 only\n", argv[0]);
        return 2;
    }

    for (r = 0; r < rows_count; r++) {
        for (h = 0; h < hidden_count; h++) {
            int hs = hidden[h];
            count = add_layer_cases(cases, count, "qkv", rows[r], 3 * hs, hs);
            count = add_layer_cases(cases, count, "attn_out", rows[r], hs, hs);
            count = add_layer_cases(cases, count, "ffn_up", rows[r], 4 * hs, hs);
            count = add_layer_cases(cases, count, "ffn_down", rows[r], hs, 4 * hs);
        }
    }
    for (s = 0; s < square_count; s++) {
        bench_case sq = {"square", 0, 0, square[s], square[s], square[s]};
        cases[count++] = sq;
    }

#ifdef _OPENMP
    max_threads = omp_get_max_threads();
#endif
    ws = codir_gemm_ws_create();
    if (!ws) {
        fprintf(stderr, "bench_gemm: %s\n", codir_last_error());
        return 1;
    }
    printf("# kernel=%s max_threads=%d\n", codir_gemm_kernel_name(), max_threads);
    for (t = 0; t < 2; t++) {
        int threads = t == 0 ? 1 : max_threads;
        if (t == 1 && max_threads == 1) break;
        for (i = 0; i < count; i++) bench_one(ws, &cases[i], threads, BENCH_MIN_RUNS);
    }
    codir_gemm_ws_free(ws);
    return 0;
}
