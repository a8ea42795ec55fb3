/* Tests of the CoDIR objective in both scoring modes (NCE and InfoNCE). They cover the
   NCE kernels and their frozen normalizer, first-token and mean pooling, the teacher and
   student memory banks and the regression negative sampler. They also check that
   duplicating a batch or splitting it into micro-batches changes no gradient, that
   training steps lower the loss, how a student is initialized from its teacher, and
   the memory-bank limit.

   Expected values come from float64 code in this file written from the method's
   formulas (CRD's NCE with P = exp(x / tau) / Z and c = K / N, InfoNCE, the bank
   momentum update, masked mean pooling), from central finite differences of that code,
   or from closed forms. Negatives are random, so tests that need them save the
   sampler state before a call and draw the same negatives again from it. */
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- fixtures ---- */

/* Allocates or exits: a test without its buffers cannot report anything useful. */
static void *test_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_codir.c: out of memory allocating %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

static double *alloc_doubles(size_t n) { return (double *)test_alloc(n * sizeof(double)); }
static float *alloc_floats(size_t n) { return (float *)test_alloc(n * sizeof(float)); }

static double *to_doubles(const float *x, size_t n)
{
    double *out = alloc_doubles(n);
    size_t i;
    for (i = 0; i < n; i++) out[i] = (double)x[i];
    return out;
}

static void fill_uniform(float *x, size_t n, unsigned long long *rng, double lo, double hi)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)check_uniform(rng, lo, hi);
}

/* Scales each row of x[N, D] to unit L2 norm, in float64. */
static void normalize_rows(float *x, int N, int D)
{
    int i, j;
    for (i = 0; i < N; i++) {
        double ss = 0.0;
        for (j = 0; j < D; j++) ss += (double)x[(size_t)i * D + j] * x[(size_t)i * D + j];
        for (j = 0; j < D; j++) x[(size_t)i * D + j] = (float)(x[(size_t)i * D + j] / sqrt(ss));
    }
}

/* Returns a tiny model configuration: vocabulary 20, max_len 8, 3 labels and BERT's
   LayerNorm epsilon. */
static codir_config tiny_config(int layers, int hidden, int heads, int ffn, float dropout)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = 20;
    cfg.max_len = 8;
    cfg.type_vocab_size = 2;
    cfg.num_layers = layers;
    cfg.hidden = hidden;
    cfg.num_heads = heads;
    cfg.ffn = ffn;
    cfg.num_labels = 3;
    cfg.dropout = dropout;
    return cfg;
}

/* Replaces BERT's small initialization by values large enough to matter: matrices in
   +-0.5, vectors in +-0.3, LayerNorm gammas in [0.6, 1.4]. */
static void randomize_params(codir_params *params, unsigned long long seed)
{
    unsigned long long rng = seed;
    int i;
    size_t k;
    for (i = 0; i < params->num_tensors; i++) {
        codir_tensor *t = &params->tensors[i];
        int is_gamma = strstr(t->name, ".gamma") != NULL;
        for (k = 0; k < t->numel; k++) {
            if (is_gamma) t->data[k] = (float)check_uniform(&rng, 0.6, 1.4);
            else if (t->ndim == 2) t->data[k] = (float)check_uniform(&rng, -0.5, 0.5);
            else t->data[k] = (float)check_uniform(&rng, -0.3, 0.3);
        }
    }
}

/* A hand-made encoded data set of 12 sequences (lengths 1 to 8) and 3 balanced labels,
   so every example has 8 negatives of another label. */
#define TOY_COUNT 12
#define TOY_LEN 8
typedef struct toy_data {
    codir_encoded enc;
    int lengths[TOY_COUNT];
    int ids[TOY_COUNT * TOY_LEN];
    int labels[TOY_COUNT];
} toy_data;

static void toy_init(toy_data *toy)
{
    static const int lengths[TOY_COUNT] = {6, 3, 8, 2, 5, 4, 7, 1, 8, 3, 6, 2};
    unsigned long long rng = 77;
    int i, t;
    memset(toy, 0, sizeof *toy);
    for (i = 0; i < TOY_COUNT; i++) {
        toy->lengths[i] = lengths[i];
        toy->labels[i] = i % 3;
        for (t = 0; t < TOY_LEN; t++)
            toy->ids[i * TOY_LEN + t] = t < lengths[i] ? (int)check_uniform(&rng, 0.0, 20.0) : 0;
    }
    toy->enc.count = TOY_COUNT;
    toy->enc.max_len = TOY_LEN;
    toy->enc.lengths = toy->lengths;
    toy->enc.ids = toy->ids;
    toy->enc.labels = toy->labels;
    toy->enc.num_classes = 3;
}

/* Fills batch with order[start .. start+count-1] of toy; returns 0 after a failed check. */
static int toy_batch(codir_batch *batch, const toy_data *toy, const int *order, int start, int count)
{
    int rc = codir_batch_fill(batch, &toy->enc, order, start, count);
    CHECK(rc == CODIR_OK, "codir_batch_fill returned %d: %s", rc, codir_last_error());
    return rc == CODIR_OK;
}

/* Student 2 layers of width 4 and teacher 3 layers of width 6 for the contrastive
   tests that feed hand-made hidden states; D = 5, K = 3, tau = 0.07. */
#define CRD_LS 2
#define CRD_CS 4
#define CRD_LT 3
#define CRD_CT 6
#define CRD_D 5
#define CRD_K 3

static codir_distiller *crd_distiller(int mode, int pooling, const toy_data *toy, uint64_t seed)
{
    codir_distill_config dcfg = codir_distill_config_default();
    codir_config s = tiny_config(CRD_LS, CRD_CS, 2, 8, 0.0f), t = tiny_config(CRD_LT, CRD_CT, 2, 8, 0.0f);
    codir_distiller *d;
    dcfg.proj_dim = CRD_D;
    dcfg.num_negatives = CRD_K;
    dcfg.mode = mode;
    dcfg.pooling = pooling;
    d = codir_distiller_create(&dcfg, &s, &t, toy->labels, TOY_COUNT, seed);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    return d;
}

/* Hidden states hidden[0..L] of [B, T, C] as a forward pass exposes them: uniform in
   +-1 at real tokens and pad_value at padding, so that pooling padding would show. */
static int fake_output(codir_ctx *ctx, codir_output *out, int L, int C, const codir_batch *batch, float pad_value,
                       int with_grad, unsigned long long *rng)
{
    int shape[3], l, b, t, c;
    shape[0] = batch->batch;
    shape[1] = batch->seq;
    shape[2] = C;
    memset(out, 0, sizeof *out);
    out->hidden = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)(L + 1) * sizeof(codir_tensor *));
    CHECK(out->hidden != NULL, "arena allocation failed: %s", codir_last_error());
    if (!out->hidden) return 0;
    out->num_hidden = L + 1;
    for (l = 0; l <= L; l++) {
        codir_tensor *h = codir_tensor_new(ctx, 3, shape, with_grad);
        CHECK(h != NULL, "codir_tensor_new failed: %s", codir_last_error());
        if (!h) return 0;
        for (b = 0; b < batch->batch; b++)
            for (t = 0; t < batch->seq; t++)
                for (c = 0; c < C; c++)
                    h->data[((size_t)b * batch->seq + t) * C + c] =
                        batch->mask.data[b * batch->seq + t] ? (float)check_uniform(rng, -1.0, 1.0) : pad_value;
        out->hidden[l] = h;
    }
    return 1;
}

/* Draws the negatives of every row of batch again from sampler state `state`, as
   codir_crd_loss does, into idx[B, K+1] with each row's own id first. Returns 0 after
   a failed check. */
static int replay_negatives(codir_distiller *d, uint64_t state, const codir_batch *batch, int K, int *idx)
{
    uint64_t after = d->rng;
    int b, ok = 1;
    d->rng = state;
    for (b = 0; b < batch->batch; b++) {
        int *row = idx + (size_t)b * (K + 1), n;
        row[0] = batch->example_ids.data[b];
        n = codir_sample_negatives(d, row[0], row + 1, K);
        CHECK(n == K, "replayed sampler drew %d negatives for row %d, want %d", n, b, K);
        ok = ok && n == K;
    }
    CHECK(d->rng == after, "replaying the sampler did not end in the state codir_crd_loss left");
    return ok && d->rng == after;
}

/* Splits idx[B, K+1] into its negatives neg[B, K]. */
static void negatives_of(int *neg, const int *idx, int B, int K)
{
    int b;
    for (b = 0; b < B; b++) memcpy(neg + (size_t)b * K, idx + (size_t)b * (K + 1) + 1, (size_t)K * sizeof(int));
}

static const char *mode_name(int mode) { return mode == CODIR_CRD_NCE ? "NCE" : "InfoNCE"; }

/* ---- float64 references ---- */

/* log(1 + exp(x)) for any x. */
static double ref_log1pexp(double x) { return x > 0.0 ? x + log1p(exp(-x)) : log1p(exp(x)); }

/* <anchor_b, bank[idx_bj]> / tau */
static double ref_score(const double *anchor, const float *bank, const int *idx, int b, int j, int D, int K, double tau)
{
    const float *row = bank + (size_t)idx[(size_t)b * (K + 1) + j] * D;
    double dot = 0.0;
    int e;
    for (e = 0; e < D; e++) dot += anchor[(size_t)b * D + e] * (double)row[e];
    return dot / tau;
}

/* One NCE direction straight from CRD's definition, with P = exp(x / tau) / Z and
   c = K / N:  -(1/B) sum_b [ log(P_b0 / (P_b0 + c)) + sum_{j>=1} log(c / (P_bj + c)) ].
   Plain exp, so only for scores far below exp's float64 limit of about 709. */
static double ref_nce_direct(const double *anchor, const float *bank, const int *idx, int B, int D, int K, double tau,
                             double log_z, int N)
{
    double c = (double)K / N, z = exp(log_z), total = 0.0;
    int b, j;
    for (b = 0; b < B; b++)
        for (j = 0; j <= K; j++) {
            double p = exp(ref_score(anchor, bank, idx, b, j, D, K, tau)) / z;
            total += j == 0 ? log(p / (p + c)) : log(c / (p + c));
        }
    return -total / B;
}

/* The same loss in log space for small tau: with log P = x / tau - log Z,
   -log(P / (P + c)) = log(1 + c / P) and -log(c / (P + c)) = log(1 + P / c). */
static double ref_nce_log(const double *anchor, const float *bank, const int *idx, int B, int D, int K, double tau,
                          double log_z, int N)
{
    double log_c = log((double)K / N), total = 0.0;
    int b, j;
    for (b = 0; b < B; b++)
        for (j = 0; j <= K; j++) {
            double log_p = ref_score(anchor, bank, idx, b, j, D, K, tau) - log_z;
            total += j == 0 ? ref_log1pexp(log_c - log_p) : ref_log1pexp(log_p - log_c);
        }
    return total / B;
}

/* log Z with Z = N * mean_{b,j} exp(x_bj), summed directly. */
static double ref_log_normalizer(const double *anchor, const float *bank, const int *idx, int B, int D, int K,
                                 double tau, int N)
{
    double sum = 0.0;
    int b, j;
    for (b = 0; b < B; b++)
        for (j = 0; j <= K; j++) sum += exp(ref_score(anchor, bank, idx, b, j, D, K, tau));
    return log(N * sum / ((double)B * (K + 1)));
}

/* InfoNCE: mean_b [ log sum_j exp(x_bj) - x_b0 ] with x_b0 = <zs_b, zt_b> / tau and
   x_bj = <zs_b, bank[neg_b,j-1]> / tau. */
static double ref_infonce(const double *zs, const double *zt, const float *bank, const int *neg, int B, int D, int K,
                          double tau)
{
    double total = 0.0, *x = alloc_doubles((size_t)K + 1);
    int b, j, e;
    for (b = 0; b < B; b++) {
        double mx = -INFINITY, sum = 0.0;
        for (j = 0; j <= K; j++) {
            double dot = 0.0;
            for (e = 0; e < D; e++) {
                double other = j == 0 ? zt[(size_t)b * D + e] : (double)bank[(size_t)neg[b * K + j - 1] * D + e];
                dot += zs[(size_t)b * D + e] * other;
            }
            x[j] = dot / tau;
            if (x[j] > mx) mx = x[j];
        }
        for (j = 0; j <= K; j++) sum += exp(x[j] - mx);
        total += mx + log(sum) - x[0];
    }
    free(x);
    return total / B;
}

/* One side's projections z[B, D]: pool hidden layer map[k] of out for k < L (its first
   token, or the mean of its real tokens), concatenate, apply w[D, L*C] and bias[D],
   then scale to unit norm as torch.nn.functional.normalize with eps 1e-12. */
static void ref_project_side(double *z, const codir_output *out, const int *map, int L, int C, const codir_batch *batch,
                             int pooling, const codir_tensor *w, const codir_tensor *bias, int D)
{
    int B = batch->batch, T = batch->seq, W = L * C, k, b, t, c, j;
    double *f = alloc_doubles((size_t)B * W);
    for (k = 0; k < L; k++) {
        const float *h = out->hidden[map[k]]->data;
        for (b = 0; b < B; b++) {
            double *dst = f + (size_t)b * W + (size_t)k * C;
            int n = 0;
            for (c = 0; c < C; c++) dst[c] = 0.0;
            for (t = 0; t < T; t++) {
                if (pooling == CODIR_POOL_FIRST ? t != 0 : !batch->mask.data[b * T + t]) continue;
                n++;
                for (c = 0; c < C; c++) dst[c] += h[((size_t)b * T + t) * C + c];
            }
            for (c = 0; c < C; c++) dst[c] /= n;
        }
    }
    for (b = 0; b < B; b++) {
        double ss = 0.0, nrm;
        for (j = 0; j < D; j++) {
            double s = bias->data[j];
            for (c = 0; c < W; c++) s += (double)w->data[(size_t)j * W + c] * f[(size_t)b * W + c];
            z[(size_t)b * D + j] = s;
            ss += s * s;
        }
        nrm = sqrt(ss) > 1e-12 ? sqrt(ss) : 1e-12;
        for (j = 0; j < D; j++) z[(size_t)b * D + j] /= nrm;
    }
    free(f);
}

/* Both projections from hand-made hidden states: student layer k pairs with teacher
   layer (k - 1) * Lt / Ls + 1 (1-based), and layer 0 (the embeddings) is not used. */
static void ref_projections(double *zs, double *zt, const codir_distiller *d, const codir_output *so,
                            const codir_output *to, const codir_batch *batch)
{
    int smap[CRD_LS], tmap[CRD_LS], k;
    for (k = 0; k < CRD_LS; k++) {
        smap[k] = k + 1;
        tmap[k] = k * CRD_LT / CRD_LS + 1;
    }
    ref_project_side(zs, so, smap, CRD_LS, CRD_CS, batch, d->cfg.pooling, d->proj_s_w, d->proj_s_b, CRD_D);
    ref_project_side(zt, to, tmap, CRD_LS, CRD_CT, batch, d->cfg.pooling, d->proj_t_w, d->proj_t_b, CRD_D);
}

/* ---- NCE kernels and the frozen normalizer ---- */

#define NCE_B 3
#define NCE_D 5
#define NCE_K 4
#define NCE_N 10

/* Fills anchor[B, D], bank[N, D] and idx[B, K+1] for the kernel tests, with some bank
   rows shared between examples. Vectors have unit norm when `unit` is set, else entries
   in +-1. */
static void nce_inputs(float *anchor, float *bank, int *idx, int unit, unsigned long long seed)
{
    static const int rows[NCE_B * (NCE_K + 1)] = {2, 7, 0, 9, 4, 5, 1, 3, 8, 6, 8, 2, 6, 0, 9};
    unsigned long long rng = seed;
    fill_uniform(anchor, (size_t)NCE_B * NCE_D, &rng, -1.0, 1.0);
    fill_uniform(bank, (size_t)NCE_N * NCE_D, &rng, -1.0, 1.0);
    if (unit) {
        normalize_rows(anchor, NCE_B, NCE_D);
        normalize_rows(bank, NCE_N, NCE_D);
    }
    memcpy(idx, rows, sizeof rows);
}

/* Checks codir_nce_forward and codir_nce_backward at tau against the float64 loss
   `ref` (direct or log space) and its central finite differences. */
static void check_nce_kernels(double (*ref)(const double *, const float *, const int *, int, int, int, double, double, int),
                              int unit, float tau, double log_z, unsigned long long seed)
{
    float anchor[NCE_B * NCE_D], bank[NCE_N * NCE_D], logp[NCE_B * (NCE_K + 1)], danchor[NCE_B * NCE_D];
    double want_logp[NCE_B * (NCE_K + 1)], want_grad[NCE_B * NCE_D], *a, got, want, h = 1e-6, dloss = 0.7;
    double log_c = log((double)NCE_K / NCE_N);
    int idx[NCE_B * (NCE_K + 1)], b, j, i;
    nce_inputs(anchor, bank, idx, unit, seed);
    a = to_doubles(anchor, (size_t)NCE_B * NCE_D);

    /* Loss and log P = x / tau - log Z. */
    got = codir_nce_forward(logp, anchor, bank, idx, NCE_B, NCE_D, NCE_K, tau, log_z, log_c);
    want = ref(a, bank, idx, NCE_B, NCE_D, NCE_K, (double)tau, log_z, NCE_N);
    CHECK(fabs(got - want) <= 1e-6 + 1e-6 * fabs(want), "tau %g: NCE loss %.12g, float64 reference %.12g",
          (double)tau, got, want);
    for (b = 0; b < NCE_B; b++)
        for (j = 0; j <= NCE_K; j++)
            want_logp[b * (NCE_K + 1) + j] = ref_score(a, bank, idx, b, j, NCE_D, NCE_K, (double)tau) - log_z;
    check_close("log P", logp, want_logp, (size_t)NCE_B * (NCE_K + 1), 1e-5, 1e-6);

    /* The backward pass adds dloss * dL/danchor to what danchor holds. */
    for (i = 0; i < NCE_B * NCE_D; i++) {
        double saved = a[i], up, down;
        a[i] = saved + h;
        up = ref(a, bank, idx, NCE_B, NCE_D, NCE_K, (double)tau, log_z, NCE_N);
        a[i] = saved - h;
        down = ref(a, bank, idx, NCE_B, NCE_D, NCE_K, (double)tau, log_z, NCE_N);
        a[i] = saved;
        want_grad[i] = 0.25 + dloss * (up - down) / (2.0 * h);
        danchor[i] = 0.25f;
    }
    codir_nce_backward(danchor, logp, bank, idx, (float)dloss, NCE_B, NCE_D, NCE_K, tau, log_c);
    check_close("NCE gradient against finite differences", danchor, want_grad, (size_t)NCE_B * NCE_D, 1e-5, 1e-4);
    free(a);
}

static void test_nce_kernels_direct(void)
{
    float anchor[NCE_B * NCE_D], bank[NCE_N * NCE_D];
    int idx[NCE_B * (NCE_K + 1)];
    double *a, log_z;

    /* Z estimated from the inputs themselves, so that P is of the order of c and both
       softplus terms are in their curved range. */
    nce_inputs(anchor, bank, idx, 0, 11);
    a = to_doubles(anchor, (size_t)NCE_B * NCE_D);
    log_z = ref_log_normalizer(a, bank, idx, NCE_B, NCE_D, NCE_K, 0.5, NCE_N);
    free(a);
    check_nce_kernels(ref_nce_direct, 0, 0.5f, log_z, 11);

    /* A fixed normalizer unrelated to the inputs. */
    check_nce_kernels(ref_nce_direct, 0, 0.5f, -3.0, 12);
}

static void test_nce_kernels_small_tau(void)
{
    float anchor[NCE_B * NCE_D], bank[NCE_N * NCE_D];
    int idx[NCE_B * (NCE_K + 1)];
    double *a, log_z;
    nce_inputs(anchor, bank, idx, 1, 13);
    a = to_doubles(anchor, (size_t)NCE_B * NCE_D);
    log_z = ref_log_normalizer(a, bank, idx, NCE_B, NCE_D, NCE_K, 0.07, NCE_N);
    free(a);
    check_nce_kernels(ref_nce_log, 1, 0.07f, log_z, 13);

    /* A normalizer e^8 times larger, so every P is far below c. */
    check_nce_kernels(ref_nce_log, 1, 0.07f, log_z + 8.0, 14);
}

static void test_nce_log_normalizer(void)
{
    static const float taus[2] = {0.5f, 0.07f};
    float anchor[NCE_B * NCE_D], bank[NCE_N * NCE_D];
    int idx[NCE_B * (NCE_K + 1)], i;
    for (i = 0; i < 2; i++) {
        double *a, got, want;
        nce_inputs(anchor, bank, idx, i == 1, 15 + (unsigned long long)i);
        a = to_doubles(anchor, (size_t)NCE_B * NCE_D);
        got = codir_nce_log_normalizer(anchor, bank, idx, NCE_B, NCE_D, NCE_K, taus[i], NCE_N);
        want = ref_log_normalizer(a, bank, idx, NCE_B, NCE_D, NCE_K, (double)taus[i], NCE_N);
        CHECK(fabs(got - want) <= 1e-9 + 1e-9 * fabs(want), "tau %g: log normalizer %.15g, float64 reference %.15g",
              (double)taus[i], got, want);
        free(a);
    }
}

/* Runs the NCE contrastive loss on new hand-made hidden states and compares it with the
   float64 loss of the projections codir_crd_loss returned. The reference uses the
   normalizers log_z[2] (teacher anchor, student anchor), or this batch's own estimate
   when log_z is NULL. estimate[2] receives that estimate. Returns the loss, or NAN
   after a failed check. */
static double crd_nce_against_reference(codir_ctx *ctx, codir_distiller *d, const codir_batch *batch,
                                        unsigned long long *rng, const double *log_z, double *estimate)
{
    codir_output so, to;
    codir_tensor *loss, *zt = NULL;
    uint64_t state = d->rng;
    int idx[TOY_COUNT * (CRD_K + 1)], B = batch->batch;
    double *zs_d, *zt_d, want;
    codir_ctx_begin(ctx, 0, 0, 0);
    if (!fake_output(ctx, &so, CRD_LS, CRD_CS, batch, 0.0f, 0, rng)) return NAN;
    if (!fake_output(ctx, &to, CRD_LT, CRD_CT, batch, 0.0f, 0, rng)) return NAN;
    loss = codir_crd_loss(ctx, d, &so, &to, batch, &zt);
    CHECK(loss != NULL, "codir_crd_loss failed: %s", codir_last_error());
    CHECK(zt != NULL, "codir_crd_loss returned no teacher projections");
    CHECK(d->last_zs != NULL, "codir_crd_loss left no student projections");
    if (!loss || !zt || !d->last_zs) return NAN;
    if (!replay_negatives(d, state, batch, CRD_K, idx)) return NAN;

    /* Normalizers estimated from this batch: teacher anchors against the student bank,
       student anchors against the teacher bank. */
    zt_d = to_doubles(zt->data, (size_t)B * CRD_D);
    zs_d = to_doubles(d->last_zs->data, (size_t)B * CRD_D);
    estimate[0] = ref_log_normalizer(zt_d, d->bank_s, idx, B, CRD_D, CRD_K, (double)d->cfg.tau, TOY_COUNT);
    estimate[1] = ref_log_normalizer(zs_d, d->bank, idx, B, CRD_D, CRD_K, (double)d->cfg.tau, TOY_COUNT);
    if (!log_z) log_z = estimate;
    want = 0.5 * (ref_nce_direct(zt_d, d->bank_s, idx, B, CRD_D, CRD_K, (double)d->cfg.tau, log_z[0], TOY_COUNT) +
                  ref_nce_direct(zs_d, d->bank, idx, B, CRD_D, CRD_K, (double)d->cfg.tau, log_z[1], TOY_COUNT));
    CHECK(fabs(loss->data[0] - want) <= 1e-5 + 1e-5 * fabs(want),
          "NCE contrastive loss %.9g, float64 reference %.9g (log Z_t %.9g, log Z_s %.9g)", (double)loss->data[0], want,
          log_z[0], log_z[1]);
    free(zt_d);
    free(zs_d);
    return loss->data[0];
}

static void test_crd_nce_normalizer_frozen(void)
{
    static const int first[4] = {5, 0, 11, 7}, second[4] = {2, 9, 4, 1};
    toy_data toy;
    codir_distiller *d;
    codir_batch batch;
    codir_ctx ctx;
    unsigned long long rng = 101;
    double estimate[2], frozen[2], again[2];
    toy_init(&toy);
    d = crd_distiller(CODIR_CRD_NCE, CODIR_POOL_MEAN, &toy, 5);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!d) goto done;
    CHECK(d->z_ready == 0, "a new NCE distiller has z_ready %d, want 0", d->z_ready);

    /* First batch: both normalizers are estimated from it, then marked ready. */
    if (!toy_batch(&batch, &toy, first, 0, 4)) goto done;
    if (isnan(crd_nce_against_reference(&ctx, d, &batch, &rng, NULL, estimate))) goto done;
    CHECK(d->z_ready == 1, "z_ready is %d after the first NCE batch, want 1", d->z_ready);
    CHECK(fabs(d->log_z_t - estimate[0]) <= 1e-9 + 1e-9 * fabs(estimate[0]),
          "log Z_t %.15g, float64 estimate from the first batch %.15g", d->log_z_t, estimate[0]);
    CHECK(fabs(d->log_z_s - estimate[1]) <= 1e-9 + 1e-9 * fabs(estimate[1]),
          "log Z_s %.15g, float64 estimate from the first batch %.15g", d->log_z_s, estimate[1]);
    frozen[0] = d->log_z_t;
    frozen[1] = d->log_z_s;

    /* Second batch, other examples and hidden states: the normalizers keep their bits
       and the loss uses them, though this batch's own estimate differs. */
    if (!toy_batch(&batch, &toy, second, 0, 4)) goto done;
    if (isnan(crd_nce_against_reference(&ctx, d, &batch, &rng, frozen, again))) goto done;
    CHECK(memcmp(&d->log_z_t, &frozen[0], sizeof(double)) == 0, "log Z_t moved from %.17g to %.17g on the second batch",
          frozen[0], d->log_z_t);
    CHECK(memcmp(&d->log_z_s, &frozen[1], sizeof(double)) == 0, "log Z_s moved from %.17g to %.17g on the second batch",
          frozen[1], d->log_z_s);
    CHECK(d->z_ready == 1, "z_ready is %d after the second batch, want 1", d->z_ready);
    CHECK(fabs(again[0] - frozen[0]) > 1e-3, "test data too weak: the second batch estimates the same log Z_t %.6g",
          again[0]);
    CHECK(fabs(again[1] - frozen[1]) > 1e-3, "test data too weak: the second batch estimates the same log Z_s %.6g",
          again[1]);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_distiller_free(d);
}

/* ---- pooling, end to end through codir_crd_loss ---- */

/* Runs the contrastive loss of one mode and pooling on hand-made hidden states with 50
   at every padding position. Compares it with the float64 pipeline and checks which
   student positions receive gradient. */
static void check_crd_pooling(int mode, int pooling)
{
    static const int examples[4] = {2, 7, 4, 9}; /* lengths 8, 1, 5, 3 */
    const char *name = pooling == CODIR_POOL_FIRST ? "first-token" : "mean";
    toy_data toy;
    codir_distiller *d;
    codir_batch batch;
    codir_ctx ctx;
    codir_output so, to;
    codir_tensor *loss, *zt = NULL;
    unsigned long long rng = 202;
    uint64_t state;
    int idx[4 * (CRD_K + 1)], neg[4 * CRD_K], B = 4, T, l, b, t, c, rc;
    double zs_ref[4 * CRD_D], zt_ref[4 * CRD_D], want, tau;
    char what[96];
    toy_init(&toy);
    d = crd_distiller(mode, pooling, &toy, 6);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!d || !toy_batch(&batch, &toy, examples, 0, B)) goto done;
    T = batch.seq;
    tau = (double)d->cfg.tau;

    codir_ctx_begin(&ctx, 1, 0, 0);
    if (!fake_output(&ctx, &so, CRD_LS, CRD_CS, &batch, 50.0f, 1, &rng)) goto done;
    if (!fake_output(&ctx, &to, CRD_LT, CRD_CT, &batch, 50.0f, 0, &rng)) goto done;
    state = d->rng;
    loss = codir_crd_loss(&ctx, d, &so, &to, &batch, &zt);
    CHECK(loss != NULL, "%s pooling: codir_crd_loss failed: %s", name, codir_last_error());
    CHECK(zt != NULL, "%s pooling: codir_crd_loss returned no teacher projections", name);
    CHECK(d->last_zs != NULL, "%s pooling: codir_crd_loss left no student projections", name);
    if (!loss || !zt || !d->last_zs || !replay_negatives(d, state, &batch, CRD_K, idx)) goto done;
    negatives_of(neg, idx, B, CRD_K);

    /* Projections and loss against the float64 pipeline. */
    ref_projections(zs_ref, zt_ref, d, &so, &to, &batch);
    snprintf(what, sizeof what, "student projections, %s pooling, %s", name, mode_name(mode));
    check_close(what, d->last_zs->data, zs_ref, (size_t)B * CRD_D, 1e-6, 1e-5);
    snprintf(what, sizeof what, "teacher projections, %s pooling, %s", name, mode_name(mode));
    check_close(what, zt->data, zt_ref, (size_t)B * CRD_D, 1e-6, 1e-5);
    if (mode == CODIR_CRD_INFONCE) {
        want = ref_infonce(zs_ref, zt_ref, d->bank, neg, B, CRD_D, CRD_K, tau);
    } else {
        double lz_t = ref_log_normalizer(zt_ref, d->bank_s, idx, B, CRD_D, CRD_K, tau, TOY_COUNT);
        double lz_s = ref_log_normalizer(zs_ref, d->bank, idx, B, CRD_D, CRD_K, tau, TOY_COUNT);
        want = 0.5 * (ref_nce_log(zt_ref, d->bank_s, idx, B, CRD_D, CRD_K, tau, lz_t, TOY_COUNT) +
                      ref_nce_log(zs_ref, d->bank, idx, B, CRD_D, CRD_K, tau, lz_s, TOY_COUNT));
    }
    CHECK(fabs(loss->data[0] - want) <= 1e-4 + 1e-4 * fabs(want), "%s pooling, %s: loss %.9g, float64 %.9g", name,
          mode_name(mode), (double)loss->data[0], want);

    /* Gradient reaches only the pooled positions of the mapped student layers. */
    rc = codir_backward(&ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    for (l = 0; l <= CRD_LS; l++) {
        int pooled_nonzero = 0, other_nonzero = 0;
        for (b = 0; b < B; b++)
            for (t = 0; t < T; t++) {
                int pooled = l > 0 && (pooling == CODIR_POOL_FIRST ? t == 0 : batch.mask.data[b * T + t] != 0);
                for (c = 0; c < CRD_CS; c++) {
                    float g = so.hidden[l]->grad[((size_t)b * T + t) * CRD_CS + c];
                    if (pooled) pooled_nonzero += g != 0.0f;
                    else other_nonzero += g != 0.0f;
                }
            }
        CHECK(other_nonzero == 0, "%s pooling: %d gradient entries of student layer %d are outside the pooled tokens",
              name, other_nonzero, l);
        if (l > 0) CHECK(pooled_nonzero > 0, "%s pooling: student layer %d got no gradient", name, l);
    }
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_distiller_free(d);
}

static void test_crd_pool_first(void)
{
    check_crd_pooling(CODIR_CRD_INFONCE, CODIR_POOL_FIRST);
    check_crd_pooling(CODIR_CRD_NCE, CODIR_POOL_FIRST);
}

static void test_crd_pool_mean(void)
{
    check_crd_pooling(CODIR_CRD_INFONCE, CODIR_POOL_MEAN);
    check_crd_pooling(CODIR_CRD_NCE, CODIR_POOL_MEAN);
}

/* ---- real models for the step and accumulation tests ---- */

/* A 3-layer teacher (width 12) and a 2-layer student (width 8) over the toy data, and a
   distiller with D = 6 and K = 3. */
typedef struct model_setup {
    codir_config scfg, tcfg;
    codir_model *student, *teacher;
    codir_distiller *d;
    toy_data toy;
    codir_batch batch;
    codir_ctx ctx;
} model_setup;

static int model_setup_init(model_setup *s, int mode, float dropout)
{
    codir_distill_config dcfg = codir_distill_config_default();
    memset(s, 0, sizeof *s);
    s->scfg = tiny_config(2, 8, 2, 16, dropout);
    s->tcfg = tiny_config(3, 12, 2, 16, 0.0f);
    dcfg.proj_dim = 6;
    dcfg.num_negatives = 3;
    dcfg.mode = mode;
    toy_init(&s->toy);
    s->student = codir_model_create(&s->scfg, 21);
    s->teacher = codir_model_create(&s->tcfg, 22);
    s->d = codir_distiller_create(&dcfg, &s->scfg, &s->tcfg, s->toy.labels, TOY_COUNT, 23);
    CHECK(s->student != NULL, "codir_model_create failed for the student: %s", codir_last_error());
    CHECK(s->teacher != NULL, "codir_model_create failed for the teacher: %s", codir_last_error());
    CHECK(s->d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (codir_batch_init(&s->batch, TOY_COUNT, TOY_LEN) || codir_ctx_init(&s->ctx, 1 << 16, 3)) {
        CHECK(0, "batch or context setup failed: %s", codir_last_error());
        return 0;
    }
    if (!s->student || !s->teacher || !s->d) return 0;
    randomize_params(&s->student->params, 31);
    randomize_params(&s->teacher->params, 32);
    return 1;
}

static void model_setup_free(model_setup *s)
{
    codir_ctx_free(&s->ctx);
    codir_batch_free(&s->batch);
    codir_distiller_free(s->d);
    codir_model_free(s->student);
    codir_model_free(s->teacher);
}

/* ---- memory banks ---- */

/* row <- normalize(m row + (1 - m) z) in float64 for the rows ids[B] of before[N, D]. */
static void ref_bank_rows(double *want, const float *before, const float *z, const int *ids, int B, int D, double m)
{
    int b, j;
    for (b = 0; b < B; b++) {
        double ss = 0.0;
        for (j = 0; j < D; j++) {
            want[b * D + j] = m * before[(size_t)ids[b] * D + j] + (1.0 - m) * z[b * D + j];
            ss += want[b * D + j] * want[b * D + j];
        }
        for (j = 0; j < D; j++) want[b * D + j] /= sqrt(ss);
    }
}

/* Checks the touched rows of bank against want and every other row against before. */
static void check_bank(const char *what, const float *bank, const float *before, const double *want, const int *ids,
                       int B, int N, int D)
{
    char row_name[64];
    int b, r;
    for (b = 0; b < B; b++) {
        snprintf(row_name, sizeof row_name, "%s row %d", what, ids[b]);
        check_close(row_name, bank + (size_t)ids[b] * D, want + (size_t)b * D, (size_t)D, 1e-6, 1e-5);
    }
    for (r = 0; r < N; r++) {
        int touched = 0;
        for (b = 0; b < B; b++) touched |= ids[b] == r;
        if (!touched)
            CHECK(memcmp(bank + (size_t)r * D, before + (size_t)r * D, (size_t)D * sizeof(float)) == 0,
                  "%s: row %d changed though it is not in the batch", what, r);
    }
}

static void check_step_bank_update(int mode)
{
    static const int examples[4] = {5, 0, 11, 7};
    model_setup s;
    codir_adamw opt_s, opt_h;
    codir_output so, to;
    codir_loss_terms terms;
    codir_tensor *loss, *zt = NULL;
    uint64_t state;
    int B = 4, D = 6, rc;
    size_t bank_floats = (size_t)TOY_COUNT * 6;
    float zs0[4 * 6], zt0[4 * 6], *bank_before = NULL, *bank_s_before = NULL;
    double want[4 * 6], m;
    memset(&opt_s, 0, sizeof opt_s);
    memset(&opt_h, 0, sizeof opt_h);
    if (!model_setup_init(&s, mode, 0.0f) || !toy_batch(&s.batch, &s.toy, examples, 0, B)) goto done;
    m = (double)s.d->cfg.momentum;

    /* The projections the step will compute: same parameters, no dropout. The sampler
       state is put back so the step draws what it would have drawn. */
    state = s.d->rng;
    codir_ctx_begin(&s.ctx, 0, 0, 0);
    rc = codir_model_forward(&s.ctx, s.teacher, &s.batch, &to);
    if (!rc) rc = codir_model_forward(&s.ctx, s.student, &s.batch, &so);
    loss = rc ? NULL : codir_crd_loss(&s.ctx, s.d, &so, &to, &s.batch, &zt);
    CHECK(loss != NULL, "forward before the step failed: %s", codir_last_error());
    CHECK(zt != NULL, "codir_crd_loss returned no teacher projections");
    CHECK(s.d->last_zs != NULL, "codir_crd_loss left no student projections");
    if (!loss || !zt || !s.d->last_zs) goto done;
    memcpy(zt0, zt->data, sizeof zt0);
    memcpy(zs0, s.d->last_zs->data, sizeof zs0);
    s.d->rng = state;
    s.d->z_ready = 0;
    bank_before = alloc_floats(bank_floats);
    memcpy(bank_before, s.d->bank, bank_floats * sizeof(float));
    if (mode == CODIR_CRD_NCE) {
        CHECK(s.d->bank_s != NULL, "NCE distiller has no student bank");
        if (!s.d->bank_s) goto done;
        bank_s_before = alloc_floats(bank_floats);
        memcpy(bank_s_before, s.d->bank_s, bank_floats * sizeof(float));
    } else {
        CHECK(s.d->bank_s == NULL, "InfoNCE distiller has a student bank");
    }

    codir_adamw_init(&opt_s, &s.student->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    codir_adamw_init(&opt_h, &s.d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_s, &opt_h, &s.batch, 1e-2f, &terms);
    CHECK(rc == CODIR_OK, "codir_distill_step returned %d: %s", rc, codir_last_error());
    if (rc) goto done;

    /* Teacher bank toward the teacher projections; in NCE mode the student bank toward
       the student projections. */
    ref_bank_rows(want, bank_before, zt0, examples, B, D, m);
    check_bank("teacher bank", s.d->bank, bank_before, want, examples, B, TOY_COUNT, D);
    if (bank_s_before) {
        ref_bank_rows(want, bank_s_before, zs0, examples, B, D, m);
        check_bank("student bank", s.d->bank_s, bank_s_before, want, examples, B, TOY_COUNT, D);
    }
done:
    free(bank_before);
    free(bank_s_before);
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    model_setup_free(&s);
}

static void test_bank_update_infonce(void) { check_step_bank_update(CODIR_CRD_INFONCE); }
static void test_bank_update_nce(void) { check_step_bank_update(CODIR_CRD_NCE); }

/* ---- regression negatives ---- */

#define REG_N 20

/* Targets 0.25 * ((7 i) mod 19): multiples of 0.25 in shuffled order, exact in float,
   with one tie (examples 0 and 19 both have target 0). */
static void regression_targets(float *targets)
{
    int i;
    for (i = 0; i < REG_N; i++) targets[i] = 0.25f * (float)((7 * i) % 19);
}

/* Draws the negatives of `anchor` and checks them against the margin rule. */
static void check_regression_draw(codir_distiller *d, const float *targets, int anchor, int K)
{
    int out[REG_N + 8], seen[REG_N], n, i, far_total = 0, far_drawn = 0, want_n = K < REG_N - 1 ? K : REG_N - 1;
    double margin = (double)d->cfg.neg_margin;
    memset(seen, 0, sizeof seen);
    for (i = 0; i < REG_N; i++)
        if (i != anchor && fabs((double)targets[i] - targets[anchor]) > margin) far_total++;
    n = codir_sample_negatives(d, anchor, out, K);
    CHECK(n == want_n, "margin %g, anchor %d, K %d: drew %d negatives, want %d", margin, anchor, K, n, want_n);
    if (n != want_n) return;
    for (i = 0; i < n; i++) {
        int e = out[i];
        CHECK(e >= 0 && e < REG_N, "margin %g, anchor %d: negative %d is out of range", margin, anchor, e);
        if (e < 0 || e >= REG_N) return;
        CHECK(e != anchor, "margin %g, K %d: anchor %d drew itself", margin, K, anchor);
        CHECK(!seen[e], "margin %g, anchor %d, K %d: example %d drawn twice", margin, anchor, K, e);
        seen[e] = 1;
        if (fabs((double)targets[e] - targets[anchor]) > margin) far_drawn++;
    }

    /* All negatives beyond the margin while enough exist, else every such example. */
    if (far_total >= n)
        CHECK(far_drawn == n, "margin %g, anchor %d (target %g), K %d: %d of %d negatives are within the margin",
              margin, anchor, (double)targets[anchor], K, n - far_drawn, n);
    else
        CHECK(far_drawn == far_total,
              "margin %g, anchor %d (target %g), K %d: drew %d of the %d examples beyond the margin, want all",
              margin, anchor, (double)targets[anchor], K, far_drawn, far_total);
}

static codir_distiller *regression_distiller(float *targets)
{
    codir_distill_config dcfg = codir_distill_config_default();
    codir_config s = tiny_config(1, 4, 2, 8, 0.0f), t = tiny_config(2, 4, 2, 8, 0.0f);
    int labels[REG_N] = {0}, rc;
    codir_distiller *d;
    s.num_labels = t.num_labels = 1;
    dcfg.proj_dim = 4;
    d = codir_distiller_create(&dcfg, &s, &t, labels, REG_N, 9);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!d) return NULL;
    regression_targets(targets);
    rc = codir_distiller_set_targets(d, targets);
    CHECK(rc == CODIR_OK, "codir_distiller_set_targets returned %d: %s", rc, codir_last_error());
    if (rc) {
        codir_distiller_free(d);
        return NULL;
    }
    return d;
}

static void test_regression_negatives_margin(void)
{
    /* 0.3 leaves at least 16 examples beyond the margin; 2.1 leaves 3 for the middle
       targets and 10 or more at the ends; 0 leaves all but the tied pair. */
    static const float margins[3] = {0.3f, 2.1f, 0.0f};
    static const int Ks[5] = {1, 5, 8, 16, 18};
    float targets[REG_N];
    codir_distiller *d = regression_distiller(targets);
    int mi, ki, anchor, rep;
    if (!d) return;
    for (mi = 0; mi < 3; mi++) {
        d->cfg.neg_margin = margins[mi];
        for (ki = 0; ki < 5; ki++)
            for (anchor = 0; anchor < REG_N; anchor++)
                for (rep = 0; rep < 4; rep++) check_regression_draw(d, targets, anchor, Ks[ki]);
    }
    codir_distiller_free(d);
}

static void test_regression_negatives_cover_far(void)
{
    float targets[REG_N];
    codir_distiller *d = regression_distiller(targets);
    int counts[REG_N], out[5], anchor = 4, rep, i;
    if (!d) return;

    /* Margin 0.3 and K = 5 around target 2.25: every example beyond the margin is drawn
       sometimes, the near ones never. */
    d->cfg.neg_margin = 0.3f;
    memset(counts, 0, sizeof counts);
    for (rep = 0; rep < 300; rep++) {
        int n = codir_sample_negatives(d, anchor, out, 5);
        for (i = 0; i < n; i++) counts[out[i]]++;
    }
    for (i = 0; i < REG_N; i++) {
        int far = fabs((double)targets[i] - targets[anchor]) > 0.3;
        if (i == anchor || !far) CHECK(counts[i] == 0, "example %d (target %g) drawn %d times for anchor target %g", i,
                                       (double)targets[i], counts[i], (double)targets[anchor]);
        else CHECK(counts[i] > 0, "example %d beyond the margin was never drawn in 300 draws", i);
    }
    codir_distiller_free(d);
}

static void test_regression_negatives_all(void)
{
    float targets[REG_N];
    codir_distiller *d = regression_distiller(targets);
    int out[REG_N + 8], seen[REG_N], anchor, n, i, ki;
    static const int Ks[2] = {REG_N - 1, REG_N + 5};
    if (!d) return;
    d->cfg.neg_margin = 0.3f;

    /* K = N - 1, or more, returns every example but the anchor. */
    for (ki = 0; ki < 2; ki++)
        for (anchor = 0; anchor < REG_N; anchor++) {
            memset(seen, 0, sizeof seen);
            n = codir_sample_negatives(d, anchor, out, Ks[ki]);
            CHECK(n == REG_N - 1, "K %d, anchor %d: drew %d negatives, want %d", Ks[ki], anchor, n, REG_N - 1);
            if (n != REG_N - 1) continue;
            for (i = 0; i < n; i++)
                if (out[i] >= 0 && out[i] < REG_N) seen[out[i]]++;
            for (i = 0; i < REG_N; i++)
                CHECK(seen[i] == (i != anchor), "K %d, anchor %d: example %d drawn %d times", Ks[ki], anchor, i, seen[i]);
        }
    codir_distiller_free(d);
}

/* ---- duplicating every example of a batch ---- */

#define DUP_B 3
#define DUP_F 5  /* student features */
#define DUP_G 4  /* teacher features */
#define DUP_C 3  /* classes */
#define DUP_D 4
#define DUP_K 3
#define DUP_N 9

enum { TERM_TASK, TERM_KD, TERM_INFONCE, TERM_NCE, TERM_ALL, TERM_COUNT };
static const char *const term_names[TERM_COUNT] = {"task", "KD", "InfoNCE", "NCE", "weighted sum"};

/* Student projection head ws, bs, teacher head wt, bt and classifier wc, bc on fixed
   features of DUP_B examples, with banks and negatives that stay fixed. */
typedef struct dup_setup {
    codir_params params;
    codir_tensor *ws, *bs, *wt, *bt, *wc, *bc;
    float fs[DUP_B * DUP_F], ft[DUP_B * DUP_G], teacher_logits[DUP_B * DUP_C];
    float bank[DUP_N * DUP_D], bank_s[DUP_N * DUP_D];
    int labels[DUP_B], ids[DUP_B], neg[DUP_B * DUP_K];
    codir_ctx ctx;
} dup_setup;

static int dup_setup_init(dup_setup *s)
{
    static const int ids[DUP_B] = {4, 0, 7}, labels[DUP_B] = {2, 0, 1};
    static const int neg[DUP_B * DUP_K] = {1, 8, 2, 5, 3, 6, 0, 4, 8};
    codir_param_spec specs[6];
    static const char *const names[6] = {"ws", "bs", "wt", "bt", "wc", "bc"};
    const int rows[6] = {DUP_D, DUP_D, DUP_D, DUP_D, DUP_C, DUP_C}, cols[6] = {DUP_F, 0, DUP_G, 0, DUP_F, 0};
    unsigned long long rng = 303;
    int i, rc;
    memset(s, 0, sizeof *s);
    memset(specs, 0, sizeof specs);
    for (i = 0; i < 6; i++) {
        specs[i].name = names[i];
        specs[i].ndim = cols[i] ? 2 : 1;
        specs[i].shape[0] = rows[i];
        specs[i].shape[1] = cols[i] ? cols[i] : 1;
        specs[i].shape[2] = specs[i].shape[3] = 1;
    }
    rc = codir_params_init(&s->params, specs, 6);
    if (!rc) rc = codir_ctx_init(&s->ctx, 1 << 16, 1);
    CHECK(rc == CODIR_OK, "parameter or context setup failed: %s", codir_last_error());
    if (rc) return 0;
    s->ws = &s->params.tensors[0];
    s->bs = &s->params.tensors[1];
    s->wt = &s->params.tensors[2];
    s->bt = &s->params.tensors[3];
    s->wc = &s->params.tensors[4];
    s->bc = &s->params.tensors[5];
    fill_uniform(s->params.data, s->params.count, &rng, -0.8, 0.8);
    fill_uniform(s->fs, DUP_B * DUP_F, &rng, -1.0, 1.0);
    fill_uniform(s->ft, DUP_B * DUP_G, &rng, -1.0, 1.0);
    fill_uniform(s->teacher_logits, DUP_B * DUP_C, &rng, -2.0, 2.0);
    fill_uniform(s->bank, DUP_N * DUP_D, &rng, -1.0, 1.0);
    fill_uniform(s->bank_s, DUP_N * DUP_D, &rng, -1.0, 1.0);
    normalize_rows(s->bank, DUP_N, DUP_D);
    normalize_rows(s->bank_s, DUP_N, DUP_D);
    memcpy(s->labels, labels, sizeof labels);
    memcpy(s->ids, ids, sizeof ids);
    memcpy(s->neg, neg, sizeof neg);
    return 1;
}

/* Returns a [B * copies, cols] tensor of the arena that repeats src[B, cols] `copies` times. */
static codir_tensor *repeat_rows(codir_ctx *ctx, const float *src, int B, int cols, int copies)
{
    int shape[2], k;
    codir_tensor *t;
    shape[0] = B * copies;
    shape[1] = cols;
    t = codir_tensor_new(ctx, 2, shape, 0);
    if (!t) return NULL;
    for (k = 0; k < copies; k++) memcpy(t->data + (size_t)k * B * cols, src, (size_t)B * cols * sizeof(float));
    return t;
}

/* Evaluates one term on the batch repeated `copies` times, so row b + k B is example b.
   The parameter gradients start from zero. Returns the loss, or NAN after a failure. */
static double dup_run(dup_setup *s, int term, int copies)
{
    static const float weights[4] = {0.5f, 0.5f, 0.1f, 0.1f}, half[2] = {0.5f, 0.5f};
    codir_ctx *ctx = &s->ctx;
    codir_tensor *fs, *ft, *tl, *zs, *zt, *logits, *parts[4] = {NULL, NULL, NULL, NULL}, *dirs[2], *loss;
    codir_itensor labels;
    int B = DUP_B * copies, lab[DUP_B * 2], neg[DUP_B * 2 * DUP_K], idx[DUP_B * 2 * (DUP_K + 1)], b, rc;
    double log_z_t = log((double)DUP_N) + 2.0, log_z_s = log((double)DUP_N) + 1.5;
    for (b = 0; b < B; b++) {
        lab[b] = s->labels[b % DUP_B];
        memcpy(neg + b * DUP_K, s->neg + (b % DUP_B) * DUP_K, DUP_K * sizeof(int));
        idx[b * (DUP_K + 1)] = s->ids[b % DUP_B];
        memcpy(idx + b * (DUP_K + 1) + 1, s->neg + (b % DUP_B) * DUP_K, DUP_K * sizeof(int));
    }
    memset(&labels, 0, sizeof labels);
    labels.data = lab;
    labels.ndim = 1;
    labels.shape[0] = B;
    labels.shape[1] = labels.shape[2] = labels.shape[3] = 1;
    labels.numel = (size_t)B;

    codir_params_zero_grad(&s->params);
    codir_ctx_begin(ctx, 1, 0, 0);
    fs = repeat_rows(ctx, s->fs, DUP_B, DUP_F, copies);
    ft = repeat_rows(ctx, s->ft, DUP_B, DUP_G, copies);
    tl = repeat_rows(ctx, s->teacher_logits, DUP_B, DUP_C, copies);
    zs = codir_l2_normalize(ctx, codir_linear(ctx, fs, s->ws, s->bs));
    zt = codir_l2_normalize(ctx, codir_linear(ctx, ft, s->wt, s->bt));
    logits = codir_linear(ctx, fs, s->wc, s->bc);
    if (term == TERM_TASK || term == TERM_ALL) parts[0] = codir_cross_entropy(ctx, logits, &labels);
    if (term == TERM_KD || term == TERM_ALL) parts[1] = codir_kl_div(ctx, logits, tl, 2.0f);
    if (term == TERM_INFONCE || term == TERM_ALL) parts[2] = codir_infonce(ctx, zs, zt, s->bank, DUP_N, neg, DUP_K, 0.07f);
    if (term == TERM_NCE || term == TERM_ALL) {
        dirs[0] = codir_nce(ctx, zt, s->bank_s, DUP_N, idx, DUP_K, 0.07f, log_z_t, DUP_N);
        dirs[1] = codir_nce(ctx, zs, s->bank, DUP_N, idx, DUP_K, 0.07f, log_z_s, DUP_N);
        parts[3] = codir_weighted_sum(ctx, dirs, half, 2);
    }
    loss = term == TERM_ALL ? codir_weighted_sum(ctx, parts, weights, 4) : parts[term];
    CHECK(loss != NULL, "%s term on %d rows failed: %s", term_names[term], B, codir_last_error());
    if (!loss) return NAN;
    rc = codir_backward(ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());
    return rc ? NAN : (double)loss->data[0];
}

static void test_duplicated_batch_invariant(void)
{
    dup_setup s;
    double *want, once, twice, grad_abs;
    int term;
    size_t i;
    if (!dup_setup_init(&s)) goto done;
    want = alloc_doubles(s.params.count);
    for (term = 0; term < TERM_COUNT; term++) {
        once = dup_run(&s, term, 1);
        grad_abs = 0.0;
        for (i = 0; i < s.params.count; i++) {
            want[i] = s.params.grad[i];
            grad_abs += fabs(want[i]);
        }
        CHECK(grad_abs > 1e-3, "%s term: gradient is zero, so the comparison would be empty", term_names[term]);
        twice = dup_run(&s, term, 2);
        CHECK(fabs(twice - once) <= 1e-6 + 1e-6 * fabs(once), "%s term: %.9g on the batch, %.9g on it duplicated",
              term_names[term], once, twice);
        check_close(term_names[term], s.params.grad, want, s.params.count, 1e-6, 1e-5);
    }
    free(want);
done:
    codir_ctx_free(&s.ctx);
    codir_params_free(&s.params);
}

/* ---- accumulation over micro-batches ---- */

static void check_accumulation(int mode)
{
    static const int order[7] = {4, 0, 9, 2, 11, 6, 1};
    static const int starts[3] = {0, 3, 6}, counts[3] = {3, 3, 1};
    model_setup s;
    codir_loss_terms full, part;
    double *want_student = NULL, *want_heads = NULL, sum[4] = {0.0, 0.0, 0.0, 0.0};
    float *bank_before = NULL;
    size_t bank_floats = (size_t)TOY_COUNT * 6, i;
    uint64_t state, after_full;
    int rc, m;
    if (!model_setup_init(&s, mode, 0.0f)) goto done;
    if (mode == CODIR_CRD_NCE) {
        s.d->z_ready = 1;
        s.d->log_z_t = log((double)TOY_COUNT) + 2.5;
        s.d->log_z_s = log((double)TOY_COUNT) + 1.5;
    }
    state = s.d->rng;
    bank_before = alloc_floats(bank_floats);
    memcpy(bank_before, s.d->bank, bank_floats * sizeof(float));

    /* One batch of 7. */
    codir_params_zero_grad(&s.student->params);
    codir_params_zero_grad(&s.d->params);
    if (!toy_batch(&s.batch, &s.toy, order, 0, 7)) goto done;
    rc = codir_distill_accumulate(&s.ctx, s.student, s.teacher, s.d, &s.batch, 1.0f, 0, 0, &full);
    CHECK(rc == CODIR_OK, "full batch: codir_distill_accumulate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    CHECK(full.crd > 0.0, "full batch: contrastive term %g, want positive", full.crd);
    after_full = s.d->rng;
    want_student = to_doubles(s.student->params.grad, s.student->params.count);
    want_heads = to_doubles(s.d->params.grad, s.d->params.count);

    /* Micro-batches 3 + 3 + 1 weighted 3/7, 3/7, 1/7, drawing from the same sampler state. */
    s.d->rng = state;
    codir_params_zero_grad(&s.student->params);
    codir_params_zero_grad(&s.d->params);
    for (m = 0; m < 3; m++) {
        float w = (float)counts[m] / 7.0f;
        if (!toy_batch(&s.batch, &s.toy, order, starts[m], counts[m])) goto done;
        rc = codir_distill_accumulate(&s.ctx, s.student, s.teacher, s.d, &s.batch, w, 0, 0, &part);
        CHECK(rc == CODIR_OK, "micro-batch %d: codir_distill_accumulate returned %d: %s", m, rc, codir_last_error());
        if (rc) goto done;
        sum[0] += w * part.task;
        sum[1] += w * part.kd;
        sum[2] += w * part.crd;
        sum[3] += w * part.total;
    }
    CHECK(s.d->rng == after_full, "the micro-batches drew other negatives than the full batch");
    CHECK(fabs(sum[0] - full.task) <= 1e-5 * (1.0 + fabs(full.task)), "task: full %.9g, micro-batches %.9g", full.task, sum[0]);
    CHECK(fabs(sum[1] - full.kd) <= 1e-5 * (1.0 + fabs(full.kd)), "KD: full %.9g, micro-batches %.9g", full.kd, sum[1]);
    CHECK(fabs(sum[2] - full.crd) <= 1e-5 * (1.0 + fabs(full.crd)), "contrastive: full %.9g, micro-batches %.9g", full.crd,
          sum[2]);
    CHECK(fabs(sum[3] - full.total) <= 1e-5 * (1.0 + fabs(full.total)), "total: full %.9g, micro-batches %.9g",
          full.total, sum[3]);
    check_close("student gradients", s.student->params.grad, want_student, s.student->params.count, 1e-6, 1e-4);
    check_close("head gradients", s.d->params.grad, want_heads, s.d->params.count, 1e-6, 1e-4);

    /* update_bank = 0 leaves the banks alone. */
    CHECK(memcmp(s.d->bank, bank_before, bank_floats * sizeof(float)) == 0, "the teacher bank changed with update_bank 0");
    for (i = 0; i < s.d->params.count; i++)
        if (want_heads[i] != 0.0) break;
    CHECK(i < s.d->params.count, "head gradients are all zero, so the comparison would be empty");
done:
    free(want_student);
    free(want_heads);
    free(bank_before);
    model_setup_free(&s);
}

static void test_accumulation_infonce(void) { check_accumulation(CODIR_CRD_INFONCE); }
static void test_accumulation_nce(void) { check_accumulation(CODIR_CRD_NCE); }

/* ---- full training steps ---- */

static int all_finite(const codir_loss_terms *t)
{
    return isfinite(t->total) && isfinite(t->task) && isfinite(t->kd) && isfinite(t->crd);
}

static void check_steps_lower_loss(int mode)
{
    static const int examples[6] = {0, 1, 2, 3, 4, 5};
    model_setup s;
    codir_adamw opt_s, opt_h;
    codir_loss_terms terms, first;
    int step, rc = CODIR_OK;
    memset(&opt_s, 0, sizeof opt_s);
    memset(&opt_h, 0, sizeof opt_h);
    memset(&first, 0, sizeof first);
    memset(&terms, 0, sizeof terms);
    if (!model_setup_init(&s, mode, 0.1f) || !toy_batch(&s.batch, &s.toy, examples, 0, 6)) goto done;
    codir_adamw_init(&opt_s, &s.student->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    codir_adamw_init(&opt_h, &s.d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    for (step = 0; step < 20 && rc == CODIR_OK; step++) {
        rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_s, &opt_h, &s.batch, 1e-2f, &terms);
        CHECK(rc == CODIR_OK, "%s, step %d: codir_distill_step returned %d: %s", mode_name(mode), step, rc, codir_last_error());
        CHECK(all_finite(&terms), "%s, step %d: a loss term is not finite", mode_name(mode), step);
        if (step == 0) first = terms;
    }
    CHECK(terms.total < 0.8 * first.total, "%s: total loss went from %.4f to %.4f in 20 steps", mode_name(mode), first.total,
          terms.total);
    CHECK(terms.crd < first.crd, "%s: contrastive loss went from %.4f to %.4f in 20 steps", mode_name(mode), first.crd, terms.crd);
done:
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    model_setup_free(&s);
}

static void test_steps_lower_loss_infonce(void) { check_steps_lower_loss(CODIR_CRD_INFONCE); }
static void test_steps_lower_loss_nce(void) { check_steps_lower_loss(CODIR_CRD_NCE); }

/* ---- student initialization and the bank limit ---- */

static const char *init_mode_name(int mode) { return mode == CODIR_INIT_FIRST_K ? "first k" : "every other"; }

static int same_tensor(const codir_tensor *a, const codir_tensor *b)
{
    return a->numel == b->numel && memcmp(a->data, b->data, a->numel * sizeof(float)) == 0;
}

/* The 12 tensors of a block, in a fixed order. */
static void block_tensors(const codir_layer *ly, const codir_tensor **out)
{
    out[0] = ly->qkv_w;
    out[1] = ly->qkv_b;
    out[2] = ly->attn_out_w;
    out[3] = ly->attn_out_b;
    out[4] = ly->ln1_gamma;
    out[5] = ly->ln1_beta;
    out[6] = ly->ffn_up_w;
    out[7] = ly->ffn_up_b;
    out[8] = ly->ffn_down_w;
    out[9] = ly->ffn_down_b;
    out[10] = ly->ln2_gamma;
    out[11] = ly->ln2_beta;
}

/* Initializes an Ls-layer student from an Lt-layer teacher of the same widths. Checks that
   student block k (1-based) equals teacher block want[k-1] and that the embeddings and
   all heads were copied. */
static void check_init_from(int Lt, int Ls, int mode, const int *want)
{
    codir_config tc = tiny_config(Lt, 8, 2, 16, 0.0f), sc = tiny_config(Ls, 8, 2, 16, 0.0f);
    codir_model *teacher, *student;
    const codir_tensor *sb[12], *tb[12];
    int k, i, rc;
    tc.mlm_head = sc.mlm_head = 1;
    teacher = codir_model_create(&tc, 41);
    student = codir_model_create(&sc, 42);
    CHECK(teacher != NULL, "codir_model_create failed for the teacher: %s", codir_last_error());
    CHECK(student != NULL, "codir_model_create failed for the student: %s", codir_last_error());
    if (!teacher || !student) goto done;
    randomize_params(&teacher->params, 43);
    rc = codir_model_init_from(student, teacher, mode);
    CHECK(rc == CODIR_OK, "codir_model_init_from(%d -> %d, %s) returned %d: %s", Lt, Ls, init_mode_name(mode), rc,
          codir_last_error());
    if (rc) goto done;
    for (k = 0; k < Ls; k++) {
        block_tensors(&student->layers[k], sb);
        block_tensors(&teacher->layers[want[k] - 1], tb);
        for (i = 0; i < 12; i++)
            CHECK(same_tensor(sb[i], tb[i]), "%d -> %d, %s: student block %d tensor %s is not teacher block %d's",
                  Lt, Ls, init_mode_name(mode), k + 1, sb[i]->name, want[k]);
    }
    CHECK(same_tensor(student->tok_emb, teacher->tok_emb), "token embeddings not copied");
    CHECK(same_tensor(student->pos_emb, teacher->pos_emb), "position embeddings not copied");
    CHECK(same_tensor(student->type_emb, teacher->type_emb), "token-type embeddings not copied");
    CHECK(same_tensor(student->emb_ln_gamma, teacher->emb_ln_gamma), "embedding LayerNorm gamma not copied");
    CHECK(same_tensor(student->emb_ln_beta, teacher->emb_ln_beta), "embedding LayerNorm beta not copied");
    CHECK(same_tensor(student->pool_w, teacher->pool_w), "pooler weight not copied");
    CHECK(same_tensor(student->pool_b, teacher->pool_b), "pooler bias not copied");
    CHECK(same_tensor(student->cls_w, teacher->cls_w), "classifier weight not copied");
    CHECK(same_tensor(student->cls_b, teacher->cls_b), "classifier bias not copied");
    CHECK(same_tensor(student->mlm_dense_w, teacher->mlm_dense_w), "masked-LM dense weight not copied");
    CHECK(same_tensor(student->mlm_dense_b, teacher->mlm_dense_b), "masked-LM dense bias not copied");
    CHECK(same_tensor(student->mlm_ln_gamma, teacher->mlm_ln_gamma), "masked-LM LayerNorm gamma not copied");
    CHECK(same_tensor(student->mlm_ln_beta, teacher->mlm_ln_beta), "masked-LM LayerNorm beta not copied");
    CHECK(same_tensor(student->mlm_bias, teacher->mlm_bias), "masked-LM decoder bias not copied");
done:
    codir_model_free(teacher);
    codir_model_free(student);
}

static void test_init_every_other(void)
{
    /* Student block k from teacher block (k - 1) * Lt / Ls + 1. */
    static const int map_4_2[2] = {1, 3}, map_6_3[3] = {1, 3, 5}, map_3_2[2] = {1, 2}, map_4_4[4] = {1, 2, 3, 4};
    check_init_from(4, 2, CODIR_INIT_EVERY_OTHER, map_4_2);
    check_init_from(6, 3, CODIR_INIT_EVERY_OTHER, map_6_3);
    check_init_from(3, 2, CODIR_INIT_EVERY_OTHER, map_3_2);
    check_init_from(4, 4, CODIR_INIT_EVERY_OTHER, map_4_4);
}

static void test_init_first_k(void)
{
    static const int map_4_2[2] = {1, 2}, map_6_3[3] = {1, 2, 3};
    check_init_from(4, 2, CODIR_INIT_FIRST_K, map_4_2);
    check_init_from(6, 3, CODIR_INIT_FIRST_K, map_6_3);
}

static void test_init_rejects_width_mismatch(void)
{
    codir_config tc = tiny_config(4, 12, 2, 16, 0.0f), sc = tiny_config(2, 8, 2, 16, 0.0f);
    codir_model *teacher = codir_model_create(&tc, 51), *student = codir_model_create(&sc, 52);
    float *before;
    const char *msg;
    int rc;
    CHECK(teacher != NULL, "codir_model_create failed for the teacher: %s", codir_last_error());
    CHECK(student != NULL, "codir_model_create failed for the student: %s", codir_last_error());
    if (!teacher || !student) goto done;
    before = alloc_floats(student->params.count);
    memcpy(before, student->params.data, student->params.count * sizeof(float));
    rc = codir_model_init_from(student, teacher, CODIR_INIT_EVERY_OTHER);
    msg = codir_last_error();
    CHECK(rc == CODIR_ERR_INVALID, "hidden 8 from 12: codir_model_init_from returned %d, want CODIR_ERR_INVALID", rc);
    CHECK(strstr(msg, "hidden") != NULL, "error does not name the hidden width: %s", msg);
    CHECK(strstr(msg, "8") != NULL, "error does not give the student width 8: %s", msg);
    CHECK(strstr(msg, "12") != NULL, "error does not give the teacher width 12: %s", msg);
    CHECK(memcmp(before, student->params.data, student->params.count * sizeof(float)) == 0,
          "a rejected initialization changed the student");
    free(before);
done:
    codir_model_free(teacher);
    codir_model_free(student);
}

static void test_bank_limit(void)
{
    /* 4096 examples x 128 dimensions x 4 bytes = 2 MiB per bank. */
    enum { N = 4096, D = 128 };
    codir_distill_config dcfg = codir_distill_config_default();
    codir_config s = tiny_config(1, 4, 2, 8, 0.0f), t = tiny_config(2, 4, 2, 8, 0.0f);
    int *labels = (int *)test_alloc(N * sizeof(int)), i;
    codir_distiller *d;
    for (i = 0; i < N; i++) labels[i] = i % 2;
    dcfg.proj_dim = D;

    /* InfoNCE keeps one bank: exactly 2 MiB fits, one byte less does not. */
    dcfg.max_bank_bytes = (double)N * D * 4;
    d = codir_distiller_create(&dcfg, &s, &t, labels, N, 1);
    CHECK(d != NULL, "a 2 MiB bank under a 2 MiB limit was rejected: %s", codir_last_error());
    codir_distiller_free(d);
    dcfg.max_bank_bytes = (double)N * D * 4 - 1;
    codir_clear_error();
    d = codir_distiller_create(&dcfg, &s, &t, labels, N, 1);
    CHECK(d == NULL, "a 2 MiB bank under a limit of 2 MiB - 1 byte was accepted");
    codir_distiller_free(d);
    dcfg.max_bank_bytes = 1024.0 * 1024.0;
    codir_clear_error();
    d = codir_distiller_create(&dcfg, &s, &t, labels, N, 1);
    CHECK(d == NULL, "a 2 MiB bank under a 1 MiB limit was accepted");
    CHECK(strstr(codir_last_error(), "2.0 MiB") != NULL, "error does not give the bank size 2.0 MiB: %s",
          codir_last_error());
    CHECK(strstr(codir_last_error(), "1.0 MiB") != NULL, "error does not give the limit 1.0 MiB: %s",
          codir_last_error());
    codir_distiller_free(d);

    /* NCE keeps two banks, 4 MiB, over a 2 MiB limit. */
    dcfg.mode = CODIR_CRD_NCE;
    dcfg.max_bank_bytes = (double)N * D * 4;
    codir_clear_error();
    d = codir_distiller_create(&dcfg, &s, &t, labels, N, 1);
    CHECK(d == NULL, "NCE's two 2 MiB banks under a 2 MiB limit were accepted");
    CHECK(strstr(codir_last_error(), "4.0 MiB") != NULL, "error does not give the two banks' size 4.0 MiB: %s",
          codir_last_error());
    CHECK(strstr(codir_last_error(), "2.0 MiB") != NULL, "error does not give the limit 2.0 MiB: %s",
          codir_last_error());
    codir_distiller_free(d);
    free(labels);
}

static void test_nce_rejects_k_not_below_n(void)
{
    codir_distill_config dcfg = codir_distill_config_default();
    codir_config s = tiny_config(1, 4, 2, 8, 0.0f), t = tiny_config(2, 4, 2, 8, 0.0f);
    static const int labels[5] = {0, 1, 0, 1, 0};
    codir_distiller *d;
    dcfg.proj_dim = 4;
    dcfg.mode = CODIR_CRD_NCE;

    /* c = K / N must stay below 1: K = N and K > N are rejected, K = N - 1 is not. */
    dcfg.num_negatives = 5;
    d = codir_distiller_create(&dcfg, &s, &t, labels, 5, 1);
    CHECK(d == NULL, "NCE with K = N = 5 was accepted");
    CHECK(strstr(codir_last_error(), "K = 5") != NULL, "error does not name K: %s", codir_last_error());
    codir_distiller_free(d);
    dcfg.num_negatives = 9;
    d = codir_distiller_create(&dcfg, &s, &t, labels, 5, 1);
    CHECK(d == NULL, "NCE with K = 9 > N = 5 was accepted");
    codir_distiller_free(d);
    dcfg.num_negatives = 4;
    d = codir_distiller_create(&dcfg, &s, &t, labels, 5, 1);
    CHECK(d != NULL, "NCE with K = 4 < N = 5 was rejected: %s", codir_last_error());
    codir_distiller_free(d);
}

const test_case tests_codir[] = {
    {"codir nce kernels match float64", test_nce_kernels_direct},
    {"codir nce kernels at tau 0.07", test_nce_kernels_small_tau},
    {"codir nce log normalizer", test_nce_log_normalizer},
    {"codir nce normalizer frozen after first batch", test_crd_nce_normalizer_frozen},
    {"codir crd first-token pooling", test_crd_pool_first},
    {"codir crd mean pooling skips padding", test_crd_pool_mean},
    {"codir step updates bank, infonce", test_bank_update_infonce},
    {"codir step updates both banks, nce", test_bank_update_nce},
    {"codir regression negatives respect margin", test_regression_negatives_margin},
    {"codir regression negatives cover far examples", test_regression_negatives_cover_far},
    {"codir regression K >= N-1 takes all", test_regression_negatives_all},
    {"codir duplicated batch leaves losses", test_duplicated_batch_invariant},
    {"codir accumulation equals full batch, infonce", test_accumulation_infonce},
    {"codir accumulation equals full batch, nce", test_accumulation_nce},
    {"codir infonce steps lower loss", test_steps_lower_loss_infonce},
    {"codir nce steps lower loss", test_steps_lower_loss_nce},
    {"codir init every other block", test_init_every_other},
    {"codir init first k blocks", test_init_first_k},
    {"codir init rejects width mismatch", test_init_rejects_width_mismatch},
    {"codir bank limit in MiB", test_bank_limit},
    {"codir nce rejects K >= N", test_nce_rejects_k_not_below_n},
};
const int tests_codir_count = sizeof tests_codir / sizeof tests_codir[0];
