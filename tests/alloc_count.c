/* Checks that codir.h routes every allocation through CODIR_MALLOC, CODIR_REALLOC and
   CODIR_FREE and frees all of it: a small teacher and student are created, trained
   for a few task and CoDIR steps and freed, and the counts must balance.

       gcc -std=c11 -O1 -fopenmp tests/alloc_count.c -o /tmp/ac -lm && /tmp/ac

   Prints "alloc_count: N allocations, N frees, 0 live" and exits 0, or names what
   leaked and exits 1. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t allocations, frees;
static long long live_bytes;

/* Each block starts with a header that records its size, so a free can subtract the
   block's bytes. A header the size of max_align_t keeps the payload aligned. */
typedef union count_header {
    size_t size;
    max_align_t align;
} count_header;

static void *count_malloc(size_t n)
{
    count_header *h = (count_header *)malloc(sizeof(count_header) + n);
    if (!h) return NULL;
    h->size = n;
    allocations++;
    live_bytes += (long long)n;
    return h + 1;
}

static void *count_realloc(void *p, size_t n)
{
    count_header *h, *grown;
    size_t old;
    if (!p) return count_malloc(n);
    h = (count_header *)p - 1;
    old = h->size;
    grown = (count_header *)realloc(h, sizeof(count_header) + n);
    if (!grown) return NULL;
    grown->size = n;
    live_bytes += (long long)n - (long long)old;
    return grown + 1;
}

static void count_free(void *p)
{
    count_header *h;
    if (!p) return;
    h = (count_header *)p - 1;
    frees++;
    live_bytes -= (long long)h->size;
    free(h);
}

#define CODIR_MALLOC(n) count_malloc(n)
#define CODIR_REALLOC(p, n) count_realloc(p, n)
#define CODIR_FREE(p) count_free(p)
#define CODIR_IMPLEMENTATION
#include "../codir.h"

/* Prints the failed call and the library's reason, and exits. */
static void require(int ok, const char *what)
{
    if (ok) return;
    fprintf(stderr, "alloc_count: %s failed: %s\n", what, codir_last_error());
    exit(1);
}

int main(void)
{
    static const int lengths[6] = {5, 3, 6, 2, 4, 6};
    static const int labels[6] = {0, 1, 2, 0, 1, 2};
    static const int order[6] = {0, 1, 2, 3, 4, 5};
    int ids[6 * 8];
    codir_encoded enc;
    codir_config scfg = codir_config_default(), tcfg;
    codir_distill_config dcfg = codir_distill_config_default();
    codir_model *student, *teacher;
    codir_distiller *d;
    codir_ctx ctx;
    codir_batch batch;
    codir_adamw opt_s, opt_h, opt_t;
    codir_loss_terms terms;
    codir_scores scores;
    int i, step;

    /* Six hand-made sequences of up to 6 tokens over a vocabulary of 20. */
    for (i = 0; i < 6 * 8; i++) ids[i] = (i * 7 + 3) % 20;
    memset(&enc, 0, sizeof enc);
    enc.count = 6;
    enc.max_len = 8;
    enc.lengths = (int *)lengths;
    enc.ids = ids;
    enc.labels = (int *)labels;
    enc.num_classes = 3;

    scfg.vocab_size = 20;
    scfg.max_len = 8;
    scfg.num_layers = 2;
    scfg.hidden = 8;
    scfg.num_heads = 2;
    scfg.ffn = 16;
    scfg.num_labels = 3;
    tcfg = scfg;
    tcfg.num_layers = 3;
    dcfg.proj_dim = 4;
    dcfg.num_negatives = 3;

    /* A small arena, so the first steps outgrow it and take extra blocks. */
    require(codir_ctx_init(&ctx, 256, 1) == CODIR_OK, "codir_ctx_init");
    require(codir_batch_init(&batch, 4, 8) == CODIR_OK, "codir_batch_init");
    student = codir_model_create(&scfg, 1);
    teacher = codir_model_create(&tcfg, 2);
    require(student && teacher, "codir_model_create");
    d = codir_distiller_create(&dcfg, &scfg, &tcfg, labels, 6, 3);
    require(d != NULL, "codir_distiller_create");
    require(codir_adamw_init(&opt_t, &teacher->params, 0.9f, 0.98f, 1e-6f, 0.1f) == CODIR_OK, "codir_adamw_init");
    require(codir_adamw_init(&opt_s, &student->params, 0.9f, 0.98f, 1e-6f, 0.1f) == CODIR_OK, "codir_adamw_init");
    require(codir_adamw_init(&opt_h, &d->params, 0.9f, 0.98f, 1e-6f, 0.1f) == CODIR_OK, "codir_adamw_init");

    for (step = 0; step < 3; step++) {
        require(codir_batch_fill(&batch, &enc, order, step % 3, 4) == CODIR_OK, "codir_batch_fill");
        require(codir_task_step(&ctx, teacher, &opt_t, &batch, 1e-3f, &terms) == CODIR_OK, "codir_task_step");
    }
    for (step = 0; step < 3; step++) {
        require(codir_batch_fill(&batch, &enc, order, step % 3, 4) == CODIR_OK, "codir_batch_fill");
        require(codir_distill_step(&ctx, student, teacher, d, &opt_s, &opt_h, &batch, 1e-3f, &terms) == CODIR_OK,
                "codir_distill_step");
    }
    require(codir_evaluate(&ctx, student, &enc, 4, &scores) == CODIR_OK, "codir_evaluate");

    codir_adamw_free(&opt_t);
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    codir_distiller_free(d);
    codir_model_free(student);
    codir_model_free(teacher);
    codir_batch_free(&batch);
    codir_ctx_free(&ctx);

    printf("alloc_count: %zu allocations, %zu frees, %lld live\n", allocations, frees, live_bytes);
    if (allocations == 0) {
        fprintf(stderr, "alloc_count: no allocation went through CODIR_MALLOC; the override is not used\n");
        return 1;
    }
    if (allocations != frees || live_bytes != 0) {
        fprintf(stderr, "alloc_count: leak: %lld blocks and %lld bytes were never freed\n",
                (long long)allocations - (long long)frees, live_bytes);
        return 1;
    }
    return 0;
}
