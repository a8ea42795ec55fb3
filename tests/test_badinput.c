/* The bad-input catalogue: every malformed file or out-of-range option that codir.h
   must reject, each with the reason it must give.

   Each table row is one case and the substring that codir_last_error() must contain
   afterwards. An "@" in that substring stands for the path of the file under test, so
   a row checks the "path:line:" prefix (or the tensor or option name) and the key
   phrase at once.
   A few inputs that look bad are accepted by design (duplicate vocabulary tokens,
   invalid UTF-8 in a sentence, a 1 MB line); their tests check the documented
   behaviour instead. Files are written to a new folder under $TMPDIR (or /tmp) and
   removed by the test that wrote them. */
#define _POSIX_C_SOURCE 200809L /* mkdir, for the temporary folders */
#include "check.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(_WIN32)
#include <direct.h>
#define bad_mkdir(path) (_mkdir(path) == 0)
#define bad_rmdir(path) _rmdir(path)
#else
#include <sys/stat.h>
#define bad_mkdir(path) (mkdir(path, 0700) == 0)
#define bad_rmdir(path) remove(path)
#endif

/* ---- temporary folders and files ---- */

/* A folder of its own for one test, and the files the test wrote into it. */
typedef struct bad_dir {
    char path[400];
    char files[8][480];
    int count;
} bad_dir;

/* Creates a new folder under $TMPDIR (or /tmp), named from the time, a counter and
   the address of a static object (which differs between runs under address space
   layout randomization). Returns 1 on success. */
static int bad_dir_make(bad_dir *dir)
{
    static unsigned long counter;
    const char *tmp = getenv("TMPDIR");
    int attempt;
    if (!tmp || !tmp[0]) tmp = "/tmp";
    memset(dir, 0, sizeof *dir);
    for (attempt = 0; attempt < 100; attempt++) {
        counter++;
        snprintf(dir->path, sizeof dir->path, "%s/codir_bad_%lx_%lx_%lu", tmp, (unsigned long)time(NULL),
                 (unsigned long)((uintptr_t)&counter >> 4), counter);
        if (bad_mkdir(dir->path)) return 1;
    }
    CHECK(0, "cannot create a temporary folder under %s", tmp);
    return 0;
}

/* Returns the path of `name` in the folder and remembers it for bad_dir_remove. */
static const char *bad_path(bad_dir *dir, const char *name)
{
    int i;
    char path[480];
    snprintf(path, sizeof path, "%s/%s", dir->path, name);
    for (i = 0; i < dir->count; i++)
        if (strcmp(dir->files[i], path) == 0) return dir->files[i];
    if (dir->count == (int)(sizeof dir->files / sizeof dir->files[0])) {
        CHECK(0, "bad_path: more than %d files in one folder", dir->count);
        return dir->files[dir->count - 1];
    }
    memcpy(dir->files[dir->count], path, sizeof path);
    return dir->files[dir->count++];
}

/* Writes data[length] to `name` in the folder and returns its path. */
static const char *bad_write(bad_dir *dir, const char *name, const void *data, size_t length)
{
    const char *path = bad_path(dir, name);
    FILE *file = fopen(path, "wb");
    int ok = file != NULL;
    if (file && length) ok = fwrite(data, 1, length, file) == length;
    if (file && fclose(file) != 0) ok = 0;
    CHECK(ok, "cannot write %s", path);
    return path;
}

/* Removes the files written into the folder (and their .tmp siblings), then the folder. */
static void bad_dir_remove(bad_dir *dir)
{
    int i;
    for (i = 0; i < dir->count; i++) {
        char tmp[500];
        snprintf(tmp, sizeof tmp, "%s.tmp", dir->files[i]);
        remove(dir->files[i]);
        remove(tmp);
    }
    bad_rmdir(dir->path);
}

/* Checks that the last failure left a reason containing `expected`, with each "@" in
   it replaced by `path`. */
#define CHECK_REASON(what, path, expected) check_reason(__FILE__, __LINE__, what, path, expected)
static void check_reason(const char *file, int line, const char *what, const char *path, const char *expected)
{
    char want[1024];
    size_t n = 0;
    const char *e, *reason = codir_last_error();
    for (e = expected; *e && n < sizeof want - 1; e++) {
        if (*e == '@' && path) {
            size_t k = strlen(path);
            if (k > sizeof want - 1 - n) k = sizeof want - 1 - n;
            memcpy(want + n, path, k);
            n += k;
        } else {
            want[n++] = *e;
        }
    }
    want[n] = '\0';
    if (!strstr(reason, want)) check_fail(file, line, "%s: reason \"%s\" lacks \"%s\"", what, reason, want);
}

/* ---- TSV files ---- */

/* One malformed TSV file for codir_dataset_load_tsv. */
typedef struct tsv_case {
    const char *name;
    const char *content;
    size_t length;          /* bytes of content, or 0 for strlen(content) */
    const char *expected;   /* substring of the reason, with "@" for the file's path */
} tsv_case;

static const tsv_case tsv_cases[] = {
    {"missing column", "sentence\tlabel\ngood film\t1\nbad film\n", 0,
     "@:3: expected 2 tab-separated fields, found 1; a sentence must not contain a tab"},
    {"extra column", "sentence\tlabel\ngood\t1\nbad\tfilm\t0\n", 0,
     "@:3: expected 2 tab-separated fields, found 3; a sentence must not contain a tab"},
    {"extra column in a pair file", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\te\tentailment\n",
     0, "@:3: expected 4 tab-separated fields, found 5"},
    {"CoLA row with a field missing", "gj04\t1\t\tfine\ngj04\t0\t*\n", 0, "@:2: expected 4 tab-separated fields, found 3"},
    {"unknown class name", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tneutral\n", 0,
     "@:3: invalid label 'neutral'; expected one of the label names given"},
    {"empty class name", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t\n", 0,
     "@:2: invalid label ''; expected one of the label names given"},
    {"float label for classification", "sentence\tlabel\ngood\t1\nbad\t1.5\n", 0,
     "@:3: invalid label '1.5'; labels must be integers >= 0"},
    {"negative label", "sentence\tlabel\ngood\t-1\n", 0, "@:2: invalid label '-1'; labels must be integers >= 0"},
    {"empty label", "sentence\tlabel\ngood\t\n", 0, "@:2: invalid label ''; labels must be integers >= 0"},
    {"label with a space", "sentence\tlabel\ngood\t 1\n", 0, "@:2: invalid label ' 1'; labels must be integers >= 0"},
    {"label INT_MAX", "sentence\tlabel\ngood\t2147483647\n", 0,
     "@:2: invalid label '2147483647'; labels must be integers >= 0"},
    {"label far above INT_MAX", "sentence\tlabel\ngood\t99999999999999999999999\n", 0,
     "@:2: invalid label '99999999999999999999999'; labels must be integers >= 0"},
    {"MRPC quality not a number", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\nyes\t1\t2\ta\tb\n", 0,
     "@:2: invalid label 'yes'; labels must be integers >= 0"},
    {"regression score not a number", "sentence1\tsentence2\tscore\na\tb\t4.2\nc\td\thigh\n", 0,
     "@:3: invalid label 'high'; regression labels must be finite numbers"},
    {"regression score NaN", "sentence1\tsentence2\tscore\na\tb\tnan\n", 0,
     "@:2: invalid label 'nan'; regression labels must be finite numbers"},
    {"regression score infinite", "sentence1\tsentence2\tscore\na\tb\t-inf\n", 0,
     "@:2: invalid label '-inf'; regression labels must be finite numbers"},
    {"regression score beyond float", "sentence1\tsentence2\tscore\na\tb\t1e39\n", 0,
     "@:2: invalid label '1e39'; regression labels must be finite numbers"},
    {"regression score with trailing text", "sentence1\tsentence2\tscore\na\tb\t3.5x\n", 0,
     "@:2: invalid label '3.5x'; regression labels must be finite numbers"},
    {"empty file", "", 0, "@ is empty; expected a header line naming the columns"},
    {"only line breaks", "\r\n\n\n", 0, "@ is empty; expected a header line naming the columns"},
    {"only a byte order mark", "\xEF\xBB\xBF", 0, "@ is empty; expected a header line naming the columns"},
    {"header only", "sentence\tlabel\n", 0, "@ has a header but no rows"},
    {"header only without a line break", "sentence\tlabel", 0, "@ has a header but no rows"},
    {"pair header only", "index\tsentence1\tsentence2\tlabel\r\n", 0, "@ has a header but no rows"},
    {"no label column", "sentence\tscore\ngood\t1\n", 0, "@:1: the header has no column named 'label'"},
    {"no text column", "text\tlabel\ngood\t1\n", 0, "@:1: the header has no column named 'sentence'"},
    {"column named twice", "sentence\tsentence\tlabel\na\tb\t1\n", 0, "@:1: the header names the column 'sentence' twice"},
    {"empty line between rows", "sentence\tlabel\ngood\t1\n\nbad\t0\n", 0, "@:3: empty line between rows; remove it"},
    {"empty CRLF line between rows", "sentence\tlabel\r\ngood\t1\r\n\r\nbad\t0\r\n", 0,
     "@:3: empty line between rows; remove it"},
    {"NUL byte in a sentence", "sentence\tlabel\ngood\t1\nba\0d\t0\n", 29,
     "@:3: the row contains a NUL byte; the file must be UTF-8 text"},
    {"NUL byte in a label", "sentence\tlabel\ngood\t1\0\n", 23, "@:2: the row contains a NUL byte"},
    {"NUL byte in the header", "sent\0ence\tlabel\ngood\t1\n", 23, "@:1: the header has no column named 'sentence'"},
    {"UTF-16 file", "\xFF\xFEs\0e\0n\0t\0e\0n\0c\0e\0\t\0l\0a\0b\0e\0l\0\n\0", 32,
     "@:1: the header has no column named 'sentence'"},
};

static void test_tsv_catalogue(void)
{
    bad_dir dir;
    size_t i;
    if (!bad_dir_make(&dir)) return;
    for (i = 0; i < sizeof tsv_cases / sizeof tsv_cases[0]; i++) {
        const tsv_case *c = &tsv_cases[i];
        const char *path = bad_write(&dir, "case.tsv", c->content, c->length ? c->length : strlen(c->content));
        codir_dataset *d;
        codir_clear_error();
        d = codir_dataset_load_tsv(path);
        CHECK(d == NULL, "%s: the file was accepted", c->name);
        CHECK_REASON(c->name, path, c->expected);
        codir_dataset_free(d);
    }
    bad_dir_remove(&dir);
}

static void test_tsv_missing_file(void)
{
    bad_dir dir;
    const char *path;
    codir_tsv_options o = codir_tsv_options_default();
    if (!bad_dir_make(&dir)) return;
    path = bad_path(&dir, "absent.tsv");
    CHECK(codir_dataset_load_tsv(path) == NULL, "a missing file was accepted");
    CHECK_REASON("missing file", path, "failed to open TSV file '@'");
    CHECK(codir_dataset_load_tsv_opts(path, &o) == NULL, "a missing file was accepted");
    CHECK_REASON("missing file, explicit options", path, "failed to open TSV file '@'");
    CHECK(codir_dataset_load_tsv(dir.path) == NULL, "a folder was accepted as a TSV file");
    CHECK_REASON("folder instead of a file", dir.path, "TSV file '@'");
    bad_dir_remove(&dir);
}

/* Option errors of codir_dataset_load_tsv_opts, caught before or at the header. */
static void test_tsv_bad_options(void)
{
    static const char *const duplicated[2] = {"yes", "yes"};
    bad_dir dir;
    const char *path;
    codir_tsv_options o;
    if (!bad_dir_make(&dir)) return;
    path = bad_write(&dir, "two.tsv", "sentence\tlabel\ngood\t1\n", 21);

    o = codir_tsv_options_default();
    o.label_kind = (codir_label_kind)7;
    CHECK(codir_dataset_load_tsv_opts(path, &o) == NULL, "label_kind 7 was accepted");
    CHECK_REASON("label_kind 7", path, "@: label_kind is 7; use a CODIR_LABEL_* value");

    o = codir_tsv_options_default();
    o.label_names = duplicated;
    o.label_name_count = 2;
    CHECK(codir_dataset_load_tsv_opts(path, &o) == NULL, "label_names with integer labels was accepted");
    CHECK_REASON("label_names with CODIR_LABEL_IDS", path, "@: label_names needs label_kind CODIR_LABEL_NAMES");

    o.label_kind = CODIR_LABEL_NAMES;
    CHECK(codir_dataset_load_tsv_opts(path, &o) == NULL, "a label name listed twice was accepted");
    CHECK_REASON("label name twice", path, "@: label name 'yes' is listed twice");

    o = codir_tsv_options_default();
    o.has_header = 0;
    o.text_a = o.label = NULL;
    o.label_index = 1;
    CHECK(codir_dataset_load_tsv_opts(path, &o) == NULL, "no text column was accepted");
    CHECK_REASON("no text column", path, "@: no text column given; set its name (with a header) or its index");

    o.text_a_index = 0;
    o.label_index = 5;
    CHECK(codir_dataset_load_tsv_opts(path, &o) == NULL, "label column 5 of 2 was accepted");
    CHECK_REASON("label column index out of range", path, "@:1: the label column index is 5 but the line has 2 fields");

    o = codir_tsv_options_default();
    CHECK(codir_dataset_load_tsv_opts(NULL, &o) == NULL, "a NULL path was accepted");
    CHECK_REASON("NULL path", NULL, "codir_dataset_load_tsv_opts: path or options is NULL");
    CHECK(codir_dataset_load_tsv(NULL) == NULL, "a NULL path was accepted");
    CHECK_REASON("NULL path", NULL, "codir_dataset_load_tsv: path is NULL");
    bad_dir_remove(&dir);
}

/* A 1 MB sentence is read whole: the reader has no line limit, and encoding cuts it
   to max_len. A 1 MB label is rejected with only its first 40 bytes quoted. */
static void test_tsv_megabyte_line(void)
{
    enum { LINE = 1 << 20 };
    static const char *const corpus[1] = {"word"};
    bad_dir dir;
    char *content = (char *)malloc(LINE + 64);
    const char *path;
    codir_dataset *d;
    codir_vocab *vocab = codir_vocab_build(corpus, 1, 20, 0, 1);
    size_t n, i, sentence_bytes;
    CHECK(content != NULL, "setup failed: out of memory");
    CHECK(vocab != NULL, "setup failed: %s", codir_last_error());
    if (!content || !vocab || !bad_dir_make(&dir)) {
        free(content);
        codir_vocab_free(vocab);
        return;
    }

    /* "sentence\tlabel\n" then "word word ... word\t1\n" of 1 MB. */
    n = (size_t)sprintf(content, "sentence\tlabel\n");
    for (i = 0; i + 5 <= LINE; i += 5) {
        memcpy(content + n, "word ", 5);
        n += 5;
    }
    sentence_bytes = n - 15;
    memcpy(content + n, "\t1\n", 3);
    n += 3;
    path = bad_write(&dir, "long_sentence.tsv", content, n);
    d = codir_dataset_load_tsv(path);
    CHECK(d != NULL, "a 1 MB sentence was rejected: %s", codir_last_error());
    if (d) {
        int ids[16];
        CHECK(d->count == 1, "%d examples, expected 1", d->count);
        CHECK(strlen(d->texts[0]) == sentence_bytes, "the 1 MB sentence has %zu bytes, expected %zu",
              strlen(d->texts[0]), sentence_bytes);
        CHECK(codir_encode(vocab, d->texts[0], ids, 16) == 16, "encoding the 1 MB sentence did not fill max_len 16");
        codir_dataset_free(d);
    }

    /* "sentence\tlabel\n" then "good\t111...1\n" with a 1 MB label. */
    n = (size_t)sprintf(content, "sentence\tlabel\ngood\t");
    memset(content + n, '1', LINE);
    n += LINE;
    content[n++] = '\n';
    path = bad_write(&dir, "long_label.tsv", content, n);
    codir_clear_error();
    CHECK(codir_dataset_load_tsv(path) == NULL, "a 1 MB label was accepted");
    CHECK_REASON("1 MB label", path, "@:2: invalid label '1111111111111111111111111111111111111111'; labels must be");
    free(content);
    codir_vocab_free(vocab);
    bad_dir_remove(&dir);
}

/* Invalid UTF-8 is not a TSV error: the reader keeps the bytes, and the tokenizer
   treats each invalid byte as U+FFFD, which it drops without splitting the word (the
   documented behaviour of text_api.h). */
static void test_tsv_invalid_utf8(void)
{
    static const char content[] = "sentence\tlabel\nab\xFF" "cd \xC0\xAF" "ef \xED\xA0\x80 gh\xE2\x82\t1\n";
    static const char *const corpus[2] = {"abcd ef gh", "ab cd"};
    bad_dir dir;
    const char *path;
    codir_dataset *d;
    codir_vocab *vocab = codir_vocab_build(corpus, 2, 40, 0, 1);
    CHECK(vocab != NULL, "setup failed: %s", codir_last_error());
    if (!vocab || !bad_dir_make(&dir)) {
        codir_vocab_free(vocab);
        return;
    }
    path = bad_write(&dir, "utf8.tsv", content, sizeof content - 1);
    d = codir_dataset_load_tsv(path);
    CHECK(d != NULL, "invalid UTF-8 in a sentence was rejected: %s", codir_last_error());
    if (d) {
        int got[16], want[16], n_got, n_want, i;
        CHECK(strcmp(d->texts[0], "ab\xFF" "cd \xC0\xAF" "ef \xED\xA0\x80 gh\xE2\x82") == 0,
              "the sentence's bytes were changed");
        n_got = codir_tokenize(vocab, d->texts[0], got, 16);
        n_want = codir_tokenize(vocab, "abcd ef gh", want, 16);
        CHECK(n_got == n_want, "invalid bytes: %d pieces, but %d without them", n_got, n_want);
        for (i = 0; i < n_got && i < n_want && i < 16; i++)
            CHECK(got[i] == want[i], "piece %d is %d, but %d without the invalid bytes", i, got[i], want[i]);
        codir_dataset_free(d);
    }
    codir_vocab_free(vocab);
    bad_dir_remove(&dir);
}

/* ---- vocab.txt ---- */

/* One vocab.txt that codir_vocab_load must reject. */
typedef struct vocab_case {
    const char *name;
    const char *content;
    size_t length;          /* bytes of content, or 0 for strlen(content) */
    const char *expected;   /* substring of the reason, with "@" for the file's path */
} vocab_case;

static const vocab_case vocab_cases[] = {
    {"no [PAD]", "[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n", 0,
     "@: missing special token [PAD]; a BERT vocabulary must contain [PAD], [UNK], [CLS], [SEP] and [MASK], one per line"},
    {"no [UNK]", "[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n", 0, "@: missing special token [UNK]"},
    {"no [CLS]", "[PAD]\n[UNK]\n[SEP]\n[MASK]\nhello\n", 0, "@: missing special token [CLS]"},
    {"no [SEP]", "[PAD]\n[UNK]\n[CLS]\n[MASK]\nhello\n", 0, "@: missing special token [SEP]"},
    {"no [MASK]", "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", 0, "@: missing special token [MASK]"},
    {"lowercase special token", "[pad]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", 0, "@: missing special token [PAD]"},
    {"special token with a trailing space", "[PAD] \n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", 0, "@: missing special token [PAD]"},
    {"empty file", "", 0, "@: missing special token [PAD]"},
    {"only a byte order mark", "\xEF\xBB\xBF", 0, "@: missing special token [PAD]"},
    {"only empty lines", "\n\n\n", 0, "@: missing special token [PAD]"},
    {"NUL byte in a token", "[PAD]\n[UNK]\n[CLS]\nhe\0llo\n[SEP]\n[MASK]\n", 37,
     "@:4: the token contains a NUL byte; a vocab.txt is plain UTF-8 text"},
};

static void test_vocab_catalogue(void)
{
    bad_dir dir;
    size_t i;
    if (!bad_dir_make(&dir)) return;
    for (i = 0; i < sizeof vocab_cases / sizeof vocab_cases[0]; i++) {
        const vocab_case *c = &vocab_cases[i];
        const char *path = bad_write(&dir, "vocab.txt", c->content, c->length ? c->length : strlen(c->content));
        codir_vocab *v;
        codir_clear_error();
        v = codir_vocab_load(path, 1);
        CHECK(v == NULL, "%s: the vocabulary was accepted", c->name);
        CHECK_REASON(c->name, path, c->expected);
        codir_vocab_free(v);
    }
    codir_clear_error();
    CHECK(codir_vocab_load(bad_path(&dir, "absent.txt"), 1) == NULL, "a missing vocab.txt was accepted");
    CHECK_REASON("missing vocab.txt", bad_path(&dir, "absent.txt"), "failed to open vocabulary file '@'");
    CHECK(codir_vocab_load(NULL, 1) == NULL, "a NULL path was accepted");
    CHECK_REASON("NULL path", NULL, "codir_vocab_load: path is NULL");
    bad_dir_remove(&dir);
}

/* Duplicate tokens are accepted: lookups return the later id, as Hugging Face's
   loader does, and every line still counts as an id. */
static void test_vocab_duplicates(void)
{
    static const char content[] = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n[UNK]\n";
    bad_dir dir;
    const char *path;
    codir_vocab *v;
    if (!bad_dir_make(&dir)) return;
    path = bad_write(&dir, "vocab.txt", content, sizeof content - 1);
    v = codir_vocab_load(path, 1);
    CHECK(v != NULL, "duplicate tokens were rejected: %s", codir_last_error());
    if (v) {
        int ids[4];
        CHECK(v->size == 8, "size %d, expected 8 (one id per line)", v->size);
        CHECK(codir_vocab_id(v, "hello") == 6, "hello has id %d, expected the later 6", codir_vocab_id(v, "hello"));
        CHECK(v->unk_id == 7, "unk_id %d, expected the later 7", v->unk_id);
        CHECK(codir_tokenize(v, "hello", ids, 4) == 1 && ids[0] == 6, "hello tokenizes to id %d, expected 6", ids[0]);
        codir_vocab_free(v);
    }
    bad_dir_remove(&dir);
}

static void test_vocab_build_bad_options(void)
{
    static const char *const texts[2] = {"a b", NULL};
    CHECK(codir_vocab_build(texts, 1, 4, 0, 1) == NULL, "target_size 4 was accepted");
    CHECK_REASON("target_size 4", NULL, "codir_vocab_build: target_size is 4 but the 5 special tokens alone need 5");
    CHECK(codir_vocab_build(texts, -1, 100, 0, 1) == NULL, "count -1 was accepted");
    CHECK_REASON("count -1", NULL, "codir_vocab_build: count is -1");
    CHECK(codir_vocab_build(texts, 1, 100, -1, 1) == NULL, "min_frequency -1 was accepted");
    CHECK_REASON("min_frequency -1", NULL, "codir_vocab_build: min_frequency is -1; use 0 or more");
    CHECK(codir_vocab_build(texts, 2, 100, 0, 1) == NULL, "a NULL text was accepted");
    CHECK_REASON("NULL text", NULL, "codir_vocab_build: texts[1] is NULL");
}

/* ---- safetensors ---- */

/* Builds a safetensors file from a header and data bytes: the 8-byte little-endian
   header length, the header, the data. Returns the byte count written to out. */
static size_t st_build(unsigned char *out, size_t size, const char *header, const void *data, size_t data_length)
{
    size_t n = strlen(header), i;
    if (8 + n + data_length > size) {
        CHECK(0, "st_build: %zu bytes do not fit in %zu", 8 + n + data_length, size);
        return 0;
    }
    for (i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(out + 8, header, n);
    if (data_length) memcpy(out + 8 + n, data, data_length);
    return 8 + n + data_length;
}

/* The small valid file that the truncation test cuts: two tensors, 12 data bytes. */
static const char st_header[] = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                "\"b\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[8,12]}}";
static const unsigned char st_data[12] = {0, 0, 0x80, 0x3F, 0, 0, 0, 0xC0, 0, 0x3C, 0, 0xBC};

/* One malformed header, with `data_length` zero bytes of data after it. */
typedef struct st_case {
    const char *name;
    const char *header;
    size_t data_length;
    const char *expected;   /* "@" is the file's path */
} st_case;

static const st_case st_cases[] = {
    {"JSON object not closed", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4,
     "@: malformed JSON at byte 8: the object that starts here is not closed"},
    {"JSON string not closed", "{\"a", 0, "@: malformed JSON at byte 9: the string that starts here is not closed"},
    {"header not an object", "[1,2]", 0, "@: malformed header at byte 8: it must start with '{'"},
    {"empty header", "", 0, "@: malformed header at byte 8: it must start with '{'"},
    {"text after the JSON", "{} x", 0, "@: malformed JSON at byte 11: unexpected data after the JSON value"},
    {"tensor entry not an object", "{\"a\":5}", 0,
     "@: tensor \"a\" at byte 13 must be an object with dtype, shape and data_offsets"},
    {"dtype a number", "{\"a\":{\"dtype\":5,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": dtype at byte 22 must be a string"},
    {"shape a string", "{\"a\":{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": shape at byte 36 must be an array of at most 8 integers"},
    {"shape entry negative", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": shape entry at byte 37 must be a non-negative integer below 2^63"},
    {"shape entry fractional", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": shape entry at byte 37 must be a non-negative integer below 2^63"},
    {"shape of 9 dimensions", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": shape at byte 36 must be an array of at most 8 integers"},
    {"data_offsets with one entry", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4]}}", 4,
     "@: tensor \"a\": data_offsets at byte 55 must be an array of 2 integers"},
    {"data_offsets of strings", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",\"4\"]}}", 4,
     "@: tensor \"a\": data_offsets entry at byte 56 must be a non-negative integer below 2^63"},
    {"metadata value a number", "{\"__metadata__\":{\"format\":1}}", 0,
     "@: __metadata__ value at byte 34 must be a string"},
    {"metadata an array", "{\"__metadata__\":[]}", 0, "@: __metadata__ at byte 24 must be an object of strings"},
    {"unknown dtype", "{\"a\":{\"dtype\":\"F31\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": unknown dtype \"F31\" at byte 22; known dtypes are BOOL, U8, I8"},
    {"lowercase dtype", "{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": unknown dtype \"f32\""},
    {"no dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "@: tensor \"a\" at byte 13 has no dtype"},
    {"no shape", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "@: tensor \"a\" at byte 13 has no shape"},
    {"no data_offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "@: tensor \"a\" at byte 13 has no data_offsets"},
    {"unexpected key in an entry", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"bias\":1}}", 4,
     "@: tensor \"a\": unexpected key \"bias\" at byte 61; a tensor entry holds only dtype, shape and data_offsets"},
    {"tensor named twice",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
     "\"data_offsets\":[4,8]}}",
     8, "this key repeats an earlier key of the same object"},
    {"shape product overflows size_t",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,2],\"data_offsets\":[0,4]}}", 4,
     "@: tensor \"a\": the element count of shape [4294967296, 4294967296, 2] overflows size_t"},
    {"byte size overflows size_t", "{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,4]}}",
     4, "@: tensor \"a\": the byte size of shape [4611686018427387904] overflows size_t"},
    {"shape entry of 2^63", "{\"a\":{\"dtype\":\"U8\",\"shape\":[9223372036854775808],\"data_offsets\":[0,4]}}", 4,
     "must be a non-negative integer below 2^63"},
    {"offsets not matching the shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
     "@: tensor \"a\": data_offsets [0, 8] hold 8 bytes, but dtype F32 with shape [3] needs 12"},
    {"offsets reversed", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8,
     "@: tensor \"a\": data_offsets [8, 4] end before they begin"},
    {"offsets past the data",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],"
     "\"data_offsets\":[8,12]}}",
     8, "@: tensor \"b\": data_offsets [8, 12] run past the end of the data region, which holds 8 bytes"},
    {"offsets near 2^64", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[18446744073709551615,0]}}", 1,
     "must be a non-negative integer below 2^63"},
    {"offsets overlapping",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
     "\"data_offsets\":[4,12]}}",
     12, "@: tensors \"a\" [0, 8] and \"b\" [4, 12] overlap; each byte of the data region must belong to one tensor"},
    {"offsets leaving a gap",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],"
     "\"data_offsets\":[8,12]}}",
     12, "@: bytes [4, 8) of the data region belong to no tensor"},
    {"data after the last tensor", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 6,
     "@: the data region holds 6 bytes but the tensors end at byte 4 of it"},
};

static void test_safetensors_catalogue(void)
{
    static const unsigned char zeros[16] = {0};
    unsigned char file[512];
    bad_dir dir;
    size_t i;
    if (!bad_dir_make(&dir)) return;
    for (i = 0; i < sizeof st_cases / sizeof st_cases[0]; i++) {
        const st_case *c = &st_cases[i];
        size_t n = st_build(file, sizeof file, c->header, zeros, c->data_length);
        const char *path = bad_write(&dir, "case.safetensors", file, n);
        codir_safetensors *st;
        codir_clear_error();
        st = codir_safetensors_open(path);
        CHECK(st == NULL, "%s: the file was accepted", c->name);
        CHECK_REASON(c->name, path, c->expected);
        codir_safetensors_close(st);
    }
    bad_dir_remove(&dir);
}

/* The header length field against the file size and the format's limit. */
static void test_safetensors_header_length(void)
{
    unsigned char file[256];
    char expected[160];
    bad_dir dir;
    const char *path;
    size_t n, i;
    uint64_t claimed;
    if (!bad_dir_make(&dir)) return;
    n = st_build(file, sizeof file, st_header, st_data, sizeof st_data);

    /* Larger than the file by one byte. */
    claimed = n - 8 + 1;
    for (i = 0; i < 8; i++) file[i] = (unsigned char)(claimed >> (8 * i));
    path = bad_write(&dir, "long.safetensors", file, n);
    CHECK(codir_safetensors_open(path) == NULL, "a header length past the end was accepted");
    snprintf(expected, sizeof expected, "@: the header length %zu in bytes 0-7 is larger than the %zu bytes that follow",
             n - 8 + 1, n - 8);
    CHECK_REASON("header length past the end", path, expected);

    /* Above the limit of 100,000,000 bytes. */
    claimed = 100000001;
    for (i = 0; i < 8; i++) file[i] = (unsigned char)(claimed >> (8 * i));
    path = bad_write(&dir, "huge.safetensors", file, n);
    CHECK(codir_safetensors_open(path) == NULL, "a header length over the limit was accepted");
    CHECK_REASON("header length over the limit", path, "@: the header length 100000001 in bytes 0-7 exceeds the format's limit");

    /* All ones: 2^64 - 1. */
    memset(file, 0xFF, 8);
    path = bad_write(&dir, "max.safetensors", file, n);
    CHECK(codir_safetensors_open(path) == NULL, "a header length of 2^64 - 1 was accepted");
    CHECK_REASON("header length 2^64 - 1", path, "@: the header length 18446744073709551615 in bytes 0-7 exceeds");

    path = bad_path(&dir, "absent.safetensors");
    CHECK(codir_safetensors_open(path) == NULL, "a missing file was accepted");
    CHECK_REASON("missing file", path, "failed to open '@'");
    CHECK(codir_safetensors_open(NULL) == NULL, "a NULL path was accepted");
    CHECK_REASON("NULL path", NULL, "codir_safetensors_open: path is NULL");
    bad_dir_remove(&dir);
}

/* Every proper prefix of a valid file is rejected, with the reason that fits where
   the cut falls: in the length field, in the header, or in the data of a tensor. */
static void test_safetensors_every_truncation(void)
{
    unsigned char file[256];
    char expected[160];
    bad_dir dir;
    size_t n, cut, header_length = strlen(st_header);
    codir_safetensors *st;
    const char *path;
    if (!bad_dir_make(&dir)) return;
    n = st_build(file, sizeof file, st_header, st_data, sizeof st_data);
    path = bad_write(&dir, "whole.safetensors", file, n);
    st = codir_safetensors_open(path);
    CHECK(st != NULL, "the untruncated file was rejected: %s", codir_last_error());
    codir_safetensors_close(st);

    for (cut = 0; cut < n; cut++) {
        path = bad_write(&dir, "cut.safetensors", file, cut);
        codir_clear_error();
        st = codir_safetensors_open(path);
        CHECK(st == NULL, "the file cut to %zu of %zu bytes was accepted", cut, n);
        codir_safetensors_close(st);
        if (cut < 8)
            snprintf(expected, sizeof expected, "@: the file has %zu bytes, fewer than the 8-byte header length", cut);
        else if (cut < 8 + header_length)
            snprintf(expected, sizeof expected, "@: the header length %zu in bytes 0-7 is larger than the %zu bytes",
                     header_length, cut - 8);
        else if (cut < 8 + header_length + 8)
            snprintf(expected, sizeof expected, "@: tensor \"a\": data_offsets [0, 8] run past the end of the data "
                     "region, which holds %zu bytes", cut - 8 - header_length);
        else
            snprintf(expected, sizeof expected, "@: tensor \"b\": data_offsets [8, 12] run past the end of the data "
                     "region, which holds %zu bytes", cut - 8 - header_length);
        CHECK_REASON("truncated file", path, expected);
    }
    bad_dir_remove(&dir);
}

/* Reads refused by codir_safetensors_read_f32 on a valid file. */
static void test_safetensors_bad_reads(void)
{
    static const char header[] = "{\"f\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                 "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[8,12]}}";
    unsigned char file[256];
    float out[4];
    bad_dir dir;
    codir_safetensors *st;
    const char *path;
    if (!bad_dir_make(&dir)) return;
    path = bad_write(&dir, "reads.safetensors", file, st_build(file, sizeof file, header, st_data, 12));
    st = codir_safetensors_open(path);
    CHECK(st != NULL, "the file was rejected: %s", codir_last_error());
    if (st) {
        CHECK(codir_safetensors_read_f32(st, "g", out, 2) == CODIR_ERR_INVALID, "a missing tensor was read");
        CHECK_REASON("missing tensor", path, "@: no tensor is named \"g\"");
        CHECK(codir_safetensors_read_f32(st, "f", out, 3) == CODIR_ERR_INVALID, "3 of 2 elements were read");
        CHECK_REASON("wrong count", path, "@: tensor \"f\" has 2 elements (shape [2]), not the 3 requested");
        CHECK(codir_safetensors_read_f32(st, "i", out, 1) == CODIR_ERR_INVALID, "an I32 tensor was read as float");
        CHECK_REASON("integer dtype", path, "@: tensor \"i\" has dtype I32; only F32, F16 and BF16 convert to float32");
        codir_safetensors_close(st);
    }
    bad_dir_remove(&dir);
}

/* ---- model folders ---- */

/* A tiny model saved to `dir`, its tensors read back as f32, for rewriting. */
typedef struct saved_model {
    codir_st_write *tensors;
    float **data;
    int count;
} saved_model;

static void saved_model_free(saved_model *s)
{
    int i;
    for (i = 0; s->tensors && i < s->count; i++) free((char *)s->tensors[i].name);
    for (i = 0; s->data && i < s->count; i++) free(s->data[i]);
    free(s->data);
    free(s->tensors);
    memset(s, 0, sizeof *s);
}

/* Saves a small model into dir and reads model.safetensors back into s. */
static int save_tiny_model(bad_dir *dir, saved_model *s)
{
    codir_config cfg = codir_config_default();
    codir_model *m;
    codir_safetensors *st;
    int i, ok = 1;
    memset(s, 0, sizeof *s);
    cfg.vocab_size = 12;
    cfg.max_len = 8;
    cfg.num_layers = 1;
    cfg.hidden = 4;
    cfg.num_heads = 2;
    cfg.ffn = 8;
    cfg.num_labels = 2;
    m = codir_model_create(&cfg, 3);
    CHECK(m != NULL, "codir_model_create: %s", codir_last_error());
    if (!m) return 0;
    bad_path(dir, "config.json");
    bad_path(dir, "model.safetensors");
    CHECK(codir_model_save(m, dir->path) == CODIR_OK, "codir_model_save: %s", codir_last_error());
    codir_model_free(m);
    st = codir_safetensors_open(bad_path(dir, "model.safetensors"));
    CHECK(st != NULL, "reopening the saved model: %s", codir_last_error());
    if (!st) return 0;
    s->count = st->num_tensors;
    s->tensors = (codir_st_write *)calloc((size_t)s->count + 1, sizeof *s->tensors);
    s->data = (float **)calloc((size_t)s->count + 1, sizeof *s->data);
    if (!s->tensors || !s->data) ok = 0;
    for (i = 0; ok && i < s->count; i++) {
        const codir_st_tensor *t = &st->tensors[i];
        size_t name_bytes = strlen(t->name) + 1;
        char *name = (char *)malloc(name_bytes);
        int d;
        s->data[i] = (float *)malloc((t->numel + 1) * sizeof(float));
        s->tensors[i].name = name;
        if (!name || !s->data[i] || codir_safetensors_read_f32(st, t->name, s->data[i], t->numel)) {
            ok = 0;
            break;
        }
        memcpy(name, t->name, name_bytes);
        s->tensors[i].ndim = t->ndim;
        for (d = 0; d < CODIR_ST_MAX_DIMS; d++) s->tensors[i].shape[d] = t->shape[d];
        s->tensors[i].data = s->data[i];
    }
    codir_safetensors_close(st);
    CHECK(ok, "reading the saved model back failed: %s", codir_last_error());
    return ok;
}

static int find_saved(const saved_model *s, const char *name)
{
    int i;
    for (i = 0; i < s->count; i++)
        if (strcmp(s->tensors[i].name, name) == 0) return i;
    return -1;
}

/* Rewrites dir/model.safetensors from s with tensor `drop` left out (-1 for none) and
   `extra` (NULL for none) added, then checks that codir_model_load gives `expected`. */
static void check_model_rewrite(bad_dir *dir, saved_model *s, int drop, const codir_st_write *extra,
                                const char *what, const char *expected)
{
    static const char *const metadata[2] = {"format", "pt"};
    codir_st_write list[64];
    int i, n = 0;
    codir_model *m;
    for (i = 0; i < s->count && n < 63; i++)
        if (i != drop) list[n++] = s->tensors[i];
    if (extra) list[n++] = *extra;
    CHECK(codir_safetensors_write(bad_path(dir, "model.safetensors"), list, n, metadata, 1) == CODIR_OK,
          "%s: codir_safetensors_write: %s", what, codir_last_error());
    codir_clear_error();
    m = codir_model_load(dir->path);
    CHECK(m == NULL, "%s: the model was accepted", what);
    CHECK_REASON(what, bad_path(dir, "model.safetensors"), expected);
    codir_model_free(m);
}

static void test_model_folder_catalogue(void)
{
    static const float extra_data[2] = {1.0f, 2.0f};
    bad_dir dir;
    saved_model s;
    codir_st_write extra;
    codir_model *m;
    int i;
    if (!bad_dir_make(&dir)) return;
    if (!save_tiny_model(&dir, &s)) {
        saved_model_free(&s);
        bad_dir_remove(&dir);
        return;
    }
    m = codir_model_load(dir.path);
    CHECK(m != NULL, "the saved model does not load: %s", codir_last_error());
    codir_model_free(m);

    i = find_saved(&s, "classifier.bias");
    CHECK(i >= 0, "the saved model has no classifier.bias");
    check_model_rewrite(&dir, &s, i, NULL, "tensor missing",
                        "@: tensor \"classifier.bias\" is missing; a sequence-classification model needs every tensor");

    memset(&extra, 0, sizeof extra);
    extra.name = "extra.weight";
    extra.ndim = 1;
    extra.shape[0] = 2;
    extra.data = extra_data;
    check_model_rewrite(&dir, &s, -1, &extra, "tensor unexpected",
                        "@: unexpected tensor \"extra.weight\"; codir_model_load reads only the BERT encoder");

    /* classifier.bias with 2 values where config.json implies [2] but as [1, 2]. */
    extra = s.tensors[i];
    extra.ndim = 2;
    extra.shape[0] = 1;
    extra.shape[1] = 2;
    check_model_rewrite(&dir, &s, i, &extra, "tensor of another shape",
                        "@: tensor \"classifier.bias\" has shape [1, 2], but config.json implies [2]");

    /* The same tensor under its name and its old LayerNorm name. */
    i = find_saved(&s, "bert.embeddings.LayerNorm.weight");
    CHECK(i >= 0, "the saved model has no bert.embeddings.LayerNorm.weight");
    if (i >= 0) {
        extra = s.tensors[i];
        extra.name = "bert.embeddings.LayerNorm.gamma";
        check_model_rewrite(&dir, &s, -1, &extra, "new and old name",
                            "@: both \"bert.embeddings.LayerNorm.weight\" and its old name "
                            "\"bert.embeddings.LayerNorm.gamma\" are present; keep one");
    }

    /* config.json that codir cannot represent, and one that is missing. */
    bad_write(&dir, "config.json", "{\"hidden_act\": \"relu\", \"hidden_size\": 4}", 40);
    CHECK(codir_model_load(dir.path) == NULL, "hidden_act relu was accepted");
    CHECK_REASON("hidden_act relu", bad_path(&dir, "config.json"), "@: hidden_act \"relu\" is not supported");
    bad_write(&dir, "config.json", "{\"hidden_size\": -4}", 19);
    CHECK(codir_model_load(dir.path) == NULL, "hidden_size -4 was accepted");
    CHECK_REASON("hidden_size -4", bad_path(&dir, "config.json"), "@: hidden_size at byte 16 must be an integer from 1 to");
    remove(bad_path(&dir, "config.json"));
    CHECK(codir_model_load(dir.path) == NULL, "a folder without config.json was accepted");
    CHECK_REASON("config.json missing", bad_path(&dir, "config.json"), "failed to open '@'");
    saved_model_free(&s);
    bad_dir_remove(&dir);

    CHECK(codir_model_load(dir.path) == NULL, "a missing folder was accepted");
    CHECK_REASON("folder missing", dir.path, "failed to open '@/config.json'");
}

/* ---- options ---- */

/* One bad integer or float field of codir_config. */
typedef struct config_case {
    const char *name;
    size_t offset;          /* offsetof the field in codir_config */
    int is_float;
    double value;
    const char *expected;
} config_case;

#define CFG_INT(field, v, expected) {#field " " #v, offsetof(codir_config, field), 0, v, expected}
#define CFG_FLOAT(field, v, expected) {#field " " #v, offsetof(codir_config, field), 1, v, expected}

/* The base configuration has hidden 32 and 4 heads. */
static const config_case config_cases[] = {
    CFG_INT(vocab_size, 0, "vocab_size 0 is too small: it needs the 5 special tokens"),
    CFG_INT(vocab_size, -5, "vocab_size -5 is too small"),
    CFG_INT(vocab_size, 4, "vocab_size 4 is too small"),
    CFG_INT(max_len, 0, "max_len 0 must be at least 2"),
    CFG_INT(max_len, -1, "max_len -1 must be at least 2"),
    CFG_INT(type_vocab_size, 0, "type_vocab_size 0 must be at least 1"),
    CFG_INT(num_layers, 0, "num_layers 0 must be at least 1"),
    CFG_INT(num_layers, -2, "num_layers -2 must be at least 1"),
    CFG_INT(hidden, 0, "hidden 0 must be positive"),
    CFG_INT(hidden, -32, "hidden -32 must be positive"),
    CFG_INT(num_heads, 0, "num_heads 0 must be positive and divide hidden 32"),
    CFG_INT(num_heads, -4, "num_heads -4 must be positive and divide hidden 32"),
    CFG_INT(num_heads, 3, "num_heads 3 must be positive and divide hidden 32"),
    CFG_INT(num_heads, 64, "num_heads 64 must be positive and divide hidden 32"),
    CFG_INT(ffn, 0, "ffn 0 must be positive"),
    CFG_INT(ffn, -1, "ffn -1 must be positive"),
    CFG_INT(num_labels, 0, "num_labels 0 must be positive"),
    CFG_INT(num_labels, -3, "num_labels -3 must be positive"),
    CFG_INT(mlm_head, 2, "mlm_head 2 must be 0 or 1"),
    CFG_FLOAT(dropout, 1.0, "dropout 1 must be in [0, 1)"),
    CFG_FLOAT(dropout, -0.1, "dropout -0.1 must be in [0, 1)"),
    CFG_FLOAT(dropout, NAN, "dropout nan must be in [0, 1)"),
    CFG_FLOAT(ln_eps, 0.0, "ln_eps 0 must be positive"),
    CFG_FLOAT(ln_eps, -1e-12, "ln_eps -1e-12 must be positive"),
};

static codir_config small_config(void)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = 30;
    cfg.max_len = 8;
    cfg.num_layers = 2;
    cfg.hidden = 32;
    cfg.num_heads = 4;
    cfg.ffn = 64;
    cfg.num_labels = 2;
    return cfg;
}

static void test_config_catalogue(void)
{
    size_t i;
    codir_config ok = small_config();
    CHECK(codir_config_check(&ok) == CODIR_OK, "the base configuration was rejected: %s", codir_last_error());
    for (i = 0; i < sizeof config_cases / sizeof config_cases[0]; i++) {
        const config_case *c = &config_cases[i];
        codir_config cfg = small_config();
        codir_model *m;
        if (c->is_float) *(float *)((char *)&cfg + c->offset) = (float)c->value;
        else *(int *)((char *)&cfg + c->offset) = (int)c->value;
        codir_clear_error();
        CHECK(codir_config_check(&cfg) == CODIR_ERR_INVALID, "%s: codir_config_check accepted it", c->name);
        CHECK_REASON(c->name, NULL, c->expected);

        /* codir_model_create checks the same and gives the same reason. */
        codir_clear_error();
        m = codir_model_create(&cfg, 1);
        CHECK(m == NULL, "%s: codir_model_create accepted it", c->name);
        CHECK_REASON(c->name, NULL, c->expected);
        codir_model_free(m);
    }
}

/* One bad field of codir_distill_config, or a bad argument of codir_distiller_create. */
typedef struct distill_case {
    const char *name;
    int field;              /* which setting: see apply_distill_case */
    double value;
    const char *expected;
} distill_case;

enum {
    DC_BETA, DC_TEMPERATURE, DC_LAMBDA, DC_TAU, DC_NEGATIVES, DC_PROJ_DIM, DC_MOMENTUM, DC_MODE, DC_POOLING,
    DC_MARGIN, DC_NEG_FROM, DC_NCE_NEGATIVES, DC_EXAMPLES, DC_STUDENT_LABELS, DC_LAYER_MAP, DC_NULL_LABELS, DC_NEG_LABEL
};

/* 10 training examples; the base uses InfoNCE, K = 3 and projection size 4. */
static const distill_case distill_cases[] = {
    {"KD temperature 0", DC_TEMPERATURE, 0.0, "KD temperature 0 must be positive"},
    {"KD temperature negative", DC_TEMPERATURE, -2.0, "KD temperature -2 must be positive"},
    {"KD temperature infinite", DC_TEMPERATURE, INFINITY, "KD temperature inf must be positive"},
    {"KD temperature NaN", DC_TEMPERATURE, NAN, "KD temperature nan must be positive"},
    {"tau 0", DC_TAU, 0.0, "contrastive temperature tau 0 must be positive"},
    {"tau negative", DC_TAU, -0.07, "contrastive temperature tau -0.07 must be positive"},
    {"tau NaN", DC_TAU, NAN, "contrastive temperature tau nan must be positive"},
    {"beta above 1", DC_BETA, 1.5, "beta 1.5 must be in [0, 1]"},
    {"beta negative", DC_BETA, -0.5, "beta -0.5 must be in [0, 1]"},
    {"lambda negative", DC_LAMBDA, -1.0, "lambda -1 must be zero or positive"},
    {"lambda infinite", DC_LAMBDA, INFINITY, "lambda inf must be zero or positive"},
    {"K 0", DC_NEGATIVES, 0, "number of negatives K = 0 must be at least 1"},
    {"K negative", DC_NEGATIVES, -5, "number of negatives K = -5 must be at least 1"},
    {"projection size 0", DC_PROJ_DIM, 0, "projection size 0 must be positive"},
    {"projection size negative", DC_PROJ_DIM, -4, "projection size -4 must be positive"},
    {"momentum 1", DC_MOMENTUM, 1.0, "bank momentum 1 must be in [0, 1)"},
    {"momentum negative", DC_MOMENTUM, -0.5, "bank momentum -0.5 must be in [0, 1)"},
    {"mode 2", DC_MODE, 2, "contrastive mode 2 is neither CODIR_CRD_INFONCE nor CODIR_CRD_NCE"},
    {"pooling 5", DC_POOLING, 5, "pooling 5 is neither CODIR_POOL_MEAN nor CODIR_POOL_FIRST"},
    {"negative margin below 0", DC_MARGIN, -1.0, "negative margin -1 must be >= 0"},
    {"negatives_from 3", DC_NEG_FROM, 3, "negatives_from 3 is neither CODIR_NEG_OTHER_GROUP nor CODIR_NEG_SAME_GROUP"},
    {"K larger than the data, NCE", DC_NCE_NEGATIVES, 50,
     "NCE needs fewer negatives (K = 50) than training examples (10); lower K"},
    {"K equal to the data, NCE", DC_NCE_NEGATIVES, 10,
     "NCE needs fewer negatives (K = 10) than training examples (10); lower K"},
    {"one training example", DC_EXAMPLES, 1, "distillation needs at least 2 training examples"},
    {"zero training examples", DC_EXAMPLES, 0, "distillation needs at least 2 training examples"},
    {"label counts differ", DC_STUDENT_LABELS, 3, "student has 3 labels but teacher has 2"},
    {"layer map past the teacher", DC_LAYER_MAP, 5, "layer map: student layer 2 maps to teacher layer 5, outside 1..4"},
    {"layer map 0", DC_LAYER_MAP, 0, "layer map: student layer 2 maps to teacher layer 0, outside 1..4"},
    {"no label array", DC_NULL_LABELS, 0, "codir_distiller_create needs the 10 training labels"},
    {"negative training label", DC_NEG_LABEL, -1, "training label -1 of example 4 is negative"},
};

static void test_distiller_catalogue(void)
{
    int labels[10] = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
    size_t i;
    codir_config student = small_config(), teacher = small_config();
    codir_distill_config base = codir_distill_config_default();
    codir_distiller *d;
    student.num_layers = 2;
    teacher.num_layers = 4;
    base.num_negatives = 3;
    base.proj_dim = 4;
    base.mode = CODIR_CRD_INFONCE;
    d = codir_distiller_create(&base, &student, &teacher, labels, 10, 1);
    CHECK(d != NULL, "the base distiller was rejected: %s", codir_last_error());
    codir_distiller_free(d);

    for (i = 0; i < sizeof distill_cases / sizeof distill_cases[0]; i++) {
        const distill_case *c = &distill_cases[i];
        codir_distill_config cfg = base;
        codir_config s = student;
        int map[2] = {2, 4}, count = 10, saved_label = labels[4];
        switch (c->field) {
        case DC_BETA: cfg.beta = (float)c->value; break;
        case DC_TEMPERATURE: cfg.temperature = (float)c->value; break;
        case DC_LAMBDA: cfg.lambda = (float)c->value; break;
        case DC_TAU: cfg.tau = (float)c->value; break;
        case DC_NEGATIVES: cfg.num_negatives = (int)c->value; break;
        case DC_PROJ_DIM: cfg.proj_dim = (int)c->value; break;
        case DC_MOMENTUM: cfg.momentum = (float)c->value; break;
        case DC_MODE: cfg.mode = (int)c->value; break;
        case DC_POOLING: cfg.pooling = (int)c->value; break;
        case DC_MARGIN: cfg.neg_margin = (float)c->value; break;
        case DC_NEG_FROM: cfg.negatives_from = (int)c->value; break;
        case DC_NCE_NEGATIVES:
            cfg.mode = CODIR_CRD_NCE;
            cfg.num_negatives = (int)c->value;
            break;
        case DC_EXAMPLES: count = (int)c->value; break;
        case DC_STUDENT_LABELS: s.num_labels = (int)c->value; break;
        case DC_LAYER_MAP:
            map[1] = (int)c->value;
            cfg.layer_map = map;
            break;
        case DC_NULL_LABELS: break;
        default: labels[4] = (int)c->value; break;
        }
        codir_clear_error();
        d = codir_distiller_create(&cfg, &s, &teacher, c->field == DC_NULL_LABELS ? NULL : labels, count, 1);
        labels[4] = saved_label;
        CHECK(d == NULL, "%s: the distiller was created", c->name);
        CHECK_REASON(c->name, NULL, c->expected);
        codir_distiller_free(d);
    }

    /* InfoNCE caps K at the examples of other labels instead of failing. */
    base.num_negatives = 50;
    d = codir_distiller_create(&base, &student, &teacher, labels, 10, 1);
    CHECK(d != NULL, "InfoNCE with K = 50 > 10 examples was rejected: %s", codir_last_error());
    if (d) {
        int negatives[50];
        int drawn = codir_sample_negatives(d, 0, negatives, 50);
        CHECK(drawn == 5, "InfoNCE drew %d negatives for K = 50, expected the 5 examples of the other label", drawn);
        codir_distiller_free(d);
    }
}

/* Encoding, batch and data arguments out of range. */
static void test_encoding_bad_options(void)
{
    static const char *const corpus[1] = {"hello world"};
    codir_vocab *vocab = codir_vocab_build(corpus, 1, 30, 0, 1);
    codir_batch batch;
    int ids[4], types[4];
    CHECK(vocab != NULL, "setup failed: %s", codir_last_error());
    if (!vocab) return;
    CHECK(codir_encode(vocab, "hello", ids, 1) == CODIR_ERR_INVALID, "max_len 1 was accepted");
    CHECK_REASON("encode max_len 1", NULL, "codir_encode_pair: max_len is 1 but [CLS] and [SEP] need at least 2; raise max_len");
    CHECK(codir_encode_pair(vocab, "hello", "world", ids, types, 2) == CODIR_ERR_INVALID, "pair max_len 2 was accepted");
    CHECK_REASON("pair max_len 2", NULL, "codir_encode_pair: max_len is 2 but [CLS], [SEP] and [SEP] need at least 3");
    CHECK(codir_encode(vocab, NULL, ids, 4) == CODIR_ERR_INVALID, "a NULL text was accepted");
    CHECK_REASON("NULL text", NULL, "codir_encode_pair: vocab or text is NULL");
    CHECK(codir_tokenize(vocab, "hello", NULL, 3) == CODIR_ERR_INVALID, "max_ids 3 without ids was accepted");
    CHECK_REASON("tokenize without ids", NULL, "codir_tokenize: max_ids is 3 with ids NULL");
    CHECK(codir_tokenize(vocab, "hello", ids, -1) == CODIR_ERR_INVALID, "max_ids -1 was accepted");
    CHECK_REASON("tokenize max_ids -1", NULL, "codir_tokenize: max_ids is -1");
    memset(&batch, 0, sizeof batch);
    CHECK(codir_batch_init(&batch, 0, 8) == CODIR_ERR_INVALID, "batch size 0 was accepted");
    CHECK_REASON("batch size 0", NULL, "batch size 0 and length 8 must be positive");
    CHECK(codir_batch_init(&batch, 4, -1) == CODIR_ERR_INVALID, "length -1 was accepted");
    CHECK_REASON("length -1", NULL, "batch size 4 and length -1 must be positive");
    codir_vocab_free(vocab);
}

const test_case tests_badinput[] = {
    {"bad input tsv catalogue", test_tsv_catalogue},
    {"bad input tsv missing file", test_tsv_missing_file},
    {"bad input tsv options", test_tsv_bad_options},
    {"bad input tsv 1 MB line", test_tsv_megabyte_line},
    {"bad input tsv invalid UTF-8", test_tsv_invalid_utf8},
    {"bad input vocab catalogue", test_vocab_catalogue},
    {"bad input vocab duplicate tokens", test_vocab_duplicates},
    {"bad input vocab build options", test_vocab_build_bad_options},
    {"bad input safetensors catalogue", test_safetensors_catalogue},
    {"bad input safetensors header length", test_safetensors_header_length},
    {"bad input safetensors every truncation", test_safetensors_every_truncation},
    {"bad input safetensors reads", test_safetensors_bad_reads},
    {"bad input model folder", test_model_folder_catalogue},
    {"bad input config options", test_config_catalogue},
    {"bad input distiller options", test_distiller_catalogue},
    {"bad input encoding options", test_encoding_bad_options},
};
const int tests_badinput_count = (int)(sizeof tests_badinput / sizeof tests_badinput[0]);
