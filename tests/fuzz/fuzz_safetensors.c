/* libFuzzer harness for the safetensors loader: codir_safetensors_open on the input
   as a file, codir_safetensors_read_f32 on every tensor that opens, and
   codir_model_load on the input as model.safetensors beside a fixed config.json when
   it contains BERT's word embeddings.

   Every call must either fail with a reason that names the file, or leave a
   consistent result: each tensor's byte count equals its dtype size times the shape
   product, the tensors tile the data region exactly, names are unique, and F32, F16
   and BF16 tensors read back while other dtypes are rejected. Build and run as
   fuzz_tsv.c says, with corpus tests/fuzz/corpus/safetensors; its seeds include
   model.safetensors of both model folders in tests/fixtures/io. */
#define _POSIX_C_SOURCE 200809L
#define CODIR_IMPLEMENTATION
#include "../../codir.h"
#include "fuzz_util.h"

/* Tensors larger than this are not read back, to keep each run fast. */
enum { MAX_READ = 1 << 16 };

/* config.json of tests/fixtures/io/hf_bert_cls and hf_bert_mlm, reduced to the keys
   that matter to codir_config_load. */
static const char cls_config[] =
    "{\"hidden_act\": \"gelu\", \"hidden_size\": 8, \"id2label\": {\"0\": \"NEGATIVE\", \"1\": \"NEUTRAL\", "
    "\"2\": \"POSITIVE\"}, \"intermediate_size\": 12, \"layer_norm_eps\": 1e-12, \"max_position_embeddings\": 16, "
    "\"model_type\": \"bert\", \"num_attention_heads\": 2, \"num_hidden_layers\": 2, \"type_vocab_size\": 2, "
    "\"vocab_size\": 11}";
static const char mlm_config[] =
    "{\"hidden_act\": \"gelu\", \"hidden_size\": 8, \"intermediate_size\": 16, \"layer_norm_eps\": 1e-05, "
    "\"max_position_embeddings\": 10, \"model_type\": \"bert\", \"num_attention_heads\": 4, "
    "\"num_hidden_layers\": 1, \"num_labels\": 1, \"problem_type\": \"regression\", \"type_vocab_size\": 1, "
    "\"vocab_size\": 13}";

static const char *weights_path, *config_path;
static float read_buffer[MAX_READ];

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_make_dir();
    weights_path = fuzz_path("model.safetensors");
    config_path = fuzz_path("config.json");
    return 0;
}

/* A tensor's byte range [begin, end) in the data region. */
typedef struct span {
    uint64_t begin, end;
} span;

static int compare_spans(const void *pa, const void *pb)
{
    const span *a = (const span *)pa, *b = (const span *)pb;
    if (a->begin != b->begin) return a->begin < b->begin ? -1 : 1;
    return a->end < b->end ? -1 : a->end > b->end;
}

/* Checks the tensor table of an open file against the format's rules. */
static void check_tensors(const codir_safetensors *st, size_t size)
{
    static const size_t dtype_bytes[CODIR_ST_DTYPE_COUNT] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};
    uint64_t data_bytes, covered = 0;
    span *spans;
    int i, j, d;
    if (st->file_bytes != size) fuzz_fail("file_bytes differs from the file size");
    if (st->data_start < 8 || st->data_start > st->file_bytes) fuzz_fail("data_start is outside the file");
    data_bytes = st->file_bytes - st->data_start;
    spans = (span *)malloc(((size_t)st->num_tensors + 1) * sizeof *spans);
    if (!spans) fuzz_fail("out of memory");
    for (i = 0; i < st->num_tensors; i++) {
        const codir_st_tensor *t = &st->tensors[i];
        size_t numel = 1;
        if (!t->name) fuzz_fail("a tensor has no name");
        if (t->dtype < 0 || t->dtype >= CODIR_ST_DTYPE_COUNT) fuzz_fail("a dtype is out of range");
        if (t->ndim < 0 || t->ndim > CODIR_ST_MAX_DIMS) fuzz_fail("ndim is out of range");
        for (d = 0; d < t->ndim; d++) numel *= (size_t)t->shape[d];
        if (numel != t->numel) fuzz_fail("numel differs from the shape product");
        if (t->nbytes != (uint64_t)numel * dtype_bytes[t->dtype]) fuzz_fail("nbytes differs from numel times the dtype size");
        if (t->offset > data_bytes || t->nbytes > data_bytes - t->offset) fuzz_fail("a tensor runs past the data region");
        for (j = 0; j < i; j++)
            if (strcmp(st->tensors[j].name, t->name) == 0) fuzz_fail("two tensors have the same name");
        if (codir_safetensors_find(st, t->name) != t) fuzz_fail("codir_safetensors_find returns another tensor");
        spans[i].begin = t->offset;
        spans[i].end = t->offset + t->nbytes;
    }

    /* Sorted by offsets, each tensor must start where the previous one ended. */
    qsort(spans, (size_t)st->num_tensors, sizeof *spans, compare_spans);
    for (i = 0; i < st->num_tensors; i++) {
        if (spans[i].begin != covered) fuzz_fail("the tensors leave a gap or overlap");
        covered = spans[i].end;
    }
    if (covered != data_bytes) fuzz_fail("the tensors do not reach the end of the data region");
    free(spans);
    for (i = 0; i < st->num_metadata; i++) {
        if (!st->metadata[2 * i] || !st->metadata[2 * i + 1]) fuzz_fail("a metadata entry is NULL");
        if (!codir_safetensors_metadata(st, st->metadata[2 * i])) fuzz_fail("a metadata key is not found");
    }
}

/* Reads every small tensor: floats must load, other dtypes must be rejected. */
static void check_reads(const codir_safetensors *st)
{
    int i;
    for (i = 0; i < st->num_tensors; i++) {
        const codir_st_tensor *t = &st->tensors[i];
        int is_float = t->dtype == CODIR_ST_F32 || t->dtype == CODIR_ST_F16 || t->dtype == CODIR_ST_BF16, rc;
        if (t->numel > MAX_READ) continue;
        rc = codir_safetensors_read_f32(st, t->name, read_buffer, t->numel);
        if (is_float && rc != CODIR_OK) fuzz_fail(codir_last_error());
        if (!is_float && rc != CODIR_ERR_INVALID) fuzz_fail("a tensor of another dtype was read as float32");
        if (t->numel > 0 && codir_safetensors_read_f32(st, t->name, read_buffer, t->numel - 1) != CODIR_ERR_INVALID)
            fuzz_fail("a read with the wrong element count was accepted");
    }
    if (codir_safetensors_read_f32(st, "no such tensor \x01", read_buffer, 1) != CODIR_ERR_INVALID)
        fuzz_fail("a read of a missing tensor was accepted");
}

/* Loads the folder. A model that loads must have the fixed configuration's sizes. */
static void check_model_folder(const codir_safetensors *st)
{
    int mlm = codir_safetensors_find(st, "cls.predictions.transform.dense.weight") != NULL;
    const char *config = mlm ? mlm_config : cls_config;
    codir_model *m;
    fuzz_write(config_path, (const uint8_t *)config, strlen(config));
    codir_clear_error();
    m = codir_model_load(fuzz_dir);
    if (!m) {
        if (!codir_last_error()[0]) fuzz_fail("codir_model_load failed without a reason");
        if (!strstr(codir_last_error(), fuzz_dir)) fuzz_fail("codir_model_load's reason does not name the folder");
        return;
    }
    if (m->cfg.hidden != 8 || m->cfg.vocab_size != (mlm ? 13 : 11) || m->cfg.mlm_head != mlm)
        fuzz_fail("codir_model_load returned other sizes than config.json gives");
    codir_model_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    codir_safetensors *st;
    fuzz_write(weights_path, data, size);
    codir_clear_error();
    st = codir_safetensors_open(weights_path);
    if (!st) {
        fuzz_expect_error_naming(weights_path);
        return 0;
    }
    check_tensors(st, size);
    check_reads(st);
    if (codir_safetensors_find(st, "bert.embeddings.word_embeddings.weight")) check_model_folder(st);
    codir_safetensors_close(st);
    return 0;
}
