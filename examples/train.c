/* train.c - fine-tune one BERT-style model on a GLUE-style task folder and save it as a
   Hugging Face model folder (config.json, model.safetensors, vocab.txt).

   Build and run from the repository root:

       cc -std=c11 -O2 -fopenmp examples/train.c -o train -lm
       ./train --data examples/data/uci-sentiment --out sentiment-model

   The folder contains train.tsv and dev.tsv in one of the GLUE layouts that
   codir_dataset_load_tsv recognizes by their header (SST-2, CoLA, MRPC, QNLI, RTE,
   STS-B, QQP, MNLI): single sentences or pairs, class labels or regression scores.
   `./train --help` lists every option. */
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

/* The maximum number of classes: a larger class id is almost surely a typo or a
   float score in a classification file. */
#define MAX_CLASSES 10000

/* Command-line options of a run. */
typedef struct options {
    const char *data_dir, *out_dir, *init_dir, *vocab_path;
    int vocab_size, max_len, batch_size, micro_batch, epochs, seed, threads;
    int layers, hidden, heads, ffn, lowercase, train_limit;
    float lr, weight_decay, warmup, dropout, clip;
} options;

static void set_defaults(options *o)
{
    o->data_dir = "examples/data/uci-sentiment";
    o->out_dir = "train_out";
    o->init_dir = NULL;
    o->vocab_path = NULL;
    o->vocab_size = 3000;
    o->max_len = 0;
    o->batch_size = 32;
    o->micro_batch = 0;
    o->epochs = 6;
    o->seed = 1;
    o->threads = 0;
    o->layers = 4;
    o->hidden = 128;
    o->heads = 4;
    o->ffn = 512;
    o->lowercase = 1;
    o->lr = 5e-4f;
    o->weight_decay = 0.1f;
    o->warmup = 0.06f;
    o->dropout = 0.1f;
    o->clip = 0.0f;
    o->train_limit = 0;
}

static void print_help(const options *d)
{
    printf("usage: train [options]\n\n"
           "Fine-tunes a model on DIR/train.tsv, reports the task's metrics on DIR/dev.tsv after\n"
           "every epoch, and saves the model folder (config.json, model.safetensors, vocab.txt).\n\n");
    printf("  --data DIR          folder with train.tsv and dev.tsv in a GLUE layout (default %s)\n", d->data_dir);
    printf("  --out DIR           model folder to write; created if missing, its parent must exist\n"
           "                      (default %s)\n", d->out_dir);
    printf("  --init DIR          start from this model folder (its config.json and vocab.txt)\n");
    printf("  --train-limit N     use only the first N rows of train.tsv; 0 uses all (default %d)\n", d->train_limit);
    printf("  --vocab FILE        use this vocab.txt instead of learning one from train.tsv\n");
    printf("  --vocab-size N      tokens of the vocabulary learned from train.tsv (default %d)\n", d->vocab_size);
    printf("  --cased             keep case (default: lowercase, as uncased BERT)\n");
    printf("  --max-len N         longest sequence incl. special tokens, tokens; 0 means the --init\n"
           "                      model's positions, or 128 for a new model (default %d)\n", d->max_len);
    printf("  --batch N           examples per optimizer step (default %d)\n", d->batch_size);
    printf("  --micro-batch N     examples per forward pass; gradients of micro-batches add up to the\n"
           "                      batch; 0 means the whole batch at once (default %d)\n", d->micro_batch);
    printf("  --epochs N          passes over train.tsv (default %d)\n", d->epochs);
    printf("  --layers N          transformer blocks of a new model (default %d)\n", d->layers);
    printf("  --hidden N          model width of a new model (default %d)\n", d->hidden);
    printf("  --heads N           attention heads of a new model; must divide --hidden (default %d)\n", d->heads);
    printf("  --ffn N             feed-forward inner width of a new model (default %d)\n", d->ffn);
    printf("  --lr X              peak learning rate of AdamW (default %g)\n", (double)d->lr);
    printf("  --weight-decay X    AdamW decoupled weight decay, not applied to biases and LayerNorm\n"
           "                      (default %g)\n", (double)d->weight_decay);
    printf("  --warmup X          warmup as a fraction of all steps (default %g)\n", (double)d->warmup);
    printf("  --dropout X         dropout probability (default %g)\n", (double)d->dropout);
    printf("  --clip X            clip the global gradient norm to X; 0 turns clipping off (default %g)\n",
           (double)d->clip);
    printf("  --seed N            seed of initialization, shuffling and dropout (default %d)\n", d->seed);
    printf("  --threads N         OpenMP threads; 0 keeps the OpenMP default (default %d)\n", d->threads);
}

static int parse_int(const char *name, const char *text, long min, long max, int *out)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "train: invalid value '%s' for %s: expected an integer in [%ld, %ld]\n", text, name, min, max);
        return 0;
    }
    *out = (int)v;
    return 1;
}

static int parse_float(const char *name, const char *text, double min, double max, float *out)
{
    char *end;
    double v = strtod(text, &end);
    if (*text == '\0' || *end != '\0' || !(v >= min && v <= max)) {
        fprintf(stderr, "train: invalid value '%s' for %s: expected a number in [%g, %g]\n", text, name, min, max);
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
        if (strcmp(a, "--cased") == 0) {
            o->lowercase = 0;
            continue;
        }
        if (!v || strncmp(v, "--", 2) == 0) {
            fprintf(stderr, "train: option %s needs a value (see --help)\n", a);
            return 0;
        }
        if (strcmp(a, "--data") == 0) ok = (o->data_dir = v) != NULL;
        else if (strcmp(a, "--out") == 0) ok = (o->out_dir = v) != NULL;
        else if (strcmp(a, "--init") == 0) ok = (o->init_dir = v) != NULL;
        else if (strcmp(a, "--vocab") == 0) ok = (o->vocab_path = v) != NULL;
        else if (strcmp(a, "--train-limit") == 0) ok = parse_int(a, v, 0, 2000000000L, &o->train_limit);
        else if (strcmp(a, "--vocab-size") == 0) ok = parse_int(a, v, 16, 1000000, &o->vocab_size);
        else if (strcmp(a, "--max-len") == 0) ok = parse_int(a, v, 0, 4096, &o->max_len);
        else if (strcmp(a, "--batch") == 0) ok = parse_int(a, v, 1, 65536, &o->batch_size);
        else if (strcmp(a, "--micro-batch") == 0) ok = parse_int(a, v, 0, 65536, &o->micro_batch);
        else if (strcmp(a, "--epochs") == 0) ok = parse_int(a, v, 1, 10000, &o->epochs);
        else if (strcmp(a, "--layers") == 0) ok = parse_int(a, v, 1, 128, &o->layers);
        else if (strcmp(a, "--hidden") == 0) ok = parse_int(a, v, 1, 65536, &o->hidden);
        else if (strcmp(a, "--heads") == 0) ok = parse_int(a, v, 1, 1024, &o->heads);
        else if (strcmp(a, "--ffn") == 0) ok = parse_int(a, v, 1, 262144, &o->ffn);
        else if (strcmp(a, "--lr") == 0) ok = parse_float(a, v, 1e-8, 1.0, &o->lr);
        else if (strcmp(a, "--weight-decay") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->weight_decay);
        else if (strcmp(a, "--warmup") == 0) ok = parse_float(a, v, 0.0, 1.0, &o->warmup);
        else if (strcmp(a, "--dropout") == 0) ok = parse_float(a, v, 0.0, 0.9, &o->dropout);
        else if (strcmp(a, "--clip") == 0) ok = parse_float(a, v, 0.0, 1e6, &o->clip);
        else if (strcmp(a, "--seed") == 0) ok = parse_int(a, v, 0, 2000000000L, &o->seed);
        else if (strcmp(a, "--threads") == 0) ok = parse_int(a, v, 0, 1024, &o->threads);
        else {
            fprintf(stderr, "train: unknown option %s (see --help)\n", a);
            return 0;
        }
        if (!ok) return 0;
        i++;
    }
    if (o->hidden % o->heads != 0) {
        fprintf(stderr, "train: --heads %d does not divide --hidden %d\n", o->heads, o->hidden);
        return 0;
    }
    if (o->max_len > 0 && o->max_len < 3) {
        fprintf(stderr, "train: invalid value '%d' for --max-len: expected 0 or an integer in [3, 4096]\n", o->max_len);
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
        fprintf(stderr, "train: cannot create the folder %s: %s\n", dir, strerror(errno));
        return 1;
    }
    /* The path may exist as a file, or as a folder this user cannot write: find out
       now by creating and removing a file in it, not after training. */
    if (snprintf(probe, sizeof probe, "%s/.write_check.tmp", dir) >= (int)sizeof probe) {
        fprintf(stderr, "train: the folder path %s is too long\n", dir);
        return 1;
    }
    file = fopen(probe, "wb");
    if (!file) {
        fprintf(stderr, "train: cannot write into the folder %s: %s; give a writable folder\n", dir, strerror(errno));
        return 1;
    }
    fclose(file);
    remove(probe);
    return 0;
}

/* Returns a copy of `init` with a new classifier of `num_labels` outputs, for a model
   pre-trained on another task: every other tensor is copied. */
static codir_model *replace_classifier(codir_model *init, int num_labels, int seed)
{
    codir_config cfg = init->cfg;
    codir_model *m;
    int i;
    cfg.num_labels = num_labels;
    m = codir_model_create(&cfg, (uint64_t)seed);
    if (!m) return NULL;
    for (i = 0; i < m->params.num_tensors; i++) {
        codir_tensor *t = &m->params.tensors[i];
        const codir_tensor *src = codir_params_find(&init->params, t->name);
        if (src && strncmp(t->name, "classifier.", 11) != 0) memcpy(t->data, src->data, t->numel * sizeof(float));
    }
    return m;
}

/* Loads DIR/NAME as a dataset; prints the error and returns NULL on failure. */
static codir_dataset *load(const char *dir, const char *name)
{
    char path[4096];
    codir_dataset *d;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    d = codir_dataset_load_tsv(path);
    if (!d) fprintf(stderr, "train: %s\n", codir_last_error());
    return d;
}

/* Runs one optimizer step over batch examples order[start..start+count-1], as
   micro-batches of at most o->micro_batch examples. */
static int train_step(codir_ctx *ctx, codir_model *model, codir_adamw *opt, codir_batch *batch,
                      const codir_encoded *enc, const int *order, int start, int count, const options *o, float lr,
                      double *loss)
{
    codir_params *params = &model->params;
    int done, rc;
    *loss = 0.0;
    codir_params_zero_grad(&model->params);
    for (done = 0; done < count; done += o->micro_batch) {
        int n = count - done < o->micro_batch ? count - done : o->micro_batch;
        codir_loss_terms terms;
        rc = codir_batch_fill(batch, enc, order, start + done, n);
        if (!rc) rc = codir_task_accumulate(ctx, model, batch, (float)n / (float)count, (uint64_t)opt->step, &terms);
        if (rc) return rc;
        *loss += terms.task * n / count;
    }
    if (o->clip > 0.0f) codir_clip_grad_norm(&params, 1, o->clip);
    codir_adamw_step(opt, &model->params, lr);
    return CODIR_OK;
}

/* Prints the metrics that apply to the task. */
static void print_scores(const codir_dataset *data, const codir_scores *s, int epoch, double loss, double rate)
{
    printf("epoch=%d train_loss=%.4f", epoch, loss);
    if (data->is_regression) printf(" pearson=%.4f spearman=%.4f", s->pearson, s->spearman);
    else {
        printf(" accuracy=%.4f", s->accuracy);
        if (data->num_classes == 2) printf(" f1=%.4f", s->f1);
        printf(" matthews=%.4f", s->matthews);
    }
    printf(" examples_per_s=%.0f\n", rate);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    options o;
    codir_dataset *train_data = NULL, *dev_data = NULL;
    codir_vocab *vocab = NULL;
    codir_encoded *train = NULL, *dev = NULL;
    codir_model *model = NULL;
    codir_ctx ctx;
    codir_batch batch;
    codir_adamw opt;
    codir_config cfg;
    char path[4096];
    int *order = NULL, rc = 1, i, epoch;
    uint64_t rng;
    long step = 0, total, warmup;

    memset(&ctx, 0, sizeof ctx);
    memset(&batch, 0, sizeof batch);
    memset(&opt, 0, sizeof opt);
    set_defaults(&o);
    i = parse_args(argc, argv, &o);
    if (i == 2) {
        print_help(&o);
        return 0;
    }
    if (i == 0) return 2;
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif

    /* Data and vocabulary: the initial model's, a given one, or one learned here. */
    train_data = load(o.data_dir, "train.tsv");
    dev_data = train_data ? load(o.data_dir, "dev.tsv") : NULL;
    if (!train_data || !dev_data) goto done;
    if (!train_data->is_regression && train_data->num_classes > MAX_CLASSES) {
        fprintf(stderr, "train: %s/train.tsv has class ids up to %d; ids must be 0..N-1 with N at most %d\n", o.data_dir,
                train_data->num_classes - 1, MAX_CLASSES);
        goto done;
    }
    if (!train_data->is_regression && dev_data->num_classes > train_data->num_classes) {
        fprintf(stderr, "train: %s/dev.tsv has class %d but train.tsv only 0..%d\n", o.data_dir, dev_data->num_classes - 1,
                train_data->num_classes - 1);
        goto done;
    }
    if (dev_data->is_regression != train_data->is_regression) {
        fprintf(stderr, "train: %s: train.tsv and dev.tsv have different label kinds\n", o.data_dir);
        goto done;
    }

    /* Fail now, not after training, when the output folder cannot be made. */
    if (make_folder(o.out_dir)) goto done;
    if (o.train_limit > 0) codir_dataset_truncate(train_data, o.train_limit);
    if (o.init_dir) snprintf(path, sizeof path, "%s/vocab.txt", o.init_dir);
    if (o.init_dir || o.vocab_path) vocab = codir_vocab_load(o.init_dir ? path : o.vocab_path, o.lowercase);
    else vocab = codir_vocab_build((const char *const *)train_data->texts, train_data->count, o.vocab_size, 2, o.lowercase);
    if (!vocab) {
        fprintf(stderr, "train: vocabulary: %s\n", codir_last_error());
        goto done;
    }
    if (o.init_dir) {
        model = codir_model_load(o.init_dir);
        if (!model) {
            fprintf(stderr, "train: loading %s failed: %s\n", o.init_dir, codir_last_error());
            goto done;
        }
        if (o.max_len == 0) o.max_len = model->cfg.max_len;
        if (model->cfg.vocab_size != vocab->size) {
            fprintf(stderr, "train: the model in %s has a vocabulary of %d tokens but %s/vocab.txt has %d\n", o.init_dir,
                    model->cfg.vocab_size, o.init_dir, vocab->size);
            goto done;
        }
    }
    if (o.max_len == 0) o.max_len = 128;
    if (o.micro_batch == 0 || o.micro_batch > o.batch_size) o.micro_batch = o.batch_size;
    train = codir_encode_dataset(vocab, train_data, o.max_len);
    dev = train ? codir_encode_dataset(vocab, dev_data, o.max_len) : NULL;
    if (!train || !dev) {
        fprintf(stderr, "train: encoding failed: %s\n", codir_last_error());
        goto done;
    }
    printf("data=%s train=%d dev=%d task=%s%s classes=%d vocab=%d\n", o.data_dir, train->count, dev->count,
           train_data->is_regression ? "regression" : "classification", train_data->texts_b ? " pairs" : "",
           train_data->num_classes, vocab->size);

    /* The model: loaded (with a new classifier when the task has another number of
       outputs, as after pre-training), or new. */
    if (model) {
        int outputs = train_data->is_regression ? 1 : train_data->num_classes;
        if (model->cfg.num_labels != outputs) {
            codir_model *fresh = replace_classifier(model, outputs, o.seed);
            printf("init=%s classifier=new outputs=%d (the model had %d)\n", o.init_dir, outputs, model->cfg.num_labels);
            codir_model_free(model);
            model = fresh;
        }
    } else {
        cfg = codir_config_default();
        cfg.vocab_size = vocab->size;
        cfg.max_len = o.max_len;
        cfg.num_layers = o.layers;
        cfg.hidden = o.hidden;
        cfg.num_heads = o.heads;
        cfg.ffn = o.ffn;
        cfg.num_labels = train_data->is_regression ? 1 : train_data->num_classes;
        cfg.dropout = o.dropout;
        model = codir_model_create(&cfg, (uint64_t)o.seed);
    }
    if (!model) {
        fprintf(stderr, "train: model: %s\n", codir_last_error());
        goto done;
    }
    if (model->cfg.max_len < o.max_len) {
        fprintf(stderr, "train: --max-len %d exceeds the model's %d positions\n", o.max_len, model->cfg.max_len);
        goto done;
    }
    order = (int *)malloc((size_t)train->count * sizeof(int));
    if (!order || codir_ctx_init(&ctx, (size_t)64 << 20, (uint64_t)o.seed) ||
        codir_batch_init(&batch, o.micro_batch, o.max_len) ||
        codir_adamw_init(&opt, &model->params, 0.9f, 0.98f, 1e-6f, o.weight_decay)) {
        fprintf(stderr, "train: %s\n", codir_last_error());
        goto done;
    }

    /* Fine-tuning. */
    rng = (uint64_t)o.seed * 0x9E3779B97F4A7C15ull + 7;
    total = (long)((train->count + o.batch_size - 1) / o.batch_size) * o.epochs;
    warmup = (long)(o.warmup * (float)total);
    for (i = 0; i < train->count; i++) order[i] = i;
    for (epoch = 1; epoch <= o.epochs; epoch++) {
        double t0 = now_seconds(), loss_sum = 0.0;
        int start, steps = 0;
        codir_scores scores;
        for (i = 0; i < train->count; i++) order[i] = i;
        codir_shuffle(order, train->count, &rng);
        codir_bucket_by_length(order, train->count, train, 16 * o.batch_size, o.batch_size, &rng);
        for (start = 0; start < train->count; start += o.batch_size, step++, steps++) {
            int n = train->count - start < o.batch_size ? train->count - start : o.batch_size;
            double loss;
            if (train_step(&ctx, model, &opt, &batch, train, order, start, n, &o,
                           codir_lr_schedule(step, total, warmup, o.lr), &loss)) {
                fprintf(stderr, "train: epoch %d: %s\n", epoch, codir_last_error());
                goto done;
            }
            loss_sum += loss;
        }
        if (codir_evaluate(&ctx, model, dev, 64, &scores)) {
            fprintf(stderr, "train: evaluation failed: %s\n", codir_last_error());
            goto done;
        }
        print_scores(train_data, &scores, epoch, loss_sum / steps, train->count / (now_seconds() - t0));
    }

    /* The model folder. */
    snprintf(path, sizeof path, "%s/vocab.txt", o.out_dir);
    if (codir_model_save(model, o.out_dir) || codir_vocab_save(vocab, path)) {
        fprintf(stderr, "train: saving to %s failed: %s\n", o.out_dir, codir_last_error());
        goto done;
    }
    printf("saved=%s\n", o.out_dir);
    rc = 0;

done:
    codir_adamw_free(&opt);
    codir_batch_free(&batch);
    codir_ctx_free(&ctx);
    codir_model_free(model);
    free(order);
    codir_encoded_free(train);
    codir_encoded_free(dev);
    codir_vocab_free(vocab);
    codir_dataset_free(train_data);
    codir_dataset_free(dev_data);
    return rc;
}
