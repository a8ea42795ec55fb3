/* distill.c - train a BERT-style teacher on labelled sentences, then distil it into a
   student with half the layers four ways and compare them:

     teacher        the fine-tuned teacher
     task           the student trained on the task loss alone
     kd             task loss + KD on the teacher's softened outputs
     codir-nce      task + KD + the contrastive term in the NCE form of the official
                    CoDIR code (github.com/intersun/CoDIR)
     codir-infonce  task + KD + the contrastive term in the InfoNCE form of the CoDIR
                    paper (Sun et al., EMNLP 2020, arXiv:2009.14167)

   All students have the same size and start from the same initialization (every
   other teacher block when the widths match, else random).

   Build and run from the repository root:

       cc -std=c11 -O2 -fopenmp examples/distill.c -o distill -lm && ./distill

   The default data is examples/data/uci-sentiment (train.tsv and dev.tsv with a
   "sentence<TAB>label" header). `./distill --help` lists every option. */
#define _POSIX_C_SOURCE 200809L /* mkdir */
#define CODIR_IMPLEMENTATION
#include "../codir.h"

#include <errno.h>
#ifdef _WIN32
#include <direct.h>
#else
#include <sys/stat.h>
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NUM_STUDENTS 4
#define MAX_SEEDS 16
#define MAX_EPOCHS 200
/* The maximum number of classes: a larger class id is almost surely a typo. */
#define MAX_CLASSES 10000

/* Command-line options of a run. */
typedef struct options {
    const char *data_dir, *teacher_dir, *save_teacher_dir, *curves, *student_init_dir;
    int vocab_size, max_len, batch_size, seed, seeds, threads;
    int teacher_layers, student_layers, hidden, heads, ffn, init_from_teacher;
    int teacher_epochs, student_epochs;
    float lr, weight_decay, warmup, dropout;
    float beta, temperature, lambda, tau, momentum;
    int negatives, proj_dim, pooling, cache_mb, train_limit;
} options;

static void set_defaults(options *o)
{
    o->data_dir = "examples/data/uci-sentiment";
    o->teacher_dir = NULL;
    o->save_teacher_dir = NULL;
    o->curves = "distill_curves";
    o->student_init_dir = NULL;
    o->vocab_size = 3000;
    o->max_len = 64;
    o->batch_size = 32;
    o->seed = 1;
    o->seeds = 1;
    o->threads = 0;
    o->teacher_layers = 4;
    o->student_layers = 0;
    o->hidden = 128;
    o->heads = 4;
    o->ffn = 512;
    o->init_from_teacher = 1;
    o->teacher_epochs = 8;
    o->student_epochs = 6;
    o->lr = 5e-4f;
    o->weight_decay = 0.1f;
    o->warmup = 0.06f;
    o->dropout = 0.1f;
    o->beta = 0.5f;
    o->temperature = 2.0f;
    o->lambda = 0.1f;
    o->tau = 0.07f;
    o->momentum = 0.5f;
    o->negatives = 100;
    o->proj_dim = 128;
    o->pooling = CODIR_POOL_MEAN;
    o->cache_mb = 1024;
    o->train_limit = 0;
}

static void print_help(const options *d)
{
    printf("usage: distill [options]\n\n"
           "Trains a teacher on DIR/train.tsv (or loads one), then one student size four ways from\n"
           "the same initialization: task loss only, + KD, + KD + CoDIR (NCE), + KD + CoDIR\n"
           "(InfoNCE). Prints dev metrics, inference speed and training curves.\n\n");
    printf("  --data DIR            folder with train.tsv and dev.tsv (default %s)\n", d->data_dir);
    printf("  --teacher DIR         load the teacher from a model folder instead of training it; its\n"
           "                        vocab.txt (uncased) replaces the learned vocabulary\n");
    printf("  --student-init DIR    start every student from this model folder, e.g. a pre-distilled\n"
           "                        student, instead of from the teacher's blocks\n");
    printf("  --save-teacher DIR    save the trained teacher and vocab.txt as a model folder; created if\n"
           "                        missing, its parent must exist\n");
    printf("  --curves PREFIX       write PREFIX.csv and PREFIX.svg, the training curves (default %s)\n", d->curves);
    printf("  --train-limit N       use only the first N rows of train.tsv; 0 uses all (default %d)\n", d->train_limit);
    printf("  --vocab-size N        WordPiece vocabulary learned from train.tsv, tokens (default %d)\n", d->vocab_size);
    printf("  --max-len N           longest sequence incl. [CLS] and [SEP], tokens (default %d)\n", d->max_len);
    printf("  --batch N             examples per training step (default %d)\n", d->batch_size);
    printf("  --teacher-layers N    teacher transformer blocks (default %d)\n", d->teacher_layers);
    printf("  --student-layers N    student blocks; 0 means half the teacher's (default %d)\n", d->student_layers);
    printf("  --hidden N            model width of teacher and student (default %d)\n", d->hidden);
    printf("  --heads N             attention heads; must divide --hidden (default %d)\n", d->heads);
    printf("  --ffn N               feed-forward inner width (default %d)\n", d->ffn);
    printf("  --init teacher|random students start from every other teacher block, or randomly\n"
           "                        (default %s)\n", d->init_from_teacher ? "teacher" : "random");
    printf("  --teacher-epochs N    passes over train.tsv for the teacher (default %d)\n", d->teacher_epochs);
    printf("  --student-epochs N    passes over train.tsv for each student (default %d)\n", d->student_epochs);
    printf("  --seeds N             train the students N times, seeds --seed .. --seed+N-1, and\n"
           "                        report mean and standard deviation (default %d)\n", d->seeds);
    printf("  --lr X                peak learning rate of AdamW (default %g)\n", (double)d->lr);
    printf("  --weight-decay X      AdamW decoupled weight decay (default %g)\n", (double)d->weight_decay);
    printf("  --warmup X            warmup as a fraction of all steps (default %g)\n", (double)d->warmup);
    printf("  --dropout X           dropout probability (default %g)\n", (double)d->dropout);
    printf("  --beta X              weight of the KD loss; the task loss gets 1 - beta (default %g)\n", (double)d->beta);
    printf("  --temperature X       KD softmax temperature T (default %g)\n", (double)d->temperature);
    printf("  --lambda X            weight of the contrastive loss, a batch mean; the official\n"
           "                        code's crd_weight equals lambda * batch (default %g)\n", (double)d->lambda);
    printf("  --tau X               contrastive temperature (default %g)\n", (double)d->tau);
    printf("  --negatives N         negatives per example from the memory bank (default %d)\n", d->negatives);
    printf("  --proj-dim N          size of the contrastive projections (default %d)\n", d->proj_dim);
    printf("  --momentum X          memory bank momentum (default %g)\n", (double)d->momentum);
    printf("  --pooling mean|first  pooling of each mapped layer (default %s)\n",
           d->pooling == CODIR_POOL_MEAN ? "mean" : "first");
    printf("  --teacher-cache-mb N  compute the teacher's outputs once per example when they fit in N MiB,\n"
           "                        else run the teacher every step; 0 always runs it (default %d)\n", d->cache_mb);
    printf("  --seed N              seed of initialization, shuffling and dropout (default %d)\n", d->seed);
    printf("  --threads N           OpenMP threads; 0 keeps the OpenMP default (default %d)\n", d->threads);
    printf("  --help                print this text\n");
}

/* Parses an integer option value in [min, max]; prints an error and returns 0 if invalid. */
static int parse_int(const char *name, const char *text, long min, long max, int *out)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "distill: invalid value '%s' for %s: expected an integer in [%ld, %ld]\n", text, name, min, max);
        return 0;
    }
    *out = (int)v;
    return 1;
}

/* Parses a float option value in [min, max]; prints an error and returns 0 if invalid. */
static int parse_float(const char *name, const char *text, double min, double max, float *out)
{
    char *end;
    double v = strtod(text, &end);
    if (*text == '\0' || *end != '\0' || !(v >= min && v <= max)) {
        fprintf(stderr, "distill: invalid value '%s' for %s: expected a number in [%g, %g]\n", text, name, min, max);
        return 0;
    }
    *out = (float)v;
    return 1;
}

/* Parses one of two words into 1 (first) or 0 (second). */
static int parse_choice(const char *name, const char *text, const char *one, const char *zero, int *out)
{
    if (strcmp(text, one) == 0) *out = 1;
    else if (strcmp(text, zero) == 0) *out = 0;
    else {
        fprintf(stderr, "distill: invalid value '%s' for %s: expected %s or %s\n", text, name, one, zero);
        return 0;
    }
    return 1;
}

/* Returns 1 on success, 0 after printing an error, 2 when --help was given. */
static int parse_args(int argc, char **argv, options *o)
{
    int i, first = 0;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return 2;
        if (!v || strncmp(v, "--", 2) == 0) {
            fprintf(stderr, "distill: option %s needs a value (see --help)\n", a);
            return 0;
        }
        if (strcmp(a, "--data") == 0) ok = (o->data_dir = v) != NULL;
        else if (strcmp(a, "--teacher") == 0) ok = (o->teacher_dir = v) != NULL;
        else if (strcmp(a, "--student-init") == 0) ok = (o->student_init_dir = v) != NULL;
        else if (strcmp(a, "--save-teacher") == 0) ok = (o->save_teacher_dir = v) != NULL;
        else if (strcmp(a, "--curves") == 0) ok = (o->curves = v) != NULL;
        else if (strcmp(a, "--train-limit") == 0) ok = parse_int(a, v, 0, 2000000000L, &o->train_limit);
        else if (strcmp(a, "--vocab-size") == 0) ok = parse_int(a, v, 16, 1000000, &o->vocab_size);
        else if (strcmp(a, "--max-len") == 0) ok = parse_int(a, v, 3, 4096, &o->max_len);
        else if (strcmp(a, "--batch") == 0) ok = parse_int(a, v, 1, 65536, &o->batch_size);
        else if (strcmp(a, "--teacher-layers") == 0) ok = parse_int(a, v, 1, 128, &o->teacher_layers);
        else if (strcmp(a, "--student-layers") == 0) ok = parse_int(a, v, 0, 128, &o->student_layers);
        else if (strcmp(a, "--hidden") == 0) ok = parse_int(a, v, 1, 65536, &o->hidden);
        else if (strcmp(a, "--heads") == 0) ok = parse_int(a, v, 1, 1024, &o->heads);
        else if (strcmp(a, "--ffn") == 0) ok = parse_int(a, v, 1, 262144, &o->ffn);
        else if (strcmp(a, "--init") == 0) ok = parse_choice(a, v, "teacher", "random", &o->init_from_teacher);
        else if (strcmp(a, "--teacher-epochs") == 0) ok = parse_int(a, v, 1, MAX_EPOCHS, &o->teacher_epochs);
        else if (strcmp(a, "--student-epochs") == 0) ok = parse_int(a, v, 1, MAX_EPOCHS, &o->student_epochs);
        else if (strcmp(a, "--seeds") == 0) ok = parse_int(a, v, 1, MAX_SEEDS, &o->seeds);
        else if (strcmp(a, "--lr") == 0) ok = parse_float(a, v, 1e-8, 1.0, &o->lr);
        else if (strcmp(a, "--weight-decay") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->weight_decay);
        else if (strcmp(a, "--warmup") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->warmup);
        else if (strcmp(a, "--dropout") == 0) ok = parse_float(a, v, 0.0, 0.9, &o->dropout);
        else if (strcmp(a, "--beta") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->beta);
        else if (strcmp(a, "--temperature") == 0) ok = parse_float(a, v, 1e-3, 1e3, &o->temperature);
        else if (strcmp(a, "--lambda") == 0) ok = parse_float(a, v, 0.0, 1e3, &o->lambda);
        else if (strcmp(a, "--tau") == 0) ok = parse_float(a, v, 1e-3, 1e3, &o->tau);
        else if (strcmp(a, "--momentum") == 0) ok = parse_float(a, v, 0.0, 0.999, &o->momentum);
        else if (strcmp(a, "--negatives") == 0) ok = parse_int(a, v, 1, 1000000, &o->negatives);
        else if (strcmp(a, "--proj-dim") == 0) ok = parse_int(a, v, 1, 65536, &o->proj_dim);
        else if (strcmp(a, "--teacher-cache-mb") == 0) ok = parse_int(a, v, 0, 1000000, &o->cache_mb);
        else if (strcmp(a, "--pooling") == 0) {
            ok = parse_choice(a, v, "first", "mean", &first);
            o->pooling = first ? CODIR_POOL_FIRST : CODIR_POOL_MEAN;
        } else if (strcmp(a, "--seed") == 0) ok = parse_int(a, v, 0, 2000000000L, &o->seed);
        else if (strcmp(a, "--threads") == 0) ok = parse_int(a, v, 0, 1024, &o->threads);
        else {
            fprintf(stderr, "distill: unknown option %s (see --help)\n", a);
            return 0;
        }
        if (!ok) return 0;
        i++;
    }
    if (o->student_layers == 0) o->student_layers = o->teacher_layers > 1 ? o->teacher_layers / 2 : 1;
    if (o->hidden % o->heads != 0) {
        fprintf(stderr, "distill: --heads %d does not divide --hidden %d\n", o->heads, o->hidden);
        return 0;
    }
    return 1;
}

/* Creates folder `dir` unless it exists (mkdir is POSIX; the library itself needs
   only C11). Returns 0, or 1 after printing an error. */
static int make_folder(const char *dir)
{
#ifdef _WIN32
    int rc = _mkdir(dir);
#else
    int rc = mkdir(dir, 0777);
#endif
    char probe[4096];
    FILE *file;
    if (rc != 0 && errno != EEXIST) {
        fprintf(stderr, "distill: cannot create the folder %s: %s\n", dir, strerror(errno));
        return 1;
    }
    /* The path may exist as a file, or as a folder this user cannot write: find out
       now by creating and removing a file in it, not after training. */
    if (snprintf(probe, sizeof probe, "%s/.write_check.tmp", dir) >= (int)sizeof probe) {
        fprintf(stderr, "distill: the folder path %s is too long\n", dir);
        return 1;
    }
    file = fopen(probe, "wb");
    if (!file) {
        fprintf(stderr, "distill: cannot write into the folder %s: %s; give a writable folder\n", dir, strerror(errno));
        return 1;
    }
    fclose(file);
    remove(probe);
    return 0;
}

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One point of a training curve. */
typedef struct curve_point {
    double loss, task, kd, crd, dev;
} curve_point;

/* State shared by the training runs. */
typedef struct run_data {
    const options *opt;
    codir_encoded *train, *dev;
    codir_batch batch;
    codir_ctx ctx;
    int *order;
    int regression;             /* 1 when the data has float targets */
    codir_teacher_cache *cache; /* the teacher's outputs per training example, or NULL */
    const codir_vocab *vocab;   /* the vocabulary of train and dev */
    FILE *csv;                  /* training curves, or NULL */
} run_data;

/* The dev metric: accuracy for classification, Pearson correlation for regression. */
static double dev_metric(const run_data *rd, const codir_scores *s)
{
    return rd->regression ? s->pearson : s->accuracy;
}

/* Trains `model` for `epochs` passes, writing one curve point per epoch to curve[].
   With a teacher and distiller it runs CoDIR steps, else task-only steps. Returns 0 on
   success, 1 after printing an error. */
static int train(run_data *rd, const char *name, int seed, codir_model *model, const codir_model *teacher,
                 codir_distiller *dist, int epochs, curve_point *curve)
{
    const options *o = rd->opt;
    codir_adamw opt, opt_heads;
    long steps_per_epoch = (rd->train->count + o->batch_size - 1) / o->batch_size;
    long total = steps_per_epoch * epochs, warmup = (long)(o->warmup * (float)total), step = 0;
    uint64_t rng = (uint64_t)seed * 0x9E3779B97F4A7C15ull + 7;
    int epoch, i, status = 0;

    if (codir_adamw_init(&opt, &model->params, 0.9f, 0.98f, 1e-6f, o->weight_decay) ||
        (dist && codir_adamw_init(&opt_heads, &dist->params, 0.9f, 0.98f, 1e-6f, o->weight_decay))) {
        fprintf(stderr, "distill: %s\n", codir_last_error());
        return 1;
    }
    for (i = 0; i < rd->train->count; i++) rd->order[i] = i;
    rd->ctx.seed = (uint64_t)seed;

    for (epoch = 1; epoch <= epochs && !status; epoch++) {
        double t0 = now_seconds(), sums[4] = {0, 0, 0, 0};
        long start, n_steps = 0;
        codir_scores dev;
        for (i = 0; i < rd->train->count; i++) rd->order[i] = i;
        codir_shuffle(rd->order, rd->train->count, &rng);
        codir_bucket_by_length(rd->order, rd->train->count, rd->train, 16 * o->batch_size, o->batch_size, &rng);
        for (start = 0; start < rd->train->count; start += o->batch_size, step++) {
            int n = rd->train->count - (int)start < o->batch_size ? rd->train->count - (int)start : o->batch_size;
            float lr = codir_lr_schedule(step, total, warmup, o->lr);
            codir_loss_terms terms;
            int rc = codir_batch_fill(&rd->batch, rd->train, rd->order, (int)start, n);
            if (!rc && dist && rd->cache)
                rc = codir_distill_step_cached(&rd->ctx, model, rd->cache, dist, &opt, &opt_heads, &rd->batch, lr, &terms);
            else if (!rc && dist)
                rc = codir_distill_step(&rd->ctx, model, teacher, dist, &opt, &opt_heads, &rd->batch, lr, &terms);
            else if (!rc) rc = codir_task_step(&rd->ctx, model, &opt, &rd->batch, lr, &terms);
            if (rc) {
                fprintf(stderr, "distill: training %s failed at epoch %d: %s\n", name, epoch, codir_last_error());
                status = 1;
                break;
            }
            if (dist && dist->cfg.mode == CODIR_CRD_NCE && step == 0)
                printf("nce_normalizer model=%s seed=%d log_z_teacher_anchor=%.4f log_z_student_anchor=%.4f\n", name, seed,
                       dist->log_z_t, dist->log_z_s);
            sums[0] += terms.total;
            sums[1] += terms.task;
            sums[2] += terms.kd;
            sums[3] += terms.crd;
            n_steps++;
        }
        if (status) break;
        if (codir_evaluate(&rd->ctx, model, rd->dev, 64, &dev)) {
            fprintf(stderr, "distill: evaluating %s failed: %s\n", name, codir_last_error());
            status = 1;
            break;
        }
        curve[epoch - 1].loss = sums[0] / n_steps;
        curve[epoch - 1].task = sums[1] / n_steps;
        curve[epoch - 1].kd = sums[2] / n_steps;
        curve[epoch - 1].crd = sums[3] / n_steps;
        curve[epoch - 1].dev = dev_metric(rd, &dev);
        printf("train model=%s seed=%d epoch=%d step=%ld loss=%.4f task=%.4f kd=%.4f crd=%.4f dev_metric=%.4f "
               "examples_per_s=%.0f\n",
               name, seed, epoch, step, curve[epoch - 1].loss, curve[epoch - 1].task, curve[epoch - 1].kd,
               curve[epoch - 1].crd, curve[epoch - 1].dev, rd->train->count / (now_seconds() - t0));
        if (rd->csv)
            fprintf(rd->csv, "%s,%d,%d,%ld,%.6f,%.6f,%.6f,%.6f,%.6f\n", name, seed, epoch, step, curve[epoch - 1].loss,
                    curve[epoch - 1].task, curve[epoch - 1].kd, curve[epoch - 1].crd, curve[epoch - 1].dev);
        fflush(stdout);
    }
    codir_adamw_free(&opt);
    if (dist) codir_adamw_free(&opt_heads);
    return status;
}

/* One row of the final table: a model's results over all seeds. */
typedef struct report {
    const char *name;
    int layers, hidden;
    size_t params;
    double dev[MAX_SEEDS];
    int runs;
    double per_s_bs32, per_s_bs1;
    curve_point curve[MAX_SEEDS][MAX_EPOCHS];
    int epochs;
} report;

/* Sentences per second of inference on the first `count` dev examples at `batch`,
   the best of `passes` passes. */
static int inference_rate(run_data *rd, const codir_model *model, int batch, int count, int passes, double *rate)
{
    codir_encoded head = *rd->dev;
    float *out = (float *)malloc((size_t)count * (size_t)model->cfg.num_labels * sizeof(float));
    int pass, rc = 0;
    head.count = count < rd->dev->count ? count : rd->dev->count;
    *rate = 0.0;
    for (pass = 0; pass < passes && out && !rc; pass++) {
        double t0 = now_seconds(), r;
        rc = codir_predict(&rd->ctx, model, &head, batch, out);
        r = head.count / (now_seconds() - t0);
        if (r > *rate) *rate = r;
    }
    if (!out || rc) fprintf(stderr, "distill: inference failed: %s\n", out ? codir_last_error() : "out of memory");
    free(out);
    return !out || rc;
}

/* Records a model's size and speed in r (speed only on the first run). */
static int measure(run_data *rd, codir_model *model, report *r)
{
    r->layers = model->cfg.num_layers;
    r->hidden = model->cfg.hidden;
    r->params = model->params.count;
    if (r->runs > 1) return 0;
    /* The model is trained: pack its weights once, as a program serving it would. */
    if (codir_model_pack(model)) {
        fprintf(stderr, "distill: packing the weights failed: %s\n", codir_last_error());
        return 1;
    }
    return inference_rate(rd, model, 32, rd->dev->count, 3, &r->per_s_bs32) ||
           inference_rate(rd, model, 1, 200, 2, &r->per_s_bs1);
}

/* Mean and sample standard deviation of x[n]. */
static void mean_std(const double *x, int n, double *mean, double *std)
{
    double s = 0.0, ss = 0.0;
    int i;
    for (i = 0; i < n; i++) s += x[i];
    *mean = s / n;
    for (i = 0; i < n; i++) ss += (x[i] - *mean) * (x[i] - *mean);
    *std = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
}

/* Writes an SVG line chart of each model's mean dev metric per epoch. */
static int write_svg(const char *path, const report *rows, int count, const char *metric)
{
    static const char *colors[] = {"#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"};
    const double W = 720, H = 420, L = 70, R = 170, T = 40, Bm = 50;
    double lo = 1e30, hi = -1e30;
    int max_epochs = 1, m, e, s;
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "distill: cannot write %s\n", path);
        return 1;
    }
    for (m = 0; m < count; m++) {
        if (rows[m].epochs > max_epochs) max_epochs = rows[m].epochs;
        for (s = 0; s < rows[m].runs; s++)
            for (e = 0; e < rows[m].epochs; e++) {
                double v = rows[m].curve[s][e].dev;
                if (v < lo) lo = v;
                if (v > hi) hi = v;
            }
    }
    if (!(hi > lo)) {
        lo -= 0.5;
        hi += 0.5;
    }
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
               "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%.0f\" y=\"24\" font-size=\"15\">dev %s per epoch (mean over seeds)</text>\n", L, metric);
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n", L, H - Bm, W - R, H - Bm);
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n", L, T, L, H - Bm);
    for (e = 0; e <= 4; e++) {
        double v = lo + (hi - lo) * e / 4, y = H - Bm - (H - Bm - T) * e / 4;
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.3f</text>\n", L - 6, y + 4, v);
    }
    for (e = 1; e <= max_epochs; e++) {
        double x = L + (W - R - L) * (max_epochs > 1 ? (e - 1.0) / (max_epochs - 1) : 0.5);
        fprintf(f, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%d</text>\n", x, H - Bm + 16, e);
    }
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">epoch</text>\n", (L + W - R) / 2, H - 12);
    for (m = 0; m < count; m++) {
        fprintf(f, "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"%s\" points=\"", colors[m % 6]);
        for (e = 0; e < rows[m].epochs; e++) {
            double v = 0.0, x, y;
            for (s = 0; s < rows[m].runs; s++) v += rows[m].curve[s][e].dev / rows[m].runs;
            x = L + (W - R - L) * (max_epochs > 1 ? (double)e / (max_epochs - 1) : 0.5);
            y = H - Bm - (H - Bm - T) * (v - lo) / (hi - lo);
            fprintf(f, "%.1f,%.1f ", x, y);
        }
        fprintf(f, "\"/>\n<text x=\"%.0f\" y=\"%.0f\" fill=\"%s\">%s</text>\n", W - R + 12, T + 18.0 * m + 10,
                colors[m % 6], rows[m].name);
    }
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "distill: writing %s failed\n", path);
        return 1;
    }
    return 0;
}

/* Loads a TSV split and encodes it; prints the error and returns NULL on failure. */
static codir_encoded *load_split(const options *o, const char *file, codir_vocab **vocab, codir_dataset **keep)
{
    char path[4096];
    codir_dataset *data;
    codir_encoded *enc;
    snprintf(path, sizeof path, "%s/%s", o->data_dir, file);
    data = codir_dataset_load_tsv(path);
    if (!data) {
        fprintf(stderr, "distill: %s\n", codir_last_error());
        return NULL;
    }
    if (o->train_limit > 0 && strcmp(file, "train.tsv") == 0) codir_dataset_truncate(data, o->train_limit);
    if (!*vocab) {
        *vocab = codir_vocab_build((const char *const *)data->texts, data->count, o->vocab_size, 2, 1);
        if (!*vocab) {
            fprintf(stderr, "distill: building the vocabulary from %s failed: %s\n", path, codir_last_error());
            codir_dataset_free(data);
            return NULL;
        }
    }
    enc = codir_encode_dataset(*vocab, data, o->max_len);
    if (!enc) fprintf(stderr, "distill: encoding %s failed: %s\n", path, codir_last_error());
    *keep = data;
    return enc;
}

/* Creates and trains the teacher, or loads it with --teacher. Returns NULL on failure. */
static codir_model *make_teacher(run_data *rd, const codir_config *cfg, report *r)
{
    const options *o = rd->opt;
    codir_model *teacher;
    if (o->teacher_dir) {
        teacher = codir_model_load(o->teacher_dir);
        if (!teacher) {
            fprintf(stderr, "distill: loading the teacher from %s failed: %s\n", o->teacher_dir, codir_last_error());
            return NULL;
        }
        if (teacher->cfg.vocab_size != cfg->vocab_size || teacher->cfg.num_labels != cfg->num_labels) {
            fprintf(stderr, "distill: the teacher in %s has a vocabulary of %d and %d labels, but the data needs %d and %d; "
                            "use the vocabulary it was trained with (--vocab-size) or retrain it\n",
                    o->teacher_dir, teacher->cfg.vocab_size, teacher->cfg.num_labels, cfg->vocab_size, cfg->num_labels);
            codir_model_free(teacher);
            return NULL;
        }
        if (teacher->cfg.max_len < o->max_len) {
            fprintf(stderr, "distill: the teacher in %s has %d positions, fewer than --max-len %d; give --max-len %d "
                            "or less\n",
                    o->teacher_dir, teacher->cfg.max_len, o->max_len, teacher->cfg.max_len);
            codir_model_free(teacher);
            return NULL;
        }
        if (teacher->cfg.num_layers < o->student_layers) {
            fprintf(stderr, "distill: the teacher in %s has %d layers, fewer than the student's %d; give "
                            "--student-layers %d or less\n",
                    o->teacher_dir, teacher->cfg.num_layers, o->student_layers, teacher->cfg.num_layers);
            codir_model_free(teacher);
            return NULL;
        }
        r->epochs = 0;
        return teacher;
    }
    teacher = codir_model_create(cfg, (uint64_t)o->seed);
    if (!teacher) {
        fprintf(stderr, "distill: teacher: %s\n", codir_last_error());
        return NULL;
    }
    r->epochs = o->teacher_epochs;
    if (train(rd, "teacher", o->seed, teacher, NULL, NULL, o->teacher_epochs, r->curve[0])) {
        codir_model_free(teacher);
        return NULL;
    }
    if (o->save_teacher_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/vocab.txt", o->save_teacher_dir);
        if (codir_model_save(teacher, o->save_teacher_dir) || codir_vocab_save(rd->vocab, path)) {
            fprintf(stderr, "distill: saving the teacher to %s failed: %s\n", o->save_teacher_dir, codir_last_error());
            codir_model_free(teacher);
            return NULL;
        }
    }
    return teacher;
}

/* Fills rd->cache with the teacher's outputs when they fit in --teacher-cache-mb;
   returns 1 only after an error other than the limit. */
static int make_cache(run_data *rd, const codir_model *teacher, const codir_config *scfg)
{
    const options *o = rd->opt;
    codir_distill_config dcfg = codir_distill_config_default();
    codir_distiller *shape;
    double t0 = now_seconds(), limit = (double)o->cache_mb * 1048576.0, need;

    /* The cache keeps what a distiller with the students' layer map and pooling needs. */
    dcfg.lambda = o->lambda > 0.0f ? o->lambda : 1.0f;
    dcfg.num_negatives = 1;
    dcfg.proj_dim = 1;
    dcfg.pooling = o->pooling;
    shape = codir_distiller_create(&dcfg, scfg, &teacher->cfg, rd->train->labels, rd->train->count, 1);
    if (!shape) {
        fprintf(stderr, "distill: teacher cache: %s\n", codir_last_error());
        return 1;
    }
    need = codir_teacher_cache_bytes(&teacher->cfg, shape, rd->train->count);
    if (need > limit) {
        printf("teacher_cache=off needed_mb=%.1f limit_mb=%d (the teacher runs every step)\n", need / 1048576.0,
               o->cache_mb);
        codir_distiller_free(shape);
        return 0;
    }
    rd->cache = codir_teacher_cache_build(&rd->ctx, teacher, shape, rd->train, 64, limit);
    codir_distiller_free(shape);
    if (!rd->cache) {
        fprintf(stderr, "distill: building the teacher cache failed: %s\n", codir_last_error());
        return 1;
    }
    printf("teacher_cache=on mb=%.2f build_s=%.2f\n", (double)rd->cache->bytes / 1048576.0, now_seconds() - t0);
    return 0;
}

/* Creates one student: a copy of --student-init (with a new classifier when its
   output count differs), or a new model from scfg initialized from the teacher's
   blocks when the widths match. Returns NULL after printing an error. */
static codir_model *make_student(run_data *rd, const codir_model *teacher, const codir_config *scfg, int seed)
{
    const options *o = rd->opt;
    codir_model *student;
    if (o->student_init_dir) {
        codir_model *init = codir_model_load(o->student_init_dir);
        const codir_config *c = init ? &init->cfg : NULL;
        int i;
        if (!init) {
            fprintf(stderr, "distill: loading the student from %s failed: %s\n", o->student_init_dir, codir_last_error());
            return NULL;
        }
        if (c->vocab_size != teacher->cfg.vocab_size || c->max_len != teacher->cfg.max_len) {
            fprintf(stderr, "distill: the student in %s has a vocabulary of %d and %d positions, the teacher %d and %d; "
                            "both must come from the same vocabulary and length\n",
                    o->student_init_dir, c->vocab_size, c->max_len, teacher->cfg.vocab_size, teacher->cfg.max_len);
            codir_model_free(init);
            return NULL;
        }
        {
            codir_config cfg = *c;
            cfg.num_labels = teacher->cfg.num_labels;
            cfg.dropout = o->dropout;
            student = codir_model_create(&cfg, (uint64_t)seed + 1000);
        }
        for (i = 0; student && i < student->params.num_tensors; i++) {
            codir_tensor *t = &student->params.tensors[i];
            const codir_tensor *src = codir_params_find(&init->params, t->name);
            if (src && src->numel == t->numel && (c->num_labels == teacher->cfg.num_labels || strncmp(t->name, "classifier.", 11) != 0))
                memcpy(t->data, src->data, t->numel * sizeof(float));
        }
        codir_model_free(init);
        if (!student) fprintf(stderr, "distill: student: %s\n", codir_last_error());
        return student;
    }
    student = codir_model_create(scfg, (uint64_t)seed + 1000);
    if (!student) {
        fprintf(stderr, "distill: student: %s\n", codir_last_error());
        return NULL;
    }
    if (o->init_from_teacher && teacher->cfg.hidden == scfg->hidden &&
        codir_model_init_from(student, teacher, CODIR_INIT_EVERY_OTHER)) {
        fprintf(stderr, "distill: %s\n", codir_last_error());
        codir_model_free(student);
        return NULL;
    }
    return student;
}

/* Trains the four students for one seed and adds their results to rows[1..4]. */
static int train_students(run_data *rd, const codir_model *teacher, const codir_config *scfg, int seed, report *rows)
{
    const options *o = rd->opt;
    static const char *names[NUM_STUDENTS] = {"task", "kd", "codir-nce", "codir-infonce"};
    int k, rc = 0;
    for (k = 0; k < NUM_STUDENTS && !rc; k++) {
        codir_model *student = make_student(rd, teacher, scfg, seed);
        codir_distiller *dist = NULL;
        codir_distill_config dcfg = codir_distill_config_default();
        report *r = &rows[1 + k];
        dcfg.beta = k == 0 ? 0.0f : o->beta;
        dcfg.temperature = o->temperature;
        dcfg.lambda = k >= 2 ? o->lambda : 0.0f;
        dcfg.tau = o->tau;
        dcfg.num_negatives = o->negatives;
        dcfg.proj_dim = o->proj_dim;
        dcfg.momentum = o->momentum;
        dcfg.pooling = o->pooling;
        dcfg.mode = k == 2 ? CODIR_CRD_NCE : CODIR_CRD_INFONCE;
        if (student && k > 0) {
            dist = codir_distiller_create(&dcfg, &student->cfg, &teacher->cfg, rd->train->labels, rd->train->count,
                                          (uint64_t)seed + 2000);
            if (dist && rd->regression && codir_distiller_set_targets(dist, rd->train->targets)) {
                codir_distiller_free(dist);
                dist = NULL;
            }
        }
        if (!student) rc = 1;
        else if (k > 0 && !dist) {
            fprintf(stderr, "distill: student %s: %s\n", names[k], codir_last_error());
            rc = 1;
        }
        r->name = names[k];
        r->epochs = o->student_epochs;
        if (!rc) rc = train(rd, names[k], seed, student, k > 0 ? teacher : NULL, dist, o->student_epochs, r->curve[r->runs]);
        if (!rc) {
            r->dev[r->runs] = r->curve[r->runs][o->student_epochs - 1].dev;
            r->runs++;
            rc = measure(rd, student, r);
        }
        codir_distiller_free(dist);
        codir_model_free(student);
    }
    return rc;
}

/* Prints the table and the machine-readable result lines. */
static void print_report(const run_data *rd, const report *rows, int count)
{
    const char *metric = rd->regression ? "pearson" : "accuracy";
    int i;
    printf("\n%-14s %-10s %9s %18s %10s %9s %9s\n", "model", "layers x h", "params", metric, "sent/s@32", "sent/s@1",
           "speed-up");
    for (i = 0; i < count; i++) {
        char shape[32], value[48];
        double mean, std;
        mean_std(rows[i].dev, rows[i].runs, &mean, &std);
        snprintf(shape, sizeof shape, "%d x %d", rows[i].layers, rows[i].hidden);
        if (rows[i].runs > 1) snprintf(value, sizeof value, "%.4f +- %.4f", mean, std);
        else snprintf(value, sizeof value, "%.4f", mean);
        printf("%-14s %-10s %9zu %18s %10.0f %9.0f %8.2fx\n", rows[i].name, shape, rows[i].params, value,
               rows[i].per_s_bs32, rows[i].per_s_bs1, rows[i].per_s_bs32 / rows[0].per_s_bs32);
    }
    printf("\n");
    for (i = 0; i < count; i++) {
        double mean, std;
        mean_std(rows[i].dev, rows[i].runs, &mean, &std);
        printf("result model=%s layers=%d hidden=%d params=%zu dev_metric=%.4f dev_metric_std=%.4f seeds=%d "
               "infer_bs32_per_s=%.1f infer_bs1_per_s=%.1f\n",
               rows[i].name, rows[i].layers, rows[i].hidden, rows[i].params, mean, std, rows[i].runs,
               rows[i].per_s_bs32, rows[i].per_s_bs1);
    }
}

int main(int argc, char **argv)
{
    options o;
    run_data rd;
    codir_vocab *vocab = NULL;
    codir_dataset *train_text = NULL, *dev_text = NULL;
    codir_model *teacher = NULL;
    codir_config tcfg, scfg;
    report *rows = NULL;
    char path[4096];
    double t_start = now_seconds();
    int rc = 1, i, seed;

    set_defaults(&o);
    i = parse_args(argc, argv, &o);
    if (i == 2) {
        print_help(&o);
        return 0;
    }
    if (i == 0) return 2;
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
    printf("threads=%d gemm_kernel=%s\n", omp_get_max_threads(), codir_gemm_kernel_name());
#else
    printf("threads=1 gemm_kernel=%s (built without OpenMP)\n", codir_gemm_kernel_name());
#endif

    memset(&rd, 0, sizeof rd);
    rd.opt = &o;
    rows = (report *)calloc(1 + NUM_STUDENTS, sizeof(report));
    if (!rows) {
        fprintf(stderr, "distill: out of memory\n");
        return 1;
    }
    if (o.teacher_dir) {
        snprintf(path, sizeof path, "%s/vocab.txt", o.teacher_dir);
        vocab = codir_vocab_load(path, 1);
        if (!vocab) {
            fprintf(stderr, "distill: %s\n", codir_last_error());
            goto done;
        }
    }
    rd.train = load_split(&o, "train.tsv", &vocab, &train_text);
    if (rd.train) rd.dev = load_split(&o, "dev.tsv", &vocab, &dev_text);
    if (!rd.train || !rd.dev) goto done;
    rd.regression = rd.train->targets != NULL;
    rd.vocab = vocab;
    printf("data=%s train=%d dev=%d task=%s vocab=%d\n", o.data_dir, rd.train->count, rd.dev->count,
           rd.regression ? "regression" : "classification", vocab->size);
    if (!rd.regression && rd.train->num_classes > MAX_CLASSES) {
        fprintf(stderr, "distill: %s/train.tsv has class ids up to %d; ids must be 0..N-1 with N at most %d\n", o.data_dir,
                rd.train->num_classes - 1, MAX_CLASSES);
        goto done;
    }
    if (o.negatives >= rd.train->count) {
        fprintf(stderr, "distill: --negatives %d must be below the %d training examples\n", o.negatives, rd.train->count);
        goto done;
    }
    if (!rd.regression && o.lambda != 0.0f) {
        /* The contrastive students draw negatives from the other classes. */
        for (i = 1; i < rd.train->count && rd.train->labels[i] == rd.train->labels[0]; i++) continue;
        if (i == rd.train->count) {
            fprintf(stderr, "distill: every example in %s/train.tsv has label %d, so the contrastive loss has no "
                            "negatives; give data with at least two classes, or --lambda 0\n",
                    o.data_dir, rd.train->labels[0]);
            goto done;
        }
    }
    if (o.save_teacher_dir && make_folder(o.save_teacher_dir)) goto done;
    if (!rd.regression && rd.dev->num_classes > rd.train->num_classes) {
        fprintf(stderr, "distill: dev.tsv has label %d but train.tsv only 0..%d\n", rd.dev->num_classes - 1,
                rd.train->num_classes - 1);
        goto done;
    }
    rd.order = (int *)malloc((size_t)rd.train->count * sizeof(int));
    if (!rd.order || codir_batch_init(&rd.batch, o.batch_size, o.max_len) ||
        codir_ctx_init(&rd.ctx, (size_t)64 << 20, (uint64_t)o.seed)) {
        fprintf(stderr, "distill: %s\n", codir_last_error());
        goto done;
    }
    if (o.curves) {
        snprintf(path, sizeof path, "%s.csv", o.curves);
        rd.csv = fopen(path, "w");
        if (!rd.csv) {
            fprintf(stderr, "distill: cannot write %s; choose another --curves prefix\n", path);
            goto done;
        }
        fprintf(rd.csv, "model,seed,epoch,step,loss,task,kd,crd,dev_metric\n");
    }

    /* The teacher. */
    tcfg = codir_config_default();
    tcfg.vocab_size = vocab->size;
    tcfg.max_len = o.max_len;
    tcfg.num_layers = o.teacher_layers;
    tcfg.hidden = o.hidden;
    tcfg.num_heads = o.heads;
    tcfg.ffn = o.ffn;
    tcfg.num_labels = rd.regression ? 1 : rd.train->num_classes;
    tcfg.dropout = o.dropout;
    rows[0].name = "teacher";
    teacher = make_teacher(&rd, &tcfg, &rows[0]);
    if (!teacher) goto done;
    /* The teacher is frozen from here on, so measure() packs its weights once and
       every later forward pass reads them packed. */
    {
        codir_scores dev;
        if (codir_evaluate(&rd.ctx, teacher, rd.dev, 64, &dev)) {
            fprintf(stderr, "distill: evaluating the teacher failed: %s\n", codir_last_error());
            goto done;
        }
        rows[0].dev[0] = dev_metric(&rd, &dev);
        rows[0].runs = 1;
        if (measure(&rd, teacher, &rows[0])) goto done;
    }

    /* The students: one size, one initialization, four objectives, over the seeds. */
    scfg = teacher->cfg;
    scfg.num_layers = o.student_layers;
    scfg.dropout = o.dropout;
    if (o.student_init_dir) {
        codir_config init_cfg;
        snprintf(path, sizeof path, "%s/config.json", o.student_init_dir);
        if (codir_config_load(path, &init_cfg)) {
            fprintf(stderr, "distill: %s\n", codir_last_error());
            goto done;
        }
        scfg.num_layers = init_cfg.num_layers;
        scfg.hidden = init_cfg.hidden;
        scfg.num_heads = init_cfg.num_heads;
        scfg.ffn = init_cfg.ffn;
    }
    if (o.cache_mb > 0 && make_cache(&rd, teacher, &scfg)) goto done;
    for (seed = o.seed; seed < o.seed + o.seeds; seed++)
        if (train_students(&rd, teacher, &scfg, seed, rows)) goto done;

    print_report(&rd, rows, 1 + NUM_STUDENTS);
    if (o.curves) {
        snprintf(path, sizeof path, "%s.svg", o.curves);
        if (write_svg(path, rows, 1 + NUM_STUDENTS, rd.regression ? "Pearson" : "accuracy")) goto done;
        printf("curves=%s.csv,%s.svg\n", o.curves, o.curves);
    }
    printf("arena_peak_mb=%.1f total_s=%.1f\n", (double)codir_arena_peak(&rd.ctx.arena) / 1048576.0,
           now_seconds() - t_start);
    rc = 0;

done:
    if (rd.csv && fclose(rd.csv) != 0) {
        fprintf(stderr, "distill: writing the curves failed\n");
        rc = 1;
    }
    codir_teacher_cache_free(rd.cache);
    codir_model_free(teacher);
    codir_ctx_free(&rd.ctx);
    codir_batch_free(&rd.batch);
    free(rd.order);
    free(rows);
    codir_encoded_free(rd.train);
    codir_encoded_free(rd.dev);
    codir_dataset_free(train_text);
    codir_dataset_free(dev_text);
    codir_vocab_free(vocab);
    return rc;
}
