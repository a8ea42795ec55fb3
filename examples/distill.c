/* distill.c - train a BERT-style teacher on labelled sentences, then distil it into a
   student with half the layers, once with the task loss alone and once with CoDIR.

   Build and run from the repository root:

       cc -std=c11 -O2 -fopenmp examples/distill.c -o distill -lm && ./distill

   The default data is examples/data/uci-sentiment (train.tsv and dev.tsv with a
   "sentence<TAB>label" header). `./distill --help` lists every option. */
#define CODIR_IMPLEMENTATION
#include "../codir.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Everything a run can be told from the command line. */
typedef struct options {
    const char *data_dir;
    int vocab_size, max_len, batch_size, seed, threads;
    int teacher_layers, student_layers, hidden, heads, ffn;
    int teacher_epochs, student_epochs;
    float lr, weight_decay, warmup, dropout;
    float beta, temperature, lambda, tau, momentum;
    int negatives, proj_dim;
} options;

static void set_defaults(options *o)
{
    o->data_dir = "examples/data/uci-sentiment";
    o->vocab_size = 3000;
    o->max_len = 64;
    o->batch_size = 32;
    o->seed = 1;
    o->threads = 0;
    o->teacher_layers = 4;
    o->student_layers = 0;
    o->hidden = 128;
    o->heads = 4;
    o->ffn = 512;
    o->teacher_epochs = 8;
    o->student_epochs = 8;
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
}

static void print_help(const options *d)
{
    printf("usage: distill [options]\n\n"
           "Trains a teacher on DIR/train.tsv, then a student with half its layers twice from\n"
           "the same initialization: with the task loss alone and with CoDIR. Reports dev accuracy.\n\n");
    printf("  --data DIR            folder with train.tsv and dev.tsv (default %s)\n", d->data_dir);
    printf("  --vocab-size N        WordPiece vocabulary learned from train.tsv, tokens (default %d)\n", d->vocab_size);
    printf("  --max-len N           longest sequence incl. [CLS] and [SEP], tokens (default %d)\n", d->max_len);
    printf("  --batch N             examples per training step (default %d)\n", d->batch_size);
    printf("  --teacher-layers N    teacher transformer blocks (default %d)\n", d->teacher_layers);
    printf("  --student-layers N    student blocks; 0 means half the teacher's (default %d)\n", d->student_layers);
    printf("  --hidden N            model width of teacher and student (default %d)\n", d->hidden);
    printf("  --heads N             attention heads; must divide --hidden (default %d)\n", d->heads);
    printf("  --ffn N               feed-forward inner width (default %d)\n", d->ffn);
    printf("  --teacher-epochs N    passes over train.tsv for the teacher (default %d)\n", d->teacher_epochs);
    printf("  --student-epochs N    passes over train.tsv for each student (default %d)\n", d->student_epochs);
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
    printf("  --seed N              seed of initialization, shuffling and dropout (default %d)\n", d->seed);
    printf("  --threads N           OpenMP threads; 0 keeps the OpenMP default (default %d)\n", d->threads);
    printf("  --help                print this text\n");
}

/* Parses an integer option value; returns 0 and prints an error when it is invalid. */
static int parse_int(const char *name, const char *text, int min, int *out)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v < min || v > 1000000000L) {
        fprintf(stderr, "distill: invalid value '%s' for %s: expected an integer >= %d\n", text, name, min);
        return 0;
    }
    *out = (int)v;
    return 1;
}

/* Parses a float option value in [min, max]; returns 0 and prints an error when invalid. */
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

/* Returns 1 on success, 0 after printing an error, 2 when --help was given. */
static int parse_args(int argc, char **argv, options *o)
{
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return 2;
        if (!v) {
            fprintf(stderr, "distill: option %s needs a value (see --help)\n", a);
            return 0;
        }
        if (strcmp(a, "--data") == 0) ok = (o->data_dir = v) != NULL;
        else if (strcmp(a, "--vocab-size") == 0) ok = parse_int(a, v, 16, &o->vocab_size);
        else if (strcmp(a, "--max-len") == 0) ok = parse_int(a, v, 3, &o->max_len);
        else if (strcmp(a, "--batch") == 0) ok = parse_int(a, v, 1, &o->batch_size);
        else if (strcmp(a, "--teacher-layers") == 0) ok = parse_int(a, v, 1, &o->teacher_layers);
        else if (strcmp(a, "--student-layers") == 0) ok = parse_int(a, v, 0, &o->student_layers);
        else if (strcmp(a, "--hidden") == 0) ok = parse_int(a, v, 1, &o->hidden);
        else if (strcmp(a, "--heads") == 0) ok = parse_int(a, v, 1, &o->heads);
        else if (strcmp(a, "--ffn") == 0) ok = parse_int(a, v, 1, &o->ffn);
        else if (strcmp(a, "--teacher-epochs") == 0) ok = parse_int(a, v, 1, &o->teacher_epochs);
        else if (strcmp(a, "--student-epochs") == 0) ok = parse_int(a, v, 1, &o->student_epochs);
        else if (strcmp(a, "--lr") == 0) ok = parse_float(a, v, 1e-8, 1.0, &o->lr);
        else if (strcmp(a, "--weight-decay") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->weight_decay);
        else if (strcmp(a, "--warmup") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->warmup);
        else if (strcmp(a, "--dropout") == 0) ok = parse_float(a, v, 0.0, 0.9, &o->dropout);
        else if (strcmp(a, "--beta") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->beta);
        else if (strcmp(a, "--temperature") == 0) ok = parse_float(a, v, 1e-3, 1e3, &o->temperature);
        else if (strcmp(a, "--lambda") == 0) ok = parse_float(a, v, 0.0, 1e3, &o->lambda);
        else if (strcmp(a, "--tau") == 0) ok = parse_float(a, v, 1e-3, 1e3, &o->tau);
        else if (strcmp(a, "--momentum") == 0) ok = parse_float(a, v, 0.0, 0.999, &o->momentum);
        else if (strcmp(a, "--negatives") == 0) ok = parse_int(a, v, 1, &o->negatives);
        else if (strcmp(a, "--proj-dim") == 0) ok = parse_int(a, v, 1, &o->proj_dim);
        else if (strcmp(a, "--seed") == 0) ok = parse_int(a, v, 0, &o->seed);
        else if (strcmp(a, "--threads") == 0) ok = parse_int(a, v, 0, &o->threads);
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

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Everything the three training runs share. */
typedef struct run_data {
    const options *opt;
    codir_encoded *train, *dev;
    codir_batch batch;
    codir_ctx ctx;
    int *order;
} run_data;

/* Trains `model` for `epochs` passes; with a teacher and distiller it runs CoDIR steps,
   else task-only steps. Returns 0 on success, 1 after printing an error. */
static int train(run_data *rd, const char *name, codir_model *model, const codir_model *teacher,
                 codir_distiller *dist, int epochs)
{
    const options *o = rd->opt;
    codir_adamw opt, opt_heads;
    long steps_per_epoch = (rd->train->count + o->batch_size - 1) / o->batch_size;
    long total = steps_per_epoch * epochs, warmup = (long)(o->warmup * (float)total), step = 0;
    uint64_t rng = (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + 7;
    int epoch, i, status = 0;

    if (codir_adamw_init(&opt, &model->params, 0.9f, 0.98f, 1e-6f, o->weight_decay) ||
        (dist && codir_adamw_init(&opt_heads, &dist->params, 0.9f, 0.98f, 1e-6f, o->weight_decay))) {
        fprintf(stderr, "distill: %s\n", codir_last_error());
        return 1;
    }
    for (i = 0; i < rd->train->count; i++) rd->order[i] = i;

    for (epoch = 1; epoch <= epochs && !status; epoch++) {
        double t0 = now_seconds(), sums[4] = {0, 0, 0, 0};
        codir_scores dev;
        long start, n_steps = 0;
        codir_shuffle(rd->order, rd->train->count, &rng);
        codir_bucket_by_length(rd->order, rd->train->count, rd->train, 16 * o->batch_size, o->batch_size, &rng);
        for (start = 0; start < rd->train->count; start += o->batch_size, step++) {
            int n = rd->train->count - (int)start < o->batch_size ? rd->train->count - (int)start : o->batch_size;
            float lr = codir_lr_schedule(step, total, warmup, o->lr);
            codir_loss_terms terms;
            int rc = codir_batch_fill(&rd->batch, rd->train, rd->order, (int)start, n);
            if (!rc && dist) rc = codir_distill_step(&rd->ctx, model, teacher, dist, &opt, &opt_heads, &rd->batch, lr, &terms);
            else if (!rc) rc = codir_task_step(&rd->ctx, model, &opt, &rd->batch, lr, &terms);
            if (rc) {
                fprintf(stderr, "distill: training %s failed at epoch %d: %s\n", name, epoch, codir_last_error());
                status = 1;
                break;
            }
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
        printf("train model=%s epoch=%d step=%ld loss=%.4f task=%.4f kd=%.4f crd=%.4f dev_acc=%.4f examples_per_s=%.0f\n",
               name, epoch, step, sums[0] / n_steps, sums[1] / n_steps, sums[2] / n_steps, sums[3] / n_steps, dev.accuracy,
               rd->train->count / (now_seconds() - t0));
        fflush(stdout);
    }
    codir_adamw_free(&opt);
    if (dist) codir_adamw_free(&opt_heads);
    return status;
}

/* One row of the final table. */
typedef struct report {
    const char *name;
    int layers, hidden;
    size_t params;
    double dev_acc, infer_per_s;
} report;

/* Measures dev accuracy and batch-32 inference speed (best of three passes). */
static int measure(run_data *rd, const char *name, const codir_model *model, report *r)
{
    int pass;
    r->name = name;
    r->layers = model->cfg.num_layers;
    r->hidden = model->cfg.hidden;
    r->params = model->params.count;
    r->infer_per_s = 0.0;
    for (pass = 0; pass < 3; pass++) {
        double t0 = now_seconds(), rate;
        codir_scores dev;
        if (codir_evaluate(&rd->ctx, model, rd->dev, 32, &dev)) {
            fprintf(stderr, "distill: evaluating %s failed: %s\n", name, codir_last_error());
            return 1;
        }
        rate = rd->dev->count / (now_seconds() - t0);
        r->dev_acc = dev.accuracy;
        if (rate > r->infer_per_s) r->infer_per_s = rate;
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

int main(int argc, char **argv)
{
    options o;
    run_data rd;
    codir_vocab *vocab = NULL;
    codir_dataset *train_text = NULL, *dev_text = NULL;
    codir_model *teacher = NULL, *task_student = NULL, *codir_student = NULL;
    codir_distiller *dist = NULL;
    codir_config tcfg, scfg;
    codir_distill_config dcfg;
    report rows[3];
    double t_start = now_seconds();
    int rc = 1, i;

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
    rd.train = load_split(&o, "train.tsv", &vocab, &train_text);
    if (rd.train) rd.dev = load_split(&o, "dev.tsv", &vocab, &dev_text);
    if (!rd.train || !rd.dev) goto done;
    printf("data=%s train=%d dev=%d classes=%d vocab=%d\n", o.data_dir, rd.train->count, rd.dev->count,
           rd.train->num_classes, vocab->size);
    if (rd.dev->num_classes > rd.train->num_classes) {
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

    /* The teacher. */
    tcfg = codir_config_default();
    tcfg.vocab_size = vocab->size;
    tcfg.max_len = o.max_len;
    tcfg.num_layers = o.teacher_layers;
    tcfg.hidden = o.hidden;
    tcfg.num_heads = o.heads;
    tcfg.ffn = o.ffn;
    tcfg.num_labels = rd.train->num_classes;
    tcfg.dropout = o.dropout;
    teacher = codir_model_create(&tcfg, (uint64_t)o.seed);
    if (!teacher) {
        fprintf(stderr, "distill: teacher: %s\n", codir_last_error());
        goto done;
    }
    if (train(&rd, "teacher", teacher, NULL, NULL, o.teacher_epochs)) goto done;

    /* Two students from one initialization: same config, same seed. */
    scfg = tcfg;
    scfg.num_layers = o.student_layers;
    task_student = codir_model_create(&scfg, (uint64_t)o.seed + 1);
    codir_student = codir_model_create(&scfg, (uint64_t)o.seed + 1);
    dcfg = codir_distill_config_default();
    dcfg.beta = o.beta;
    dcfg.temperature = o.temperature;
    dcfg.lambda = o.lambda;
    dcfg.tau = o.tau;
    dcfg.num_negatives = o.negatives;
    dcfg.proj_dim = o.proj_dim;
    dcfg.momentum = o.momentum;
    dist = codir_distiller_create(&dcfg, &scfg, &tcfg, rd.train->labels, rd.train->count, (uint64_t)o.seed + 2);
    if (!task_student || !codir_student || !dist) {
        fprintf(stderr, "distill: student: %s\n", codir_last_error());
        goto done;
    }
    if (train(&rd, "task", task_student, NULL, NULL, o.student_epochs)) goto done;
    if (train(&rd, "codir", codir_student, teacher, dist, o.student_epochs)) goto done;

    /* The report. */
    if (measure(&rd, "teacher", teacher, &rows[0]) || measure(&rd, "task", task_student, &rows[1]) ||
        measure(&rd, "codir", codir_student, &rows[2]))
        goto done;
    printf("\n%-8s %-10s %10s %8s %14s\n", "model", "layers x h", "params", "dev_acc", "sentences/s@32");
    for (i = 0; i < 3; i++) {
        char shape[32];
        snprintf(shape, sizeof shape, "%d x %d", rows[i].layers, rows[i].hidden);
        printf("%-8s %-10s %10zu %8.4f %14.0f\n", rows[i].name, shape, rows[i].params, rows[i].dev_acc,
               rows[i].infer_per_s);
    }
    printf("\n");
    for (i = 0; i < 3; i++)
        printf("result model=%s layers=%d hidden=%d params=%zu dev_metric=%.4f infer_bs32_per_s=%.1f\n", rows[i].name,
               rows[i].layers, rows[i].hidden, rows[i].params, rows[i].dev_acc, rows[i].infer_per_s);
    printf("arena_peak_mb=%.1f total_s=%.1f\n", (double)codir_arena_peak(&rd.ctx.arena) / 1048576.0,
           now_seconds() - t_start);
    rc = 0;

done:
    codir_distiller_free(dist);
    codir_model_free(codir_student);
    codir_model_free(task_student);
    codir_model_free(teacher);
    codir_ctx_free(&rd.ctx);
    codir_batch_free(&rd.batch);
    free(rd.order);
    codir_encoded_free(rd.train);
    codir_encoded_free(rd.dev);
    codir_dataset_free(train_text);
    codir_dataset_free(dev_text);
    codir_vocab_free(vocab);
    return rc;
}
