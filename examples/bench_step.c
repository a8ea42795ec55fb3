/* bench_step: times whole steps of BERT-style encoders: the student training step, the
   CoDIR step with the teacher run every step and with the teacher cache, and inference
   at batch 32 and batch 1, on 1 thread and on all threads. One line per case:

       step bench=<train|distill|distill_cached|infer> model=<name> batch=<b> seq=<t> threads=<n> median_ms=<x> gflops=<x> peak_rss_mb=<x>

   Build and run (from the repository root):

       cc -std=c11 -O2 -fopenmp examples/bench_step.c -o bench_step -lm
       ./bench_step                  sequence 64 and 128, 1 thread and all threads
       ./bench_step --quick          sequence 64 only, at least 5 timed runs per case
       ./bench_step --threads 2      only on 2 threads
       ./bench_step --seq 128        sequence 128 only (with --quick: at least 5 timed runs)
       ./bench_step --bench train --model L3-H384
                                     one kind of step and one student only, for profiling

   tests/reference/bench_step_torch.py times the same models and steps in PyTorch and
   prints lines of the same format, so both can run side by side.

   Models (vocabulary 8192, 128 positions, 2 labels, post-LayerNorm, dropout 0.1):
       teacher  L6-H384  6 layers, hidden 384, 6 heads, FFN 1536
       student  L3-H384  3 layers, hidden 384, 6 heads, FFN 1536
       student  L3-H192  3 layers, hidden 192, 6 heads (head size 32), FFN 768
   L3-H192 keeps the teacher's 6 heads, because PyTorch 1.13 skips its fused inference
   path for an odd number of heads and the twin should run at its best.
   Every batch has 32 (or 1) sequences of full length, with random token ids and
   random labels. The CoDIR step uses the default hyperparameters (K = 100 negatives,
   projection size 128, InfoNCE, mean pooling) and a memory bank of 4096 examples.

   What each case times:
       train           codir_task_step: forward with dropout, cross-entropy, backward, AdamW
       distill         codir_distill_step: teacher forward without a tape, student forward
                       and backward with the task, KD and contrastive losses, AdamW on the
                       student and both projection heads, bank update
       distill_cached  codir_distill_step_cached: the same with the teacher's logits and
                       pooled layers read from a cache built before timing
       infer           codir_predict on one batch: forward without dropout or tape
   The student at inference has its weights packed once with codir_model_pack, as a
   program serving a model would. The teacher is not packed: at batch 32 packing is a
   few percent of its forward pass, and the copy would add 42 MiB to the CoDIR step.

   median_ms is the median (the upper one of an even count) of at least 10 timed calls
   (5 with --quick) after 2 warm-up calls. The first step grows the activation arena and the second replaces its blocks
   by one, so timing starts at the first step that allocates nothing.

   gflops counts matrix-multiply FLOPs only. For a model with L layers, hidden C, FFN
   width F and `labels` outputs, one forward pass over B sequences of T tokens is
       fwd(B, T) = L * (2*B*T*(3*C*C + C*C + 2*C*F) + 4*B*T*T*C) + 2*B*(C*C + C*labels)
   that is the query/key/value, attention-output and two FFN products of every token,
   the attention scores Q K^T and the weighted sum of V (2*B*T*T*C each), and the pooler
   and classifier on the first token. The backward pass counts twice the forward pass.
       train, distill_cached  3 * fwd_student
       distill                fwd_teacher + 3 * fwd_student
       infer                  fwd_student
   Not counted: embedding lookups, LayerNorm, GELU, softmax, dropout, the losses, AdamW,
   and the projection heads and contrastive scores (under 0.1% of a step here).
   The count is the full model's for both libraries. codir's train and infer cases run
   the last block after its QKV product for the first token only (codir_model_logits),
   because the classifier reads nothing else; PyTorch's model computes every token.
   For those cases gflops is the rate of the same job, not of the work done, and can
   pass the machine's peak.

   peak_rss_mb is the peak resident memory of the process during the case: on Linux,
   VmHWM from /proc/self/status after resetting it through /proc/self/clear_refs
   before the case sets up its models, so it covers the parameters, gradients, AdamW
   moments, memory bank, cache, arena and buffers of that case only, plus the
   program's own few MiB (baseline_rss_mb on the header line). The distill_cached case resets it after the cache is built
   and the teacher freed. Where /proc is missing it prints n/a; where the reset is
   refused, the header line says that every value is the peak since the start.

   Each case is followed by a comment line with the fastest and slowest call, the
   median process CPU time per call (clock(): all threads together, so on 1 thread it
   shows how much of the wall time other processes took) and the arena's peak. */
#define CODIR_IMPLEMENTATION
#include "../codir.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BENCH_VOCAB 8192
#define BENCH_MAX_LEN 128
#define BENCH_LABELS 2
#define BENCH_BATCH 32
/* Rows of the memory bank, and so the examples the token ids are drawn for. */
#define BENCH_EXAMPLES 4096
/* The timed steps cycle through this many distinct batches, and the teacher cache covers them. */
#define BENCH_DISTINCT_BATCHES 4
#define BENCH_WARMUP 2
#define BENCH_MIN_RUNS 10
#define BENCH_QUICK_RUNS 5
/* Cases faster than this in total are repeated up to BENCH_MAX_RUNS times. */
#define BENCH_MIN_SECONDS 0.5
#define BENCH_MAX_RUNS 100

enum { BENCH_TRAIN, BENCH_DISTILL, BENCH_DISTILL_CACHED, BENCH_INFER };
static const char *const bench_kind_names[] = {"train", "distill", "distill_cached", "infer"};

typedef struct bench_model {
    const char *name;
    int layers, hidden, heads, ffn;
} bench_model;

static const bench_model bench_teacher = {"L6-H384", 6, 384, 6, 1536};
static const bench_model bench_students[] = {
    {"L3-H384", 3, 384, 6, 1536},
    {"L3-H192", 3, 192, 6, 768},
};

/* Everything one case needs. Members that a case does not use stay NULL or zero. */
typedef struct bench_case {
    int kind;
    int batch, seq;
    codir_ctx ctx;
    int ctx_ready;
    codir_model *teacher, *student;
    codir_distiller *distiller;
    codir_teacher_cache *cache;
    codir_adamw opt_student, opt_heads;
    int opt_student_ready, opt_heads_ready;
    codir_batch batches[BENCH_DISTINCT_BATCHES];
    int num_batches;
    codir_encoded infer_data;   /* the first `batch` examples, for codir_predict */
    float *predictions;         /* [batch, BENCH_LABELS] */
} bench_case;

/* Random token ids and labels of BENCH_EXAMPLES full-length sequences. */
typedef struct bench_data {
    codir_encoded enc;
    int *lengths, *ids, *labels;
} bench_data;

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_doubles(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static void fail(const char *operation, const bench_case *bc, const char *model)
{
    fprintf(stderr, "bench_step: %s failed on bench=%s model=%s batch=%d seq=%d: %s\n", operation,
            bench_kind_names[bc->kind], model, bc->batch, bc->seq, codir_last_error());
    exit(1);
}

static void *checked_malloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "bench_step: out of memory allocating %zu bytes\n", bytes);
        exit(1);
    }
    return p;
}

/* Resets the process's peak resident memory to its current resident memory. Returns 1
   when the kernel accepted the reset (Linux 4.0 and later: writing 5 to clear_refs). */
static int peak_rss_reset(void)
{
#ifdef __linux__
    FILE *f = fopen("/proc/self/clear_refs", "w");
    int ok;
    if (!f) return 0;
    ok = fputs("5", f) >= 0;
    ok = fclose(f) == 0 && ok;
    return ok;
#else
    return 0;
#endif
}

/* Returns VmHWM, the peak resident memory, in MiB, or -1 where it is not available.
   Only Linux builds read /proc/self/status. */
static double peak_rss_mb(void)
{
#ifdef __linux__
    char line[256];
    double kib = -1.0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1.0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) {
            kib = strtod(line + 6, NULL);
            break;
        }
    fclose(f);
    return kib < 0.0 ? -1.0 : kib / 1024.0;
#else
    return -1.0;
#endif
}

/* Writes the 1-, 5- and 15-minute load averages to out, or "n/a" where /proc/loadavg is missing. */
static void load_average(char *out, size_t size)
{
    snprintf(out, size, "n/a");
#ifdef __linux__
    {
        double one, five, fifteen;
        FILE *f = fopen("/proc/loadavg", "r");
        if (!f) return;
        if (fscanf(f, "%lf %lf %lf", &one, &five, &fifteen) == 3) snprintf(out, size, "%.2f %.2f %.2f", one, five, fifteen);
        fclose(f);
    }
#endif
}

static codir_config model_config(const bench_model *m)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = BENCH_VOCAB;
    cfg.max_len = BENCH_MAX_LEN;
    cfg.num_layers = m->layers;
    cfg.hidden = m->hidden;
    cfg.num_heads = m->heads;
    cfg.ffn = m->ffn;
    cfg.num_labels = BENCH_LABELS;
    return cfg;
}

/* Returns the matrix-multiply FLOPs of one forward pass (formula at the top of this file). */
static double forward_flops(const bench_model *m, int B, int T)
{
    double C = m->hidden, F = m->ffn, tokens = (double)B * T;
    double per_layer = 2.0 * tokens * (3.0 * C * C + C * C + 2.0 * C * F) + 4.0 * B * (double)T * T * C;
    return m->layers * per_layer + 2.0 * B * (C * C + C * BENCH_LABELS);
}

static double case_flops(int kind, const bench_model *student, int B, int T)
{
    switch (kind) {
    case BENCH_TRAIN:
    case BENCH_DISTILL_CACHED: return 3.0 * forward_flops(student, B, T);
    case BENCH_DISTILL: return forward_flops(&bench_teacher, B, T) + 3.0 * forward_flops(student, B, T);
    default: return forward_flops(student, B, T);
    }
}

static void data_init(bench_data *data, int seq)
{
    size_t i, n = (size_t)BENCH_EXAMPLES * seq;
    unsigned long long state = 0x9e3779b97f4a7c15ull + (unsigned long long)seq;
    data->lengths = (int *)checked_malloc(BENCH_EXAMPLES * sizeof(int));
    data->ids = (int *)checked_malloc(n * sizeof(int));
    data->labels = (int *)checked_malloc(BENCH_EXAMPLES * sizeof(int));
    for (i = 0; i < n; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        data->ids[i] = (int)((state >> 33) % BENCH_VOCAB);
    }
    for (i = 0; i < BENCH_EXAMPLES; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        data->labels[i] = (int)((state >> 33) % BENCH_LABELS);
        data->lengths[i] = seq;
    }
    memset(&data->enc, 0, sizeof data->enc);
    data->enc.count = BENCH_EXAMPLES;
    data->enc.max_len = seq;
    data->enc.lengths = data->lengths;
    data->enc.ids = data->ids;
    data->enc.types = NULL;
    data->enc.labels = data->labels;
    data->enc.targets = NULL;
    data->enc.num_classes = BENCH_LABELS;
}

static void data_free(bench_data *data)
{
    free(data->lengths);
    free(data->ids);
    free(data->labels);
}

/* Returns a view of the first `count` examples of data. */
static codir_encoded data_head(const bench_data *data, int count)
{
    codir_encoded head = data->enc;
    head.count = count;
    return head;
}

static void case_free(bench_case *bc)
{
    int i;
    for (i = 0; i < bc->num_batches; i++) codir_batch_free(&bc->batches[i]);
    if (bc->opt_student_ready) codir_adamw_free(&bc->opt_student);
    if (bc->opt_heads_ready) codir_adamw_free(&bc->opt_heads);
    codir_teacher_cache_free(bc->cache);
    codir_distiller_free(bc->distiller);
    codir_model_free(bc->student);
    codir_model_free(bc->teacher);
    if (bc->ctx_ready) codir_ctx_free(&bc->ctx);
    free(bc->predictions);
    memset(bc, 0, sizeof *bc);
}

/* Builds the teacher cache over the examples of the timed batches in a context of its
   own, then frees the teacher, and prints the build time and the cache size. */
static void case_build_cache(bench_case *bc, const bench_data *data, const char *model)
{
    codir_encoded covered = data_head(data, BENCH_DISTINCT_BATCHES * BENCH_BATCH);
    codir_ctx build_ctx;
    double start;
    if (codir_ctx_init(&build_ctx, (size_t)64 << 20, 1)) fail("codir_ctx_init", bc, model);
    start = now_seconds();
    bc->cache = codir_teacher_cache_build(&build_ctx, bc->teacher, bc->distiller, &covered, BENCH_BATCH, 0.0);
    if (!bc->cache) fail("codir_teacher_cache_build", bc, model);
    printf("# teacher cache: model=%s seq=%d examples=%d build_ms=%.1f cache_kib=%.1f\n", model, bc->seq, covered.count,
           1e3 * (now_seconds() - start), (double)bc->cache->bytes / 1024.0);
    codir_ctx_free(&build_ctx);
    codir_model_free(bc->teacher);
    bc->teacher = NULL;
}

/* Creates the models, optimizers, batches and buffers of one case. */
static void case_setup(bench_case *bc, const bench_model *student, const bench_data *data)
{
    codir_config scfg = model_config(student), tcfg = model_config(&bench_teacher);
    int needs_teacher = bc->kind == BENCH_DISTILL || bc->kind == BENCH_DISTILL_CACHED;
    int i;

    if (codir_ctx_init(&bc->ctx, (size_t)64 << 20, 7)) fail("codir_ctx_init", bc, student->name);
    bc->ctx_ready = 1;
    bc->student = codir_model_create(&scfg, 2);
    if (!bc->student) fail("codir_model_create (student)", bc, student->name);

    if (bc->kind == BENCH_INFER) {
        /* A model being served does not change: its weights are packed once. */
        if (codir_model_pack(bc->student)) fail("codir_model_pack", bc, student->name);
        bc->infer_data = data_head(data, bc->batch);
        bc->predictions = (float *)checked_malloc((size_t)bc->batch * BENCH_LABELS * sizeof(float));
        return;
    }

    if (codir_adamw_init(&bc->opt_student, &bc->student->params, 0.9f, 0.98f, 1e-6f, 0.01f))
        fail("codir_adamw_init (student)", bc, student->name);
    bc->opt_student_ready = 1;
    for (i = 0; i < BENCH_DISTINCT_BATCHES; i++) {
        if (codir_batch_init(&bc->batches[i], bc->batch, bc->seq)) fail("codir_batch_init", bc, student->name);
        bc->num_batches = i + 1;
        if (codir_batch_fill(&bc->batches[i], &data->enc, NULL, i * bc->batch, bc->batch))
            fail("codir_batch_fill", bc, student->name);
    }
    if (!needs_teacher) return;

    {
        codir_distill_config dcfg = codir_distill_config_default();
        bc->teacher = codir_model_create(&tcfg, 1);
        if (!bc->teacher) fail("codir_model_create (teacher)", bc, student->name);
        bc->distiller = codir_distiller_create(&dcfg, &scfg, &tcfg, data->labels, BENCH_EXAMPLES, 3);
        if (!bc->distiller) fail("codir_distiller_create", bc, student->name);
    }
    if (codir_adamw_init(&bc->opt_heads, &bc->distiller->params, 0.9f, 0.98f, 1e-6f, 0.01f))
        fail("codir_adamw_init (projection heads)", bc, student->name);
    bc->opt_heads_ready = 1;
    if (bc->kind == BENCH_DISTILL_CACHED) case_build_cache(bc, data, student->name);
}

/* Runs one call of the timed operation. */
static void case_run(bench_case *bc, int iteration, const char *model)
{
    const codir_batch *batch = &bc->batches[iteration % (bc->num_batches ? bc->num_batches : 1)];
    codir_loss_terms terms;
    const float lr = 1e-4f;
    int rc = CODIR_OK;
    switch (bc->kind) {
    case BENCH_TRAIN:
        rc = codir_task_step(&bc->ctx, bc->student, &bc->opt_student, batch, lr, &terms);
        break;
    case BENCH_DISTILL:
        rc = codir_distill_step(&bc->ctx, bc->student, bc->teacher, bc->distiller, &bc->opt_student, &bc->opt_heads, batch,
                                lr, &terms);
        break;
    case BENCH_DISTILL_CACHED:
        rc = codir_distill_step_cached(&bc->ctx, bc->student, bc->cache, bc->distiller, &bc->opt_student,
                                       &bc->opt_heads, batch, lr, &terms);
        break;
    default:
        rc = codir_predict(&bc->ctx, bc->student, &bc->infer_data, bc->batch, bc->predictions);
        break;
    }
    if (rc != CODIR_OK) fail(bench_kind_names[bc->kind], bc, model);
}

/* Times one case and prints its line. */
static void bench_one(int kind, const bench_model *student, const bench_data *data, int batch, int threads,
                      int min_runs, int rss_resettable)
{
    static bench_case bc;
    double seconds[BENCH_MAX_RUNS], cpu_seconds[BENCH_MAX_RUNS], total = 0.0, median, peak;
    int runs = 0, i;
    char peak_text[32];

    memset(&bc, 0, sizeof bc);
    bc.kind = kind;
    bc.batch = batch;
    bc.seq = data->enc.max_len;
    if (rss_resettable && kind != BENCH_DISTILL_CACHED) peak_rss_reset();
    case_setup(&bc, student, data);
    if (rss_resettable && kind == BENCH_DISTILL_CACHED) peak_rss_reset();

    for (i = 0; i < BENCH_WARMUP; i++) case_run(&bc, i, student->name);
    while (runs < BENCH_MAX_RUNS && (runs < min_runs || total < BENCH_MIN_SECONDS)) {
        double start = now_seconds();
        clock_t start_cpu = clock();
        case_run(&bc, runs, student->name);
        seconds[runs] = now_seconds() - start;
        cpu_seconds[runs] = (double)(clock() - start_cpu) / CLOCKS_PER_SEC;
        total += seconds[runs];
        runs++;
    }
    qsort(seconds, (size_t)runs, sizeof seconds[0], compare_doubles);
    qsort(cpu_seconds, (size_t)runs, sizeof cpu_seconds[0], compare_doubles);
    median = seconds[runs / 2];

    peak = peak_rss_mb();
    if (peak < 0.0)
        snprintf(peak_text, sizeof peak_text, "n/a");
    else
        snprintf(peak_text, sizeof peak_text, "%.1f", peak);
    printf("step bench=%s model=%s batch=%d seq=%d threads=%d median_ms=%.2f gflops=%.1f peak_rss_mb=%s\n",
           bench_kind_names[kind], student->name, batch, bc.seq, threads, 1e3 * median,
           case_flops(kind, student, batch, bc.seq) / median * 1e-9, peak_text);
    printf("#   runs=%d fastest_ms=%.2f slowest_ms=%.2f cpu_ms=%.2f arena_peak_mb=%.1f\n", runs, 1e3 * seconds[0],
           1e3 * seconds[runs - 1], 1e3 * cpu_seconds[runs / 2], (double)codir_arena_peak(&bc.ctx.arena) / 1048576.0);
    fflush(stdout);
    case_free(&bc);
}

static void usage(const char *program)
{
    fprintf(stderr,
            "usage: %s [--quick] [--threads N] [--seq T] [--bench KIND] [--model NAME]\n"
            "  --quick        time sequence length 64 only, at least %d timed runs per case instead of %d\n"
            "  --threads N    time on N OpenMP threads only, instead of 1 thread and then all threads\n"
            "  --seq T        time sequence length T only (1 to %d), instead of 64 and 128\n"
            "  --bench KIND   time one kind of step only: train, distill, distill_cached or infer\n"
            "  --model NAME   time one student only: L3-H384 or L3-H192\n",
            program, BENCH_QUICK_RUNS, BENCH_MIN_RUNS, BENCH_MAX_LEN);
}

int main(int argc, char **argv)
{
    int seqs[2] = {64, 128};
    int quick = 0, only_threads = 0, only_seq = 0, max_threads = 1, seq_count = 2, min_runs = BENCH_MIN_RUNS;
    int thread_list[2], thread_count, rss_resettable, t, s, m, i, k, only_kind = -1;
    const char *only_model = NULL;
    char load[64];

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end != '\0' || n < 1 || n > 1024) {
                fprintf(stderr, "bench_step: invalid thread count '%s'; give an integer from 1 to 1024\n", argv[i]);
                return 2;
            }
            only_threads = (int)n;
        } else if (strcmp(argv[i], "--seq") == 0 && i + 1 < argc) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end != '\0' || n < 1 || n > BENCH_MAX_LEN) {
                fprintf(stderr, "bench_step: invalid sequence length '%s'; give an integer from 1 to %d\n", argv[i],
                        BENCH_MAX_LEN);
                return 2;
            }
            only_seq = (int)n;
        } else if (strcmp(argv[i], "--bench") == 0 && i + 1 < argc) {
            if (only_kind >= 0) {
                fprintf(stderr, "bench_step: give --bench once\n");
                return 2;
            }
            i++;
            for (k = 0; k < 4; k++)
                if (strcmp(argv[i], bench_kind_names[k]) == 0) only_kind = k;
            if (only_kind < 0) {
                fprintf(stderr, "bench_step: unknown --bench '%s'; give train, distill, distill_cached or infer\n",
                        argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
            only_model = argv[++i];
            for (k = 0; k < (int)(sizeof bench_students / sizeof bench_students[0]); k++)
                if (strcmp(only_model, bench_students[k].name) == 0) break;
            if (k == (int)(sizeof bench_students / sizeof bench_students[0])) {
                fprintf(stderr, "bench_step: unknown --model '%s'; give L3-H384 or L3-H192\n", only_model);
                return 2;
            }
        } else {
            usage(argv[0]);
            return 2;
        }
    }
    if (quick) {
        seq_count = 1;
        min_runs = BENCH_QUICK_RUNS;
    }
    if (only_seq) {
        seqs[0] = only_seq;
        seq_count = 1;
    }

#ifdef _OPENMP
    max_threads = omp_get_max_threads();
#else
    if (only_threads > 1) fprintf(stderr, "bench_step: built without OpenMP, so --threads %d runs on 1 thread\n", only_threads);
#endif
    if (only_threads) {
        thread_list[0] = only_threads;
        thread_count = 1;
    } else {
        thread_list[0] = 1;
        thread_list[1] = max_threads;
        thread_count = max_threads > 1 ? 2 : 1;
    }

    rss_resettable = peak_rss_reset();
    load_average(load, sizeof load);
    printf("# codir.h bench_step: gemm_kernel=%s max_threads=%d peak_rss=%s baseline_rss_mb=%.1f load_average=%s\n",
           codir_gemm_kernel_name(), max_threads,
           peak_rss_mb() < 0.0 ? "n/a" : rss_resettable ? "per_case" : "cumulative_since_start", peak_rss_mb(), load);

    for (t = 0; t < thread_count; t++) {
#ifdef _OPENMP
        omp_set_num_threads(thread_list[t]);
#endif
        for (s = 0; s < seq_count; s++) {
            bench_data data;
            data_init(&data, seqs[s]);
            for (m = 0; m < (int)(sizeof bench_students / sizeof bench_students[0]); m++) {
                const bench_model *student = &bench_students[m];
                if (only_model && strcmp(only_model, student->name) != 0) continue;
                load_average(load, sizeof load);
                printf("# model=%s seq=%d threads=%d load_average=%s\n", student->name, seqs[s], thread_list[t], load);
                for (k = 0; k < 4; k++) {
                    if (only_kind >= 0 && k != only_kind) continue;
                    bench_one(k, student, &data, BENCH_BATCH, thread_list[t], min_runs, rss_resettable);
                    if (k == BENCH_INFER) bench_one(k, student, &data, 1, thread_list[t], min_runs, rss_resettable);
                }
            }
            data_free(&data);
        }
    }
    load_average(load, sizeof load);
    printf("# done load_average=%s\n", load);
    return 0;
}
