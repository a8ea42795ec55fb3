/* Tests of the kernels (codir.h section 3) and of the autograd ops (section 5).

   Every forward kernel is compared with a float64 implementation written in this file,
   never with numbers produced by codir.h. Every backward kernel is compared with
   central finite differences of L(x) = sum(dy * f(x)) in float64, where f is that
   float64 forward and dy a random upstream gradient (a uniform one hides softmax
   bugs). Gradient buffers start from random values, and the expected result is that
   value plus the gradient, so each backward check also proves that the kernel adds
   (+=) instead of overwriting. */
#include "check.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Step of the central differences. The references are float64, so the truncation
   error (about h^2) and the rounding error (about 1e-16 |L| / h) stay near 1e-10 |L|. */
#define FD_STEP 1e-6

/* Tolerances of a float32 kernel against a float64 reference. */
#define FWD_ATOL 1e-5
#define FWD_RTOL 1e-4
#define GRAD_ATOL 1e-4
#define GRAD_RTOL 1e-3

/* ---- buffers, freed together at the end of each test ---- */

#define MAX_BUFFERS 1024
static void *buffers[MAX_BUFFERS];
static int num_buffers;

static void *alloc_zeroed(size_t count, size_t size)
{
    void *p;
    if (num_buffers == MAX_BUFFERS) {
        fprintf(stderr, "test_kernels.c: a test allocated more than %d buffers; raise MAX_BUFFERS\n", MAX_BUFFERS);
        exit(2);
    }
    p = calloc(count ? count : 1, size);
    if (!p) {
        fprintf(stderr, "test_kernels.c: out of memory allocating %zu x %zu bytes\n", count, size);
        exit(2);
    }
    buffers[num_buffers++] = p;
    return p;
}

static float *new_floats(size_t n) { return (float *)alloc_zeroed(n, sizeof(float)); }
static double *new_doubles(size_t n) { return (double *)alloc_zeroed(n, sizeof(double)); }
static int *new_ints(size_t n) { return (int *)alloc_zeroed(n, sizeof(int)); }

static void free_buffers(void)
{
    while (num_buffers > 0) free(buffers[--num_buffers]);
}

/* ---- data ---- */

static float *random_floats(size_t n, unsigned long long *rng, double lo, double hi)
{
    float *x = new_floats(n);
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)check_uniform(rng, lo, hi);
    return x;
}

static float *copy_floats(const float *x, size_t n)
{
    float *y = new_floats(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

/* Returns the number of elements where a and b differ bitwise. */
static size_t count_different(const float *a, const float *b, size_t n)
{
    size_t i, d = 0;
    for (i = 0; i < n; i++) d += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return d;
}

/* Returns the float64 values of x[n], which the test's float64 references read. */
static double *widen(const float *x, size_t n)
{
    double *y = new_doubles(n);
    size_t i;
    for (i = 0; i < n; i++) y[i] = (double)x[i];
    return y;
}

/* Scales each row of x[N, C] to unit L2 norm. */
static void normalize_rows(float *x, int N, int C)
{
    int i, c;
    for (i = 0; i < N; i++) {
        double ss = 0.0;
        for (c = 0; c < C; c++) ss += (double)x[(size_t)i * C + c] * x[(size_t)i * C + c];
        for (c = 0; c < C; c++) x[(size_t)i * C + c] = (float)(x[(size_t)i * C + c] / sqrt(ss));
    }
}

static double dot(const double *a, const double *b, size_t n)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Formats a check label into a static buffer that the next call overwrites. */
static const char *label(const char *fmt, ...)
{
    static char text[200];
    va_list args;
    va_start(args, fmt);
    vsnprintf(text, sizeof text, fmt, args);
    va_end(args);
    return text;
}

static int all_finite(const float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* ---- finite differences ---- */

/* A float64 scalar loss of the arrays that `c` points to. */
typedef double (*loss_fn)(const void *c);

/* Stores (L(x + h e_i) - L(x - h e_i)) / 2h in grad[i] for i < n. x is one of the
   arrays the loss reads; it is perturbed in place and restored. */
static void central_diff(loss_fn loss, const void *c, double *x, size_t n, double *grad)
{
    size_t i;
    for (i = 0; i < n; i++) {
        double saved = x[i], plus, minus;
        x[i] = saved + FD_STEP;
        plus = loss(c);
        x[i] = saved - FD_STEP;
        minus = loss(c);
        x[i] = saved;
        grad[i] = (plus - minus) / (2.0 * FD_STEP);
    }
}

/* Checks a backward kernel's output got[n] against before[n] (the buffer's content
   before the call) plus the numeric gradient. */
static void check_grad(const char *what, const float *got, const float *before, const double *numeric, size_t n)
{
    double *want = new_doubles(n);
    size_t i;
    for (i = 0; i < n; i++) want[i] = (double)before[i] + numeric[i];
    check_close(what, got, want, n, GRAD_ATOL, GRAD_RTOL);
}

/* Runs central_diff on x and checks got against before + the result. */
static void check_fd(const char *what, loss_fn loss, const void *c, double *x, size_t n, const float *got,
                     const float *before)
{
    double *numeric = new_doubles(n);
    central_diff(loss, c, x, n, numeric);
    check_grad(what, got, before, numeric, n);
}

/* ===================================================================================
   float64 references
   =================================================================================== */

/* out[N,OC] = x[N,C] w[OC,C]^T + b[OC]; b may be NULL. */
static void ref_linear(double *out, const double *x, const double *w, const double *b, int N, int C, int OC)
{
    int i, o, c;
    for (i = 0; i < N; i++)
        for (o = 0; o < OC; o++) {
            double s = b ? b[o] : 0.0;
            for (c = 0; c < C; c++) s += x[(size_t)i * C + c] * w[(size_t)o * C + c];
            out[(size_t)i * OC + o] = s;
        }
}

/* LayerNorm with the biased variance; mean and rstd may be NULL. */
static void ref_layernorm(double *out, double *mean, double *rstd, const double *x, const double *gamma,
                          const double *beta, int N, int C, double eps)
{
    int i, c;
    for (i = 0; i < N; i++) {
        const double *row = x + (size_t)i * C;
        double m = 0.0, v = 0.0, r;
        for (c = 0; c < C; c++) m += row[c];
        m /= C;
        for (c = 0; c < C; c++) v += (row[c] - m) * (row[c] - m);
        v /= C;
        r = 1.0 / sqrt(v + eps);
        for (c = 0; c < C; c++) out[(size_t)i * C + c] = (row[c] - m) * r * gamma[c] + beta[c];
        if (mean) mean[i] = m;
        if (rstd) rstd[i] = r;
    }
}

static double ref_gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

static void ref_softmax(double *out, const double *x, int N, int V)
{
    int i, v;
    for (i = 0; i < N; i++) {
        const double *row = x + (size_t)i * V;
        double mx = row[0], sum = 0.0;
        for (v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
        for (v = 0; v < V; v++) sum += exp(row[v] - mx);
        for (v = 0; v < V; v++) out[(size_t)i * V + v] = exp(row[v] - mx) / sum;
    }
}

/* Returns log(sum_v exp(x[v])) without overflow. */
static double ref_logsumexp(const double *x, int V)
{
    double mx = x[0], sum = 0.0;
    int v;
    for (v = 1; v < V; v++) mx = x[v] > mx ? x[v] : mx;
    for (v = 0; v < V; v++) sum += exp(x[v] - mx);
    return mx + log(sum);
}

/* Multi-head attention over qkv[B,T,3C] with key mask[B,T]; att[B,NH,T,T] may be
   NULL. A query with no unmasked key gets a zero output. */
static void ref_attention(double *out, double *att, const double *qkv, const int *mask, int B, int T, int C,
                          int NH)
{
    int HS = C / NH, b, h, t, j, k;
    double *p = (double *)malloc((size_t)T * sizeof(double));
    if (!p) {
        fprintf(stderr, "test_kernels.c: out of memory in ref_attention\n");
        exit(2);
    }
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < T; t++) {
                const double *q = qkv + ((size_t)b * T + t) * 3 * C + h * HS;
                double mx = -INFINITY, sum = 0.0;
                for (j = 0; j < T; j++) {
                    const double *kj = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                    double s = 0.0;
                    for (k = 0; k < HS; k++) s += q[k] * kj[k];
                    p[j] = s / sqrt((double)HS);
                    if (mask[b * T + j] && p[j] > mx) mx = p[j];
                }
                for (j = 0; j < T; j++) {
                    p[j] = mask[b * T + j] ? exp(p[j] - mx) : 0.0;
                    sum += p[j];
                }
                for (j = 0; j < T; j++) p[j] = sum > 0.0 ? p[j] / sum : 0.0;
                for (k = 0; k < HS; k++) {
                    double o = 0.0;
                    for (j = 0; j < T; j++) o += p[j] * qkv[((size_t)b * T + j) * 3 * C + 2 * C + h * HS + k];
                    out[((size_t)b * T + t) * C + h * HS + k] = o;
                }
                if (att)
                    for (j = 0; j < T; j++) att[(((size_t)b * NH + h) * T + t) * T + j] = p[j];
            }
    free(p);
}

/* out[B,T,C] = tok[ids] + pos[t] + type[types]; types may be NULL (all type 0). */
static void ref_embedding(double *out, const int *ids, const int *types, const double *tok, const double *pos,
                          const double *type, int B, int T, int C)
{
    int b, t, c;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            int bt = b * T + t, ty = types ? types[bt] : 0;
            for (c = 0; c < C; c++)
                out[(size_t)bt * C + c] = tok[(size_t)ids[bt] * C + c] + pos[(size_t)t * C + c] + type[(size_t)ty * C + c];
        }
}

static void ref_select_first(double *out, const double *x, int B, int T, int C)
{
    int b, c;
    for (b = 0; b < B; b++)
        for (c = 0; c < C; c++) out[(size_t)b * C + c] = x[(size_t)b * T * C + c];
}

/* Mean over the unmasked tokens; zero for a sequence that has none. */
static void ref_mean_pool(double *out, const double *x, const int *mask, int B, int T, int C)
{
    int b, t, c;
    for (b = 0; b < B; b++) {
        int n = 0;
        for (t = 0; t < T; t++) n += mask[b * T + t] != 0;
        for (c = 0; c < C; c++) {
            double s = 0.0;
            for (t = 0; t < T; t++)
                if (mask[b * T + t]) s += x[((size_t)b * T + t) * C + c];
            out[(size_t)b * C + c] = n ? s / n : 0.0;
        }
    }
}

static void ref_concat(double *out, const double *const *xs, const int *widths, int count, int N)
{
    int total = 0, i, r, c, off;
    for (i = 0; i < count; i++) total += widths[i];
    for (r = 0; r < N; r++) {
        off = 0;
        for (i = 0; i < count; i++) {
            for (c = 0; c < widths[i]; c++) out[(size_t)r * total + off + c] = xs[i][(size_t)r * widths[i] + c];
            off += widths[i];
        }
    }
}

/* out = x / max(||x||, eps) per row, as torch.nn.functional.normalize. */
static void ref_l2_normalize(double *out, double *norm, const double *x, int N, int C, double eps)
{
    int i, c;
    for (i = 0; i < N; i++) {
        double ss = 0.0, d;
        for (c = 0; c < C; c++) ss += x[(size_t)i * C + c] * x[(size_t)i * C + c];
        d = sqrt(ss) > eps ? sqrt(ss) : eps;
        for (c = 0; c < C; c++) out[(size_t)i * C + c] = x[(size_t)i * C + c] / d;
        if (norm) norm[i] = sqrt(ss);
    }
}

/* Mean over rows of logsumexp(logits) - logits[target]. */
static double ref_cross_entropy(const double *logits, const int *targets, int N, int V)
{
    double total = 0.0;
    int i;
    for (i = 0; i < N; i++) {
        const double *row = logits + (size_t)i * V;
        total += ref_logsumexp(row, V) - row[targets[i]];
    }
    return total / N;
}

static double ref_mse(const double *pred, const double *target, int n)
{
    double total = 0.0;
    int i;
    for (i = 0; i < n; i++) total += (pred[i] - target[i]) * (pred[i] - target[i]);
    return total / n;
}

/* T^2 * mean over rows of KL(p_t || p_s) with p = softmax(logits / T), from log
   probabilities so that no term underflows. */
static double ref_kl(const double *student, const double *teacher, int N, int V, double temperature)
{
    double total = 0.0;
    double *s = (double *)malloc((size_t)V * sizeof(double));
    double *t = (double *)malloc((size_t)V * sizeof(double));
    int i, v;
    if (!s || !t) {
        fprintf(stderr, "test_kernels.c: out of memory in ref_kl\n");
        exit(2);
    }
    for (i = 0; i < N; i++) {
        double lse_s, lse_t;
        for (v = 0; v < V; v++) {
            s[v] = student[(size_t)i * V + v] / temperature;
            t[v] = teacher[(size_t)i * V + v] / temperature;
        }
        lse_s = ref_logsumexp(s, V);
        lse_t = ref_logsumexp(t, V);
        for (v = 0; v < V; v++) {
            double log_pt = t[v] - lse_t, log_ps = s[v] - lse_s;
            total += exp(log_pt) * (log_pt - log_ps);
        }
    }
    free(s);
    free(t);
    return temperature * temperature * total / N;
}

/* mean_b (logsumexp_j x_j - x_0) with x_0 = <zs_b, zt_b> / tau and
   x_j = <zs_b, bank[neg[b, j-1]]> / tau; probs[B, K+1] may be NULL. */
static double ref_infonce(double *probs, const double *zs, const double *zt, const double *bank, const int *neg,
                          int B, int D, int K, double tau)
{
    double total = 0.0;
    double *x = (double *)malloc((size_t)(K + 1) * sizeof(double));
    int b, j;
    if (!x) {
        fprintf(stderr, "test_kernels.c: out of memory in ref_infonce\n");
        exit(2);
    }
    for (b = 0; b < B; b++) {
        double lse;
        x[0] = dot(zs + (size_t)b * D, zt + (size_t)b * D, (size_t)D) / tau;
        for (j = 1; j <= K; j++) x[j] = dot(zs + (size_t)b * D, bank + (size_t)neg[b * K + j - 1] * D, (size_t)D) / tau;
        lse = ref_logsumexp(x, K + 1);
        total += lse - x[0];
        if (probs)
            for (j = 0; j <= K; j++) probs[(size_t)b * (K + 1) + j] = exp(x[j] - lse);
    }
    free(x);
    return total / B;
}

/* ===================================================================================
   Kernel tests
   =================================================================================== */

/* ---- linear ---- */

typedef struct linear_case {
    double *x, *w, *b, *dy, *out;
    int N, C, OC;
} linear_case;

static double linear_loss(const void *p)
{
    const linear_case *c = (const linear_case *)p;
    ref_linear(c->out, c->x, c->w, c->b, c->N, c->C, c->OC);
    return dot(c->dy, c->out, (size_t)c->N * c->OC);
}

/* {N, C, OC}: size 1, odd sizes and one larger case. */
static const int linear_shapes[][3] = {{1, 1, 1}, {3, 5, 4}, {7, 16, 9}, {1, 16, 1}, {7, 1, 5}, {33, 40, 17}};
#define NUM_LINEAR_SHAPES (int)(sizeof linear_shapes / sizeof linear_shapes[0])

static void test_linear_forward(void)
{
    unsigned long long rng = 101;
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int s, with_bias;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    for (s = 0; s < NUM_LINEAR_SHAPES; s++)
        for (with_bias = 0; with_bias <= 1; with_bias++) {
            int N = linear_shapes[s][0], C = linear_shapes[s][1], OC = linear_shapes[s][2];
            float *x = random_floats((size_t)N * C, &rng, -1, 1);
            float *w = random_floats((size_t)OC * C, &rng, -1, 1);
            float *b = with_bias ? random_floats((size_t)OC, &rng, -1, 1) : NULL;
            float *out = random_floats((size_t)N * OC, &rng, -9, 9);
            double *want = new_doubles((size_t)N * OC);
            int rc = codir_linear_forward(ws, out, x, w, b, N, C, OC);
            CHECK(rc == CODIR_OK, "codir_linear_forward returned %d: %s", rc, codir_last_error());
            ref_linear(want, widen(x, (size_t)N * C), widen(w, (size_t)OC * C), b ? widen(b, (size_t)OC) : NULL, N,
                       C, OC);
            check_close(label("out N=%d C=%d OC=%d bias=%d", N, C, OC, with_bias), out, want, (size_t)N * OC,
                        FWD_ATOL, FWD_RTOL);
        }
    codir_gemm_ws_free(ws);
    free_buffers();
}

static void test_linear_backward(void)
{
    unsigned long long rng = 102;
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int s;
    for (s = 0; s < NUM_LINEAR_SHAPES; s++) {
        int N = linear_shapes[s][0], C = linear_shapes[s][1], OC = linear_shapes[s][2];
        float *x = random_floats((size_t)N * C, &rng, -1, 1);
        float *w = random_floats((size_t)OC * C, &rng, -1, 1);
        float *b = random_floats((size_t)OC, &rng, -1, 1);
        float *dy = random_floats((size_t)N * OC, &rng, -1, 1);
        float *dx = random_floats((size_t)N * C, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, (size_t)N * C);
        float *dw = random_floats((size_t)OC * C, &rng, -0.5, 0.5), *dw0 = copy_floats(dw, (size_t)OC * C);
        float *db = random_floats((size_t)OC, &rng, -0.5, 0.5), *db0 = copy_floats(db, (size_t)OC);
        linear_case c;
        int rc = codir_linear_backward(ws, dx, dw, db, dy, x, w, N, C, OC);
        CHECK(rc == CODIR_OK, "codir_linear_backward returned %d: %s", rc, codir_last_error());
        c.x = widen(x, (size_t)N * C);
        c.w = widen(w, (size_t)OC * C);
        c.b = widen(b, (size_t)OC);
        c.dy = widen(dy, (size_t)N * OC);
        c.out = new_doubles((size_t)N * OC);
        c.N = N;
        c.C = C;
        c.OC = OC;
        check_fd(label("dinp N=%d C=%d OC=%d", N, C, OC), linear_loss, &c, c.x, (size_t)N * C, dx, dx0);
        check_fd(label("dw N=%d C=%d OC=%d", N, C, OC), linear_loss, &c, c.w, (size_t)OC * C, dw, dw0);
        check_fd(label("db N=%d C=%d OC=%d", N, C, OC), linear_loss, &c, c.b, (size_t)OC, db, db0);
    }
    codir_gemm_ws_free(ws);
    free_buffers();
}

/* ---- add ---- */

typedef struct add_case {
    double *a, *b, *dy;
    size_t n;
} add_case;

static double add_loss(const void *p)
{
    const add_case *c = (const add_case *)p;
    double s = 0.0;
    size_t i;
    for (i = 0; i < c->n; i++) s += c->dy[i] * (c->a[i] + c->b[i]);
    return s;
}

static void test_add(void)
{
    static const size_t sizes[] = {1, 7, 50};
    unsigned long long rng = 103;
    size_t s, i;
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *a = random_floats(n, &rng, -2, 2), *b = random_floats(n, &rng, -2, 2);
        float *out = new_floats(n), *dy = random_floats(n, &rng, -1, 1);
        float *da = random_floats(n, &rng, -0.5, 0.5), *da0 = copy_floats(da, n);
        float *db = random_floats(n, &rng, -0.5, 0.5), *db0 = copy_floats(db, n);
        double *want = new_doubles(n);
        add_case c;
        codir_add_forward(out, a, b, n);
        for (i = 0; i < n; i++) want[i] = (double)a[i] + b[i];
        check_close(label("out n=%zu", n), out, want, n, 1e-6, 1e-6);
        codir_add_backward(da, db, dy, n);
        c.a = widen(a, n);
        c.b = widen(b, n);
        c.dy = widen(dy, n);
        c.n = n;
        check_fd(label("da n=%zu", n), add_loss, &c, c.a, n, da, da0);
        check_fd(label("db n=%zu", n), add_loss, &c, c.b, n, db, db0);
    }
    free_buffers();
}

/* ---- LayerNorm ---- */

typedef struct layernorm_case {
    double *x, *gamma, *beta, *dy, *out;
    int N, C;
    double eps;
} layernorm_case;

static double layernorm_loss(const void *p)
{
    const layernorm_case *c = (const layernorm_case *)p;
    ref_layernorm(c->out, NULL, NULL, c->x, c->gamma, c->beta, c->N, c->C, c->eps);
    return dot(c->dy, c->out, (size_t)c->N * c->C);
}

static const int layernorm_shapes[][2] = {{1, 1}, {2, 1}, {3, 5}, {7, 16}, {1, 7}};
static const float layernorm_eps[] = {1e-12f, 1e-5f};
#define NUM_LAYERNORM_SHAPES (int)(sizeof layernorm_shapes / sizeof layernorm_shapes[0])

static void test_layernorm_forward(void)
{
    unsigned long long rng = 104;
    int s, e;
    for (s = 0; s < NUM_LAYERNORM_SHAPES; s++)
        for (e = 0; e < 2; e++) {
            int N = layernorm_shapes[s][0], C = layernorm_shapes[s][1];
            size_t n = (size_t)N * C;
            float eps = layernorm_eps[e];
            float *x = random_floats(n, &rng, -2, 2);
            float *gamma = random_floats((size_t)C, &rng, 0.5, 1.5), *beta = random_floats((size_t)C, &rng, -0.5, 0.5);
            float *out = new_floats(n), *rstd = new_floats((size_t)N);
            double *mean = new_doubles((size_t)N);
            double *want = new_doubles(n), *want_mean = new_doubles((size_t)N), *want_rstd = new_doubles((size_t)N);
            int i;
            codir_layernorm_forward(out, mean, rstd, x, gamma, beta, N, C, eps);
            ref_layernorm(want, want_mean, want_rstd, widen(x, n), widen(gamma, (size_t)C), widen(beta, (size_t)C), N,
                          C, (double)eps);
            check_close(label("out N=%d C=%d eps=%g", N, C, (double)eps), out, want, n, FWD_ATOL, FWD_RTOL);
            for (i = 0; i < N; i++)
                CHECK(fabs(mean[i] - want_mean[i]) <= 1e-6 + 1e-6 * fabs(want_mean[i]),
                      "mean N=%d C=%d row %d: got %.9g want %.9g", N, C, i, mean[i], want_mean[i]);
            check_close(label("rstd N=%d C=%d eps=%g", N, C, (double)eps), rstd, want_rstd, (size_t)N, 0, 1e-6);

            /* mean and rstd are optional outputs */
            codir_layernorm_forward(out, NULL, NULL, x, gamma, beta, N, C, eps);
            check_close(label("out without statistics N=%d C=%d", N, C), out, want, n, FWD_ATOL, FWD_RTOL);
        }
    free_buffers();
}

static void test_layernorm_backward(void)
{
    unsigned long long rng = 105;
    int s, e;
    for (s = 0; s < NUM_LAYERNORM_SHAPES; s++)
        for (e = 0; e < 2; e++) {
            int N = layernorm_shapes[s][0], C = layernorm_shapes[s][1];
            size_t n = (size_t)N * C;
            float eps = layernorm_eps[e];
            float *x = random_floats(n, &rng, -2, 2);
            float *gamma = random_floats((size_t)C, &rng, 0.5, 1.5), *beta = random_floats((size_t)C, &rng, -0.5, 0.5);
            float *out = new_floats(n), *rstd = new_floats((size_t)N);
            double *mean = new_doubles((size_t)N);
            float *dy = random_floats(n, &rng, -1, 1);
            float *dx = random_floats(n, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
            float *dg = random_floats((size_t)C, &rng, -0.5, 0.5), *dg0 = copy_floats(dg, (size_t)C);
            float *dbeta = random_floats((size_t)C, &rng, -0.5, 0.5), *dbeta0 = copy_floats(dbeta, (size_t)C);
            layernorm_case c;
            codir_layernorm_forward(out, mean, rstd, x, gamma, beta, N, C, eps);
            codir_layernorm_backward(dx, dg, dbeta, dy, x, gamma, mean, rstd, N, C);
            c.x = widen(x, n);
            c.gamma = widen(gamma, (size_t)C);
            c.beta = widen(beta, (size_t)C);
            c.dy = widen(dy, n);
            c.out = new_doubles(n);
            c.N = N;
            c.C = C;
            c.eps = (double)eps;
            check_fd(label("dinp N=%d C=%d eps=%g", N, C, (double)eps), layernorm_loss, &c, c.x, n, dx, dx0);
            check_fd(label("dgamma N=%d C=%d eps=%g", N, C, (double)eps), layernorm_loss, &c, c.gamma, (size_t)C, dg,
                     dg0);
            check_fd(label("dbeta N=%d C=%d eps=%g", N, C, (double)eps), layernorm_loss, &c, c.beta, (size_t)C, dbeta,
                     dbeta0);
        }
    free_buffers();
}

/* Rows with mean 1e4 and spread 1e-2: E[x^2] - E[x]^2 in float32 would lose every
   digit of the variance. */
static float *large_mean_rows(int N, int C, unsigned long long *rng)
{
    float *x = new_floats((size_t)N * C);
    int i;
    for (i = 0; i < N * C; i++) x[i] = (float)(1e4 + check_uniform(rng, -1e-2, 1e-2));
    return x;
}

static void test_layernorm_large_mean(void)
{
    enum { N = 4, C = 64 };
    unsigned long long rng = 106;
    float *x = large_mean_rows(N, C, &rng);
    float *gamma = random_floats(C, &rng, 0.5, 1.5), *beta = random_floats(C, &rng, -0.5, 0.5);
    float *out = new_floats(N * C), *rstd = new_floats(N);
    double *mean = new_doubles(N);
    double *want = new_doubles(N * C), *want_rstd = new_doubles(N);
    codir_layernorm_forward(out, mean, rstd, x, gamma, beta, N, C, 1e-12f);
    ref_layernorm(want, NULL, want_rstd, widen(x, N * C), widen(gamma, C), widen(beta, C), N, C, 1e-12);
    check_close("out", out, want, N * C, 1e-3, 1e-3);
    check_close("rstd", rstd, want_rstd, N, 0, 1e-3);
    free_buffers();
}

static void test_layernorm_large_mean_backward(void)
{
    enum { N = 4, C = 64 };
    unsigned long long rng = 107;
    float *x = large_mean_rows(N, C, &rng);
    float *gamma = random_floats(C, &rng, 0.5, 1.5), *beta = random_floats(C, &rng, -0.5, 0.5);
    float *out = new_floats(N * C), *rstd = new_floats(N);
    double *mean = new_doubles(N);
    float *dy = random_floats(N * C, &rng, -1, 1);
    float *dx = new_floats(N * C);
    float *dg = new_floats(C), *dg0 = new_floats(C);
    layernorm_case c;
    double *numeric = new_doubles(N * C);
    codir_layernorm_forward(out, mean, rstd, x, gamma, beta, N, C, 1e-12f);
    codir_layernorm_backward(dx, dg, NULL, dy, x, gamma, mean, rstd, N, C);
    c.x = widen(x, N * C);
    c.gamma = widen(gamma, C);
    c.beta = widen(beta, C);
    c.dy = widen(dy, N * C);
    c.out = new_doubles(N * C);
    c.N = N;
    c.C = C;
    c.eps = 1e-12;

    /* dinp scales with rstd (about 170 here), so the tolerance is relative to that. */
    central_diff(layernorm_loss, &c, c.x, N * C, numeric);
    check_close("dinp", dx, numeric, N * C, 1e-3 * 170, 1e-3);
    check_fd("dgamma", layernorm_loss, &c, c.gamma, C, dg, dg0);
    free_buffers();
}

/* ---- GELU and tanh ---- */

typedef struct unary_case {
    double (*f)(double);
    double *x, *dy;
    size_t n;
} unary_case;

static double unary_loss(const void *p)
{
    const unary_case *c = (const unary_case *)p;
    double s = 0.0;
    size_t i;
    for (i = 0; i < c->n; i++) s += c->dy[i] * c->f(c->x[i]);
    return s;
}

/* n inputs: a few fixed points, then uniform in [-range, range]. */
static float *unary_inputs(size_t n, unsigned long long *rng, double range)
{
    static const float fixed[] = {0.0f, 1e-3f, -1e-3f, 1.0f, -1.0f, 10.0f, -10.0f};
    float *x = random_floats(n, rng, -range, range);
    size_t i;
    for (i = 0; i < n && i < sizeof fixed / sizeof fixed[0]; i++) x[i] = fixed[i];
    return x;
}

static void test_gelu_forward(void)
{
    enum { n = 200 };
    unsigned long long rng = 108;
    float *x = unary_inputs(n, &rng, 6), *out = new_floats(n);
    double *want = new_doubles(n);
    int i;
    codir_gelu_forward(out, x, n);
    for (i = 0; i < n; i++) want[i] = ref_gelu(x[i]);

    /* The tanh approximation differs from the erf form by up to 4.7e-4 (at x = -2.7). */
    check_close("out", out, want, n, 1e-6, 1e-5);
    free_buffers();
}

static void test_gelu_backward(void)
{
    enum { n = 200 };
    unsigned long long rng = 109;
    float *x = unary_inputs(n, &rng, 6), *dy = random_floats(n, &rng, -1, 1);
    float *dx = random_floats(n, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
    unary_case c;
    codir_gelu_backward(dx, x, dy, n);
    c.f = ref_gelu;
    c.x = widen(x, n);
    c.dy = widen(dy, n);
    c.n = n;
    check_fd("dinp", unary_loss, &c, c.x, n, dx, dx0);
    free_buffers();
}

/* Compares GELU and its derivative with erfc in double on a dense grid over [-12, 12],
   which spans several vectorized blocks and threads. The reference takes Phi(x) as
   erfc(-x / sqrt(2)) / 2, so it stays accurate in the left tail, where GELU is tiny.
   The absolute error must stay below 2.5e-7 * max(1, |x|), about 2 float ulp, and the
   relative error below 1e-4 down to x = -12. */
static void test_gelu_accuracy(void)
{
    enum { n = 480001 };
    float *x = new_floats(n), *out = new_floats(n), *ones = new_floats(n), *dx = new_floats(n);
    double worst_abs = 0.0, worst_rel = 0.0, worst_grad = 0.0, at_abs = 0.0, at_rel = 0.0, at_grad = 0.0;
    float special[3] = {NAN, 0.0f, -0.0f}, special_out[3];
    int i;
    for (i = 0; i < n; i++) {
        x[i] = (float)(-12.0 + 24.0 * i / (n - 1));
        ones[i] = 1.0f;
    }
    codir_gelu_forward(out, x, n);
    codir_gelu_backward(dx, x, ones, n);
    for (i = 0; i < n; i++) {
        double xi = x[i], phi = 0.5 * erfc(-xi / sqrt(2.0)), want = xi * phi;
        double grad = phi + xi * exp(-0.5 * xi * xi) / sqrt(2.0 * 3.14159265358979323846);
        double scale = fabs(xi) > 1.0 ? fabs(xi) : 1.0;
        double err = fabs(out[i] - want) / scale, gerr = fabs(dx[i] - grad) / scale;
        if (err > worst_abs) worst_abs = err, at_abs = xi;
        if (gerr > worst_grad) worst_grad = gerr, at_grad = xi;
        if (want != 0.0 && fabs(out[i] - want) / fabs(want) > worst_rel)
            worst_rel = fabs(out[i] - want) / fabs(want), at_rel = xi;
    }
    CHECK(worst_abs < 2.5e-7, "GELU error %.3g * max(1, |x|) at x = %.6g", worst_abs, at_abs);
    CHECK(worst_rel < 1e-4, "GELU relative error %.3g at x = %.6g", worst_rel, at_rel);
    CHECK(worst_grad < 2.5e-7, "GELU derivative error %.3g * max(1, |x|) at x = %.6g", worst_grad, at_grad);

    codir_gelu_forward(special_out, special, 3);
    CHECK(special_out[0] != special_out[0], "GELU(NaN) = %g, want NaN", (double)special_out[0]);
    CHECK(special_out[1] == 0.0f, "GELU(+0) = %g, want 0", (double)special_out[1]);
    CHECK(special_out[2] == 0.0f, "GELU(-0) = %g, want 0", (double)special_out[2]);
    free_buffers();
}

static double ref_tanh(double x) { return tanh(x); }

static void test_tanh(void)
{
    enum { n = 200 };
    unsigned long long rng = 110;
    float *x = unary_inputs(n, &rng, 4), *out = new_floats(n), *dy = random_floats(n, &rng, -1, 1);
    float *dx = random_floats(n, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
    double *want = new_doubles(n);
    unary_case c;
    int i;
    codir_tanh_forward(out, x, n);
    for (i = 0; i < n; i++) want[i] = tanh((double)x[i]);
    check_close("out", out, want, n, 1e-6, 1e-5);
    codir_tanh_backward(dx, out, dy, n);
    c.f = ref_tanh;
    c.x = widen(x, n);
    c.dy = widen(dy, n);
    c.n = n;
    check_fd("dinp", unary_loss, &c, c.x, n, dx, dx0);
    free_buffers();
}

/* ---- softmax ---- */

typedef struct softmax_case {
    double *x, *dy, *out;
    int N, V;
} softmax_case;

static double softmax_loss(const void *p)
{
    const softmax_case *c = (const softmax_case *)p;
    ref_softmax(c->out, c->x, c->N, c->V);
    return dot(c->dy, c->out, (size_t)c->N * c->V);
}

static void test_softmax(void)
{
    static const int shapes[][2] = {{1, 1}, {3, 5}, {2, 16}, {7, 3}};
    unsigned long long rng = 111;
    size_t s;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], V = shapes[s][1];
        size_t n = (size_t)N * V;
        float *x = random_floats(n, &rng, -5, 5), *out = new_floats(n), *dy = random_floats(n, &rng, -1, 1);
        float *dx = random_floats(n, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
        double *want = new_doubles(n);
        softmax_case c;
        codir_softmax_forward(out, x, N, V);
        c.x = widen(x, n);
        c.dy = widen(dy, n);
        c.out = new_doubles(n);
        c.N = N;
        c.V = V;
        ref_softmax(want, c.x, N, V);
        check_close(label("out N=%d V=%d", N, V), out, want, n, 1e-6, 1e-5);
        codir_softmax_backward(dx, out, dy, N, V);
        check_fd(label("dinp N=%d V=%d", N, V), softmax_loss, &c, c.x, n, dx, dx0);
    }
    free_buffers();
}

/* ---- attention ---- */

/* Scratch for the attention kernels on up to `threads` threads. */
static float *attention_scratch(int T, int C, int NH, int threads)
{
    return new_floats((size_t)threads * codir_attention_scratch(T, C, NH));
}

typedef struct attention_case {
    double *qkv, *dy, *out;
    const int *mask;
    int B, T, C, NH;
} attention_case;

static double attention_loss(const void *p)
{
    const attention_case *c = (const attention_case *)p;
    ref_attention(c->out, NULL, c->qkv, c->mask, c->B, c->T, c->C, c->NH);
    return dot(c->dy, c->out, (size_t)c->B * c->T * c->C);
}

/* {B, T, C, NH}, including T = 1, one channel per head and an odd head size. */
static const int attention_shapes[][4] = {{1, 1, 4, 1}, {2, 3, 6, 2}, {2, 5, 8, 4}, {1, 4, 5, 1}, {3, 2, 3, 3}};
#define NUM_ATTENTION_SHAPES (int)(sizeof attention_shapes / sizeof attention_shapes[0])

/* A key mask with padding at the end and in the middle; token 0 is always kept. */
static int *attention_mask(int B, int T)
{
    int *mask = new_ints((size_t)B * T), b, t;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) mask[b * T + t] = t == 0 || (t * 7 + b * 3) % 4 != 1;
    return mask;
}

/* Copies part (0 query, 1 key, 2 value) of each row of x[rows, 3C] to out[rows, C]. */
static float *qkv_part(const float *x, int rows, int C, int part)
{
    float *out = new_floats((size_t)rows * C);
    int r;
    for (r = 0; r < rows; r++) memcpy(out + (size_t)r * C, x + (size_t)r * 3 * C + part * C, (size_t)C * sizeof(float));
    return out;
}

static double *qkv_part_double(const double *x, int rows, int C, int part)
{
    double *out = new_doubles((size_t)rows * C);
    int r;
    for (r = 0; r < rows; r++) memcpy(out + (size_t)r * C, x + (size_t)r * 3 * C + part * C, (size_t)C * sizeof(double));
    return out;
}

static void test_attention_forward(void)
{
    unsigned long long rng = 112;
    int s;
    for (s = 0; s < NUM_ATTENTION_SHAPES; s++) {
        int B = attention_shapes[s][0], T = attention_shapes[s][1], C = attention_shapes[s][2];
        int NH = attention_shapes[s][3];
        size_t n_att = (size_t)B * NH * T * T;
        float *qkv = random_floats((size_t)B * T * 3 * C, &rng, -1.5, 1.5);
        float *out = new_floats((size_t)B * T * C), *att = new_floats(n_att);
        double *want = new_doubles((size_t)B * T * C), *want_att = new_doubles(n_att);
        int *mask = attention_mask(B, T);
        codir_attention_forward(out, att, qkv, mask, B, T, C, NH, attention_scratch(T, C, NH, 2), 2);
        ref_attention(want, want_att, widen(qkv, (size_t)B * T * 3 * C), mask, B, T, C, NH);
        check_close(label("out B=%d T=%d C=%d NH=%d", B, T, C, NH), out, want, (size_t)B * T * C, FWD_ATOL, FWD_RTOL);
        check_close(label("att B=%d T=%d C=%d NH=%d", B, T, C, NH), att, want_att, n_att, 1e-6, 1e-5);
    }
    free_buffers();
}

static void test_attention_backward(void)
{
    static const char *const part_names[] = {"dq", "dk", "dv"};
    unsigned long long rng = 113;
    int s, part;
    for (s = 0; s < NUM_ATTENTION_SHAPES; s++) {
        int B = attention_shapes[s][0], T = attention_shapes[s][1], C = attention_shapes[s][2];
        int NH = attention_shapes[s][3], rows = B * T;
        size_t n = (size_t)rows * 3 * C;
        float *qkv = random_floats(n, &rng, -1.5, 1.5);
        float *out = new_floats((size_t)rows * C), *att = new_floats((size_t)B * NH * T * T);
        float *dy = random_floats((size_t)rows * C, &rng, -1, 1);
        float *dqkv = random_floats(n, &rng, -0.5, 0.5), *dqkv0 = copy_floats(dqkv, n);
        double *numeric = new_doubles(n);
        attention_case c;
        c.mask = attention_mask(B, T);
        codir_attention_forward(out, att, qkv, c.mask, B, T, C, NH, attention_scratch(T, C, NH, 2), 2);
        codir_attention_backward(dqkv, dy, qkv, att, c.mask, B, T, C, NH, attention_scratch(T, C, NH, 2), 2);
        c.qkv = widen(qkv, n);
        c.dy = widen(dy, (size_t)rows * C);
        c.out = new_doubles((size_t)rows * C);
        c.B = B;
        c.T = T;
        c.C = C;
        c.NH = NH;
        central_diff(attention_loss, &c, c.qkv, n, numeric);

        /* One check per part, so a failure shows whether q, k or v is wrong. */
        for (part = 0; part < 3; part++)
            check_grad(label("%s B=%d T=%d C=%d NH=%d", part_names[part], B, T, C, NH), qkv_part(dqkv, rows, C, part),
                       qkv_part(dqkv0, rows, C, part), qkv_part_double(numeric, rows, C, part), (size_t)rows * C);
    }
    free_buffers();
}

static void test_attention_fully_masked(void)
{
    enum { B = 2, T = 3, C = 4, NH = 2 };
    static const int mask[B * T] = {1, 1, 0, 0, 0, 0};
    unsigned long long rng = 114;
    float *qkv = random_floats(B * T * 3 * C, &rng, -1, 1);
    float *out = random_floats(B * T * C, &rng, -1, 1), *att = random_floats(B * NH * T * T, &rng, -1, 1);
    float *dy = random_floats(B * T * C, &rng, -1, 1), *dqkv = new_floats(B * T * 3 * C), *dqkv_null;
    float *scratch = attention_scratch(T, C, NH, 2);
    int i, c;
    codir_attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, 2);
    CHECK(all_finite(out, B * T * C), "attention output has NaN or Inf");
    CHECK(all_finite(att, B * NH * T * T), "attention probabilities have NaN or Inf");

    /* Sequence 1 has no key left: zero probabilities and zero output. */
    for (i = NH * T * T; i < B * NH * T * T; i++) CHECK(att[i] == 0.0f, "att[%d] = %g, want 0", i, (double)att[i]);
    for (i = T * C; i < B * T * C; i++) CHECK(out[i] == 0.0f, "out[%d] = %g, want 0", i, (double)out[i]);

    /* Sequence 0's padded key 2 gets probability 0 from every query. */
    for (i = 0; i < NH * T; i++) CHECK(att[i * T + 2] == 0.0f, "att to padded key, row %d = %g", i, (double)att[i * T + 2]);

    codir_attention_backward(dqkv, dy, qkv, att, mask, B, T, C, NH, scratch, 2);
    CHECK(all_finite(dqkv, B * T * 3 * C), "attention gradient has NaN or Inf");
    dqkv_null = new_floats(B * T * 3 * C);
    codir_attention_backward(dqkv_null, dy, qkv, NULL, mask, B, T, C, NH, scratch, 2);
    CHECK(count_different(dqkv, dqkv_null, B * T * 3 * C) == 0, "%zu recomputed gradients differ",
          count_different(dqkv, dqkv_null, B * T * 3 * C));
    for (i = T * 3 * C; i < B * T * 3 * C; i++)
        CHECK(dqkv[i] == 0.0f, "dqkv[%d] of the fully masked sequence = %g, want 0", i, (double)dqkv[i]);

    /* The padded key and value of sequence 0 (token 2) get no gradient either. */
    for (c = C; c < 3 * C; c++)
        CHECK(dqkv[2 * 3 * C + c] == 0.0f, "gradient of padded key/value channel %d = %g", c, (double)dqkv[2 * 3 * C + c]);
    free_buffers();
}

/* A NaN or Inf in the key or value of a padded token leaves every result bit the same
   as a finite value there would: outputs, probabilities and all gradients. */
/* At T = 5 the softmax rows run their scalar tail only. At T = 37 they also run the
   16-lane part. */
static void test_attention_padded_nan(void)
{
    enum { B = 2, C = 8, NH = 2 };
    static const int lengths[2] = {5, 37};
    unsigned long long rng = 116;
    int s;
    for (s = 0; s < 2; s++) {
        int T = lengths[s], bt, c;
        int *mask = attention_mask(B, T);
        float *qkv = random_floats((size_t)B * T * 3 * C, &rng, -1, 1), *poisoned = copy_floats(qkv, (size_t)B * T * 3 * C);
        float *dy = random_floats((size_t)B * T * C, &rng, -1, 1), *scratch = attention_scratch(T, C, NH, 2);
        float *out = new_floats((size_t)B * T * C), *out_p = new_floats((size_t)B * T * C);
        float *att = new_floats((size_t)B * NH * T * T), *att_p = new_floats((size_t)B * NH * T * T);
        float *dqkv = new_floats((size_t)B * T * 3 * C), *dqkv_p = new_floats((size_t)B * T * 3 * C);
        size_t n = (size_t)B * T;
        for (bt = 0; bt < B * T; bt++)
            if (!mask[bt])
                for (c = C; c < 3 * C; c++) poisoned[bt * 3 * C + c] = c % 2 ? NAN : INFINITY;
        codir_attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, 2);
        codir_attention_backward(dqkv, dy, qkv, att, mask, B, T, C, NH, scratch, 2);
        codir_attention_forward(out_p, att_p, poisoned, mask, B, T, C, NH, scratch, 2);
        codir_attention_backward(dqkv_p, dy, poisoned, att_p, mask, B, T, C, NH, scratch, 2);
        CHECK(count_different(out, out_p, n * C) == 0, "T=%d: %zu outputs changed", T, count_different(out, out_p, n * C));
        CHECK(count_different(att, att_p, n * NH * T) == 0, "T=%d: %zu probabilities changed", T,
              count_different(att, att_p, n * NH * T));
        CHECK(count_different(dqkv, dqkv_p, n * 3 * C) == 0, "T=%d: %zu gradients changed", T,
              count_different(dqkv, dqkv_p, n * 3 * C));

        /* The same when the backward pass recomputes the probabilities, on 1 thread. */
        memset(dqkv_p, 0, n * 3 * C * sizeof(float));
        codir_attention_backward(dqkv_p, dy, poisoned, NULL, mask, B, T, C, NH, scratch, 1);
        CHECK(count_different(dqkv, dqkv_p, n * 3 * C) == 0, "T=%d: %zu recomputed gradients changed", T,
              count_different(dqkv, dqkv_p, n * 3 * C));
    }
    free_buffers();
}

/* Checks two kinds of rows at T = 37. A sequence with every key padded gets all-zero
   probabilities, not 0/0. A NaN in one kept key of head 0 makes every probability of
   that head NaN, and head 1 stays unchanged. */
static void test_attention_softmax_edges(void)
{
    enum { B = 2, T = 37, C = 8, NH = 2, HS = C / NH };
    unsigned long long rng = 117;
    int *mask = attention_mask(B, T);
    float *qkv = random_floats((size_t)B * T * 3 * C, &rng, -1, 1), *poisoned = copy_floats(qkv, (size_t)B * T * 3 * C);
    float *scratch = attention_scratch(T, C, NH, 2);
    float *out = new_floats((size_t)B * T * C), *att = new_floats((size_t)B * NH * T * T);
    float *att_p = new_floats((size_t)B * NH * T * T);
    size_t head = (size_t)T * T, i, zeros = 0, nans = 0, changed = 0;
    int t, c;

    /* Sequence 1 has no key left. Sequence 0 gets a NaN in the key of token 20, which is kept. */
    for (t = 0; t < T; t++) mask[T + t] = 0;
    CHECK(mask[20], "token 20 of sequence 0 should be kept by attention_mask");
    codir_attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, 2);
    for (i = 0; i < NH * head; i++) zeros += att[(size_t)NH * head + i] == 0.0f;
    CHECK(zeros == NH * head, "a fully padded sequence has %zu nonzero probabilities", NH * head - zeros);

    for (c = 0; c < HS; c++) poisoned[20 * 3 * C + C + c] = NAN;
    codir_attention_forward(out, att_p, poisoned, mask, B, T, C, NH, scratch, 2);
    for (i = 0; i < head; i++) nans += att_p[i] != att_p[i];
    for (i = head; i < 2 * head; i++) changed += memcmp(&att[i], &att_p[i], sizeof(float)) != 0;
    CHECK(nans == head, "head 0 with a NaN key has %zu of %zu probabilities NaN", nans, head);
    CHECK(changed == 0, "head 1 changed on %zu probabilities", changed);
    free_buffers();
}

/* Empty shapes do nothing: no token (T = 0), or no channel (C = 0). */
static void test_attention_empty(void)
{
    float out[1] = {7.0f}, dqkv[1] = {7.0f}, scratch[1];
    int mask[1] = {1};
    CHECK(codir_attention_scratch(0, 8, 2) == 0, "scratch for T = 0 is %zu floats, want 0", codir_attention_scratch(0, 8, 2));
    CHECK(codir_attention_scratch(4, 0, 2) == 0, "scratch for C = 0 is %zu floats, want 0", codir_attention_scratch(4, 0, 2));
    codir_attention_forward(out, NULL, NULL, mask, 3, 0, 8, 2, scratch, 2);
    codir_attention_forward(out, NULL, NULL, mask, 1, 1, 0, 2, scratch, 2);
    codir_attention_backward(dqkv, out, NULL, NULL, mask, 3, 0, 8, 2, scratch, 2);
    codir_attention_backward(dqkv, out, NULL, NULL, mask, 1, 1, 0, 2, scratch, 2);
    CHECK(out[0] == 7.0f, "an empty forward pass wrote %g", (double)out[0]);
    CHECK(dqkv[0] == 7.0f, "an empty backward pass wrote %g", (double)dqkv[0]);
}

/* Adds the analytic gradient of sum(dy * attention(qkv)) to dqkv, in double:
   dv_j += sum_t p_tj dy_t, ds_tj = p_tj (dy_t . v_j - sum_i p_ti dy_t . v_i) / sqrt(HS),
   dq_t += sum_j ds_tj k_j, dk_j += sum_t ds_tj q_t. */
static void ref_attention_backward(double *dqkv, const double *dy, const double *qkv, const int *mask, int B, int T,
                                   int C, int NH)
{
    int HS = C / NH, b, h, t, j, k;
    double *att = new_doubles((size_t)B * NH * T * T), *out = new_doubles((size_t)B * T * C);
    double *dp = new_doubles((size_t)T);
    ref_attention(out, att, qkv, mask, B, T, C, NH);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < T; t++) {
                const double *p = att + (((size_t)b * NH + h) * T + t) * T;
                const double *g = dy + ((size_t)b * T + t) * C + h * HS;
                const double *q = qkv + ((size_t)b * T + t) * 3 * C + h * HS;
                double *dq = dqkv + ((size_t)b * T + t) * 3 * C + h * HS, rowdot = 0.0;
                for (j = 0; j < T; j++) {
                    const double *v = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
                    dp[j] = 0.0;
                    for (k = 0; k < HS; k++) dp[j] += g[k] * v[k];
                    rowdot += p[j] * dp[j];
                }
                for (j = 0; j < T; j++) {
                    const double *kj = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                    double *dk = dqkv + ((size_t)b * T + j) * 3 * C + C + h * HS, *dv = dk + C;
                    double ds = p[j] * (dp[j] - rowdot) / sqrt((double)HS);
                    for (k = 0; k < HS; k++) {
                        dv[k] += p[j] * g[k];
                        dq[k] += ds * kj[k];
                        dk[k] += ds * q[k];
                    }
                }
            }
}

/* Shapes that need more than one GEMM block: T above the 144-row block of A~ and
   above the 256-deep block of k, and a head size that is not a multiple of 16. The
   reference is analytic in double. The same call on 1 and 2 threads must agree bit
   for bit, and so must the forward pass without `att` and the backward pass that
   recomputes it. */
static void test_attention_large(void)
{
    static const int shapes[][4] = {{2, 150, 96, 2}, {1, 300, 64, 1}, {3, 37, 60, 3}};
    unsigned long long rng = 115;
    size_t s;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2], NH = shapes[s][3], rows = B * T;
        size_t n = (size_t)rows * 3 * C, n_att = (size_t)B * NH * T * T;
        float *qkv = random_floats(n, &rng, -1.5, 1.5), *dy = random_floats((size_t)rows * C, &rng, -1, 1);
        float *out = new_floats((size_t)rows * C), *out_no_att = new_floats((size_t)rows * C);
        float *att = new_floats(n_att), *att1 = new_floats(n_att), *out1 = new_floats((size_t)rows * C);
        float *dqkv = random_floats(n, &rng, -0.5, 0.5), *dqkv1 = copy_floats(dqkv, n), *dqkv0 = copy_floats(dqkv, n);
        float *scratch = attention_scratch(T, C, NH, 2);
        double *want = new_doubles((size_t)rows * C), *want_att = new_doubles(n_att);
        double *want_d = widen(dqkv, n), *dqkv_d = widen(qkv, n);
        int *mask = attention_mask(B, T);

        codir_attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, 2);
        ref_attention(want, want_att, dqkv_d, mask, B, T, C, NH);
        check_close(label("out B=%d T=%d C=%d NH=%d", B, T, C, NH), out, want, (size_t)rows * C, FWD_ATOL, FWD_RTOL);
        check_close(label("att B=%d T=%d C=%d NH=%d", B, T, C, NH), att, want_att, n_att, 1e-6, 1e-5);

        codir_attention_forward(out_no_att, NULL, qkv, mask, B, T, C, NH, scratch, 2);
        CHECK(count_different(out, out_no_att, (size_t)rows * C) == 0,
              "T=%d: output without att differs on %zu elements", T, count_different(out, out_no_att, (size_t)rows * C));
        codir_attention_forward(out1, att1, qkv, mask, B, T, C, NH, scratch, 1);
        CHECK(count_different(out, out1, (size_t)rows * C) == 0, "T=%d: 1 and 2 threads differ on %zu outputs", T,
              count_different(out, out1, (size_t)rows * C));

        ref_attention_backward(want_d, widen(dy, (size_t)rows * C), dqkv_d, mask, B, T, C, NH);
        codir_attention_backward(dqkv, dy, qkv, att, mask, B, T, C, NH, scratch, 2);
        check_close(label("dqkv B=%d T=%d C=%d NH=%d", B, T, C, NH), dqkv, want_d, n, FWD_ATOL, FWD_RTOL);
        codir_attention_backward(dqkv1, dy, qkv, att, mask, B, T, C, NH, scratch, 1);
        CHECK(count_different(dqkv, dqkv1, n) == 0, "T=%d: 1 and 2 threads differ on %zu gradients", T,
              count_different(dqkv, dqkv1, n));

        /* Without att the backward pass recomputes the probabilities, to the same bits. */
        memcpy(dqkv1, dqkv0, n * sizeof(float));
        codir_attention_backward(dqkv1, dy, qkv, NULL, mask, B, T, C, NH, scratch, 2);
        CHECK(count_different(dqkv, dqkv1, n) == 0, "T=%d: recomputed probabilities change %zu gradients", T,
              count_different(dqkv, dqkv1, n));
    }
    free_buffers();
}

/* Checks codir_attention_first_forward and _backward against the full kernel and the
   float64 references. The output and probabilities must have the bits of the full
   kernel's row 0, and the gradient must be the full attention's with dL/dout zero
   on every token but the first. The shapes cover both orientations of the value
   product (head sizes 64, 32, 48, 20 and odd ones), T above the 256-deep block of k,
   padded keys, and 1 against 2 threads. NaN and Inf in padded keys must change no
   bit, and sequence 1 of the last shape has no key. */
static void test_attention_first(void)
{
    static const int shapes[][4] = {{1, 1, 4, 1}, {2, 3, 6, 2}, {3, 2, 3, 3}, {2, 64, 192, 6},
                                    {2, 150, 96, 2}, {1, 300, 64, 1}, {3, 37, 60, 3}};
    unsigned long long rng = 118;
    size_t s;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2], NH = shapes[s][3], rows = B * T, b, h, t, c;
        size_t n = (size_t)rows * 3 * C, n_att = (size_t)B * NH * T * T, first_att = (size_t)B * NH * T;
        float *qkv = random_floats(n, &rng, -1.5, 1.5), *poisoned = copy_floats(qkv, n);
        float *dy = random_floats((size_t)B * C, &rng, -1, 1), *scratch = attention_scratch(T, C, NH, 2);
        float *out = new_floats((size_t)rows * C), *att = new_floats(n_att);
        float *out_first = new_floats((size_t)B * C), *att_first = new_floats(first_att);
        float *out1 = new_floats((size_t)B * C), *att1 = new_floats(first_att), *out_p = new_floats((size_t)B * C);
        float *row0 = new_floats((size_t)B * C), *att_row0 = new_floats(first_att);
        float *dqkv = random_floats(n, &rng, -0.5, 0.5), *dqkv1 = copy_floats(dqkv, n), *dqkv_p = copy_floats(dqkv, n);
        double *want = new_doubles((size_t)rows * C), *dy_full = new_doubles((size_t)rows * C);
        double *want_first = new_doubles((size_t)B * C), *want_d = widen(dqkv, n);
        int *mask = attention_mask(B, T);
        if (s + 1 == sizeof shapes / sizeof shapes[0])
            for (t = 0; t < T; t++) mask[T + t] = 0;
        for (t = 0; t < rows; t++)
            if (!mask[t])
                for (c = C; c < 3 * C; c++) poisoned[(size_t)t * 3 * C + c] = c % 2 ? NAN : INFINITY;

        /* Forward: bits of the full kernel's first rows, and the float64 reference. */
        codir_attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, 2);
        codir_attention_first_forward(out_first, att_first, qkv, mask, B, T, C, NH, scratch, 2);
        for (b = 0; b < B; b++) {
            memcpy(row0 + (size_t)b * C, out + (size_t)b * T * C, (size_t)C * sizeof(float));
            for (h = 0; h < NH; h++)
                memcpy(att_row0 + ((size_t)b * NH + h) * T, att + ((size_t)b * NH + h) * T * T, (size_t)T * sizeof(float));
        }
        CHECK(count_different(out_first, row0, (size_t)B * C) == 0, "B=%d T=%d C=%d NH=%d: %zu outputs differ from row 0",
              B, T, C, NH, count_different(out_first, row0, (size_t)B * C));
        CHECK(count_different(att_first, att_row0, first_att) == 0,
              "B=%d T=%d C=%d NH=%d: %zu probabilities differ from row 0", B, T, C, NH,
              count_different(att_first, att_row0, first_att));
        ref_attention(want, NULL, widen(qkv, n), mask, B, T, C, NH);
        for (b = 0; b < B; b++)
            for (c = 0; c < C; c++) want_first[(size_t)b * C + c] = want[(size_t)b * T * C + c];
        check_close(label("first out B=%d T=%d C=%d NH=%d", B, T, C, NH), out_first, want_first, (size_t)B * C, FWD_ATOL,
                    FWD_RTOL);
        codir_attention_first_forward(out1, att1, qkv, mask, B, T, C, NH, scratch, 1);
        CHECK(count_different(out_first, out1, (size_t)B * C) == 0, "T=%d: 1 and 2 threads differ on %zu outputs", T,
              count_different(out_first, out1, (size_t)B * C));
        codir_attention_first_forward(out1, NULL, qkv, mask, B, T, C, NH, scratch, 2);
        CHECK(count_different(out_first, out1, (size_t)B * C) == 0, "T=%d: output without att differs on %zu elements", T,
              count_different(out_first, out1, (size_t)B * C));

        /* Backward against the full attention's gradient with dL/dout on token 0 only. */
        for (b = 0; b < B; b++)
            for (c = 0; c < C; c++) dy_full[(size_t)b * T * C + c] = dy[(size_t)b * C + c];
        ref_attention_backward(want_d, dy_full, widen(qkv, n), mask, B, T, C, NH);
        codir_attention_first_backward(dqkv, dy, qkv, att_first, mask, B, T, C, NH, scratch, 2);
        check_close(label("first dqkv B=%d T=%d C=%d NH=%d", B, T, C, NH), dqkv, want_d, n, FWD_ATOL, FWD_RTOL);
        codir_attention_first_backward(dqkv1, dy, qkv, att_first, mask, B, T, C, NH, scratch, 1);
        CHECK(count_different(dqkv, dqkv1, n) == 0, "T=%d: 1 and 2 threads differ on %zu gradients", T,
              count_different(dqkv, dqkv1, n));

        /* NaN and Inf in padded keys and values change nothing. */
        codir_attention_first_forward(out_p, att1, poisoned, mask, B, T, C, NH, scratch, 2);
        codir_attention_first_backward(dqkv_p, dy, poisoned, att1, mask, B, T, C, NH, scratch, 2);
        CHECK(count_different(out_first, out_p, (size_t)B * C) == 0, "T=%d: padded NaN changed %zu outputs", T,
              count_different(out_first, out_p, (size_t)B * C));
        CHECK(count_different(att_first, att1, first_att) == 0, "T=%d: padded NaN changed %zu probabilities", T,
              count_different(att_first, att1, first_att));
        CHECK(count_different(dqkv, dqkv_p, n) == 0, "T=%d: padded NaN changed %zu gradients", T,
              count_different(dqkv, dqkv_p, n));
    }
    free_buffers();
}

/* ---- embeddings ---- */

typedef struct embedding_case {
    double *tok, *pos, *type, *dy, *out;
    const int *ids, *types;
    int B, T, C;
} embedding_case;

static double embedding_loss(const void *p)
{
    const embedding_case *c = (const embedding_case *)p;
    ref_embedding(c->out, c->ids, c->types, c->tok, c->pos, c->type, c->B, c->T, c->C);
    return dot(c->dy, c->out, (size_t)c->B * c->T * c->C);
}

/* Vocabulary 4, 4 positions, 2 token types; ids 2 and 0 repeat. */
enum { EMB_B = 2, EMB_T = 3, EMB_V = 4, EMB_P = 4, EMB_TV = 2 };
static const int emb_ids[EMB_B * EMB_T] = {2, 0, 2, 3, 2, 0};
static const int emb_types[EMB_B * EMB_T] = {0, 1, 1, 0, 0, 1};

static void test_embedding_forward(void)
{
    static const int widths[] = {1, 5};
    unsigned long long rng = 115;
    int w, with_types;
    for (w = 0; w < 2; w++)
        for (with_types = 0; with_types <= 1; with_types++) {
            int C = widths[w], n = EMB_B * EMB_T * C;
            const int *types = with_types ? emb_types : NULL;
            float *tok = random_floats((size_t)EMB_V * C, &rng, -1, 1), *pos = random_floats((size_t)EMB_P * C, &rng, -1, 1);
            float *type = random_floats((size_t)EMB_TV * C, &rng, -1, 1), *out = new_floats((size_t)n);
            double *want = new_doubles((size_t)n);
            codir_embedding_forward(out, emb_ids, types, tok, pos, type, EMB_B, EMB_T, C);
            ref_embedding(want, emb_ids, types, widen(tok, (size_t)EMB_V * C), widen(pos, (size_t)EMB_P * C),
                          widen(type, (size_t)EMB_TV * C), EMB_B, EMB_T, C);
            check_close(label("out C=%d types=%d", C, with_types), out, want, (size_t)n, 1e-6, 1e-6);
        }
    free_buffers();
}

static void test_embedding_backward(void)
{
    static const int widths[] = {1, 5};
    unsigned long long rng = 116;
    int w, with_types;
    for (w = 0; w < 2; w++)
        for (with_types = 0; with_types <= 1; with_types++) {
            int C = widths[w], n = EMB_B * EMB_T * C;
            size_t ntok = (size_t)EMB_V * C, npos = (size_t)EMB_P * C, ntype = (size_t)EMB_TV * C;
            float *tok = random_floats(ntok, &rng, -1, 1), *pos = random_floats(npos, &rng, -1, 1);
            float *type = random_floats(ntype, &rng, -1, 1), *dy = random_floats((size_t)n, &rng, -1, 1);
            float *dtok = random_floats(ntok, &rng, -0.5, 0.5), *dtok0 = copy_floats(dtok, ntok);
            float *dpos = random_floats(npos, &rng, -0.5, 0.5), *dpos0 = copy_floats(dpos, npos);
            float *dtype = random_floats(ntype, &rng, -0.5, 0.5), *dtype0 = copy_floats(dtype, ntype);
            int *order = new_ints(EMB_B * EMB_T);
            float *row = new_floats((size_t)C);
            embedding_case c;
            c.ids = emb_ids;
            c.types = with_types ? emb_types : NULL;
            codir_embedding_backward(dtok, dpos, dtype, dy, c.ids, c.types, EMB_B, EMB_T, C, order, row);
            c.tok = widen(tok, ntok);
            c.pos = widen(pos, npos);
            c.type = widen(type, ntype);
            c.dy = widen(dy, (size_t)n);
            c.out = new_doubles((size_t)n);
            c.B = EMB_B;
            c.T = EMB_T;
            c.C = C;
            check_fd(label("dtok C=%d types=%d", C, with_types), embedding_loss, &c, c.tok, ntok, dtok, dtok0);
            check_fd(label("dpos C=%d types=%d", C, with_types), embedding_loss, &c, c.pos, npos, dpos, dpos0);
            check_fd(label("dtype C=%d types=%d", C, with_types), embedding_loss, &c, c.type, ntype, dtype, dtype0);
        }
    free_buffers();
}

/* ---- dropout ---- */

static void test_dropout_statistics(void)
{
    static const float probs[] = {0.1f, 0.5f, 0.9f};
    enum { n = 1 << 17 };
    unsigned long long rng = 117;
    float *x = random_floats(n, &rng, 0.5, 1.5), *out = new_floats(n);
    size_t s, i;
    for (s = 0; s < sizeof probs / sizeof probs[0]; s++) {
        double p = probs[s], keep_want = 1.0 - p, sigma = sqrt(p * (1.0 - p) / n), keep;
        size_t kept = 0, wrong_scale = 0, first_wrong = 0;
        codir_dropout_forward(out, x, n, probs[s], 0x1234u + s);
        for (i = 0; i < n; i++) {
            double want = (double)x[i] / (1.0 - p);
            if (out[i] == 0.0f) continue;
            kept++;
            if (fabs(out[i] - want) > 1e-6 * want && wrong_scale++ == 0) first_wrong = i;
        }
        keep = (double)kept / n;
        CHECK(fabs(keep - keep_want) <= 5.0 * sigma, "p=%g: kept fraction %.5f, want %.5f +- %.5f", p, keep, keep_want,
              5.0 * sigma);
        CHECK(wrong_scale == 0, "p=%g: %zu kept values not scaled by 1/(1-p); first [%zu] got %g from input %g", p,
              wrong_scale, first_wrong, (double)out[first_wrong], (double)x[first_wrong]);
    }

    /* p = 0 keeps every element unchanged. */
    codir_dropout_forward(out, x, n, 0.0f, 99);
    for (i = 0; i < n; i++)
        if (out[i] != x[i]) break;
    CHECK(i == n, "p=0 changed element %zu: %g -> %g", i, (double)x[i], (double)out[i]);
    free_buffers();
}

static void test_dropout_key(void)
{
    enum { n = 10000 };
    unsigned long long rng = 118;
    float *x = random_floats(n, &rng, 0.5, 1.5);
    float *a = new_floats(n), *b = new_floats(n), *c = new_floats(n);
    size_t diff;
    codir_dropout_forward(a, x, n, 0.5f, 777);
    codir_dropout_forward(b, x, n, 0.5f, 777);
    codir_dropout_forward(c, x, n, 0.5f, 778);
    CHECK(count_different(a, b, n) == 0, "the same key gave %zu different elements", count_different(a, b, n));

    /* Two independent masks at p = 0.5 disagree on half the elements. */
    diff = count_different(a, c, n);
    CHECK(diff > 4000, "keys 777 and 778 differ on only %zu of %d elements, want about %d", diff, n, n / 2);
    CHECK(diff < 6000, "keys 777 and 778 differ on %zu of %d elements, want about %d", diff, n, n / 2);
    free_buffers();
}

static void test_dropout_threads(void)
{
    enum { n = 50000 };
    unsigned long long rng = 119;
    float *x = random_floats(n, &rng, -1, 1), *dy = random_floats(n, &rng, -1, 1);
    float *out1 = new_floats(n), *out2 = new_floats(n), *dx1 = new_floats(n), *dx2 = new_floats(n);
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    codir_dropout_forward(out1, x, n, 0.3f, 4242);
    codir_dropout_backward(dx1, dy, n, 0.3f, 4242);
#ifdef _OPENMP
    omp_set_num_threads(2);
#endif
    codir_dropout_forward(out2, x, n, 0.3f, 4242);
    codir_dropout_backward(dx2, dy, n, 0.3f, 4242);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    CHECK(count_different(out1, out2, n) == 0, "forward with 1 and 2 threads differs on %zu elements",
          count_different(out1, out2, n));
    CHECK(count_different(dx1, dx2, n) == 0, "backward with 1 and 2 threads differs on %zu elements",
          count_different(dx1, dx2, n));
    free_buffers();
}

static void test_dropout_backward(void)
{
    enum { n = 1000 };
    const float p = 0.3f;
    unsigned long long rng = 120;
    float *x = random_floats(n, &rng, 0.5, 1.5), *out = new_floats(n), *dy = random_floats(n, &rng, -1, 1);
    float *dx = random_floats(n, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
    double *grad = new_doubles(n);
    int i;
    codir_dropout_forward(out, x, n, p, 31337);
    codir_dropout_backward(dx, dy, n, p, 31337);

    /* The forward is linear in x with the mask its output shows (inputs are nonzero),
       so the exact gradient is dy / (1 - p) where kept and 0 elsewhere. */
    for (i = 0; i < n; i++) grad[i] = out[i] != 0.0f ? (double)dy[i] / (1.0 - p) : 0.0;
    check_grad("dinp", dx, dx0, grad, n);
    free_buffers();
}

/* ---- pooling and concatenation ---- */

typedef struct pool_case {
    double *x, *dy, *out;
    const int *mask; /* NULL for select-first */
    int B, T, C;
} pool_case;

static double pool_loss(const void *p)
{
    const pool_case *c = (const pool_case *)p;
    if (c->mask)
        ref_mean_pool(c->out, c->x, c->mask, c->B, c->T, c->C);
    else
        ref_select_first(c->out, c->x, c->B, c->T, c->C);
    return dot(c->dy, c->out, (size_t)c->B * c->C);
}

static const int pool_shapes[][3] = {{1, 1, 1}, {3, 1, 5}, {3, 4, 1}, {3, 5, 5}, {2, 7, 16}};
#define NUM_POOL_SHAPES (int)(sizeof pool_shapes / sizeof pool_shapes[0])

/* Sequence 0 full, 1 with a hole and padding at the end, 2 all padding. */
static int *pool_mask(int B, int T)
{
    int *mask = new_ints((size_t)B * T), b, t;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) mask[b * T + t] = b == 0 || (b == 1 && t != 1 && t < T - 1) || (b == 1 && T == 1);
    return mask;
}

static void run_pool_case(int B, int T, int C, int mean, unsigned long long *rng)
{
    size_t n = (size_t)B * T * C, m = (size_t)B * C;
    float *x = random_floats(n, rng, -2, 2), *out = new_floats(m), *dy = random_floats(m, rng, -1, 1);
    float *dx = random_floats(n, rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
    double *want = new_doubles(m);
    const char *name = mean ? "mean" : "first";
    pool_case c;
    c.mask = mean ? pool_mask(B, T) : NULL;
    c.x = widen(x, n);
    c.dy = widen(dy, m);
    c.out = new_doubles(m);
    c.B = B;
    c.T = T;
    c.C = C;
    if (mean) {
        codir_mean_pool_forward(out, x, c.mask, B, T, C);
        codir_mean_pool_backward(dx, dy, c.mask, B, T, C);
        ref_mean_pool(want, c.x, c.mask, B, T, C);
    } else {
        codir_select_first_forward(out, x, B, T, C);
        codir_select_first_backward(dx, dy, B, T, C);
        ref_select_first(want, c.x, B, T, C);
    }
    check_close(label("%s out B=%d T=%d C=%d", name, B, T, C), out, want, m, 1e-6, 1e-6);
    check_fd(label("%s dinp B=%d T=%d C=%d", name, B, T, C), pool_loss, &c, c.x, n, dx, dx0);
}

static void test_select_first(void)
{
    unsigned long long rng = 121;
    int s;
    for (s = 0; s < NUM_POOL_SHAPES; s++) run_pool_case(pool_shapes[s][0], pool_shapes[s][1], pool_shapes[s][2], 0, &rng);
    free_buffers();
}

static void test_mean_pool(void)
{
    unsigned long long rng = 122;
    int s;
    for (s = 0; s < NUM_POOL_SHAPES; s++) run_pool_case(pool_shapes[s][0], pool_shapes[s][1], pool_shapes[s][2], 1, &rng);
    free_buffers();
}

static void test_mean_pool_ignores_pads(void)
{
    enum { B = 3, T = 5, C = 4 };
    unsigned long long rng = 123;
    int *mask = pool_mask(B, T);
    float *x = random_floats(B * T * C, &rng, -1, 1), *y = copy_floats(x, B * T * C);
    float *out_x = new_floats(B * C), *out_y = new_floats(B * C), *dy = random_floats(B * C, &rng, -1, 1);
    float *dx = random_floats(B * T * C, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, B * T * C);
    int i, pads = 0;

    /* Padded positions hold garbage, NaN and huge values included. */
    for (i = 0; i < B * T * C; i++)
        if (!mask[i / C]) {
            y[i] = pads % 2 ? NAN : 1e30f;
            pads++;
        }
    CHECK(pads > 0, "the mask has no padding");
    codir_mean_pool_forward(out_x, x, mask, B, T, C);
    codir_mean_pool_forward(out_y, y, mask, B, T, C);
    CHECK(count_different(out_x, out_y, B * C) == 0, "changing padded values changed %zu pooled values",
          count_different(out_x, out_y, B * C));

    /* Padded positions get no gradient: their buffer entries stay as they were. */
    codir_mean_pool_backward(dx, dy, mask, B, T, C);
    for (i = 0; i < B * T * C; i++)
        if (!mask[i / C]) CHECK(dx[i] == dx0[i], "padded position %d got gradient %g", i / C, (double)(dx[i] - dx0[i]));
    free_buffers();
}

typedef struct concat_case {
    double *xs[3], *dy, *out;
    const int *widths;
    int count, N;
} concat_case;

static double concat_loss(const void *p)
{
    const concat_case *c = (const concat_case *)p;
    int total = 0, i;
    for (i = 0; i < c->count; i++) total += c->widths[i];
    ref_concat(c->out, (const double *const *)c->xs, c->widths, c->count, c->N);
    return dot(c->dy, c->out, (size_t)c->N * total);
}

static void test_concat(void)
{
    static const int width_sets[][3] = {{3, 1, 0}, {1, 5, 2}, {16, 7, 0}};
    static const int counts[] = {2, 3, 2};
    static const int rows[] = {1, 3};
    unsigned long long rng = 124;
    int s, r, i;
    for (s = 0; s < 3; s++)
        for (r = 0; r < 2; r++) {
            int count = counts[s], N = rows[r], total = 0;
            const int *widths = width_sets[s];
            float *xs[3], *dxs[3], *dxs0[3], *out, *dy;
            double *want;
            concat_case c;
            for (i = 0; i < count; i++) {
                size_t n = (size_t)N * widths[i];
                xs[i] = random_floats(n, &rng, -1, 1);
                dxs[i] = random_floats(n, &rng, -0.5, 0.5);
                dxs0[i] = copy_floats(dxs[i], n);
                c.xs[i] = widen(xs[i], n);
                total += widths[i];
            }
            out = new_floats((size_t)N * total);
            dy = random_floats((size_t)N * total, &rng, -1, 1);
            want = new_doubles((size_t)N * total);
            c.dy = widen(dy, (size_t)N * total);
            c.out = new_doubles((size_t)N * total);
            c.widths = widths;
            c.count = count;
            c.N = N;
            codir_concat_forward(out, (const float *const *)xs, widths, count, N);
            ref_concat(want, (const double *const *)c.xs, widths, count, N);
            check_close(label("out count=%d N=%d", count, N), out, want, (size_t)N * total, 0, 0);
            codir_concat_backward(dxs, dy, widths, count, N);
            for (i = 0; i < count; i++)
                check_fd(label("dinp %d of %d, N=%d", i, count, N), concat_loss, &c, c.xs[i], (size_t)N * widths[i],
                         dxs[i], dxs0[i]);

            /* A NULL gradient output is skipped and the others still receive theirs. */
            for (i = 0; i < count; i++) memcpy(dxs[i], dxs0[i], (size_t)N * widths[i] * sizeof(float));
            {
                float *only_last[3] = {NULL, NULL, NULL};
                only_last[count - 1] = dxs[count - 1];
                codir_concat_backward(only_last, dy, widths, count, N);
                check_fd(label("last input alone, count=%d N=%d", count, N), concat_loss, &c, c.xs[count - 1],
                         (size_t)N * widths[count - 1], dxs[count - 1], dxs0[count - 1]);
            }
        }
    free_buffers();
}

/* ---- L2 normalization ---- */

#define NORMALIZE_EPS 1e-12f

typedef struct normalize_case {
    double *x, *dy, *out;
    int N, C;
} normalize_case;

static double normalize_loss(const void *p)
{
    const normalize_case *c = (const normalize_case *)p;
    ref_l2_normalize(c->out, NULL, c->x, c->N, c->C, NORMALIZE_EPS);
    return dot(c->dy, c->out, (size_t)c->N * c->C);
}

static void test_l2_normalize(void)
{
    static const int shapes[][2] = {{1, 1}, {3, 5}, {3, 16}, {7, 2}};
    unsigned long long rng = 125;
    size_t s;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)N * C;
        float *x = random_floats(n, &rng, 0.1, 1), *out = new_floats(n), *norm = new_floats((size_t)N);
        float *dy = random_floats(n, &rng, -1, 1), *dx = random_floats(n, &rng, -0.5, 0.5), *dx0 = copy_floats(dx, n);
        double *want = new_doubles(n), *want_norm = new_doubles((size_t)N);
        normalize_case c;
        size_t i;
        for (i = 0; i < n; i += 2) x[i] = -x[i];
        codir_l2_normalize_forward(out, norm, x, N, C, NORMALIZE_EPS);
        c.x = widen(x, n);
        c.dy = widen(dy, n);
        c.out = new_doubles(n);
        c.N = N;
        c.C = C;
        ref_l2_normalize(want, want_norm, c.x, N, C, NORMALIZE_EPS);
        check_close(label("out N=%d C=%d", N, C), out, want, n, 1e-6, 1e-5);
        check_close(label("norm N=%d C=%d", N, C), norm, want_norm, (size_t)N, 1e-6, 1e-6);
        codir_l2_normalize_backward(dx, dy, out, norm, N, C, NORMALIZE_EPS);
        check_fd(label("dinp N=%d C=%d", N, C), normalize_loss, &c, c.x, n, dx, dx0);
    }
    free_buffers();
}

static void test_l2_normalize_zero(void)
{
    enum { N = 2, C = 4 };
    unsigned long long rng = 126;
    float *x = random_floats(N * C, &rng, -1, 1), *out = new_floats(N * C), *norm = new_floats(N);
    float *dy = random_floats(N * C, &rng, -1, 1), *dx = new_floats(N * C);
    double *want = new_doubles(C);
    int c;
    for (c = 0; c < C; c++) x[c] = 0.0f;
    codir_l2_normalize_forward(out, norm, x, N, C, NORMALIZE_EPS);
    CHECK(all_finite(out, N * C), "normalizing a zero row gave NaN or Inf");
    for (c = 0; c < C; c++) CHECK(out[c] == 0.0f, "zero row normalized to %g at %d, want 0", (double)out[c], c);
    CHECK(norm[0] == 0.0f, "norm of a zero row = %g", (double)norm[0]);

    /* Below the clamp, out = x / eps, as torch.nn.functional.normalize. */
    codir_l2_normalize_backward(dx, dy, out, norm, N, C, NORMALIZE_EPS);
    CHECK(all_finite(dx, N * C), "gradient at a zero row has NaN or Inf");
    for (c = 0; c < C; c++) want[c] = (double)dy[c] / (double)NORMALIZE_EPS;
    check_close("dinp of the zero row", dx, want, C, 0, 1e-5);
    free_buffers();
}

/* ---- losses ---- */

typedef struct ce_case {
    double *logits;
    const int *targets;
    int N, V;
    double dloss;
} ce_case;

static double ce_loss(const void *p)
{
    const ce_case *c = (const ce_case *)p;
    return c->dloss * ref_cross_entropy(c->logits, c->targets, c->N, c->V);
}

static void test_cross_entropy(void)
{
    static const int shapes[][2] = {{1, 1}, {1, 5}, {3, 5}, {7, 16}, {3, 2}};
    unsigned long long rng = 127;
    size_t s;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], V = shapes[s][1], i;
        size_t n = (size_t)N * V;
        float *logits = random_floats(n, &rng, -3, 3), *probs = new_floats(n);
        float *dl = random_floats(n, &rng, -0.5, 0.5), *dl0 = copy_floats(dl, n);
        double *want_probs = new_doubles(n), loss, want;
        int *targets = new_ints((size_t)N);
        ce_case c;
        for (i = 0; i < N; i++) targets[i] = (int)check_uniform(&rng, 0, V);
        c.logits = widen(logits, n);
        c.targets = targets;
        c.N = N;
        c.V = V;
        c.dloss = check_uniform(&rng, 0.5, 1.5);
        loss = codir_cross_entropy_forward(probs, logits, targets, N, V);
        want = ref_cross_entropy(c.logits, targets, N, V);
        CHECK(fabs(loss - want) <= 1e-6 + 1e-5 * fabs(want), "N=%d V=%d: loss %.9g, want %.9g", N, V, loss, want);
        ref_softmax(want_probs, c.logits, N, V);
        check_close(label("probs N=%d V=%d", N, V), probs, want_probs, n, 1e-6, 1e-5);
        codir_cross_entropy_backward(dl, probs, targets, (float)c.dloss, N, V);
        check_fd(label("dlogits N=%d V=%d", N, V), ce_loss, &c, c.logits, n, dl, dl0);
    }
    free_buffers();
}

static void test_cross_entropy_extreme(void)
{
    static const float logits[] = {1e4f, -1e4f, 1e4f, -1e4f, 1e4f, 9999.0f, -1e4f};
    static const int targets1[] = {1}, targets0[] = {0};
    float probs[3], dl[3] = {0, 0, 0};
    double loss, want;
    int target = 1;
    double row[3];

    /* log(softmax) would give log(0) = -inf; the fused form gives exactly 2e4. */
    loss = codir_cross_entropy_forward(probs, logits, targets1, 1, 2);
    CHECK(fabs(loss - 2e4) <= 1e-3, "logits {1e4, -1e4}, target 1: loss %.9g, want 2e4", loss);
    CHECK(probs[0] == 1.0f, "probs[0] = %g, want 1", (double)probs[0]);
    CHECK(probs[1] == 0.0f, "probs[1] = %g, want 0", (double)probs[1]);
    codir_cross_entropy_backward(dl, probs, targets1, 1.0f, 1, 2);
    CHECK(dl[0] == 1.0f, "dlogits[0] = %g, want 1", (double)dl[0]);
    CHECK(dl[1] == -1.0f, "dlogits[1] = %g, want -1", (double)dl[1]);

    loss = codir_cross_entropy_forward(probs, logits, targets0, 1, 2);
    CHECK(loss == 0.0, "logits {1e4, -1e4}, target 0: loss %.9g, want 0", loss);

    /* Two close large logits and one far below. */
    for (target = 0; target < 3; target++) {
        int i;
        for (i = 0; i < 3; i++) row[i] = logits[4 + i];
        want = ref_cross_entropy(row, &target, 1, 3);
        loss = codir_cross_entropy_forward(probs, logits + 4, &target, 1, 3);
        CHECK(fabs(loss - want) <= 1e-4 + 1e-6 * want, "target %d: loss %.9g, want %.9g", target, loss, want);
    }
}

typedef struct mse_case {
    double *pred, *target;
    int n;
    double dloss;
} mse_case;

static double mse_loss(const void *p)
{
    const mse_case *c = (const mse_case *)p;
    return c->dloss * ref_mse(c->pred, c->target, c->n);
}

static void test_mse(void)
{
    static const int sizes[] = {1, 7, 33};
    unsigned long long rng = 128;
    size_t s;
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int n = sizes[s];
        float *pred = random_floats((size_t)n, &rng, -2, 2), *target = random_floats((size_t)n, &rng, -2, 2);
        float *dp = random_floats((size_t)n, &rng, -0.5, 0.5), *dp0 = copy_floats(dp, (size_t)n);
        mse_case c;
        double loss, want;
        c.pred = widen(pred, (size_t)n);
        c.target = widen(target, (size_t)n);
        c.n = n;
        c.dloss = check_uniform(&rng, 0.5, 1.5);
        loss = codir_mse_forward(pred, target, n);
        want = ref_mse(c.pred, c.target, n);
        CHECK(fabs(loss - want) <= 1e-6 + 1e-5 * want, "n=%d: loss %.9g, want %.9g", n, loss, want);
        codir_mse_backward(dp, pred, target, (float)c.dloss, n);
        check_fd(label("dpred n=%d", n), mse_loss, &c, c.pred, (size_t)n, dp, dp0);
    }
    free_buffers();
}

typedef struct kl_case {
    double *student, *teacher;
    int N, V;
    double temperature, dloss;
} kl_case;

static double kl_loss(const void *p)
{
    const kl_case *c = (const kl_case *)p;
    return c->dloss * ref_kl(c->student, c->teacher, c->N, c->V, c->temperature);
}

static void test_kl(void)
{
    static const int shapes[][2] = {{1, 1}, {1, 5}, {3, 5}, {3, 16}};
    static const float temperatures[] = {1.0f, 2.0f, 4.0f};
    unsigned long long rng = 129;
    size_t s, k;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (k = 0; k < 3; k++) {
            int N = shapes[s][0], V = shapes[s][1];
            size_t n = (size_t)N * V;
            float T = temperatures[k];
            float *student = random_floats(n, &rng, -4, 4), *teacher = random_floats(n, &rng, -4, 4);
            float *ps = new_floats(n), *pt = new_floats(n);
            float *ds = random_floats(n, &rng, -0.5, 0.5), *ds0 = copy_floats(ds, n);
            double *want_ps = new_doubles(n), *want_pt = new_doubles(n), *scaled = new_doubles(n), loss, want;
            kl_case c;
            size_t i;
            c.student = widen(student, n);
            c.teacher = widen(teacher, n);
            c.N = N;
            c.V = V;
            c.temperature = T;
            c.dloss = check_uniform(&rng, 0.5, 1.5);
            loss = codir_kl_div_forward(ps, pt, student, teacher, N, V, T);
            want = ref_kl(c.student, c.teacher, N, V, T);
            CHECK(fabs(loss - want) <= 1e-6 + 1e-5 * fabs(want), "N=%d V=%d T=%g: loss %.9g, want %.9g", N, V,
                  (double)T, loss, want);

            /* ps and pt are the softened distributions softmax(logits / T). */
            for (i = 0; i < n; i++) scaled[i] = c.student[i] / T;
            ref_softmax(want_ps, scaled, N, V);
            for (i = 0; i < n; i++) scaled[i] = c.teacher[i] / T;
            ref_softmax(want_pt, scaled, N, V);
            check_close(label("ps N=%d V=%d T=%g", N, V, (double)T), ps, want_ps, n, 1e-6, 1e-5);
            check_close(label("pt N=%d V=%d T=%g", N, V, (double)T), pt, want_pt, n, 1e-6, 1e-5);

            codir_kl_div_backward(ds, ps, pt, (float)c.dloss, N, V, T);
            check_fd(label("dstudent N=%d V=%d T=%g", N, V, (double)T), kl_loss, &c, c.student, n, ds, ds0);
        }
    free_buffers();
}

/* Returns sum_v p[v] log(p[v] / q[v]) of two 3-way distributions given by logits. */
static double kl_of_logits(const double *p_logits, const double *q_logits, double temperature)
{
    double p[3], q[3], s = 0.0;
    int v;
    for (v = 0; v < 3; v++) {
        p[v] = p_logits[v] / temperature;
        q[v] = q_logits[v] / temperature;
    }
    ref_softmax(p, p, 1, 3);
    ref_softmax(q, q, 1, 3);
    for (v = 0; v < 3; v++) s += p[v] * log(p[v] / q[v]);
    return s;
}

static void test_kl_direction(void)
{
    /* A peaked teacher and a flatter student, where KL(t||s) and KL(s||t) differ. */
    static const float teacher[] = {4.0f, 0.0f, -2.0f};
    static const float student[] = {0.0f, 1.5f, -0.5f};
    double t[3], s[3], ts, st, loss;
    float ps[3], pt[3];
    int v;
    for (v = 0; v < 3; v++) {
        t[v] = teacher[v];
        s[v] = student[v];
    }
    ts = kl_of_logits(t, s, 1.0);
    st = kl_of_logits(s, t, 1.0);
    CHECK(fabs(ts - st) > 0.1, "test data too symmetric: KL(t||s) %g, KL(s||t) %g", ts, st);
    loss = codir_kl_div_forward(ps, pt, student, teacher, 1, 3, 1.0f);
    CHECK(fabs(loss - ts) <= 1e-5 * ts, "loss %.9g, want KL(p_t || p_s) = %.9g (KL(p_s || p_t) = %.9g)", loss, ts, st);
}

static void test_kl_temperature(void)
{
    /* Two rows at T = 2: the loss is 4 * mean KL(p_t || p_s) of the softened rows. */
    static const float teacher[] = {4.0f, 0.0f, -2.0f, -1.0f, 2.5f, 0.5f};
    static const float student[] = {0.0f, 1.5f, -0.5f, 1.0f, 0.0f, -3.0f};
    double t[6], s[6], want, loss;
    float ps[6], pt[6], ds[6] = {0, 0, 0, 0, 0, 0};
    double numeric[6];
    kl_case c;
    int v;
    for (v = 0; v < 6; v++) {
        t[v] = teacher[v];
        s[v] = student[v];
    }
    want = 4.0 * (kl_of_logits(t, s, 2.0) + kl_of_logits(t + 3, s + 3, 2.0)) / 2.0;
    loss = codir_kl_div_forward(ps, pt, student, teacher, 2, 3, 2.0f);
    CHECK(fabs(loss - want) <= 1e-5 * want, "T=2: loss %.9g, want 4 * mean KL = %.9g", loss, want);

    /* The gradient carries the same T^2: T (p_s - p_t) / N per logit. */
    c.student = s;
    c.teacher = t;
    c.N = 2;
    c.V = 3;
    c.temperature = 2.0;
    c.dloss = 1.0;
    codir_kl_div_backward(ds, ps, pt, 1.0f, 2, 3, 2.0f);
    central_diff(kl_loss, &c, s, 6, numeric);
    check_close("dstudent T=2", ds, numeric, 6, 1e-5, 1e-4);
}

typedef struct infonce_case {
    double *zs, *zt, *bank;
    const int *neg;
    int B, D, K;
    double tau, dloss;
} infonce_case;

static double infonce_loss(const void *p)
{
    const infonce_case *c = (const infonce_case *)p;
    return c->dloss * ref_infonce(NULL, c->zs, c->zt, c->bank, c->neg, c->B, c->D, c->K, c->tau);
}

/* Runs the InfoNCE forward and backward on unit vectors and checks both. */
static void run_infonce_case(int B, int D, int K, int bank_rows, float tau, unsigned long long *rng)
{
    size_t nz = (size_t)B * D, np = (size_t)B * (K + 1);
    float *zs = random_floats(nz, rng, -1, 1), *zt = random_floats(nz, rng, -1, 1);
    float *bank = random_floats((size_t)bank_rows * D, rng, -1, 1), *probs = new_floats(np);
    float *dzs = random_floats(nz, rng, -0.5, 0.5), *dzs0 = copy_floats(dzs, nz);
    float *dzt = random_floats(nz, rng, -0.5, 0.5), *dzt0 = copy_floats(dzt, nz);
    int *neg = new_ints((size_t)B * (K ? K : 1)), i;
    double *want_probs = new_doubles(np), loss, want;
    infonce_case c;
    normalize_rows(zs, B, D);
    normalize_rows(zt, B, D);
    normalize_rows(bank, bank_rows, D);
    for (i = 0; i < B * K; i++) neg[i] = (int)check_uniform(rng, 0, bank_rows);
    c.zs = widen(zs, nz);
    c.zt = widen(zt, nz);
    c.bank = widen(bank, (size_t)bank_rows * D);
    c.neg = neg;
    c.B = B;
    c.D = D;
    c.K = K;
    c.tau = tau;
    c.dloss = check_uniform(rng, 0.5, 1.5);
    loss = codir_infonce_forward(probs, zs, zt, bank, neg, B, D, K, tau);
    want = ref_infonce(want_probs, c.zs, c.zt, c.bank, neg, B, D, K, tau);
    CHECK(fabs(loss - want) <= 1e-4 + 1e-5 * fabs(want), "B=%d D=%d K=%d tau=%g: loss %.9g, want %.9g", B, D, K,
          (double)tau, loss, want);
    check_close(label("probs B=%d D=%d K=%d tau=%g", B, D, K, (double)tau), probs, want_probs, np, 1e-6, 1e-4);
    codir_infonce_backward(dzs, dzt, probs, zs, zt, bank, neg, (float)c.dloss, B, D, K, tau);
    check_fd(label("dzs B=%d D=%d K=%d tau=%g", B, D, K, (double)tau), infonce_loss, &c, c.zs, nz, dzs, dzs0);
    check_fd(label("dzt B=%d D=%d K=%d tau=%g", B, D, K, (double)tau), infonce_loss, &c, c.zt, nz, dzt, dzt0);
}

static void test_infonce(void)
{
    static const int shapes[][3] = {{1, 1, 1}, {3, 5, 4}, {3, 16, 1}, {2, 7, 0}, {4, 16, 9}};
    static const float taus[] = {0.5f, 0.07f};
    unsigned long long rng = 130;
    size_t s, t;
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (t = 0; t < 2; t++) run_infonce_case(shapes[s][0], shapes[s][1], shapes[s][2], 9, taus[t], &rng);
    free_buffers();
}

static void test_infonce_small_tau(void)
{
    /* At tau = 0.07, exp(1 / tau) = 1.6e6 already wastes float32 range; at tau = 1e-3,
       exp(1 / tau) overflows even float64, so only a log-space form stays finite. */
    unsigned long long rng = 131;
    run_infonce_case(4, 128, 16, 40, 0.07f, &rng);
    run_infonce_case(4, 32, 16, 40, 1e-3f, &rng);
    free_buffers();
}

/* ===================================================================================
   Autograd tests
   =================================================================================== */

/* Returns the float64 copy of parameter t within the flat copy `values` of params. */
static const double *param_values(const codir_params *params, const codir_tensor *t, const double *values)
{
    return values + (t->data - params->data);
}

static void fill_params(codir_params *params, unsigned long long *rng)
{
    size_t i;
    for (i = 0; i < params->count; i++) params->data[i] = (float)check_uniform(rng, -0.8, 0.8);
}

/* ---- graph 1: a tiny encoder with a classifier ----

   e = embedding(ids, types)                      [B,T,C]
   a = attention(linear(e, wqkv, bqkv), mask)     [B,T,C]
   n = layernorm(a + e)                           [B,T,C]
   u = gelu(linear(n, w1, b1))                    [B,T,F]
   z = tanh(linear([first(u), mean_pool(u)], w2, b2))  [B,C]
   loss = cross_entropy(linear(z, w3), labels)    (no bias on the last layer) */

enum { G_B = 2, G_T = 3, G_V = 7, G_P = 4, G_TV = 2, G_C = 4, G_NH = 2, G_F = 5, G_L = 3 };
#define G_EPS 1e-5f

enum { P_TOK, P_POS, P_TYPE, P_WQKV, P_BQKV, P_LNG, P_LNB, P_W1, P_B1, P_W2, P_B2, P_W3, NUM_ENCODER_PARAMS };

static const int g_ids[G_B * G_T] = {1, 5, 5, 3, 1, 6};
static const int g_types[G_B * G_T] = {0, 0, 1, 0, 1, 1};
static const int g_mask[G_B * G_T] = {1, 1, 1, 1, 1, 0};
static const int g_labels[G_B] = {2, 0};

typedef struct encoder_graph {
    codir_params params;
    codir_itensor ids, types, mask, labels;
    codir_tensor *outputs[16]; /* every op output of the last forward pass */
    int num_outputs;
} encoder_graph;

static void set_itensor(codir_itensor *t, const int *data, int ndim, int d0, int d1)
{
    memset(t, 0, sizeof *t);
    t->data = (int *)data;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = ndim > 1 ? d1 : 1;
    t->shape[2] = 1;
    t->shape[3] = 1;
    t->numel = (size_t)d0 * (ndim > 1 ? d1 : 1);
}

static int encoder_init(encoder_graph *g, unsigned long long seed)
{
    codir_param_spec specs[NUM_ENCODER_PARAMS] = {
        {"tok", 2, {G_V, G_C, 1, 1}, 0},          {"pos", 2, {G_P, G_C, 1, 1}, 0},
        {"type", 2, {G_TV, G_C, 1, 1}, 0},        {"wqkv", 2, {3 * G_C, G_C, 1, 1}, 0},
        {"bqkv", 1, {3 * G_C, 1, 1, 1}, 1},       {"ln.gamma", 1, {G_C, 1, 1, 1}, 1},
        {"ln.beta", 1, {G_C, 1, 1, 1}, 1},        {"w1", 2, {G_F, G_C, 1, 1}, 0},
        {"b1", 1, {G_F, 1, 1, 1}, 1},             {"w2", 2, {G_C, 2 * G_F, 1, 1}, 0},
        {"b2", 1, {G_C, 1, 1, 1}, 1},             {"w3", 2, {G_L, G_C, 1, 1}, 0},
    };
    unsigned long long rng = seed;
    int rc = codir_params_init(&g->params, specs, NUM_ENCODER_PARAMS), c;
    if (rc) return rc;
    fill_params(&g->params, &rng);
    for (c = 0; c < G_C; c++) g->params.tensors[P_LNG].data[c] = (float)check_uniform(&rng, 0.7, 1.3);
    set_itensor(&g->ids, g_ids, 2, G_B, G_T);
    set_itensor(&g->types, g_types, 2, G_B, G_T);
    set_itensor(&g->mask, g_mask, 2, G_B, G_T);
    set_itensor(&g->labels, g_labels, 1, G_B, 1);
    return CODIR_OK;
}

static codir_tensor *encoder_forward(codir_ctx *ctx, void *graph)
{
    encoder_graph *g = (encoder_graph *)graph;
    codir_tensor *p = g->params.tensors, *e, *qkv, *a, *r, *n, *h, *u, *pools[2], *pooled, *z0, *z, *logits, *loss;
    e = codir_embedding(ctx, &g->ids, &g->types, &p[P_TOK], &p[P_POS], &p[P_TYPE]);
    qkv = codir_linear(ctx, e, &p[P_WQKV], &p[P_BQKV]);
    a = codir_attention(ctx, qkv, &g->mask, G_NH);
    r = codir_add(ctx, a, e);
    n = codir_layernorm(ctx, r, &p[P_LNG], &p[P_LNB], G_EPS);
    h = codir_linear(ctx, n, &p[P_W1], &p[P_B1]);
    u = codir_gelu(ctx, h);
    pools[0] = codir_select_first(ctx, u);
    pools[1] = codir_mean_pool(ctx, u, &g->mask);
    pooled = codir_concat(ctx, pools, 2);
    z0 = codir_linear(ctx, pooled, &p[P_W2], &p[P_B2]);
    z = codir_tanh(ctx, z0);
    logits = codir_linear(ctx, z, &p[P_W3], NULL);
    loss = codir_cross_entropy(ctx, logits, &g->labels);
    {
        codir_tensor *all[] = {e, qkv, a, r, n, h, u, pools[0], pools[1], pooled, z0, z, logits, loss};
        g->num_outputs = (int)(sizeof all / sizeof all[0]);
        memcpy(g->outputs, all, sizeof all);
    }
    return loss;
}

/* A graph and a float64 copy of its parameters, laid out as params.data. */
typedef struct graph_values {
    const void *graph;
    double *values;
} graph_values;

/* The encoder graph in float64. */
static double encoder_reference(const void *p)
{
    const graph_values *gv = (const graph_values *)p;
    const encoder_graph *g = (const encoder_graph *)gv->graph;
    const codir_params *ps = &g->params;
    const codir_tensor *t = ps->tensors;
    const double *v = gv->values;
    double e[G_B * G_T * G_C], qkv[G_B * G_T * 3 * G_C], a[G_B * G_T * G_C], n[G_B * G_T * G_C];
    double h[G_B * G_T * G_F], first[G_B * G_F], mean[G_B * G_F], pooled[G_B * 2 * G_F], z[G_B * G_C];
    double logits[G_B * G_L];
    const double *pools[2];
    int widths[2] = {G_F, G_F}, i;
    ref_embedding(e, g_ids, g_types, param_values(ps, &t[P_TOK], v), param_values(ps, &t[P_POS], v),
                  param_values(ps, &t[P_TYPE], v), G_B, G_T, G_C);
    ref_linear(qkv, e, param_values(ps, &t[P_WQKV], v), param_values(ps, &t[P_BQKV], v), G_B * G_T, G_C, 3 * G_C);
    ref_attention(a, NULL, qkv, g_mask, G_B, G_T, G_C, G_NH);
    for (i = 0; i < G_B * G_T * G_C; i++) a[i] += e[i];
    ref_layernorm(n, NULL, NULL, a, param_values(ps, &t[P_LNG], v), param_values(ps, &t[P_LNB], v), G_B * G_T, G_C,
                  G_EPS);
    ref_linear(h, n, param_values(ps, &t[P_W1], v), param_values(ps, &t[P_B1], v), G_B * G_T, G_C, G_F);
    for (i = 0; i < G_B * G_T * G_F; i++) h[i] = ref_gelu(h[i]);
    ref_select_first(first, h, G_B, G_T, G_F);
    ref_mean_pool(mean, h, g_mask, G_B, G_T, G_F);
    pools[0] = first;
    pools[1] = mean;
    ref_concat(pooled, pools, widths, 2, G_B);
    ref_linear(z, pooled, param_values(ps, &t[P_W2], v), param_values(ps, &t[P_B2], v), G_B, 2 * G_F, G_C);
    for (i = 0; i < G_B * G_C; i++) z[i] = tanh(z[i]);
    ref_linear(logits, z, param_values(ps, &t[P_W3], v), NULL, G_B, G_C, G_L);
    return ref_cross_entropy(logits, g_labels, G_B, G_L);
}

/* ---- graph 2: the distillation losses ----

   zs = l2_normalize(linear(xs, ws)), zt = l2_normalize(linear(xt, wt))
   s = linear(xs, wc, bc)
   loss = 0.3 infonce(zs, zt, bank, neg) + 0.5 kl_div(s, teacher, T = 2)
        + 0.2 mse(softmax(s), target)     (plus a NULL term of weight 0) */

enum { L_B = 3, L_CS = 5, L_CT = 6, L_D = 4, L_LC = 3, L_R = 7, L_K = 3 };
#define L_TAU 0.1f
#define L_TEMPERATURE 2.0f

enum { P_WS, P_WT, P_WC, P_BC, NUM_LOSS_PARAMS };

static const int l_neg[L_B * L_K] = {0, 4, 6, 2, 2, 5, 1, 3, 0};
static const float l_weights[4] = {0.3f, 0.0f, 0.5f, 0.2f};

typedef struct loss_graph {
    codir_params params;
    float xs[L_B * L_CS], xt[L_B * L_CT], teacher[L_B * L_LC], target[L_B * L_LC], bank[L_R * L_D];
    codir_tensor *outputs[16];
    int num_outputs;
} loss_graph;

static int loss_graph_init(loss_graph *g, unsigned long long seed)
{
    codir_param_spec specs[NUM_LOSS_PARAMS] = {
        {"ws", 2, {L_D, L_CS, 1, 1}, 0},
        {"wt", 2, {L_D, L_CT, 1, 1}, 0},
        {"wc", 2, {L_LC, L_CS, 1, 1}, 0},
        {"bc", 1, {L_LC, 1, 1, 1}, 1},
    };
    unsigned long long rng = seed;
    int rc = codir_params_init(&g->params, specs, NUM_LOSS_PARAMS), i;
    if (rc) return rc;
    fill_params(&g->params, &rng);
    for (i = 0; i < L_B * L_CS; i++) g->xs[i] = (float)check_uniform(&rng, -1, 1);
    for (i = 0; i < L_B * L_CT; i++) g->xt[i] = (float)check_uniform(&rng, -1, 1);
    for (i = 0; i < L_B * L_LC; i++) g->teacher[i] = (float)check_uniform(&rng, -3, 3);
    for (i = 0; i < L_B * L_LC; i++) g->target[i] = (float)check_uniform(&rng, 0, 1);
    for (i = 0; i < L_R * L_D; i++) g->bank[i] = (float)check_uniform(&rng, -1, 1);
    normalize_rows(g->bank, L_R, L_D);
    return CODIR_OK;
}

/* Returns a tensor without gradient holding a copy of data[d0 * d1]. */
static codir_tensor *input_tensor(codir_ctx *ctx, const float *data, int d0, int d1)
{
    int shape[2];
    codir_tensor *t;
    shape[0] = d0;
    shape[1] = d1;
    t = codir_tensor_new(ctx, 2, shape, 0);
    if (t) memcpy(t->data, data, (size_t)d0 * d1 * sizeof(float));
    return t;
}

static codir_tensor *loss_graph_forward(codir_ctx *ctx, void *graph)
{
    loss_graph *g = (loss_graph *)graph;
    codir_tensor *p = g->params.tensors;
    codir_tensor *xs = input_tensor(ctx, g->xs, L_B, L_CS), *xt = input_tensor(ctx, g->xt, L_B, L_CT);
    codir_tensor *teacher = input_tensor(ctx, g->teacher, L_B, L_LC);
    codir_tensor *ps, *pt, *zs, *zt, *crd, *s, *kd, *sm, *reg, *terms[4], *total;
    ps = codir_linear(ctx, xs, &p[P_WS], NULL);
    zs = codir_l2_normalize(ctx, ps);
    pt = codir_linear(ctx, xt, &p[P_WT], NULL);
    zt = codir_l2_normalize(ctx, pt);
    crd = codir_infonce(ctx, zs, zt, g->bank, L_R, l_neg, L_K, L_TAU);
    s = codir_linear(ctx, xs, &p[P_WC], &p[P_BC]);
    kd = codir_kl_div(ctx, s, teacher, L_TEMPERATURE);
    sm = codir_softmax(ctx, s);
    reg = codir_mse(ctx, sm, g->target);
    terms[0] = crd;
    terms[1] = NULL;
    terms[2] = kd;
    terms[3] = reg;
    total = codir_weighted_sum(ctx, terms, l_weights, 4);
    {
        codir_tensor *all[] = {ps, zs, pt, zt, crd, s, kd, sm, reg, total};
        g->num_outputs = (int)(sizeof all / sizeof all[0]);
        memcpy(g->outputs, all, sizeof all);
    }
    return total;
}

static double loss_graph_reference(const void *p)
{
    const graph_values *gv = (const graph_values *)p;
    const loss_graph *g = (const loss_graph *)gv->graph;
    const codir_params *ps = &g->params;
    const codir_tensor *t = ps->tensors;
    const double *v = gv->values;
    double xs[L_B * L_CS], xt[L_B * L_CT], teacher[L_B * L_LC], target[L_B * L_LC], bank[L_R * L_D];
    double zs[L_B * L_D], zt[L_B * L_D], s[L_B * L_LC], sm[L_B * L_LC], crd, kd, reg;
    int i;
    for (i = 0; i < L_B * L_CS; i++) xs[i] = g->xs[i];
    for (i = 0; i < L_B * L_CT; i++) xt[i] = g->xt[i];
    for (i = 0; i < L_B * L_LC; i++) teacher[i] = g->teacher[i];
    for (i = 0; i < L_B * L_LC; i++) target[i] = g->target[i];
    for (i = 0; i < L_R * L_D; i++) bank[i] = g->bank[i];
    ref_linear(zs, xs, param_values(ps, &t[P_WS], v), NULL, L_B, L_CS, L_D);
    ref_l2_normalize(zs, NULL, zs, L_B, L_D, NORMALIZE_EPS);
    ref_linear(zt, xt, param_values(ps, &t[P_WT], v), NULL, L_B, L_CT, L_D);
    ref_l2_normalize(zt, NULL, zt, L_B, L_D, NORMALIZE_EPS);
    crd = ref_infonce(NULL, zs, zt, bank, l_neg, L_B, L_D, L_K, L_TAU);
    ref_linear(s, xs, param_values(ps, &t[P_WC], v), param_values(ps, &t[P_BC], v), L_B, L_CS, L_LC);
    kd = ref_kl(s, teacher, L_B, L_LC, L_TEMPERATURE);
    ref_softmax(sm, s, L_B, L_LC);
    reg = ref_mse(sm, target, L_B * L_LC);
    return (double)l_weights[0] * crd + (double)l_weights[2] * kd + (double)l_weights[3] * reg;
}

/* ---- the checks shared by both graphs ---- */

typedef struct graph_kind {
    const char *name;
    codir_tensor *(*forward)(codir_ctx *ctx, void *graph);
    loss_fn reference; /* reads a graph_values */
    codir_params *params;
    codir_tensor **outputs;
    int *num_outputs;
} graph_kind;

static int make_ctx(codir_ctx *ctx)
{
    int rc = codir_ctx_init(ctx, (size_t)1 << 20, 2024);
    CHECK(rc == CODIR_OK, "codir_ctx_init returned %d: %s", rc, codir_last_error());
    return rc == CODIR_OK;
}

/* Runs the forward pass with recording on, zeroes the parameter gradients when
   zero_first is 1, and runs a backward pass seeded with `seed`. Returns the loss
   value, or NaN after a failed check. */
static double forward_backward(codir_ctx *ctx, const graph_kind *k, void *graph, float seed, int zero_first)
{
    codir_tensor *loss;
    int rc;
    codir_ctx_begin(ctx, 1, 0, 0);
    loss = k->forward(ctx, graph);
    CHECK(loss != NULL, "%s: forward failed (status %d): %s", k->name, ctx->status, codir_last_error());
    if (!loss) return NAN;
    if (zero_first) codir_params_zero_grad(k->params);
    rc = seed == 1.0f ? codir_backward(ctx, loss) : codir_backward_scaled(ctx, loss, seed);
    CHECK(rc == CODIR_OK, "%s: backward returned %d: %s", k->name, rc, codir_last_error());
    return loss->data[0];
}

static void check_graph_gradients(const graph_kind *k, void *graph)
{
    codir_ctx ctx;
    codir_params *params = k->params;
    double *values, *numeric, loss, want;
    graph_values gv;
    int i;
    if (!make_ctx(&ctx)) return;
    loss = forward_backward(&ctx, k, graph, 1.0f, 1);
    values = widen(params->data, params->count);
    numeric = new_doubles(params->count);
    gv.graph = graph;
    gv.values = values;
    want = k->reference(&gv);
    CHECK(fabs(loss - want) <= 1e-5 + 1e-5 * fabs(want), "%s: loss %.9g, float64 graph %.9g", k->name, loss, want);
    central_diff(k->reference, &gv, values, params->count, numeric);
    for (i = 0; i < params->num_tensors; i++) {
        const codir_tensor *t = &params->tensors[i];
        size_t off = (size_t)(t->data - params->data), j, nonzero = 0;
        check_close(label("%s: gradient of %s", k->name, t->name), t->grad, numeric + off, t->numel, GRAD_ATOL,
                    GRAD_RTOL);
        for (j = 0; j < t->numel; j++) nonzero += t->grad[j] != 0.0f;
        CHECK(nonzero > 0, "%s: %s received no gradient", k->name, t->name);
    }
    codir_ctx_free(&ctx);
}

/* Counts i where got[i] differs bitwise from factor * base[i]; reports the first. */
static void check_scaled_exactly(const char *what, const float *got, const float *base, float factor, size_t n)
{
    size_t i, bad = 0, first = 0;
    for (i = 0; i < n; i++) {
        float want = factor * base[i];
        if (memcmp(&got[i], &want, sizeof want) != 0 && bad++ == 0) first = i;
    }
    CHECK(bad == 0, "%s: %zu of %zu gradients are not exactly %g times the reference; first [%zu] got %.9g want %.9g",
          what, bad, n, (double)factor, first, (double)got[first], (double)(factor * base[first]));
}

static void check_seed_scaling(const graph_kind *k, void *graph)
{
    codir_ctx ctx;
    size_t n = k->params->count;
    float *g1;
    if (!make_ctx(&ctx)) return;
    forward_backward(&ctx, k, graph, 1.0f, 1);
    g1 = copy_floats(k->params->grad, n);
    forward_backward(&ctx, k, graph, 0.25f, 1);
    check_scaled_exactly(label("%s seed 0.25", k->name), k->params->grad, g1, 0.25f, n);
    codir_ctx_free(&ctx);
}

static void check_double_backward(const graph_kind *k, void *graph)
{
    codir_ctx ctx;
    size_t n = k->params->count;
    float *g1;
    codir_tensor *loss;
    int rc;
    if (!make_ctx(&ctx)) return;
    forward_backward(&ctx, k, graph, 1.0f, 1);
    g1 = copy_floats(k->params->grad, n);

    /* A second forward and backward without zeroing. */
    forward_backward(&ctx, k, graph, 1.0f, 0);
    check_scaled_exactly(label("%s after a second forward and backward", k->name), k->params->grad, g1, 2.0f, n);

    /* Backward twice over the same tape: intermediate gradients restart from zero. */
    codir_ctx_begin(&ctx, 1, 0, 0);
    loss = k->forward(&ctx, graph);
    codir_params_zero_grad(k->params);
    rc = codir_backward(&ctx, loss);
    rc |= codir_backward(&ctx, loss);
    CHECK(rc == CODIR_OK, "%s: backward failed: %s", k->name, codir_last_error());
    check_scaled_exactly(label("%s after two backward passes over one tape", k->name), k->params->grad, g1, 2.0f, n);
    codir_ctx_free(&ctx);
}

static void check_no_recording(const graph_kind *k, void *graph)
{
    codir_ctx ctx;
    codir_tensor *loss;
    float recorded;
    int i, rc;
    if (!make_ctx(&ctx)) return;
    recorded = (float)forward_backward(&ctx, k, graph, 1.0f, 1);
    CHECK(ctx.tape_len > 0, "%s: recording left the tape empty", k->name);

    codir_ctx_begin(&ctx, 0, 0, 0);
    loss = k->forward(&ctx, graph);
    CHECK(loss != NULL, "%s: forward without recording failed: %s", k->name, codir_last_error());
    CHECK(ctx.tape_len == 0, "%s: %d ops recorded with recording off", k->name, ctx.tape_len);
    for (i = 0; i < *k->num_outputs; i++) {
        CHECK(k->outputs[i] != NULL, "%s: op %d of the forward pass returned NULL", k->name, i);
        if (k->outputs[i])
            CHECK(k->outputs[i]->grad == NULL, "%s: output of op %d has a gradient buffer", k->name, i);
    }
    if (loss) {
        CHECK(loss->data[0] == recorded, "%s: loss %.9g without recording, %.9g with", k->name, (double)loss->data[0],
              (double)recorded);
        rc = codir_backward(&ctx, loss);
        CHECK(rc == CODIR_ERR_INVALID, "%s: backward of an unrecorded loss returned %d", k->name, rc);
    }
    codir_ctx_free(&ctx);
}

static graph_kind encoder_kind(encoder_graph *g)
{
    graph_kind k;
    k.name = "encoder";
    k.forward = encoder_forward;
    k.reference = encoder_reference;
    k.params = &g->params;
    k.outputs = g->outputs;
    k.num_outputs = &g->num_outputs;
    return k;
}

static graph_kind loss_kind(loss_graph *g)
{
    graph_kind k;
    k.name = "losses";
    k.forward = loss_graph_forward;
    k.reference = loss_graph_reference;
    k.params = &g->params;
    k.outputs = g->outputs;
    k.num_outputs = &g->num_outputs;
    return k;
}

/* Runs `check` on both graphs. */
static void on_both_graphs(void (*check)(const graph_kind *k, void *graph))
{
    encoder_graph eg;
    loss_graph lg;
    graph_kind k;
    int rc = encoder_init(&eg, 501);
    CHECK(rc == CODIR_OK, "codir_params_init failed: %s", codir_last_error());
    if (rc == CODIR_OK) {
        k = encoder_kind(&eg);
        check(&k, &eg);
        codir_params_free(&eg.params);
    }
    rc = loss_graph_init(&lg, 502);
    CHECK(rc == CODIR_OK, "codir_params_init failed: %s", codir_last_error());
    if (rc == CODIR_OK) {
        k = loss_kind(&lg);
        check(&k, &lg);
        codir_params_free(&lg.params);
    }
    free_buffers();
}

static void test_autograd_gradients(void) { on_both_graphs(check_graph_gradients); }
static void test_autograd_seed_scaling(void) { on_both_graphs(check_seed_scaling); }
static void test_autograd_double_backward(void) { on_both_graphs(check_double_backward); }
static void test_autograd_no_recording(void) { on_both_graphs(check_no_recording); }

/* ---- AdamW ---- */

/* Three AdamW steps on tensors of 37 (decayed) and 5 (not decayed) values, sizes that
   leave a tail after the 16- and 8-wide SIMD loops, against torch.optim.AdamW's
   formula in float64. */
static void test_adamw_against_float64(void)
{
    codir_param_spec specs[2] = {{"w", 1, {37, 1, 1, 1}, 0}, {"b", 1, {5, 1, 1, 1}, 1}};
    codir_params params;
    codir_adamw opt;
    double p[42], m[42] = {0}, v[42] = {0};
    unsigned long long rng = 9;
    const double b1 = 0.9, b2 = 0.98, eps = 1e-6, wd = 0.1, lr = 0.05;
    size_t k;
    int step;
    if (codir_params_init(&params, specs, 2) != CODIR_OK) {
        CHECK(0, "codir_params_init: %s", codir_last_error());
        return;
    }
    CHECK(codir_adamw_init(&opt, &params, 0.9f, 0.98f, 1e-6f, 0.1f) == CODIR_OK, "init: %s", codir_last_error());
    for (k = 0; k < params.count; k++) p[k] = params.data[k] = (float)check_uniform(&rng, -1.0, 1.0);
    for (step = 1; step <= 3; step++) {
        double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step);
        for (k = 0; k < params.count; k++) {
            double g = (double)(params.grad[k] = (float)check_uniform(&rng, -2.0, 2.0));
            if (k < 37) p[k] *= 1.0 - lr * wd;
            m[k] = b1 * m[k] + (1.0 - b1) * g;
            v[k] = b2 * v[k] + (1.0 - b2) * g * g;
            p[k] -= lr / bc1 * m[k] / (sqrt(v[k]) / sqrt(bc2) + eps);
        }
        codir_adamw_step(&opt, &params, (float)lr);
        check_close(label("parameters after AdamW step %d", step), params.data, p, params.count, 1e-6, 1e-5);
    }
    codir_adamw_free(&opt);
    codir_params_free(&params);
}

/* ---- fused ops, the backward pool and retained gradients ---- */

#define FUSE_N 6
#define FUSE_C 8
#define FUSE_OC 5

/* Leaves of the fused-op checks, with gradients, and a regression target. */
typedef struct fuse_leaves {
    codir_tensor *x, *a, *w, *b;
    float target[FUSE_N * FUSE_OC];
} fuse_leaves;

static int fuse_leaves_new(codir_ctx *ctx, fuse_leaves *f)
{
    int sx[2] = {FUSE_N, FUSE_C}, sw[2] = {FUSE_OC, FUSE_C}, sb[1] = {FUSE_OC};
    unsigned long long rng = 77;
    size_t i;
    f->x = codir_tensor_new(ctx, 2, sx, 1);
    f->a = codir_tensor_new(ctx, 2, sx, 1);
    f->w = codir_tensor_new(ctx, 2, sw, 1);
    f->b = codir_tensor_new(ctx, 1, sb, 1);
    CHECK(f->x != NULL, "leaf x allocation failed: %s", codir_last_error());
    CHECK(f->a != NULL, "leaf a allocation failed: %s", codir_last_error());
    CHECK(f->w != NULL, "leaf w allocation failed: %s", codir_last_error());
    CHECK(f->b != NULL, "leaf b allocation failed: %s", codir_last_error());
    if (!f->x || !f->a || !f->w || !f->b) return 0;
    for (i = 0; i < f->x->numel; i++) f->x->data[i] = (float)check_uniform(&rng, -3.0, 3.0);
    for (i = 0; i < f->a->numel; i++) f->a->data[i] = (float)check_uniform(&rng, -1.0, 1.0);
    for (i = 0; i < f->w->numel; i++) f->w->data[i] = (float)check_uniform(&rng, -0.5, 0.5);
    for (i = 0; i < f->b->numel; i++) f->b->data[i] = (float)check_uniform(&rng, -0.5, 0.5);
    for (i = 0; i < FUSE_N * FUSE_OC; i++) f->target[i] = (float)check_uniform(&rng, -1.0, 1.0);
    return 1;
}

/* loss = mse(linear(gelu(x + dropout(a)))) through the fused ops (fused = 1) or their
   parts. Copies the output and the four leaf gradients into out[]. */
static int fuse_run(int fused, int training, float *out, float *grads)
{
    codir_ctx ctx;
    fuse_leaves f;
    codir_tensor *s, *y, *loss;
    size_t off = 0;
    int ok = 0, i;
    if (!make_ctx(&ctx)) return 0;
    codir_ctx_begin(&ctx, 1, training, 3);
    if (!fuse_leaves_new(&ctx, &f)) goto done;
    if (fused) {
        s = codir_add_dropout(&ctx, f.x, f.a, 0.25f);
        y = codir_gelu_linear(&ctx, s, f.w, f.b);
    } else {
        s = codir_add(&ctx, f.x, codir_dropout(&ctx, f.a, 0.25f));
        y = codir_linear(&ctx, codir_gelu(&ctx, s), f.w, f.b);
    }
    loss = codir_mse(&ctx, y, f.target);
    CHECK(loss != NULL, "%s forward failed: %s", fused ? "fused" : "unfused", codir_last_error());
    if (!loss || codir_backward(&ctx, loss) != CODIR_OK) goto done;
    memcpy(out, y->data, y->numel * sizeof(float));
    {
        codir_tensor *leaves[4] = {f.x, f.a, f.w, f.b};
        for (i = 0; i < 4; i++) {
            memcpy(grads + off, leaves[i]->grad, leaves[i]->numel * sizeof(float));
            off += leaves[i]->numel;
        }
    }
    ok = 1;
done:
    codir_ctx_free(&ctx);
    return ok;
}

/* codir_add_dropout and codir_gelu_linear give the bits of the ops they fuse, forward
   and backward, with dropout on and off. */
static void test_autograd_fused_ops(void)
{
    enum { NG = 2 * FUSE_N * FUSE_C + FUSE_OC * FUSE_C + FUSE_OC };
    float out[2][FUSE_N * FUSE_OC], grads[2][NG];
    int training, k, bad;
    for (training = 0; training <= 1; training++) {
        if (!fuse_run(0, training, out[0], grads[0]) || !fuse_run(1, training, out[1], grads[1])) return;
        for (k = 0, bad = 0; k < FUSE_N * FUSE_OC; k++) bad += memcmp(&out[0][k], &out[1][k], sizeof(float)) != 0;
        CHECK(bad == 0, "training %d: %d fused outputs differ from the unfused ops", training, bad);
        for (k = 0, bad = 0; k < NG; k++) bad += memcmp(&grads[0][k], &grads[1][k], sizeof(float)) != 0;
        CHECK(bad == 0, "training %d: %d of %d fused gradients differ from the unfused ops", training, bad, NG);
        for (k = 0, bad = 0; k < NG; k++) bad += grads[1][k] != 0.0f;
        CHECK(bad > NG / 2, "training %d: only %d of %d gradients are nonzero", training, bad, NG);
    }
}

/* A retained op output keeps its gradient, here the closed form 2 (y - target) / n of
   a mean squared error. The other op outputs have none after backward. */
static void test_autograd_retain_grad(void)
{
    codir_ctx ctx;
    fuse_leaves f;
    codir_tensor *h, *y, *loss;
    size_t i, n = FUSE_N * FUSE_OC;
    double want[FUSE_N * FUSE_OC];
    if (!make_ctx(&ctx)) return;
    codir_ctx_begin(&ctx, 1, 0, 0);
    if (!fuse_leaves_new(&ctx, &f)) goto done;
    h = codir_gelu(&ctx, f.x);
    y = codir_linear(&ctx, h, f.w, f.b);
    codir_retain_grad(y);
    loss = codir_mse(&ctx, y, f.target);
    CHECK(loss != NULL, "forward failed: %s", codir_last_error());
    if (!loss) goto done;
    CHECK(codir_backward(&ctx, loss) == CODIR_OK, "backward failed: %s", codir_last_error());
    CHECK(h->grad == NULL, "an op output kept its gradient without codir_retain_grad");
    CHECK(loss->grad == NULL, "the loss kept its gradient without codir_retain_grad");
    CHECK(y->grad != NULL, "the retained output has no gradient");
    if (!y->grad) goto done;
    for (i = 0; i < n; i++) want[i] = 2.0 * ((double)y->data[i] - f.target[i]) / (double)n;
    check_close("retained gradient", y->grad, want, n, 1e-7, 1e-6);
    /* A second pass starts the retained gradient from zero again. */
    CHECK(codir_backward(&ctx, loss) == CODIR_OK, "second backward failed: %s", codir_last_error());
    check_close("retained gradient after a second pass", y->grad, want, n, 1e-7, 1e-6);
done:
    codir_ctx_free(&ctx);
}

/* A struct copy of an op output with another shape (the way to reshape) shares the
   output's gradient: the leaf gradients equal those without the copy, bit for bit. A
   copy with another size is rejected by name. */
static void test_autograd_struct_copy_view(void)
{
    float grads[2][FUSE_N * FUSE_C + FUSE_OC * FUSE_C];
    int use_view, bad = 0;
    size_t k, n = FUSE_N * FUSE_C + FUSE_OC * FUSE_C;
    for (use_view = 0; use_view <= 1; use_view++) {
        codir_ctx ctx;
        fuse_leaves f;
        codir_tensor *h, view, *loss;
        if (!make_ctx(&ctx)) return;
        codir_ctx_begin(&ctx, 1, 0, 0);
        if (!fuse_leaves_new(&ctx, &f)) {
            codir_ctx_free(&ctx);
            return;
        }
        h = codir_gelu(&ctx, codir_linear(&ctx, f.x, f.w, NULL));
        if (!h) {
            CHECK(0, "forward failed: %s", codir_last_error());
            codir_ctx_free(&ctx);
            return;
        }
        view = *h;
        view.ndim = 1;
        view.shape[0] = (int)h->numel;
        view.shape[1] = 1;
        loss = codir_mse(&ctx, use_view ? &view : h, f.target);
        CHECK(loss != NULL, "loss with view %d: %s", use_view, codir_last_error());
        if (loss) CHECK(codir_backward(&ctx, loss) == CODIR_OK, "backward with view %d: %s", use_view, codir_last_error());
        memcpy(grads[use_view], f.x->grad, f.x->numel * sizeof(float));
        memcpy(grads[use_view] + f.x->numel, f.w->grad, f.w->numel * sizeof(float));
        CHECK(view.grad == NULL, "view %d: the copy kept a gradient", use_view);
        CHECK(h->grad == NULL, "view %d: the op output kept its gradient", use_view);
        if (use_view) {
            /* codir_retain_grad on the copy keeps the output's gradient for both. */
            codir_retain_grad(&view);
            CHECK(codir_backward(&ctx, loss) == CODIR_OK, "backward with a retained copy: %s", codir_last_error());
            CHECK(view.grad != NULL, "the retained copy has no gradient");
            CHECK(view.grad == h->grad, "the retained copy and its output have different gradients");
        }
        if (use_view) {
            /* The same copy with fewer values is rejected. */
            view.shape[0] = (int)h->numel - 1;
            view.numel = h->numel - 1;
            codir_ctx_begin(&ctx, 1, 0, 1);
            if (fuse_leaves_new(&ctx, &f)) {
                h = codir_linear(&ctx, f.x, f.w, NULL);
                if (h) {
                    view = *h;
                    view.numel = h->numel - 1;
                    view.shape[0] = (int)view.numel;
                    view.ndim = 1;
                    loss = codir_mse(&ctx, &view, f.target);
                    codir_clear_error();
                    CHECK(loss != NULL, "loss of a copy with fewer values: %s", codir_last_error());
                    if (loss)
                        CHECK(codir_backward(&ctx, loss) == CODIR_ERR_INVALID, "a copy with fewer values was accepted");
                    CHECK(strstr(codir_last_error(), "input 0 of op 1 is not an output of an earlier op") != NULL,
                          "reason: %s", codir_last_error());
                }
            }
        }
        codir_ctx_free(&ctx);
    }
    for (k = 0; k < n; k++) bad += memcmp(&grads[0][k], &grads[1][k], sizeof(float)) != 0;
    CHECK(bad == 0, "%d leaf gradients differ through a reshaped copy", bad);
}

/* A NULL term with a nonzero weight is rejected with a message that names it. */
static void test_weighted_sum_null_term(void)
{
    codir_ctx ctx;
    codir_tensor *terms[2], *sum;
    float weights[2] = {1.0f, 0.5f};
    int one = 1;
    if (!make_ctx(&ctx)) return;
    codir_ctx_begin(&ctx, 1, 0, 0);
    terms[0] = codir_tensor_new(&ctx, 1, &one, 1);
    terms[1] = NULL;
    if (terms[0]) terms[0]->data[0] = 2.0f;
    codir_clear_error();
    sum = codir_weighted_sum(&ctx, terms, weights, 2);
    CHECK(sum == NULL, "a NULL term with weight 0.5 was accepted");
    CHECK(ctx.status == CODIR_ERR_INVALID, "status %d after a NULL term, not CODIR_ERR_INVALID", ctx.status);
    CHECK(strstr(codir_last_error(), "term 1 is NULL but its weight is 0.5") != NULL, "reason: %s", codir_last_error());
    codir_ctx_free(&ctx);
}

/* Ops whose output does not lead to the loss are skipped: a parameter reached only
   through a second, unused loss gets no gradient, not even a zero added to NaN. */
static void test_autograd_skips_dead_branch(void)
{
    codir_ctx ctx;
    fuse_leaves f;
    codir_tensor *used, *unused;
    size_t i;
    if (!make_ctx(&ctx)) return;
    codir_ctx_begin(&ctx, 1, 0, 0);
    if (!fuse_leaves_new(&ctx, &f)) goto done;
    f.a->data[0] = NAN;
    used = codir_mse(&ctx, codir_linear(&ctx, f.x, f.w, f.b), f.target);
    unused = codir_mse(&ctx, codir_linear(&ctx, f.a, f.w, NULL), f.target);
    CHECK(used != NULL, "forward of the used loss failed: %s", codir_last_error());
    CHECK(unused != NULL, "forward of the unused loss failed: %s", codir_last_error());
    if (!used || !unused) goto done;
    CHECK(codir_backward(&ctx, used) == CODIR_OK, "backward failed: %s", codir_last_error());
    for (i = 0; i < f.a->numel; i++)
        if (f.a->grad[i] != 0.0f) break;
    CHECK(i == f.a->numel, "the unused branch's input got gradient %g at %zu", (double)f.a->grad[i], i);
    for (i = 0; i < f.w->numel; i++)
        if (!isfinite(f.w->grad[i])) break;
    CHECK(i == f.w->numel, "the unused branch's NaN reached the weight gradient at %zu", i);
done:
    codir_ctx_free(&ctx);
}

/* The backward pool reuses dead gradients. For a 6-block model the arena grows during
   backward by much less than one gradient per op output would take. A forward pass
   without a tape needs about one block beyond the hidden states. */
static void test_autograd_backward_pool(void)
{
    codir_config cfg = codir_config_default();
    codir_model *m;
    codir_batch batch;
    codir_output out;
    codir_ctx ctx;
    codir_tensor *loss;
    size_t after_forward = 0, activations, peak, hidden_bytes, block_bytes, no_tape_peak;
    int i, B = 4, T = 16;
    cfg.vocab_size = 50;
    cfg.max_len = T;
    cfg.num_layers = 6;
    cfg.hidden = 32;
    cfg.num_heads = 4;
    cfg.ffn = 64;
    cfg.dropout = 0.1f;
    m = codir_model_create(&cfg, 5);
    CHECK(m != NULL, "model: %s", codir_last_error());
    if (!m) return;
    if (codir_batch_init(&batch, B, T) || codir_ctx_init(&ctx, 1024, 3)) {
        CHECK(0, "setup failed: %s", codir_last_error());
        codir_model_free(m);
        return;
    }
    batch.batch = B;
    batch.seq = T;
    for (i = 0; i < B * T; i++) {
        batch.ids.data[i] = 1 + i % 40;
        batch.types.data[i] = 0;
        batch.mask.data[i] = 1;
    }
    for (i = 0; i < B; i++) batch.labels.data[i] = i % 2;
    batch.ids.ndim = batch.types.ndim = batch.mask.ndim = 2;
    batch.labels.ndim = 1;
    batch.ids.shape[0] = batch.types.shape[0] = batch.mask.shape[0] = B;
    batch.ids.shape[1] = batch.types.shape[1] = batch.mask.shape[1] = T;
    batch.ids.numel = batch.types.numel = batch.mask.numel = (size_t)B * T;
    batch.labels.shape[0] = B;
    batch.labels.numel = (size_t)B;

    /* Two steps, so the second runs in one arena block sized by the first. */
    for (i = 0; i < 2; i++) {
        codir_ctx_begin(&ctx, 1, 1, (uint64_t)i);
        CHECK(codir_model_forward(&ctx, m, &batch, &out) == CODIR_OK, "forward: %s", codir_last_error());
        loss = codir_cross_entropy(&ctx, out.logits, &batch.labels);
        if (!loss) break;
        after_forward = ctx.arena.used + ctx.arena.extra_used;
        CHECK(codir_backward(&ctx, loss) == CODIR_OK, "backward: %s", codir_last_error());
    }
    /* Per token, a recorded block keeps qkv (3C), the attention output (C), two
       residual sums (2C, each written over its linear output), two LayerNorm outputs
       (2C) and the FFN's inner values (F). It does not keep the attention
       probabilities (NH*T), because the backward pass recomputes them. The embeddings keep 3C. The rest (LayerNorm
       statistics, the classifier) stays under a tenth here, and keeping the
       probabilities would add a fifth. Gradient buffers made in the forward pass would
       double the total. */
    activations = ((size_t)cfg.num_layers * (8 * cfg.hidden + cfg.ffn) + 3 * cfg.hidden) * (size_t)B * T * sizeof(float);
    CHECK(after_forward < activations + activations / 10,
          "the forward pass took %zu arena bytes for %zu bytes of activations", after_forward, activations);
    peak = codir_arena_peak(&ctx.arena);
    CHECK(peak - after_forward < after_forward / 4,
          "backward took %zu arena bytes beyond the %zu of the forward pass; a gradient per activation would take about as many",
          peak - after_forward, after_forward);

    /* Without a tape: hidden states plus one block's work. */
    codir_ctx_free(&ctx);
    codir_ctx_init(&ctx, 1024, 3);
    for (i = 0; i < 2; i++) {
        codir_ctx_begin(&ctx, 0, 0, 0);
        CHECK(codir_model_forward(&ctx, m, &batch, &out) == CODIR_OK, "forward: %s", codir_last_error());
    }
    no_tape_peak = codir_arena_peak(&ctx.arena);
    hidden_bytes = (size_t)(cfg.num_layers + 1) * B * T * cfg.hidden * sizeof(float);
    block_bytes = after_forward / (size_t)cfg.num_layers;
    CHECK(no_tape_peak < hidden_bytes + 2 * block_bytes,
          "a forward pass without a tape peaked at %zu arena bytes; hidden states take %zu and a recorded block %zu",
          no_tape_peak, hidden_bytes, block_bytes);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

/* ---- invalid inputs ---- */

static void check_error_names(const char *what, const char *value)
{
    const char *msg = codir_last_error();
    CHECK(strstr(msg, value) != NULL, "%s: error message \"%s\" does not name the value %s", what, msg, value);
}

/* Feeds a NULL through the rest of a graph: every op returns NULL and the first
   error stays in ctx->status and codir_last_error(). */
static void check_chain_after_null(codir_ctx *ctx, encoder_graph *g, codir_tensor *bad, const char *value)
{
    codir_tensor *p = g->params.tensors, *pools[2], *x;
    int status = ctx->status, rc;
    x = codir_linear(ctx, bad, &p[P_W1], &p[P_B1]);
    CHECK(x == NULL, "linear of NULL returned a tensor");
    x = codir_gelu(ctx, x);
    CHECK(x == NULL, "gelu of NULL returned a tensor");
    pools[0] = codir_select_first(ctx, x);
    pools[1] = codir_mean_pool(ctx, x, &g->mask);
    x = codir_concat(ctx, pools, 2);
    CHECK(x == NULL, "concat of NULL inputs returned a tensor");
    x = codir_cross_entropy(ctx, x, &g->labels);
    CHECK(x == NULL, "cross-entropy of NULL returned a tensor");
    CHECK(ctx->status == status, "a chained op changed ctx->status from %d to %d", status, ctx->status);
    check_error_names("after chained ops", value);
    rc = codir_backward(ctx, x);
    CHECK(rc != CODIR_OK, "backward after a failed forward returned CODIR_OK");
    check_error_names("after backward", value);
}

/* Creates the encoder parameters and a context for an invalid-input test. */
static int bad_input_setup(encoder_graph *g, codir_ctx *ctx, unsigned long long seed)
{
    int rc = encoder_init(g, seed);
    CHECK(rc == CODIR_OK, "codir_params_init failed: %s", codir_last_error());
    if (rc != CODIR_OK) return 0;
    if (!make_ctx(ctx)) {
        codir_params_free(&g->params);
        return 0;
    }
    codir_ctx_begin(ctx, 1, 0, 0);
    return 1;
}

static void bad_input_teardown(encoder_graph *g, codir_ctx *ctx)
{
    codir_ctx_free(ctx);
    codir_params_free(&g->params);
}

static void test_autograd_bad_token(void)
{
    static const int bad_ids[G_B * G_T] = {1, 5, 5, 3, 1234, 6};
    encoder_graph g;
    codir_ctx ctx;
    codir_itensor ids;
    codir_tensor *p, *e;
    if (!bad_input_setup(&g, &ctx, 503)) return;
    p = g.params.tensors;
    set_itensor(&ids, bad_ids, 2, G_B, G_T);
    e = codir_embedding(&ctx, &ids, &g.types, &p[P_TOK], &p[P_POS], &p[P_TYPE]);
    CHECK(e == NULL, "embedding accepted token id 1234 with a vocabulary of %d", G_V);
    CHECK(ctx.status == CODIR_ERR_INVALID, "ctx->status = %d, want CODIR_ERR_INVALID", ctx.status);
    check_error_names("embedding", "1234");
    check_chain_after_null(&ctx, &g, e, "1234");
    bad_input_teardown(&g, &ctx);
}

static void test_autograd_bad_label(void)
{
    static const int bad_labels[G_B] = {2, 77};
    encoder_graph g;
    codir_ctx ctx;
    codir_itensor labels;
    codir_tensor *p, *z, *logits, *loss;
    int shape[2];
    if (!bad_input_setup(&g, &ctx, 504)) return;
    p = g.params.tensors;
    set_itensor(&labels, bad_labels, 1, G_B, 1);
    shape[0] = G_B;
    shape[1] = G_C;
    z = codir_tensor_new(&ctx, 2, shape, 0);
    CHECK(z != NULL, "codir_tensor_new failed: %s", codir_last_error());
    if (z) {
        memset(z->data, 0, z->numel * sizeof(float));
        logits = codir_linear(&ctx, z, &p[P_W3], NULL);
        loss = codir_cross_entropy(&ctx, logits, &labels);
        CHECK(loss == NULL, "cross-entropy accepted label 77 with %d classes", G_L);
        CHECK(ctx.status == CODIR_ERR_INVALID, "ctx->status = %d, want CODIR_ERR_INVALID", ctx.status);
        check_error_names("cross-entropy", "77");
        check_chain_after_null(&ctx, &g, loss, "77");
    }
    bad_input_teardown(&g, &ctx);
}

static void test_autograd_bad_heads(void)
{
    encoder_graph g;
    codir_ctx ctx;
    codir_tensor *qkv, *a;
    int shape[3];
    if (!bad_input_setup(&g, &ctx, 505)) return;

    /* qkv [B, T, 36] has width 12, which 5 heads do not divide. */
    shape[0] = G_B;
    shape[1] = G_T;
    shape[2] = 36;
    qkv = codir_tensor_new(&ctx, 3, shape, 1);
    CHECK(qkv != NULL, "codir_tensor_new failed: %s", codir_last_error());
    if (qkv) {
        memset(qkv->data, 0, qkv->numel * sizeof(float));
        a = codir_attention(&ctx, qkv, &g.mask, 5);
        CHECK(a == NULL, "attention accepted 5 heads for width 12");
        CHECK(ctx.status == CODIR_ERR_INVALID, "ctx->status = %d, want CODIR_ERR_INVALID", ctx.status);
        check_error_names("attention heads", "5");
        check_error_names("attention width", "12");
        check_chain_after_null(&ctx, &g, a, "12");
    }
    bad_input_teardown(&g, &ctx);
}

/* Checks that the op codir_attention_first returns [B, C] with the bits of
   codir_select_first of codir_attention, and a squared-error gradient that matches
   the float64 reference. With T = 0 there is no first query, so the op must fail. */
static void test_autograd_attention_first(void)
{
    enum { B = 3, T = 7, C = 12, NH = 3 };
    unsigned long long rng = 119;
    codir_ctx ctx;
    codir_itensor mask;
    codir_tensor *qkv, *full, *first, *loss;
    float *values = random_floats((size_t)B * T * 3 * C, &rng, -1.5, 1.5), *target = random_floats(B * C, &rng, -1, 1);
    double *ref_out = new_doubles((size_t)B * T * C), *dy = new_doubles((size_t)B * T * C);
    double *want = new_doubles((size_t)B * T * 3 * C), *qkv_d = widen(values, (size_t)B * T * 3 * C);
    int *mask_data = attention_mask(B, T), shape[3] = {B, T, 3 * C}, b, c, bad = 0;
    set_itensor(&mask, mask_data, 2, B, T);
    if (!make_ctx(&ctx)) return;
    codir_ctx_begin(&ctx, 1, 0, 0);
    qkv = codir_tensor_new(&ctx, 3, shape, 1);
    if (!qkv) goto done;
    memcpy(qkv->data, values, qkv->numel * sizeof(float));
    full = codir_select_first(&ctx, codir_attention(&ctx, qkv, &mask, NH));
    first = codir_attention_first(&ctx, qkv, &mask, NH);
    CHECK(full != NULL, "attention failed: %s", codir_last_error());
    CHECK(first != NULL, "attention_first failed: %s", codir_last_error());
    if (!full || !first) goto done;
    CHECK(first->ndim == 2, "output has %d dimensions, not 2", first->ndim);
    CHECK(first->shape[0] == B, "output has %d rows, not %d", first->shape[0], B);
    CHECK(first->shape[1] == C, "output has %d columns, not %d", first->shape[1], C);
    for (c = 0; c < B * C; c++) bad += memcmp(&first->data[c], &full->data[c], sizeof(float)) != 0;
    CHECK(bad == 0, "%d of %d outputs differ from the first token of codir_attention", bad, B * C);

    /* loss = mean (first - target)^2, so dL/dfirst = 2 (first - target) / (B C) */
    loss = codir_mse(&ctx, first, target);
    CHECK(loss != NULL, "mse failed: %s", codir_last_error());
    if (!loss) goto done;
    CHECK(codir_backward(&ctx, loss) == CODIR_OK, "backward failed: %s", codir_last_error());
    CHECK(qkv->grad != NULL, "qkv has no gradient");
    if (!qkv->grad) goto done;
    ref_attention(ref_out, NULL, qkv_d, mask_data, B, T, C, NH);
    for (b = 0; b < B; b++)
        for (c = 0; c < C; c++)
            dy[(size_t)b * T * C + c] = 2.0 * (ref_out[(size_t)b * T * C + c] - target[b * C + c]) / (B * C);
    ref_attention_backward(want, dy, qkv_d, mask_data, B, T, C, NH);
    check_close("gradient through attention_first", qkv->grad, want, qkv->numel, 1e-6, 1e-5);

    /* No token: an error that names the reason. */
    shape[1] = 0;
    qkv = codir_tensor_new(&ctx, 3, shape, 1);
    set_itensor(&mask, mask_data, 2, B, 0);
    first = codir_attention_first(&ctx, qkv, &mask, NH);
    CHECK(first == NULL, "attention_first accepted T = 0");
    CHECK(ctx.status == CODIR_ERR_INVALID, "ctx->status = %d, want CODIR_ERR_INVALID", ctx.status);
    check_error_names("attention_first with no token", "T = 0");
done:
    codir_ctx_free(&ctx);
    free_buffers();
}

/* ---- dropout in a context ---- */

static codir_tensor *dropout_run(codir_ctx *ctx, int training, uint64_t step, const float *x, codir_tensor **input)
{
    int shape[2];
    codir_tensor *t;
    codir_ctx_begin(ctx, 1, training, step);
    shape[0] = 40;
    shape[1] = 50;
    t = codir_tensor_new(ctx, 2, shape, 1);
    if (!t) return NULL;
    memcpy(t->data, x, t->numel * sizeof(float));
    if (input) *input = t;
    return codir_dropout(ctx, t, 0.5f);
}

/* Returns 1 if a dropout run produced a tensor, after recording a failure if not. */
static int dropout_ok(const codir_tensor *y, const char *what)
{
    CHECK(y != NULL, "dropout (%s) failed: %s", what, codir_last_error());
    return y != NULL;
}

static void test_autograd_dropout(void)
{
    enum { n = 2000 };
    unsigned long long rng = 506;
    float *x = random_floats(n, &rng, 0.5, 1.5), *first, *target = new_floats(n);
    double *want = new_doubles(n);
    codir_ctx ctx, other;
    codir_tensor *y, *in = NULL, *loss;
    size_t diff;
    int i, rc;
    if (!make_ctx(&ctx)) return;
    if (!make_ctx(&other)) {
        codir_ctx_free(&ctx);
        return;
    }

    y = dropout_run(&ctx, 1, 5, x, NULL);
    if (!dropout_ok(y, "step 5")) goto done;
    first = copy_floats(y->data, n);

    /* The same seed and step give the same mask, in this context or a fresh one. */
    y = dropout_run(&ctx, 1, 5, x, NULL);
    if (!dropout_ok(y, "step 5 again")) goto done;
    CHECK(count_different(first, y->data, n) == 0, "the same step gave a different mask");
    y = dropout_run(&other, 1, 5, x, NULL);
    if (!dropout_ok(y, "second context")) goto done;
    CHECK(count_different(first, y->data, n) == 0, "a context with the same seed gave a different mask");

    /* Another step, or the second dropout op of a step, gives another mask. */
    y = dropout_run(&ctx, 1, 6, x, NULL);
    if (!dropout_ok(y, "step 6")) goto done;
    diff = count_different(first, y->data, n);
    CHECK(diff > n / 3, "steps 5 and 6 differ on only %zu of %d elements", diff, n);
    y = dropout_run(&ctx, 1, 5, x, &in);
    if (!dropout_ok(y, "first op of step 5")) goto done;
    y = codir_dropout(&ctx, in, 0.5f);
    if (!dropout_ok(y, "second op of step 5")) goto done;
    diff = count_different(first, y->data, n);
    CHECK(diff > n / 3, "two dropout ops of one step differ on only %zu of %d elements", diff, n);

    /* Outside training, dropout is the identity and returns its input. */
    y = dropout_run(&ctx, 0, 5, x, &in);
    CHECK(y == in, "dropout with training off returned a new tensor");

    /* Backward of mean(y^2): 2 y / n * 2 where kept (y = 2x there), 0 where dropped. */
    y = dropout_run(&ctx, 1, 5, x, &in);
    if (!dropout_ok(y, "step 5 with backward")) goto done;
    loss = codir_mse(&ctx, y, target);
    rc = codir_backward(&ctx, loss);
    CHECK(rc == CODIR_OK, "backward failed: %s", codir_last_error());
    for (i = 0; i < n; i++) want[i] = y->data[i] != 0.0f ? 4.0 * y->data[i] / n : 0.0;
    check_close("dx through dropout", in->grad, want, n, 1e-7, 1e-5);

done:
    codir_ctx_free(&ctx);
    codir_ctx_free(&other);
    free_buffers();
}

const test_case tests_kernels[] = {
    {"kernel linear forward", test_linear_forward},
    {"kernel linear backward", test_linear_backward},
    {"kernel add", test_add},
    {"kernel layernorm forward", test_layernorm_forward},
    {"kernel layernorm backward", test_layernorm_backward},
    {"kernel layernorm mean 1e4", test_layernorm_large_mean},
    {"kernel layernorm mean 1e4 backward", test_layernorm_large_mean_backward},
    {"kernel gelu forward", test_gelu_forward},
    {"kernel gelu backward", test_gelu_backward},
    {"kernel gelu accuracy over [-12, 12]", test_gelu_accuracy},
    {"kernel tanh", test_tanh},
    {"kernel softmax", test_softmax},
    {"kernel attention forward", test_attention_forward},
    {"kernel attention backward", test_attention_backward},
    {"kernel attention fully masked row", test_attention_fully_masked},
    {"kernel attention large shapes and threads", test_attention_large},
    {"kernel attention first query", test_attention_first},
    {"autograd attention first query", test_autograd_attention_first},
    {"kernel attention NaN in padded keys", test_attention_padded_nan},
    {"kernel attention empty and NaN rows", test_attention_softmax_edges},
    {"kernel attention empty shapes", test_attention_empty},
    {"kernel embedding forward", test_embedding_forward},
    {"kernel embedding backward", test_embedding_backward},
    {"kernel dropout statistics", test_dropout_statistics},
    {"kernel dropout mask per key", test_dropout_key},
    {"kernel dropout thread count", test_dropout_threads},
    {"kernel dropout backward", test_dropout_backward},
    {"kernel select first", test_select_first},
    {"kernel mean pool", test_mean_pool},
    {"kernel mean pool ignores pads", test_mean_pool_ignores_pads},
    {"kernel concat", test_concat},
    {"kernel l2 normalize", test_l2_normalize},
    {"kernel l2 normalize zero row", test_l2_normalize_zero},
    {"kernel cross-entropy", test_cross_entropy},
    {"kernel cross-entropy logits 1e4", test_cross_entropy_extreme},
    {"kernel mse", test_mse},
    {"kernel kl", test_kl},
    {"kernel kl direction", test_kl_direction},
    {"kernel kl temperature squared", test_kl_temperature},
    {"kernel infonce", test_infonce},
    {"kernel infonce small tau", test_infonce_small_tau},
    {"autograd gradients match float64", test_autograd_gradients},
    {"autograd seed 0.25 scales exactly", test_autograd_seed_scaling},
    {"autograd two backward passes double", test_autograd_double_backward},
    {"autograd no recording", test_autograd_no_recording},
    {"adamw three steps against float64", test_adamw_against_float64},
    {"autograd fused ops match their parts", test_autograd_fused_ops},
    {"autograd retain_grad", test_autograd_retain_grad},
    {"autograd skips ops off the loss path", test_autograd_skips_dead_branch},
    {"autograd struct copy of an op output", test_autograd_struct_copy_view},
    {"autograd weighted sum names a NULL term", test_weighted_sum_null_term},
    {"autograd backward pool and no-tape forward", test_autograd_backward_pool},
    {"autograd bad token id", test_autograd_bad_token},
    {"autograd bad label", test_autograd_bad_label},
    {"autograd bad head count", test_autograd_bad_heads},
    {"autograd dropout mask", test_autograd_dropout},
};
const int tests_kernels_count = sizeof tests_kernels / sizeof tests_kernels[0];
