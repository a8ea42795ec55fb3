/* Tests of the safetensors reader and writer and of Hugging Face model folders.

   The references are independent of the C code: fixtures written by
   tests/fixtures/io/make_safetensors.py with Python's struct and json, byte strings
   from the official library's own tests, and values worked out by hand. */
#define _POSIX_C_SOURCE 200809L /* for mkdir, which creates temporary model folders */
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(_WIN32)
#include <direct.h>
#define make_dir(path) (_mkdir(path) == 0)
#define remove_dir(path) _rmdir(path)
#else
#include <sys/stat.h>
#define make_dir(path) (mkdir(path, 0700) == 0)
#define remove_dir(path) remove(path)
#endif

/* ---- files and folders ---- */

/* Stores the path of fixture `name` in path[size]. Fixtures live beside this source
   file, and __FILE__ is relative to the folder the compiler ran in, which is where the
   tests run from. */
static const char *fixture(char *path, size_t size, const char *name)
{
    const char *file = __FILE__;
    const char *slash = strrchr(file, '/');
    int dir_length = slash ? (int)(slash - file + 1) : 0;
    snprintf(path, size, "%.*sfixtures/io/%s", dir_length, file, name);
    return path;
}

/* Builds a unique name under $TMPDIR (or /tmp) from the time, a counter and the
   address of a static object, which differs between runs under address space layout
   randomization. */
static void temp_name(char *path, size_t size, const char *suffix)
{
    static unsigned long counter;
    const char *dir = getenv("TMPDIR");
    if (!dir || !dir[0]) dir = "/tmp";
    counter++;
    snprintf(path, size, "%s/codir_io_%lx_%lx_%lu%s", dir, (unsigned long)time(NULL),
             (unsigned long)((uintptr_t)&counter >> 4), counter, suffix);
}

/* Creates a new empty folder for a model and stores its path in path[size]. */
static int make_temp_dir(char *path, size_t size)
{
    int attempt;
    for (attempt = 0; attempt < 100; attempt++) {
        temp_name(path, size, "");
        if (make_dir(path)) return 1;
    }
    return 0;
}

/* Removes a model folder written by codir_model_save, with any leftover .tmp files. */
static void remove_model_dir(const char *dir)
{
    static const char *const names[] = {"config.json", "model.safetensors", "config.json.tmp",
                                        "model.safetensors.tmp"};
    char path[600];
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        remove(path);
    }
    remove_dir(dir);
}

static int write_bytes(const char *path, const void *data, size_t n)
{
    FILE *file = fopen(path, "wb");
    int ok;
    if (!file) return 0;
    ok = fwrite(data, 1, n, file) == n;
    if (fclose(file) != 0) ok = 0;
    return ok;
}

/* Reads a whole file into a malloc'd buffer; returns NULL when it cannot. */
static unsigned char *read_bytes(const char *path, size_t *n)
{
    FILE *file = fopen(path, "rb");
    unsigned char *data = NULL;
    long size;
    if (!file) return NULL;
    if (fseek(file, 0, SEEK_END) == 0 && (size = ftell(file)) >= 0 && fseek(file, 0, SEEK_SET) == 0) {
        data = (unsigned char *)malloc((size_t)size + 1);
        if (data && fread(data, 1, (size_t)size, file) != (size_t)size) {
            free(data);
            data = NULL;
        }
        *n = (size_t)size;
    }
    fclose(file);
    return data;
}

/* Writes a safetensors file from a header and `data_bytes` data bytes (0, 1, 2, ...).
   The length field is the header's length unless length_field is not (uint64_t)-1. */
static int write_st(const char *path, const char *header, size_t data_bytes, uint64_t length_field)
{
    size_t header_length = strlen(header), i;
    unsigned char *buffer = (unsigned char *)malloc(8 + header_length + data_bytes);
    uint64_t n = length_field == (uint64_t)-1 ? (uint64_t)header_length : length_field;
    int ok;
    if (!buffer) return 0;
    for (i = 0; i < 8; i++) buffer[i] = (unsigned char)(n >> (8 * i));
    memcpy(buffer + 8, header, header_length);
    for (i = 0; i < data_bytes; i++) buffer[8 + header_length + i] = (unsigned char)i;
    ok = write_bytes(path, buffer, 8 + header_length + data_bytes);
    free(buffer);
    return ok;
}

static uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Checks that got[n] equals the float32 bit patterns want[n]. */
static void check_bits(const char *what, const float *got, const uint32_t *want, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        CHECK(float_bits(got[i]) == want[i], "%s[%zu]: bits 0x%08lx (%g), want 0x%08lx (%g)", what, i,
              (unsigned long)float_bits(got[i]), (double)got[i], (unsigned long)want[i], (double)bits_float(want[i]));
}

/* Checks that a call returned `code` and recorded a message containing `text`. */
static void check_error(const char *what, int rc, int code, const char *text)
{
    CHECK(rc == code, "%s: rc %d, want %d (%s)", what, rc, code, codir_last_error());
    CHECK(strstr(codir_last_error(), text) != NULL, "%s: message \"%s\" lacks \"%s\"", what, codir_last_error(), text);
}

/* Checks that opening `path` fails with a message containing `text`. */
static void check_open_fails(const char *what, const char *path, const char *text)
{
    codir_safetensors *st;
    codir_clear_error();
    st = codir_safetensors_open(path);
    CHECK(st == NULL, "%s: the file was accepted", what);
    codir_safetensors_close(st);
    CHECK(strstr(codir_last_error(), text) != NULL, "%s: message \"%s\" lacks \"%s\"", what, codir_last_error(), text);
}

/* Checks a tensor's header entry: dtype, shape and byte size. */
static void check_entry(const codir_safetensors *st, const char *name, int dtype, int ndim, const int64_t *shape,
                        uint64_t nbytes)
{
    const codir_st_tensor *t = codir_safetensors_find(st, name);
    int d;
    CHECK(t != NULL, "tensor %s not found", name);
    if (!t) return;
    CHECK(t->dtype == dtype, "%s: dtype %s, want %s", name, codir_st_dtype_name(t->dtype), codir_st_dtype_name(dtype));
    CHECK(t->ndim == ndim, "%s: %d dimensions, want %d", name, t->ndim, ndim);
    for (d = 0; d < ndim && d < t->ndim; d++)
        CHECK(t->shape[d] == shape[d], "%s: dimension %d is %lld, want %lld", name, d, (long long)t->shape[d],
              (long long)shape[d]);
    CHECK(t->nbytes == nbytes, "%s: %llu bytes, want %llu", name, (unsigned long long)t->nbytes,
          (unsigned long long)nbytes);
}

/* Checks that metadata `key` of st is `value`. */
static void check_metadata(const codir_safetensors *st, const char *key, const char *value)
{
    const char *got = codir_safetensors_metadata(st, key);
    CHECK(got != NULL, "metadata \"%s\" not found", key);
    CHECK(!got || strcmp(got, value) == 0, "metadata \"%s\" is \"%s\", want \"%s\"", key, got, value);
}

/* ---- reading F32, F16 and BF16 written by Python ---- */

static void test_read_python_dtypes(void)
{
    /* The values make_safetensors.py packs with struct; half and bfloat16 values are
       exact, so each float32 is known bit for bit. */
    const uint32_t f32_special[7] = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u,
                                     0x7FC00000u, 0x00000001u, 0x7F7FFFFFu};
    const float f16_values[14] = {0.0f, -0.0f, 1.0f, -2.0f, 65504.0f, -65504.0f, ldexpf(1.0f, -14),
                                  ldexpf(1.0f, -24), ldexpf(1023.0f, -24), -ldexpf(1.0f, -24),
                                  0.333251953125f, HUGE_VALF, -HUGE_VALF, 0.0f};
    /* F16 NaN 0x7E00 / 0xFE00 / 0x7C01: sign and payload move to the top of the float. */
    const uint32_t f16_nan_bits[3] = {0x7FC00000u, 0xFFC00000u, 0x7F802000u};
    const float bf16_values[6] = {1.0f, -2.0f, 3.140625f, HUGE_VALF, -0.0f, 3.3895313892515355e38f};
    /* BF16 0x7FC0 is a NaN and 0x0001 the float32 subnormal 2^-133. */
    const uint32_t bf16_bits[2] = {0x7FC00000u, 0x00010000u};
    char path[512];
    codir_safetensors *st = codir_safetensors_open(fixture(path, sizeof path, "dtypes.safetensors"));
    const codir_st_tensor *t;
    float got[16];
    uint32_t want[16];
    static const int64_t shape_315[3] = {3, 1, 5}, shape_03[2] = {0, 3}, shape_27[2] = {2, 7}, shape_23[2] = {2, 3},
                         shape_14[2] = {1, 4};
    int i, rc;

    CHECK(st != NULL, "open %s: %s", path, codir_last_error());
    if (!st) return;
    CHECK(st->num_tensors == 9, "num_tensors %d, want 9", st->num_tensors);
    CHECK(st->num_metadata == 2, "num_metadata %d, want 2", st->num_metadata);
    check_metadata(st, "format", "pt");
    check_metadata(st, "source", "make_safetensors.py");
    CHECK(codir_safetensors_metadata(st, "missing") == NULL, "a missing metadata key was found");
    CHECK(codir_safetensors_find(st, "missing") == NULL, "a missing tensor was found");

    /* F32 of shape [3, 1, 5]: ((i * 37) % 101 - 50) / 16 */
    check_entry(st, "f32.odd", CODIR_ST_F32, 3, shape_315, 60);
    rc = codir_safetensors_read_f32(st, "f32.odd", got, 15);
    CHECK(rc == CODIR_OK, "read f32.odd: %s", codir_last_error());
    for (i = 0; i < 15; i++) want[i] = float_bits((float)((i * 37) % 101 - 50) / 16.0f);
    check_bits("f32.odd", got, want, 15);

    rc = codir_safetensors_read_f32(st, "f32.special", got, 7);
    CHECK(rc == CODIR_OK, "read f32.special: %s", codir_last_error());
    check_bits("f32.special", got, f32_special, 7);

    check_entry(st, "f32.scalar", CODIR_ST_F32, 0, NULL, 4);
    t = codir_safetensors_find(st, "f32.scalar");
    CHECK(!t || t->numel == 1, "f32.scalar has %zu elements, want 1", t ? t->numel : 0);
    rc = codir_safetensors_read_f32(st, "f32.scalar", got, 1);
    CHECK(rc == CODIR_OK, "read f32.scalar: %s", codir_last_error());
    CHECK(got[0] == 42.5f, "f32.scalar is %g, want 42.5", (double)got[0]);

    check_entry(st, "f32.empty", CODIR_ST_F32, 2, shape_03, 0);
    CHECK(codir_safetensors_read_f32(st, "f32.empty", got, 0) == CODIR_OK, "read f32.empty: %s", codir_last_error());

    /* F16 of shape [2, 7]: zeros, extremes, the smallest normal, subnormals, inf, NaN */
    check_entry(st, "f16.values", CODIR_ST_F16, 2, shape_27, 28);
    rc = codir_safetensors_read_f32(st, "f16.values", got, 14);
    CHECK(rc == CODIR_OK, "read f16.values: %s", codir_last_error());
    for (i = 0; i < 13; i++) want[i] = float_bits(f16_values[i]);
    check_bits("f16.values", got, want, 13);
    CHECK(isnan(got[13]), "f16.values[13] is %g, want NaN", (double)got[13]);

    rc = codir_safetensors_read_f32(st, "f16.nan_bits", got, 3);
    CHECK(rc == CODIR_OK, "read f16.nan_bits: %s", codir_last_error());
    check_bits("f16.nan_bits", got, f16_nan_bits, 3);

    check_entry(st, "bf16.values", CODIR_ST_BF16, 2, shape_23, 12);
    rc = codir_safetensors_read_f32(st, "bf16.values", got, 6);
    CHECK(rc == CODIR_OK, "read bf16.values: %s", codir_last_error());
    for (i = 0; i < 6; i++) want[i] = float_bits(bf16_values[i]);
    check_bits("bf16.values", got, want, 6);
    rc = codir_safetensors_read_f32(st, "bf16.bits", got, 2);
    CHECK(rc == CODIR_OK, "read bf16.bits: %s", codir_last_error());
    check_bits("bf16.bits", got, bf16_bits, 2);

    /* I64 is listed but does not convert, and a wrong count or a missing name fails. */
    check_entry(st, "i64.index", CODIR_ST_I64, 2, shape_14, 32);
    check_error("reading I64", codir_safetensors_read_f32(st, "i64.index", got, 4), CODIR_ERR_INVALID,
                "has dtype I64; only F32, F16 and BF16 convert");
    check_error("a wrong count", codir_safetensors_read_f32(st, "f32.odd", got, 14), CODIR_ERR_INVALID,
                "tensor \"f32.odd\" has 15 elements (shape [3, 1, 5]), not the 14 requested");
    check_error("a missing name", codir_safetensors_read_f32(st, "nope", got, 1), CODIR_ERR_INVALID,
                "no tensor is named \"nope\"");
    CHECK(strcmp(codir_st_dtype_name(CODIR_ST_BF16), "BF16") == 0, "the name of CODIR_ST_BF16 is not BF16");
    CHECK(strcmp(codir_st_dtype_name(99), "?") == 0, "the name of dtype 99 is not ?");
    codir_safetensors_close(st);
}

/* ---- writing: byte for byte as Python and the official library write ---- */

/* The tensors make_safetensors.py writes to written.safetensors, in another order. */
typedef struct written_set {
    float weight[15], bias[5], special[7], scalar, quote, ctrl[2], unicode, w10, w2;
    codir_st_write tensors[10];
} written_set;

static void written_init(written_set *s)
{
    static const uint32_t special[7] = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u,
                                        0x7FC00000u, 0x00000001u, 0x7F7FFFFFu};
    int i;
    memset(s, 0, sizeof *s);
    for (i = 0; i < 15; i++) s->weight[i] = (float)((i * 37) % 101 - 50) / 16.0f;
    for (i = 0; i < 5; i++) s->bias[i] = (float)i * 0.25f - 1.0f;
    for (i = 0; i < 7; i++) s->special[i] = bits_float(special[i]);
    s->scalar = 42.5f;
    s->quote = 1.0f;
    s->ctrl[0] = 2.0f;
    s->ctrl[1] = 3.0f;
    s->unicode = -7.0f;
    s->w10 = 10.0f;
    s->w2 = 2.0f;

    /* written_nometa.safetensors contains the first three */
    s->tensors[0].name = "weight";
    s->tensors[0].ndim = 2;
    s->tensors[0].shape[0] = 3;
    s->tensors[0].shape[1] = 5;
    s->tensors[0].data = s->weight;
    s->tensors[1].name = "bias";
    s->tensors[1].ndim = 1;
    s->tensors[1].shape[0] = 5;
    s->tensors[1].data = s->bias;
    s->tensors[2].name = "special";
    s->tensors[2].ndim = 1;
    s->tensors[2].shape[0] = 7;
    s->tensors[2].data = s->special;
    s->tensors[3].name = "layer.2.w";
    s->tensors[3].ndim = 1;
    s->tensors[3].shape[0] = 1;
    s->tensors[3].data = &s->w2;
    s->tensors[4].name = "scalar";
    s->tensors[4].ndim = 0;
    s->tensors[4].data = &s->scalar;
    s->tensors[5].name = "empty";
    s->tensors[5].ndim = 2;
    s->tensors[5].shape[0] = 0;
    s->tensors[5].shape[1] = 3;
    s->tensors[5].data = NULL;
    s->tensors[6].name = "quote\"back\\slash";
    s->tensors[6].ndim = 1;
    s->tensors[6].shape[0] = 1;
    s->tensors[6].data = &s->quote;
    s->tensors[7].name = "ctrl\x01\ttab\n";
    s->tensors[7].ndim = 1;
    s->tensors[7].shape[0] = 2;
    s->tensors[7].data = s->ctrl;
    s->tensors[8].name = "\xC3\xBCn\xC3\xAF"; /* "ünï" */
    s->tensors[8].ndim = 2;
    s->tensors[8].shape[0] = 1;
    s->tensors[8].shape[1] = 1;
    s->tensors[8].data = &s->unicode;
    s->tensors[9].name = "layer.10.w";
    s->tensors[9].ndim = 1;
    s->tensors[9].shape[0] = 1;
    s->tensors[9].data = &s->w10;
}

/* Writes with codir_safetensors_write and compares the file with want[want_length]. */
static void check_written(const char *what, const codir_st_write *tensors, int count, const char *const *metadata,
                          int num_metadata, const unsigned char *want, size_t want_length)
{
    char path[512];
    unsigned char *got;
    size_t got_length = 0, i;
    int rc;
    temp_name(path, sizeof path, ".safetensors");
    rc = codir_safetensors_write(path, tensors, count, metadata, num_metadata);
    CHECK(rc == CODIR_OK, "%s: write failed: %s", what, codir_last_error());
    got = read_bytes(path, &got_length);
    CHECK(got != NULL, "%s: cannot read back %s", what, path);
    if (got) {
        for (i = 0; i < got_length && i < want_length && got[i] == want[i]; i++) continue;
        CHECK(got_length == want_length, "%s: %zu bytes written, %zu expected", what, got_length, want_length);
        CHECK(i == want_length || i == got_length, "%s: %zu bytes written, %zu expected, first difference "
              "at byte %zu", what, got_length, want_length, i);
    }
    free(got);
    remove(path);
}

static void test_write_matches_python(void)
{
    static const char *const metadata[4] = {"note", "a \"quoted\" \\ line\nbreak \xC3\xA9 \x1F", "format", "pt"};
    written_set s;
    char path[512];
    unsigned char *want;
    size_t want_length = 0;

    written_init(&s);
    want = read_bytes(fixture(path, sizeof path, "written.safetensors"), &want_length);
    CHECK(want != NULL, "cannot read the fixture %s", path);
    if (want) check_written("written.safetensors", s.tensors, 10, metadata, 2, want, want_length);
    free(want);
    want = read_bytes(fixture(path, sizeof path, "written_nometa.safetensors"), &want_length);
    CHECK(want != NULL, "cannot read the fixture %s", path);
    if (want) check_written("written_nometa.safetensors", s.tensors, 3, NULL, 0, want, want_length);
    free(want);
}

/* Expected bytes from the official library's own tests (huggingface/safetensors,
   safetensors/src/tensor.rs: test_serialization, test_serialization_forced_alignement
   and test_empty). */
static void test_write_matches_official(void)
{
    static const unsigned char one[] = {
        64, 0, 0, 0, 0, 0, 0, 0, '{', '"', 'a', 't', 't', 'n', '.', '0', '"', ':', '{', '"', 'd', 't', 'y', 'p', 'e',
        '"', ':', '"', 'F', '3', '2', '"', ',', '"', 's', 'h', 'a', 'p', 'e', '"', ':', '[', '1', ',', '2', ',', '3',
        ']', ',', '"', 'd', 'a', 't', 'a', '_', 'o', 'f', 'f', 's', 'e', 't', 's', '"', ':', '[', '0', ',', '2', '4',
        ']', '}', '}', 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
    static const unsigned char aligned[] = {
        72, 0, 0, 0, 0, 0, 0, 0, '{', '"', 'a', 't', 't', 'n', '0', '"', ':', '{', '"', 'd', 't', 'y', 'p', 'e', '"',
        ':', '"', 'F', '3', '2', '"', ',', '"', 's', 'h', 'a', 'p', 'e', '"', ':', '[', '1', ',', '1', ',', '2', ',',
        '3', ']', ',', '"', 'd', 'a', 't', 'a', '_', 'o', 'f', 'f', 's', 'e', 't', 's', '"', ':', '[', '0', ',', '2',
        '4', ']', '}', '}', ' ', ' ', ' ', ' ', ' ', ' ', ' ', 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64,
        0, 0, 128, 64, 0, 0, 160, 64};
    static const unsigned char empty[] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
    static const unsigned char empty_meta[] = {
        40, 0, 0, 0, 0, 0, 0, 0, '{', '"', '_', '_', 'm', 'e', 't', 'a', 'd', 'a', 't', 'a', '_', '_', '"', ':', '{',
        '"', 'f', 'r', 'a', 'm', 'e', 'w', 'o', 'r', 'k', '"', ':', '"', 'p', 't', '"', '}', '}', ' ', ' ', ' ', ' ',
        ' '};
    static const char *const framework[2] = {"framework", "pt"};
    const float values[6] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f};
    codir_st_write t;

    memset(&t, 0, sizeof t);
    t.name = "attn.0";
    t.ndim = 3;
    t.shape[0] = 1;
    t.shape[1] = 2;
    t.shape[2] = 3;
    t.data = values;
    check_written("attn.0", &t, 1, NULL, 0, one, sizeof one);
    t.name = "attn0";
    t.ndim = 4;
    t.shape[0] = 1;
    t.shape[1] = 1;
    t.shape[2] = 2;
    t.shape[3] = 3;
    check_written("attn0, padded", &t, 1, NULL, 0, aligned, sizeof aligned);
    check_written("no tensors", NULL, 0, NULL, 0, empty, sizeof empty);
    check_written("metadata only", NULL, 0, framework, 1, empty_meta, sizeof empty_meta);
}

static void test_write_read_round_trip(void)
{
    static const char *const metadata[2] = {"k\"ey", "v\\alue\n"};
    written_set s;
    char path[512];
    codir_safetensors *st;
    float got[16];
    int i, rc;

    written_init(&s);
    temp_name(path, sizeof path, ".safetensors");
    rc = codir_safetensors_write(path, s.tensors, 10, metadata, 1);
    CHECK(rc == CODIR_OK, "write failed: %s", codir_last_error());
    st = codir_safetensors_open(path);
    CHECK(st != NULL, "open failed: %s", codir_last_error());
    if (st) {
        CHECK(st->num_tensors == 10, "num_tensors %d, want 10", st->num_tensors);
        check_metadata(st, "k\"ey", "v\\alue\n");
        for (i = 0; i < 10; i++) {
            const codir_st_write *w = &s.tensors[i];
            const codir_st_tensor *t = codir_safetensors_find(st, w->name);
            size_t numel = 1, k;
            int d;
            CHECK(t != NULL, "tensor %d (%s) not found", i, w->name);
            if (!t) continue;
            CHECK(t->ndim == w->ndim, "tensor %s: ndim %d, want %d", w->name, t->ndim, w->ndim);
            for (d = 0; d < w->ndim; d++) numel *= (size_t)w->shape[d];
            for (d = 0; d < w->ndim && d < t->ndim; d++)
                CHECK(t->shape[d] == w->shape[d], "tensor %s: dimension %d is %lld, want %lld", w->name, d,
                      (long long)t->shape[d], (long long)w->shape[d]);
            rc = codir_safetensors_read_f32(st, w->name, got, numel);
            CHECK(rc == CODIR_OK, "read %s: %s", w->name, codir_last_error());
            for (k = 0; k < numel && rc == CODIR_OK; k++)
                CHECK(float_bits(got[k]) == float_bits(w->data[k]), "tensor %s[%zu]: %g, want %g", w->name, k,
                      (double)got[k], (double)w->data[k]);
        }
        codir_safetensors_close(st);
    }
    remove(path);
}

/* ---- malformed files ---- */

static void test_rejects_every_truncation(void)
{
    char source[512], path[512];
    unsigned char *bytes;
    size_t length = 0, cut;
    int accepted = 0, silent = 0;
    bytes = read_bytes(fixture(source, sizeof source, "written_nometa.safetensors"), &length);
    CHECK(bytes != NULL, "cannot read the fixture %s", source);
    if (!bytes) return;
    temp_name(path, sizeof path, ".safetensors");
    for (cut = 0; cut < length; cut++) {
        codir_safetensors *st;
        codir_clear_error();
        if (!write_bytes(path, bytes, cut)) break;
        st = codir_safetensors_open(path);
        if (st) {
            accepted++;
            codir_safetensors_close(st);
        } else if (!strstr(codir_last_error(), path)) {
            silent++;
        }
    }
    CHECK(cut == length, "could not write the prefix of %zu bytes", cut);
    CHECK(accepted == 0, "%d of %zu truncated files were accepted", accepted, length);
    CHECK(silent == 0, "%d rejections did not name the file", silent);
    if (write_bytes(path, bytes, length)) {
        codir_safetensors *st = codir_safetensors_open(path);
        CHECK(st != NULL, "the complete file was rejected: %s", codir_last_error());
        codir_safetensors_close(st);
    }

    /* The messages name the part that is cut. */
    write_bytes(path, bytes, 5);
    check_open_fails("a 5-byte file", path, "has 5 bytes, fewer than the 8-byte header length");
    write_bytes(path, bytes, 40);
    check_open_fails("a cut header", path, "is larger than the 32 bytes that follow");
    write_bytes(path, bytes, length - 1);
    check_open_fails("a cut data region", path, "run past the end of the data region");
    free(bytes);
    remove(path);
}

/* Overwrites each byte of a small valid file with JSON punctuation, digits and bytes
   outside ASCII. Every variant must either open, with every tensor readable, or fail
   with a message; the sanitizer builds catch reads out of bounds. */
static void test_survives_byte_changes(void)
{
    static const unsigned char replacements[] = {0x00, 0xFF, 0x80, '"', '{', '}', '[', ']', ',', ':', '\\',
                                                 '0', '9', '-', ' ', 'e'};
    char source[512], path[512];
    unsigned char *bytes;
    float values[64];
    size_t length = 0, at, r;
    int opened = 0, silent = 0;
    bytes = read_bytes(fixture(source, sizeof source, "written_nometa.safetensors"), &length);
    CHECK(bytes != NULL, "cannot read the fixture %s", source);
    if (!bytes) return;
    temp_name(path, sizeof path, ".safetensors");
    for (at = 0; at < length; at++) {
        unsigned char original = bytes[at];
        for (r = 0; r < sizeof replacements; r++) {
            codir_safetensors *st;
            int i;
            if (replacements[r] == original) continue;
            bytes[at] = replacements[r];
            if (!write_bytes(path, bytes, length)) continue;
            codir_clear_error();
            st = codir_safetensors_open(path);
            if (!st) {
                if (!codir_last_error()[0]) silent++;
                continue;
            }
            opened++;
            for (i = 0; i < st->num_tensors; i++)
                if (st->tensors[i].numel <= 64) codir_safetensors_read_f32(st, st->tensors[i].name, values, st->tensors[i].numel);
            codir_safetensors_close(st);
        }
        bytes[at] = original;
    }
    CHECK(silent == 0, "%d rejections recorded no message", silent);
    CHECK(opened > 0, "no variant opened, yet changes to the data region leave the header valid");
    free(bytes);
    remove(path);
}

/* A header that must be rejected, what the message must contain, and the code. */
typedef struct bad_header {
    const char *header;
    size_t data_bytes;
    const char *message;
    int code;
} bad_header;

#define T1 "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"

static const bad_header bad_headers[] = {
    /* structure */
    {"", 0, "must start with '{'", CODIR_ERR_PARSE},
    {" {" T1 "}", 8, "at byte 8: it must start with '{'", CODIR_ERR_PARSE},
    {"[1]", 0, "must start with '{'", CODIR_ERR_PARSE},
    {"{" T1, 8, "malformed JSON at byte 8: the object that starts here is not closed", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]", 8, "at byte 13: the object", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,\"data_offsets\":[0,8]}}", 8, "at byte 53: expected ',' or ']'",
     CODIR_ERR_PARSE},
    {"{" T1 "}x", 8, "at byte 62: unexpected data after the JSON value", CODIR_ERR_PARSE},
    {"{" T1 ",}", 8, "at byte 62: expected a string key", CODIR_ERR_PARSE},
    {"{\"a\" " T1 "}", 8, "expected ':' after the key", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],}}", 8, "expected a string key", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\" \"shape\":[2],\"data_offsets\":[0,8]}}", 8, "at byte 28: expected ',' or '}'",
     CODIR_ERR_PARSE},
    {"{\"a\":tru}", 0, "at byte 13: expected a value", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[02],\"data_offsets\":[0,8]}}", 8, "a number may not start with 0",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2.],\"data_offsets\":[0,8]}}", 8, "expected a digit after '.'",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-],\"data_offsets\":[0,8]}}", 8, "expected a digit", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2e],\"data_offsets\":[0,8]}}", 8, "expected a digit in the exponent",
     CODIR_ERR_PARSE},
    {"{\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"
     "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}",
     0, "nesting deeper than 64 levels", CODIR_ERR_PARSE},

    /* strings */
    {"{\"a\\x\":{}}", 0, "at byte 11: invalid escape sequence", CODIR_ERR_PARSE},
    {"{\"a\\u12G4\":{}}", 0, "at byte 15: \\u must be followed by 4 hex digits", CODIR_ERR_PARSE},
    {"{\"a\\ud800\":{}}", 0, "high surrogate without a low surrogate", CODIR_ERR_PARSE},
    {"{\"a\\udc00\":{}}", 0, "low surrogate without a high surrogate", CODIR_ERR_PARSE},
    {"{\"a\tb\":{}}", 0, "at byte 11: a control character in a string must be escaped", CODIR_ERR_PARSE},
    {"{\"a\xC3\":{}}", 0, "at byte 11: invalid UTF-8", CODIR_ERR_PARSE},
    {"{\"a\xC0\xAF\":{}}", 0, "invalid UTF-8", CODIR_ERR_PARSE},
    {"{\"a\xED\xA0\x80\":{}}", 0, "invalid UTF-8", CODIR_ERR_PARSE},
    {"{\"a", 0, "at byte 9: the string that starts here is not closed", CODIR_ERR_PARSE},
    {"{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0, "contains a NUL character",
     CODIR_ERR_PARSE},

    /* wrong types and keys */
    {"{\"a\":5}", 0, "tensor \"a\" at byte 13 must be an object", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":5,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "dtype at byte 22 must be a string",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}", 8, "shape at byte 36 must be an array",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,8]}}", 8, "must be a non-negative integer",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape entry at byte 37 must be a "
     "non-negative integer", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "data_offsets at byte 55 must be an array "
     "of 2 integers", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,\"8\"]}}", 8, "data_offsets entry at byte 58",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,18446744073709551616]}}", 8,
     "non-negative integer below 2^63", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,8]}}", 8, "at most 8 integers",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "tensor \"a\" at byte 13 has no dtype", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "has no shape", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "has no data_offsets", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}}", 8,
     "unexpected key \"extra\" at byte 61", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
     "at byte 28: this key repeats", CODIR_ERR_PARSE},
    {"{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ value at byte 29 must be a string", CODIR_ERR_PARSE},
    {"{\"__metadata__\":[]}", 0, "__metadata__ at byte 24 must be an object", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F31\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype \"F31\" at byte 22",
     CODIR_ERR_PARSE},
    {"{" T1 "," T1 "}", 8, "at byte 62: this key repeats", CODIR_ERR_PARSE},

    /* sizes and offsets */
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,8]}}", 8,
     "shape [4294967296, 4294967296, 16] overflows", CODIR_ERR_OVERFLOW},
    {"{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,8]}}", 8,
     "byte size of shape [4611686018427387904] overflows", CODIR_ERR_OVERFLOW},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
     "hold 8 bytes, but dtype F32 with shape [3] needs 12", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "[8, 0] end before they begin",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "run past the end of the data region",
     CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "bytes [0, 4) of the data region belong "
     "to no tensor", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
     "\"data_offsets\":[4,12]}}",
     12, "tensors \"a\" [0, 8] and \"b\" [4, 12] overlap", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[0],"
     "\"data_offsets\":[4,4]}}",
     8, "overlap", CODIR_ERR_PARSE},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],"
     "\"data_offsets\":[8,12]}}",
     12, "bytes [4, 8) of the data region belong to no tensor", CODIR_ERR_PARSE},
    {"{" T1 "}", 12, "the data region holds 12 bytes but the tensors end at byte 8", CODIR_ERR_PARSE},
    {"{}", 4, "holds 4 bytes but the tensors end at byte 0", CODIR_ERR_PARSE},
};

static void test_rejects_bad_headers(void)
{
    char path[512];
    size_t i;
    temp_name(path, sizeof path, ".safetensors");
    for (i = 0; i < sizeof bad_headers / sizeof bad_headers[0]; i++) {
        const bad_header *b = &bad_headers[i];
        codir_safetensors *st;
        CHECK(write_st(path, b->header, b->data_bytes, (uint64_t)-1), "cannot write %s", path);
        codir_clear_error();
        st = codir_safetensors_open(path);
        CHECK(st == NULL, "case %zu was accepted: %s", i, b->header);
        if (st) {
            codir_safetensors_close(st);
            continue;
        }
        CHECK(strstr(codir_last_error(), b->message) != NULL, "case %zu (%s): message \"%s\" lacks \"%s\"", i,
              b->header, codir_last_error(), b->message);
        CHECK(strstr(codir_last_error(), path) != NULL, "case %zu: message \"%s\" does not name the file", i,
              codir_last_error());
    }

    /* The header length field: beyond the file, and beyond the format's limit. */
    write_st(path, "{}", 0, 9);
    check_open_fails("length beyond the file", path, "header length 9 in bytes 0-7 is larger than the 2 bytes that follow");
    write_st(path, "{}", 0, 100000001);
    check_open_fails("length beyond the limit", path, "header length 100000001 in bytes 0-7 exceeds the format's limit");
    write_st(path, "{}", 0, (uint64_t)-2);
    check_open_fails("length 2^64 - 2", path, "exceeds the format's limit of 100000000 bytes");

    /* Accepted edge cases: padding, whitespace, escapes and metadata. */
    write_st(path, "{\"\\u00fc\\ud83d\\ude00\\n\\/\" : { \"data_offsets\" : [0, 8], \"shape\": [2], \"dtype\": "
             "\"F32\" }, \"__metadata__\": {\"a\": \"b\"}}   \t\n\r ",
             8, (uint64_t)-1);
    {
        codir_safetensors *st = codir_safetensors_open(path);
        CHECK(st != NULL, "a valid header with whitespace and escapes was rejected: %s", codir_last_error());
        if (st) {
            CHECK(codir_safetensors_find(st, "\xC3\xBC\xF0\x9F\x98\x80\n/") != NULL,
                  "the escaped name was decoded wrongly");
            CHECK(st->num_metadata == 1, "%d metadata entries, want 1", st->num_metadata);
            check_metadata(st, "a", "b");
            codir_safetensors_close(st);
        }
    }
    check_open_fails("a missing file", "/nonexistent/x.safetensors", "failed to open '/nonexistent/x.safetensors'");
    remove(path);
}

static void test_rejects_bad_writes(void)
{
    const float one = 1.0f;
    static const char *const duplicate_keys[4] = {"k", "a", "k", "b"};
    codir_st_write t[2];
    char path[512];
    FILE *leftover;

    memset(t, 0, sizeof t);
    temp_name(path, sizeof path, ".safetensors");
    t[0].name = "x";
    t[0].ndim = 1;
    t[0].shape[0] = 1;
    t[0].data = &one;
    t[1] = t[0];
    check_error("duplicate names", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_INVALID,
                "two tensors are named \"x\"");
    t[1].name = "__metadata__";
    check_error("a reserved name", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_INVALID,
                "tensor name \"__metadata__\" is reserved for the metadata");
    t[1].name = "bad\xFFutf8";
    check_error("invalid UTF-8", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_INVALID, "is not valid UTF-8");
    t[1].name = "y";
    t[1].ndim = 9;
    check_error("9 dimensions", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_INVALID,
                "tensor \"y\" has 9 dimensions, outside 0..8");
    t[1].ndim = 1;
    t[1].shape[0] = -1;
    check_error("a negative dimension", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_INVALID,
                "tensor \"y\" has negative dimension 0 (-1)");
    t[1].ndim = 3;
    t[1].shape[0] = INT64_MAX;
    t[1].shape[1] = INT64_MAX;
    t[1].shape[2] = 2;
    check_error("a shape overflow", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_OVERFLOW,
                "the size of tensor \"y\" overflows size_t");
    t[1].ndim = 1;
    t[1].shape[0] = 2;
    t[1].data = NULL;
    check_error("no data", codir_safetensors_write(path, t, 2, NULL, 0), CODIR_ERR_INVALID, "tensor \"y\" has no data");
    check_error("duplicate metadata", codir_safetensors_write(path, t, 1, duplicate_keys, 2), CODIR_ERR_INVALID,
                "metadata key \"k\" is given twice");
    check_error("a missing folder", codir_safetensors_write("/nonexistent/dir/x.safetensors", t, 1, NULL, 0),
                CODIR_ERR_IO, "failed to create '/nonexistent/dir/x.safetensors.tmp'");
    leftover = fopen(path, "rb");
    CHECK(leftover == NULL, "a rejected write created %s", path);
    if (leftover) fclose(leftover);
    remove(path);
}

/* ---- model folders: save, load, compare ---- */

static codir_config io_config(int num_labels, int mlm_head)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = 23;
    cfg.max_len = 9;
    cfg.type_vocab_size = 2;
    cfg.num_layers = 2;
    cfg.hidden = 12;
    cfg.num_heads = 3;
    cfg.ffn = 20;
    cfg.num_labels = num_labels;
    cfg.mlm_head = mlm_head;
    cfg.dropout = 0.15f;
    cfg.ln_eps = 1e-6f;
    return cfg;
}

/* Sets every parameter to a distinct random value, so a misplaced tensor shows. */
static void randomize(codir_model *m, unsigned long long seed)
{
    size_t i;
    for (i = 0; i < m->params.count; i++) m->params.data[i] = (float)check_uniform(&seed, -1.0, 1.0);
}

/* Runs the model on a fixed batch of three padded sequences and stores the logits in
   out[3 * labels]. When mlm is not NULL it also stores the masked-LM logits at four
   positions in mlm[4 * V]. */
static int run_model(const codir_model *m, float *out, float *mlm)
{
    static const int lengths[3] = {5, 3, 7};
    static const int ids[3 * 7] = {2, 7, 9, 11, 3, 0, 0, 2, 5, 3, 0, 0, 0, 0, 2, 20, 21, 22, 4, 6, 3};
    static const int types[3 * 7] = {0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1};
    static const int labels[3] = {0, 1, 0};
    static const int positions[4] = {1, 3, 8, 19};
    codir_encoded enc;
    codir_batch batch;
    codir_ctx ctx;
    codir_output output;
    int rc;
    memset(&enc, 0, sizeof enc);
    enc.count = 3;
    enc.max_len = 7;
    enc.lengths = (int *)lengths;
    enc.ids = (int *)ids;
    enc.types = (int *)types;
    enc.labels = (int *)labels;
    enc.num_classes = 2;
    rc = codir_batch_init(&batch, 3, 7);
    if (rc) return rc;
    rc = codir_ctx_init(&ctx, 1 << 16, 1);
    if (!rc) rc = codir_batch_fill(&batch, &enc, NULL, 0, 3);
    if (!rc) {
        codir_ctx_begin(&ctx, 0, 0, 0);
        rc = codir_model_forward(&ctx, m, &batch, &output);
    }
    if (!rc) memcpy(out, output.logits->data, output.logits->numel * sizeof(float));
    if (!rc && mlm) {
        codir_tensor *logits = codir_mlm_logits(&ctx, m, output.hidden[m->cfg.num_layers], positions, 4);
        if (logits) memcpy(mlm, logits->data, logits->numel * sizeof(float));
        else rc = CODIR_ERR_INVALID;
    }
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    return rc;
}

/* Checks that b has every field of a. */
static void check_same_config(const codir_config *a, const codir_config *b)
{
#define CHECK_FIELD(field) CHECK(a->field == b->field, #field " %g, want %g", (double)b->field, (double)a->field)
    CHECK_FIELD(vocab_size);
    CHECK_FIELD(max_len);
    CHECK_FIELD(type_vocab_size);
    CHECK_FIELD(num_layers);
    CHECK_FIELD(hidden);
    CHECK_FIELD(num_heads);
    CHECK_FIELD(ffn);
    CHECK_FIELD(num_labels);
    CHECK_FIELD(mlm_head);
    CHECK_FIELD(dropout);
    CHECK_FIELD(ln_eps);
#undef CHECK_FIELD
}

static void round_trip(int num_labels, int mlm_head)
{
    codir_config cfg = io_config(num_labels, mlm_head);
    codir_model *m = codir_model_create(&cfg, 7), *loaded = NULL;
    char dir[512];
    float logits_a[3 * 3], logits_b[3 * 3], *mlm_a = NULL, *mlm_b = NULL;
    int i, rc;

    CHECK(m != NULL, "codir_model_create: %s", codir_last_error());
    if (!m || !make_temp_dir(dir, sizeof dir)) {
        CHECK(0, "cannot create a temporary folder");
        codir_model_free(m);
        return;
    }
    randomize(m, 1000u + (unsigned)num_labels * 10u + (unsigned)mlm_head);
    rc = codir_model_save(m, dir);
    CHECK(rc == CODIR_OK, "codir_model_save: %s", codir_last_error());
    loaded = codir_model_load(dir);
    CHECK(loaded != NULL, "codir_model_load: %s", codir_last_error());
    if (!loaded) goto done;

    check_same_config(&m->cfg, &loaded->cfg);
    CHECK(loaded->params.count == m->params.count, "%zu parameters, want %zu", loaded->params.count,
          m->params.count);
    CHECK(loaded->params.num_tensors == m->params.num_tensors, "%d tensors, want %d", loaded->params.num_tensors,
          m->params.num_tensors);
    if (loaded->params.count == m->params.count && loaded->params.num_tensors == m->params.num_tensors) {
        for (i = 0; i < m->params.num_tensors; i++) {
            const codir_tensor *a = &m->params.tensors[i], *b = &loaded->params.tensors[i];
            CHECK(strcmp(a->name, b->name) == 0, "tensor %d is %s, want %s", i, b->name, a->name);
            CHECK(a->numel == b->numel, "tensor %s has %zu elements, want %zu", a->name, b->numel, a->numel);
            CHECK(a->numel != b->numel || memcmp(a->data, b->data, a->numel * sizeof(float)) == 0,
                  "tensor %s differs bitwise after the round trip", a->name);
        }
    }

    if (mlm_head) {
        mlm_a = (float *)malloc(4 * (size_t)cfg.vocab_size * sizeof(float));
        mlm_b = (float *)malloc(4 * (size_t)cfg.vocab_size * sizeof(float));
    }
    rc = run_model(m, logits_a, mlm_a);
    CHECK(rc == CODIR_OK, "forward of the saved model: %s", codir_last_error());
    rc = run_model(loaded, logits_b, mlm_b);
    CHECK(rc == CODIR_OK, "forward of the loaded model: %s", codir_last_error());
    CHECK(memcmp(logits_a, logits_b, 3 * (size_t)num_labels * sizeof(float)) == 0,
          "logits differ after the round trip: %g vs %g", (double)logits_a[0], (double)logits_b[0]);
    if (mlm_a && mlm_b)
        CHECK(memcmp(mlm_a, mlm_b, 4 * (size_t)cfg.vocab_size * sizeof(float)) == 0,
              "masked-LM logits differ after the round trip");

done:
    free(mlm_a);
    free(mlm_b);
    codir_model_free(loaded);
    codir_model_free(m);
    remove_model_dir(dir);
}

static void test_round_trip_classifier(void) { round_trip(3, 0); }
static void test_round_trip_regression(void) { round_trip(1, 0); }
static void test_round_trip_mlm(void) { round_trip(2, 1); }

static void test_saved_folder_layout(void)
{
    codir_config cfg = io_config(1, 1);
    codir_model *m = codir_model_create(&cfg, 3);
    codir_safetensors *st = NULL;
    char dir[512], path[600];
    char *config = NULL;
    size_t length = 0;
    const codir_st_tensor *t;
    float *value = NULL;
    FILE *leftover;
    static const int64_t shape_12_12[2] = {12, 12}, shape_1_12[2] = {1, 12}, shape_23[1] = {23};
    int rc;

    if (!m || !make_temp_dir(dir, sizeof dir)) {
        CHECK(0, "cannot create a model or a temporary folder: %s", codir_last_error());
        codir_model_free(m);
        return;
    }
    randomize(m, 99);
    rc = codir_model_save(m, dir);
    CHECK(rc == CODIR_OK, "codir_model_save: %s", codir_last_error());

    /* config.json carries the Hugging Face keys */
    snprintf(path, sizeof path, "%s/config.json", dir);
    config = (char *)read_bytes(path, &length);
    CHECK(config != NULL, "cannot read %s", path);
    if (config) {
        static const char *const keys[] = {
            "\"architectures\": [\n    \"BertForSequenceClassification\"\n  ],", "\"model_type\": \"bert\",",
            "\"vocab_size\": 23\n", "\"hidden_size\": 12,", "\"num_hidden_layers\": 2,", "\"num_attention_heads\": 3,",
            "\"intermediate_size\": 20,", "\"max_position_embeddings\": 9,", "\"type_vocab_size\": 2,",
            "\"layer_norm_eps\": 1e-06,", "\"hidden_act\": \"gelu\",", "\"hidden_dropout_prob\": 0.15,",
            "\"attention_probs_dropout_prob\": 0.15,", "\"problem_type\": \"regression\",",
            "\"id2label\": {\n    \"0\": \"LABEL_0\"\n  },", "\"label2id\": {\n    \"LABEL_0\": 0\n  },"};
        size_t k;
        config[length] = '\0';
        for (k = 0; k < sizeof keys / sizeof keys[0]; k++)
            CHECK(strstr(config, keys[k]) != NULL, "config.json lacks %s:\n%s", keys[k], config);
    }

    /* model.safetensors: HF names, separate query/key/value, no tied decoder weight */
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    st = codir_safetensors_open(path);
    CHECK(st != NULL, "open %s: %s", path, codir_last_error());
    if (st) {
        CHECK(st->num_tensors == 5 + 16 * 2 + 4 + 5, "%d tensors, want %d", st->num_tensors, 5 + 16 * 2 + 4 + 5);
        check_metadata(st, "format", "pt");
        CHECK(codir_safetensors_find(st, "cls.predictions.decoder.weight") == NULL, "the tied decoder was written");
        check_entry(st, "bert.encoder.layer.1.attention.self.value.weight", CODIR_ST_F32, 2, shape_12_12, 576);
        check_entry(st, "classifier.weight", CODIR_ST_F32, 2, shape_1_12, 48);
        check_entry(st, "cls.predictions.bias", CODIR_ST_F32, 1, shape_23, 92);
        t = codir_safetensors_find(st, "bert.encoder.layer.1.attention.self.value.weight");
        value = (float *)malloc(144 * sizeof(float));
        if (t && value && codir_safetensors_read_f32(st, t->name, value, 144) == CODIR_OK)
            CHECK(memcmp(value, m->layers[1].qkv_w->data + 2 * 144, 144 * sizeof(float)) == 0,
                  "value.weight is not rows 24..35 of qkv_w");
        t = codir_safetensors_find(st, "bert.encoder.layer.0.attention.self.key.bias");
        if (t && value && codir_safetensors_read_f32(st, t->name, value, 12) == CODIR_OK)
            CHECK(memcmp(value, m->layers[0].qkv_b->data + 12, 12 * sizeof(float)) == 0,
                  "key.bias is not entries 12..23 of qkv_b");
        codir_safetensors_close(st);
    }
    snprintf(path, sizeof path, "%s/model.safetensors.tmp", dir);
    leftover = fopen(path, "rb");
    CHECK(leftover == NULL, "%s was left behind", path);
    if (leftover) fclose(leftover);
    snprintf(path, sizeof path, "%s/config.json.tmp", dir);
    leftover = fopen(path, "rb");
    CHECK(leftover == NULL, "%s was left behind", path);
    if (leftover) fclose(leftover);

    check_error("saving into a missing folder", codir_model_save(m, "/nonexistent/model"), CODIR_ERR_IO,
                "failed to create '/nonexistent/model/model.safetensors.tmp'");

    /* A NaN weight is rejected at load time with the tensor's name. */
    m->layers[1].ffn_down_b->data[3] = NAN;
    rc = codir_model_save(m, dir);
    CHECK(rc == CODIR_OK, "codir_model_save with a NaN weight: %s", codir_last_error());
    {
        codir_model *bad = codir_model_load(dir);
        CHECK(bad == NULL, "a model folder with a NaN weight loaded");
        CHECK(strstr(codir_last_error(), "\"bert.encoder.layer.1.output.dense.bias\" holds NaN at element 3") != NULL,
              "unexpected error for a NaN weight: %s", codir_last_error());
        codir_model_free(bad);
    }
    free(value);
    free(config);
    codir_model_free(m);
    remove_model_dir(dir);
}

/* ---- folders written by Python with Hugging Face names ---- */

static uint32_t fnv1a(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* The value make_safetensors.py stores at element i of tensor `name` of `dtype`. */
static float hf_value(const char *name, size_t i, int dtype)
{
    uint32_t h = fnv1a(name);
    if (dtype == CODIR_ST_F16) return (float)(h % 16) + (float)i / 64.0f;
    if (dtype == CODIR_ST_BF16) return (float)(h % 8) + (float)i / 32.0f;
    return (float)(h % 4096) + (float)i / 1024.0f;
}

/* Checks that got[n] contains tensor `name` of the fixture. */
static void check_hf(const char *name, const float *got, size_t n, int dtype)
{
    size_t i, bad = 0, first = 0;
    for (i = 0; i < n; i++) {
        if (got[i] != hf_value(name, i, dtype)) {
            if (!bad) first = i;
            bad++;
        }
    }
    CHECK(bad == 0, "%s: %zu of %zu values differ, first [%zu] = %g, want %g", name, bad, n, first, (double)got[first],
          (double)hf_value(name, first, dtype));
}

static void test_load_hf_classifier(void)
{
    static const char *const qkv[3] = {"query", "key", "value"};
    char dir[512], name[128];
    codir_model *m = codir_model_load(fixture(dir, sizeof dir, "hf_bert_cls"));
    codir_config want;
    const int C = 8, F = 12;
    int l, k;

    CHECK(m != NULL, "codir_model_load %s: %s", dir, codir_last_error());
    if (!m) return;
    want = codir_config_default();
    want.vocab_size = 11;
    want.max_len = 16;
    want.type_vocab_size = 2;
    want.hidden = 8;
    want.num_heads = 2;
    want.ffn = 12;
    want.num_layers = 2;
    want.num_labels = 3;
    want.mlm_head = 0;
    want.dropout = 0.1f;
    want.ln_eps = 1e-12f;
    check_same_config(&want, &m->cfg);

    /* single values by index */
    CHECK(m->tok_emb->data[5 * C + 3] == hf_value("bert.embeddings.word_embeddings.weight", 43, CODIR_ST_F32),
          "word embedding [5][3] is %g", (double)m->tok_emb->data[43]);
    CHECK(m->layers[1].qkv_w->data[C * C + 3 * C + 5] ==
              hf_value("bert.encoder.layer.1.attention.self.key.weight", 29, CODIR_ST_F32),
          "layer 1 key weight [3][5] is not qkv_w row 11");
    CHECK(m->layers[0].qkv_b->data[2 * C + 7] == hf_value("bert.encoder.layer.0.attention.self.value.bias", 7, CODIR_ST_F32),
          "layer 0 value bias [7] is not qkv_b [23]");
    CHECK(m->cls_w->data[2 * C + 7] == hf_value("classifier.weight", 23, CODIR_ST_F32), "classifier [2][7] differs");

    /* every tensor */
    check_hf("bert.embeddings.word_embeddings.weight", m->tok_emb->data, 11 * 8, CODIR_ST_F32);
    check_hf("bert.embeddings.position_embeddings.weight", m->pos_emb->data, 16 * 8, CODIR_ST_F32);
    check_hf("bert.embeddings.token_type_embeddings.weight", m->type_emb->data, 2 * 8, CODIR_ST_F32);
    check_hf("bert.embeddings.LayerNorm.weight", m->emb_ln_gamma->data, 8, CODIR_ST_F32);
    check_hf("bert.embeddings.LayerNorm.bias", m->emb_ln_beta->data, 8, CODIR_ST_F32);
    for (l = 0; l < 2; l++) {
        const codir_layer *ly = &m->layers[l];
        for (k = 0; k < 3; k++) {
            snprintf(name, sizeof name, "bert.encoder.layer.%d.attention.self.%s.weight", l, qkv[k]);
            check_hf(name, ly->qkv_w->data + k * C * C, (size_t)(C * C), CODIR_ST_F32);
            snprintf(name, sizeof name, "bert.encoder.layer.%d.attention.self.%s.bias", l, qkv[k]);
            check_hf(name, ly->qkv_b->data + k * C, (size_t)C, CODIR_ST_F32);
        }
        snprintf(name, sizeof name, "bert.encoder.layer.%d.attention.output.dense.weight", l);
        check_hf(name, ly->attn_out_w->data, (size_t)(C * C), CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.attention.output.dense.bias", l);
        check_hf(name, ly->attn_out_b->data, (size_t)C, CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.attention.output.LayerNorm.weight", l);
        check_hf(name, ly->ln1_gamma->data, (size_t)C, CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.attention.output.LayerNorm.bias", l);
        check_hf(name, ly->ln1_beta->data, (size_t)C, CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.intermediate.dense.weight", l);
        check_hf(name, ly->ffn_up_w->data, (size_t)(F * C), CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.intermediate.dense.bias", l);
        check_hf(name, ly->ffn_up_b->data, (size_t)F, CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.output.dense.weight", l);
        check_hf(name, ly->ffn_down_w->data, (size_t)(C * F), CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.output.dense.bias", l);
        check_hf(name, ly->ffn_down_b->data, (size_t)C, CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.output.LayerNorm.weight", l);
        check_hf(name, ly->ln2_gamma->data, (size_t)C, CODIR_ST_F32);
        snprintf(name, sizeof name, "bert.encoder.layer.%d.output.LayerNorm.bias", l);
        check_hf(name, ly->ln2_beta->data, (size_t)C, CODIR_ST_F32);
    }
    check_hf("bert.pooler.dense.weight", m->pool_w->data, 64, CODIR_ST_F32);
    check_hf("bert.pooler.dense.bias", m->pool_b->data, 8, CODIR_ST_F32);
    check_hf("classifier.weight", m->cls_w->data, 24, CODIR_ST_F32);
    check_hf("classifier.bias", m->cls_b->data, 3, CODIR_ST_F32);
    codir_model_free(m);
}

static void test_load_hf_mlm(void)
{
    char dir[512];
    codir_model *m = codir_model_load(fixture(dir, sizeof dir, "hf_bert_mlm"));
    codir_config want;
    const int C = 8;

    CHECK(m != NULL, "codir_model_load %s: %s", dir, codir_last_error());
    if (!m) return;
    want = codir_config_default();
    want.vocab_size = 13;
    want.max_len = 10;
    want.type_vocab_size = 1;
    want.hidden = 8;
    want.num_heads = 4;
    want.ffn = 16;
    want.num_layers = 1;
    want.num_labels = 1;
    want.mlm_head = 1;
    want.dropout = 0.25f;
    want.ln_eps = 1e-5f;
    check_same_config(&want, &m->cfg);

    /* old names gamma and beta */
    check_hf("bert.embeddings.LayerNorm.gamma", m->emb_ln_gamma->data, (size_t)C, CODIR_ST_F32);
    check_hf("bert.embeddings.LayerNorm.beta", m->emb_ln_beta->data, (size_t)C, CODIR_ST_F32);
    check_hf("bert.encoder.layer.0.output.LayerNorm.gamma", m->layers[0].ln2_gamma->data, (size_t)C, CODIR_ST_F32);
    check_hf("bert.encoder.layer.0.output.LayerNorm.beta", m->layers[0].ln2_beta->data, (size_t)C, CODIR_ST_F32);
    /* F16 and BF16 tensors */
    check_hf("bert.encoder.layer.0.attention.output.LayerNorm.weight", m->layers[0].ln1_gamma->data, (size_t)C,
             CODIR_ST_F16);
    check_hf("bert.encoder.layer.0.intermediate.dense.weight", m->layers[0].ffn_up_w->data, 16 * 8, CODIR_ST_F16);
    check_hf("bert.pooler.dense.bias", m->pool_b->data, (size_t)C, CODIR_ST_BF16);
    check_hf("cls.predictions.transform.LayerNorm.bias", m->mlm_ln_beta->data, (size_t)C, CODIR_ST_BF16);
    /* the rest of the masked-LM head; the bias came as cls.predictions.decoder.bias */
    check_hf("cls.predictions.transform.dense.weight", m->mlm_dense_w->data, 64, CODIR_ST_F32);
    check_hf("cls.predictions.transform.dense.bias", m->mlm_dense_b->data, (size_t)C, CODIR_ST_F32);
    check_hf("cls.predictions.transform.LayerNorm.weight", m->mlm_ln_gamma->data, (size_t)C, CODIR_ST_F32);
    check_hf("cls.predictions.decoder.bias", m->mlm_bias->data, 13, CODIR_ST_F32);
    check_hf("bert.embeddings.word_embeddings.weight", m->tok_emb->data, 13 * 8, CODIR_ST_F32);
    check_hf("classifier.weight", m->cls_w->data, (size_t)C, CODIR_ST_F32);
    CHECK(m->layers[0].qkv_w->data[2 * C * C + 1] ==
              hf_value("bert.encoder.layer.0.attention.self.value.weight", 1, CODIR_ST_F32),
          "value weight [0][1] is not qkv_w row 16");
    codir_model_free(m);
}

/* ---- model folders that must be rejected ---- */

/* Copies of the tensors of a file, for writing them back with changes. */
typedef struct tensor_copy {
    codir_st_write writes[128];
    float *values[128];
    char *names[128];
    float extra[2];
    int count;
} tensor_copy;

/* Copies every tensor of src except `drop` into c, and adds `extra` (of shape [2])
   when it is not NULL. Returns 0 when a read or an allocation fails. */
static int copy_tensors(tensor_copy *c, const codir_safetensors *src, const char *drop, const char *extra)
{
    int i;
    memset(c, 0, sizeof *c);
    for (i = 0; i < src->num_tensors && c->count < 127; i++) {
        const codir_st_tensor *t = &src->tensors[i];
        codir_st_write *w = &c->writes[c->count];
        int d;
        if (drop && strcmp(t->name, drop) == 0) continue;
        c->values[c->count] = (float *)malloc((t->numel + 1) * sizeof(float));
        c->names[c->count] = (char *)malloc(strlen(t->name) + 1);
        if (!c->values[c->count] || !c->names[c->count] ||
            codir_safetensors_read_f32(src, t->name, c->values[c->count], t->numel))
            return 0;
        strcpy(c->names[c->count], t->name);
        w->name = c->names[c->count];
        w->ndim = t->ndim;
        for (d = 0; d < t->ndim; d++) w->shape[d] = t->shape[d];
        w->data = c->values[c->count];
        c->count++;
    }
    if (extra) {
        c->writes[c->count].name = extra;
        c->writes[c->count].ndim = 1;
        c->writes[c->count].shape[0] = 2;
        c->writes[c->count].data = c->extra;
        c->count++;
    }
    return 1;
}

static void free_copy(tensor_copy *c)
{
    int i;
    for (i = 0; i < 128; i++) {
        free(c->values[i]);
        free(c->names[i]);
    }
}

/* Saves a model, rewrites its weights without `drop` and with `extra`, and checks that
   loading fails with a message containing `message`. */
static void check_load_rejects(const codir_config *cfg, const char *drop, const char *extra, const char *message)
{
    codir_model *m = codir_model_create(cfg, 5), *loaded;
    codir_safetensors *st = NULL;
    tensor_copy copy;
    char dir[512], path[600];
    int ok;
    memset(&copy, 0, sizeof copy);
    if (!m || !make_temp_dir(dir, sizeof dir)) {
        CHECK(0, "cannot create a model or a temporary folder: %s", codir_last_error());
        codir_model_free(m);
        return;
    }
    ok = codir_model_save(m, dir) == CODIR_OK;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (ok) st = codir_safetensors_open(path);
    ok = st && copy_tensors(&copy, st, drop, extra);
    codir_safetensors_close(st);
    ok = ok && codir_safetensors_write(path, copy.writes, copy.count, NULL, 0) == CODIR_OK;
    CHECK(ok, "cannot prepare the folder: %s", codir_last_error());
    loaded = codir_model_load(dir);
    CHECK(loaded == NULL, "a folder without %s and with %s was accepted", drop ? drop : "nothing",
          extra ? extra : "nothing");
    CHECK(loaded || strstr(codir_last_error(), message), "message \"%s\" lacks \"%s\"", codir_last_error(), message);
    codir_model_free(loaded);
    free_copy(&copy);
    codir_model_free(m);
    remove_model_dir(dir);
}

static void test_load_rejects_tensor_sets(void)
{
    codir_config cls = io_config(2, 0), mlm = io_config(2, 1);
    check_load_rejects(&cls, "bert.encoder.layer.1.attention.self.key.bias", NULL,
                       "tensor \"bert.encoder.layer.1.attention.self.key.bias\" is missing");
    check_load_rejects(&cls, "classifier.weight", NULL, "tensor \"classifier.weight\" is missing");
    check_load_rejects(&cls, NULL, "bert.encoder.layer.2.output.dense.bias",
                       "unexpected tensor \"bert.encoder.layer.2.output.dense.bias\"");
    check_load_rejects(&cls, NULL, "cls.seq_relationship.bias", "unexpected tensor \"cls.seq_relationship.bias\"");
    /* a classifier file with a stray decoder weight: no masked-LM head, so unexpected */
    check_load_rejects(&cls, NULL, "cls.predictions.decoder.weight", "unexpected tensor");
    check_load_rejects(&mlm, "cls.predictions.transform.LayerNorm.bias", NULL,
                       "tensor \"cls.predictions.transform.LayerNorm.bias\" is missing");
    check_load_rejects(&mlm, "cls.predictions.bias", NULL, "tensor \"cls.predictions.bias\" is missing");
    /* gamma beside weight is ambiguous (the extra has shape [2], not [12], but the
       ambiguity is found first) */
    check_load_rejects(&cls, NULL, "bert.embeddings.LayerNorm.gamma",
                       "both \"bert.embeddings.LayerNorm.weight\" and its old name \"bert.embeddings.LayerNorm.gamma\"");
}

/* Writes folder dir from the hf_bert_mlm fixture with tensor `name` multiplied by
   scale. With bias_scale > 0 it adds cls.predictions.bias beside the fixture's
   cls.predictions.decoder.bias, equal to it times bias_scale. */
static int write_mlm_variant(const char *dir, const char *name, float scale, float bias_scale)
{
    char source[512], path[600];
    codir_safetensors *st = codir_safetensors_open(fixture(source, sizeof source, "hf_bert_mlm/model.safetensors"));
    tensor_copy copy;
    char *config;
    size_t length = 0;
    int ok, i;
    if (!st) return 0;
    ok = copy_tensors(&copy, st, NULL, bias_scale > 0.0f ? "cls.predictions.bias" : NULL);
    codir_safetensors_close(st);
    if (ok && bias_scale > 0.0f) {
        /* copy_tensors gave the extra tensor shape [2]; make it the [13] decoder bias */
        codir_st_write *extra = &copy.writes[copy.count - 1];
        float *bias = (float *)malloc(13 * sizeof(float));
        int k;
        ok = bias != NULL;
        for (i = 0; ok && i < copy.count - 1; i++) {
            if (strcmp(copy.writes[i].name, "cls.predictions.decoder.bias") != 0) continue;
            for (k = 0; k < 13; k++) bias[k] = copy.values[i][k] * bias_scale;
        }
        extra->shape[0] = 13;
        extra->data = bias;
        copy.values[127] = bias; /* freed with the copy */
    }
    for (i = 0; ok && i < copy.count; i++) {
        size_t k, n = 1;
        int d;
        if (strcmp(copy.writes[i].name, name) != 0) continue;
        for (d = 0; d < copy.writes[i].ndim; d++) n *= (size_t)copy.writes[i].shape[d];
        for (k = 0; k < n; k++) copy.values[i][k] *= scale;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ok = ok && codir_safetensors_write(path, copy.writes, copy.count, NULL, 0) == CODIR_OK;
    free_copy(&copy);
    config = (char *)read_bytes(fixture(source, sizeof source, "hf_bert_mlm/config.json"), &length);
    snprintf(path, sizeof path, "%s/config.json", dir);
    ok = ok && config && write_bytes(path, config, length);
    free(config);
    return ok;
}

static void test_load_checks_tied_decoder(void)
{
    char dir[512];
    codir_model *m;
    if (!make_temp_dir(dir, sizeof dir)) {
        CHECK(0, "cannot create a temporary folder");
        return;
    }
    CHECK(write_mlm_variant(dir, "cls.predictions.decoder.weight", 1.0f, 0.0f), "cannot write the folder: %s",
          codir_last_error());
    m = codir_model_load(dir);
    CHECK(m != NULL, "the unchanged copy was rejected: %s", codir_last_error());
    codir_model_free(m);

    CHECK(write_mlm_variant(dir, "cls.predictions.decoder.weight", 2.0f, 0.0f), "cannot write the folder: %s",
          codir_last_error());
    m = codir_model_load(dir);
    CHECK(m == NULL, "an untied decoder was accepted");
    CHECK(strstr(codir_last_error(), "cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight"),
          "an untied decoder: message \"%s\"", codir_last_error());
    codir_model_free(m);

    /* The decoder bias under both of its names: equal copies load, different ones do not. */
    CHECK(write_mlm_variant(dir, "", 1.0f, 1.0f), "cannot write the folder: %s", codir_last_error());
    m = codir_model_load(dir);
    CHECK(m != NULL, "equal decoder biases were rejected: %s", codir_last_error());
    if (m) check_hf("cls.predictions.decoder.bias", m->mlm_bias->data, 13, CODIR_ST_F32);
    codir_model_free(m);
    CHECK(write_mlm_variant(dir, "", 1.0f, 3.0f), "cannot write the folder: %s", codir_last_error());
    m = codir_model_load(dir);
    CHECK(m == NULL, "different decoder biases were accepted");
    CHECK(strstr(codir_last_error(), "cls.predictions.decoder.bias differs from cls.predictions.bias"),
          "different decoder biases: message \"%s\"", codir_last_error());
    codir_model_free(m);
    remove_model_dir(dir);
}

/* Writes `config` as dir/config.json beside a saved model and returns the load error. */
static const char *load_with_config(const char *dir, const char *config, codir_model **loaded)
{
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_bytes(path, config, strlen(config));
    codir_clear_error();
    *loaded = codir_model_load(dir);
    return codir_last_error();
}

static void test_load_rejects_configs(void)
{
    /* The saved model has V 23, P 9, TV 2, L 2, C 12, NH 3, F 20 and 2 labels. */
#define SIZES "\"vocab_size\": 23, \"max_position_embeddings\": 9, \"type_vocab_size\": 2, \"num_hidden_layers\": 2, "
#define SHAPE "\"hidden_size\": 12, \"intermediate_size\": 20, "
    static const struct {
        const char *config, *message;
    } cases[] = {
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"hidden_act\": \"relu\"}",
         "hidden_act \"relu\" is not supported: codir implements only \"gelu\""},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"hidden_act\": \"gelu_new\"}", "hidden_act \"gelu_new\""},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"model_type\": \"roberta\"}", "model_type \"roberta\""},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"position_embedding_type\": \"relative_key\"}",
         "position_embedding_type \"relative_key\""},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"problem_type\": \"multi_label_classification\"}",
         "problem_type \"multi_label_classification\" is not supported"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"problem_type\": \"regression\"}",
         "problem_type \"regression\" does not fit 2 labels"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"num_labels\": 3, \"id2label\": {\"0\": \"a\", \"1\": \"b\"}}",
         "num_labels 3 contradicts the 2 entries of id2label"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"id2label\": {\"0\": \"a\", \"2\": \"b\"}}",
         "id2label key \"2\" at byte"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 5}", "num_heads 5 must be positive and divide hidden 12"},
        {"{" SIZES SHAPE "\"num_attention_heads\": \"3\"}", "num_attention_heads at byte 162 must be an integer"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3.0}", "num_attention_heads at byte 162 must be an integer"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"hidden_dropout_prob\": 1}", "hidden_dropout_prob"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"layer_norm_eps\": 0}", "layer_norm_eps must be positive"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"hidden_act\": null, \"hidden_act\": \"gelu\"}",
         "this key repeats"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3", "the object that starts here is not closed"},
        {"[]", "must hold a JSON object"},
        /* shapes that do not match the weights */
        {"{" SIZES "\"hidden_size\": 12, \"intermediate_size\": 24, \"num_attention_heads\": 3}",
         "tensor \"bert.encoder.layer.0.intermediate.dense.weight\" has shape [20, 12], but config.json implies [24, 12]"},
        {"{\"vocab_size\": 24, \"max_position_embeddings\": 9, \"type_vocab_size\": 2, \"num_hidden_layers\": 2, "
         SHAPE "\"num_attention_heads\": 3}",
         "tensor \"bert.embeddings.word_embeddings.weight\" has shape [23, 12], but config.json implies [24, 12]"},
        {"{" SIZES SHAPE "\"num_attention_heads\": 3, \"num_labels\": 3}",
         "tensor \"classifier.weight\" has shape [2, 12], but config.json implies [3, 12]"},
        {"{\"vocab_size\": 23, \"max_position_embeddings\": 9, \"type_vocab_size\": 2, \"num_hidden_layers\": 3, "
         SHAPE "\"num_attention_heads\": 3}",
         "tensor \"bert.encoder.layer.2.attention.self.query.weight\" is missing"},
        {"{\"vocab_size\": 23, \"max_position_embeddings\": 9, \"type_vocab_size\": 2, \"num_hidden_layers\": 1, "
         SHAPE "\"num_attention_heads\": 3}",
         "unexpected tensor \"bert.encoder.layer.1."},
    };
#undef SIZES
#undef SHAPE
    codir_config cfg = io_config(2, 0);
    codir_model *m = codir_model_create(&cfg, 5), *loaded;
    char dir[512];
    size_t i;
    if (!m || !make_temp_dir(dir, sizeof dir) || codir_model_save(m, dir) != CODIR_OK) {
        CHECK(0, "cannot save a model to a temporary folder: %s", codir_last_error());
        codir_model_free(m);
        return;
    }
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *message = load_with_config(dir, cases[i].config, &loaded);
        CHECK(loaded == NULL, "case %zu was accepted: %s", i, cases[i].config);
        CHECK(loaded || strstr(message, cases[i].message), "case %zu: message \"%s\" lacks \"%s\"", i, message,
              cases[i].message);
        CHECK(loaded || strstr(message, dir), "case %zu: message \"%s\" does not name the folder", i, message);
        codir_model_free(loaded);
    }

    /* A minimal config is accepted: num_labels in place of id2label, unknown keys, no
       hidden_act, and 4 heads where the model had 3, since weights do not fix the heads. */
    load_with_config(dir, "{" "\"vocab_size\": 23, \"max_position_embeddings\": 9, \"type_vocab_size\": 2, "
                     "\"num_hidden_layers\": 2, \"hidden_size\": 12, \"intermediate_size\": 20, "
                     "\"num_attention_heads\": 4, \"num_labels\": 2, \"unknown\": {\"x\": [1, 2.5e3, null]}, "
                     "\"layer_norm_eps\": 1e-6}",
                     &loaded);
    CHECK(loaded != NULL, "a minimal config was rejected: %s", codir_last_error());
    if (loaded) {
        CHECK(loaded->cfg.num_heads == 4, "%d heads, want the 4 of config.json", loaded->cfg.num_heads);
        CHECK(loaded->cfg.num_labels == 2, "%d labels, want 2", loaded->cfg.num_labels);
        CHECK(loaded->cfg.dropout == 0.1f, "dropout %g, want the default 0.1", (double)loaded->cfg.dropout);
    }
    codir_model_free(loaded);
    codir_model_free(m);
    remove_model_dir(dir);
    CHECK(codir_model_load("/nonexistent/model") == NULL, "a missing folder was accepted");
    CHECK(strstr(codir_last_error(), "failed to open '/nonexistent/model/config.json'"), "a missing folder: message \"%s\"",
          codir_last_error());
}

static void test_config_round_trip(void)
{
    codir_config cfg = io_config(12, 0), back;
    char path[512];
    int rc;
    cfg.dropout = 0.1f;
    cfg.ln_eps = 1e-12f;
    temp_name(path, sizeof path, ".json");
    rc = codir_config_save(&cfg, path);
    CHECK(rc == CODIR_OK, "codir_config_save: %s", codir_last_error());
    memset(&back, 0, sizeof back);
    rc = codir_config_load(path, &back);
    CHECK(rc == CODIR_OK, "codir_config_load: %s", codir_last_error());
    check_same_config(&cfg, &back);
    {
        size_t length = 0;
        char *text = (char *)read_bytes(path, &length);
        if (text) {
            text[length] = '\0';
            /* Python's sort_keys orders "10" before "2" */
            CHECK(strstr(text, "\"1\": \"LABEL_1\",\n    \"10\": \"LABEL_10\",\n    \"11\": \"LABEL_11\",\n    \"2\""),
                  "id2label is not in sorted-key order:\n%s", text);
            CHECK(strstr(text, "\"layer_norm_eps\": 1e-12,"), "layer_norm_eps is not 1e-12:\n%s", text);
            CHECK(strstr(text, "\"hidden_dropout_prob\": 0.1,"), "hidden_dropout_prob is not 0.1:\n%s", text);
        }
        free(text);
    }
    cfg.num_heads = 5;
    rc = codir_config_save(&cfg, path);
    CHECK(rc == CODIR_ERR_INVALID, "an invalid config was saved: rc %d", rc);
    remove(path);
}

const test_case tests_io[] = {
    {"io safetensors reads python dtypes", test_read_python_dtypes},
    {"io safetensors write matches python", test_write_matches_python},
    {"io safetensors write matches official", test_write_matches_official},
    {"io safetensors write read round trip", test_write_read_round_trip},
    {"io safetensors rejects every truncation", test_rejects_every_truncation},
    {"io safetensors survives byte changes", test_survives_byte_changes},
    {"io safetensors rejects bad headers", test_rejects_bad_headers},
    {"io safetensors rejects bad writes", test_rejects_bad_writes},
    {"io model round trip classifier", test_round_trip_classifier},
    {"io model round trip regression", test_round_trip_regression},
    {"io model round trip mlm head", test_round_trip_mlm},
    {"io model saved folder layout", test_saved_folder_layout},
    {"io model loads hf classifier", test_load_hf_classifier},
    {"io model loads hf mlm regression", test_load_hf_mlm},
    {"io model rejects tensor sets", test_load_rejects_tensor_sets},
    {"io model checks tied decoder", test_load_checks_tied_decoder},
    {"io model rejects bad configs", test_load_rejects_configs},
    {"io config round trip", test_config_round_trip},
};
const int tests_io_count = (int)(sizeof tests_io / sizeof tests_io[0]);
