/* Conformance of a whole model and a whole CoDIR step against PyTorch.

   tests/reference/make_reference.py (PyTorch, float64) wrote the weights of a BERT-style
   teacher (2 blocks) and student (1 block) as Hugging Face folders, and
   tests/reference/reference.safetensors: one padded batch of sentence pairs, projection
   heads, memory banks, hyperparameters, and what PyTorch computed from them. That is
   every hidden state and the logits, each loss term, the gradient of every student
   parameter and of both projection heads, and the parameters after one AdamW step.
   These tests load the same files with codir_model_load and codir_safetensors_open,
   run the same computation in float32 and compare every tensor under
   |got - want| <= atol + rtol * |want|. A failure names the tensor, the worst index and
   both values. Python is needed only to regenerate the files (tests/reference/README.md).

   Set REFERENCE_VERBOSE=1 to print the largest error of every tensor compared. */
#include "check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tolerances. Against the float64 reference, no error measured used more than 10% of
   its tolerance (GCC 12, x86-64, -O0 to -O3, sanitizers, OpenMP on and off, scalar or
   SIMD GEMM). tests/reference/README.md lists the largest errors.
   Values: hidden states, logits, losses, projections and banks. */
#define VALUE_ATOL 1e-5
#define VALUE_RTOL 1e-4
/* Gradients sum many products, some of them cancelling (a LayerNorm backward subtracts
   two means of similar size), so an element's error scales with the tensor's largest
   gradient, not with its own value: atol is GRAD_ATOL times the largest |want| of the
   tensor. */
#define GRAD_ATOL 4e-6
#define GRAD_RTOL 1e-4
/* Parameters after the step, plus a term per element for the gradient's error (see
   compare_after_step). */
#define STEP_ATOL 2e-6
#define STEP_RTOL 1e-5

/* ---- fixture files ---- */

/* Allocates or exits: a test without its buffers cannot report anything useful. */
static void *ref_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_reference.c: out of memory allocating %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

/* Stores the path of tests/reference/<name> in path[size]. The fixture lives beside
   this source file, and __FILE__ is relative to the folder the compiler ran in, which
   is where the tests run from. */
static const char *ref_path(char *path, size_t size, const char *name)
{
    const char *file = __FILE__;
    const char *slash = strrchr(file, '/');
    int dir_length = slash ? (int)(slash - file + 1) : 0;
    snprintf(path, size, "%.*sreference/%s", dir_length, file, name);
    return path;
}

/* The batch and hyperparameters of the fixture, and the open fixture file. */
typedef struct reference {
    codir_safetensors *st;
    int B, T, K, N, D, P;       /* batch, sequence length, negatives, bank rows, projection
                                   size, masked-LM rows */
    int *ids, *types, *mask;    /* [B, T] */
    int *labels;                /* [B] class ids */
    int *example_ids;           /* [B] bank rows of the examples */
    float *targets;             /* [B] regression targets */
    int *negatives;             /* [B, K] bank rows */
    int *all_labels;            /* [N] label of every bank row */
    int *mlm_positions;         /* [P] rows b * T + t of the masked-LM head */
    int *mlm_targets;           /* [P] token ids */
    float beta, temperature, lambda, tau, lr, weight_decay, adam_beta1, adam_beta2, adam_eps, momentum;
} reference;

/* Returns the fixture tensor `name`, or NULL after a failed check naming it. */
static const codir_st_tensor *ref_find(const reference *ref, const char *name)
{
    const codir_st_tensor *t = codir_safetensors_find(ref->st, name);
    CHECK(t != NULL, "tensor %s is missing from reference.safetensors; rerun tests/reference/make_reference.py", name);
    return t;
}

/* Returns tensor `name` as a new float array of *count values, or NULL. */
static float *ref_floats(const reference *ref, const char *name, size_t *count)
{
    const codir_st_tensor *t = ref_find(ref, name);
    float *x;
    if (!t) return NULL;
    x = (float *)ref_alloc(t->numel * sizeof(float));
    if (codir_safetensors_read_f32(ref->st, name, x, t->numel)) {
        CHECK(0, "cannot read %s: %s", name, codir_last_error());
        free(x);
        return NULL;
    }
    if (count) *count = t->numel;
    return x;
}

/* Returns tensor `name`, whose values must be whole numbers, as a new int array. */
static int *ref_ints(const reference *ref, const char *name, size_t *count)
{
    size_t n = 0, i;
    float *x = ref_floats(ref, name, &n);
    int *out;
    if (!x) return NULL;
    out = (int *)ref_alloc(n * sizeof(int));
    for (i = 0; i < n; i++) {
        out[i] = (int)x[i];
        CHECK((float)out[i] == x[i], "%s[%zu] = %g is not a whole number", name, i, (double)x[i]);
    }
    free(x);
    if (count) *count = n;
    return out;
}

/* Returns the one value of tensor `name`, or NaN. */
static float ref_scalar(const reference *ref, const char *name)
{
    size_t n = 0;
    float *x = ref_floats(ref, name, &n), v;
    if (!x) return NAN;
    CHECK(n == 1, "%s holds %zu values; expected 1", name, n);
    v = x[0];
    free(x);
    return v;
}

/* Copies tensor `name` into dst[count], which must be its exact size. */
static int ref_fill(const reference *ref, const char *name, float *dst, size_t count)
{
    const codir_st_tensor *t = ref_find(ref, name);
    if (!t) return 0;
    if (t->numel != count) {
        CHECK(0, "%s holds %zu values; codir.h expects %zu", name, t->numel, count);
        return 0;
    }
    if (codir_safetensors_read_f32(ref->st, name, dst, count)) {
        CHECK(0, "cannot read %s: %s", name, codir_last_error());
        return 0;
    }
    return 1;
}

static void ref_close(reference *ref)
{
    codir_safetensors_close(ref->st);
    free(ref->ids);
    free(ref->types);
    free(ref->mask);
    free(ref->labels);
    free(ref->example_ids);
    free(ref->targets);
    free(ref->negatives);
    free(ref->all_labels);
    free(ref->mlm_positions);
    free(ref->mlm_targets);
    memset(ref, 0, sizeof *ref);
}

/* Opens reference.safetensors and reads the batch and hyperparameters. */
static int ref_open(reference *ref)
{
    char path[1024];
    const codir_st_tensor *ids, *neg, *bank;
    size_t n;
    memset(ref, 0, sizeof *ref);
    ref->st = codir_safetensors_open(ref_path(path, sizeof path, "reference.safetensors"));
    if (!ref->st) {
        CHECK(0, "cannot open %s: %s", path, codir_last_error());
        return 0;
    }
    ids = ref_find(ref, "input.ids");
    neg = ref_find(ref, "input.negatives");
    bank = ref_find(ref, "bank.teacher");
    if (!ids || !neg || !bank || ids->ndim != 2 || neg->ndim != 2 || bank->ndim != 2) {
        CHECK(0, "input.ids, input.negatives and bank.teacher must be matrices");
        ref_close(ref);
        return 0;
    }
    ref->B = (int)ids->shape[0];
    ref->T = (int)ids->shape[1];
    ref->K = (int)neg->shape[1];
    ref->D = (int)bank->shape[1];
    ref->ids = ref_ints(ref, "input.ids", NULL);
    ref->types = ref_ints(ref, "input.types", NULL);
    ref->mask = ref_ints(ref, "input.mask", NULL);
    ref->labels = ref_ints(ref, "input.labels", NULL);
    ref->example_ids = ref_ints(ref, "input.example_ids", NULL);
    ref->targets = ref_floats(ref, "input.targets", NULL);
    ref->negatives = ref_ints(ref, "input.negatives", NULL);
    ref->all_labels = ref_ints(ref, "input.all_labels", &n);
    ref->N = (int)n;
    ref->mlm_positions = ref_ints(ref, "input.mlm_positions", &n);
    ref->P = (int)n;
    ref->mlm_targets = ref_ints(ref, "input.mlm_targets", NULL);
    ref->beta = ref_scalar(ref, "config.beta");
    ref->temperature = ref_scalar(ref, "config.temperature");
    ref->lambda = ref_scalar(ref, "config.lambda");
    ref->tau = ref_scalar(ref, "config.tau");
    ref->lr = ref_scalar(ref, "config.lr");
    ref->weight_decay = ref_scalar(ref, "config.weight_decay");
    ref->adam_beta1 = ref_scalar(ref, "config.adam_beta1");
    ref->adam_beta2 = ref_scalar(ref, "config.adam_beta2");
    ref->adam_eps = ref_scalar(ref, "config.adam_eps");
    ref->momentum = ref_scalar(ref, "config.momentum");
    if (!ref->ids || !ref->types || !ref->mask || !ref->labels || !ref->example_ids || !ref->targets ||
        !ref->negatives || !ref->all_labels || !ref->mlm_positions || !ref->mlm_targets) {
        ref_close(ref);
        return 0;
    }
    return 1;
}

/* ---- comparisons ---- */

/* Prints the largest error of a comparison, and the largest fraction of its tolerance
   that an element used, when REFERENCE_VERBOSE is set. */
static void report_error(const char *name, const float *got, const double *want, size_t n, double atol, double rtol)
{
    size_t i;
    double worst_error = 0.0, worst_use = 0.0;
    if (!getenv("REFERENCE_VERBOSE")) return;
    for (i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]);
        double use = e / (atol + rtol * fabs(want[i]));
        if (e > worst_error) worst_error = e;
        if (use > worst_use) worst_use = use;
    }
    printf("  %-48s max |error| %-9.3g uses %.3f of the tolerance\n", name, worst_error, worst_use);
}

/* Compares got[n] with fixture tensor `name`. grad_scaled = 1 multiplies atol by the
   largest |want| of the tensor. */
static void compare_scaled(const reference *ref, const char *name, const float *got, size_t n, double atol,
                           double rtol, int grad_scaled)
{
    size_t count = 0, i;
    float *want_f = ref_floats(ref, name, &count);
    double *want;
    double scale = 0.0;
    if (!want_f) return;
    if (count != n) {
        CHECK(0, "%s holds %zu values; codir.h has %zu", name, count, n);
        free(want_f);
        return;
    }
    want = (double *)ref_alloc(n * sizeof(double));
    for (i = 0; i < n; i++) {
        want[i] = (double)want_f[i];
        if (fabs(want[i]) > scale) scale = fabs(want[i]);
    }
    if (grad_scaled) atol *= scale;
    report_error(name, got, want, n, atol, rtol);
    check_close(name, got, want, n, atol, rtol);
    free(want);
    free(want_f);
}

static void compare(const reference *ref, const char *name, const float *got, size_t n, double atol, double rtol)
{
    compare_scaled(ref, name, got, n, atol, rtol, 0);
}

/* Compares a loss term with the fixture's "<scenario>.loss.<term>". */
static void compare_loss(const reference *ref, const char *scenario, const char *term, double got)
{
    char name[128];
    float value = (float)got;
    snprintf(name, sizeof name, "%s.loss.%s", scenario, term);
    compare(ref, name, &value, 1, VALUE_ATOL, VALUE_RTOL);
}

/* Compares the gradient of every tensor of params with "<scenario>.grad.<name>". */
static void compare_grads(const reference *ref, const char *scenario, const codir_params *params)
{
    int i;
    for (i = 0; i < params->num_tensors; i++) {
        const codir_tensor *t = &params->tensors[i];
        char name[160];
        snprintf(name, sizeof name, "%s.grad.%s", scenario, t->name);
        compare_scaled(ref, name, t->grad, t->numel, GRAD_ATOL, GRAD_RTOL, 1);
    }
}

/* Compares every tensor of params with "<scenario>.after.<name>" after one AdamW step.

   The first step moves a parameter by lr * g / (|g| + eps) (plus weight decay), whose
   derivative in g is lr * eps / (|g| + eps)^2, up to lr / eps (1e4 here) near g = 0.
   So the float32 error of a gradient, bounded by its tolerance gtol, shifts the step by
   up to lr * eps * gtol / (|g| + eps)^2, which each element adds to its tolerance. The
   addition is capped at 2 lr, because both steps are at most lr long. For a tensor
   whose largest gradient is about 1, it exceeds STEP_ATOL only where |g| < 150 eps,
   as for the key bias, whose exact gradient is 0 (a softmax over keys ignores a shift
   shared by all keys). The second step of the heads reuses the bound with its own
   gradients, none of which is below 2e-5. */
static void compare_after_step(const reference *ref, const char *scenario, const codir_params *params)
{
    int i;
    for (i = 0; i < params->num_tensors; i++) {
        const codir_tensor *t = &params->tensors[i];
        char name[160], grad_name[160];
        size_t n = 0, n_grad = 0, k, bad = 0, worst = 0;
        float *want = NULL, *grad = NULL;
        double scale = 0.0, worst_excess = -1.0, worst_tol = 0.0, worst_error = 0.0, worst_use = 0.0;
        double lr = ref->lr, eps = ref->adam_eps;
        snprintf(name, sizeof name, "%s.after.%s", scenario, t->name);
        snprintf(grad_name, sizeof grad_name, "%s.grad.%s", scenario, t->name);
        want = ref_floats(ref, name, &n);
        grad = ref_floats(ref, grad_name, &n_grad);
        if (want && grad && (n != t->numel || n_grad != t->numel))
            CHECK(0, "%s holds %zu values and %s %zu; codir.h has %zu", name, n, grad_name, n_grad, t->numel);
        if (!want || !grad || n != t->numel || n_grad != t->numel) {
            free(want);
            free(grad);
            continue;
        }
        for (k = 0; k < n; k++)
            if (fabs((double)grad[k]) > scale) scale = fabs((double)grad[k]);
        for (k = 0; k < n; k++) {
            double g = fabs((double)grad[k]), w = (double)want[k];
            double gtol = GRAD_ATOL * scale + GRAD_RTOL * g;
            double shift = lr * eps * gtol / ((g + eps) * (g + eps));
            double tol = STEP_ATOL + STEP_RTOL * fabs(w) + (shift < 2.0 * lr ? shift : 2.0 * lr);
            double error = fabs((double)t->data[k] - w), excess = error - tol;
            if (error > worst_error) worst_error = error;
            if (error / tol > worst_use) worst_use = error / tol;
            if (!(excess <= 0.0)) {
                bad++;
                if (!(excess <= worst_excess)) {
                    worst_excess = excess;
                    worst = k;
                    worst_tol = tol;
                }
            }
        }
        if (getenv("REFERENCE_VERBOSE"))
            printf("  %-48s max |error| %-9.3g uses %.3f of the tolerance\n", name, worst_error, worst_use);
        CHECK(bad == 0, "%s: %zu of %zu values off; worst [%zu] got %.9g want %.9g (tolerance %g there, gradient %g)",
              name, bad, n, worst, (double)t->data[worst], (double)want[worst], worst_tol, (double)grad[worst]);
        free(want);
        free(grad);
    }
}

/* ---- models, batch and distiller ---- */

static codir_model *load_model(const char *folder)
{
    char path[1024];
    codir_model *m = codir_model_load(ref_path(path, sizeof path, folder));
    CHECK(m != NULL, "codir_model_load(%s) failed: %s", path, codir_last_error());
    return m;
}

static void set_view(codir_itensor *t, int ndim, int d0, int d1)
{
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = ndim > 1 ? d1 : 1;
    t->shape[2] = 1;
    t->shape[3] = 1;
    t->numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1);
}

/* Fills batch with the fixture's batch. */
static int make_batch(const reference *ref, codir_batch *batch)
{
    size_t n = (size_t)ref->B * (size_t)ref->T;
    if (codir_batch_init(batch, ref->B, ref->T)) {
        CHECK(0, "codir_batch_init failed: %s", codir_last_error());
        return 0;
    }
    memcpy(batch->ids.data, ref->ids, n * sizeof(int));
    memcpy(batch->types.data, ref->types, n * sizeof(int));
    memcpy(batch->mask.data, ref->mask, n * sizeof(int));
    memcpy(batch->labels.data, ref->labels, (size_t)ref->B * sizeof(int));
    memcpy(batch->example_ids.data, ref->example_ids, (size_t)ref->B * sizeof(int));
    memcpy(batch->targets, ref->targets, (size_t)ref->B * sizeof(float));
    batch->batch = ref->B;
    batch->seq = ref->T;
    set_view(&batch->ids, 2, ref->B, ref->T);
    set_view(&batch->types, 2, ref->B, ref->T);
    set_view(&batch->mask, 2, ref->B, ref->T);
    set_view(&batch->labels, 1, ref->B, 1);
    set_view(&batch->example_ids, 1, ref->B, 1);
    return 1;
}

/* Kinds of task, as in make_reference.py. */
enum { TASK_CLASSIFICATION, TASK_MLM, TASK_REGRESSION };

/* Where the NCE normalizers come from. */
enum { NORMALIZERS_NONE, NORMALIZERS_ESTIMATED, NORMALIZERS_GIVEN };

/* One setting of the fixture: its tensors are named "<name>.<...>". */
typedef struct scenario {
    const char *name;
    int task;                   /* TASK_* */
    int mode;                   /* CODIR_CRD_INFONCE or CODIR_CRD_NCE */
    int pooling;                /* CODIR_POOL_MEAN or CODIR_POOL_FIRST */
    int normalizers;            /* NORMALIZERS_*: estimated by codir on this batch, or given */
    int has_step;               /* 1: the fixture contains the parameters after the step */
} scenario;

static const scenario scenario_infonce_mean = {"infonce_mean", TASK_CLASSIFICATION, CODIR_CRD_INFONCE,
                                               CODIR_POOL_MEAN, NORMALIZERS_NONE, 1};
static const scenario scenario_infonce_first = {"infonce_first", TASK_CLASSIFICATION, CODIR_CRD_INFONCE,
                                                CODIR_POOL_FIRST, NORMALIZERS_NONE, 0};
static const scenario scenario_nce_mean = {"nce_mean", TASK_CLASSIFICATION, CODIR_CRD_NCE, CODIR_POOL_MEAN,
                                           NORMALIZERS_ESTIMATED, 0};
static const scenario scenario_nce_first = {"nce_first", TASK_CLASSIFICATION, CODIR_CRD_NCE, CODIR_POOL_FIRST,
                                            NORMALIZERS_GIVEN, 1};
static const scenario scenario_mlm = {"mlm", TASK_MLM, CODIR_CRD_INFONCE, CODIR_POOL_MEAN, NORMALIZERS_NONE, 1};
static const scenario scenario_regression = {"regression", TASK_REGRESSION, CODIR_CRD_NCE, CODIR_POOL_MEAN,
                                             NORMALIZERS_GIVEN, 1};

/* Everything one scenario runs on. */
typedef struct setup {
    reference ref;
    codir_model *teacher, *student;
    codir_distiller *d;
    codir_batch batch;
    codir_ctx ctx;
    int ctx_ready;
} setup;

static void setup_free(setup *s)
{
    if (s->ctx_ready) codir_ctx_free(&s->ctx);
    codir_batch_free(&s->batch);
    codir_distiller_free(s->d);
    codir_model_free(s->teacher);
    codir_model_free(s->student);
    ref_close(&s->ref);
    memset(s, 0, sizeof *s);
}

/* Loads the models of the scenario's task, and a distiller whose heads, banks and
   (when given) normalizers are the fixture's. */
static int setup_init(setup *s, const scenario *sc)
{
    codir_distill_config dc = codir_distill_config_default();
    int i, regression = sc->task == TASK_REGRESSION;
    memset(s, 0, sizeof *s);
    if (!ref_open(&s->ref)) return 0;
    s->teacher = load_model(regression ? "teacher_regression" : "teacher");
    s->student = load_model(regression ? "student_regression" : "student");
    if (!s->teacher || !s->student || !make_batch(&s->ref, &s->batch)) goto fail;
    CHECK(s->student->cfg.dropout == 0.0f, "the fixture's models must have dropout 0, not %g",
          (double)s->student->cfg.dropout);

    dc.beta = s->ref.beta;
    dc.temperature = s->ref.temperature;
    dc.lambda = s->ref.lambda;
    dc.tau = s->ref.tau;
    dc.momentum = s->ref.momentum;
    dc.num_negatives = s->ref.K;
    dc.proj_dim = s->ref.D;
    dc.mode = sc->mode;
    dc.pooling = sc->pooling;
    s->d = codir_distiller_create(&dc, &s->student->cfg, &s->teacher->cfg, s->ref.all_labels, s->ref.N, 1);
    if (!s->d) {
        CHECK(0, "codir_distiller_create failed: %s", codir_last_error());
        goto fail;
    }
    for (i = 0; i < s->d->params.num_tensors; i++) {
        codir_tensor *t = &s->d->params.tensors[i];
        char name[128];
        snprintf(name, sizeof name, "heads.%s", t->name);
        if (!ref_fill(&s->ref, name, t->data, t->numel)) goto fail;
    }
    if (!ref_fill(&s->ref, "bank.teacher", s->d->bank, (size_t)s->ref.N * (size_t)s->d->cfg.proj_dim)) goto fail;
    if (s->d->bank_s &&
        !ref_fill(&s->ref, "bank.student", s->d->bank_s, (size_t)s->ref.N * (size_t)s->d->cfg.proj_dim))
        goto fail;
    if (sc->normalizers == NORMALIZERS_GIVEN) {
        char name[128];
        snprintf(name, sizeof name, "%s.log_z_t", sc->name);
        s->d->log_z_t = ref_scalar(&s->ref, name);
        snprintf(name, sizeof name, "%s.log_z_s", sc->name);
        s->d->log_z_s = ref_scalar(&s->ref, name);
        s->d->z_ready = 1;
    }
    if (codir_ctx_init(&s->ctx, (size_t)1 << 20, 1)) {
        CHECK(0, "codir_ctx_init failed: %s", codir_last_error());
        goto fail;
    }
    s->ctx_ready = 1;
    return 1;

fail:
    setup_free(s);
    return 0;
}

/* Checks the projections and, for NCE, the normalizers of a scenario. */
static void compare_projections(const setup *s, const scenario *sc, const codir_tensor *zt)
{
    char name[128];
    float log_z;
    snprintf(name, sizeof name, "%s.zs", sc->name);
    if (s->d->last_zs) compare(&s->ref, name, s->d->last_zs->data, s->d->last_zs->numel, VALUE_ATOL, VALUE_RTOL);
    snprintf(name, sizeof name, "%s.zt", sc->name);
    if (zt) compare(&s->ref, name, zt->data, zt->numel, VALUE_ATOL, VALUE_RTOL);
    if (sc->normalizers == NORMALIZERS_NONE) return;
    snprintf(name, sizeof name, "%s.log_z_t", sc->name);
    log_z = (float)s->d->log_z_t;
    compare(&s->ref, name, &log_z, 1, VALUE_ATOL, VALUE_RTOL);
    snprintf(name, sizeof name, "%s.log_z_s", sc->name);
    log_z = (float)s->d->log_z_s;
    compare(&s->ref, name, &log_z, 1, VALUE_ATOL, VALUE_RTOL);
}

/* Takes one AdamW step on the student and the heads, as torch.optim.AdamW with the
   fixture's settings, and compares every parameter afterwards. */
static void step_and_compare(setup *s, const scenario *sc)
{
    codir_adamw opt_student, opt_heads;
    int rc = codir_adamw_init(&opt_student, &s->student->params, s->ref.adam_beta1, s->ref.adam_beta2,
                              s->ref.adam_eps, s->ref.weight_decay);
    CHECK(rc == CODIR_OK, "codir_adamw_init failed: %s", codir_last_error());
    if (rc) return;
    rc = codir_adamw_init(&opt_heads, &s->d->params, s->ref.adam_beta1, s->ref.adam_beta2, s->ref.adam_eps,
                          s->ref.weight_decay);
    CHECK(rc == CODIR_OK, "codir_adamw_init failed: %s", codir_last_error());
    if (rc) {
        codir_adamw_free(&opt_student);
        return;
    }
    codir_adamw_step(&opt_student, &s->student->params, s->ref.lr);
    codir_adamw_step(&opt_heads, &s->d->params, s->ref.lr);
    compare_after_step(&s->ref, sc->name, &s->student->params);
    compare_after_step(&s->ref, sc->name, &s->d->params);
    codir_adamw_free(&opt_student);
    codir_adamw_free(&opt_heads);
}

/* Runs one scenario by hand, op by op: the frozen teacher without tape, the recorded
   student, the three loss terms with the fixture's negatives, backward, AdamW. */
static void run_scenario(const scenario *sc)
{
    setup s;
    codir_ctx *ctx;
    codir_output t_out, s_out;
    codir_tensor *parts[3] = {NULL, NULL, NULL}, *loss, *zt = NULL;
    codir_itensor mlm_targets;
    float weights[3];
    int rc;
    if (!setup_init(&s, sc)) return;
    ctx = &s.ctx;

    /* The frozen teacher: no dropout, no tape. */
    codir_ctx_begin(ctx, 0, 0, 0);
    rc = codir_model_forward(ctx, s.teacher, &s.batch, &t_out);
    CHECK(rc == CODIR_OK, "teacher forward failed: %s", codir_last_error());

    /* The student, recorded; dropout is 0, so training mode changes nothing. */
    ctx->recording = 1;
    ctx->training = 1;
    if (!rc) rc = codir_model_forward(ctx, s.student, &s.batch, &s_out);
    CHECK(rc == CODIR_OK, "student forward failed: %s", codir_last_error());
    if (rc) goto done;

    /* L = (1 - beta) L_task + beta L_kd + lambda L_crd. */
    weights[0] = 1.0f - s.ref.beta;
    weights[1] = s.ref.beta;
    weights[2] = s.ref.lambda;
    if (sc->task == TASK_CLASSIFICATION) {
        parts[0] = codir_cross_entropy(ctx, s_out.logits, &s.batch.labels);
        parts[1] = codir_kl_div(ctx, s_out.logits, t_out.logits, s.ref.temperature);
    } else if (sc->task == TASK_REGRESSION) {
        parts[0] = codir_mse(ctx, s_out.logits, s.batch.targets);
        parts[1] = codir_mse(ctx, s_out.logits, t_out.logits->data);
    } else {
        codir_tensor *s_mlm = codir_mlm_logits(ctx, s.student, s_out.hidden[s_out.num_hidden - 1],
                                               s.ref.mlm_positions, s.ref.P);
        codir_tensor *t_mlm;
        ctx->recording = 0;
        t_mlm = codir_mlm_logits(ctx, s.teacher, t_out.hidden[t_out.num_hidden - 1], s.ref.mlm_positions, s.ref.P);
        ctx->recording = 1;
        mlm_targets.data = s.ref.mlm_targets;
        set_view(&mlm_targets, 1, s.ref.P, 1);
        parts[0] = codir_cross_entropy(ctx, s_mlm, &mlm_targets);
        parts[1] = codir_kl_div(ctx, s_mlm, t_mlm, s.ref.temperature);
    }
    parts[2] = codir_crd_loss_fixed(ctx, s.d, &s_out, &t_out, &s.batch, s.ref.negatives, s.ref.K, &zt);
    loss = codir_weighted_sum(ctx, parts, weights, 3);
    CHECK(loss != NULL, "%s: the loss failed: %s", sc->name, codir_last_error());
    if (!loss) goto done;
    compare_loss(&s.ref, sc->name, "task", parts[0]->data[0]);
    compare_loss(&s.ref, sc->name, "kd", parts[1]->data[0]);
    compare_loss(&s.ref, sc->name, "crd", parts[2]->data[0]);
    compare_loss(&s.ref, sc->name, "total", loss->data[0]);
    compare_projections(&s, sc, zt);

    /* Backward into the student and both heads. */
    codir_params_zero_grad(&s.student->params);
    codir_params_zero_grad(&s.d->params);
    rc = codir_backward(ctx, loss);
    CHECK(rc == CODIR_OK, "%s: backward failed: %s", sc->name, codir_last_error());
    if (rc) goto done;
    compare_grads(&s.ref, sc->name, &s.student->params);
    compare_grads(&s.ref, sc->name, &s.d->params);
    if (sc->has_step) step_and_compare(&s, sc);

done:
    setup_free(&s);
}

/* ---- tests ---- */

/* Every hidden state and the logits of both models, and the masked-LM logits. */
static void test_forward(void)
{
    setup s;
    codir_output t_out, s_out;
    codir_tensor *t_mlm, *s_mlm;
    char name[64];
    int l, rc;
    if (!setup_init(&s, &scenario_infonce_mean)) return;
    codir_ctx_begin(&s.ctx, 0, 0, 0);
    rc = codir_model_forward(&s.ctx, s.teacher, &s.batch, &t_out);
    if (!rc) rc = codir_model_forward(&s.ctx, s.student, &s.batch, &s_out);
    CHECK(rc == CODIR_OK, "forward failed: %s", codir_last_error());
    if (rc) goto done;
    CHECK(t_out.num_hidden == 3, "the teacher has %d hidden layers; expected 3", t_out.num_hidden);
    CHECK(s_out.num_hidden == 2, "the student has %d hidden layers; expected 2", s_out.num_hidden);
    for (l = 0; l < t_out.num_hidden; l++) {
        snprintf(name, sizeof name, "forward.teacher.hidden.%d", l);
        compare(&s.ref, name, t_out.hidden[l]->data, t_out.hidden[l]->numel, VALUE_ATOL, VALUE_RTOL);
    }
    for (l = 0; l < s_out.num_hidden; l++) {
        snprintf(name, sizeof name, "forward.student.hidden.%d", l);
        compare(&s.ref, name, s_out.hidden[l]->data, s_out.hidden[l]->numel, VALUE_ATOL, VALUE_RTOL);
    }
    compare(&s.ref, "forward.teacher.logits", t_out.logits->data, t_out.logits->numel, VALUE_ATOL, VALUE_RTOL);
    compare(&s.ref, "forward.student.logits", s_out.logits->data, s_out.logits->numel, VALUE_ATOL, VALUE_RTOL);

    t_mlm = codir_mlm_logits(&s.ctx, s.teacher, t_out.hidden[2], s.ref.mlm_positions, s.ref.P);
    s_mlm = codir_mlm_logits(&s.ctx, s.student, s_out.hidden[1], s.ref.mlm_positions, s.ref.P);
    CHECK(t_mlm != NULL, "teacher masked-LM logits failed: %s", codir_last_error());
    CHECK(s_mlm != NULL, "student masked-LM logits failed: %s", codir_last_error());
    if (t_mlm) compare(&s.ref, "forward.teacher.mlm_logits", t_mlm->data, t_mlm->numel, VALUE_ATOL, VALUE_RTOL);
    if (s_mlm) compare(&s.ref, "forward.student.mlm_logits", s_mlm->data, s_mlm->numel, VALUE_ATOL, VALUE_RTOL);

done:
    setup_free(&s);
}

static void test_regression_forward(void)
{
    setup s;
    codir_output t_out, s_out;
    int rc;
    if (!setup_init(&s, &scenario_regression)) return;
    codir_ctx_begin(&s.ctx, 0, 0, 0);
    rc = codir_model_forward(&s.ctx, s.teacher, &s.batch, &t_out);
    if (!rc) rc = codir_model_forward(&s.ctx, s.student, &s.batch, &s_out);
    CHECK(rc == CODIR_OK, "forward failed: %s", codir_last_error());
    if (!rc) {
        CHECK(s.student->cfg.num_labels == 1, "the regression student has %d labels", s.student->cfg.num_labels);
        compare(&s.ref, "forward.teacher_regression.logits", t_out.logits->data, t_out.logits->numel, VALUE_ATOL,
                VALUE_RTOL);
        compare(&s.ref, "forward.student_regression.logits", s_out.logits->data, s_out.logits->numel, VALUE_ATOL,
                VALUE_RTOL);
    }
    setup_free(&s);
}

static void test_infonce_mean(void) { run_scenario(&scenario_infonce_mean); }
static void test_infonce_first(void) { run_scenario(&scenario_infonce_first); }
static void test_nce_estimated(void) { run_scenario(&scenario_nce_mean); }
static void test_nce_given(void) { run_scenario(&scenario_nce_first); }
static void test_mlm(void) { run_scenario(&scenario_mlm); }
static void test_regression(void) { run_scenario(&scenario_regression); }

/* Compares the memory banks after an update with "<scenario>.bank_after.*". */
static void compare_banks(const setup *s, const scenario *sc)
{
    char name[128];
    size_t n = (size_t)s->ref.N * (size_t)s->d->cfg.proj_dim;
    snprintf(name, sizeof name, "%s.bank_after.teacher", sc->name);
    compare(&s->ref, name, s->d->bank, n, VALUE_ATOL, VALUE_RTOL);
    if (!s->d->bank_s) return;
    snprintf(name, sizeof name, "%s.bank_after.student", sc->name);
    compare(&s->ref, name, s->d->bank_s, n, VALUE_ATOL, VALUE_RTOL);
}

/* codir_distill_step samples its own negatives. The fixture's negatives of each
   example are all 8 examples of the other labels, which is the whole pool the sampler
   draws K = 8 from, and both scores sum over the negatives, so the library's own step
   must reach the same loss, gradients, parameters and bank, twice in a row. */
static void test_distill_step(void)
{
    const scenario *sc = &scenario_infonce_mean;
    setup s;
    codir_adamw opt_student, opt_heads;
    codir_loss_terms terms;
    int rc;
    if (!setup_init(&s, sc)) return;
    rc = codir_adamw_init(&opt_student, &s.student->params, s.ref.adam_beta1, s.ref.adam_beta2, s.ref.adam_eps,
                          s.ref.weight_decay);
    if (!rc)
        rc = codir_adamw_init(&opt_heads, &s.d->params, s.ref.adam_beta1, s.ref.adam_beta2, s.ref.adam_eps,
                              s.ref.weight_decay);
    CHECK(rc == CODIR_OK, "codir_adamw_init failed: %s", codir_last_error());
    if (rc) {
        setup_free(&s);
        return;
    }
    rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_student, &opt_heads, &s.batch, s.ref.lr, &terms);
    CHECK(rc == CODIR_OK, "codir_distill_step failed: %s", codir_last_error());
    if (!rc) {
        compare_loss(&s.ref, sc->name, "task", terms.task);
        compare_loss(&s.ref, sc->name, "kd", terms.kd);
        compare_loss(&s.ref, sc->name, "crd", terms.crd);
        compare_loss(&s.ref, sc->name, "total", terms.total);
        compare_grads(&s.ref, sc->name, &s.student->params);
        compare_grads(&s.ref, sc->name, &s.d->params);
        compare_after_step(&s.ref, sc->name, &s.student->params);
        compare_after_step(&s.ref, sc->name, &s.d->params);
        compare_banks(&s, sc);

        /* A second step, from the moved parameters and bank: unlike the first, its
           update depends on AdamW's betas. The fixture keeps only the heads of it. */
        rc = codir_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_student, &opt_heads, &s.batch, s.ref.lr,
                                &terms);
        CHECK(rc == CODIR_OK, "second codir_distill_step failed: %s", codir_last_error());
    }
    if (!rc) {
        compare_loss(&s.ref, "infonce_mean_step2", "task", terms.task);
        compare_loss(&s.ref, "infonce_mean_step2", "kd", terms.kd);
        compare_loss(&s.ref, "infonce_mean_step2", "crd", terms.crd);
        compare_loss(&s.ref, "infonce_mean_step2", "total", terms.total);
        compare_grads(&s.ref, "infonce_mean_step2", &s.d->params);
        compare_after_step(&s.ref, "infonce_mean_step2", &s.d->params);
        compare(&s.ref, "infonce_mean_step2.bank_after.teacher", s.d->bank,
                (size_t)s.ref.N * (size_t)s.d->cfg.proj_dim, VALUE_ATOL, VALUE_RTOL);
    }
    codir_adamw_free(&opt_student);
    codir_adamw_free(&opt_heads);
    setup_free(&s);
}

/* Runs codir_distill_accumulate on one scenario and compares its losses, projections
   and gradients, and the memory banks when update_bank is 1. */
static void check_distill_accumulate(const scenario *sc, int update_bank)
{
    setup s;
    codir_loss_terms terms;
    int rc;
    if (!setup_init(&s, sc)) return;
    codir_params_zero_grad(&s.student->params);
    codir_params_zero_grad(&s.d->params);
    rc = codir_distill_accumulate(&s.ctx, s.student, s.teacher, s.d, &s.batch, 1.0f, 0, update_bank, &terms);
    CHECK(rc == CODIR_OK, "codir_distill_accumulate failed: %s", codir_last_error());
    if (!rc) {
        compare_loss(&s.ref, sc->name, "task", terms.task);
        compare_loss(&s.ref, sc->name, "kd", terms.kd);
        compare_loss(&s.ref, sc->name, "crd", terms.crd);
        compare_loss(&s.ref, sc->name, "total", terms.total);
        compare_projections(&s, sc, NULL);
        compare_grads(&s.ref, sc->name, &s.student->params);
        compare_grads(&s.ref, sc->name, &s.d->params);
        if (update_bank) compare_banks(&s, sc);
    }
    setup_free(&s);
}

/* The same for codir_distill_accumulate in NCE mode, which also estimates the
   normalizers on this first batch and moves both banks. */
static void test_distill_accumulate_nce(void) { check_distill_accumulate(&scenario_nce_mean, 1); }

/* codir_distill_accumulate with first-token pooling. The features then read token 0
   only, so both models run their last block for the first token alone after its
   attention. */
static void test_distill_accumulate_first(void) { check_distill_accumulate(&scenario_infonce_first, 0); }

/* codir_pretrain_distill_step (CoDIR-Pre) on the masked-LM setting. The batch's ids
   stay unmasked, which the step accepts, because the objective reads only which rows
   are scored and against which target ids. */
static void test_pretrain_distill_step(void)
{
    const scenario *sc = &scenario_mlm;
    setup s;
    codir_mlm_batch mb;
    codir_adamw opt_student, opt_heads;
    codir_loss_terms terms;
    int rc;
    if (!setup_init(&s, sc)) return;
    memset(&mb, 0, sizeof mb);
    mb.batch = s.batch;
    mb.masked_ids = s.batch.ids.data;
    mb.positions = s.ref.mlm_positions;
    mb.targets = s.ref.mlm_targets;
    mb.count = s.ref.P;
    mb.capacity = (size_t)s.ref.B * (size_t)s.ref.T;
    rc = codir_adamw_init(&opt_student, &s.student->params, s.ref.adam_beta1, s.ref.adam_beta2, s.ref.adam_eps,
                          s.ref.weight_decay);
    if (!rc)
        rc = codir_adamw_init(&opt_heads, &s.d->params, s.ref.adam_beta1, s.ref.adam_beta2, s.ref.adam_eps,
                              s.ref.weight_decay);
    CHECK(rc == CODIR_OK, "codir_adamw_init failed: %s", codir_last_error());
    if (rc) {
        setup_free(&s);
        return;
    }
    rc = codir_pretrain_distill_step(&s.ctx, s.student, s.teacher, s.d, &opt_student, &opt_heads, &mb, s.ref.lr,
                                     &terms);
    CHECK(rc == CODIR_OK, "codir_pretrain_distill_step failed: %s", codir_last_error());
    if (!rc) {
        compare_loss(&s.ref, sc->name, "task", terms.task);
        compare_loss(&s.ref, sc->name, "kd", terms.kd);
        compare_loss(&s.ref, sc->name, "crd", terms.crd);
        compare_loss(&s.ref, sc->name, "total", terms.total);
        compare_grads(&s.ref, sc->name, &s.student->params);
        compare_grads(&s.ref, sc->name, &s.d->params);
        compare_after_step(&s.ref, sc->name, &s.student->params);
        compare_after_step(&s.ref, sc->name, &s.d->params);
        compare_banks(&s, sc);
    }
    codir_adamw_free(&opt_student);
    codir_adamw_free(&opt_heads);
    setup_free(&s);
}

const test_case tests_reference[] = {
    {"reference forward hidden states and logits", test_forward},
    {"reference regression forward", test_regression_forward},
    {"reference step infonce mean pooling", test_infonce_mean},
    {"reference step infonce first token", test_infonce_first},
    {"reference step nce estimated normalizers", test_nce_estimated},
    {"reference step nce given normalizers", test_nce_given},
    {"reference step masked-LM head", test_mlm},
    {"reference step regression head", test_regression},
    {"reference codir_distill_step", test_distill_step},
    {"reference codir_distill_accumulate nce", test_distill_accumulate_nce},
    {"reference codir_distill_accumulate first token", test_distill_accumulate_first},
    {"reference codir_pretrain_distill_step", test_pretrain_distill_step},
};
const int tests_reference_count = (int)(sizeof tests_reference / sizeof tests_reference[0]);
