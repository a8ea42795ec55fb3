/* Fails each allocation of codir.h in turn and checks that the library reports it.

   An allocator override through CODIR_MALLOC, CODIR_REALLOC and CODIR_FREE fails
   allocation number N. Each scenario below is a loader, a writer, or model creation
   with a task step and a CoDIR step. It first runs once with no failure, which
   counts its allocations. Then, for every N from 1 to that count, it runs again in a
   child process with allocation N failing. Each of those runs must
     - not crash (a child killed by a signal is reported with its N),
     - return an error from the call whose allocation failed: NULL or a negative
       CODIR_ERR_* code, with a codir_last_error() that says memory ran out,
     - free everything: the live blocks and bytes after cleanup equal those before,
     - leave no .tmp file behind when it was writing a file.
   A call may also absorb the failure and succeed; then its result must equal that
   of the run without failure. Prints one line per scenario and a summary line, and
   exits 1 on any problem.

       gcc -std=c11 -O1 -Wno-unknown-pragmas tests/alloc_fail.c -o /tmp/alloc_fail -lm && /tmp/alloc_fail

   It is built without OpenMP so that every run makes the same allocations in the
   same order, and it needs POSIX (fork, waitpid) to survive a crashing run. Pass a
   scenario name substring as the first argument to run only matching scenarios, and
   a number N as the second to run only allocation N failing, in this process, for a
   debugger. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- the failing allocator ---- */

static long allocations;        /* CODIR_MALLOC and CODIR_REALLOC calls so far */
static long fail_at;            /* the call that returns NULL, counting from 1, or 0 for none */
static long live_blocks;
static long long live_bytes;

/* Each block starts with a header that records its size, so a free can subtract the
   block's bytes. A header the size of max_align_t keeps the payload aligned. */
typedef union fail_header {
    size_t size;
    max_align_t align;
} fail_header;

static void *fail_malloc(size_t n)
{
    fail_header *h;
    if (++allocations == fail_at) return NULL;
    h = (fail_header *)malloc(sizeof(fail_header) + n);
    if (!h) return NULL;
    h->size = n;
    live_blocks++;
    live_bytes += (long long)n;
    return h + 1;
}

static void *fail_realloc(void *p, size_t n)
{
    fail_header *h, *grown;
    size_t old;
    if (!p) return fail_malloc(n);
    if (++allocations == fail_at) return NULL;
    h = (fail_header *)p - 1;
    old = h->size;
    grown = (fail_header *)realloc(h, sizeof(fail_header) + n);
    if (!grown) return NULL;
    grown->size = n;
    live_bytes += (long long)n - (long long)old;
    return grown + 1;
}

static void fail_free(void *p)
{
    fail_header *h;
    if (!p) return;
    h = (fail_header *)p - 1;
    live_blocks--;
    live_bytes -= (long long)h->size;
    free(h);
}

#define CODIR_MALLOC(n) fail_malloc(n)
#define CODIR_REALLOC(p, n) fail_realloc(p, n)
#define CODIR_FREE(p) fail_free(p)
#define CODIR_IMPLEMENTATION
#include "../codir.h"

/* ---- test files ---- */

static char folder[512];        /* a new folder under $TMPDIR (or /tmp) for this run */
static char model_dir[600];     /* folder/model, a saved model folder */
static char out_dir[600];       /* folder/out, where the save scenario writes */

/* Returns folder/name in a static buffer; `slot` picks one of 4 buffers so that a
   few paths can be used at once. */
static const char *path_in_folder(int slot, const char *name)
{
    static char paths[4][700];
    snprintf(paths[slot], sizeof paths[slot], "%s/%s", folder, name);
    return paths[slot];
}

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    size_t n = strlen(text);
    int ok = f && fwrite(text, 1, n, f) == n;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok) fprintf(stderr, "alloc_fail: cannot write %s: %s\n", path, strerror(errno));
    return ok;
}

static const char sst2_tsv[] = "sentence\tlabel\nhide new secretions\t0\ncontains no wit , only labored gags\t0\n"
                               "that loves its characters\t1\nremains utterly satisfied\t1\n";
static const char rte_tsv[] = "index\tsentence1\tsentence2\tlabel\n0\tNo weapons found.\tWeapons found.\tnot_entailment\n"
                              "1\tA place of sorrow.\tA new leader.\tentailment\n";
static const char stsb_tsv[] = "sentence1\tsentence2\tscore\nA plane is taking off.\tAn air plane is taking off.\t5.000\n"
                               "A man is playing a flute.\tA man plays.\t3.800\n";
static const char names_tsv[] = "text\tclass\ncats purr\tfeline\ndogs bark\tcanine\nlions roar\tfeline\n";
static const char vocab_txt[] = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nplane\n##s\nman\n";
static const char *const corpus[4] = {"the movie was great and the plot was fine",
                                      "caf\xC3\xA9 na\xC3\xAFve \xE4\xB8\xAD\xE6\x96\x87 words words",
                                      "a dull, boring film; nothing works", "unbelievable believing believer"};

/* Tiny model sizes: the failure sweep repeats every scenario once per allocation. */
static codir_config tiny_config(int layers)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = 20;
    cfg.max_len = 8;
    cfg.num_layers = layers;
    cfg.hidden = 8;
    cfg.num_heads = 2;
    cfg.ffn = 16;
    cfg.num_labels = 3;
    return cfg;
}

/* Writes the input files of the loader scenarios. Returns 1 on success. */
static int make_files(void)
{
    const char *tmp = getenv("TMPDIR");
    codir_config cfg = tiny_config(1);
    codir_model *m;
    int ok;
    snprintf(folder, sizeof folder, "%s/codir_alloc_fail_XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(folder)) {
        fprintf(stderr, "alloc_fail: cannot create a folder under %s: %s\n", tmp && tmp[0] ? tmp : "/tmp",
                strerror(errno));
        return 0;
    }
    snprintf(model_dir, sizeof model_dir, "%s/model", folder);
    snprintf(out_dir, sizeof out_dir, "%s/out", folder);
    ok = write_text(path_in_folder(0, "sst2.tsv"), sst2_tsv) && write_text(path_in_folder(0, "rte.tsv"), rte_tsv) &&
         write_text(path_in_folder(0, "stsb.tsv"), stsb_tsv) && write_text(path_in_folder(0, "names.tsv"), names_tsv) &&
         write_text(path_in_folder(0, "vocab.txt"), vocab_txt);
    if (!ok) return 0;
    if (mkdir(model_dir, 0700) != 0 || mkdir(out_dir, 0700) != 0) {
        fprintf(stderr, "alloc_fail: cannot create %s: %s\n", model_dir, strerror(errno));
        return 0;
    }
    m = codir_model_create(&cfg, 5);
    ok = m && codir_model_save(m, model_dir) == CODIR_OK;
    if (!ok) fprintf(stderr, "alloc_fail: cannot save the model folder: %s\n", codir_last_error());
    codir_model_free(m);
    return ok;
}

static void remove_files(void)
{
    static const char *const names[] = {"sst2.tsv", "rte.tsv", "stsb.tsv", "names.tsv", "vocab.txt",
                                        "model/config.json", "model/model.safetensors", "out/config.json",
                                        "out/model.safetensors", "out/vocab.txt", "out/tensors.safetensors"};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++) remove(path_in_folder(0, names[i]));
    remove(model_dir);
    remove(out_dir);
    remove(folder);
}

/* ---- scenarios ----

   Each returns 0 when every call succeeded and 1 when a call failed, after freeing
   everything it made. A failed call that returned a positive code sets bad_return.
   On success *result receives a checksum of what the calls produced. */

static int bad_return;          /* set when a call failed without NULL or a negative code */

/* Records a non-negative return of a failed int call as a problem. */
static int failed_rc(int rc)
{
    if (rc > 0) bad_return = 1;
    return rc != CODIR_OK;
}

static double dataset_checksum(const codir_dataset *d)
{
    double sum = d->count + 7.0 * d->num_classes;
    int i;
    for (i = 0; i < d->count; i++) {
        sum += d->labels[i] + 3.0 * (double)strlen(d->texts[i]);
        if (d->texts_b) sum += 5.0 * (double)strlen(d->texts_b[i]);
        if (d->targets) sum += d->targets[i];
    }
    if (d->label_names)
        for (i = 0; i < d->num_classes; i++) sum += 11.0 * (double)strlen(d->label_names[i]) * (i + 1);
    return sum;
}

static int load_tsv_file(const char *name, double *result)
{
    codir_dataset *d = codir_dataset_load_tsv(path_in_folder(1, name));
    if (!d) return 1;
    *result = dataset_checksum(d);
    codir_dataset_free(d);
    return 0;
}

static int run_tsv_ids(double *result) { return load_tsv_file("sst2.tsv", result); }
static int run_tsv_given_names(double *result) { return load_tsv_file("rte.tsv", result); }
static int run_tsv_regression(double *result) { return load_tsv_file("stsb.tsv", result); }

static int run_tsv_names_from_file(double *result)
{
    codir_tsv_options o = codir_tsv_options_default();
    codir_dataset *d;
    o.text_a = "text";
    o.label = "class";
    o.label_kind = CODIR_LABEL_NAMES;
    d = codir_dataset_load_tsv_opts(path_in_folder(1, "names.tsv"), &o);
    if (!d) return 1;
    *result = dataset_checksum(d);
    codir_dataset_free(d);
    return 0;
}

static double vocab_checksum(const codir_vocab *v)
{
    double sum = v->size;
    int i;
    for (i = 0; i < v->size; i++) sum += (double)strlen(v->tokens[i]) * (i + 1);
    return sum + v->unk_id + 2.0 * v->mask_id;
}

static int run_vocab_load(double *result)
{
    codir_vocab *v = codir_vocab_load(path_in_folder(1, "vocab.txt"), 1);
    if (!v) return 1;
    *result = vocab_checksum(v);
    codir_vocab_free(v);
    return 0;
}

static int run_vocab_build(double *result)
{
    codir_vocab *v = codir_vocab_build(corpus, 4, 80, 1, 1);
    if (!v) return 1;
    *result = vocab_checksum(v);
    codir_vocab_free(v);
    return 0;
}

/* codir_vocab_save writes a .tmp file first and renames it. */
static int run_vocab_save(double *result)
{
    codir_vocab *v = codir_vocab_build(corpus, 4, 40, 1, 1);
    int rc;
    if (!v) return 1;
    rc = codir_vocab_save(v, path_in_folder(1, "out/vocab.txt"));
    codir_vocab_free(v);
    *result = 1.0;
    return failed_rc(rc);
}

/* Loads the TSV file, builds a vocabulary from it and encodes it. */
static int run_encode_dataset(double *result)
{
    codir_dataset *d = codir_dataset_load_tsv(path_in_folder(1, "rte.tsv"));
    codir_vocab *v = d ? codir_vocab_build((const char *const *)d->texts, d->count, 60, 1, 1) : NULL;
    codir_encoded *enc = v ? codir_encode_dataset(v, d, 8) : NULL;
    int i;
    if (enc) {
        *result = enc->count;
        for (i = 0; i < enc->count * enc->max_len; i++) *result += enc->ids[i] * (i + 1.0);
    }
    codir_encoded_free(enc);
    codir_vocab_free(v);
    codir_dataset_free(d);
    return enc == NULL;
}

/* Opens the saved model.safetensors and reads every tensor. */
static int run_safetensors_read(double *result)
{
    char path[700];
    codir_safetensors *st;
    int i, rc = CODIR_OK;
    snprintf(path, sizeof path, "%s/model.safetensors", model_dir);
    st = codir_safetensors_open(path);
    if (!st) return 1;
    *result = st->num_tensors;
    for (i = 0; i < st->num_tensors && rc == CODIR_OK; i++) {
        const codir_st_tensor *t = &st->tensors[i];
        float *values = (float *)calloc(t->numel + 1, sizeof(float));
        size_t k;
        if (!values) {
            rc = CODIR_ERR_NOMEM;
            break;
        }
        rc = codir_safetensors_read_f32(st, t->name, values, t->numel);
        for (k = 0; k < t->numel; k++) *result += values[k];
        free(values);
    }
    codir_safetensors_close(st);
    return failed_rc(rc);
}

static int run_safetensors_write(double *result)
{
    static const float a[6] = {1, 2, 3, 4, 5, 6}, b[2] = {-1, 1};
    static const char *const metadata[4] = {"format", "pt", "source", "alloc_fail"};
    codir_st_write tensors[2];
    memset(tensors, 0, sizeof tensors);
    tensors[0].name = "layer.weight";
    tensors[0].ndim = 2;
    tensors[0].shape[0] = 2;
    tensors[0].shape[1] = 3;
    tensors[0].data = a;
    tensors[1].name = "layer.bias";
    tensors[1].ndim = 1;
    tensors[1].shape[0] = 2;
    tensors[1].data = b;
    *result = 1.0;
    return failed_rc(codir_safetensors_write(path_in_folder(1, "out/tensors.safetensors"), tensors, 2, metadata, 2));
}

static double params_checksum(const codir_params *p)
{
    double sum = (double)p->count;
    size_t i;
    for (i = 0; i < p->count; i++) sum += p->data[i] * (double)((i % 97) + 1);
    return sum;
}

static int run_model_load(double *result)
{
    codir_model *m = codir_model_load(model_dir);
    if (!m) return 1;
    *result = params_checksum(&m->params) + m->cfg.num_labels;
    codir_model_free(m);
    return 0;
}

/* The fixture tests/fixtures/io/hf_bert_mlm: old LayerNorm names, F16 and BF16
   tensors, and the tied decoder that codir__hf_tied compares. */
static int run_model_load_mlm(double *result)
{
    char dir[700];
    const char *file = __FILE__, *slash = strrchr(file, '/');
    codir_model *m;
    snprintf(dir, sizeof dir, "%.*sfixtures/io/hf_bert_mlm", slash ? (int)(slash - file + 1) : 0, file);
    m = codir_model_load(dir);
    if (!m) return 1;
    *result = params_checksum(&m->params) + m->cfg.mlm_head;
    codir_model_free(m);
    return 0;
}

static int run_model_save(double *result)
{
    codir_config cfg = tiny_config(1);
    codir_model *m = codir_model_create(&cfg, 9);
    int rc;
    if (!m) return 1;
    rc = codir_model_save(m, out_dir);
    codir_model_free(m);
    *result = 1.0;
    return failed_rc(rc);
}

/* Creates a teacher, a student and a distiller, trains the teacher for one task step
   and the student for one CoDIR step, evaluates, and frees everything. With
   `regression` the models have one output, trained with MSE on float targets, and
   negatives are drawn by target distance. */
static int run_training(double *result, int mode, int regression)
{
    static const int lengths[6] = {5, 3, 6, 2, 4, 6};
    static const int labels[6] = {0, 1, 2, 0, 1, 2};
    static const int zeros[6] = {0, 0, 0, 0, 0, 0};
    static const float targets[6] = {0.5f, 4.0f, 2.5f, 1.0f, 3.5f, 0.0f};
    static const int order[6] = {0, 1, 2, 3, 4, 5};
    int ids[6 * 8], i, rc = CODIR_OK, failed = 0;
    codir_encoded enc;
    codir_config scfg = tiny_config(2), tcfg = tiny_config(3);
    codir_distill_config dcfg = codir_distill_config_default();
    codir_model *student = NULL, *teacher = NULL;
    codir_distiller *d = NULL;
    codir_ctx ctx;
    codir_batch batch;
    codir_adamw opt_s, opt_h, opt_t;
    codir_loss_terms terms;
    codir_scores scores;

    for (i = 0; i < 6 * 8; i++) ids[i] = (i * 7 + 3) % 20;
    memset(&enc, 0, sizeof enc);
    enc.count = 6;
    enc.max_len = 8;
    enc.lengths = (int *)lengths;
    enc.ids = ids;
    enc.labels = (int *)(regression ? zeros : labels);
    enc.targets = regression ? (float *)targets : NULL;
    enc.num_classes = regression ? 1 : 3;
    if (regression) scfg.num_labels = tcfg.num_labels = 1;
    memset(&ctx, 0, sizeof ctx);
    memset(&batch, 0, sizeof batch);
    memset(&opt_s, 0, sizeof opt_s);
    memset(&opt_h, 0, sizeof opt_h);
    memset(&opt_t, 0, sizeof opt_t);
    dcfg.proj_dim = 4;
    dcfg.num_negatives = 3;
    dcfg.mode = mode;

    /* A small arena, so that the steps outgrow it and take extra blocks. */
    rc = codir_ctx_init(&ctx, 256, 1);
    if (!rc) rc = codir_batch_init(&batch, 4, 8);
    if (rc) goto done;
    teacher = codir_model_create(&tcfg, 2);
    student = teacher ? codir_model_create(&scfg, 1) : NULL;
    d = student ? codir_distiller_create(&dcfg, &scfg, &tcfg, enc.labels, 6, 3) : NULL;
    if (!d) {
        failed = 1;
        goto done;
    }
    if (regression) rc = codir_distiller_set_targets(d, targets);
    if (!rc) rc = codir_adamw_init(&opt_t, &teacher->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    if (!rc) rc = codir_adamw_init(&opt_s, &student->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    if (!rc) rc = codir_adamw_init(&opt_h, &d->params, 0.9f, 0.98f, 1e-6f, 0.1f);
    if (!rc) rc = codir_batch_fill(&batch, &enc, order, 0, 4);
    if (!rc) rc = codir_task_step(&ctx, teacher, &opt_t, &batch, 1e-3f, &terms);
    if (!rc) *result = terms.total;
    if (!rc) rc = codir_batch_fill(&batch, &enc, order, 2, 4);
    if (!rc) rc = codir_distill_step(&ctx, student, teacher, d, &opt_s, &opt_h, &batch, 1e-3f, &terms);
    if (!rc) *result += terms.total + 2.0 * terms.crd;
    if (!rc) rc = codir_evaluate(&ctx, student, &enc, 4, &scores);
    if (!rc) *result += regression ? scores.pearson : scores.accuracy;

done:
    codir_adamw_free(&opt_t);
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    codir_distiller_free(d);
    codir_model_free(student);
    codir_model_free(teacher);
    codir_batch_free(&batch);
    codir_ctx_free(&ctx);
    return failed || failed_rc(rc);
}

static int run_training_infonce(double *result) { return run_training(result, CODIR_CRD_INFONCE, 0); }
static int run_training_nce(double *result) { return run_training(result, CODIR_CRD_NCE, 0); }
static int run_training_regression(double *result) { return run_training(result, CODIR_CRD_INFONCE, 1); }

typedef struct scenario {
    const char *name;
    int (*run)(double *result);
} scenario;

static const scenario scenarios[] = {
    {"TSV with integer labels", run_tsv_ids},
    {"TSV with given class names", run_tsv_given_names},
    {"TSV with regression scores", run_tsv_regression},
    {"TSV with class names from the file", run_tsv_names_from_file},
    {"vocab.txt load", run_vocab_load},
    {"vocabulary build", run_vocab_build},
    {"vocab.txt save", run_vocab_save},
    {"TSV, vocabulary build and encoding", run_encode_dataset},
    {"safetensors open and read", run_safetensors_read},
    {"safetensors write", run_safetensors_write},
    {"model folder load", run_model_load},
    {"model folder save", run_model_save},
    {"create, task step, CoDIR step (InfoNCE), evaluate", run_training_infonce},
    {"create, task step, CoDIR step (NCE), evaluate", run_training_nce},
    {"the same for regression", run_training_regression},
    {"model folder load, masked-LM head (fixture)", run_model_load_mlm},
};

/* ---- the sweep ---- */

/* Removes every *.tmp file in folder/out and returns how many there were. The
   writers put a file there as NAME.tmp first and rename it when complete. */
static int remove_tmp_files(const scenario *s, long n)
{
    DIR *dir = opendir(out_dir);
    struct dirent *entry;
    int found = 0;
    if (!dir) return 0;
    while ((entry = readdir(dir)) != NULL) {
        size_t length = strlen(entry->d_name);
        char path[900];
        if (length < 4 || strcmp(entry->d_name + length - 4, ".tmp") != 0) continue;
        snprintf(path, sizeof path, "%s/%s", out_dir, entry->d_name);
        fprintf(stderr, "alloc_fail: %s, allocation %ld failing: left %s behind\n", s->name, n, path);
        remove(path);
        found++;
    }
    closedir(dir);
    return found;
}

/* Exit codes of a child run. */
enum { RUN_ERROR = 0, RUN_ABSORBED = 3, RUN_PROBLEM = 1 };

/* Runs scenario s with allocation n failing (in a child process) and returns a
   RUN_* code; prints the problem, if any. */
static int run_child(const scenario *s, long n, double clean_result)
{
    pid_t pid;
    int status;
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        fprintf(stderr, "alloc_fail: fork failed: %s\n", strerror(errno));
        return RUN_PROBLEM;
    }
    if (pid == 0) {
        long blocks_before = live_blocks;
        long long bytes_before = live_bytes;
        double result = 0.0;
        int failed, code = RUN_ERROR;
        allocations = 0;
        fail_at = n;
        bad_return = 0;
        codir_clear_error();
        failed = s->run(&result);
        if (failed && bad_return) {
            fprintf(stderr, "alloc_fail: %s, allocation %ld failing: a call returned a positive code\n", s->name, n);
            code = RUN_PROBLEM;
        }
        if (failed && !strstr(codir_last_error(), "memory")) {
            fprintf(stderr, "alloc_fail: %s, allocation %ld failing: the reason \"%s\" does not say that memory "
                    "ran out\n", s->name, n, codir_last_error());
            code = RUN_PROBLEM;
        }
        if (!failed && result != clean_result && !(isnan(result) && isnan(clean_result))) {
            fprintf(stderr, "alloc_fail: %s, allocation %ld failing: the calls succeeded but computed %.17g "
                    "instead of %.17g\n", s->name, n, result, clean_result);
            code = RUN_PROBLEM;
        }
        if (live_blocks != blocks_before || live_bytes != bytes_before) {
            fprintf(stderr, "alloc_fail: %s, allocation %ld failing: leaked %ld blocks, %lld bytes (reason: %s)\n",
                    s->name, n, live_blocks - blocks_before, live_bytes - bytes_before, codir_last_error());
            code = RUN_PROBLEM;
        }
        if (remove_tmp_files(s, n)) code = RUN_PROBLEM;
        if (code == RUN_ERROR && !failed) code = RUN_ABSORBED;
        fflush(stderr);
        _exit(code);
    }
    if (waitpid(pid, &status, 0) != pid) {
        fprintf(stderr, "alloc_fail: waitpid failed: %s\n", strerror(errno));
        return RUN_PROBLEM;
    }
    if (WIFSIGNALED(status)) {
        fprintf(stderr, "alloc_fail: %s, allocation %ld failing: crashed with signal %d; reproduce it without "
                "fork with: alloc_fail \"%s\" %ld\n", s->name, n, WTERMSIG(status), s->name, n);
        return RUN_PROBLEM;
    }
    if (!WIFEXITED(status)) return RUN_PROBLEM;
    return WEXITSTATUS(status);
}

int main(int argc, char **argv)
{
    const char *filter = argc > 1 ? argv[1] : NULL;
    long only = argc > 2 ? atol(argv[2]) : 0;
    long total_runs = 0, total_errors = 0, total_absorbed = 0, total_problems = 0;
    size_t i;
    int ok;
    clock_t start = clock();

    ok = make_files();
    if (!ok) {
        remove_files();
        return 1;
    }
    for (i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++) {
        const scenario *s = &scenarios[i];
        long count, n, errors = 0, absorbed = 0, problems = 0;
        long blocks_before = live_blocks;
        long long bytes_before = live_bytes;
        double clean = 0.0;
        if (filter && !strstr(s->name, filter)) continue;

        /* The run without failure counts the allocations and gives the result. */
        allocations = 0;
        fail_at = 0;
        codir_clear_error();
        if (s->run(&clean) != 0) {
            fprintf(stderr, "alloc_fail: %s fails without any allocation failure: %s\n", s->name, codir_last_error());
            total_problems++;
            continue;
        }
        count = allocations;
        if (live_blocks != blocks_before || live_bytes != bytes_before) {
            fprintf(stderr, "alloc_fail: %s leaks %ld blocks, %lld bytes without any allocation failure\n", s->name,
                    live_blocks - blocks_before, live_bytes - bytes_before);
            total_problems++;
        }
        if (count == 0) {
            fprintf(stderr, "alloc_fail: %s made no allocation through CODIR_MALLOC; the override is not used\n",
                    s->name);
            total_problems++;
        }

        if (only > 0) {
            double result = 0.0;
            int failed;
            allocations = 0;
            fail_at = only;
            codir_clear_error();
            failed = s->run(&result);
            printf("alloc_fail: %s, allocation %ld of %ld failing: %s (reason: %s), %ld blocks and %lld bytes "
                   "live afterwards\n", s->name, only, count, failed ? "the call failed" : "the calls succeeded",
                   codir_last_error(), live_blocks - blocks_before, live_bytes - bytes_before);
            continue;
        }
        for (n = 1; n <= count; n++) {
            int code = run_child(s, n, clean);
            if (code == RUN_ERROR) errors++;
            else if (code == RUN_ABSORBED) absorbed++;
            else problems++;
        }
        printf("alloc_fail: %-50s %5ld allocations: %ld errors returned, %ld absorbed, %ld problems\n", s->name, count,
               errors, absorbed, problems);
        total_runs += count;
        total_errors += errors;
        total_absorbed += absorbed;
        total_problems += problems;
    }
    remove_files();
    printf("alloc_fail: %ld runs with one failing allocation: %ld errors returned, %ld absorbed, %ld problems "
           "(%.1f s CPU in the parent)\n",
           total_runs, total_errors, total_absorbed, total_problems, (double)(clock() - start) / CLOCKS_PER_SEC);
    return total_problems ? 1 : 0;
}
