/* Tests of the training side: token types, the regression and masked-LM heads, gradient
   accumulation over micro-batches, gradient clipping, prediction, evaluation and the
   GLUE metrics.

   Expected values come from independent references written in this file: a float64
   BERT forward pass with both heads, central finite differences of its losses, closed
   forms, and metric cases computed by hand or by a second formula. */
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
        fprintf(stderr, "test_train.c: out of memory allocating %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

static double *alloc_doubles(size_t n) { return (double *)test_alloc(n * sizeof(double)); }
static float *alloc_floats(size_t n) { return (float *)test_alloc(n * sizeof(float)); }

/* Returns a small config: vocab 20, max_len 8, 2 token types and BERT's LayerNorm epsilon.
   labels 1 makes a regression model. */
static codir_config train_config(int layers, int hidden, int labels, int mlm_head, float dropout)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = 20;
    cfg.max_len = 8;
    cfg.type_vocab_size = 2;
    cfg.num_layers = layers;
    cfg.hidden = hidden;
    cfg.num_heads = 2;
    cfg.ffn = 16;
    cfg.num_labels = labels;
    cfg.mlm_head = mlm_head;
    cfg.dropout = dropout;
    return cfg;
}

/* Replaces BERT's small initialization by values large enough that every term of the
   gradient matters: matrices and embeddings in +-0.5, biases and betas in +-0.3,
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

/* Creates a model with randomized parameters, or records a failure and returns NULL. */
static codir_model *create_model(const codir_config *cfg, unsigned long long seed)
{
    codir_model *m = codir_model_create(cfg, seed);
    CHECK(m != NULL, "codir_model_create failed: %s", codir_last_error());
    if (m) randomize_params(&m->params, seed + 1000);
    return m;
}

/* A hand-made encoded data set of 8 sentence pairs with lengths 1 to 8. Token types
   are 0 on the first half of each sequence and 1 on the second, as in [CLS] a [SEP]
   b [SEP]. With num_classes >= 2 the labels are i % num_classes and there are no
   targets. With num_classes 1 every label is 0 and the targets are regression values. */
#define TOY_COUNT 8
#define TOY_LEN 8
typedef struct toy_data {
    codir_encoded enc;
    int lengths[TOY_COUNT];
    int ids[TOY_COUNT * TOY_LEN];
    int types[TOY_COUNT * TOY_LEN];
    int labels[TOY_COUNT];
    float targets[TOY_COUNT];
} toy_data;

static void toy_init(toy_data *toy, int num_classes)
{
    static const int lengths[TOY_COUNT] = {6, 3, 8, 2, 5, 4, 7, 1};
    static const float targets[TOY_COUNT] = {0.8f, -1.2f, 2.5f, 0.1f, -0.4f, 1.7f, -2.0f, 0.6f};
    unsigned long long rng = 77;
    int i, t;
    memset(toy, 0, sizeof *toy);
    for (i = 0; i < TOY_COUNT; i++) {
        toy->lengths[i] = lengths[i];
        toy->labels[i] = num_classes >= 2 ? i % num_classes : 0;
        toy->targets[i] = targets[i];
        for (t = 0; t < TOY_LEN; t++) {
            int real = t < lengths[i];
            toy->ids[i * TOY_LEN + t] = real ? (int)check_uniform(&rng, 0.0, 20.0) : 0;
            toy->types[i * TOY_LEN + t] = real && 2 * t >= lengths[i] ? 1 : 0;
        }
    }
    toy->enc.count = TOY_COUNT;
    toy->enc.max_len = TOY_LEN;
    toy->enc.lengths = toy->lengths;
    toy->enc.ids = toy->ids;
    toy->enc.types = toy->types;
    toy->enc.labels = toy->labels;
    toy->enc.targets = num_classes >= 2 ? NULL : toy->targets;
    toy->enc.num_classes = num_classes;
}

/* Fills batch with the listed examples of toy; returns 0 after a failed check. */
static int toy_batch(codir_batch *batch, const toy_data *toy, const int *examples, int start, int count)
{
    int rc = codir_batch_fill(batch, &toy->enc, examples, start, count);
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

static double *floats_to_doubles(const float *x, size_t n)
{
    double *p = alloc_doubles(n);
    size_t i;
    for (i = 0; i < n; i++) p[i] = (double)x[i];
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

/* Multi-head attention over qkv[B,T,3C] into out[B,T,C], with padded keys excluded. */
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

/* emb[B,T,C] = tok[ids] + pos[t] + type[types], before the embedding LayerNorm. */
static void ref_embeddings(const codir_model *m, const double *p, const codir_batch *batch, double *emb)
{
    const codir_params *P = &m->params;
    int B = batch->batch, T = batch->seq, C = m->cfg.hidden, b, t, c;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            int id = batch->ids.data[b * T + t], type = batch->types.data[b * T + t];
            for (c = 0; c < C; c++)
                emb[((size_t)b * T + t) * C + c] = p[offset_of(P, m->tok_emb) + (size_t)id * C + c] +
                                                   p[offset_of(P, m->pos_emb) + (size_t)t * C + c] +
                                                   p[offset_of(P, m->type_emb) + (size_t)type * C + c];
        }
}

/* BERT post-LayerNorm encoder and classification head without dropout, with the
   parameter values p[params.count] in the model's layout. hidden[(L+1) * B*T*C]
   receives the embedding output and every block's output; logits[B, labels]. */
static void ref_forward(const codir_model *m, const double *p, const codir_batch *batch, double *hidden, double *logits)
{
    const codir_config *cfg = &m->cfg;
    const codir_params *P = &m->params;
    int B = batch->batch, T = batch->seq, C = cfg->hidden, F = cfg->ffn, L = cfg->num_layers, V = cfg->num_labels;
    int N = B * T, b, c, l;
    size_t BTC = (size_t)N * C;
    double *qkv = alloc_doubles((size_t)N * 3 * C), *att = alloc_doubles(BTC), *proj = alloc_doubles(BTC);
    double *up = alloc_doubles((size_t)N * F), *cls = alloc_doubles((size_t)B * C), *pooled = alloc_doubles((size_t)B * C);
    double eps = (double)cfg->ln_eps;

    /* embeddings: token + position + token type, then LayerNorm */
    ref_embeddings(m, p, batch, hidden);
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

/* Masked-LM logits[P,V] at rows positions[P] of the last hidden layer last[B*T, C]:
   dense, exact GELU, LayerNorm, then the token embeddings as decoder plus its bias. */
static void ref_mlm_logits(const codir_model *m, const double *p, const double *last, const int *positions, int count,
                           double *logits)
{
    const codir_params *P = &m->params;
    int C = m->cfg.hidden, V = m->cfg.vocab_size, i, c;
    double *rows = alloc_doubles((size_t)count * C), *h = alloc_doubles((size_t)count * C);

    /* gather the chosen rows */
    for (i = 0; i < count; i++)
        for (c = 0; c < C; c++) rows[(size_t)i * C + c] = last[(size_t)positions[i] * C + c];

    /* transform: dense, GELU, LayerNorm */
    ref_linear(h, rows, p + offset_of(P, m->mlm_dense_w), p + offset_of(P, m->mlm_dense_b), count, C, C);
    for (i = 0; i < count * C; i++) h[i] = ref_gelu(h[i]);
    ref_layernorm(h, p + offset_of(P, m->mlm_ln_gamma), p + offset_of(P, m->mlm_ln_beta), count, C,
                  (double)m->cfg.ln_eps);

    /* decoder tied to the token embeddings [V, C], plus the decoder bias [V] */
    ref_linear(logits, h, p + offset_of(P, m->tok_emb), p + offset_of(P, m->mlm_bias), count, C, V);
    free(rows);
    free(h);
}

/* Mean cross-entropy of logits[N,V] against labels[N]. */
static double ref_cross_entropy(const double *logits, const int *labels, int N, int V)
{
    double total = 0.0;
    int n, v;
    for (n = 0; n < N; n++) {
        const double *row = logits + (size_t)n * V;
        double mx = row[0], sum = 0.0;
        for (v = 1; v < V; v++)
            if (row[v] > mx) mx = row[v];
        for (v = 0; v < V; v++) sum += exp(row[v] - mx);
        total += mx + log(sum) - row[labels[n]];
    }
    return total / N;
}

/* mean_i (a[i] - b[i])^2 */
static double ref_mse(const double *a, const double *b, int n)
{
    double total = 0.0;
    int i;
    for (i = 0; i < n; i++) total += (a[i] - b[i]) * (a[i] - b[i]);
    return total / n;
}

/* Writes the model's float64 logits [B, labels] for batch. When last is not NULL,
   last[B*T*C] receives the last hidden layer. */
static void ref_logits(const codir_model *m, const double *p, const codir_batch *batch, double *logits, double *last)
{
    size_t BTC = (size_t)batch->batch * batch->seq * m->cfg.hidden;
    double *hidden = alloc_doubles((size_t)(m->cfg.num_layers + 1) * BTC);
    ref_forward(m, p, batch, hidden, logits);
    if (last) memcpy(last, hidden + (size_t)m->cfg.num_layers * BTC, BTC * sizeof(double));
    free(hidden);
}

/* ---- finite differences ---- */

/* A float64 loss of the parameter values p[params.count]. arg points to the problem. */
typedef double (*ref_loss_fn)(const codir_model *m, const double *p, const void *arg);

/* Checks every parameter gradient of m against central differences of loss, tensor by
   tensor. The model's current values are the expansion point. */
static void check_grads_fd(const codir_model *m, ref_loss_fn loss, const void *arg)
{
    double *p = params_to_doubles(&m->params), *want = alloc_doubles(m->params.count), h = 1e-5;
    size_t i;
    int ti;
    for (i = 0; i < m->params.count; i++) {
        double saved = p[i], up, down;
        p[i] = saved + h;
        up = loss(m, p, arg);
        p[i] = saved - h;
        down = loss(m, p, arg);
        p[i] = saved;
        want[i] = (up - down) / (2.0 * h);
    }
    for (ti = 0; ti < m->params.num_tensors; ti++) {
        const codir_tensor *t = &m->params.tensors[ti];
        check_close(t->name, t->grad, want + offset_of(&m->params, t), t->numel, 1e-5, 1e-4);
    }
    free(p);
    free(want);
}

/* The task loss of codir_task_accumulate: cross-entropy, or MSE for one label. */
static double ref_task_loss(const codir_model *m, const double *p, const void *arg)
{
    const codir_batch *batch = (const codir_batch *)arg;
    int B = batch->batch, V = m->cfg.num_labels, b;
    double *logits = alloc_doubles((size_t)B * V), loss;
    ref_logits(m, p, batch, logits, NULL);
    if (V == 1) {
        double *targets = alloc_doubles((size_t)B);
        for (b = 0; b < B; b++) targets[b] = (double)batch->targets[b];
        loss = ref_mse(logits, targets, B);
        free(targets);
    } else {
        loss = ref_cross_entropy(logits, batch->labels.data, B, V);
    }
    free(logits);
    return loss;
}

/* ---- 1. token types ---- */

static const int pair_examples[3] = {0, 1, 3}; /* lengths 6, 3 and 2: T = 6 */

static void test_types_in_batch(void)
{
    toy_data toy;
    codir_batch batch;
    int b, t, ones = 0;
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;
    CHECK(batch.seq == 6, "batch length %d, want 6", batch.seq);
    for (b = 0; b < 3; b++)
        for (t = 0; t < batch.seq; t++) {
            int e = pair_examples[b];
            int want = t < toy.lengths[e] ? toy.types[e * TOY_LEN + t] : 0;
            CHECK(batch.types.data[b * batch.seq + t] == want, "types[%d,%d] = %d, want %d", b, t,
                  batch.types.data[b * batch.seq + t], want);
            ones += want;
        }
    CHECK(ones == 5, "%d tokens of type 1 in the batch, want 5", ones);
done:
    codir_batch_free(&batch);
}

static void test_types_shift_embeddings(void)
{
    codir_config cfg = train_config(1, 8, 3, 0, 0.0f);
    codir_model *m;
    codir_batch batch;
    codir_ctx ctx;
    codir_tensor *with_types, *without_types;
    toy_data toy;
    double *p, *want, *shift;
    float *diff;
    size_t i, n;
    int C = 8, row;
    cfg.type_vocab_size = 3;
    m = create_model(&cfg, 1);
    if (!m) return;
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;

    codir_ctx_begin(&ctx, 0, 0, 0);
    with_types = codir_embedding(&ctx, &batch.ids, &batch.types, m->tok_emb, m->pos_emb, m->type_emb);
    without_types = codir_embedding(&ctx, &batch.ids, NULL, m->tok_emb, m->pos_emb, m->type_emb);
    CHECK(with_types != NULL, "codir_embedding with types failed: %s", codir_last_error());
    CHECK(without_types != NULL, "codir_embedding without types failed: %s", codir_last_error());
    if (!with_types || !without_types) goto done;

    /* tok[id] + pos[t] + type[types] in float64 */
    n = (size_t)batch.batch * batch.seq * C;
    p = params_to_doubles(&m->params);
    want = alloc_doubles(n);
    shift = alloc_doubles(n);
    diff = alloc_floats(n);
    ref_embeddings(m, p, &batch, want);
    check_close("embeddings with token types", with_types->data, want, n, 1e-6, 1e-6);

    /* The types move each row by type[types] - type[0], and positions of type 0 not at all. */
    for (i = 0; i < n; i++) {
        int type = batch.types.data[i / (size_t)C];
        size_t c = i % (size_t)C, at = offset_of(&m->params, m->type_emb);
        shift[i] = p[at + (size_t)type * C + c] - p[at + c];
        diff[i] = with_types->data[i] - without_types->data[i];
    }
    check_close("embedding shift by token type", diff, shift, n, 1e-6, 1e-6);
    for (row = 0; row < batch.batch * batch.seq; row++)
        if (batch.types.data[row] == 0)
            for (i = 0; i < (size_t)C; i++)
                CHECK(diff[(size_t)row * C + i] == 0.0f, "row %d of type 0 moved by %g at channel %zu", row,
                      (double)diff[(size_t)row * C + i], i);
    free(p);
    free(want);
    free(shift);
    free(diff);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_types_forward_matches_reference(void)
{
    codir_config cfg = train_config(2, 8, 3, 0, 0.0f);
    codir_model *m = create_model(&cfg, 2);
    codir_batch batch;
    codir_ctx ctx;
    codir_output out;
    toy_data toy;
    double *p, *logits, *hidden, moved = 0.0;
    float typed_logits[9];
    size_t BTC;
    int rc, i;
    if (!m) return;
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;

    codir_ctx_begin(&ctx, 0, 0, 0);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    BTC = (size_t)batch.batch * batch.seq * cfg.hidden;
    p = params_to_doubles(&m->params);
    logits = alloc_doubles(9);
    hidden = alloc_doubles(3 * BTC);
    ref_forward(m, p, &batch, hidden, logits);
    check_close("embedding output with types", out.hidden[0]->data, hidden, BTC, 1e-5, 1e-4);
    check_close("logits with types", out.logits->data, logits, 9, 1e-5, 1e-4);
    memcpy(typed_logits, out.logits->data, sizeof typed_logits);

    /* The same batch with every type 0 gives other logits: the types reach the output. */
    for (i = 0; i < batch.batch * batch.seq; i++) batch.types.data[i] = 0;
    codir_ctx_begin(&ctx, 0, 0, 0);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    for (i = 0; i < 9 && !rc; i++) moved = fmax(moved, fabs((double)out.logits->data[i] - typed_logits[i]));
    CHECK(rc || moved > 1e-3, "logits moved by at most %g when the types were cleared", moved);
    free(p);
    free(logits);
    free(hidden);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_types_grad_check(void)
{
    codir_config cfg = train_config(1, 8, 3, 0, 0.0f);
    codir_model *m;
    codir_batch batch;
    codir_ctx ctx;
    codir_output out;
    codir_tensor *loss;
    toy_data toy;
    int rc, c;
    cfg.type_vocab_size = 3;
    m = create_model(&cfg, 3);
    if (!m) return;
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;

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

    /* Every parameter, the type table included, against central differences. */
    check_grads_fd(m, ref_task_loss, &batch);

    /* Row 2 of the type table is never looked up, so it gets no gradient. */
    for (c = 0; c < cfg.hidden; c++)
        CHECK(m->type_emb->grad[2 * cfg.hidden + c] == 0.0f, "unused type row 2 has gradient %g at channel %d",
              (double)m->type_emb->grad[2 * cfg.hidden + c], c);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

/* ---- 2. regression head ---- */

static const int reg_examples[4] = {2, 0, 5, 1};

static void test_regression_task_grad_check(void)
{
    codir_config cfg = train_config(2, 8, 1, 0, 0.0f);
    codir_model *m = create_model(&cfg, 4);
    codir_batch batch;
    codir_ctx ctx;
    codir_loss_terms terms;
    toy_data toy;
    double *p, want;
    int rc;
    if (!m) return;
    toy_init(&toy, 1);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, reg_examples, 0, 4)) goto done;
    CHECK(batch.targets[0] == toy.targets[2], "batch target 0 is %g, want %g", (double)batch.targets[0],
          (double)toy.targets[2]);
    CHECK(batch.targets[3] == toy.targets[1], "batch target 3 is %g, want %g", (double)batch.targets[3],
          (double)toy.targets[1]);

    codir_params_zero_grad(&m->params);
    rc = codir_task_accumulate(&ctx, m, &batch, 1.0f, 0, &terms);
    CHECK(rc == CODIR_OK, "codir_task_accumulate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;

    /* The loss is mean_b (y_b - target_b)^2 of the single output. */
    p = params_to_doubles(&m->params);
    want = ref_task_loss(m, p, &batch);
    CHECK(fabs(terms.task - want) <= 1e-5 + 1e-5 * fabs(want), "task loss %.9g, float64 MSE %.9g", terms.task, want);
    CHECK(terms.total == terms.task, "total %.9g differs from the task loss %.9g", terms.total, terms.task);
    free(p);
    check_grads_fd(m, ref_task_loss, &batch);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

/* The CoDIR objective of a regression student with lambda 0:
   (1 - beta) mean (s - target)^2 + beta mean (s - teacher)^2. */
typedef struct reg_distill_problem {
    const codir_batch *batch;
    const double *teacher;      /* [B] teacher outputs */
    double beta;
} reg_distill_problem;

static double ref_reg_distill_loss(const codir_model *m, const double *p, const void *arg)
{
    const reg_distill_problem *pr = (const reg_distill_problem *)arg;
    int B = pr->batch->batch, b;
    double *s = alloc_doubles((size_t)B), *targets = alloc_doubles((size_t)B), loss;
    ref_logits(m, p, pr->batch, s, NULL);
    for (b = 0; b < B; b++) targets[b] = (double)pr->batch->targets[b];
    loss = (1.0 - pr->beta) * ref_mse(s, targets, B) + pr->beta * ref_mse(s, pr->teacher, B);
    free(s);
    free(targets);
    return loss;
}

static void test_regression_distill_mse(void)
{
    codir_config scfg = train_config(1, 8, 1, 0, 0.0f), tcfg = train_config(2, 12, 1, 0, 0.0f);
    codir_distill_config dcfg = codir_distill_config_default();
    codir_model *student = create_model(&scfg, 5), *teacher = create_model(&tcfg, 6);
    codir_distiller *d = NULL;
    codir_batch batch;
    codir_ctx ctx;
    codir_loss_terms terms;
    reg_distill_problem problem;
    toy_data toy;
    double *ps, *pt, s[4], t[4], y[4], want_kd, want_task, want_total;
    size_t i;
    int rc, b, teacher_grads = 0;
    toy_init(&toy, 1);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    dcfg.beta = 0.3f;
    dcfg.lambda = 0.0f;
    dcfg.proj_dim = 4;
    dcfg.num_negatives = 2;
    if (student && teacher) d = codir_distiller_create(&dcfg, &scfg, &tcfg, toy.labels, TOY_COUNT, 7);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!student || !teacher || !d || !toy_batch(&batch, &toy, reg_examples, 0, 4)) goto done;

    codir_params_zero_grad(&student->params);
    codir_params_zero_grad(&teacher->params);
    rc = codir_distill_accumulate(&ctx, student, teacher, d, &batch, 1.0f, 0, 1, &terms);
    CHECK(rc == CODIR_OK, "codir_distill_accumulate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;

    /* KD for regression is mean_b (s_b - t_b)^2 between the two models' outputs. */
    ps = params_to_doubles(&student->params);
    pt = params_to_doubles(&teacher->params);
    ref_logits(student, ps, &batch, s, NULL);
    ref_logits(teacher, pt, &batch, t, NULL);
    for (b = 0; b < 4; b++) y[b] = (double)batch.targets[b];
    want_kd = ref_mse(s, t, 4);
    want_task = ref_mse(s, y, 4);
    want_total = 0.7 * want_task + 0.3 * want_kd;
    CHECK(fabs(terms.kd - want_kd) <= 1e-5 + 1e-5 * want_kd, "KD term %.9g, float64 mean (s - t)^2 %.9g", terms.kd,
          want_kd);
    CHECK(fabs(terms.task - want_task) <= 1e-5 + 1e-5 * want_task, "task term %.9g, float64 MSE %.9g", terms.task,
          want_task);
    CHECK(fabs(terms.total - want_total) <= 1e-5 + 1e-5 * want_total, "total %.9g, want 0.7 task + 0.3 KD = %.9g",
          terms.total, want_total);
    CHECK(terms.crd == 0.0, "contrastive term %g with lambda 0", terms.crd);

    /* The student's gradient; the frozen teacher gets none. */
    problem.batch = &batch;
    problem.teacher = t;
    problem.beta = 0.3;
    check_grads_fd(student, ref_reg_distill_loss, &problem);
    for (i = 0; i < teacher->params.count; i++) teacher_grads += teacher->params.grad[i] != 0.0f;
    CHECK(teacher_grads == 0, "%d teacher gradients are nonzero", teacher_grads);
    free(ps);
    free(pt);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_distiller_free(d);
    codir_model_free(student);
    codir_model_free(teacher);
}

/* The teacher cache is exact. CoDIR steps that read the teacher's logits and pooled
   features from the cache give bit-identical loss terms, student parameters, head
   parameters and memory bank to steps that run the teacher. Both scoring modes and
   both poolings are covered, with dropout in the student. The run with the teacher
   rewinds the arena over the teacher's pass, so its peak stays below the cached run's
   peak plus the peak of a teacher pass alone. */
static void test_teacher_cache_exact(void)
{
    static const int examples[12] = {3, 0, 6, 1, 7, 2, 5, 4, 0, 2, 4, 6};
    int setting;
    for (setting = 0; setting < 2; setting++) {
        codir_config scfg = train_config(2, 8, 3, 0, 0.1f), tcfg = train_config(4, 12, 3, 0, 0.1f);
        codir_distill_config dcfg = codir_distill_config_default();
        codir_model *teacher = create_model(&tcfg, 11), *student_a = create_model(&scfg, 12);
        codir_model *student_b = create_model(&scfg, 12);
        codir_distiller *d_a = NULL, *d_b = NULL;
        codir_teacher_cache *cache = NULL;
        codir_adamw opt_sa, opt_sb, opt_ha, opt_hb;
        codir_ctx ctx_a, ctx_b, ctx_t;
        codir_batch batch;
        codir_output out;
        codir_tensor *pooled[2], *features;
        toy_data toy;
        size_t teacher_peak;
        int step, rc, k, b, opts = 0;

        toy_init(&toy, 3);
        codir_batch_init(&batch, 4, TOY_LEN);
        codir_ctx_init(&ctx_a, 1 << 12, 5);
        codir_ctx_init(&ctx_b, 1 << 12, 5);
        codir_ctx_init(&ctx_t, 1 << 12, 5);
        dcfg.beta = 0.4f;
        dcfg.lambda = 0.2f;
        dcfg.proj_dim = 4;
        dcfg.num_negatives = 3;
        dcfg.mode = setting == 0 ? CODIR_CRD_INFONCE : CODIR_CRD_NCE;
        dcfg.pooling = setting == 0 ? CODIR_POOL_MEAN : CODIR_POOL_FIRST;
        if (teacher && student_a && student_b) {
            d_a = codir_distiller_create(&dcfg, &scfg, &tcfg, toy.labels, TOY_COUNT, 13);
            d_b = codir_distiller_create(&dcfg, &scfg, &tcfg, toy.labels, TOY_COUNT, 13);
        }
        CHECK(d_a != NULL, "codir_distiller_create failed: %s", codir_last_error());
        CHECK(d_b != NULL, "codir_distiller_create failed: %s", codir_last_error());
        if (!d_a || !d_b) goto done;
        opts = codir_adamw_init(&opt_sa, &student_a->params, 0.9f, 0.98f, 1e-6f, 0.01f) == CODIR_OK &&
               codir_adamw_init(&opt_sb, &student_b->params, 0.9f, 0.98f, 1e-6f, 0.01f) == CODIR_OK &&
               codir_adamw_init(&opt_ha, &d_a->params, 0.9f, 0.98f, 1e-6f, 0.01f) == CODIR_OK &&
               codir_adamw_init(&opt_hb, &d_b->params, 0.9f, 0.98f, 1e-6f, 0.01f) == CODIR_OK;
        CHECK(opts, "codir_adamw_init failed: %s", codir_last_error());
        if (!opts) goto done;
        cache = codir_teacher_cache_build(&ctx_t, teacher, d_b, &toy.enc, 3, 0.0);
        CHECK(cache != NULL, "codir_teacher_cache_build failed: %s", codir_last_error());
        if (!cache) goto done;

        for (step = 0; step < 3; step++) {
            codir_loss_terms ta, tb;
            if (!toy_batch(&batch, &toy, examples + 4 * step, 0, 4)) goto done;
            rc = codir_distill_step(&ctx_a, student_a, teacher, d_a, &opt_sa, &opt_ha, &batch, 1e-2f, &ta);
            CHECK(rc == CODIR_OK, "setting %d step %d with the teacher returned %d: %s", setting, step, rc,
                  codir_last_error());
            rc = codir_distill_step_cached(&ctx_b, student_b, cache, d_b, &opt_sb, &opt_hb, &batch, 1e-2f, &tb);
            CHECK(rc == CODIR_OK, "setting %d step %d from the cache returned %d: %s", setting, step, rc,
                  codir_last_error());
            CHECK(ta.task == tb.task, "setting %d step %d: task term %.9g with the teacher, %.9g from the cache",
                  setting, step, ta.task, tb.task);
            CHECK(ta.kd == tb.kd, "setting %d step %d: KD term %.9g with the teacher, %.9g from the cache", setting,
                  step, ta.kd, tb.kd);
            CHECK(ta.crd == tb.crd, "setting %d step %d: contrastive term %.9g with the teacher, %.9g from the cache",
                  setting, step, ta.crd, tb.crd);
            CHECK(ta.total == tb.total, "setting %d step %d: total %.9g with the teacher, %.9g from the cache",
                  setting, step, ta.total, tb.total);
        }
        CHECK(memcmp(student_a->params.data, student_b->params.data, student_a->params.count * sizeof(float)) == 0,
              "setting %d: student parameters differ after three steps", setting);
        CHECK(memcmp(d_a->params.data, d_b->params.data, d_a->params.count * sizeof(float)) == 0,
              "setting %d: projection heads differ after three steps", setting);
        CHECK(memcmp(d_a->bank, d_b->bank, (size_t)TOY_COUNT * dcfg.proj_dim * sizeof(float)) == 0,
              "setting %d: memory banks differ after three steps", setting);

        codir_ctx_begin(&ctx_t, 0, 0, 0);
        rc = codir_model_forward(&ctx_t, teacher, &batch, &out);
        CHECK(rc == CODIR_OK, "teacher forward returned %d: %s", rc, codir_last_error());
        if (rc) goto done;
        teacher_peak = codir_arena_peak(&ctx_t.arena);

        /* The default map (teacher layers 1 and 3) leaves out the teacher's
           last layer, so the cache ran that block for the first token only: its logits
           and pooled features equal the full forward pass's, bit for bit. */
        CHECK(d_b->layer_map[0] == 1, "default map starts at teacher layer %d; expected 1", d_b->layer_map[0]);
        CHECK(d_b->layer_map[1] == 3, "default map ends at teacher layer %d; expected 3", d_b->layer_map[1]);
        for (k = 0; k < 2; k++) {
            codir_tensor *h = out.hidden[d_b->layer_map[k]];
            pooled[k] = dcfg.pooling == CODIR_POOL_FIRST ? codir_select_first(&ctx_t, h)
                                                         : codir_mean_pool(&ctx_t, h, &batch.mask);
        }
        features = codir_concat(&ctx_t, pooled, 2);
        CHECK(features != NULL, "pooling the full pass failed: %s", codir_last_error());
        if (!features) goto done;
        CHECK(features->numel == (size_t)4 * cache->feature_dim, "the full pass pooled %zu features; expected %d",
              features->numel, 4 * cache->feature_dim);
        if (features->numel != (size_t)4 * cache->feature_dim) goto done;
        for (b = 0; b < 4; b++) {
            int e = batch.example_ids.data[b];
            CHECK(memcmp(cache->logits + (size_t)e * 3, out.logits->data + (size_t)b * 3, 3 * sizeof(float)) == 0,
                  "setting %d: cached logits of example %d differ from the full forward pass", setting, e);
            CHECK(memcmp(cache->features + (size_t)e * cache->feature_dim,
                         features->data + (size_t)b * cache->feature_dim, (size_t)cache->feature_dim * sizeof(float)) == 0,
                  "setting %d: cached features of example %d differ from the full forward pass", setting, e);
        }
        CHECK(codir_arena_peak(&ctx_a.arena) < codir_arena_peak(&ctx_b.arena) + teacher_peak / 2,
              "setting %d: arena peak %zu with the teacher, %zu from the cache and %zu for a teacher pass; the "
              "teacher's pass was not rewound",
              setting, codir_arena_peak(&ctx_a.arena), codir_arena_peak(&ctx_b.arena), teacher_peak);
    done:
        if (opts) {
            codir_adamw_free(&opt_sa);
            codir_adamw_free(&opt_sb);
            codir_adamw_free(&opt_ha);
            codir_adamw_free(&opt_hb);
        }
        codir_teacher_cache_free(cache);
        codir_ctx_free(&ctx_a);
        codir_ctx_free(&ctx_b);
        codir_ctx_free(&ctx_t);
        codir_batch_free(&batch);
        codir_distiller_free(d_a);
        codir_distiller_free(d_b);
        codir_model_free(teacher);
        codir_model_free(student_a);
        codir_model_free(student_b);
    }
}

/* ---- 3. masked-LM head ---- */

/* Rows b * T + t of the batch {0, 1, 3} (T = 6): example 0 at 1 and 4 (twice),
   example 1 at 7, example 3 at 12. */
#define MLM_COUNT 5
static const int mlm_positions[MLM_COUNT] = {1, 4, 7, 12, 4};
static const int mlm_targets[MLM_COUNT] = {3, 17, 0, 9, 11};

typedef struct mlm_problem {
    const codir_batch *batch;
} mlm_problem;

/* Mean cross-entropy of the masked-LM logits at mlm_positions against mlm_targets. */
static double ref_mlm_loss(const codir_model *m, const double *p, const void *arg)
{
    const mlm_problem *pr = (const mlm_problem *)arg;
    const codir_batch *batch = pr->batch;
    size_t BTC = (size_t)batch->batch * batch->seq * m->cfg.hidden;
    double *last = alloc_doubles(BTC), *logits = alloc_doubles((size_t)batch->batch * m->cfg.num_labels);
    double *mlm = alloc_doubles((size_t)MLM_COUNT * m->cfg.vocab_size), loss;
    ref_logits(m, p, batch, logits, last);
    ref_mlm_logits(m, p, last, mlm_positions, MLM_COUNT, mlm);
    loss = ref_cross_entropy(mlm, mlm_targets, MLM_COUNT, m->cfg.vocab_size);
    free(last);
    free(logits);
    free(mlm);
    return loss;
}

/* Runs the encoder with the tape on and returns the masked-LM logits, or NULL. */
static codir_tensor *run_mlm(codir_ctx *ctx, const codir_model *m, const codir_batch *batch, int recording)
{
    codir_output out;
    codir_tensor *logits;
    int rc;
    codir_ctx_begin(ctx, recording, 0, 0);
    rc = codir_model_forward(ctx, m, batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    if (rc) return NULL;
    logits = codir_mlm_logits(ctx, m, out.hidden[m->cfg.num_layers], mlm_positions, MLM_COUNT);
    CHECK(logits != NULL, "codir_mlm_logits failed: %s", codir_last_error());
    return logits;
}

static void test_mlm_logits_match_reference(void)
{
    codir_config cfg = train_config(2, 8, 3, 1, 0.0f);
    codir_model *m = create_model(&cfg, 8);
    codir_batch batch;
    codir_ctx ctx;
    codir_tensor *logits;
    toy_data toy;
    double *p, *last, *cls, *want;
    size_t BTC, n = (size_t)MLM_COUNT * 20;
    if (!m) return;
    CHECK(m->mlm_dense_w != NULL, "mlm_head 1 left mlm_dense_w NULL");
    CHECK(m->mlm_ln_gamma != NULL, "mlm_head 1 left mlm_ln_gamma NULL");
    CHECK(m->mlm_bias != NULL, "mlm_head 1 left mlm_bias NULL");
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;
    logits = run_mlm(&ctx, m, &batch, 0);
    if (!logits) goto done;
    CHECK(logits->ndim == 2, "masked-LM logits have %d dimensions, want 2", logits->ndim);
    CHECK(logits->shape[0] == MLM_COUNT, "masked-LM logits have %d rows, want %d", logits->shape[0], MLM_COUNT);
    CHECK(logits->shape[1] == 20, "masked-LM logits have %d columns, want the vocabulary size 20", logits->shape[1]);

    BTC = (size_t)batch.batch * batch.seq * cfg.hidden;
    p = params_to_doubles(&m->params);
    last = alloc_doubles(BTC);
    cls = alloc_doubles(9);
    want = alloc_doubles(n);
    ref_logits(m, p, &batch, cls, last);
    ref_mlm_logits(m, p, last, mlm_positions, MLM_COUNT, want);
    check_close("masked-LM logits", logits->data, want, n, 1e-5, 1e-4);

    /* Rows 1 and 4 of the output gather the same position, so they are equal. */
    CHECK(memcmp(logits->data + 20, logits->data + 4 * 20, 20 * sizeof(float)) == 0,
          "the two rows of position 4 differ");
    free(p);
    free(last);
    free(cls);
    free(want);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_mlm_grad_check(void)
{
    codir_config cfg = train_config(2, 8, 3, 1, 0.0f);
    codir_model *m = create_model(&cfg, 9);
    codir_batch batch;
    codir_ctx ctx;
    codir_tensor *logits, *loss;
    codir_itensor targets;
    mlm_problem problem;
    toy_data toy;
    double *p, want;
    size_t k;
    int rc, head_grads = 0;
    if (!m) return;
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;
    logits = run_mlm(&ctx, m, &batch, 1);
    if (!logits) goto done;

    memset(&targets, 0, sizeof targets);
    targets.data = (int *)mlm_targets;
    targets.ndim = 1;
    targets.shape[0] = MLM_COUNT;
    targets.shape[1] = targets.shape[2] = targets.shape[3] = 1;
    targets.numel = MLM_COUNT;
    loss = codir_cross_entropy(&ctx, logits, &targets);
    CHECK(loss != NULL, "codir_cross_entropy failed: %s", codir_last_error());
    if (!loss) goto done;
    codir_params_zero_grad(&m->params);
    rc = codir_backward(&ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());

    problem.batch = &batch;
    p = params_to_doubles(&m->params);
    want = ref_mlm_loss(m, p, &problem);
    CHECK(fabs(loss->data[0] - want) <= 1e-5 + 1e-5 * want, "masked-LM loss %.9g, float64 %.9g",
          (double)loss->data[0], want);
    free(p);

    /* mlm.*, the token embeddings (lookup and tied decoder) and the encoder against
       central differences. The pooler and classifier are not in this loss. */
    check_grads_fd(m, ref_mlm_loss, &problem);
    for (k = 0; k < m->pool_w->numel; k++) head_grads += m->pool_w->grad[k] != 0.0f;
    for (k = 0; k < m->cls_w->numel; k++) head_grads += m->cls_w->grad[k] != 0.0f;
    CHECK(head_grads == 0, "%d pooler or classifier gradients are nonzero", head_grads);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_mlm_needs_head(void)
{
    codir_config cfg = train_config(1, 8, 3, 0, 0.0f);
    codir_model *m = create_model(&cfg, 10);
    codir_batch batch;
    codir_ctx ctx;
    codir_output out;
    codir_tensor *logits;
    toy_data toy;
    int rc;
    if (!m) return;
    CHECK(m->mlm_dense_w == NULL, "mlm_head 0 created mlm_dense_w");
    CHECK(m->mlm_bias == NULL, "mlm_head 0 created mlm_bias");
    toy_init(&toy, 3);
    codir_batch_init(&batch, 4, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    if (!toy_batch(&batch, &toy, pair_examples, 0, 3)) goto done;
    codir_ctx_begin(&ctx, 0, 0, 0);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    logits = codir_mlm_logits(&ctx, m, out.hidden[1], mlm_positions, MLM_COUNT);
    CHECK(logits == NULL, "codir_mlm_logits returned logits for a model without the head");
    CHECK(ctx.status == CODIR_ERR_INVALID, "status %d, want CODIR_ERR_INVALID", ctx.status);
    CHECK(strstr(codir_last_error(), "mlm_head") != NULL, "error \"%s\" does not name mlm_head", codir_last_error());
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

/* x[4,3], rows {2, 0, 2, 2, 3}: row 2 three times, row 1 never. */
#define GATHER_N 4
#define GATHER_C 3
#define GATHER_P 5
static const int gather_rows[GATHER_P] = {2, 0, 2, 2, 3};

static void test_gather_rows_kernels(void)
{
    float x[GATHER_N * GATHER_C], out[GATHER_P * GATHER_C], dout[GATHER_P * GATHER_C], dx[GATHER_N * GATHER_C];
    double want_out[GATHER_P * GATHER_C], want_dx[GATHER_N * GATHER_C];
    int i, c, r;
    for (i = 0; i < GATHER_N * GATHER_C; i++) {
        x[i] = (float)(i + 1) * 0.5f;
        dx[i] = 0.25f; /* the backward pass adds to what is there */
    }
    for (i = 0; i < GATHER_P * GATHER_C; i++) dout[i] = (float)(i % 7) - 3.0f;
    codir_gather_rows_forward(out, x, gather_rows, GATHER_P, GATHER_C);
    for (i = 0; i < GATHER_P; i++)
        for (c = 0; c < GATHER_C; c++) want_out[i * GATHER_C + c] = (double)x[gather_rows[i] * GATHER_C + c];
    check_close("gathered rows", out, want_out, GATHER_P * GATHER_C, 0.0, 0.0);

    /* dx[r] = 0.25 + the sum of dout over the outputs that gathered row r. */
    codir_gather_rows_backward(dx, dout, gather_rows, GATHER_P, GATHER_C);
    for (r = 0; r < GATHER_N; r++)
        for (c = 0; c < GATHER_C; c++) {
            double s = 0.25;
            for (i = 0; i < GATHER_P; i++)
                if (gather_rows[i] == r) s += dout[i * GATHER_C + c];
            want_dx[r * GATHER_C + c] = s;
        }
    check_close("gather backward", dx, want_dx, GATHER_N * GATHER_C, 0.0, 0.0);
    CHECK(dx[1 * GATHER_C] == 0.25f, "row 1 was never gathered but its gradient is %g", (double)dx[GATHER_C]);
}

static void test_gather_rows_op(void)
{
    codir_ctx ctx;
    codir_tensor *x, *g, *loss;
    float target[GATHER_P * GATHER_C];
    double want[GATHER_N * GATHER_C];
    int shape[2] = {GATHER_N, GATHER_C}, i, c, r, rc;
    static const int outside[1] = {GATHER_N};
    codir_ctx_init(&ctx, 1 << 16, 1);
    codir_ctx_begin(&ctx, 1, 0, 0);
    x = codir_tensor_new(&ctx, 2, shape, 1);
    CHECK(x != NULL, "codir_tensor_new failed: %s", codir_last_error());
    if (!x) goto done;
    for (i = 0; i < GATHER_N * GATHER_C; i++) x->data[i] = 0.3f * (float)i - 1.0f;
    for (i = 0; i < GATHER_P * GATHER_C; i++) target[i] = 0.1f * (float)(i % 4);
    g = codir_gather_rows(&ctx, x, gather_rows, GATHER_P);
    loss = codir_mse(&ctx, g, target);
    CHECK(loss != NULL, "gather or MSE failed: %s", codir_last_error());
    if (!loss) goto done;
    rc = codir_backward(&ctx, loss);
    CHECK(rc == CODIR_OK, "codir_backward returned %d: %s", rc, codir_last_error());

    /* d mean((g - target)^2) / dx[r] = sum over outputs p gathering r of 2 (x[r] - target[p]) / 15 */
    for (r = 0; r < GATHER_N; r++)
        for (c = 0; c < GATHER_C; c++) {
            double s = 0.0;
            for (i = 0; i < GATHER_P; i++)
                if (gather_rows[i] == r)
                    s += 2.0 * ((double)x->data[r * GATHER_C + c] - target[i * GATHER_C + c]) / (GATHER_P * GATHER_C);
            want[r * GATHER_C + c] = s;
        }
    check_close("gradient through gathered rows", x->grad, want, GATHER_N * GATHER_C, 1e-7, 1e-6);

    /* A row index past the end is rejected. */
    g = codir_gather_rows(&ctx, x, outside, 1);
    CHECK(g == NULL, "gather accepted row %d of a %d-row input", GATHER_N, GATHER_N);
    CHECK(ctx.status == CODIR_ERR_INVALID, "status %d after an out-of-range row, want CODIR_ERR_INVALID", ctx.status);
done:
    codir_ctx_free(&ctx);
}

/* ---- 4. metrics ---- */

/* A binary case with TP 3, FN 2, FP 1, TN 4. */
#define BIN_N 10
static const int bin_gold[BIN_N] = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0};
static const int bin_pred[BIN_N] = {1, 1, 1, 0, 0, 0, 0, 0, 0, 1};

static int same_double(double got, double want, double tol) { return fabs(got - want) <= tol; }

static void test_accuracy_cases(void)
{
    static const int pred3[6] = {0, 2, 1, 1, 2, 0}, gold3[6] = {0, 1, 1, 1, 2, 2};
    double a = codir_accuracy(bin_pred, bin_gold, BIN_N);
    CHECK(same_double(a, 7.0 / 10.0, 1e-15), "binary accuracy %.17g, want 7/10", a);
    a = codir_accuracy(pred3, gold3, 6);
    CHECK(same_double(a, 4.0 / 6.0, 1e-15), "3-class accuracy %.17g, want 4/6", a);
    a = codir_accuracy(bin_gold, bin_gold, BIN_N);
    CHECK(a == 1.0, "accuracy of the labels against themselves %.17g, want 1", a);
    a = codir_accuracy(bin_pred, bin_gold, 0);
    CHECK(isnan(a), "accuracy of no examples %.17g, want NaN", a);
}

static void test_f1_cases(void)
{
    static const int zeros[4] = {0, 0, 0, 0}, ones_pred[4] = {1, 0, 1, 0};
    static const int pred3[6] = {2, 2, 1, 0, 2, 1}, gold3[6] = {2, 1, 1, 2, 2, 0};
    double precision = 3.0 / 4.0, recall = 3.0 / 5.0, f;

    /* TP 3, FP 1, FN 2: the harmonic mean of precision 3/4 and recall 3/5 is 2/3. */
    f = codir_f1(bin_pred, bin_gold, BIN_N, 1);
    CHECK(same_double(f, 2.0 * precision * recall / (precision + recall), 1e-15), "F1 %.17g, want 2/3", f);

    /* Class 0 of the same case: TP 4, FP 2, FN 1, so precision 4/6 and recall 4/5. */
    precision = 4.0 / 6.0;
    recall = 4.0 / 5.0;
    f = codir_f1(bin_pred, bin_gold, BIN_N, 0);
    CHECK(same_double(f, 2.0 * precision * recall / (precision + recall), 1e-15), "F1 of class 0 %.17g, want 8/11", f);

    /* Class 2 of a 3-class case: TP 2, FP 1, FN 1. */
    f = codir_f1(pred3, gold3, 6, 2);
    CHECK(same_double(f, 2.0 / 3.0, 1e-15), "F1 of class 2 %.17g, want 2/3", f);

    f = codir_f1(bin_gold, bin_gold, BIN_N, 1);
    CHECK(f == 1.0, "F1 with every prediction correct %.17g, want 1", f);
    f = codir_f1(zeros, zeros, 4, 1);
    CHECK(isnan(f), "F1 with no positive prediction or label %.17g, want NaN", f);
    f = codir_f1(ones_pred, zeros, 4, 1);
    CHECK(f == 0.0, "F1 with only false positives %.17g, want 0", f);
    f = codir_f1(zeros, ones_pred, 4, 1);
    CHECK(f == 0.0, "F1 with only false negatives %.17g, want 0", f);
}

static void test_matthews_binary(void)
{
    static const int constant[BIN_N] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    int flipped[BIN_N], i;
    double tp = 3, tn = 4, fp = 1, fn = 2, phi, m;

    /* phi of the 2x2 table: (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 10 / sqrt(600) */
    phi = (tp * tn - fp * fn) / sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn));
    CHECK(same_double(phi, 10.0 / sqrt(600.0), 1e-15), "hand phi %.17g", phi);
    m = codir_matthews(bin_pred, bin_gold, BIN_N, 2);
    CHECK(same_double(m, phi, 1e-12), "binary Matthews %.17g, want phi %.17g", m, phi);

    m = codir_matthews(bin_gold, bin_gold, BIN_N, 2);
    CHECK(same_double(m, 1.0, 1e-12), "Matthews of perfect predictions %.17g, want 1", m);
    for (i = 0; i < BIN_N; i++) flipped[i] = 1 - bin_gold[i];
    m = codir_matthews(flipped, bin_gold, BIN_N, 2);
    CHECK(same_double(m, -1.0, 1e-12), "Matthews of inverted predictions %.17g, want -1", m);
    m = codir_matthews(constant, bin_gold, BIN_N, 2);
    CHECK(m == 0.0, "Matthews of a constant prediction %.17g, want 0 as scikit-learn", m);
}

/* Matthews correlation as the Pearson correlation of the one-hot matrices X (pred)
   and Y (gold) [n, K]: cov(X,Y) / sqrt(cov(X,X) cov(Y,Y)), each cov summing the
   products of centered entries over all n * K cells. */
static double ref_matthews_cov(const int *pred, const int *gold, int n, int K)
{
    double cxy = 0.0, cxx = 0.0, cyy = 0.0;
    int i, k;
    for (k = 0; k < K; k++) {
        double mx = 0.0, my = 0.0;
        for (i = 0; i < n; i++) {
            mx += pred[i] == k;
            my += gold[i] == k;
        }
        mx /= n;
        my /= n;
        for (i = 0; i < n; i++) {
            double x = (pred[i] == k) - mx, y = (gold[i] == k) - my;
            cxy += x * y;
            cxx += x * x;
            cyy += y * y;
        }
    }
    return cxy / sqrt(cxx * cyy);
}

static void test_matthews_three_class(void)
{
    /* Confusion matrix (rows gold, columns pred):
           gold 0: 2 1 0
           gold 1: 0 3 0
           gold 2: 1 2 1
       By hand: c = 6 correct of s = 10; predicted counts 3, 6, 1; true counts 3, 3, 4.
       R_K = (6*10 - (9 + 18 + 4)) / sqrt((100 - 46)(100 - 34)) = 29 / sqrt(3564). */
    static const int gold[10] = {0, 0, 0, 1, 1, 1, 2, 2, 2, 2};
    static const int pred[10] = {0, 1, 0, 1, 1, 1, 2, 0, 1, 1};
    double by_cov = ref_matthews_cov(pred, gold, 10, 3), by_hand = 29.0 / sqrt(3564.0), m;
    CHECK(same_double(by_cov, by_hand, 1e-14), "covariance form %.17g disagrees with the hand value %.17g", by_cov,
          by_hand);
    m = codir_matthews(pred, gold, 10, 3);
    CHECK(same_double(m, by_hand, 1e-12), "3-class Matthews %.17g, want 29 / sqrt(3564) = %.17g", m, by_hand);

    /* Random labels with some agreement, against the covariance form. */
    {
        int p[60], g[60], i;
        unsigned long long rng = 5;
        for (i = 0; i < 60; i++) {
            g[i] = (int)check_uniform(&rng, 0.0, 4.0);
            p[i] = check_uniform(&rng, 0.0, 1.0) < 0.6 ? g[i] : (int)check_uniform(&rng, 0.0, 4.0);
        }
        by_cov = ref_matthews_cov(p, g, 60, 4);
        m = codir_matthews(p, g, 60, 4);
        CHECK(same_double(m, by_cov, 1e-12), "4-class Matthews %.17g, covariance form %.17g", m, by_cov);
    }
}

static void test_pearson_cases(void)
{
    static const float x[4] = {1, 2, 3, 4}, y[4] = {2, 1, 4, 3}, flat[4] = {5, 5, 5, 5};
    float lin[4], anti[4];
    double r;
    int i;
    for (i = 0; i < 4; i++) {
        lin[i] = 2.0f * x[i] + 3.0f;
        anti[i] = -0.5f * x[i] + 1.0f;
    }
    r = codir_pearson(x, lin, 4);
    CHECK(same_double(r, 1.0, 1e-12), "Pearson of y = 2x + 3 is %.17g, want 1", r);
    r = codir_pearson(x, anti, 4);
    CHECK(same_double(r, -1.0, 1e-12), "Pearson of y = -x/2 + 1 is %.17g, want -1", r);

    /* Centered, x is {-1.5, -0.5, 0.5, 1.5} and y {-0.5, -1.5, 1.5, 0.5}, so sxy 3, sxx 5, syy 5. */
    r = codir_pearson(x, y, 4);
    CHECK(same_double(r, 3.0 / 5.0, 1e-12), "Pearson of the hand case %.17g, want 3/5", r);

    r = codir_pearson(x, flat, 4);
    CHECK(isnan(r), "Pearson against a constant %.17g, want NaN", r);
    r = codir_pearson(flat, y, 4);
    CHECK(isnan(r), "Pearson of a constant %.17g, want NaN", r);
    r = codir_pearson(x, y, 1);
    CHECK(isnan(r), "Pearson of one pair %.17g, want NaN", r);
}

/* 1-based ranks by counting: 1 + (values below) + (other values equal) / 2, which is
   the average of the positions a tied group occupies. */
static void ref_ranks(const float *x, int n, double *rank)
{
    int i, j;
    for (i = 0; i < n; i++) {
        int below = 0, equal = 0;
        for (j = 0; j < n; j++) {
            below += x[j] < x[i];
            equal += x[j] == x[i] && j != i;
        }
        rank[i] = 1.0 + below + 0.5 * equal;
    }
}

/* Two-pass Pearson correlation in float64. */
static double ref_pearson(const double *x, const double *y, int n)
{
    double mx = 0.0, my = 0.0, sxy = 0.0, sxx = 0.0, syy = 0.0;
    int i;
    for (i = 0; i < n; i++) {
        mx += x[i] / n;
        my += y[i] / n;
    }
    for (i = 0; i < n; i++) {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
        syy += (y[i] - my) * (y[i] - my);
    }
    return sxy / sqrt(sxx * syy);
}

static double ref_spearman(const float *x, const float *y, int n)
{
    double *rx = alloc_doubles((size_t)n), *ry = alloc_doubles((size_t)n), r;
    ref_ranks(x, n, rx);
    ref_ranks(y, n, ry);
    r = ref_pearson(rx, ry, n);
    free(rx);
    free(ry);
    return r;
}

static double spearman_or_fail(const float *x, const float *y, int n)
{
    double r = -2.0;
    int rc = codir_spearman(x, y, n, &r);
    CHECK(rc == CODIR_OK, "codir_spearman returned %d: %s", rc, codir_last_error());
    return r;
}

static void test_spearman_ties(void)
{
    static const float x[4] = {1, 2, 2, 3}, y[4] = {1, 3, 2, 4};
    static const float x5[5] = {3, 1, 3, 3, 2}, y5[5] = {10, 30, 20, 20, 40};
    double r;

    /* Ranks of x are {1, 2.5, 2.5, 4}. Centered, they are {-1.5, 0, 0, 1.5} and y's
       {-1.5, 0.5, -0.5, 1.5}, so sxy 4.5, sxx 4.5, syy 5 and rho = 4.5 / sqrt(22.5) = sqrt(0.9). */
    r = spearman_or_fail(x, y, 4);
    CHECK(same_double(r, sqrt(0.9), 1e-7), "Spearman with a tie %.17g, want sqrt(0.9) = %.17g", r, sqrt(0.9));

    /* Unsorted ties in both: ranks x {4, 1, 4, 4, 2} and y {1, 4, 2.5, 2.5, 5}. Centered,
       they are {1, -2, 1, 1, -1} and {-2, 1, -0.5, -0.5, 2}, so sxy -7, sxx 8, syy 9.5. */
    r = spearman_or_fail(x5, y5, 5);
    CHECK(same_double(r, -7.0 / sqrt(8.0 * 9.5), 1e-7), "Spearman with ties in both %.17g, want %.17g", r,
          -7.0 / sqrt(8.0 * 9.5));

    /* Many ties among 50 values of 6 levels, against ranks by counting. */
    {
        float a[50], b[50];
        unsigned long long rng = 9;
        int i;
        for (i = 0; i < 50; i++) {
            a[i] = (float)(int)check_uniform(&rng, 0.0, 6.0);
            b[i] = a[i] + (float)(int)check_uniform(&rng, 0.0, 4.0);
        }
        r = spearman_or_fail(a, b, 50);
        CHECK(same_double(r, ref_spearman(a, b, 50), 1e-6), "Spearman of 50 tied values %.17g, ranks by counting %.17g",
              r, ref_spearman(a, b, 50));
    }
}

static void test_spearman_monotone(void)
{
    static const float x[6] = {0.3f, -2.0f, 5.0f, 1.0f, 0.0f, 2.5f}, flat[6] = {1, 1, 1, 1, 1, 1};
    float cube[6], decay[6];
    double r;
    int i;
    for (i = 0; i < 6; i++) {
        cube[i] = x[i] * x[i] * x[i];
        decay[i] = expf(-x[i]);
    }
    r = spearman_or_fail(x, cube, 6);
    CHECK(same_double(r, 1.0, 1e-7), "Spearman of x^3 against x %.17g, want 1", r);
    r = spearman_or_fail(x, decay, 6);
    CHECK(same_double(r, -1.0, 1e-7), "Spearman of exp(-x) against x %.17g, want -1", r);
    r = codir_pearson(x, cube, 6);
    CHECK(r < 0.99, "Pearson of x^3 against x is %.6f, so the case is not linear", r);
    r = spearman_or_fail(x, flat, 6);
    CHECK(isnan(r), "Spearman against a constant %.17g, want NaN", r);
}

/* ---- 5. gradient clipping ---- */

typedef struct clip_setup {
    codir_params a, b;
    codir_params *sets[2];
} clip_setup;

/* Creates set a with tensors [3] and [2,2] and set b with one tensor [5]. */
static int clip_init(clip_setup *s)
{
    codir_param_spec sa[2], sb[1];
    int rc;
    memset(s, 0, sizeof *s);
    memset(sa, 0, sizeof sa);
    memset(sb, 0, sizeof sb);
    sa[0].name = "a.vector";
    sa[0].ndim = 1;
    sa[0].shape[0] = 3;
    sa[0].shape[1] = sa[0].shape[2] = sa[0].shape[3] = 1;
    sa[1].name = "a.matrix";
    sa[1].ndim = 2;
    sa[1].shape[0] = 2;
    sa[1].shape[1] = 2;
    sa[1].shape[2] = sa[1].shape[3] = 1;
    sb[0].name = "b.vector";
    sb[0].ndim = 1;
    sb[0].shape[0] = 5;
    sb[0].shape[1] = sb[0].shape[2] = sb[0].shape[3] = 1;
    rc = codir_params_init(&s->a, sa, 2);
    if (!rc) rc = codir_params_init(&s->b, sb, 1);
    CHECK(rc == CODIR_OK, "codir_params_init returned %d: %s", rc, codir_last_error());
    s->sets[0] = &s->a;
    s->sets[1] = &s->b;
    return rc == CODIR_OK;
}

static void clip_free(clip_setup *s)
{
    codir_params_free(&s->a);
    codir_params_free(&s->b);
}

/* Set a gets gradient norm sqrt(29) and set b sqrt(56): each is below 8, but the joint
   norm sqrt(85) = 9.22 is above it. */
static const float clip_grad_a[7] = {1, -2, 2, 0, 4, 0, -2};
static const float clip_grad_b[5] = {2, 0, -4, 0, 6};

static void clip_fill(clip_setup *s)
{
    memcpy(s->a.grad, clip_grad_a, sizeof clip_grad_a);
    memcpy(s->b.grad, clip_grad_b, sizeof clip_grad_b);
}

/* want[i] = grad[i] * scale for the 7 + 5 gradients of both sets. */
static void clip_expect(double scale, double *want_a, double *want_b)
{
    int i;
    for (i = 0; i < 7; i++) want_a[i] = clip_grad_a[i] * scale;
    for (i = 0; i < 5; i++) want_b[i] = clip_grad_b[i] * scale;
}

static void test_clip_joint_norm(void)
{
    clip_setup s;
    double norm, want_a[7], want_b[5], joint = sqrt(85.0), scale;
    if (!clip_init(&s)) goto done;
    CHECK(s.a.count == 7, "set a has %zu parameters, want 7", s.a.count);
    CHECK(s.b.count == 5, "set b has %zu parameters, want 5", s.b.count);

    /* Above the limit: torch's factor max_norm / (norm + 1e-6) on every gradient. */
    clip_fill(&s);
    norm = codir_clip_grad_norm(s.sets, 2, 8.0);
    CHECK(same_double(norm, joint, 1e-6), "returned norm %.9g, want sqrt(85) = %.9g", norm, joint);
    scale = 8.0 / (joint + 1e-6);
    clip_expect(scale, want_a, want_b);
    check_close("clipped gradients of set a", s.a.grad, want_a, 7, 0.0, 1e-6);
    check_close("clipped gradients of set b", s.b.grad, want_b, 5, 0.0, 1e-6);

    /* Below the limit: unchanged, bit for bit. */
    clip_fill(&s);
    norm = codir_clip_grad_norm(s.sets, 2, 9.5);
    CHECK(same_double(norm, joint, 1e-6), "returned norm %.9g, want sqrt(85)", norm);
    CHECK(memcmp(s.a.grad, clip_grad_a, sizeof clip_grad_a) == 0, "set a changed below the limit");
    CHECK(memcmp(s.b.grad, clip_grad_b, sizeof clip_grad_b) == 0, "set b changed below the limit");

    /* Only the listed sets count and change: set a alone, norm sqrt(29), limit 1. */
    clip_fill(&s);
    norm = codir_clip_grad_norm(s.sets, 1, 1.0);
    CHECK(same_double(norm, sqrt(29.0), 1e-6), "norm of set a alone %.9g, want sqrt(29)", norm);
    clip_expect(1.0 / (sqrt(29.0) + 1e-6), want_a, want_b);
    check_close("set a clipped alone", s.a.grad, want_a, 7, 0.0, 1e-6);
    CHECK(memcmp(s.b.grad, clip_grad_b, sizeof clip_grad_b) == 0, "set b changed though it was not listed");
done:
    clip_free(&s);
}

static void test_clip_small_norm(void)
{
    clip_setup s;
    double norm, want[2];
    if (!clip_init(&s)) goto done;

    /* Norm 1e-6 and limit 1e-7: the 1e-6 in the denominator halves the factor, which
       becomes 1e-7 / 2e-6 = 0.05 instead of 0.1. */
    s.a.grad[0] = 6e-7f;
    s.a.grad[1] = 8e-7f;
    norm = codir_clip_grad_norm(s.sets, 2, 1e-7);
    CHECK(same_double(norm, 1e-6, 1e-12), "returned norm %.9g, want 1e-6", norm);
    want[0] = 6e-7 * 0.05;
    want[1] = 8e-7 * 0.05;
    check_close("gradients clipped near zero norm", s.a.grad, want, 2, 0.0, 1e-5);

    /* All zero: the norm is 0 and nothing changes or becomes NaN. */
    memset(s.a.grad, 0, 7 * sizeof(float));
    norm = codir_clip_grad_norm(s.sets, 2, 1.0);
    CHECK(norm == 0.0, "norm of zero gradients %.9g, want 0", norm);
    CHECK(s.a.grad[0] == 0.0f, "zero gradient of set a changed to %g", (double)s.a.grad[0]);
    CHECK(s.b.grad[4] == 0.0f, "zero gradient of set b changed to %g", (double)s.b.grad[4]);
done:
    clip_free(&s);
}

/* ---- 6. accumulation over micro-batches ---- */

/* Examples 0..6 have lengths 6, 3, 8, 2, 5, 4, 7: the micro-batches {0,1,2}, {3,4,5}
   and {6} pad to 8, 5 and 7 tokens, the full batch to 8. */
#define ACC_FULL 7
static const int acc_order[ACC_FULL] = {0, 1, 2, 3, 4, 5, 6};
static const int acc_starts[3] = {0, 3, 6}, acc_sizes[3] = {3, 3, 1};

/* Copies the gradients of params into a float64 array. */
static double *grads_to_doubles(const codir_params *params) { return floats_to_doubles(params->grad, params->count); }

/* Compares each tensor's gradient with want[count]. The tolerance is relative to the
   largest gradient of the tensor, because float sums in another order differ by that
   much: 1e-6 of it at worst with gcc and clang on x86-64, so 4e-6 leaves a margin. */
static void check_same_grads(const char *context, const codir_params *params, const double *want)
{
    int ti;
    for (ti = 0; ti < params->num_tensors; ti++) {
        const codir_tensor *t = &params->tensors[ti];
        const double *w = want + offset_of(params, t);
        double largest = 0.0;
        size_t k;
        char label[160];
        for (k = 0; k < t->numel; k++) largest = fmax(largest, fabs(w[k]));
        snprintf(label, sizeof label, "%s: %s", context, t->name);
        check_close(label, t->grad, w, t->numel, 4e-6 * largest + 1e-9, 1e-6);
    }
}

static void check_task_accumulation(int num_labels)
{
    codir_config cfg = train_config(2, 8, num_labels, 0, 0.0f);
    codir_model *m = create_model(&cfg, 20 + (unsigned long long)num_labels);
    codir_batch batch;
    codir_ctx ctx;
    codir_loss_terms terms;
    toy_data toy;
    double *full, full_loss, micro_loss = 0.0;
    int rc, i, nonzero = 0;
    size_t k;
    if (!m) return;
    toy_init(&toy, num_labels);
    codir_batch_init(&batch, ACC_FULL, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);

    /* One batch of 7 with weight 1. */
    codir_params_zero_grad(&m->params);
    if (!toy_batch(&batch, &toy, acc_order, 0, ACC_FULL)) goto done;
    rc = codir_task_accumulate(&ctx, m, &batch, 1.0f, 0, &terms);
    CHECK(rc == CODIR_OK, "full batch: codir_task_accumulate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    full = grads_to_doubles(&m->params);
    full_loss = terms.task;
    for (k = 0; k < m->params.count; k++) nonzero += full[k] != 0.0;
    CHECK(nonzero > (int)m->params.count / 2, "only %d of %zu gradients are nonzero", nonzero, m->params.count);

    /* Micro-batches of 3, 3 and 1 with weights 3/7, 3/7 and 1/7. */
    codir_params_zero_grad(&m->params);
    for (i = 0; i < 3; i++) {
        if (!toy_batch(&batch, &toy, acc_order, acc_starts[i], acc_sizes[i])) break;
        rc = codir_task_accumulate(&ctx, m, &batch, (float)acc_sizes[i] / ACC_FULL, (uint64_t)i, &terms);
        CHECK(rc == CODIR_OK, "micro-batch %d: codir_task_accumulate returned %d: %s", i, rc, codir_last_error());
        if (rc) break;
        micro_loss += terms.task * acc_sizes[i] / ACC_FULL;
    }
    if (i == 3) {
        CHECK(same_double(micro_loss, full_loss, 1e-5 * fabs(full_loss)),
              "weighted micro-batch losses sum to %.9g, the full batch's loss is %.9g", micro_loss, full_loss);
        check_same_grads(num_labels == 1 ? "regression" : "classification", &m->params, full);
    }
    free(full);
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_accumulate_task_classification(void) { check_task_accumulation(3); }
static void test_accumulate_task_regression(void) { check_task_accumulation(1); }

static void check_distill_accumulation(int num_labels)
{
    codir_config scfg = train_config(1, 8, num_labels, 0, 0.0f), tcfg = train_config(2, 12, num_labels, 0, 0.0f);
    codir_distill_config dcfg = codir_distill_config_default();
    codir_model *student = create_model(&scfg, 30), *teacher = create_model(&tcfg, 31);
    codir_distiller *d = NULL;
    codir_batch batch;
    codir_ctx ctx;
    codir_loss_terms terms;
    toy_data toy;
    double *full = NULL, full_kd = 0.0, micro_kd = 0.0;
    int rc, i;
    size_t k;
    toy_init(&toy, num_labels);
    codir_batch_init(&batch, ACC_FULL, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);
    dcfg.beta = 0.4f;
    dcfg.lambda = 0.0f;
    dcfg.proj_dim = 4;
    dcfg.num_negatives = 2;
    if (student && teacher) d = codir_distiller_create(&dcfg, &scfg, &tcfg, toy.labels, TOY_COUNT, 32);
    CHECK(d != NULL, "codir_distiller_create failed: %s", codir_last_error());
    if (!student || !teacher || !d) goto done;

    /* One batch of 7 with weight 1. */
    codir_params_zero_grad(&student->params);
    codir_params_zero_grad(&d->params);
    if (!toy_batch(&batch, &toy, acc_order, 0, ACC_FULL)) goto done;
    rc = codir_distill_accumulate(&ctx, student, teacher, d, &batch, 1.0f, 0, 1, &terms);
    CHECK(rc == CODIR_OK, "full batch: codir_distill_accumulate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    CHECK(terms.kd > 1e-3, "KD term %g is too small to test", terms.kd);
    full = grads_to_doubles(&student->params);
    full_kd = terms.kd;

    /* Micro-batches of 3, 3 and 1 with weights 3/7, 3/7 and 1/7. */
    codir_params_zero_grad(&student->params);
    for (i = 0; i < 3; i++) {
        if (!toy_batch(&batch, &toy, acc_order, acc_starts[i], acc_sizes[i])) break;
        rc = codir_distill_accumulate(&ctx, student, teacher, d, &batch, (float)acc_sizes[i] / ACC_FULL, (uint64_t)i,
                                      1, &terms);
        CHECK(rc == CODIR_OK, "micro-batch %d: codir_distill_accumulate returned %d: %s", i, rc, codir_last_error());
        if (rc) break;
        micro_kd += terms.kd * acc_sizes[i] / ACC_FULL;
    }
    if (i == 3) {
        CHECK(same_double(micro_kd, full_kd, 1e-5 * full_kd),
              "weighted micro-batch KD terms sum to %.9g, the full batch's is %.9g", micro_kd, full_kd);
        check_same_grads(num_labels == 1 ? "distill regression" : "distill classification", &student->params, full);
    }

    /* With lambda 0 the projection heads are not in the loss. */
    for (k = 0; k < d->params.count; k++)
        if (d->params.grad[k] != 0.0f) break;
    CHECK(k == d->params.count, "projection head gradient %zu is %g with lambda 0", k,
          k < d->params.count ? (double)d->params.grad[k] : 0.0);
done:
    free(full);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_distiller_free(d);
    codir_model_free(student);
    codir_model_free(teacher);
}

static void test_accumulate_distill_classification(void) { check_distill_accumulation(3); }
static void test_accumulate_distill_regression(void) { check_distill_accumulation(1); }

/* ---- 7. prediction and evaluation ---- */

static void test_predict_matches_forward(void)
{
    codir_config cfg = train_config(2, 8, 3, 0, 0.1f);
    codir_model *m = create_model(&cfg, 40);
    codir_batch batch;
    codir_ctx ctx;
    codir_output out;
    toy_data toy;
    float pred[TOY_COUNT * 3];
    double *p, want[TOY_COUNT * 3], got_forward[TOY_COUNT * 3];
    int rc, i;
    if (!m) return;
    toy_init(&toy, 3);
    codir_batch_init(&batch, TOY_COUNT, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 1);

    /* Batches of 3, 3 and 2 in codir_predict; one batch of 8 in the forward pass. */
    rc = codir_predict(&ctx, m, &toy.enc, 3, pred);
    CHECK(rc == CODIR_OK, "codir_predict returned %d: %s", rc, codir_last_error());
    if (rc || !toy_batch(&batch, &toy, NULL, 0, TOY_COUNT)) goto done;
    codir_ctx_begin(&ctx, 0, 0, 0);
    rc = codir_model_forward(&ctx, m, &batch, &out);
    CHECK(rc == CODIR_OK, "codir_model_forward returned %d: %s", rc, codir_last_error());
    if (rc) goto done;
    for (i = 0; i < TOY_COUNT * 3; i++) got_forward[i] = (double)out.logits->data[i];
    check_close("codir_predict against codir_model_forward", pred, got_forward, TOY_COUNT * 3, 1e-6, 1e-5);

    /* Both without dropout, as the float64 reference. */
    p = params_to_doubles(&m->params);
    ref_logits(m, p, &batch, want, NULL);
    check_close("codir_predict against float64", pred, want, TOY_COUNT * 3, 1e-5, 1e-4);
    free(p);

    /* A length past max_len is named instead of read past the sort's buckets. */
    toy.lengths[2] = TOY_LEN + 90;
    codir_clear_error();
    rc = codir_predict(&ctx, m, &toy.enc, 3, pred);
    CHECK(rc == CODIR_ERR_INVALID, "codir_predict accepted length %d: %d", TOY_LEN + 90, rc);
    CHECK(strstr(codir_last_error(), "example 2 has length 98, outside 0..8") != NULL, "reason: %s", codir_last_error());
done:
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

static void test_evaluate_regression(void)
{
    codir_config cfg = train_config(2, 8, 1, 0, 0.0f);
    codir_model *m = create_model(&cfg, 41);
    codir_ctx ctx;
    codir_scores scores;
    toy_data toy;
    float pred[TOY_COUNT];
    double *pd, *yd, want_pearson, want_spearman;
    int rc;
    if (!m) return;
    toy_init(&toy, 1);
    codir_ctx_init(&ctx, 1 << 16, 1);
    rc = codir_predict(&ctx, m, &toy.enc, 3, pred);
    CHECK(rc == CODIR_OK, "codir_predict returned %d: %s", rc, codir_last_error());
    rc = codir_evaluate(&ctx, m, &toy.enc, 3, &scores);
    CHECK(rc == CODIR_OK, "codir_evaluate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;

    /* Pearson and Spearman of the predictions against the targets, by the references here. */
    pd = floats_to_doubles(pred, TOY_COUNT);
    yd = floats_to_doubles(toy.targets, TOY_COUNT);
    want_pearson = ref_pearson(pd, yd, TOY_COUNT);
    want_spearman = ref_spearman(pred, toy.targets, TOY_COUNT);
    CHECK(same_double(scores.pearson, want_pearson, 1e-6), "Pearson %.9g, want %.9g", scores.pearson, want_pearson);
    CHECK(same_double(scores.spearman, want_spearman, 1e-6), "Spearman %.9g, want %.9g", scores.spearman,
          want_spearman);
    CHECK(isnan(scores.accuracy), "accuracy %g for regression, want NaN", scores.accuracy);
    CHECK(isnan(scores.f1), "F1 %g for regression, want NaN", scores.f1);
    CHECK(isnan(scores.matthews), "Matthews %g for regression, want NaN", scores.matthews);
    free(pd);
    free(yd);

    /* A regression model on data without targets is an error, not a crash. */
    toy.enc.targets = NULL;
    rc = codir_evaluate(&ctx, m, &toy.enc, 3, &scores);
    CHECK(rc == CODIR_ERR_INVALID, "regression without targets returned %d, want CODIR_ERR_INVALID", rc);
done:
    codir_ctx_free(&ctx);
    codir_model_free(m);
}

/* Evaluates a num_labels model on toy data and checks the metrics against the argmax
   of codir_predict's outputs, scored by the formulas of this file. */
static void check_evaluate_classes(int num_labels, unsigned long long seed)
{
    codir_config cfg = train_config(2, 8, num_labels, 0, 0.0f);
    codir_model *m = create_model(&cfg, seed);
    codir_ctx ctx;
    codir_scores scores;
    toy_data toy;
    float out[TOY_COUNT * 3];
    int pred[TOY_COUNT], i, v, rc, correct = 0, tp = 0, fp = 0, fn = 0, classes_seen = 0;
    double want_accuracy, want_matthews;
    if (!m) return;
    toy_init(&toy, num_labels);
    codir_ctx_init(&ctx, 1 << 16, 1);
    rc = codir_predict(&ctx, m, &toy.enc, 5, out);
    CHECK(rc == CODIR_OK, "codir_predict returned %d: %s", rc, codir_last_error());
    rc = codir_evaluate(&ctx, m, &toy.enc, 5, &scores);
    CHECK(rc == CODIR_OK, "codir_evaluate returned %d: %s", rc, codir_last_error());
    if (rc) goto done;

    for (i = 0; i < TOY_COUNT; i++) {
        pred[i] = 0;
        for (v = 1; v < num_labels; v++)
            if (out[i * num_labels + v] > out[i * num_labels + pred[i]]) pred[i] = v;
        correct += pred[i] == toy.labels[i];
        tp += pred[i] == 1 && toy.labels[i] == 1;
        fp += pred[i] == 1 && toy.labels[i] != 1;
        fn += pred[i] != 1 && toy.labels[i] == 1;
    }
    for (v = 0; v < num_labels; v++)
        for (i = 0; i < TOY_COUNT; i++)
            if (pred[i] == v) {
                classes_seen++;
                break;
            }
    CHECK(classes_seen >= 2, "the model predicts one class only; pick another seed");
    want_accuracy = (double)correct / TOY_COUNT;
    want_matthews = ref_matthews_cov(pred, toy.labels, TOY_COUNT, num_labels);
    CHECK(same_double(scores.accuracy, want_accuracy, 1e-12), "accuracy %.9g, want %.9g", scores.accuracy,
          want_accuracy);
    CHECK(same_double(scores.matthews, want_matthews, 1e-9), "Matthews %.9g, want %.9g", scores.matthews,
          want_matthews);
    if (num_labels == 2) {
        double precision = (double)tp / (tp + fp), recall = (double)tp / (tp + fn);
        double want_f1 = 2.0 * precision * recall / (precision + recall);
        CHECK(tp > 0, "no true positive in the case; pick another seed");
        CHECK(same_double(scores.f1, want_f1, 1e-12), "F1 %.9g, want %.9g", scores.f1, want_f1);
    } else {
        CHECK(isnan(scores.f1), "F1 %g with %d classes, want NaN", scores.f1, num_labels);
    }
    CHECK(isnan(scores.pearson), "Pearson %g for classification, want NaN", scores.pearson);
    CHECK(isnan(scores.spearman), "Spearman %g for classification, want NaN", scores.spearman);
done:
    codir_ctx_free(&ctx);
    codir_model_free(m);
}

static void test_evaluate_two_classes(void) { check_evaluate_classes(2, 42); }
static void test_evaluate_three_classes(void) { check_evaluate_classes(3, 43); }

/* codir_model_logits against codir_model_forward: the same logits and first-token
   hidden state without dropout, and the same parameter gradients of the task loss. */
static void test_logits_only_forward(void)
{
    codir_config cfg = train_config(2, 8, 3, 0, 0.0f);
    toy_data toy;
    codir_model *m;
    codir_batch batch;
    codir_ctx ctx;
    codir_output full, first;
    codir_tensor *loss;
    float *grad_full = NULL;
    double *want = NULL;
    size_t i, nl;
    int B = 4, b, c, L = cfg.num_layers, T;
    toy_init(&toy, 3);
    m = create_model(&cfg, 11);
    codir_batch_init(&batch, B, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 5);
    if (!m || !toy_batch(&batch, &toy, NULL, 2, B)) goto done;
    T = batch.seq;
    nl = (size_t)B * cfg.num_labels;

    /* Eval, no tape: logits and the first token of the last hidden state. */
    codir_ctx_begin(&ctx, 0, 0, 0);
    CHECK(codir_model_forward(&ctx, m, &batch, &full) == CODIR_OK, "forward: %s", codir_last_error());
    CHECK(codir_model_logits(&ctx, m, &batch, &first) == CODIR_OK, "logits: %s", codir_last_error());
    if (!full.logits || !first.logits) goto done;
    CHECK(first.hidden[L]->ndim == 3, "last hidden state has %d dimensions, not 3", first.hidden[L]->ndim);
    CHECK(first.hidden[L]->shape[0] == B, "last hidden state has %d rows, not %d", first.hidden[L]->shape[0], B);
    CHECK(first.hidden[L]->shape[1] == 1, "last hidden state has %d tokens, not 1", first.hidden[L]->shape[1]);
    CHECK(first.hidden[L]->shape[2] == cfg.hidden, "last hidden state has width %d, not %d", first.hidden[L]->shape[2],
          cfg.hidden);
    want = alloc_doubles(m->params.count > nl ? m->params.count : nl);
    for (i = 0; i < nl; i++) want[i] = full.logits->data[i];
    check_close("logits-only forward", first.logits->data, want, nl, 1e-6, 1e-5);
    for (b = 0; b < B; b++) {
        char what[64];
        snprintf(what, sizeof what, "first token of sequence %d", b);
        for (c = 0; c < cfg.hidden; c++) want[c] = full.hidden[L]->data[((size_t)b * T) * cfg.hidden + c];
        check_close(what, first.hidden[L]->data + (size_t)b * cfg.hidden, want, (size_t)cfg.hidden, 1e-6, 1e-5);
    }

    /* Training, recorded: the gradients of the cross-entropy agree. */
    codir_params_zero_grad(&m->params);
    codir_ctx_begin(&ctx, 1, 1, 1);
    CHECK(codir_model_forward(&ctx, m, &batch, &full) == CODIR_OK, "forward: %s", codir_last_error());
    loss = codir_cross_entropy(&ctx, full.logits, &batch.labels);
    if (!loss || codir_backward(&ctx, loss) != CODIR_OK) goto done;
    grad_full = (float *)malloc(m->params.count * sizeof(float));
    if (!grad_full) goto done;
    memcpy(grad_full, m->params.grad, m->params.count * sizeof(float));
    codir_params_zero_grad(&m->params);
    codir_ctx_begin(&ctx, 1, 1, 1);
    CHECK(codir_model_logits(&ctx, m, &batch, &first) == CODIR_OK, "logits: %s", codir_last_error());
    loss = codir_cross_entropy(&ctx, first.logits, &batch.labels);
    if (!loss || codir_backward(&ctx, loss) != CODIR_OK) goto done;
    for (i = 0; i < m->params.count; i++) want[i] = grad_full[i];
    check_close("parameter gradients through the logits-only forward", m->params.grad, want, m->params.count, 1e-7,
                1e-5);
done:
    free(grad_full);
    free(want);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

/* Returns how many tensors of params still have a packed copy. */
static size_t count_packed(const codir_params *params)
{
    size_t count = 0;
    int t;
    for (t = 0; t < params->num_tensors; t++) count += params->tensors[t].packed != NULL;
    return count;
}

/* Checks that the first n values of op output got have the bits of want[n]; a NULL
   got (a failed op) fails the check. */
static void check_same_bits(const char *what, const codir_tensor *got, const float *want, size_t n)
{
    size_t i, bad = 0;
    CHECK(got != NULL, "%s: the op failed: %s", what, codir_last_error());
    if (!got) return;
    for (i = 0; i < n; i++) bad += memcmp(&got->data[i], &want[i], sizeof(float)) != 0;
    CHECK(bad == 0, "%s: %zu of %zu values differ", what, bad, n);
}

/* codir_model_pack: the packed weights give the bits of the unpacked forward pass.
   The widths leave partial kernel panels, and FFN 600 makes the down projection's k
   span three KC blocks. AdamW, codir_params_copy and codir_model_init_from drop the
   packed copies of what they change. */
static void test_packed_weights(void)
{
    codir_config cfg = train_config(2, 40, 3, 0, 0.0f);
    codir_model *m, *other = NULL;
    codir_batch batch;
    codir_ctx ctx;
    codir_output plain, packed;
    codir_adamw opt;
    float *want = NULL;
    toy_data toy;
    size_t i, n, bad;
    int B = TOY_COUNT;
    cfg.ffn = 600;
    cfg.num_heads = 4;
    toy_init(&toy, 3);
    m = create_model(&cfg, 21);
    codir_batch_init(&batch, B, TOY_LEN);
    codir_ctx_init(&ctx, 1 << 16, 5);
    if (!m || !toy_batch(&batch, &toy, NULL, 0, B)) goto done;

    codir_ctx_begin(&ctx, 0, 0, 0);
    CHECK(codir_model_forward(&ctx, m, &batch, &plain) == CODIR_OK, "forward: %s", codir_last_error());
    if (!plain.logits) goto done;
    n = (size_t)B * batch.seq * cfg.hidden;
    want = (float *)malloc((n + (size_t)B * 3) * sizeof(float));
    if (!want) goto done;
    memcpy(want, plain.hidden[cfg.num_layers]->data, n * sizeof(float));
    memcpy(want + n, plain.logits->data, (size_t)B * 3 * sizeof(float));

    CHECK(codir_model_pack(m) == CODIR_OK, "codir_model_pack: %s", codir_last_error());
    CHECK(m->layers[1].ffn_down_w->packed != NULL, "the FFN down projection was not packed");
    CHECK(m->cls_w->packed != NULL, "the classifier was not packed");
    CHECK(m->tok_emb->packed == NULL, "the embedding table was packed");
    codir_ctx_begin(&ctx, 0, 0, 0);
    CHECK(codir_model_forward(&ctx, m, &batch, &packed) == CODIR_OK, "packed forward: %s", codir_last_error());
    if (!packed.logits) goto done;
    check_same_bits("last hidden state with packed weights", packed.hidden[cfg.num_layers], want, n);
    check_same_bits("logits with packed weights", packed.logits, want + n, (size_t)B * 3);

    /* A struct copy viewing a packed weight [40, 600] as [80, 300] cannot use the
       packed copy, whose panels and blocks follow the other shape: its product
       equals the unpacked one. */
    {
        codir_tensor view = *m->layers[0].ffn_down_w, *x, *y_packed;
        int shape[2] = {3, 300};
        float y_plain[3 * 80];
        view.shape[0] = 80;
        view.shape[1] = 300;
        codir_ctx_begin(&ctx, 0, 0, 0);
        x = codir_tensor_new(&ctx, 2, shape, 0);
        if (x) {
            for (i = 0; i < x->numel; i++) x->data[i] = (float)((i * 37) % 11) - 5.0f;
            y_packed = codir_linear(&ctx, x, &view, NULL);
            CHECK(codir_linear_forward(NULL, y_plain, x->data, view.data, NULL, 3, 300, 80) == CODIR_OK, "linear: %s",
                  codir_last_error());
            check_same_bits("reshaped view of a packed weight", y_packed, y_plain, 3 * 80);
        }
    }
    CHECK(codir_model_pack(NULL) == CODIR_ERR_INVALID, "codir_model_pack(NULL) did not fail");

    /* Whatever changes weights drops their packed copies, also for struct copies made
       before the change. */
    {
        codir_tensor copy = *m->cls_w, *x, *y;
        int shape[2] = {2, 40};
        float want_y[2 * 3];
        codir_params_zero_grad(&m->params);
        for (i = 0; i < m->params.count; i++) m->params.grad[i] = 0.5f;
        if (codir_adamw_init(&opt, &m->params, 0.9f, 0.98f, 1e-6f, 0.01f) == CODIR_OK) {
            codir_adamw_step(&opt, &m->params, 0.01f);
            codir_adamw_free(&opt);
        }
        codir_ctx_begin(&ctx, 0, 0, 0);
        x = codir_tensor_new(&ctx, 2, shape, 0);
        if (x) {
            for (i = 0; i < x->numel; i++) x->data[i] = (float)(i % 7) - 3.0f;
            y = codir_linear(&ctx, x, &copy, NULL);
            codir_linear_forward(NULL, want_y, x->data, m->cls_w->data, NULL, 2, 40, 3);
            check_same_bits("copy of a weight after an AdamW step", y, want_y, 6);

            /* A copy stays safe through codir_model_unpack, and after a manual write
               and a second codir_model_pack it reads the new packed values. */
            CHECK(codir_model_pack(m) == CODIR_OK, "codir_model_pack: %s", codir_last_error());
            copy = *m->cls_w;
            codir_model_unpack(m);
            y = codir_linear(&ctx, x, &copy, NULL);
            check_same_bits("copy of a weight after codir_model_unpack", y, want_y, 6);
            m->cls_w->data[0] += 1.0f;
            CHECK(codir_model_pack(m) == CODIR_OK, "codir_model_pack again: %s", codir_last_error());
            y = codir_linear(&ctx, x, &copy, NULL);
            codir_linear_forward(NULL, want_y, x->data, m->cls_w->data, NULL, 2, 40, 3);
            check_same_bits("copy of a weight after packing new values", y, want_y, 6);
        }
    }
    codir_params_zero_grad(&m->params);
    if (codir_adamw_init(&opt, &m->params, 0.9f, 0.98f, 1e-6f, 0.01f) == CODIR_OK) {
        codir_adamw_step(&opt, &m->params, 0.01f);
        codir_adamw_free(&opt);
    }
    bad = count_packed(&m->params);
    CHECK(bad == 0, "%zu tensors kept packed copies through an AdamW step", bad);
    CHECK(codir_model_pack(m) == CODIR_OK, "second codir_model_pack: %s", codir_last_error());
    other = create_model(&cfg, 22);
    if (other) {
        CHECK(codir_params_copy(&m->params, &other->params) == CODIR_OK, "copy: %s", codir_last_error());
        bad = count_packed(&m->params);
        CHECK(bad == 0, "%zu tensors kept packed copies through codir_params_copy", bad);
        CHECK(codir_model_pack(m) == CODIR_OK, "third codir_model_pack: %s", codir_last_error());
        CHECK(codir_model_init_from(m, other, CODIR_INIT_FIRST_K) == CODIR_OK, "init_from: %s", codir_last_error());
        bad = count_packed(&m->params);
        CHECK(bad == 0, "%zu tensors kept packed copies through codir_model_init_from", bad);
    }
done:
    free(want);
    codir_model_free(other);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_model_free(m);
}

const test_case tests_train[] = {
    {"train packed weights give the same forward pass", test_packed_weights},
    {"train logits-only forward matches the full forward", test_logits_only_forward},
    {"train types copied into batch", test_types_in_batch},
    {"train types shift embeddings by type rows", test_types_shift_embeddings},
    {"train types forward matches float64", test_types_forward_matches_reference},
    {"train types grad check", test_types_grad_check},
    {"train regression task grad check", test_regression_task_grad_check},
    {"train regression distill uses mse", test_regression_distill_mse},
    {"train mlm logits match float64", test_mlm_logits_match_reference},
    {"train mlm grad check", test_mlm_grad_check},
    {"train mlm needs mlm_head", test_mlm_needs_head},
    {"train gather rows kernels", test_gather_rows_kernels},
    {"train gather rows op backward", test_gather_rows_op},
    {"train accuracy hand cases", test_accuracy_cases},
    {"train f1 hand cases", test_f1_cases},
    {"train matthews binary phi", test_matthews_binary},
    {"train matthews three classes", test_matthews_three_class},
    {"train pearson hand cases", test_pearson_cases},
    {"train spearman average tie ranks", test_spearman_ties},
    {"train spearman monotone nonlinear", test_spearman_monotone},
    {"train clip joint norm", test_clip_joint_norm},
    {"train clip near zero norm", test_clip_small_norm},
    {"train accumulate task classification", test_accumulate_task_classification},
    {"train accumulate task regression", test_accumulate_task_regression},
    {"train accumulate distill classification", test_accumulate_distill_classification},
    {"train accumulate distill regression", test_accumulate_distill_regression},
    {"train teacher cache matches the teacher bit for bit", test_teacher_cache_exact},
    {"train predict matches forward", test_predict_matches_forward},
    {"train evaluate regression", test_evaluate_regression},
    {"train evaluate two classes", test_evaluate_two_classes},
    {"train evaluate three classes", test_evaluate_three_classes},
};
const int tests_train_count = sizeof tests_train / sizeof tests_train[0];
