/* Tests of codir_gemm against a float64 product computed here.

   The error bound for an element is
       |c - ref| <= (k + 2) * 2^-23 * (|alpha| * sum_p |a_ip * b_pj| + |beta * c0_ij|)
                    + (k + 2) * FLT_TRUE_MIN
   because a relative bound is meaningless where the sum cancels to near zero; the
   last term covers subnormal products, whose rounding error is absolute.

   Every matrix lives in its own allocation laid out as
       [offset sentinels][rows x ld, columns cols..ld-1 sentinels][guard sentinels]
   so padding and the memory on both sides can be checked afterwards. A and B use NaN
   as the sentinel, so a sentinel read as data poisons the result; C uses a finite
   value, and every sentinel must be unchanged after the call. */
#include "check.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GEMM_GUARD 37
#define GEMM_C_SENTINEL 7777.0f

typedef struct gemm_matrix {
    float *raw;      /* offset + rows * ld + GEMM_GUARD floats */
    float *data;     /* raw + offset: element (i, j) at data[i * ld + j] */
    int rows, cols, ld;
    size_t offset, total;
    float sentinel;
} gemm_matrix;

/* One product to run and check. */
typedef struct gemm_case {
    int trans_a, trans_b, m, n, k;
    float alpha, beta;
    int ld_extra;       /* added to every leading dimension */
    size_t offset;      /* floats before each matrix: 1..3 misaligns the base pointer */
    float c_fill;       /* 0: random C; otherwise every element of C starts as c_fill */
    int a_subnormal;    /* scale A into the subnormal range */
} gemm_case;

static float gemm_nan(void) { return (float)NAN; }

static int gemm_matrix_init(gemm_matrix *mat, int rows, int cols, int ld, size_t offset, float sentinel)
{
    size_t i;
    mat->rows = rows;
    mat->cols = cols;
    mat->ld = ld;
    mat->offset = offset;
    mat->sentinel = sentinel;
    mat->total = offset + (size_t)rows * (size_t)ld + GEMM_GUARD;
    mat->raw = (float *)malloc(mat->total * sizeof(float));
    if (!mat->raw) return 0;
    for (i = 0; i < mat->total; i++) mat->raw[i] = sentinel;
    mat->data = mat->raw + offset;
    return 1;
}

static void gemm_matrix_free(gemm_matrix *mat) { free(mat->raw); }

static void gemm_matrix_fill(gemm_matrix *mat, unsigned long long *state, double scale)
{
    int i, j;
    for (i = 0; i < mat->rows; i++) {
        for (j = 0; j < mat->cols; j++)
            mat->data[(size_t)i * (size_t)mat->ld + (size_t)j] = (float)(scale * check_uniform(state, -1.0, 1.0));
    }
}

/* Returns the index into raw of the first changed sentinel, or -1 when all are intact. */
static long gemm_matrix_changed_sentinel(const gemm_matrix *mat)
{
    size_t idx;
    for (idx = 0; idx < mat->total; idx++) {
        int is_data = 0;
        if (idx >= mat->offset && idx < mat->offset + (size_t)mat->rows * (size_t)mat->ld)
            is_data = (int)((idx - mat->offset) % (size_t)mat->ld) < mat->cols;
        if (!is_data && memcmp(&mat->raw[idx], &mat->sentinel, sizeof(float)) != 0) return (long)idx;
    }
    return -1;
}

/* Element (i, p) of op(A) or (p, j) of op(B), from the stored matrix. */
static double gemm_op_at(const gemm_matrix *mat, int trans, int row, int col)
{
    if (trans) return mat->data[(size_t)col * (size_t)mat->ld + (size_t)row];
    return mat->data[(size_t)row * (size_t)mat->ld + (size_t)col];
}

/* Runs one case through codir_gemm (or codir_gemm_ref when use_ref) and checks every
   element against the float64 product and every sentinel. Returns 1 on success; on
   failure it records one CHECK failure that names the case. */
static int gemm_run_case(const gemm_case *gc, codir_gemm_ws *ws, unsigned long long seed, int use_ref)
{
    gemm_matrix a, b, c;
    float *c0 = NULL;
    double *ref = NULL, *bound = NULL;
    int a_rows = gc->trans_a ? gc->k : gc->m, a_cols = gc->trans_a ? gc->m : gc->k;
    int b_rows = gc->trans_b ? gc->n : gc->k, b_cols = gc->trans_b ? gc->k : gc->n;
    int lda = (a_cols > 1 ? a_cols : 1) + gc->ld_extra;
    int ldb = (b_cols > 1 ? b_cols : 1) + gc->ld_extra;
    int ldc = (gc->n > 1 ? gc->n : 1) + gc->ld_extra;
    unsigned long long state = seed;
    int ok = 1, status = CODIR_OK, i, j, p;
    long changed;
    char label[160];

    snprintf(label, sizeof label, "%s%s m=%d n=%d k=%d alpha=%g beta=%g ld+%d offset=%zu c_fill=%g%s",
             gc->trans_a ? "T" : "N", gc->trans_b ? "T" : "N", gc->m, gc->n, gc->k, (double)gc->alpha,
             (double)gc->beta, gc->ld_extra, gc->offset, (double)gc->c_fill, gc->a_subnormal ? " subnormal A" : "");

    if (!gemm_matrix_init(&a, a_rows, a_cols, lda, gc->offset, gemm_nan()) ||
        !gemm_matrix_init(&b, b_rows, b_cols, ldb, gc->offset, gemm_nan()) ||
        !gemm_matrix_init(&c, gc->m, gc->n, ldc, gc->offset, GEMM_C_SENTINEL)) {
        CHECK(0, "%s: out of memory in the test", label);
        return 0;
    }
    gemm_matrix_fill(&a, &state, gc->a_subnormal ? 1e-39 : 1.0);
    gemm_matrix_fill(&b, &state, 1.0);
    if (gc->c_fill != 0.0f || gc->c_fill != gc->c_fill) {
        for (i = 0; i < gc->m; i++) {
            for (j = 0; j < gc->n; j++) c.data[(size_t)i * (size_t)ldc + (size_t)j] = gc->c_fill;
        }
    } else {
        gemm_matrix_fill(&c, &state, 1.0);
    }

    c0 = (float *)malloc(((size_t)gc->m * (size_t)gc->n + 1) * sizeof(float));
    ref = (double *)malloc(((size_t)gc->m * (size_t)gc->n + 1) * sizeof(double));
    bound = (double *)malloc(((size_t)gc->m * (size_t)gc->n + 1) * sizeof(double));
    if (!c0 || !ref || !bound) {
        CHECK(0, "%s: out of memory in the test", label);
        ok = 0;
        goto done;
    }
    for (i = 0; i < gc->m; i++) {
        for (j = 0; j < gc->n; j++) c0[(size_t)i * gc->n + j] = c.data[(size_t)i * (size_t)ldc + (size_t)j];
    }

    /* float64 reference, row by row: ref = alpha * sum + beta * c0, where beta = 0
       ignores c0 (it may be NaN) and alpha = 0 ignores A and B. */
    for (i = 0; i < gc->m; i++) {
        double *ref_row = ref + (size_t)i * gc->n, *bound_row = bound + (size_t)i * gc->n;
        for (j = 0; j < gc->n; j++) {
            ref_row[j] = 0.0;
            bound_row[j] = 0.0;
        }
        if (gc->alpha != 0.0f) {
            for (p = 0; p < gc->k; p++) {
                double a_ip = gemm_op_at(&a, gc->trans_a, i, p);
                for (j = 0; j < gc->n; j++) {
                    double prod = a_ip * gemm_op_at(&b, gc->trans_b, p, j);
                    ref_row[j] += prod;
                    bound_row[j] += fabs(prod);
                }
            }
        }
        for (j = 0; j < gc->n; j++) {
            double beta_c = gc->beta != 0.0f ? (double)gc->beta * c0[(size_t)i * gc->n + j] : 0.0;
            ref_row[j] = (double)gc->alpha * ref_row[j] + beta_c;
            bound_row[j] = (gc->k + 2) * ldexp(1.0, -23) * (fabs((double)gc->alpha) * bound_row[j] + fabs(beta_c)) +
                           (gc->k + 2) * (double)FLT_TRUE_MIN;
        }
    }

    if (use_ref) {
        codir_gemm_ref(gc->trans_a, gc->trans_b, gc->m, gc->n, gc->k, gc->alpha, a.data, lda, b.data, ldb, gc->beta,
                       c.data, ldc);
    } else {
        status = codir_gemm(ws, gc->trans_a, gc->trans_b, gc->m, gc->n, gc->k, gc->alpha, a.data, lda, b.data, ldb,
                            gc->beta, c.data, ldc);
    }
    if (status != CODIR_OK) {
        CHECK(0, "%s: codir_gemm returned %d: %s", label, status, codir_last_error());
        ok = 0;
        goto done;
    }

    for (i = 0; i < gc->m && ok; i++) {
        for (j = 0; j < gc->n; j++) {
            double got = c.data[(size_t)i * (size_t)ldc + (size_t)j];
            double want = ref[(size_t)i * gc->n + j], tol = bound[(size_t)i * gc->n + j];
            if (!(fabs(got - want) <= tol)) {
                CHECK(0, "%s: C[%d,%d] is %.9g, expected %.9g within %.3g", label, i, j, got, want, tol);
                ok = 0;
                break;
            }
        }
    }
    changed = gemm_matrix_changed_sentinel(&a);
    if (changed >= 0) {
        CHECK(0, "%s: sentinel %ld of A was overwritten", label, changed);
        ok = 0;
    }
    changed = gemm_matrix_changed_sentinel(&b);
    if (changed >= 0) {
        CHECK(0, "%s: sentinel %ld of B was overwritten", label, changed);
        ok = 0;
    }
    changed = gemm_matrix_changed_sentinel(&c);
    if (changed >= 0) {
        CHECK(0, "%s: sentinel %ld of C (padding or guard) was overwritten with %g", label, changed,
              (double)c.raw[changed]);
        ok = 0;
    }

done:
    free(c0);
    free(ref);
    free(bound);
    gemm_matrix_free(&a);
    gemm_matrix_free(&b);
    gemm_matrix_free(&c);
    return ok;
}

static const float gemm_scalars[3] = {0.0f, 1.0f, -0.5f};

/* Fills a case; alpha and beta cycle through {0, 1, -0.5} with `index`, and C starts
   as NaN or Inf on some beta = 0 cases. */
static gemm_case gemm_make_case(int trans_a, int trans_b, int m, int n, int k, int index)
{
    gemm_case gc;
    memset(&gc, 0, sizeof gc);
    gc.trans_a = trans_a;
    gc.trans_b = trans_b;
    gc.m = m;
    gc.n = n;
    gc.k = k;
    gc.alpha = gemm_scalars[(index / 3) % 3];
    gc.beta = gemm_scalars[index % 3];
    /* Keep most cases at alpha != 0, so the product itself is what gets tested. */
    if (gc.alpha == 0.0f && index % 7 != 0) gc.alpha = 1.0f;
    if (gc.beta == 0.0f && index % 2 == 0) gc.c_fill = index % 4 == 0 ? gemm_nan() : (float)INFINITY;
    return gc;
}

/* Every m, n, k in 1..33 without transposes: every edge of every micro-kernel shape. */
static void test_gemm_sizes_nn(void)
{
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int m, n, k, index = 0, failures = 0;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    for (m = 1; m <= 33 && failures < 3; m++) {
        for (n = 1; n <= 33 && failures < 3; n++) {
            for (k = 1; k <= 33 && failures < 3; k++) {
                gemm_case gc = gemm_make_case(0, 0, m, n, k, index++);
                if (!gemm_run_case(&gc, ws, (unsigned long long)index, 0)) failures++;
            }
        }
    }
    codir_gemm_ws_free(ws);
}

/* The three transposed layouts on a fifth of the sizes 1..33, spread over all of them. */
static void test_gemm_sizes_transposed(void)
{
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int m, n, k, layout, index = 0, failures = 0;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    for (layout = 1; layout < 4; layout++) {
        for (m = 1; m <= 33 && failures < 3; m++) {
            for (n = 1; n <= 33 && failures < 3; n++) {
                for (k = 1; k <= 33 && failures < 3; k++) {
                    gemm_case gc;
                    if ((m + 2 * n + 3 * k + layout) % 5 != 0) continue;
                    gc = gemm_make_case(layout >> 1, layout & 1, m, n, k, index++);
                    if (!gemm_run_case(&gc, ws, (unsigned long long)index, 0)) failures++;
                }
            }
        }
    }
    codir_gemm_ws_free(ws);
}

/* Sizes around powers of two, in all four layouts, with padded leading dimensions and
   misaligned base pointers. */
static void test_gemm_edge_sizes_padded(void)
{
    static const int sizes[] = {1, 47, 48, 49, 63, 64, 65, 127, 128, 129};
    const int count = (int)(sizeof sizes / sizeof sizes[0]);
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int layout, s, index = 0;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    for (layout = 0; layout < 4; layout++) {
        for (s = 0; s < count; s++) {
            gemm_case cube = gemm_make_case(layout >> 1, layout & 1, sizes[s], sizes[s], sizes[s], index++);
            gemm_case mixed = gemm_make_case(layout >> 1, layout & 1, sizes[s], sizes[(s + 3) % count],
                                             sizes[(s + 7) % count], index++);
            cube.ld_extra = 5;
            cube.offset = (size_t)(1 + s % 3);
            mixed.ld_extra = 3;
            mixed.offset = (size_t)(1 + (s + 1) % 3);
            gemm_run_case(&cube, ws, (unsigned long long)index, 0);
            gemm_run_case(&mixed, ws, (unsigned long long)index + 1000, 0);
        }
    }
    codir_gemm_ws_free(ws);
}

/* Products larger than every block size: several MC, KC and NC blocks and edge tiles in
   both dimensions. ws = NULL allocates per call. */
static void test_gemm_large(void)
{
    static const int shapes[][3] = {{301, 700, 530}, {13, 4200, 300}, {150, 70, 1100}};
    int layout, s, index = 0;
    for (s = 0; s < 3; s++) {
        for (layout = 0; layout < 4; layout++) {
            gemm_case gc = gemm_make_case(layout >> 1, layout & 1, shapes[s][0], shapes[s][1], shapes[s][2], index++);
            gc.alpha = -0.5f;
            gc.beta = layout % 2 ? 1.0f : 0.0f;
            gc.ld_extra = 2;
            gc.offset = 1;
            gemm_run_case(&gc, NULL, (unsigned long long)index, 0);
        }
    }
}

/* Every alpha and beta in {0, 1, -0.5}, and beta = 0 over C full of NaN or Inf. With
   alpha = 0, A and B are not read, so NaN in them must not reach C. */
static void test_gemm_alpha_beta(void)
{
    static const float fills[] = {0.0f, (float)INFINITY, -(float)INFINITY};
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int ia, ib, f, layout;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    for (layout = 0; layout < 4; layout++) {
        for (ia = 0; ia < 3; ia++) {
            for (ib = 0; ib < 3; ib++) {
                for (f = 0; f < 4; f++) {
                    gemm_case gc = gemm_make_case(layout >> 1, layout & 1, 37, 70, 300, 0);
                    gc.alpha = gemm_scalars[ia];
                    gc.beta = gemm_scalars[ib];
                    if (f > 0 && gc.beta != 0.0f) continue;
                    gc.c_fill = f == 3 ? gemm_nan() : fills[f];
                    gc.ld_extra = 1;
                    gemm_run_case(&gc, ws, 99u + (unsigned long long)(ia * 3 + ib), 0);
                }
            }
        }
    }

    /* alpha = 0: A and B contain only NaN, and C must become beta * C. */
    {
        float a[6], b[6], c[4] = {1.0f, 2.0f, 3.0f, 4.0f};
        int i, status;
        for (i = 0; i < 6; i++) a[i] = b[i] = gemm_nan();
        status = codir_gemm(ws, 0, 0, 2, 2, 3, 0.0f, a, 3, b, 2, -0.5f, c, 2);
        CHECK(status == CODIR_OK, "alpha = 0 returned %d: %s", status, codir_last_error());
        for (i = 0; i < 4; i++) CHECK(c[i] == -0.5f * (float)(i + 1), "alpha = 0: C[%d] is %g, expected %g", i, (double)c[i], -0.5 * (i + 1));
    }
    codir_gemm_ws_free(ws);
}

/* Subnormal A: products and sums in the subnormal range must not flush to zero. */
static void test_gemm_subnormal(void)
{
    int layout;
    for (layout = 0; layout < 4; layout++) {
        gemm_case gc = gemm_make_case(layout >> 1, layout & 1, 29, 75, 41, 1);
        gc.alpha = 1.0f;
        gc.beta = 0.0f;
        gc.a_subnormal = 1;
        gemm_run_case(&gc, NULL, 7u + (unsigned long long)layout, 0);
    }
}

/* m, n or k = 0: no work, but k = 0 still scales C by beta, writing zeros for beta = 0
   without reading C. */
static void test_gemm_zero_sizes(void)
{
    float a[4] = {1.0f, 2.0f, 3.0f, 4.0f}, b[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    float c[4];
    int i, status;

    for (i = 0; i < 4; i++) c[i] = gemm_nan();
    status = codir_gemm(NULL, 0, 0, 2, 2, 0, 1.0f, a, 1, b, 2, 0.0f, c, 2);
    CHECK(status == CODIR_OK, "k = 0 returned %d: %s", status, codir_last_error());
    for (i = 0; i < 4; i++) CHECK(c[i] == 0.0f, "k = 0, beta = 0 over NaN: C[%d] is %g, expected 0", i, (double)c[i]);

    for (i = 0; i < 4; i++) c[i] = (float)(i + 1);
    status = codir_gemm(NULL, 0, 0, 2, 2, 0, 1.0f, a, 1, b, 2, -0.5f, c, 2);
    CHECK(status == CODIR_OK, "k = 0 returned %d: %s", status, codir_last_error());
    for (i = 0; i < 4; i++) CHECK(c[i] == -0.5f * (float)(i + 1), "k = 0, beta = -0.5: C[%d] is %g", i, (double)c[i]);

    for (i = 0; i < 4; i++) c[i] = 5.0f;
    status = codir_gemm(NULL, 0, 0, 0, 2, 2, 1.0f, a, 2, b, 2, 0.0f, c, 2);
    CHECK(status == CODIR_OK, "m = 0 returned %d: %s", status, codir_last_error());
    status = codir_gemm(NULL, 1, 1, 2, 0, 2, 1.0f, a, 2, b, 2, 0.0f, c, 1);
    CHECK(status == CODIR_OK, "n = 0 returned %d: %s", status, codir_last_error());
    for (i = 0; i < 4; i++) CHECK(c[i] == 5.0f, "m = 0 or n = 0 changed C[%d] to %g", i, (double)c[i]);
}

/* Invalid arguments return CODIR_ERR_INVALID, leave C alone and name the value. */
static void test_gemm_invalid_arguments(void)
{
    float a[64], b[64], c[64];
    int i, status;
    for (i = 0; i < 64; i++) {
        a[i] = b[i] = 1.0f;
        c[i] = 3.0f;
    }

    status = codir_gemm(NULL, 0, 0, -1, 4, 4, 1.0f, a, 4, b, 4, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "m = -1 returned %d, expected CODIR_ERR_INVALID", status);
    CHECK(strstr(codir_last_error(), "m is -1") != NULL, "m = -1: message \"%s\" does not name m", codir_last_error());

    status = codir_gemm(NULL, 0, 0, 4, 4, -3, 1.0f, a, 4, b, 4, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "k = -3 returned %d, expected CODIR_ERR_INVALID", status);
    CHECK(strstr(codir_last_error(), "k is -3") != NULL, "k = -3: message \"%s\" does not name k", codir_last_error());

    status = codir_gemm(NULL, 0, 0, 4, 4, 8, 1.0f, a, 7, b, 4, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "lda = 7 < k = 8 returned %d, expected CODIR_ERR_INVALID", status);
    CHECK(strstr(codir_last_error(), "lda is 7") != NULL, "lda = 7: message \"%s\" does not name lda", codir_last_error());

    status = codir_gemm(NULL, 1, 0, 5, 4, 2, 1.0f, a, 4, b, 4, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "trans_a = 1, lda = 4 < m = 5 returned %d", status);
    CHECK(strstr(codir_last_error(), "lda is 4") != NULL, "lda = 4: message \"%s\" does not name lda", codir_last_error());

    status = codir_gemm(NULL, 0, 1, 4, 4, 6, 1.0f, a, 6, b, 5, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "trans_b = 1, ldb = 5 < k = 6 returned %d", status);
    CHECK(strstr(codir_last_error(), "ldb is 5") != NULL, "ldb = 5: message \"%s\" does not name ldb", codir_last_error());

    status = codir_gemm(NULL, 0, 0, 4, 6, 4, 1.0f, a, 4, b, 6, 0.0f, c, 5);
    CHECK(status == CODIR_ERR_INVALID, "ldc = 5 < n = 6 returned %d", status);
    CHECK(strstr(codir_last_error(), "ldc is 5") != NULL, "ldc = 5: message \"%s\" does not name ldc", codir_last_error());

    status = codir_gemm(NULL, 2, 0, 4, 4, 4, 1.0f, a, 4, b, 4, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "trans_a = 2 returned %d", status);
    CHECK(strstr(codir_last_error(), "trans_a is 2") != NULL, "trans_a = 2: message \"%s\"", codir_last_error());

    status = codir_gemm(NULL, 0, 0, 4, 4, 4, 1.0f, a, 4, b, 4, 0.0f, NULL, 4);
    CHECK(status == CODIR_ERR_INVALID, "c = NULL returned %d", status);

    status = codir_gemm(NULL, 0, 0, 4, 4, 4, 1.0f, NULL, 4, b, 4, 0.0f, c, 4);
    CHECK(status == CODIR_ERR_INVALID, "a = NULL returned %d", status);

    for (i = 0; i < 64; i++) CHECK(c[i] == 3.0f, "a rejected call changed C[%d] to %g", i, (double)c[i]);
}

/* codir_gemm_ref documents the contract, so it must meet the same bound. */
static void test_gemm_reference(void)
{
    int layout;
    for (layout = 0; layout < 4; layout++) {
        gemm_case gc = gemm_make_case(layout >> 1, layout & 1, 17, 23, 31, layout);
        gc.beta = 0.0f;
        gc.c_fill = gemm_nan();
        gc.ld_extra = 2;
        gemm_run_case(&gc, NULL, 3u, 1);
        gc.beta = -0.5f;
        gc.c_fill = 0.0f;
        gemm_run_case(&gc, NULL, 4u, 1);
    }
}

static void test_gemm_kernel_name(void)
{
    const char *name = codir_gemm_kernel_name();
    CHECK(strcmp(name, "avx512") == 0 || strcmp(name, "avx2") == 0 || strcmp(name, "neon") == 0 ||
              strcmp(name, "scalar") == 0,
          "codir_gemm_kernel_name() is \"%s\", expected avx512, avx2, neon or scalar", name);
    printf("gemm kernel: %s\n", name);
}

#ifdef _OPENMP
/* Runs codir_gemm on random data and returns C (m x n, malloc'd), or NULL on failure. */
static float *gemm_product(codir_gemm_ws *ws, int trans_a, int trans_b, int m, int n, int k, float beta)
{
    unsigned long long state = 1234;
    size_t a_size = (size_t)m * k, b_size = (size_t)k * n, c_size = (size_t)m * n, i;
    float *a = (float *)malloc(a_size * sizeof(float));
    float *b = (float *)malloc(b_size * sizeof(float));
    float *c = (float *)malloc(c_size * sizeof(float));
    int status = CODIR_ERR_NOMEM;
    if (a && b && c) {
        for (i = 0; i < a_size; i++) a[i] = (float)check_uniform(&state, -1.0, 1.0);
        for (i = 0; i < b_size; i++) b[i] = (float)check_uniform(&state, -1.0, 1.0);
        for (i = 0; i < c_size; i++) c[i] = (float)check_uniform(&state, -1.0, 1.0);
        status = codir_gemm(ws, trans_a, trans_b, m, n, k, 0.75f, a, trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
    }
    CHECK(status == CODIR_OK, "codir_gemm on %d x %d x %d returned %d: %s", m, n, k, status, codir_last_error());
    free(a);
    free(b);
    if (status != CODIR_OK) {
        free(c);
        return NULL;
    }
    return c;
}

static const int gemm_thread_shapes[][5] = {
    /* trans_a, trans_b, m, n, k */
    {0, 0, 300, 520, 300},
    {0, 1, 517, 200, 600},
    {1, 0, 200, 300, 1030},
    {1, 1, 77, 130, 270},
    {0, 0, 5, 2000, 100}, /* fewer MR-panels than threads: threads split the columns */
    /* Rows split, so the team packs B~ together: four KC blocks, then two NC blocks. */
    {0, 0, 600, 300, 1000},
    {0, 1, 4300, 4200, 300},
};

/* The same product on 1, 2, 3 and 4 OpenMP threads is bit-identical. Three and four
   threads on two cores make a thread that races past a barrier of the shared B~ more
   likely to read a half-packed block. */
static void test_gemm_threads_bitwise(void)
{
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int saved = omp_get_max_threads(), s, threads;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    for (s = 0; s < (int)(sizeof gemm_thread_shapes / sizeof gemm_thread_shapes[0]); s++) {
        const int *sh = gemm_thread_shapes[s];
        float *one_thread;
        omp_set_num_threads(1);
        one_thread = gemm_product(ws, sh[0], sh[1], sh[2], sh[3], sh[4], 1.0f);
        for (threads = 2; threads <= 4 && one_thread; threads++) {
            float *threaded;
            omp_set_num_threads(threads);
            threaded = gemm_product(ws, sh[0], sh[1], sh[2], sh[3], sh[4], 1.0f);
            if (threaded)
                CHECK(memcmp(one_thread, threaded, (size_t)sh[2] * (size_t)sh[3] * sizeof(float)) == 0,
                      "trans %d%d m=%d n=%d k=%d: 1 and %d threads give different bits", sh[0], sh[1], sh[2], sh[3],
                      sh[4], threads);
            free(threaded);
        }
        free(one_thread);
    }
    omp_set_num_threads(saved);
    codir_gemm_ws_free(ws);
}

/* Two threads call codir_gemm at once, one with its own workspace and one with NULL.
   Inside a parallel region codir_gemm runs on the calling thread only, and the results
   must equal those of the same calls made one after the other. */
static void test_gemm_concurrent_calls(void)
{
    float *expected[2] = {NULL, NULL}, *got[2] = {NULL, NULL};
    codir_gemm_ws *ws = codir_gemm_ws_create();
    int t;
    CHECK(ws != NULL, "codir_gemm_ws_create failed: %s", codir_last_error());
    expected[0] = gemm_product(ws, 0, 1, 517, 200, 600, 0.0f);
    expected[1] = gemm_product(NULL, 1, 0, 200, 300, 1030, 0.0f);

    /* A loop rather than thread ids: with OMP_DYNAMIC the team may have one thread,
       which then makes both calls. */
#pragma omp parallel for num_threads(2) schedule(static, 1)
    for (t = 0; t < 2; t++)
        got[t] = t == 0 ? gemm_product(ws, 0, 1, 517, 200, 600, 0.0f) : gemm_product(NULL, 1, 0, 200, 300, 1030, 0.0f);

    for (t = 0; t < 2; t++) {
        CHECK(got[t] != NULL, "thread %d got no result", t);
        if (expected[t] && got[t]) {
            size_t size = t == 0 ? (size_t)517 * 200 : (size_t)200 * 300;
            CHECK(memcmp(expected[t], got[t], size * sizeof(float)) == 0,
                  "thread %d: concurrent result differs from the sequential one", t);
        }
        free(expected[t]);
        free(got[t]);
    }
    codir_gemm_ws_free(ws);
}
#endif

const test_case tests_gemm[] = {
    {"gemm kernel name", test_gemm_kernel_name},
    {"gemm sizes 1..33 NN", test_gemm_sizes_nn},
    {"gemm sizes 1..33 transposed", test_gemm_sizes_transposed},
    {"gemm edge sizes padded", test_gemm_edge_sizes_padded},
    {"gemm large products", test_gemm_large},
    {"gemm alpha and beta", test_gemm_alpha_beta},
    {"gemm subnormal inputs", test_gemm_subnormal},
    {"gemm zero sizes", test_gemm_zero_sizes},
    {"gemm invalid arguments", test_gemm_invalid_arguments},
    {"gemm reference", test_gemm_reference},
#ifdef _OPENMP
    /* Thread tests exist only in OpenMP builds; tests/run.sh runs one. */
    {"gemm threads bitwise", test_gemm_threads_bitwise},
    {"gemm concurrent calls", test_gemm_concurrent_calls},
#endif
};
const int tests_gemm_count = (int)(sizeof tests_gemm / sizeof tests_gemm[0]);
