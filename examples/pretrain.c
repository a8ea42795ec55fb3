/* pretrain.c - pre-train a BERT-style teacher with masked-LM on plain text, then
   pre-distil it into a student with half the layers by CoDIR-Pre:

       L = (1 - beta) L_mlm + beta L_kd + lambda L_crd

   with KD on the vocabulary logits at the masked positions and the contrastive term
   drawing its negatives from other segments of the same document. Both models are
   scored by masked-token accuracy and perplexity on held-out text and saved as model
   folders (config.json, model.safetensors, vocab.txt) that examples/train.c (--init)
   and examples/distill.c can start from.

   Build and run from the repository root:

       cc -std=c11 -O2 -fopenmp examples/pretrain.c -o pretrain -lm && ./pretrain

   The default corpus is examples/data/austen-persuasion: train.txt and dev.txt with
   one paragraph per line and an empty line between documents. `./pretrain --help`
   lists every option. */
#define _POSIX_C_SOURCE 200809L /* mkdir */
#define CODIR_IMPLEMENTATION
#include "../codir.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef _WIN32
#include <direct.h>
#else
#include <sys/stat.h>
#endif

#define MAX_EPOCHS 1000

/* The mask seed of every evaluation, so that all models are scored on the same tokens. */
#define EVAL_MASK_SEED 20200930u

/* Command-line options of a run. */
typedef struct options {
    const char *corpus_dir, *teacher_in, *teacher_out, *student_out;
    int vocab_size, max_len, batch_size, max_segments, seed, threads;
    int teacher_layers, student_layers, hidden, heads, ffn;
    int teacher_epochs, student_epochs;
    float lr, weight_decay, warmup, dropout, mask_rate;
    float beta, temperature, lambda, tau, momentum;
    int negatives, proj_dim;
} options;

static void set_defaults(options *o)
{
    o->corpus_dir = "examples/data/austen-persuasion";
    o->teacher_in = NULL;
    o->teacher_out = "pretrain_teacher";
    o->student_out = "pretrain_student";
    o->vocab_size = 3000;
    o->max_len = 64;
    o->batch_size = 32;
    o->max_segments = 0;
    o->seed = 1;
    o->threads = 0;
    o->teacher_layers = 4;
    o->student_layers = 0;
    o->hidden = 128;
    o->heads = 4;
    o->ffn = 512;
    o->teacher_epochs = 20;
    o->student_epochs = 10;
    o->lr = 1e-3f;
    o->weight_decay = 0.01f;
    o->warmup = 0.06f;
    o->dropout = 0.1f;
    o->mask_rate = 0.15f;
    o->beta = 0.5f;
    o->temperature = 2.0f;
    o->lambda = 0.1f;
    o->tau = 0.07f;
    o->momentum = 0.5f;
    o->negatives = 32;
    o->proj_dim = 128;
}

static void print_help(const options *d)
{
    printf("usage: pretrain [options]\n\n"
           "Pre-trains a teacher with masked-LM on DIR/train.txt, pre-distils a student with half the\n"
           "layers by CoDIR-Pre (masked-LM + KD on the masked-token logits + contrastive with\n"
           "same-document negatives), reports masked-token accuracy and perplexity on DIR/dev.txt,\n"
           "and saves both models as folders with config.json, model.safetensors and vocab.txt.\n\n");
    printf("  --corpus DIR          folder with train.txt and dev.txt: one paragraph per line, an\n"
           "                        empty line between documents (default %s)\n", d->corpus_dir);
    printf("  --teacher DIR         load a pre-trained teacher folder (with its vocab.txt, read as\n"
           "                        uncased) instead of training one\n");
    printf("  --teacher-out DIR     folder to save the teacher in; created if missing (default %s)\n", d->teacher_out);
    printf("  --student-out DIR     folder to save the student in; created if missing (default %s)\n", d->student_out);
    printf("  --vocab-size N        WordPiece vocabulary learned from train.txt, tokens (default %d)\n", d->vocab_size);
    printf("  --max-len N           segment length incl. [CLS] and [SEP], and the models' position\n"
           "                        count, tokens (default %d)\n", d->max_len);
    printf("  --max-segments N      train on the first N segments of train.txt only; 0 means all\n"
           "                        (default %d)\n", d->max_segments);
    printf("  --batch N             segments per training step (default %d)\n", d->batch_size);
    printf("  --teacher-layers N    teacher transformer blocks (default %d)\n", d->teacher_layers);
    printf("  --student-layers N    student blocks; 0 means half the teacher's (default %d)\n", d->student_layers);
    printf("  --hidden N            model width of teacher and student (default %d)\n", d->hidden);
    printf("  --heads N             attention heads; must divide --hidden (default %d)\n", d->heads);
    printf("  --ffn N               feed-forward inner width (default %d)\n", d->ffn);
    printf("  --teacher-epochs N    passes over train.txt for the teacher (default %d)\n", d->teacher_epochs);
    printf("  --student-epochs N    passes over train.txt for the student (default %d)\n", d->student_epochs);
    printf("  --lr X                peak learning rate of AdamW (default %g)\n", (double)d->lr);
    printf("  --weight-decay X      AdamW decoupled weight decay (default %g)\n", (double)d->weight_decay);
    printf("  --warmup X            warmup as a fraction of all steps (default %g)\n", (double)d->warmup);
    printf("  --dropout X           dropout probability (default %g)\n", (double)d->dropout);
    printf("  --mask-rate X         share of the tokens chosen for prediction; of those 80%% become\n"
           "                        [MASK], 10%% a random token, 10%% stay (default %g)\n", (double)d->mask_rate);
    printf("  --beta X              weight of the KD loss; masked-LM gets 1 - beta (default %g)\n", (double)d->beta);
    printf("  --temperature X       KD softmax temperature T (default %g)\n", (double)d->temperature);
    printf("  --lambda X            weight of the contrastive loss, a batch mean; 0 turns it off\n"
           "                        (default %g)\n", (double)d->lambda);
    printf("  --tau X               contrastive temperature (default %g)\n", (double)d->tau);
    printf("  --negatives N         negatives per segment, from its own document first (default %d)\n",
           d->negatives);
    printf("  --proj-dim N          size of the contrastive projections (default %d)\n", d->proj_dim);
    printf("  --momentum X          memory bank momentum (default %g)\n", (double)d->momentum);
    printf("  --seed N              seed of initialization, shuffling, masking and dropout (default %d)\n",
           d->seed);
    printf("  --threads N           OpenMP threads; 0 keeps the OpenMP default (default %d)\n", d->threads);
    printf("  --help                print this text\n");
}

/* Parses an integer option value in [min, max]; prints an error and returns 0 if invalid. */
static int parse_int(const char *name, const char *text, long min, long max, int *out)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "pretrain: invalid value '%s' for %s: expected an integer in [%ld, %ld]\n", text, name, min,
                max);
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
        fprintf(stderr, "pretrain: invalid value '%s' for %s: expected a number in [%g, %g]\n", text, name, min, max);
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
            fprintf(stderr, "pretrain: option %s needs a value (see --help)\n", a);
            return 0;
        }
        if (strcmp(a, "--corpus") == 0) ok = (o->corpus_dir = v) != NULL;
        else if (strcmp(a, "--teacher") == 0) ok = (o->teacher_in = v) != NULL;
        else if (strcmp(a, "--teacher-out") == 0) ok = (o->teacher_out = v) != NULL;
        else if (strcmp(a, "--student-out") == 0) ok = (o->student_out = v) != NULL;
        else if (strcmp(a, "--vocab-size") == 0) ok = parse_int(a, v, 16, 1000000, &o->vocab_size);
        else if (strcmp(a, "--max-len") == 0) ok = parse_int(a, v, 3, 4096, &o->max_len);
        else if (strcmp(a, "--max-segments") == 0) ok = parse_int(a, v, 0, 2000000000L, &o->max_segments);
        else if (strcmp(a, "--batch") == 0) ok = parse_int(a, v, 1, 65536, &o->batch_size);
        else if (strcmp(a, "--teacher-layers") == 0) ok = parse_int(a, v, 1, 128, &o->teacher_layers);
        else if (strcmp(a, "--student-layers") == 0) ok = parse_int(a, v, 0, 128, &o->student_layers);
        else if (strcmp(a, "--hidden") == 0) ok = parse_int(a, v, 1, 65536, &o->hidden);
        else if (strcmp(a, "--heads") == 0) ok = parse_int(a, v, 1, 1024, &o->heads);
        else if (strcmp(a, "--ffn") == 0) ok = parse_int(a, v, 1, 262144, &o->ffn);
        else if (strcmp(a, "--teacher-epochs") == 0) ok = parse_int(a, v, 1, MAX_EPOCHS, &o->teacher_epochs);
        else if (strcmp(a, "--student-epochs") == 0) ok = parse_int(a, v, 1, MAX_EPOCHS, &o->student_epochs);
        else if (strcmp(a, "--lr") == 0) ok = parse_float(a, v, 1e-8, 1.0, &o->lr);
        else if (strcmp(a, "--weight-decay") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->weight_decay);
        else if (strcmp(a, "--warmup") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->warmup);
        else if (strcmp(a, "--dropout") == 0) ok = parse_float(a, v, 0.0, 0.9, &o->dropout);
        else if (strcmp(a, "--mask-rate") == 0) ok = parse_float(a, v, 0.001, 1.0, &o->mask_rate);
        else if (strcmp(a, "--beta") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->beta);
        else if (strcmp(a, "--temperature") == 0) ok = parse_float(a, v, 1e-3, 1e3, &o->temperature);
        else if (strcmp(a, "--lambda") == 0) ok = parse_float(a, v, 0.0, 1e3, &o->lambda);
        else if (strcmp(a, "--tau") == 0) ok = parse_float(a, v, 1e-3, 1e3, &o->tau);
        else if (strcmp(a, "--momentum") == 0) ok = parse_float(a, v, 0.0, 0.999, &o->momentum);
        else if (strcmp(a, "--negatives") == 0) ok = parse_int(a, v, 1, 1000000, &o->negatives);
        else if (strcmp(a, "--proj-dim") == 0) ok = parse_int(a, v, 1, 65536, &o->proj_dim);
        else if (strcmp(a, "--seed") == 0) ok = parse_int(a, v, 0, 2000000000L, &o->seed);
        else if (strcmp(a, "--threads") == 0) ok = parse_int(a, v, 0, 1024, &o->threads);
        else {
            fprintf(stderr, "pretrain: unknown option %s (see --help)\n", a);
            return 0;
        }
        if (!ok) return 0;
        i++;
    }
    if (o->student_layers == 0) o->student_layers = o->teacher_layers > 1 ? o->teacher_layers / 2 : 1;
    if (o->hidden % o->heads != 0) {
        fprintf(stderr, "pretrain: --heads %d does not divide --hidden %d\n", o->heads, o->hidden);
        return 0;
    }
    if (o->student_layers > o->teacher_layers) {
        fprintf(stderr, "pretrain: --student-layers %d exceeds the teacher's %d; the student starts from teacher "
                        "blocks\n", o->student_layers, o->teacher_layers);
        return 0;
    }
    return 1;
}

/* Processor time of all threads so far, in seconds. */
static double cpu_seconds(void) { return (double)clock() / CLOCKS_PER_SEC; }

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Creates folder `dir` unless it exists. Returns 0, or 1 after printing an error. */
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
        fprintf(stderr, "pretrain: cannot create the folder %s: %s\n", dir, strerror(errno));
        return 1;
    }
    /* The path may exist as a file, or as a folder this user cannot write: find out
       now by creating and removing a file in it, not after training. */
    if (snprintf(probe, sizeof probe, "%s/.write_check.tmp", dir) >= (int)sizeof probe) {
        fprintf(stderr, "pretrain: the folder path %s is too long\n", dir);
        return 1;
    }
    file = fopen(probe, "wb");
    if (!file) {
        fprintf(stderr, "pretrain: cannot write into the folder %s: %s; give a writable folder\n", dir, strerror(errno));
        return 1;
    }
    fclose(file);
    remove(probe);
    return 0;
}

/* Saves model and vocabulary as a model folder. Returns 0, or 1 after printing an error. */
static int save_folder(const codir_model *model, const codir_vocab *vocab, const char *dir, const char *name)
{
    char path[4096];
    if (make_folder(dir)) return 1;
    snprintf(path, sizeof path, "%s/vocab.txt", dir);
    if (codir_model_save(model, dir) || codir_vocab_save(vocab, path)) {
        fprintf(stderr, "pretrain: saving the %s to %s failed: %s\n", name, dir, codir_last_error());
        return 1;
    }
    printf("saved model=%s dir=%s\n", name, dir);
    return 0;
}

/* Loads DIR/file as a corpus, explaining the expected layout when it is missing. */
static codir_corpus *load_corpus(const char *dir, const char *file)
{
    char path[4096];
    codir_corpus *c;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    c = codir_corpus_load(path);
    if (!c) {
        fprintf(stderr, "pretrain: %s\n", codir_last_error());
        fprintf(stderr, "pretrain: --corpus %s must be a folder with train.txt and dev.txt, plain text with one "
                        "paragraph per line and an empty line between documents, as examples/data/austen-persuasion\n",
                dir);
    }
    return c;
}

/* State shared by the training runs. */
typedef struct run_data {
    const options *opt;
    codir_encoded *train, *dev;
    codir_mlm_config mlm;
    codir_batch batch;
    codir_mlm_batch masked;
    codir_ctx ctx;
    int *order;
} run_data;

/* Scores a model on dev.txt. Returns 0, or 1 after printing an error. */
static int evaluate(run_data *rd, const codir_model *model, const char *name, codir_mlm_scores *s)
{
    if (codir_mlm_evaluate(&rd->ctx, model, rd->dev, 64, &rd->mlm, EVAL_MASK_SEED, s)) {
        fprintf(stderr, "pretrain: evaluating the %s failed: %s\n", name, codir_last_error());
        return 1;
    }
    return 0;
}

/* Trains `model` for `epochs` passes: masked-LM only without a teacher, CoDIR-Pre
   with one. Prints one line per epoch. Returns 0, or 1 after printing an error. */
static int train(run_data *rd, const char *name, codir_model *model, const codir_model *teacher,
                 codir_distiller *dist, int epochs)
{
    const options *o = rd->opt;
    codir_adamw opt, opt_heads;
    int N = rd->train->count;
    long steps_per_epoch = (N + o->batch_size - 1) / o->batch_size;
    long total = steps_per_epoch * epochs, warmup = (long)(o->warmup * (float)total), step = 0;
    uint64_t rng = (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + (teacher ? 2 : 1);
    int epoch, i, status = 0;

    memset(&opt_heads, 0, sizeof opt_heads);
    if (codir_adamw_init(&opt, &model->params, 0.9f, 0.98f, 1e-6f, o->weight_decay) ||
        (dist && codir_adamw_init(&opt_heads, &dist->params, 0.9f, 0.98f, 1e-6f, o->weight_decay))) {
        fprintf(stderr, "pretrain: %s\n", codir_last_error());
        codir_adamw_free(&opt);
        return 1;
    }
    for (i = 0; i < N; i++) rd->order[i] = i;

    for (epoch = 1; epoch <= epochs && !status; epoch++) {
        double t0 = now_seconds(), sums[4] = {0, 0, 0, 0};
        long start, n_steps = 0;
        codir_mlm_scores dev;
        codir_shuffle(rd->order, N, &rng);
        for (start = 0; start < N; start += o->batch_size, step++) {
            int n = N - (int)start < o->batch_size ? N - (int)start : o->batch_size;
            float lr = codir_lr_schedule(step, total, warmup, o->lr);
            /* A new mask seed for every step, so each epoch masks other tokens; never the evaluation's seed. */
            uint64_t mask_seed = ((uint64_t)(unsigned)o->seed << 32) + (uint64_t)step * 2 + (teacher ? 1 : 0);
            codir_loss_terms terms;
            int rc = codir_batch_fill(&rd->batch, rd->train, rd->order, (int)start, n);
            if (!rc) rc = codir_mlm_mask(&rd->masked, &rd->batch, &rd->mlm, mask_seed);
            if (!rc && dist)
                rc = codir_pretrain_distill_step(&rd->ctx, model, teacher, dist, &opt, &opt_heads, &rd->masked, lr,
                                                 &terms);
            else if (!rc) rc = codir_mlm_step(&rd->ctx, model, &opt, &rd->masked, lr, &terms);
            if (rc) {
                fprintf(stderr, "pretrain: training the %s failed at epoch %d: %s\n", name, epoch, codir_last_error());
                status = 1;
                break;
            }
            sums[0] += terms.total;
            sums[1] += terms.task;
            sums[2] += terms.kd;
            sums[3] += terms.crd;
            n_steps++;
        }
        if (status || evaluate(rd, model, name, &dev)) {
            status = 1;
            break;
        }
        printf("train model=%s epoch=%d step=%ld loss=%.4f mlm=%.4f kd=%.4f crd=%.4f dev_mlm_acc=%.4f "
               "dev_perplexity=%.2f segments_per_s=%.0f\n",
               name, epoch, step, sums[0] / n_steps, sums[1] / n_steps, sums[2] / n_steps, sums[3] / n_steps,
               dev.accuracy, dev.perplexity, N / (now_seconds() - t0));
        fflush(stdout);
    }
    codir_adamw_free(&opt);
    codir_adamw_free(&opt_heads);
    return status;
}

/* Prints the machine-readable result line of a model. */
static void print_result(const char *name, const codir_model *model, const codir_mlm_scores *s)
{
    printf("result model=%s layers=%d hidden=%d params=%zu mlm_acc=%.4f perplexity=%.2f masked_tokens=%ld\n", name,
           model->cfg.num_layers, model->cfg.hidden, model->params.count, s->accuracy, s->perplexity, s->count);
}

/* Loads the teacher of --teacher with its vocabulary. Returns NULL after printing an error. */
static codir_model *load_teacher(const options *o, codir_vocab **vocab)
{
    char path[4096];
    codir_model *teacher;
    snprintf(path, sizeof path, "%s/vocab.txt", o->teacher_in);
    *vocab = codir_vocab_load(path, 1);
    teacher = *vocab ? codir_model_load(o->teacher_in) : NULL;
    if (!teacher) {
        fprintf(stderr, "pretrain: loading the teacher from %s failed: %s\n", o->teacher_in, codir_last_error());
        return NULL;
    }
    if (!teacher->cfg.mlm_head || teacher->cfg.vocab_size != (*vocab)->size || teacher->cfg.max_len < o->max_len) {
        fprintf(stderr, "pretrain: the teacher in %s needs the masked-LM head, a vocabulary of %d like its vocab.txt and "
                        "at least %d positions (--max-len); it has %s, %d and %d\n",
                o->teacher_in, (*vocab)->size, o->max_len, teacher->cfg.mlm_head ? "the head" : "no head",
                teacher->cfg.vocab_size, teacher->cfg.max_len);
        codir_model_free(teacher);
        return NULL;
    }
    return teacher;
}

int main(int argc, char **argv)
{
    options o;
    run_data rd;
    codir_corpus *train_text = NULL, *dev_text = NULL;
    codir_vocab *vocab = NULL;
    codir_model *teacher = NULL, *student = NULL;
    codir_distiller *dist = NULL;
    codir_config tcfg, scfg;
    codir_distill_config dcfg;
    codir_mlm_scores teacher_scores, student_scores, init_scores;
    double t_start = now_seconds(), t_phase, cpu_phase;
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

    /* Fail now, not after training, when an output folder cannot be written. */
    if ((!o.teacher_in && make_folder(o.teacher_out)) || make_folder(o.student_out)) goto done;

    /* Text, vocabulary and segments. */
    train_text = load_corpus(o.corpus_dir, "train.txt");
    dev_text = train_text ? load_corpus(o.corpus_dir, "dev.txt") : NULL;
    if (!train_text || !dev_text) goto done;
    if (o.teacher_in) {
        teacher = load_teacher(&o, &vocab);
        if (!teacher) goto done;
    } else {
        vocab = codir_vocab_build((const char *const *)train_text->lines, train_text->num_lines, o.vocab_size, 2, 1);
        if (!vocab) {
            fprintf(stderr, "pretrain: building the vocabulary from %s failed: %s\n", train_text->name,
                    codir_last_error());
            goto done;
        }
    }
    rd.train = codir_segment_corpus(vocab, train_text, o.max_len);
    rd.dev = rd.train ? codir_segment_corpus(vocab, dev_text, o.max_len) : NULL;
    if (!rd.train || !rd.dev) {
        fprintf(stderr, "pretrain: %s\n", codir_last_error());
        goto done;
    }
    if (o.max_segments > 0 && o.max_segments < rd.train->count) rd.train->count = o.max_segments;
    printf("corpus=%s train_segments=%d train_documents=%d dev_segments=%d dev_documents=%d vocab=%d max_len=%d\n",
           o.corpus_dir, rd.train->count, rd.train->labels[rd.train->count - 1] + 1, rd.dev->count, dev_text->num_docs,
           vocab->size, o.max_len);
    rd.mlm = codir_mlm_config_default(vocab);
    rd.mlm.select_prob = o.mask_rate;
    rd.order = (int *)malloc((size_t)rd.train->count * sizeof(int));
    if (!rd.order || codir_batch_init(&rd.batch, o.batch_size, o.max_len) ||
        codir_mlm_batch_init(&rd.masked, o.batch_size, o.max_len) ||
        codir_ctx_init(&rd.ctx, (size_t)64 << 20, (uint64_t)o.seed)) {
        fprintf(stderr, "pretrain: %s\n", rd.order ? codir_last_error() : "out of memory");
        goto done;
    }

    /* The teacher: masked-LM pre-training, or loaded. */
    t_phase = now_seconds();
    cpu_phase = cpu_seconds();
    if (!teacher) {
        tcfg = codir_config_default();
        tcfg.vocab_size = vocab->size;
        tcfg.max_len = o.max_len;
        tcfg.num_layers = o.teacher_layers;
        tcfg.hidden = o.hidden;
        tcfg.num_heads = o.heads;
        tcfg.ffn = o.ffn;
        tcfg.mlm_head = 1;
        tcfg.dropout = o.dropout;
        teacher = codir_model_create(&tcfg, (uint64_t)o.seed);
        if (!teacher) {
            fprintf(stderr, "pretrain: teacher: %s\n", codir_last_error());
            goto done;
        }
        /* One pass over dev.txt first, so a dev set with nothing to score fails now. */
        if (codir_mlm_evaluate(&rd.ctx, teacher, rd.dev, 64, &rd.mlm, EVAL_MASK_SEED, &teacher_scores)) {
            fprintf(stderr, "pretrain: %s/dev.txt cannot be scored: %s; it needs words that the vocabulary "
                            "learned from train.txt knows\n",
                    o.corpus_dir, codir_last_error());
            goto done;
        }
        if (train(&rd, "teacher", teacher, NULL, NULL, o.teacher_epochs)) goto done;
    }
    if (evaluate(&rd, teacher, "teacher", &teacher_scores)) goto done;
    printf("phase=teacher seconds=%.1f cpu_seconds=%.1f\n", now_seconds() - t_phase, cpu_seconds() - cpu_phase);
    if (!o.teacher_in && save_folder(teacher, vocab, o.teacher_out, "teacher")) goto done;

    /* The student: every other teacher block, then CoDIR-Pre with negatives from the
       other segments of each segment's document (labels are document ids). */
    t_phase = now_seconds();
    cpu_phase = cpu_seconds();
    scfg = teacher->cfg;
    scfg.num_layers = o.student_layers;
    scfg.dropout = o.dropout;
    student = codir_model_create(&scfg, (uint64_t)o.seed + 1000);
    if (!student || codir_model_init_from(student, teacher, CODIR_INIT_EVERY_OTHER)) {
        fprintf(stderr, "pretrain: student: %s\n", codir_last_error());
        goto done;
    }
    if (evaluate(&rd, student, "student", &init_scores)) goto done;
    printf("init model=student layers=%d mlm_acc=%.4f perplexity=%.2f\n", scfg.num_layers, init_scores.accuracy,
           init_scores.perplexity);
    dcfg = codir_distill_config_default();
    dcfg.beta = o.beta;
    dcfg.temperature = o.temperature;
    dcfg.lambda = o.lambda;
    dcfg.tau = o.tau;
    dcfg.num_negatives = o.negatives;
    dcfg.proj_dim = o.proj_dim;
    dcfg.momentum = o.momentum;
    dcfg.negatives_from = CODIR_NEG_SAME_GROUP;
    dist = codir_distiller_create(&dcfg, &scfg, &teacher->cfg, rd.train->labels, rd.train->count,
                                  (uint64_t)o.seed + 2000);
    if (!dist) {
        fprintf(stderr, "pretrain: distiller: %s\n", codir_last_error());
        goto done;
    }
    if (train(&rd, "student", student, teacher, dist, o.student_epochs)) goto done;
    if (evaluate(&rd, student, "student", &student_scores)) goto done;
    printf("phase=student seconds=%.1f cpu_seconds=%.1f\n", now_seconds() - t_phase, cpu_seconds() - cpu_phase);
    if (save_folder(student, vocab, o.student_out, "student")) goto done;

    print_result("teacher", teacher, &teacher_scores);
    print_result("student", student, &student_scores);
    printf("arena_peak_mb=%.1f total_s=%.1f cpu_s=%.1f\n", (double)codir_arena_peak(&rd.ctx.arena) / 1048576.0,
           now_seconds() - t_start, cpu_seconds());
    rc = 0;

done:
    codir_distiller_free(dist);
    codir_model_free(student);
    codir_model_free(teacher);
    codir_ctx_free(&rd.ctx);
    codir_batch_free(&rd.batch);
    codir_mlm_batch_free(&rd.masked);
    free(rd.order);
    codir_encoded_free(rd.train);
    codir_encoded_free(rd.dev);
    codir_vocab_free(vocab);
    codir_corpus_free(train_text);
    codir_corpus_free(dev_text);
    return rc;
}
