/* Tests of the transformer, the CoDIR objective, the negative sampler, the memory bank,
   AdamW and its schedule, the training steps, the arena and the parameter table.

   Expected values come from float64 references written in this file: a BERT forward
   pass, the contrastive loss, torch.optim.AdamW and the Hugging Face linear schedule.
   Gradients are checked against central finite differences of those references. */
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- fixtures ---- */

/* Allocates or exits: a test without its buffers cannot report anything useful. */
static void *test_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_model.c: out of memory allocating %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

static double *alloc_doubles(size_t n) { return (double *)test_alloc(n * sizeof(double)); }

/* vocab 20, max_len 8, 3 labels, BERT's LayerNorm epsilon. */
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

/* Replaces BERT's small initialization by values large enough that every term of
   the gradient matters: matrices and embeddings in +-0.5, biases and betas in +-0.3,
   LayerNorm gammas in [0.6, 1.4]. */
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

/* A hand-made encoded data set of 8 sequences with lengths 1 to 8 and 3 labels. */
#define TOY_COUNT 8
#define TOY_LEN 8
typedef struct toy_data {
    codir_encoded enc;
    int lengths[TOY_COUNT];
    int ids[TOY_COUNT * TOY_LEN];
    int labels[TOY_COUNT];
} toy_data;

static void toy_init(toy_data *toy)
{
    static const int lengths[TOY_COUNT] = {6, 3, 8, 2, 5, 4, 7, 1};
    static const int labels[TOY_COUNT] = {0, 1, 2, 0, 1, 2, 0, 1};
    unsigned long long rng = 99;
    int i, t;
    memset(toy, 0, sizeof *toy);
    for (i = 0; i < TOY_COUNT; i++) {
        toy->lengths[i] = lengths[i];
        toy->labels[i] = labels[i];
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

/* Fills batch with the listed examples of toy; returns 0 after a failed check. */
static int toy_batch(codir_batch *batch, const toy_data *toy, const int *examples, int count)
{
    int rc = codir_batch_fill(batch, &toy->enc, examples, 0, count);
    CHECK(rc == CODIR_OK, "codir_batch_fill returned %d: %s", rc, codir_last_error());
    return rc == CODIR_OK;
}

static double *params_to_doubles(const codir_params *params)
{
    double *p = alloc_doubles(params->count);
    size_t i;
    for (i = 0; i < params->count; i++) p[i] = (double)params->data[i];
    return p;
}

/* ---- float64 reference of the model ---- */

static size_t offset_of(const codir_params *params, const codir_tensor *t) { return (size_t)(t->data - params->data); }

/* out[N,OC] = in[N,C] w[OC,C]^T + b[OC] */
static void ref_linear(double *out, const double *in, const double *w, const double *b, int N, int C, int OC)
{
    int n, o, c;
    for (n = 0; n < N; n++)
        for (o = 0; o < OC; o++) {
            double s = b ? b[o] : 0.0;
            for (c = 0; c < C; c++) s += in[(size_t)n * C + c] * w[(size_t)o * C + c];
            out[(size_t)n * OC + o] = s;
        }
}

/* In place, with the biased variance as torch.nn.LayerNorm. */
static void ref_layernorm(double *x, const double *gamma, const double *beta, int N, int C, double eps)
{
    int n, c;
    for (n = 0; n < N; n++) {
        double *row = x + (size_t)n * C, mean = 0.0, var = 0.0;
        for (c = 0; c < C; c++) mean += row[c];
        mean /= C;
        for (c = 0; c < C; c++) var += (row[c] - mean) * (row[c] - mean);
        var /= C;
        for (c = 0; c < C; c++) row[c] = (row[c] - mean) / sqrt(var + eps) * gamma[c] + beta[c];
    }
}

/* Multi-head attention over qkv[B,T,3C] with padded keys excluded; out[B,T,C]. */
static void ref_attention(double *out, const double *qkv, const int *mask, int B, int T, int C, int NH)
{
    int HS = C / NH, b, h, i, j, e;
    double *score = alloc_doubles((size_t)T);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (i = 0; i < T; i++) {
                const double *q = qkv + ((size_t)b * T + i) * 3 * C + h * HS;
                double mx = -INFINITY, sum = 0.0;
                for (j = 0; j < T; j++) {
                    const double *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                    double s = 0.0;
                    for (e = 0; e < HS; e++) s += q[e] * k[e];
                    score[j] = s / sqrt((double)HS);
                    if (mask[b * T + j] && score[j] > mx) mx = score[j];
                }
                for (j = 0; j < T; j++) {
                    score[j] = mask[b * T + j] ? exp(score[j] - mx) : 0.0;
                    sum += score[j];
                }
                for (e = 0; e < HS; e++) {
                    double acc = 0.0;
                    for (j = 0; j < T; j++)
                        if (sum > 0.0) acc += score[j] / sum * qkv[((size_t)b * T + j) * 3 * C + 2 * C + h * HS + e];
                    out[((size_t)b * T + i) * C + h * HS + e] = acc;
                }
            }
    free(score);
}

static double ref_gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

/* BERT post-LayerNorm encoder and classification head without dropout, with the
   parameter values p[params.count] in the model's layout. hidden[(L+1) * B*T*C]
   receives the embedding output and every block's output; logits[B, labels]. */
static void ref_forward(const codir_model *m, const double *p, const codir_batch *batch, double *hidden, double *logits)
{
    const codir_config *cfg = &m->cfg;
    const codir_params *P = &m->params;
    int B = batch->batch, T = batch->seq, C = cfg->hidden, F = cfg->ffn, L = cfg->num_layers, V = cfg->num_labels;
    int N = B * T, b, t, c, l;
    size_t BTC = (size_t)N * C;
    double *qkv = alloc_doubles((size_t)N * 3 * C), *att = alloc_doubles(BTC), *proj = alloc_doubles(BTC);
    double *up = alloc_doubles((size_t)N * F), *cls = alloc_doubles((size_t)B * C), *pooled = alloc_doubles((size_t)B * C);
    double eps = (double)cfg->ln_eps;

    /* embeddings: token + position + token type, then LayerNorm */
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            int id = batch->ids.data[b * T + t], type = batch->types.data[b * T + t];
            for (c = 0; c < C; c++)
                hidden[((size_t)b * T + t) * C + c] = p[offset_of(P, m->tok_emb) + (size_t)id * C + c] +
                                                      p[offset_of(P, m->pos_emb) + (size_t)t * C + c] +
                                                      p[offset_of(P, m->type_emb) + (size_t)type * C + c];
        }
    ref_layernorm(hidden, p + offset_of(P, m->emb_ln_gamma), p + offset_of(P, m->emb_ln_beta), N, C, eps);

    for (l = 0; l < L; l++) {
        const codir_layer *ly = &m->layers[l];
        const double *x = hidden + (size_t)l * BTC;
        double *y = hidden + (size_t)(l + 1) * BTC;
        size_t i;

        /* x = LN(x + Attn(x)) */
        ref_linear(qkv, x, p + offset_of(P, ly->qkv_w), p + offset_of(P, ly->qkv_b), N, C, 3 * C);
        ref_attention(att, qkv, batch->mask.data, B, T, C, cfg->num_heads);
        ref_linear(proj, att, p + offset_of(P, ly->attn_out_w), p + offset_of(P, ly->attn_out_b), N, C, C);
        for (i = 0; i < BTC; i++) y[i] = x[i] + proj[i];
        ref_layernorm(y, p + offset_of(P, ly->ln1_gamma), p + offset_of(P, ly->ln1_beta), N, C, eps);

        /* x = LN(x + W2 GELU(W1 x)) */
        ref_linear(up, y, p + offset_of(P, ly->ffn_up_w), p + offset_of(P, ly->ffn_up_b), N, C, F);
        for (i = 0; i < (size_t)N * F; i++) up[i] = ref_gelu(up[i]);
        ref_linear(proj, up, p + offset_of(P, ly->ffn_down_w), p + offset_of(P, ly->ffn_down_b), N, F, C);
        for (i = 0; i < BTC; i++) y[i] += proj[i];
        ref_layernorm(y, p + offset_of(P, ly->ln2_gamma), p + offset_of(P, ly->ln2_beta), N, C, eps);
    }

    /* head: first token, dense, tanh, dense */
    for (b = 0; b < B; b++)
        for (c = 0; c < C; c++) cls[(size_t)b * C + c] = hidden[(size_t)L * BTC + (size_t)b * T * C + c];
    ref_linear(pooled, cls, p + offset_of(P, m->pool_w), p + offset_of(P, m->pool_b), B, C, C);
    for (c = 0; c < B * C; c++) pooled[c] = tanh(pooled[c]);
    ref_linear(logits, pooled, p + offset_of(P, m->cls_w), p + offset_of(P, m->cls_b), B, C, V);

    free(qkv);
    free(att);
    free(proj);
    free(up);
    free(cls);
    free(pooled);
}

/* Mean cross-entropy of logits[B,V] against labels[B]. */
static double ref_cross_entropy(const double *logits, const int *labels, int B, int V)
{
    double total = 0.0;
    int b, v;
    for (b = 0; b < B; b++) {
        const double *row = logits + (size_t)b * V;
        double mx = row[0], sum = 0.0;
        for (v = 1; v < V; v++)
            if (row[v] > mx) mx = row[v];
        for (v = 0; v < V; v++) sum += exp(row[v] - mx);
        total += mx + log(sum) - row[labels[b]];
    }
    return total / B;
}

static double ref_model_loss(const codir_model *m, const double *p, const codir_batch *batch)
{
    size_t BTC = (size_t)batch->batch * batch->seq * m->cfg.hidden;
    double *hidden = alloc_doubles((size_t)(m->cfg.num_layers + 1) * BTC);
    double *logits = alloc_doubles((size_t)batch->batch * m->cfg.num_labels);
    double loss;
    ref_forward(m, p, batch, hidden, logits);
    loss = ref_cross_entropy(logits, batch->labels.data, batch->batch, m->cfg.num_labels);
    free(hidden);
    free(logits);
    return loss;
}

/* ---- 1. the whole model ---- */

static const int padded_examples[3] = {0, 1, 3}; /* lengths 6, 3 and 2: T = 6 */

static void test_forward_matches_reference(void)
{
    codir_config cfg = tiny_config(2, 8, 2, 16, 0.0f);
    codir_model *m = codir_model_create(&cfg, 11);
    codir_batch batch;
    codir_ctx ctx;
    codir_output out;
    toy_data toy;
    double *p, *hidden, *logits;
    int rc, l;
    size_t BTC;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    randomize_params(&m->params, 5);
    toy_init(&toy);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, padded_examples, 3)) goto done;

    codir_ctx_begin(&ctx, 0, 0, 0);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    CHECK(out.num_hidden == 3, "num_hidden %d, want 3", out.num_hidden);

    BTC = (size_t)batch.batch * batch.seq * cfg.hidden;
    p = params_to_doubles(&m->params);
    hidden = alloc_doubles(3 * BTC);
    logits = alloc_doubles((size_t)batch.batch * cfg.num_labels);
    ref_forward(m, p, &batch, hidden, logits);
    check_close("logits", out.logits->data, logits, (size_t)batch.batch * cfg.num_labels, 1e-5, 1e-4);
    /* Hidden states of real tokens; at padding positions the values are unspecified. */
    for (l = 0; l < 3; l++) {
        int b, t, ok = 1;
        for (b = 0; b < batch.batch && ok; b++)
            for (t = 0; t < batch.seq && ok; t++) {
                size_t at = ((size_t)b * batch.seq + t) * cfg.hidden;
                if (!batch.mask.data[b * batch.seq + t]) continue;
                ok = check_close("hidden state", out.hidden[l]->data + at, hidden + (size_t)l * BTC + at,
                                 (size_t)cfg.hidden, 1e-5, 1e-4);
                CHECK(ok, "hidden state differs at layer %d, example %d, token %d", l, b, t);
            }
    }
    free(p);
    free(hidden);
    free(logits);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_model_grad_check(void)
{
    codir_config cfg = tiny_config(2, 8, 2, 16, 0.0f);
    codir_model *m = codir_model_create(&cfg, 12);
    codir_batch batch;
    codir_ctx ctx;
    codir_output out;
    codir_tensor *loss;
    toy_data toy;
    double *p, *want, h = 1e-5, ref_loss;
    size_t i;
    int rc, ti;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    randomize_params(&m->params, 6);
    toy_init(&toy);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, padded_examples, 3)) goto done;

    /* Analytic gradient of the mean cross-entropy. */
    codir_ctx_begin(&ctx, 1, 0, 0);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    loss = codir_cross_entropy(&ctx, out.logits, &batch.labels);
    CHECK(loss != NULL, "codir_cross_entropy failed: %s", codir_last_error());
    if (!loss) goto done;
    codir_params_zero_grad(&m->params);
    rc = codir_backward(&ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());

    /* Central differences of the float64 reference loss, for every parameter. */
    p = params_to_doubles(&m->params);
    want = alloc_doubles(m->params.count);
    ref_loss = ref_model_loss(m, p, &batch);
    CHECK(fabs(loss->data[0] - ref_loss) <= 1e-5 + 1e-5 * fabs(ref_loss), "loss %.9g, float64 reference %.9g",
          (double)loss->data[0], ref_loss);
    for (i = 0; i < m->params.count; i++) {
        double saved = p[i], up, down;
        p[i] = saved + h;
        up = ref_model_loss(m, p, &batch);
        p[i] = saved - h;
        down = ref_model_loss(m, p, &batch);
        p[i] = saved;
        want[i] = (up - down) / (2.0 * h);
    }
    for (ti = 0; ti < m->params.num_tensors; ti++) {
        const codir_tensor *t = &m->params.tensors[ti];
        size_t off = offset_of(&m->params, t);
        check_close(t->name, t->grad, want + off, t->numel, 1e-5, 1e-4);
    }
    free(p);
    free(want);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_padding_keeps_logits(void)
{
    codir_config cfg = tiny_config(2, 8, 2, 16, 0.0f);
    codir_model *m = codir_model_create(&cfg, 13);
    codir_batch alone, padded;
    codir_ctx ctx_alone, ctx_padded;
    codir_output out_alone, out_padded;
    toy_data toy;
    static const int one[1] = {1};      /* length 3 */
    static const int with_long[2] = {2, 1}; /* lengths 8 and 3: example 1 gets 5 pads */
    double want[3 * 8];
    int rc, l, i;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    randomize_params(&m->params, 7);
    toy_init(&toy);
    codir_batch_init(&alone, 2, TOY_LEN);
    codir_batch_init(&padded, 2, TOY_LEN);
    codir_ctx_init(&ctx_alone, 1 << 16, 1);
    codir_ctx_init(&ctx_padded, 1 << 16, 1);
    if (!toy_batch(&alone, &toy, one, 1) || !toy_batch(&padded, &toy, with_long, 2)) goto done;
    CHECK(alone.seq == 3, "batch of example 1 alone has length %d, want 3", alone.seq);
    CHECK(padded.seq == 8, "batch with example 2 has length %d, want 8", padded.seq);
    CHECK(padded.mask.data[8 + 2] == 1, "mask of the last real token of example 1 is 0");
    CHECK(padded.mask.data[8 + 3] == 0, "mask of the first padding position of example 1 is 1");

    codir_ctx_begin(&ctx_alone, 0, 0, 0);
    codir_ctx_begin(&ctx_padded, 0, 0, 0);
    rc = codir_model_forward(&ctx_alone, m, &alone, &out_alone);
    rc |= codir_model_forward(&ctx_padded, m, &padded, &out_padded);
    CHECK(rc == CODIR_OK, "codir_model_forward failed: %s", codir_last_error());
    if (rc) goto done;

    /* Logits of example 1 with and without the five padding positions. */
    for (i = 0; i < 3; i++) want[i] = out_alone.logits->data[i];
    check_close("logits of the padded example", out_padded.logits->data + 3, want, 3, 1e-6, 1e-5);

    /* Hidden states of its three real tokens, at every layer. */
    for (l = 0; l <= cfg.num_layers; l++) {
        for (i = 0; i < 3 * 8; i++) want[i] = out_alone.hidden[l]->data[i];
        check_close("hidden states of real tokens", out_padded.hidden[l]->data + (size_t)8 * 8, want, 3 * 8, 1e-6, 1e-5);
    }
done:
    codir_ctx_free(&ctx_alone);
    codir_ctx_free(&ctx_padded);
    codir_batch_free(&alone);
    codir_batch_free(&padded);
    codir_model_free(m);
}

/* ---- 2. the contrastive term ---- */

/* Mean of x[b,t,:] over the real tokens, written to out[b, at .. at+C-1] of a row of width W. */
static void ref_mean_pool(double *out, int W, int at, const double *x, const int *mask, int B, int T, int C)
{
    int b, t, c;
    for (b = 0; b < B; b++) {
        int n = 0;
        for (c = 0; c < C; c++) out[(size_t)b * W + at + c] = 0.0;
        for (t = 0; t < T; t++) {
            if (!mask[b * T + t]) continue;
            n++;
            for (c = 0; c < C; c++) out[(size_t)b * W + at + c] += x[((size_t)b * T + t) * C + c];
        }
        for (c = 0; c < C; c++) out[(size_t)b * W + at + c] = n ? out[(size_t)b * W + at + c] / n : 0.0;
    }
}

/* z[B,D] = normalize(W f + b), as torch.nn.functional.normalize with eps 1e-12. */
static void ref_project(double *z, const double *f, const double *w, const double *bias, int B, int W, int D)
{
    int b, j;
    ref_linear(z, f, w, bias, B, W, D);
    for (b = 0; b < B; b++) {
        double ss = 0.0, nrm;
        for (j = 0; j < D; j++) ss += z[(size_t)b * D + j] * z[(size_t)b * D + j];
        nrm = sqrt(ss);
        if (nrm < 1e-12) nrm = 1e-12;
        for (j = 0; j < D; j++) z[(size_t)b * D + j] /= nrm;
    }
}

/* The contrastive loss of CoDIR in its InfoNCE form, from the hidden states of both
   models (layouts of ref_forward), the heads' values heads[d->params.count] and the
   negatives neg[B,K]. zt_out[B,D] receives the teacher projections when not NULL. */
static double ref_crd_loss(const codir_distiller *d, const double *heads, const double *hs, const double *ht,
                           const codir_batch *batch, const int *neg, int K, double *zt_out)
{
    int B = batch->batch, T = batch->seq, Ls = d->student_layers, Cs = d->student_hidden, Ct = d->teacher_hidden;
    int D = d->cfg.proj_dim, k, b, j, e;
    size_t s_stride = (size_t)B * T * Cs, t_stride = (size_t)B * T * Ct;
    double *fs = alloc_doubles((size_t)B * Ls * Cs), *ft = alloc_doubles((size_t)B * Ls * Ct);
    double *zs = alloc_doubles((size_t)B * D), *zt = alloc_doubles((size_t)B * D), *x = alloc_doubles((size_t)K + 1);
    double tau = (double)d->cfg.tau, total = 0.0;

    /* Pool student layer k and its mapped teacher layer; concatenate along features. */
    for (k = 0; k < Ls; k++) {
        int mapped = (k * d->teacher_layers) / Ls + 1;
        ref_mean_pool(fs, Ls * Cs, k * Cs, hs + (size_t)(k + 1) * s_stride, batch->mask.data, B, T, Cs);
        ref_mean_pool(ft, Ls * Ct, k * Ct, ht + (size_t)mapped * t_stride, batch->mask.data, B, T, Ct);
    }
    ref_project(zs, fs, heads + offset_of(&d->params, d->proj_s_w), heads + offset_of(&d->params, d->proj_s_b), B,
                Ls * Cs, D);
    ref_project(zt, ft, heads + offset_of(&d->params, d->proj_t_w), heads + offset_of(&d->params, d->proj_t_b), B,
                Ls * Ct, D);

    /* InfoNCE: the positive is the teacher projection, the negatives bank rows. */
    for (b = 0; b < B; b++) {
        double mx = -INFINITY, sum = 0.0;
        for (j = 0; j <= K; j++) {
            double s = 0.0;
            for (e = 0; e < D; e++) {
                double other = j == 0 ? zt[(size_t)b * D + e] : (double)d->bank[(size_t)neg[b * K + j - 1] * D + e];
                s += zs[(size_t)b * D + e] * other;
            }
            x[j] = s / tau;
            if (x[j] > mx) mx = x[j];
        }
        for (j = 0; j <= K; j++) sum += exp(x[j] - mx);
        total += mx + log(sum) - x[0];
    }
    if (zt_out) memcpy(zt_out, zt, (size_t)B * D * sizeof(double));
    free(fs);
    free(ft);
    free(zs);
    free(zt);
    free(x);
    return total / B;
}

/* A 3-layer teacher (hidden 12), a 2-layer student (hidden 8) and a distiller over the
   toy labels with D = 6 and K = 4. */
typedef struct crd_setup {
    codir_config scfg, tcfg;
    codir_model *student, *teacher;
    codir_distiller *d;
    toy_data toy;
    codir_batch batch;
    codir_ctx ctx;
} crd_setup;

static int crd_setup_init(crd_setup *s, float dropout, float lambda)
{
    codir_distill_config dcfg = codir_distill_config_default();
    memset(s, 0, sizeof *s);
    s->scfg = tiny_config(2, 8, 2, 16, dropout);
    s->tcfg = tiny_config(3, 12, 2, 16, 0.0f);
    dcfg.proj_dim = 6;
    dcfg.num_negatives = 4;
    dcfg.lambda = lambda;
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
    return s->student && s->teacher && s->d;
}

static void crd_setup_free(crd_setup *s)
{
    codir_ctx_free(&s->ctx);
    codir_batch_free(&s->batch);
    codir_distiller_free(s->d);
    codir_model_free(s->student);
    codir_model_free(s->teacher);
}

static void test_crd_layer_map(void)
{
    codir_distill_config dcfg = codir_distill_config_default();
    codir_config s = tiny_config(2, 8, 2, 16, 0.0f), t = tiny_config(3, 8, 2, 16, 0.0f);
    static const int labels[4] = {0, 1, 0, 1};
    static const int custom[2] = {3, 1};
    codir_distiller *d;
    int k;
    dcfg.proj_dim = 4;

    /* 3 -> 2 and 12 -> 6 with the default rule m(k) = (k - 1) * Lt / Ls + 1. */
    d = codir_distiller_create(&dcfg, &s, &t, labels, 4, 1);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (d)
        for (k = 1; k <= 2; k++)
            CHECK(d->layer_map[k - 1] == (k - 1) * 3 / 2 + 1, "3 -> 2: student layer %d maps to %d, want %d", k,
                  d->layer_map[k - 1], (k - 1) * 3 / 2 + 1);
    codir_distiller_free(d);
    s.num_layers = 6;
    t.num_layers = 12;
    d = codir_distiller_create(&dcfg, &s, &t, labels, 4, 1);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (d)
        for (k = 1; k <= 6; k++)
            CHECK(d->layer_map[k - 1] == 2 * k - 1, "12 -> 6: student layer %d maps to %d, want %d", k,
                  d->layer_map[k - 1], 2 * k - 1);
    codir_distiller_free(d);

    /* A given map is used as is, and one outside 1..Lt is rejected. */
    s.num_layers = 2;
    t.num_layers = 3;
    dcfg.layer_map = custom;
    d = codir_distiller_create(&dcfg, &s, &t, labels, 4, 1);
    CHECK(d != NULL, "codir_distiller_create rejected the layer map {3, 1}: %s", codir_last_error());
    if (d) CHECK(d->layer_map[0] == 3, "custom map: student layer 1 maps to %d, want 3", d->layer_map[0]);
    if (d) CHECK(d->layer_map[1] == 1, "custom map: student layer 2 maps to %d, want 1", d->layer_map[1]);
    codir_distiller_free(d);
    t.num_layers = 2;
    d = codir_distiller_create(&dcfg, &s, &t, labels, 4, 1);
    CHECK(d == NULL, "layer map entry 3 of a 2-layer teacher was accepted");
    CHECK(strstr(codir_last_error(), "layer map") != NULL, "error does not name the layer map: %s", codir_last_error());
    codir_distiller_free(d);
}

/* Runs teacher (no tape) and student (recorded, no dropout) like codir_distill_step,
   then the contrastive loss. neg[B,K] receives the negatives it drew, replayed from
   the sampler state, and *K their count per example. */
static codir_tensor *crd_forward(crd_setup *s, codir_output *so, codir_output *to, codir_tensor **zt, int *neg, int *K)
{
    codir_tensor *loss;
    uint64_t before, after;
    int b, drawn = s->d->cfg.num_negatives;
    codir_ctx_begin(&s->ctx, 0, 0, 0);
    if (codir_model_forward(&s->ctx, s->teacher, &s->batch, to)) return NULL;
    s->ctx.recording = 1;
    if (codir_model_forward(&s->ctx, s->student, &s->batch, so)) return NULL;
    before = s->d->rng;
    loss = codir_crd_loss(&s->ctx, s->d, so, to, &s->batch, zt);
    after = s->d->rng;

    /* Every pool here has at least 5 examples, so each row has K = 4 negatives. */
    s->d->rng = before;
    for (b = 0; b < s->batch.batch; b++) {
        int n = codir_sample_negatives(s->d, s->batch.example_ids.data[b], neg + b * drawn, drawn);
        CHECK(n == drawn, "replayed sampler drew %d negatives, want %d", n, drawn);
    }
    CHECK(s->d->rng == after, "replaying the sampler did not reproduce the loss's draws");
    *K = drawn;
    return loss;
}

static const int crd_examples[4] = {0, 1, 2, 3}; /* lengths 6, 3, 8, 2; labels 0, 1, 2, 0 */

static void test_crd_loss_matches_reference(void)
{
    crd_setup s;
    codir_output so, to;
    codir_tensor *loss, *zt = NULL;
    int neg[4 * 4], K = 0, B = 4;
    double *ps, *pt, *heads, *hs, *ht, *want_zt, want;
    if (!crd_setup_init(&s, 0.0f, 0.1f)) goto done;
    randomize_params(&s.student->params, 31);
    randomize_params(&s.teacher->params, 32);
    if (!toy_batch(&s.batch, &s.toy, crd_examples, B)) goto done;
    loss = crd_forward(&s, &so, &to, &zt, neg, &K);
    CHECK(loss != NULL, "codir_crd_loss failed: %s", codir_last_error());
    CHECK(zt != NULL, "codir_crd_loss did not return the teacher projections");
    if (!loss || !zt) goto done;

    ps = params_to_doubles(&s.student->params);
    pt = params_to_doubles(&s.teacher->params);
    heads = params_to_doubles(&s.d->params);
    hs = alloc_doubles((size_t)3 * B * s.batch.seq * 8);
    ht = alloc_doubles((size_t)4 * B * s.batch.seq * 12);
    want_zt = alloc_doubles((size_t)B * 6);
    {
        double logits[4 * 3];
        ref_forward(s.student, ps, &s.batch, hs, logits);
        ref_forward(s.teacher, pt, &s.batch, ht, logits);
    }
    want = ref_crd_loss(s.d, heads, hs, ht, &s.batch, neg, K, want_zt);
    CHECK(fabs(loss->data[0] - want) <= 1e-4 + 1e-4 * fabs(want), "contrastive loss %.9g, float64 reference %.9g",
          (double)loss->data[0], want);
    check_close("teacher projections", zt->data, want_zt, (size_t)B * 6, 1e-5, 1e-4);
    free(ps);
    free(pt);
    free(heads);
    free(hs);
    free(ht);
    free(want_zt);
done:
    crd_setup_free(&s);
}

/* The reference contrastive loss with the given student and head values. */
static double crd_ref_at(const crd_setup *s, const double *ps, const double *ht, const double *heads, const int *neg, int K)
{
    size_t n = (size_t)3 * s->batch.batch * s->batch.seq * 8;
    double *hs = alloc_doubles(n), logits[TOY_COUNT * 3], loss;
    ref_forward(s->student, ps, &s->batch, hs, logits);
    loss = ref_crd_loss(s->d, heads, hs, ht, &s->batch, neg, K, NULL);
    free(hs);
    return loss;
}

static void test_crd_grad_check(void)
{
    crd_setup s;
    codir_output so, to;
    codir_tensor *loss, *zt = NULL;
    int neg[4 * 4], K = 0, B = 4, rc, ti, n = 0;
    double *ps, *pt, *heads, *ht, *want, h = 1e-5;
    float *got;
    size_t i;
    if (!crd_setup_init(&s, 0.0f, 0.1f)) goto done;
    randomize_params(&s.student->params, 41);
    randomize_params(&s.teacher->params, 42);
    if (!toy_batch(&s.batch, &s.toy, crd_examples, B)) goto done;
    loss = crd_forward(&s, &so, &to, &zt, neg, &K);
    CHECK(loss != NULL, "codir_crd_loss failed: %s", codir_last_error());
    if (!loss) goto done;
    codir_params_zero_grad(&s.student->params);
    codir_params_zero_grad(&s.teacher->params);
    codir_params_zero_grad(&s.d->params);
    rc = codir_backward(&s.ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());

    ps = params_to_doubles(&s.student->params);
    pt = params_to_doubles(&s.teacher->params);
    heads = params_to_doubles(&s.d->params);
    ht = alloc_doubles((size_t)4 * B * s.batch.seq * 12);
    {
        double logits[4 * 3];
        ref_forward(s.teacher, pt, &s.batch, ht, logits);
    }

    /* Both projection heads, every value. */
    want = alloc_doubles(s.d->params.count);
    for (i = 0; i < s.d->params.count; i++) {
        double saved = heads[i], up, down;
        heads[i] = saved + h;
        up = crd_ref_at(&s, ps, ht, heads, neg, K);
        heads[i] = saved - h;
        down = crd_ref_at(&s, ps, ht, heads, neg, K);
        heads[i] = saved;
        want[i] = (up - down) / (2.0 * h);
    }
    for (ti = 0; ti < s.d->params.num_tensors; ti++) {
        const codir_tensor *t = &s.d->params.tensors[ti];
        check_close(t->name, t->grad, want + offset_of(&s.d->params, t), t->numel, 1e-4, 1e-4);
    }
    free(want);

    /* The student backbone, three values of every tensor: the gradient passes through
       the masked mean pooling into the mapped layers. */
    want = alloc_doubles((size_t)3 * s.student->params.num_tensors);
    got = (float *)test_alloc((size_t)3 * s.student->params.num_tensors * sizeof(float));
    for (ti = 0; ti < s.student->params.num_tensors; ti++) {
        const codir_tensor *t = &s.student->params.tensors[ti];
        size_t picks[3], j;
        picks[0] = t->numel / 3;
        picks[1] = t->numel / 2;
        picks[2] = t->numel - 1;
        if (t == s.student->tok_emb) {
            /* rows of tokens that occur in the batch */
            picks[0] = (size_t)s.batch.ids.data[0] * 8 + 1;
            picks[1] = (size_t)s.batch.ids.data[1] * 8 + 5;
            picks[2] = (size_t)s.batch.ids.data[s.batch.seq] * 8 + 7;
        }
        for (j = 0; j < 3; j++) {
            size_t at = offset_of(&s.student->params, t) + picks[j];
            double saved = ps[at], up, down;
            ps[at] = saved + h;
            up = crd_ref_at(&s, ps, ht, heads, neg, K);
            ps[at] = saved - h;
            down = crd_ref_at(&s, ps, ht, heads, neg, K);
            ps[at] = saved;
            want[n] = (up - down) / (2.0 * h);
            got[n++] = t->grad[picks[j]];
        }
    }
    check_close("student backbone gradient", got, want, (size_t)n, 1e-5, 1e-4);

    /* The teacher backbone is frozen: it ran without a tape. */
    for (i = 0; i < s.teacher->params.count; i++)
        if (s.teacher->params.grad[i] != 0.0f) break;
    CHECK(i == s.teacher->params.count, "teacher parameter %zu received gradient %g", i,
          i < s.teacher->params.count ? (double)s.teacher->params.grad[i] : 0.0);
    free(want);
    free(got);
    free(ps);
    free(pt);
    free(heads);
    free(ht);
done:
    crd_setup_free(&s);
}

/* ---- 3. negative sampler ---- */

#define SAMPLER_N 30

/* 30 examples with labels 0..3 drawn at random and one example with label 5. */
static codir_distiller *sampler_distiller(int *labels)
{
    codir_distill_config dcfg = codir_distill_config_default();
    codir_config s = tiny_config(1, 8, 2, 16, 0.0f);
    unsigned long long rng = 17;
    int i;
    dcfg.proj_dim = 4;
    for (i = 0; i < SAMPLER_N; i++) labels[i] = (int)check_uniform(&rng, 0.0, 4.0);
    labels[7] = 5;
    return codir_distiller_create(&dcfg, &s, &s, labels, SAMPLER_N, 3);
}

static int pool_size(const int *labels, int anchor)
{
    int i, n = 0;
    for (i = 0; i < SAMPLER_N; i++) n += labels[i] != labels[anchor];
    return n;
}

static void test_sampler_excludes_anchor_label(void)
{
    int labels[SAMPLER_N], out[5], anchor, rep, j, bad = 0;
    codir_distiller *d = sampler_distiller(labels);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!d) return;
    for (anchor = 0; anchor < SAMPLER_N && !bad; anchor++)
        for (rep = 0; rep < 200 && !bad; rep++) {
            int n = codir_sample_negatives(d, anchor, out, 5);
            CHECK(n == 5, "anchor %d: drew %d negatives, want 5", anchor, n);
            for (j = 0; j < n && !bad; j++) {
                bad = out[j] < 0 || out[j] >= SAMPLER_N || out[j] == anchor || labels[out[j]] == labels[anchor];
                CHECK(!bad, "anchor %d (label %d): negative %d is example %d with label %d", anchor, labels[anchor], j,
                      out[j], out[j] >= 0 && out[j] < SAMPLER_N ? labels[out[j]] : -1);
            }
        }
    codir_distiller_free(d);
}

static void test_sampler_draws_distinct(void)
{
    int labels[SAMPLER_N], out[8], anchor, rep, i, j, dup = 0;
    codir_distiller *d = sampler_distiller(labels);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!d) return;
    for (anchor = 0; anchor < SAMPLER_N && !dup; anchor++)
        for (rep = 0; rep < 200 && !dup; rep++) {
            int n = codir_sample_negatives(d, anchor, out, 8);
            for (i = 0; i < n && !dup; i++)
                for (j = i + 1; j < n && !dup; j++) {
                    dup = out[i] == out[j];
                    CHECK(!dup, "anchor %d: example %d drawn twice (positions %d and %d)", anchor, out[i], i, j);
                }
        }
    codir_distiller_free(d);
}

static void test_sampler_caps_at_pool(void)
{
    int labels[SAMPLER_N], out[100], anchor, j;
    codir_distiller *d = sampler_distiller(labels);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!d) return;
    for (anchor = 0; anchor < SAMPLER_N; anchor++) {
        int seen[SAMPLER_N], pool = pool_size(labels, anchor), covered = 0;
        int n = codir_sample_negatives(d, anchor, out, 100);
        CHECK(n == pool, "anchor %d: K = 100 drew %d, want the pool size %d", anchor, n, pool);
        memset(seen, 0, sizeof seen);
        for (j = 0; j < n; j++)
            if (out[j] >= 0 && out[j] < SAMPLER_N && labels[out[j]] != labels[anchor] && !seen[out[j]]) {
                seen[out[j]] = 1;
                covered++;
            }
        CHECK(covered == pool, "anchor %d: K = 100 covered %d of the %d eligible examples", anchor, covered, pool);
    }
    codir_distiller_free(d);
}

static void test_sampler_uniform(void)
{
    int labels[SAMPLER_N], out[3], counts[SAMPLER_N], i, j, rep, anchor = 0, pool, draws = 20000;
    double expected, chi2 = 0.0, bound;
    codir_distiller *d = sampler_distiller(labels);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!d) return;
    pool = pool_size(labels, anchor);
    memset(counts, 0, sizeof counts);
    for (rep = 0; rep < draws; rep++) {
        int n = codir_sample_negatives(d, anchor, out, 3);
        for (j = 0; j < n; j++)
            if (out[j] >= 0 && out[j] < SAMPLER_N) counts[out[j]]++;
    }

    /* Pearson's statistic over the eligible examples. With pool - 1 degrees of freedom
       its mean is about pool - 1 and its standard deviation sqrt(2 (pool - 1)), so the
       bound of 8 standard deviations fails only for a biased sampler. */
    expected = (double)draws * 3 / pool;
    for (i = 0; i < SAMPLER_N; i++)
        if (labels[i] != labels[anchor]) chi2 += (counts[i] - expected) * (counts[i] - expected) / expected;
    bound = (pool - 1) + 8.0 * sqrt(2.0 * (pool - 1));
    CHECK(chi2 < bound, "chi-square %.1f over %d eligible examples exceeds %.1f", chi2, pool, bound);
    for (i = 0; i < SAMPLER_N; i++)
        if (labels[i] != labels[anchor]) CHECK(counts[i] > 0, "eligible example %d was never drawn", i);
    codir_distiller_free(d);
}

/* ---- 4. memory bank ---- */

static void test_bank_update(void)
{
    int labels[SAMPLER_N], D = 4, B = 3, b, j, r;
    static const int ids[3] = {3, 0, 17};
    float z[3 * 4], *before;
    double want[3 * 4], m;
    unsigned long long rng = 5;
    codir_distiller *d = sampler_distiller(labels);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!d) return;
    m = (double)d->cfg.momentum;
    CHECK(m == 0.5, "default momentum %g, want 0.5", m);
    before = (float *)test_alloc((size_t)SAMPLER_N * D * sizeof(float));
    memcpy(before, d->bank, (size_t)SAMPLER_N * D * sizeof(float));
    for (j = 0; j < B * D; j++) z[j] = (float)check_uniform(&rng, -1.0, 1.0);

    /* row <- normalize(m row + (1 - m) z) */
    for (b = 0; b < B; b++) {
        double ss = 0.0;
        for (j = 0; j < D; j++) {
            want[b * D + j] = m * before[ids[b] * D + j] + (1.0 - m) * z[b * D + j];
            ss += want[b * D + j] * want[b * D + j];
        }
        for (j = 0; j < D; j++) want[b * D + j] /= sqrt(ss);
    }
    codir_bank_update(d, z, ids, B);
    for (b = 0; b < B; b++) check_close("bank row", d->bank + (size_t)ids[b] * D, want + b * D, (size_t)D, 1e-6, 1e-5);

    /* Rows outside the batch keep their bits. */
    for (r = 0; r < SAMPLER_N; r++) {
        if (r == ids[0] || r == ids[1] || r == ids[2]) continue;
        CHECK(memcmp(d->bank + (size_t)r * D, before + (size_t)r * D, (size_t)D * sizeof(float)) == 0,
              "bank row %d changed though it is not in the batch", r);
    }
    free(before);
    codir_distiller_free(d);
}

static void test_bank_gets_no_gradient(void)
{
    crd_setup s;
    codir_output so, to;
    codir_adamw opt;
    codir_tensor *loss, *zt = NULL;
    codir_loss_terms terms;
    int neg[4 * 4], K = 0, rc, r, b;
    size_t bank_bytes;
    float *before;
    if (!crd_setup_init(&s, 0.0f, 0.1f)) goto done;
    randomize_params(&s.student->params, 51);
    if (!toy_batch(&s.batch, &s.toy, crd_examples, 4)) goto done;
    bank_bytes = (size_t)TOY_COUNT * s.d->cfg.proj_dim * sizeof(float);

    /* The bank lies outside the parameter block that the optimizer walks. */
    CHECK(s.d->bank + (size_t)TOY_COUNT * s.d->cfg.proj_dim <= s.d->params.data ||
              s.d->bank >= s.d->params.data + s.d->params.count,
          "the memory bank overlaps the projection heads' parameters");
    before = (float *)test_alloc(bank_bytes);
    memcpy(before, s.d->bank, bank_bytes);

    /* Forward, backward and an AdamW step of the heads leave the bank unchanged. */
    loss = crd_forward(&s, &so, &to, &zt, neg, &K);
    CHECK(loss != NULL, "codir_crd_loss failed: %s", codir_last_error());
    if (!loss) goto free_before;
    codir_params_zero_grad(&s.d->params);
    rc = codir_backward(&s.ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());
    codir_adamw_init(&opt, &s.d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    codir_adamw_step(&opt, &s.d->params, 0.1f);
    codir_adamw_free(&opt);
    CHECK(memcmp(before, s.d->bank, bank_bytes) == 0, "backward or AdamW changed the memory bank");

    /* A full distillation step changes exactly the rows of its batch. */
    {
        codir_adamw opt_s, opt_h;
        codir_adamw_init(&opt_s, &s.student->params, 0.9f, 0.98f, 1e-6f, 0.1f);
        codir_adamw_init(&opt_h, &s.d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
        rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_s, &opt_h, &s.batch, 1e-3f, &terms);
        CHECK(rc == CODIR_OK, "codir_distill_step returned %d: %s", rc, codir_last_error());
        codir_adamw_free(&opt_s);
        codir_adamw_free(&opt_h);
    }
    for (r = 0; r < TOY_COUNT; r++) {
        int in_batch = 0, same;
        for (b = 0; b < 4; b++) in_batch |= crd_examples[b] == r;
        same = memcmp(before + (size_t)r * 6, s.d->bank + (size_t)r * 6, 6 * sizeof(float)) == 0;
        CHECK(same != in_batch, "bank row %d: %s after a step on examples 0..3", r, same ? "unchanged" : "changed");
    }
free_before:
    free(before);
done:
    crd_setup_free(&s);
}

/* ---- 5. AdamW and the learning-rate schedule ---- */

static void test_adamw_closed_form(void)
{
    codir_param_spec specs[2];
    codir_params params;
    codir_adamw opt;
    static const double lrs[5] = {1e-2, 2e-2, 5e-3, 1e-2, 3e-2};
    const double b1 = 0.9, b2 = 0.98, eps = 1e-6, wd = 0.1;
    double p[17], m[17], v[17];
    unsigned long long rng = 77;
    int step, rc;
    size_t i;
    memset(specs, 0, sizeof specs);
    specs[0].name = "w";
    specs[0].ndim = 2;
    specs[0].shape[0] = 3;
    specs[0].shape[1] = 4;
    specs[1].name = "b";
    specs[1].ndim = 1;
    specs[1].shape[0] = 5;
    specs[1].no_decay = 1;
    rc = codir_params_init(&params, specs, 2);
    CHECK(rc == CODIR_OK, "codir_params_init returned %d: %s", rc, codir_last_error());
    if (rc) return;
    rc = codir_adamw_init(&opt, &params, (float)b1, (float)b2, (float)eps, (float)wd);
    CHECK(rc == CODIR_OK, "codir_adamw_init returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    for (i = 0; i < 17; i++) {
        params.data[i] = (float)check_uniform(&rng, -1.0, 1.0);
        p[i] = params.data[i];
        m[i] = v[i] = 0.0;
    }

    for (step = 1; step <= 5; step++) {
        double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step), lr = lrs[step - 1];
        /* Gradients change scale from step to step; one is zero throughout. */
        for (i = 0; i < 17; i++) params.grad[i] = i == 4 ? 0.0f : (float)(check_uniform(&rng, -1.0, 1.0) * step * 0.3);

        /* torch.optim.AdamW: decoupled decay first, then the bias-corrected step with
           denom = sqrt(v) / sqrt(bc2) + eps and step size lr / bc1. */
        for (i = 0; i < 17; i++) {
            double g = params.grad[i];
            if (i < 12) p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            p[i] -= lr / bc1 * m[i] / (sqrt(v[i]) / sqrt(bc2) + eps);
        }
        codir_adamw_step(&opt, &params, (float)lr);
        if (!check_close("decayed tensor after an AdamW step", params.data, p, 12, 1e-6, 1e-5) ||
            !check_close("no_decay tensor after an AdamW step", params.data + 12, p + 12, 5, 1e-6, 1e-5)) {
            CHECK(0, "AdamW differs from the closed form at step %d", step);
            break;
        }
    }
    if (step > 5) CHECK(opt.step == 5, "optimizer step count %ld, want 5", opt.step);
    codir_adamw_free(&opt);
done:
    codir_params_free(&params);
}

/* Hugging Face get_linear_schedule_with_warmup: step / max(1, warmup) during warmup,
   then max(0, (total - step) / max(1, total - warmup)), times the peak rate. */
static double hf_linear_schedule(long step, long total, long warmup, double peak)
{
    if (step < warmup) return peak * (double)step / (double)(warmup > 1 ? warmup : 1);
    return peak * fmax(0.0, (double)(total - step) / (double)(total - warmup > 1 ? total - warmup : 1));
}

static void test_lr_schedule(void)
{
    static const long steps[9] = {0, 1, 3, 5, 6, 7, 50, 99, 100};
    static const long more[3] = {101, 150, 1000};
    float got[12];
    double want[12];
    int i;
    for (i = 0; i < 9; i++) {
        got[i] = codir_lr_schedule(steps[i], 100, 6, 1e-3f);
        want[i] = hf_linear_schedule(steps[i], 100, 6, 1e-3);
    }
    for (i = 0; i < 3; i++) {
        got[9 + i] = codir_lr_schedule(more[i], 100, 6, 1e-3f);
        want[9 + i] = hf_linear_schedule(more[i], 100, 6, 1e-3);
    }
    check_close("lr with 6 warmup steps of 100", got, want, 12, 1e-12, 1e-6);

    /* No warmup: the peak at step 0, then a straight line to 0. */
    for (i = 0; i < 9; i++) {
        got[i] = codir_lr_schedule(steps[i], 100, 0, 2e-4f);
        want[i] = hf_linear_schedule(steps[i], 100, 0, 2e-4);
    }
    check_close("lr without warmup", got, want, 9, 1e-12, 1e-6);
}

/* ---- 6. training steps ---- */

static int all_finite(const codir_loss_terms *t)
{
    return isfinite(t->total) && isfinite(t->task) && isfinite(t->kd) && isfinite(t->crd);
}

static void test_task_step_lowers_loss(void)
{
    codir_config cfg = tiny_config(2, 8, 2, 16, 0.1f);
    codir_model *m = codir_model_create(&cfg, 61);
    codir_adamw opt;
    codir_batch batch;
    codir_ctx ctx;
    codir_loss_terms terms;
    toy_data toy;
    double first = 0.0, last = 0.0;
    int step, rc = CODIR_OK;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    toy_init(&toy);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    codir_adamw_init(&opt, &m->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    if (!toy_batch(&batch, &toy, crd_examples, 4)) goto done;
    for (step = 0; step < 20 && rc == CODIR_OK; step++) {
        rc = codir_task_step(&ctx, m, &opt, &batch, 1e-2f, &terms);
        CHECK(rc == CODIR_OK, "step %d: codir_task_step returned %d: %s", step, rc, codir_last_error());
        CHECK(all_finite(&terms), "step %d: a loss term is not finite", step);
        if (step == 0) first = terms.task;
        last = terms.task;
    }
    CHECK(last < 0.5 * first, "task loss went from %.4f to %.4f in 20 steps", first, last);
done:
    codir_adamw_free(&opt);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_distill_step_lowers_loss(void)
{
    crd_setup s;
    codir_adamw opt_s, opt_h;
    codir_loss_terms terms, first;
    int step, rc = CODIR_OK;
    memset(&opt_s, 0, sizeof opt_s);
    memset(&opt_h, 0, sizeof opt_h);
    memset(&first, 0, sizeof first);
    if (!crd_setup_init(&s, 0.1f, 0.1f)) goto done;
    randomize_params(&s.teacher->params, 62);
    codir_adamw_init(&opt_s, &s.student->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    codir_adamw_init(&opt_h, &s.d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    if (!toy_batch(&s.batch, &s.toy, crd_examples, 4)) goto done;
    for (step = 0; step < 20 && rc == CODIR_OK; step++) {
        rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_s, &opt_h, &s.batch, 1e-2f, &terms);
        CHECK(rc == CODIR_OK, "step %d: codir_distill_step returned %d: %s", step, rc, codir_last_error());
        CHECK(all_finite(&terms), "step %d: a loss term is not finite", step);
        CHECK(fabs(terms.total - (0.5 * terms.task + 0.5 * terms.kd + 0.1 * terms.crd)) <= 1e-5 + 1e-5 * fabs(terms.total),
              "step %d: total %.7g is not 0.5 task + 0.5 KD + 0.1 contrastive", step, terms.total);
        if (step == 0) first = terms;
    }
    CHECK(terms.total < 0.8 * first.total, "total loss went from %.4f to %.4f in 20 steps", first.total, terms.total);
    CHECK(terms.crd < 0.8 * first.crd, "contrastive loss went from %.4f to %.4f in 20 steps", first.crd, terms.crd);
done:
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    crd_setup_free(&s);
}

/* Bitwise equality of two float arrays; NaN equals the same NaN. */
static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static void test_task_step_rejects_nan(void)
{
    codir_config cfg = tiny_config(2, 8, 2, 16, 0.1f);
    codir_model *m = codir_model_create(&cfg, 63);
    codir_adamw opt;
    codir_batch batch;
    codir_ctx ctx;
    codir_loss_terms terms;
    toy_data toy;
    float *before, *m_before;
    int rc;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    toy_init(&toy);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    codir_adamw_init(&opt, &m->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    before = (float *)test_alloc(m->params.count * sizeof(float));
    m_before = (float *)test_alloc(m->params.count * sizeof(float));
    if (!toy_batch(&batch, &toy, crd_examples, 4)) goto done;
    rc = codir_task_step(&ctx, m, &opt, &batch, 1e-2f, &terms);
    CHECK(rc == CODIR_OK, "first step returned %d: %s", rc, codir_last_error());

    m->layers[1].ffn_up_w->data[3] = NAN;
    memcpy(before, m->params.data, m->params.count * sizeof(float));
    memcpy(m_before, opt.m, m->params.count * sizeof(float));
    codir_clear_error();
    rc = codir_task_step(&ctx, m, &opt, &batch, 1e-2f, &terms);
    CHECK(rc == CODIR_ERR_NONFINITE, "step with a NaN parameter returned %d, want CODIR_ERR_NONFINITE", rc);
    CHECK(strstr(codir_last_error(), "step 1") != NULL, "error does not name step 1: \"%s\"", codir_last_error());
    CHECK(strstr(codir_last_error(), "task loss") != NULL, "error does not name the task loss: \"%s\"",
          codir_last_error());
    CHECK(same_bits(before, m->params.data, m->params.count), "parameters changed in the rejected step");
    CHECK(same_bits(m_before, opt.m, m->params.count), "AdamW moments changed in the rejected step");
    CHECK(opt.step == 1, "optimizer step count %ld after a rejected step, want 1", opt.step);
done:
    free(before);
    free(m_before);
    codir_adamw_free(&opt);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_distill_step_rejects_nan(void)
{
    crd_setup s;
    codir_adamw opt_s, opt_h;
    codir_loss_terms terms;
    float *student_before, *heads_before, *bank_before;
    size_t bank_n;
    int rc;
    memset(&opt_s, 0, sizeof opt_s);
    memset(&opt_h, 0, sizeof opt_h);
    if (!crd_setup_init(&s, 0.1f, 0.1f)) {
        crd_setup_free(&s);
        return;
    }
    bank_n = (size_t)TOY_COUNT * s.d->cfg.proj_dim;
    codir_adamw_init(&opt_s, &s.student->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    codir_adamw_init(&opt_h, &s.d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    student_before = (float *)test_alloc(s.student->params.count * sizeof(float));
    heads_before = (float *)test_alloc(s.d->params.count * sizeof(float));
    bank_before = (float *)test_alloc(bank_n * sizeof(float));
    if (!toy_batch(&s.batch, &s.toy, crd_examples, 4)) goto done;

    /* A NaN in the student's projection head reaches only the contrastive term. */
    s.d->proj_s_w->data[2] = NAN;
    memcpy(student_before, s.student->params.data, s.student->params.count * sizeof(float));
    memcpy(heads_before, s.d->params.data, s.d->params.count * sizeof(float));
    memcpy(bank_before, s.d->bank, bank_n * sizeof(float));
    rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_s, &opt_h, &s.batch, 1e-2f, &terms);
    CHECK(rc == CODIR_ERR_NONFINITE, "step with a NaN head weight returned %d, want CODIR_ERR_NONFINITE", rc);
    CHECK(strstr(codir_last_error(), "step 0") != NULL, "error does not name step 0: \"%s\"", codir_last_error());
    CHECK(strstr(codir_last_error(), "contrastive") != NULL, "error does not name the contrastive loss: \"%s\"",
          codir_last_error());
    CHECK(same_bits(student_before, s.student->params.data, s.student->params.count),
          "student parameters changed in the rejected step");
    CHECK(same_bits(heads_before, s.d->params.data, s.d->params.count), "head parameters changed in the rejected step");
    CHECK(same_bits(bank_before, s.d->bank, bank_n), "memory bank changed in the rejected step");
    CHECK(opt_s.step == 0, "student optimizer at step %ld after a rejected step, want 0", opt_s.step);
    CHECK(opt_h.step == 0, "head optimizer at step %ld after a rejected step, want 0", opt_h.step);

    /* A NaN in the student backbone shows first in the task term. */
    s.d->proj_s_w->data[2] = 0.0f;
    s.student->layers[0].qkv_b->data[1] = NAN;
    codir_clear_error();
    rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_s, &opt_h, &s.batch, 1e-2f, &terms);
    CHECK(rc == CODIR_ERR_NONFINITE, "step with a NaN student bias returned %d, want CODIR_ERR_NONFINITE", rc);
    CHECK(strstr(codir_last_error(), "task loss") != NULL, "error does not name the task loss: \"%s\"",
          codir_last_error());
    CHECK(opt_s.step == 0, "student optimizer at step %ld after a rejected step, want 0", opt_s.step);
    CHECK(opt_h.step == 0, "head optimizer at step %ld after a rejected step, want 0", opt_h.step);
done:
    free(student_before);
    free(heads_before);
    free(bank_before);
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    crd_setup_free(&s);
}

/* ---- 7. arena, parameter table, configuration ---- */

static void test_arena_growth_and_peak(void)
{
    codir_arena arena;
    unsigned char *ptrs[11];
    size_t sizes[11], expected_peak = 0;
    int i, round, rc;
    rc = codir_arena_init(&arena, 1000);
    CHECK(rc == CODIR_OK, "codir_arena_init returned %d: %s", rc, codir_last_error());
    if (rc) return;
    CHECK(arena.size == 1024, "a 1000-byte arena holds %zu bytes, want 1024 (rounded to 64)", arena.size);
    for (i = 0; i < 11; i++) {
        sizes[i] = i == 0 ? 3 : 500;
        expected_peak += (sizes[i] + 63) / 64 * 64;
    }

    /* The same requests twice: the first round overflows the 1024-byte block, the
       second fits in the block that the reset sized from the peak. */
    for (round = 0; round < 2; round++) {
        for (i = 0; i < 11; i++) {
            ptrs[i] = (unsigned char *)codir_arena_alloc(&arena, sizes[i]);
            CHECK(ptrs[i] != NULL, "round %d: allocation %d failed: %s", round, i, codir_last_error());
            if (!ptrs[i]) goto done;
            CHECK((uintptr_t)ptrs[i] % 64 == 0, "round %d: allocation %d at %p is not 64-byte aligned", round, i,
                  (void *)ptrs[i]);
            memset(ptrs[i], i + 1, sizes[i]);
        }
        for (i = 0; i < 11; i++) {
            size_t k;
            for (k = 0; k < sizes[i] && ptrs[i][k] == (unsigned char)(i + 1); k++) continue;
            CHECK(k == sizes[i], "round %d: allocation %d was overwritten at byte %zu", round, i, k);
        }
        CHECK(codir_arena_peak(&arena) == expected_peak, "round %d: peak %zu bytes, want %zu", round,
              codir_arena_peak(&arena), expected_peak);
        if (round == 0) CHECK(arena.extra != NULL, "requests beyond the 1024-byte block did not take an extra block");
        if (round == 1) CHECK(arena.extra == NULL, "the reset block of %zu bytes still needed an extra block", arena.size);
        codir_arena_reset(&arena);
        CHECK(arena.extra == NULL, "round %d: extra blocks remain after reset", round);
        CHECK(arena.used == 0, "round %d: %zu bytes in use after reset", round, arena.used);
        CHECK(arena.size >= expected_peak, "after reset the block holds %zu bytes, below the peak %zu", arena.size,
              expected_peak);
    }

    /* A request near SIZE_MAX fails cleanly. */
    CHECK(codir_arena_alloc(&arena, SIZE_MAX - 8) == NULL, "a request of SIZE_MAX - 8 bytes succeeded");
    CHECK(codir_arena_peak(&arena) == expected_peak, "a failed request moved the peak to %zu", codir_arena_peak(&arena));
done:
    codir_arena_free(&arena);
}

/* Rewinding gives back the main-block bytes and the extra blocks taken after the mark.
   The data before the mark survives. The next reset sizes the block from the peak,
   which the rewound pass raised only while it ran. */
static void test_arena_rewind(void)
{
    codir_arena arena;
    codir_arena_pos mark;
    unsigned char *before, *after;
    int i, rc = codir_arena_init(&arena, 1024);
    CHECK(rc == CODIR_OK, "codir_arena_init returned %d: %s", rc, codir_last_error());
    if (rc) return;
    before = (unsigned char *)codir_arena_alloc(&arena, 256);
    CHECK(before != NULL, "first allocation failed: %s", codir_last_error());
    if (!before) goto done;
    memset(before, 0xAB, 256);

    /* Main block only. */
    mark = codir_arena_mark(&arena);
    CHECK(codir_arena_alloc(&arena, 512) != NULL, "allocation after the mark failed");
    codir_arena_rewind(&arena, mark);
    CHECK(arena.used == 256, "after a rewind in the main block %zu bytes are used, want 256", arena.used);

    /* Into extra blocks: ten requests of 500 bytes overflow the 1024-byte block. */
    for (i = 0; i < 10; i++) CHECK(codir_arena_alloc(&arena, 500) != NULL, "extra allocation %d failed", i);
    CHECK(arena.extra != NULL, "the requests did not take an extra block");
    codir_arena_rewind(&arena, mark);
    CHECK(arena.extra == NULL, "extra blocks remain after rewinding to a mark taken before them");
    CHECK(arena.used == 256, "after the rewind %zu bytes are used, want 256", arena.used);
    CHECK(arena.extra_used == 0, "after the rewind %zu extra bytes are used, want 0", arena.extra_used);
    for (i = 0; i < 256 && before[i] == 0xAB; i++) continue;
    CHECK(i == 256, "data allocated before the mark was overwritten at byte %d", i);

    /* The same bytes are handed out again, and the peak of the step counts them once. */
    after = (unsigned char *)codir_arena_alloc(&arena, 512);
    CHECK(after == before + 256, "the first allocation after the rewind is not where the mark was");
    CHECK(codir_arena_peak(&arena) == 256 + 10 * 512, "peak %zu bytes, want %d", codir_arena_peak(&arena), 256 + 10 * 512);
    codir_arena_reset(&arena);
    CHECK(arena.size >= (size_t)(256 + 10 * 512), "after reset the block holds %zu bytes, below the peak", arena.size);
done:
    codir_arena_free(&arena);
}

static void test_params_contiguous(void)
{
    codir_param_spec specs[3];
    codir_params params;
    size_t i;
    int rc, t;
    memset(specs, 0, sizeof specs);
    specs[0].name = "a";
    specs[0].ndim = 2;
    specs[0].shape[0] = 2;
    specs[0].shape[1] = 3;
    specs[1].name = "bias";
    specs[1].ndim = 1;
    specs[1].shape[0] = 5;
    specs[1].no_decay = 1;
    specs[2].name = "c";
    specs[2].ndim = 3;
    specs[2].shape[0] = 4;
    specs[2].shape[1] = 1;
    specs[2].shape[2] = 2;
    rc = codir_params_init(&params, specs, 3);
    CHECK(rc == CODIR_OK, "codir_params_init returned %d: %s", rc, codir_last_error());
    if (rc) return;
    CHECK(params.count == 6 + 5 + 8, "count %zu, want 19", params.count);
    CHECK(params.tensors[0].data == params.data, "the first tensor does not start the value block");
    CHECK(params.tensors[0].grad == params.grad, "the first tensor does not start the gradient block");
    for (t = 1; t < 3; t++) {
        const codir_tensor *prev = &params.tensors[t - 1], *cur = &params.tensors[t];
        CHECK(cur->data == prev->data + prev->numel, "tensor %d data does not follow tensor %d", t, t - 1);
        CHECK(cur->grad == prev->grad + prev->numel, "tensor %d gradient does not follow tensor %d", t, t - 1);
    }
    CHECK(params.tensors[2].numel == 8, "tensor c has %zu values, want 8", params.tensors[2].numel);
    CHECK(params.tensors[2].shape[3] == 1, "tensor c has unused dimension %d, want 1", params.tensors[2].shape[3]);
    CHECK(params.tensors[1].no_decay == 1, "no_decay of \"bias\" was not copied");
    CHECK(params.tensors[0].no_decay == 0, "tensor \"a\" has no_decay set");
    CHECK(codir_params_find(&params, "bias") == &params.tensors[1], "codir_params_find(\"bias\") is wrong");
    CHECK(codir_params_find(&params, "missing") == NULL, "codir_params_find found a missing name");
    for (i = 0; i < params.count; i++)
        if (params.data[i] != 0.0f || params.grad[i] != 0.0f) break;
    CHECK(i == params.count, "value or gradient %zu is not zero after init", i);
    codir_params_free(&params);
}

static void test_params_overflow(void)
{
    codir_param_spec spec;
    codir_params params;
    int rc;
    memset(&spec, 0, sizeof spec);
    spec.name = "huge";
    spec.ndim = 4;
    spec.shape[0] = 1 << 30;
    spec.shape[1] = 1 << 30;
    spec.shape[2] = 1 << 30;
    spec.shape[3] = 8;
    rc = codir_params_init(&params, &spec, 1);
    CHECK(rc == CODIR_ERR_OVERFLOW, "shape {2^30, 2^30, 2^30, 8} returned %d, want CODIR_ERR_OVERFLOW", rc);
    CHECK(strstr(codir_last_error(), "huge") != NULL, "error does not name the parameter: \"%s\"", codir_last_error());
    CHECK(params.data == NULL, "a failed init left a parameter block behind");
    CHECK(params.count == 0, "a failed init left count %zu", params.count);

    /* 2^62 floats: the element count fits in 64 bits but the byte count does not. */
    spec.ndim = 3;
    spec.shape[2] = 4;
    spec.shape[3] = 1;
    rc = codir_params_init(&params, &spec, 1);
    CHECK(rc == CODIR_ERR_OVERFLOW, "shape {2^30, 2^30, 4} (2^64 bytes) returned %d, want CODIR_ERR_OVERFLOW", rc);
    codir_params_free(&params);

    spec.ndim = 2;
    spec.shape[0] = -3;
    rc = codir_params_init(&params, &spec, 1);
    CHECK(rc == CODIR_ERR_INVALID, "a negative dimension returned %d, want CODIR_ERR_INVALID", rc);
}

static void test_config_check(void)
{
    codir_config good = tiny_config(2, 8, 2, 16, 0.1f), cfg;
    int rc = codir_config_check(&good);
    CHECK(rc == CODIR_OK, "a valid configuration was rejected: %s", codir_last_error());

#define EXPECT_REJECTED(field, value, word)                                                                      \
    do {                                                                                                         \
        cfg = good;                                                                                              \
        cfg.field = value;                                                                                       \
        codir_clear_error();                                                                                     \
        rc = codir_config_check(&cfg);                                                                           \
        CHECK(rc == CODIR_ERR_INVALID, #field " = " #value " returned %d, want CODIR_ERR_INVALID", rc);          \
        CHECK(strstr(codir_last_error(), word) != NULL, #field " = " #value ": error does not name " word ": \"%s\"", \
              codir_last_error());                                                                               \
        CHECK(codir_model_create(&cfg, 1) == NULL, "codir_model_create accepted " #field " = " #value);          \
    } while (0)

    EXPECT_REJECTED(num_heads, 3, "num_heads");
    EXPECT_REJECTED(num_heads, 0, "num_heads");
    EXPECT_REJECTED(num_layers, 0, "num_layers");
    EXPECT_REJECTED(hidden, -8, "hidden");
    EXPECT_REJECTED(ffn, -1, "ffn");
    EXPECT_REJECTED(vocab_size, -20, "vocab_size");
    EXPECT_REJECTED(max_len, -1, "max_len");
    EXPECT_REJECTED(num_labels, 0, "num_labels");
    EXPECT_REJECTED(type_vocab_size, -2, "type_vocab_size");
    EXPECT_REJECTED(dropout, 1.5f, "dropout");
#undef EXPECT_REJECTED
}

/* ---- 8. dropout determinism ---- */

/* Forward with dropout at the given seed and step, then backward of the mean
   cross-entropy. logits[B*3] and grad[params.count] receive the results. */
static int dropout_run(codir_model *m, const codir_batch *batch, uint64_t seed, uint64_t step, float *logits, float *grad)
{
    codir_ctx ctx;
    codir_output out;
    codir_tensor *loss;
    int rc = codir_ctx_init(&ctx, 1 << 16, seed);
    if (rc) return rc;
    codir_ctx_begin(&ctx, 1, 1, step);
    rc = codir_model_forward(&ctx, m, batch, &out);
    loss = rc ? NULL : codir_cross_entropy(&ctx, out.logits, &batch->labels);
    if (loss) {
        memcpy(logits, out.logits->data, out.logits->numel * sizeof(float));
        codir_params_zero_grad(&m->params);
        rc = codir_backward(&ctx, loss);
        memcpy(grad, m->params.grad, m->params.count * sizeof(float));
    } else if (!rc) {
        rc = ctx.status ? ctx.status : CODIR_ERR_INVALID;
    }
    codir_ctx_free(&ctx);
    return rc;
}

static const int all_examples[TOY_COUNT] = {0, 1, 2, 3, 4, 5, 6, 7};

static void test_dropout_seed_and_step(void)
{
    codir_config cfg = tiny_config(2, 8, 2, 16, 0.1f);
    codir_model *m = codir_model_create(&cfg, 71);
    codir_batch batch;
    toy_data toy;
    codir_ctx ctx;
    codir_output out;
    float a[TOY_COUNT * 3], b[TOY_COUNT * 3], eval[TOY_COUNT * 3], *ga = NULL, *gb = NULL;
    size_t nl = TOY_COUNT * 3;
    int rc;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    toy_init(&toy);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    if (!toy_batch(&batch, &toy, all_examples, TOY_COUNT)) goto done;
    ga = (float *)test_alloc(m->params.count * sizeof(float));
    gb = (float *)test_alloc(m->params.count * sizeof(float));

    rc = dropout_run(m, &batch, 5, 7, a, ga) | dropout_run(m, &batch, 5, 7, b, gb);
    CHECK(rc == CODIR_OK, "forward or backward failed: %s", codir_last_error());
    CHECK(same_bits(a, b, nl), "same seed and step gave different logits");
    CHECK(same_bits(ga, gb, m->params.count), "same seed and step gave different gradients");
    rc = dropout_run(m, &batch, 5, 8, b, gb);
    CHECK(rc == CODIR_OK, "forward or backward at step 8 failed: %s", codir_last_error());
    CHECK(!same_bits(a, b, nl), "step 7 and step 8 gave the same logits");
    rc = dropout_run(m, &batch, 6, 7, b, gb);
    CHECK(rc == CODIR_OK, "forward or backward with seed 6 failed: %s", codir_last_error());
    CHECK(!same_bits(a, b, nl), "seeds 5 and 6 gave the same logits");

    /* Evaluation mode turns dropout off. */
    codir_ctx_init(&ctx, 1 << 16, 5);
    codir_ctx_begin(&ctx, 0, 0, 7);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "evaluation forward failed: %s", codir_last_error());
    if (!rc) memcpy(eval, out.logits->data, nl * sizeof(float));
    codir_ctx_free(&ctx);
    if (!rc) CHECK(!same_bits(a, eval, nl), "training logits equal evaluation logits: dropout did nothing");
done:
    free(ga);
    free(gb);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_dropout_thread_count(void)
{
#ifdef _OPENMP
    codir_config cfg = tiny_config(2, 16, 2, 32, 0.1f);
    codir_model *m = codir_model_create(&cfg, 72);
    codir_batch batch;
    toy_data toy;
    float a[TOY_COUNT * 3], b[TOY_COUNT * 3], *ga = NULL, *gb = NULL;
    int threads = omp_get_max_threads(), rc;
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (!m) return;
    randomize_params(&m->params, 8);
    toy_init(&toy);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    if (!toy_batch(&batch, &toy, all_examples, TOY_COUNT)) goto done;
    ga = (float *)test_alloc(m->params.count * sizeof(float));
    gb = (float *)test_alloc(m->params.count * sizeof(float));
    omp_set_num_threads(1);
    rc = dropout_run(m, &batch, 9, 3, a, ga);
    omp_set_num_threads(2);
    rc |= dropout_run(m, &batch, 9, 3, b, gb);
    omp_set_num_threads(threads);
    CHECK(rc == CODIR_OK, "forward or backward failed: %s", codir_last_error());
    CHECK(same_bits(a, b, TOY_COUNT * 3), "1 and 2 threads gave different logits");
    CHECK(same_bits(ga, gb, m->params.count), "1 and 2 threads gave different gradients");
done:
    free(ga);
    free(gb);
    codir_batch_free(&batch);
    codir_model_free(m);
#else
    /* NOTE: built without OpenMP there is one thread, so nothing to compare. */
#endif
}

const test_case tests_model[] = {
    {"model forward matches float64", test_forward_matches_reference},
    {"model forward grad check", test_model_grad_check},
    {"model padding keeps logits", test_padding_keeps_logits},
    {"model crd default layer map", test_crd_layer_map},
    {"model crd loss matches float64", test_crd_loss_matches_reference},
    {"model crd grad check", test_crd_grad_check},
    {"model sampler never draws anchor label", test_sampler_excludes_anchor_label},
    {"model sampler draws are distinct", test_sampler_draws_distinct},
    {"model sampler caps K at pool size", test_sampler_caps_at_pool},
    {"model sampler uniform over pool", test_sampler_uniform},
    {"model bank update matches float64", test_bank_update},
    {"model bank gets no gradient", test_bank_gets_no_gradient},
    {"model adamw matches torch closed form", test_adamw_closed_form},
    {"model lr schedule matches hf linear", test_lr_schedule},
    {"model task step lowers loss", test_task_step_lowers_loss},
    {"model distill step lowers loss", test_distill_step_lowers_loss},
    {"model task step rejects nan parameter", test_task_step_rejects_nan},
    {"model distill step rejects nan", test_distill_step_rejects_nan},
    {"model arena alignment, growth and peak", test_arena_growth_and_peak},
    {"model arena rewind to a mark", test_arena_rewind},
    {"model params laid out contiguously", test_params_contiguous},
    {"model params shape overflow", test_params_overflow},
    {"model config check names field", test_config_check},
    {"model dropout same seed and step", test_dropout_seed_and_step},
    {"model dropout thread count invariant", test_dropout_thread_count},
};
const int tests_model_count = sizeof tests_model / sizeof tests_model[0];
