/* Training checkpoints: atomic writes and bit-identical resumption. */
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CK_COUNT 12
#define CK_LEN 7
#define CK_BATCH 4

/* A run of CoDIR training: everything a checkpoint must capture, plus the data. */
typedef struct ck_run {
    codir_model *teacher, *student;
    codir_distiller *d;
    codir_adamw opt, opt_heads;
    codir_ctx ctx;
    codir_batch batch;
    codir_encoded enc;
    int lengths[CK_COUNT], ids[CK_COUNT * CK_LEN], labels[CK_COUNT], order[CK_COUNT];
    uint64_t rng;
} ck_run;

static codir_config ck_config(int layers)
{
    codir_config c = codir_config_default();
    c.vocab_size = 23;
    c.max_len = CK_LEN;
    c.num_layers = layers;
    c.hidden = 8;
    c.num_heads = 2;
    c.ffn = 12;
    c.num_labels = 3;
    c.dropout = 0.1f;
    return c;
}

/* Creates the run; both runs of a test get the same seeds, so the same start. */
static int ck_init(ck_run *r, int mode)
{
    codir_config tc = ck_config(2), sc = ck_config(1);
    codir_distill_config dc = codir_distill_config_default();
    unsigned long long state = 5;
    int i, t;
    memset(r, 0, sizeof *r);
    for (i = 0; i < CK_COUNT; i++) {
        r->lengths[i] = 3 + i % (CK_LEN - 2);
        r->labels[i] = i % 3;
        for (t = 0; t < CK_LEN; t++) r->ids[i * CK_LEN + t] = (int)check_uniform(&state, 5.0, 23.0);
    }
    r->enc.count = CK_COUNT;
    r->enc.max_len = CK_LEN;
    r->enc.lengths = r->lengths;
    r->enc.ids = r->ids;
    r->enc.labels = r->labels;
    r->enc.num_classes = 3;
    dc.num_negatives = 4;
    dc.proj_dim = 6;
    dc.mode = mode;
    dc.lambda = 0.5f;
    r->teacher = codir_model_create(&tc, 1);
    r->student = codir_model_create(&sc, 2);
    r->d = codir_distiller_create(&dc, &sc, &tc, r->labels, CK_COUNT, 3);
    r->rng = 99;
    if (!r->teacher || !r->student || !r->d) return 0;
    if (codir_adamw_init(&r->opt, &r->student->params, 0.9f, 0.98f, 1e-6f, 0.1f)) return 0;
    if (codir_adamw_init(&r->opt_heads, &r->d->params, 0.9f, 0.98f, 1e-6f, 0.1f)) return 0;
    if (codir_ctx_init(&r->ctx, 1 << 20, 7)) return 0;
    if (codir_batch_init(&r->batch, CK_BATCH, CK_LEN)) return 0;
    for (i = 0; i < CK_COUNT; i++) r->order[i] = i;
    return 1;
}

static void ck_free(ck_run *r)
{
    codir_model_free(r->teacher);
    codir_model_free(r->student);
    codir_distiller_free(r->d);
    codir_adamw_free(&r->opt);
    codir_adamw_free(&r->opt_heads);
    codir_ctx_free(&r->ctx);
    codir_batch_free(&r->batch);
}

/* Runs `epochs` epochs of CoDIR steps. Each epoch shuffles the identity order with the
   run's own RNG, so the order is a function of the saved RNG state. */
static int ck_train(ck_run *r, int epochs)
{
    int e, start, i;
    for (e = 0; e < epochs; e++) {
        for (i = 0; i < CK_COUNT; i++) r->order[i] = i;
        codir_shuffle(r->order, CK_COUNT, &r->rng);
        for (start = 0; start < CK_COUNT; start += CK_BATCH) {
            codir_loss_terms terms;
            int rc = codir_batch_fill(&r->batch, &r->enc, r->order, start, CK_BATCH);
            if (!rc) rc = codir_distill_step(&r->ctx, r->student, r->teacher, r->d, &r->opt, &r->opt_heads, &r->batch,
                                             1e-2f, &terms);
            CHECK(rc == CODIR_OK, "training step failed: %s", codir_last_error());
            if (rc) return 0;
        }
    }
    return 1;
}

static codir_train_state ck_state(ck_run *r)
{
    codir_train_state s;
    s.model = r->student;
    s.opt = &r->opt;
    s.distiller = r->d;
    s.opt_heads = &r->opt_heads;
    s.rng = &r->rng;
    s.epoch = 0;
    return s;
}

/* A unique file name under the system's temporary folder. */
static void ck_path(char *buf, size_t size, const char *tag)
{
    static int counter;
    snprintf(buf, size, "/tmp/codir_ckpt_%ld_%d_%s.safetensors", (long)time(NULL), counter++, tag);
}

/* Trains 3 epochs straight, and 1 epoch + save + load into fresh objects + 2 epochs:
   every parameter, moment and bank value must be bit-identical. */
static void resume_case(int mode)
{
    ck_run straight, first, resumed;
    codir_train_state s;
    char path[256];
    int ok;
    ck_path(path, sizeof path, mode == CODIR_CRD_NCE ? "nce" : "infonce");
    ok = ck_init(&straight, mode) && ck_init(&first, mode) && ck_init(&resumed, mode);
    CHECK(ok, "setup failed: %s", codir_last_error());
    if (ok && ck_train(&straight, 3) && ck_train(&first, 1)) {
        s = ck_state(&first);
        s.epoch = 1;
        CHECK(codir_checkpoint_save(path, &s) == CODIR_OK, "save failed: %s", codir_last_error());
        s = ck_state(&resumed);
        CHECK(codir_checkpoint_load(path, &s) == CODIR_OK, "load failed: %s", codir_last_error());
        CHECK(s.epoch == 1, "epoch %ld restored, want 1", s.epoch);
        if (ck_train(&resumed, 2)) {
            size_t bank = (size_t)CK_COUNT * 6 * sizeof(float);
            CHECK(memcmp(straight.student->params.data, resumed.student->params.data,
                         straight.student->params.count * sizeof(float)) == 0,
                  "student parameters differ after resuming");
            CHECK(memcmp(straight.opt.m, resumed.opt.m, straight.opt.count * sizeof(float)) == 0,
                  "AdamW first moments differ");
            CHECK(memcmp(straight.opt.v, resumed.opt.v, straight.opt.count * sizeof(float)) == 0,
                  "AdamW second moments differ");
            CHECK(straight.opt.step == resumed.opt.step, "AdamW steps %ld vs %ld", straight.opt.step,
                  resumed.opt.step);
            CHECK(memcmp(straight.d->params.data, resumed.d->params.data, straight.d->params.count * sizeof(float)) == 0,
                  "projection heads differ");
            CHECK(memcmp(straight.d->bank, resumed.d->bank, bank) == 0, "teacher bank differs");
            if (mode == CODIR_CRD_NCE)
                CHECK(memcmp(straight.d->bank_s, resumed.d->bank_s, bank) == 0, "student bank differs");
            CHECK(straight.d->rng == resumed.d->rng, "sampler states differ");
            CHECK(straight.rng == resumed.rng, "shuffling states differ");
        }
    }
    remove(path);
    ck_free(&straight);
    ck_free(&first);
    ck_free(&resumed);
}

static void test_resume_infonce(void) { resume_case(CODIR_CRD_INFONCE); }

static void test_resume_nce(void) { resume_case(CODIR_CRD_NCE); }

/* Without the checkpoint the two runs must differ, or the test above proves nothing. */
static void test_resume_needs_state(void)
{
    ck_run straight, fresh;
    int ok = ck_init(&straight, CODIR_CRD_INFONCE) && ck_init(&fresh, CODIR_CRD_INFONCE);
    CHECK(ok, "setup failed: %s", codir_last_error());
    if (ok && ck_train(&straight, 3) && ck_train(&fresh, 2))
        CHECK(memcmp(straight.student->params.data, fresh.student->params.data,
                     straight.student->params.count * sizeof(float)) != 0,
              "2 and 3 epochs gave the same parameters");
    ck_free(&straight);
    ck_free(&fresh);
}

/* A save over an existing checkpoint that fails leaves the old file intact, and no
   temporary file behind when it succeeds. */
static void test_checkpoint_atomic(void)
{
    ck_run r;
    codir_train_state s;
    char path[256], tmp[300];
    FILE *f;
    ck_path(path, sizeof path, "atomic");
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(ck_init(&r, CODIR_CRD_INFONCE), "setup failed: %s", codir_last_error());
    s = ck_state(&r);
    CHECK(codir_checkpoint_save(path, &s) == CODIR_OK, "save failed: %s", codir_last_error());
    f = fopen(tmp, "rb");
    CHECK(f == NULL, "%s was left behind", tmp);
    if (f) fclose(f);

    /* A load of a truncated copy fails with a message naming the file. */
    {
        char cut[300];
        FILE *in = fopen(path, "rb"), *out;
        long size;
        char *buf;
        snprintf(cut, sizeof cut, "%s.cut", path);
        CHECK(in != NULL, "cannot reopen %s", path);
        if (in) {
            fseek(in, 0, SEEK_END);
            size = ftell(in);
            fseek(in, 0, SEEK_SET);
            buf = (char *)malloc((size_t)size);
            if (buf && fread(buf, 1, (size_t)size, in) == (size_t)size && (out = fopen(cut, "wb"))) {
                fwrite(buf, 1, (size_t)size / 2, out);
                fclose(out);
                CHECK(codir_checkpoint_load(cut, &s) != CODIR_OK, "a truncated checkpoint loaded");
                CHECK(strstr(codir_last_error(), cut) != NULL, "error \"%s\" does not name %s", codir_last_error(), cut);
            }
            free(buf);
            fclose(in);
        }
        remove(cut);
    }
    remove(path);
    ck_free(&r);
}

const test_case tests_checkpoint[] = {
    {"checkpoint resume infonce bitwise", test_resume_infonce},
    {"checkpoint resume nce bitwise", test_resume_nce},
    {"checkpoint resume needs the state", test_resume_needs_state},
    {"checkpoint atomic and truncated", test_checkpoint_atomic},
};
const int tests_checkpoint_count = (int)(sizeof tests_checkpoint / sizeof tests_checkpoint[0]);
