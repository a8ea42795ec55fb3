/* Tests of the WordPiece tokenizer, the vocabulary builder and the TSV reader. Every
   expected id list below was worked out by hand from the vocabulary it uses. */
#include "check.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- temporary files ---- */

/* Creates a new file under $TMPDIR (or /tmp) containing the `length` bytes at
   `content`, and stores its path in path[size]. The name mixes the time, a counter and
   the address of a static object, which differs between runs under address space
   layout randomization. Mode "wx" makes fopen fail rather than reuse an existing file. */
static int write_temp_file(char *path, size_t size, const char *suffix, const char *content, size_t length)
{
    static unsigned long counter;
    const char *dir = getenv("TMPDIR");
    int attempt;
    if (!dir || !dir[0]) dir = "/tmp";
    for (attempt = 0; attempt < 100; attempt++) {
        FILE *file;
        int ok;
        counter++;
        snprintf(path, size, "%s/codir_text_%lx_%lx_%lu%s", dir, (unsigned long)time(NULL),
                 (unsigned long)((uintptr_t)&counter >> 4), counter, suffix);
        file = fopen(path, "wx");
        if (!file) continue;
        ok = fwrite(content, 1, length, file) == length;
        if (fclose(file) != 0) ok = 0;
        if (!ok) {
            remove(path);
            return 0;
        }
        return 1;
    }
    return 0;
}

/* Builds a unique path that does not exist yet, for functions that create the file. */
static int make_temp_path(char *path, size_t size, const char *suffix)
{
    if (!write_temp_file(path, size, suffix, "", 0)) return 0;
    remove(path);
    return 1;
}

/* Joins tokens into vocab.txt text with "\n" line ends. */
static char *join_lines(const char *const *tokens, int count)
{
    size_t length = 0;
    int i;
    char *text, *p;
    for (i = 0; i < count; i++) length += strlen(tokens[i]) + 1;
    text = (char *)malloc(length + 1);
    if (!text) return NULL;
    p = text;
    for (i = 0; i < count; i++) {
        size_t n = strlen(tokens[i]);
        memcpy(p, tokens[i], n);
        p[n] = '\n';
        p += n + 1;
    }
    *p = '\0';
    return text;
}

/* Writes vocab.txt text to a temporary file, loads it and removes the file. */
static codir_vocab *load_vocab_from_text(const char *text, size_t length, int lowercase)
{
    char path[512];
    codir_vocab *vocab;
    if (!write_temp_file(path, sizeof path, ".txt", text, length)) return NULL;
    vocab = codir_vocab_load(path, lowercase);
    remove(path);
    return vocab;
}

static codir_vocab *load_vocab(const char *const *tokens, int count, int lowercase)
{
    char *text = join_lines(tokens, count);
    codir_vocab *vocab;
    if (!text) return NULL;
    vocab = load_vocab_from_text(text, strlen(text), lowercase);
    free(text);
    return vocab;
}

/* ---- the hand-made vocabulary ---- */

/* Ids are the array indices, written next to each token for the expected lists. */
static const char *const test_tokens[] = {
    "[PAD]",       /* 0 */
    "[UNK]",       /* 1 */
    "[CLS]",       /* 2 */
    "[SEP]",       /* 3 */
    "[MASK]",      /* 4 */
    "un",          /* 5 */
    "##aff",       /* 6 */
    "##able",      /* 7 */
    "##a",         /* 8 */
    "##ff",        /* 9 */
    "a",           /* 10 */
    "hello",       /* 11 */
    ",",           /* 12 */
    "world",       /* 13 */
    "!",           /* 14 */
    "unaff",       /* 15 */
    "##b",         /* 16 */
    "\xC3\xA9",    /* 17: e with acute accent */
    "##\xC3\xA9",  /* 18 */
    "\xE4\xB8\xAD",   /* 19: CJK "middle" */
    "\xE6\x96\x87",   /* 20: CJK "text" */
    "##\xE6\x96\x87", /* 21 */
    "$",           /* 22 */
    "x",           /* 23 */
    "##x",         /* 24 */
};
#define TEST_TOKEN_COUNT ((int)(sizeof test_tokens / sizeof test_tokens[0]))

static codir_vocab *test_vocab(int lowercase)
{
    codir_vocab *vocab = load_vocab(test_tokens, TEST_TOKEN_COUNT, lowercase);
    CHECK(vocab != NULL, "loading the test vocabulary failed: %s", codir_last_error());
    return vocab;
}

/* Compares two ints and prints both on a mismatch. */
#define CHECK_INT(what, got, want)                                                              \
    do {                                                                                        \
        long long got_ = (long long)(got), want_ = (long long)(want);                           \
        CHECK(got_ == want_, "%s is %lld, want %lld", what, got_, want_);                       \
    } while (0)

/* Compares got[got_count] with want[want_count] and reports the first difference. */
static void check_ids_at(int line, const char *what, const int *got, int got_count, const int *want, int want_count)
{
    int i;
    if (got_count != want_count) {
        check_fail(__FILE__, line, "%s: %d ids, want %d (%s)", what, got_count, want_count, codir_last_error());
        return;
    }
    for (i = 0; i < got_count; i++) {
        if (got[i] != want[i]) {
            check_fail(__FILE__, line, "%s: id %d is %d, want %d", what, i, got[i], want[i]);
            return;
        }
    }
}
#define CHECK_IDS(what, got, got_count, ...)                                                    \
    do {                                                                                        \
        static const int want_[] = {__VA_ARGS__};                                               \
        check_ids_at(__LINE__, what, got, got_count, want_, (int)(sizeof want_ / sizeof want_[0])); \
    } while (0)

/* Tokenizes text and compares the ids with want[want_count]. */
static void check_tokens_at(int line, const codir_vocab *vocab, const char *text, const int *want, int want_count)
{
    int got[512], count, i;
    count = codir_tokenize(vocab, text, got, 512);
    if (count != want_count) {
        check_fail(__FILE__, line, "tokenize(\"%s\") returned %d pieces, want %d (%s)", text, count, want_count,
                   codir_last_error());
        return;
    }
    for (i = 0; i < count; i++) {
        if (got[i] != want[i]) {
            check_fail(__FILE__, line, "tokenize(\"%s\") piece %d is %d, want %d", text, i, got[i], want[i]);
            return;
        }
    }
}
#define CHECK_TOKENS(vocab, text, ...)                                                        \
    do {                                                                                      \
        static const int want_[] = {__VA_ARGS__};                                             \
        check_tokens_at(__LINE__, vocab, text, want_, (int)(sizeof want_ / sizeof want_[0])); \
    } while (0)

/* ---- tokenizer ---- */

static void test_tokenizer_longest_match(void)
{
    codir_vocab *vocab = test_vocab(0);
    if (!vocab) return;
    /* "unaff" (15) beats "un" (5), then "##able". */
    CHECK_TOKENS(vocab, "unaffable", 15, 7);
    CHECK_TOKENS(vocab, "unable", 5, 7);
    CHECK_TOKENS(vocab, "unaffable unable", 15, 7, 5, 7);
    /* Later pieces need the "##" form: "a" then "##a", "##b". */
    CHECK_TOKENS(vocab, "aa", 10, 8);
    CHECK_TOKENS(vocab, "ab", 10, 16);
    CHECK_TOKENS(vocab, "aaa", 10, 8, 8);
    CHECK_TOKENS(vocab, "hello", 11);
    codir_vocab_free(vocab);
}

static void test_tokenizer_whole_word_unk(void)
{
    codir_vocab *vocab = test_vocab(0);
    if (!vocab) return;
    /* "unable" matches but "##z" does not, so the whole word is one [UNK]. */
    CHECK_TOKENS(vocab, "unablez", 1);
    CHECK_TOKENS(vocab, "unable unablez hello", 5, 7, 1, 11);
    /* "b" exists only as "##b". */
    CHECK_TOKENS(vocab, "ba", 1);
    CHECK_TOKENS(vocab, "z", 1);
    codir_vocab_free(vocab);
}

static void test_tokenizer_punctuation_split(void)
{
    codir_vocab *vocab = test_vocab(0);
    int c;
    if (!vocab) return;
    CHECK_TOKENS(vocab, "hello,world!", 11, 12, 13, 14);
    CHECK_TOKENS(vocab, "hello , world !", 11, 12, 13, 14);
    CHECK_TOKENS(vocab, "$x", 22, 23);
    CHECK_TOKENS(vocab, "!!", 14, 14);

    /* Every printable ASCII character except letters and digits splits "x?x" into
       three words: x, an unknown character, x. Letters and digits stay inside. */
    for (c = 33; c <= 126; c++) {
        char text[4];
        int got[8], count;
        int alnum = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        text[0] = 'x';
        text[1] = (char)c;
        text[2] = 'x';
        text[3] = '\0';
        count = codir_tokenize(vocab, text, got, 8);
        if (!alnum) {
            /* x, the character (a known piece or [UNK]), x. */
            CHECK(count == 3, "\"%s\": %d pieces, want 3 because '%c' is punctuation", text, count, c);
            if (count == 3) {
                CHECK(got[0] == 23, "\"%s\": first piece %d, want x (23)", text, got[0]);
                CHECK(got[2] == 23, "\"%s\": last piece %d, want x (23)", text, got[2]);
            }
        } else if (c == 'a') {
            CHECK_IDS(text, got, count, 23, 8, 24);
        } else if (c == 'b') {
            CHECK_IDS(text, got, count, 23, 16, 24);
        } else if (c == 'x') {
            CHECK_IDS(text, got, count, 23, 24, 24);
        } else {
            /* One word without "##" pieces for c: one [UNK]. */
            CHECK_IDS(text, got, count, 1);
        }
    }
    codir_vocab_free(vocab);
}

static void test_tokenizer_lowercase(void)
{
    codir_vocab *lower = test_vocab(1);
    codir_vocab *cased = test_vocab(0);
    if (lower && cased) {
        CHECK(lower->lowercase == 1, "lowercase flag is %d, want 1", lower->lowercase);
        CHECK(cased->lowercase == 0, "lowercase flag is %d, want 0", cased->lowercase);
        CHECK_TOKENS(lower, "HeLLo WORLD", 11, 13);
        CHECK_TOKENS(cased, "HeLLo WORLD", 1, 1);
        CHECK_TOKENS(cased, "hello", 11);
        /* Uncased strips accents: "\xC3\xA9" (e acute, 17) becomes "e", which the
           test vocabulary lacks, while the cased vocabulary keeps it. */
        CHECK_TOKENS(lower, "\xC3\xA9", 1);
        CHECK_TOKENS(cased, "\xC3\xA9", 17);
        CHECK_TOKENS(cased, "\xC3\x89", 1);
        /* U+00C0 (A grave), and A followed by U+0301 (combining acute), lose the accent
           and become "a"; "\xC3\x80x" is "ax" = a ##x. */
        CHECK_TOKENS(lower, "\xC3\x80x", 10, 24);
        CHECK_TOKENS(lower, "\xC3\x80\xCC\x81", 10);
    }
    codir_vocab_free(lower);
    codir_vocab_free(cased);
}

static void test_tokenizer_pretokenize(void)
{
    char out[256];
    int n;
    /* Hand-worked: accents stripped after NFD, sharp s kept, U+0130 loses its dot,
       punctuation and the CJK ideograph alone, U+200B dropped, U+00A0 splits. */
    n = codir_pretokenize("Caf\xC3\xA9,Stra\xC3\x9F" "e \xC4\xB0x\xE4\xB8\xADy\xE2\x80\x8Bz\xC2\xA0w", 1, out, sizeof out);
    CHECK(n >= 0 && strcmp(out, "cafe , stra\xC3\x9F" "e ix \xE4\xB8\xAD yz w") == 0, "uncased: got [%s] (%d)", out, n);
    n = codir_pretokenize("Caf\xC3\xA9,Stra\xC3\x9F" "e \xC4\xB0x", 0, out, sizeof out);
    CHECK(n >= 0 && strcmp(out, "Caf\xC3\xA9 , Stra\xC3\x9F" "e \xC4\xB0x") == 0, "cased: got [%s] (%d)", out, n);
    /* Hangul syllable U+D55C decomposes into jamo U+1112 U+1161 U+11AB when uncased. */
    n = codir_pretokenize("\xED\x95\x9C", 1, out, sizeof out);
    CHECK(n == 9 && strcmp(out, "\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB") == 0, "hangul: got [%s] (%d)", out, n);
    /* snprintf-like: the full length comes back, the output is cut and terminated. */
    n = codir_pretokenize("abc def", 0, out, 4);
    CHECK(n == 7 && strcmp(out, "abc") == 0, "short buffer: got [%s] (%d), want [abc] (7)", out, n);
    n = codir_pretokenize("abc def", 0, NULL, 0);
    CHECK(n == 7, "NULL buffer: returned %d, want 7", n);
    n = codir_pretokenize(NULL, 0, out, sizeof out);
    CHECK(n == CODIR_ERR_INVALID, "NULL text returned %d, want CODIR_ERR_INVALID", n);
}

static void test_tokenizer_long_word(void)
{
    codir_vocab *vocab = test_vocab(0);
    char text[1024];
    int got[256], count, i, ok;
    if (!vocab) return;

    /* 100 characters: x then 99 x "##x" pieces. */
    memset(text, 'x', 100);
    text[100] = '\0';
    count = codir_tokenize(vocab, text, got, 256);
    CHECK(count == 100, "100 x: %d pieces, want 100", count);
    ok = count == 100 && got[0] == 23;
    for (i = 1; ok && i < 100; i++) ok = got[i] == 24;
    CHECK(ok, "100 x: want x followed by 99 ##x");

    /* 101 characters: [UNK], and the next word is read normally. */
    memset(text, 'x', 101);
    strcpy(text + 101, " hello");
    CHECK_TOKENS(vocab, text, 1, 11);
    memset(text, 'x', 300);
    strcpy(text + 300, ",hello");
    CHECK_TOKENS(vocab, text, 1, 12, 11);

    /* The limit counts characters, not bytes: 100 two-byte characters still match. */
    for (i = 0; i < 100; i++) memcpy(text + 2 * i, "\xC3\xA9", 2);
    text[200] = '\0';
    count = codir_tokenize(vocab, text, got, 256);
    CHECK(count == 100, "100 e-acute: %d pieces, want 100", count);
    ok = count == 100 && got[0] == 17;
    for (i = 1; ok && i < 100; i++) ok = got[i] == 18;
    CHECK(ok, "100 e-acute: want e-acute followed by 99 ##e-acute");
    memcpy(text + 200, "\xC3\xA9", 3);
    CHECK_TOKENS(vocab, text, 1);
    codir_vocab_free(vocab);
}

static void test_tokenizer_control_chars(void)
{
    codir_vocab *vocab = test_vocab(0);
    if (!vocab) return;
    /* Dropped inside a word, without splitting it: C0 controls, DEL, U+0085, U+FFFD,
       U+200B ZERO WIDTH SPACE, U+FEFF, form feed. */
    CHECK_TOKENS(vocab, "hel\x01lo", 11);
    CHECK_TOKENS(vocab, "hel\x7flo", 11);
    CHECK_TOKENS(vocab, "hel\xC2\x85lo", 11);
    CHECK_TOKENS(vocab, "hel\xEF\xBF\xBDlo", 11);
    CHECK_TOKENS(vocab, "hel\xE2\x80\x8Blo", 11);
    CHECK_TOKENS(vocab, "\xEF\xBB\xBFhello", 11);
    CHECK_TOKENS(vocab, "hel\flo", 11);
    /* Whitespace splits: tab, CR, LF, U+00A0, U+3000, U+2028. */
    CHECK_TOKENS(vocab, "hello\tworld\r\nhello", 11, 13, 11);
    CHECK_TOKENS(vocab, "hello\xC2\xA0world", 11, 13);
    CHECK_TOKENS(vocab, "hello\xE3\x80\x80world", 11, 13);
    CHECK_TOKENS(vocab, "hello\xE2\x80\xA8world", 11, 13);
    CHECK(codir_tokenize(vocab, "  \t\r\n ", NULL, 0) == 0, "whitespace alone must give no pieces");
    codir_vocab_free(vocab);
}

static void test_tokenizer_cjk_split(void)
{
    codir_vocab *vocab = test_vocab(0);
    if (!vocab) return;
    /* Each ideograph is its own word, so the second is 20, not "##" 21. */
    CHECK_TOKENS(vocab, "\xE4\xB8\xAD\xE6\x96\x87", 19, 20);
    CHECK_TOKENS(vocab, "x\xE4\xB8\xADx", 23, 19, 23);
    codir_vocab_free(vocab);
}

static void test_tokenizer_invalid_utf8(void)
{
    codir_vocab *vocab = test_vocab(0);
    unsigned long long state = 12345;
    int iteration;
    if (!vocab) return;
    /* Each invalid byte is dropped like U+FFFD and does not split the word. */
    CHECK_TOKENS(vocab, "hel\xFFlo", 11);
    CHECK_TOKENS(vocab, "hel\xC3lo", 11);          /* lead byte without continuation */
    CHECK_TOKENS(vocab, "hel\xC0\xAFlo", 11);      /* overlong "/" */
    CHECK_TOKENS(vocab, "hel\xED\xA0\x80lo", 11);  /* surrogate U+D800 */
    CHECK_TOKENS(vocab, "hel\xF4\x90\x80\x80lo", 11); /* above U+10FFFF */
    CHECK_TOKENS(vocab, "hel\x80\xBFlo", 11);      /* stray continuation bytes */
    CHECK_TOKENS(vocab, "hello\xE4\xB8", 11);      /* truncated at the end */

    /* Random bytes: no crash, and every id in range. */
    for (iteration = 0; iteration < 20000; iteration++) {
        char text[65];
        int ids[130], length = (int)check_uniform(&state, 0, 64), i, count;
        for (i = 0; i < length; i++) text[i] = (char)(1 + (int)check_uniform(&state, 0, 255));
        text[length] = '\0';
        count = codir_tokenize(vocab, text, ids, 130);
        if (count < 0 || count > 130) {
            CHECK(0, "random text %d: tokenize returned %d", iteration, count);
            break;
        }
        for (i = 0; i < count; i++) {
            if (ids[i] < 0 || ids[i] >= vocab->size) {
                CHECK(0, "random text %d: id %d out of range", iteration, ids[i]);
                break;
            }
        }
    }
    codir_vocab_free(vocab);
}

static void test_tokenizer_count_like_snprintf(void)
{
    codir_vocab *vocab = test_vocab(0);
    int ids[4] = {-7, -7, -7, -7}, count;
    if (!vocab) return;
    count = codir_tokenize(vocab, "hello , world !", ids, 2);
    CHECK(count == 4, "returned %d, want the full count 4", count);
    CHECK_IDS("first max_ids ids", ids, 2, 11, 12);
    CHECK_IDS("ids past max_ids", ids + 2, 2, -7, -7);
    count = codir_tokenize(vocab, "hello , world !", NULL, 0);
    CHECK(count == 4, "with NULL ids returned %d, want 4", count);
    count = codir_tokenize(vocab, "", ids, 4);
    CHECK(count == 0, "empty text returned %d, want 0", count);
    count = codir_tokenize(vocab, "hello", ids, -1);
    CHECK(count == CODIR_ERR_INVALID, "max_ids -1 returned %d, want CODIR_ERR_INVALID", count);
    count = codir_tokenize(vocab, NULL, ids, 4);
    CHECK(count == CODIR_ERR_INVALID, "NULL text returned %d, want CODIR_ERR_INVALID", count);
    codir_vocab_free(vocab);
}

static void test_encode_truncation(void)
{
    codir_vocab *vocab = test_vocab(0);
    int ids[12], length, i;
    if (!vocab) return;

    for (i = 0; i < 12; i++) ids[i] = -7;
    length = codir_encode(vocab, "unaffable unable", ids, 10);
    CHECK_IDS("max_len 10", ids, length, 2, 15, 7, 5, 7, 3);
    CHECK(ids[6] == -7, "wrote past the sequence: %d", ids[6]);

    /* Truncation keeps [SEP] last. */
    for (i = 0; i < 12; i++) ids[i] = -7;
    length = codir_encode(vocab, "unaffable unable", ids, 4);
    CHECK_IDS("max_len 4", ids, length, 2, 15, 7, 3);
    CHECK(ids[4] == -7, "max_len 4: wrote past max_len: %d", ids[4]);

    length = codir_encode(vocab, "unaffable", ids, 2);
    CHECK_IDS("max_len 2", ids, length, 2, 3);
    length = codir_encode(vocab, "", ids, 8);
    CHECK_IDS("empty text", ids, length, 2, 3);

    length = codir_encode(vocab, "hello", ids, 1);
    CHECK(length == CODIR_ERR_INVALID, "max_len 1 returned %d, want CODIR_ERR_INVALID", length);
    CHECK(strstr(codir_last_error(), "max_len") != NULL, "message does not name max_len: %s", codir_last_error());
    codir_vocab_free(vocab);
}

/* ---- vocab.txt ---- */

static void test_vocab_load_crlf(void)
{
    /* CRLF, a BOM, special tokens out of order, no final newline. */
    static const char text[] = "\xEF\xBB\xBFhello\r\n[UNK]\r\n[SEP]\r\n[PAD]\r\n[MASK]\r\n[CLS]\r\n##lo\r\nworld";
    codir_vocab *vocab = load_vocab_from_text(text, sizeof text - 1, 1);
    CHECK(vocab != NULL, "load failed: %s", codir_last_error());
    if (!vocab) return;
    CHECK(vocab->size == 8, "size %d, want 8", vocab->size);
    CHECK_INT("unk_id", vocab->unk_id, 1);
    CHECK_INT("sep_id", vocab->sep_id, 2);
    CHECK_INT("pad_id", vocab->pad_id, 3);
    CHECK_INT("mask_id", vocab->mask_id, 4);
    CHECK_INT("cls_id", vocab->cls_id, 5);
    CHECK(codir_vocab_id(vocab, "hello") == 0, "id of hello %d, want 0", codir_vocab_id(vocab, "hello"));
    CHECK(codir_vocab_id(vocab, "##lo") == 6, "id of ##lo %d, want 6", codir_vocab_id(vocab, "##lo"));
    CHECK(codir_vocab_id(vocab, "world") == 7, "id of world %d, want 7", codir_vocab_id(vocab, "world"));
    CHECK(codir_vocab_id(vocab, "hello\r") == -1, "a token kept its CR");
    CHECK(codir_vocab_id(vocab, "absent") == -1, "absent token found");
    CHECK(codir_vocab_token(vocab, 7) != NULL, "token 7 is NULL");
    if (codir_vocab_token(vocab, 7)) CHECK(strcmp(codir_vocab_token(vocab, 7), "world") == 0, "token 7 is not world");
    CHECK(codir_vocab_token(vocab, 8) == NULL, "id 8 is out of range but returned a token");
    CHECK(codir_vocab_token(vocab, -1) == NULL, "id -1 is out of range but returned a token");
    codir_vocab_free(vocab);
}

static void test_vocab_load_missing_special(void)
{
    static const char *const tokens[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"};
    char *text = join_lines(tokens, 5);
    char path[512];
    codir_vocab *vocab;
    if (!text || !write_temp_file(path, sizeof path, ".txt", text, strlen(text))) {
        CHECK(0, "cannot write a temporary file");
        free(text);
        return;
    }
    vocab = codir_vocab_load(path, 0);
    CHECK(vocab == NULL, "a vocabulary without [MASK] loaded");
    CHECK(strstr(codir_last_error(), "[MASK]") != NULL, "message does not name [MASK]: %s", codir_last_error());
    CHECK(strstr(codir_last_error(), path) != NULL, "message does not name the file: %s", codir_last_error());
    codir_vocab_free(vocab);
    remove(path);
    free(text);
}

static void test_vocab_load_missing_file(void)
{
    char path[512];
    codir_vocab *vocab;
    CHECK(make_temp_path(path, sizeof path, ".txt"), "cannot make a temporary path");
    vocab = codir_vocab_load(path, 0);
    CHECK(vocab == NULL, "loading a missing file succeeded");
    CHECK(strstr(codir_last_error(), path) != NULL, "message does not name the file: %s", codir_last_error());
    codir_vocab_free(vocab);
}

static void test_vocab_load_duplicate_later_wins(void)
{
    static const char *const tokens[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "a"};
    codir_vocab *vocab = load_vocab(tokens, 8, 0);
    CHECK(vocab != NULL, "load failed: %s", codir_last_error());
    if (!vocab) return;
    CHECK(vocab->size == 8, "size %d, want 8", vocab->size);
    CHECK(codir_vocab_id(vocab, "a") == 7, "id of a %d, want the later line 7", codir_vocab_id(vocab, "a"));
    CHECK(strcmp(vocab->tokens[5], "a") == 0, "token 5 changed");
    codir_vocab_free(vocab);
}

static void test_vocab_save_round_trip(void)
{
    codir_vocab *vocab = test_vocab(0), *loaded;
    char path[512], tmp_path[600];
    FILE *leftover;
    int rc, i;
    if (!vocab) return;
    CHECK(make_temp_path(path, sizeof path, ".txt"), "cannot make a temporary path");
    rc = codir_vocab_save(vocab, path);
    CHECK(rc == 0, "save returned %d: %s", rc, codir_last_error());
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp", path);
    leftover = fopen(tmp_path, "rb");
    CHECK(leftover == NULL, "%s was left behind", tmp_path);
    if (leftover) {
        fclose(leftover);
        remove(tmp_path);
    }

    loaded = codir_vocab_load(path, 0);
    CHECK(loaded != NULL, "reload failed: %s", codir_last_error());
    if (loaded) {
        CHECK(loaded->size == TEST_TOKEN_COUNT, "size %d, want %d", loaded->size, TEST_TOKEN_COUNT);
        for (i = 0; i < TEST_TOKEN_COUNT && i < loaded->size; i++)
            CHECK(strcmp(loaded->tokens[i], test_tokens[i]) == 0, "token %d is '%s', want '%s'", i, loaded->tokens[i],
                  test_tokens[i]);
    }
    codir_vocab_free(loaded);
    remove(path);

    /* A token with a line break cannot be stored on one line. */
    {
        char *saved = vocab->tokens[11];
        char broken[] = "hel\nlo";
        vocab->tokens[11] = broken;
        rc = codir_vocab_save(vocab, path);
        vocab->tokens[11] = saved;
        CHECK(rc == CODIR_ERR_INVALID, "saving a token with a line break returned %d", rc);
        remove(path);
    }
    codir_vocab_free(vocab);
}

/* ---- vocabulary builder ---- */

/* Checks tokens[5..] of vocab against want[want_count]. */
static void check_learned_at(int line, const codir_vocab *vocab, const char *const *want, int want_count)
{
    int i;
    if (!vocab) {
        check_fail(__FILE__, line, "build failed: %s", codir_last_error());
        return;
    }
    if (vocab->size != 5 + want_count) {
        check_fail(__FILE__, line, "size %d, want %d", vocab->size, 5 + want_count);
        return;
    }
    for (i = 0; i < want_count; i++) {
        if (strcmp(vocab->tokens[5 + i], want[i]) != 0) {
            check_fail(__FILE__, line, "token %d is '%s', want '%s'", 5 + i, vocab->tokens[5 + i], want[i]);
            return;
        }
    }
}
#define CHECK_LEARNED(vocab, ...)                                                               \
    do {                                                                                        \
        static const char *const want_[] = {__VA_ARGS__};                                       \
        check_learned_at(__LINE__, vocab, want_, (int)(sizeof want_ / sizeof want_[0]));        \
    } while (0)

/* Checks that the special tokens have ids 0..4, as the builder assigns them. */
static void check_special_ids_at(int line, const codir_vocab *vocab)
{
    if (vocab->pad_id != 0) check_fail(__FILE__, line, "pad_id is %d, want 0", vocab->pad_id);
    if (vocab->unk_id != 1) check_fail(__FILE__, line, "unk_id is %d, want 1", vocab->unk_id);
    if (vocab->cls_id != 2) check_fail(__FILE__, line, "cls_id is %d, want 2", vocab->cls_id);
    if (vocab->sep_id != 3) check_fail(__FILE__, line, "sep_id is %d, want 3", vocab->sep_id);
    if (vocab->mask_id != 4) check_fail(__FILE__, line, "mask_id is %d, want 4", vocab->mask_id);
}

static void test_vocab_build_hand_example(void)
{
    static const char *const ab_ac[] = {"ab ab", "ab ac"};
    static const char *const ab_cd[] = {"ab cd"};
    static const char *const abc[] = {"abc abc"};
    static const char *const xbc_ybc[] = {"xbc ybc"};
    codir_vocab *vocab;
    int i;

    vocab = codir_vocab_build(NULL, 0, 5, 0, 0);
    CHECK(vocab != NULL, "build without texts failed: %s", codir_last_error());
    if (vocab) {
        CHECK(vocab->size == 5, "no texts: size %d, want the 5 special tokens only", vocab->size);
        static const char *const specials[5] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
        for (i = 0; i < 5; i++)
            CHECK(strcmp(vocab->tokens[i], specials[i]) == 0, "token %d is %s, want %s", i, vocab->tokens[i],
                  specials[i]);
        check_special_ids_at(__LINE__, vocab);
    }
    codir_vocab_free(vocab);

    /* Words ab x3, ac x1. Alphabet a b c ##a ##b ##c, then (a, ##b) with count 3
       merges before (a, ##c) with count 1. */
    vocab = codir_vocab_build(ab_ac, 2, 12, 0, 0);
    CHECK_LEARNED(vocab, "a", "b", "c", "##a", "##b", "##c", "ab");
    codir_vocab_free(vocab);
    vocab = codir_vocab_build(ab_ac, 2, 100, 1, 0);
    CHECK_LEARNED(vocab, "a", "b", "c", "##a", "##b", "##c", "ab", "ac");
    codir_vocab_free(vocab);
    /* min_frequency 2 keeps the pair seen once from merging. */
    vocab = codir_vocab_build(ab_ac, 2, 100, 2, 0);
    CHECK_LEARNED(vocab, "a", "b", "c", "##a", "##b", "##c", "ab");
    codir_vocab_free(vocab);

    /* A tie between (a, ##b) and (c, ##d) goes to the smaller left id: a (5) < c (7). */
    vocab = codir_vocab_build(ab_cd, 1, 14, 0, 0);
    CHECK_LEARNED(vocab, "a", "b", "c", "d", "##a", "##b", "##c", "##d", "ab");
    codir_vocab_free(vocab);

    /* (a, ##b) and (##b, ##c) both count 2; a (5) < ##b (9), then (ab, ##c). */
    vocab = codir_vocab_build(abc, 1, 100, 0, 0);
    CHECK_LEARNED(vocab, "a", "b", "c", "##a", "##b", "##c", "ab", "abc");
    codir_vocab_free(vocab);

    /* Every character gets both forms, "##x" too. (##b, ##c) counts 2 and merges into
       a continuation piece first; then x (7) before y (8). */
    vocab = codir_vocab_build(xbc_ybc, 1, 100, 0, 0);
    CHECK_LEARNED(vocab, "b", "c", "x", "y", "##b", "##c", "##x", "##y", "##bc", "xbc", "ybc");
    codir_vocab_free(vocab);
}

static void test_vocab_build_small_target(void)
{
    static const char *const texts[] = {"aaa b"};
    codir_vocab *vocab;
    /* Forms: ##a 2, a 1, b 1, ##b 0. Two slots keep ##a and a (a before b by code
       point), listed word-initial first. */
    vocab = codir_vocab_build(texts, 1, 7, 0, 0);
    CHECK_LEARNED(vocab, "a", "##a");
    if (vocab) {
        CHECK_TOKENS(vocab, "aaa b", 5, 6, 6, 1);
    }
    codir_vocab_free(vocab);

    vocab = codir_vocab_build(texts, 1, 4, 0, 0);
    CHECK(vocab == NULL, "target_size 4 must fail");
    CHECK(strstr(codir_last_error(), "target_size") != NULL, "message does not name target_size: %s",
          codir_last_error());
    codir_vocab_free(vocab);
}

static void test_vocab_build_bad_arguments(void)
{
    static const char *const texts[] = {"fine", NULL};
    codir_vocab *vocab = codir_vocab_build(texts, 2, 100, 0, 0);
    CHECK(vocab == NULL, "a NULL text must fail");
    CHECK(strstr(codir_last_error(), "texts[1]") != NULL, "message does not name texts[1]: %s", codir_last_error());
    codir_vocab_free(vocab);
    vocab = codir_vocab_build(texts, 1, 100, -1, 0);
    CHECK(vocab == NULL, "min_frequency -1 must fail");
    codir_vocab_free(vocab);
    vocab = codir_vocab_build(NULL, 3, 100, 0, 0);
    CHECK(vocab == NULL, "NULL texts with count 3 must fail");
    codir_vocab_free(vocab);
}

static void test_vocab_build_lowercase(void)
{
    static const char *const texts[] = {"Hello HELLO, hello!"};
    codir_vocab *vocab = codir_vocab_build(texts, 1, 100, 0, 1);
    CHECK(vocab != NULL, "build failed: %s", codir_last_error());
    if (!vocab) return;
    CHECK(vocab->lowercase == 1, "lowercase flag %d, want 1", vocab->lowercase);
    CHECK(codir_vocab_id(vocab, "H") == -1, "an uppercase piece was learned");
    CHECK(codir_vocab_id(vocab, "hello") >= 0, "hello was not learned");
    CHECK(codir_vocab_id(vocab, ",") >= 0, "',' was not learned");
    CHECK(codir_vocab_id(vocab, "!") >= 0, "'!' was not learned");
    CHECK(codir_vocab_id(vocab, "hello,") == -1, "punctuation was merged into a word");
    {
        int ids[8], count = codir_tokenize(vocab, "HELLO!", ids, 8);
        CHECK(count == 2, "HELLO! tokenized to %d pieces, want 2", count);
        if (count == 2) {
            CHECK_INT("HELLO! piece 0", ids[0], codir_vocab_id(vocab, "hello"));
            CHECK_INT("HELLO! piece 1", ids[1], codir_vocab_id(vocab, "!"));
        }
    }
    codir_vocab_free(vocab);
}

/* A deterministic corpus of made-up words from syllables, a few thousand distinct. */
static char **make_corpus(int sentences, unsigned long long seed)
{
    static const char *const syllables[] = {"ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dra",
                                            "qu", "ing", "er", "on", "st", "ab", "ze", "yo", "\xC3\xA9t", "fu"};
    static const char *const marks[] = {"", "", "", ",", ".", "!", "'s"};
    char **texts = (char **)calloc((size_t)sentences, sizeof *texts);
    int s;
    if (!texts) return NULL;
    for (s = 0; s < sentences; s++) {
        char buffer[1024];
        size_t used = 0;
        int words = 4 + (int)check_uniform(&seed, 0, 12), w;
        for (w = 0; w < words; w++) {
            /* Zipf-like: short common words and long rare ones. */
            int parts = 1 + (int)(check_uniform(&seed, 0, 1) * check_uniform(&seed, 0, 1) * 6), k;
            if (w > 0) buffer[used++] = ' ';
            for (k = 0; k < parts; k++) {
                const char *syllable = syllables[(int)(check_uniform(&seed, 0, 1) * check_uniform(&seed, 0, 1) * 20)];
                size_t n = strlen(syllable);
                memcpy(buffer + used, syllable, n);
                used += n;
            }
            if (check_uniform(&seed, 0, 1) < 0.1) buffer[used++] = 'K';
            {
                const char *mark = marks[(int)check_uniform(&seed, 0, 7)];
                memcpy(buffer + used, mark, strlen(mark));
                used += strlen(mark);
            }
        }
        buffer[used] = '\0';
        texts[s] = (char *)malloc(used + 1);
        if (texts[s]) memcpy(texts[s], buffer, used + 1);
    }
    return texts;
}

static void free_corpus(char **texts, int sentences)
{
    int s;
    if (!texts) return;
    for (s = 0; s < sentences; s++) free(texts[s]);
    free(texts);
}

static void test_vocab_build_corpus_properties(void)
{
    enum { SENTENCES = 2400, TARGET = 1000 };
    char **texts = make_corpus(SENTENCES, 99);
    codir_vocab *vocab = NULL, *again = NULL, *loaded = NULL;
    char path[512];
    int i, s, unknown = 0, duplicates = 0, ok;

    CHECK(texts != NULL, "out of memory");
    if (!texts) return;
    for (s = 0; s < SENTENCES; s++) {
        if (!texts[s]) {
            CHECK(0, "out of memory");
            free_corpus(texts, SENTENCES);
            return;
        }
    }

    vocab = codir_vocab_build((const char *const *)texts, SENTENCES, TARGET, 2, 1);
    CHECK(vocab != NULL, "build failed: %s", codir_last_error());
    if (!vocab) goto done;
    CHECK(vocab->size == TARGET, "size %d, want %d", vocab->size, TARGET);
    check_special_ids_at(__LINE__, vocab);

    /* Every token is distinct: its lookup returns its own id. */
    for (i = 0; i < vocab->size; i++) duplicates += codir_vocab_id(vocab, vocab->tokens[i]) != i;
    CHECK(duplicates == 0, "%d tokens are duplicates", duplicates);

    /* No training word becomes [UNK]. */
    for (s = 0; s < SENTENCES; s++) {
        int ids[256], count = codir_tokenize(vocab, texts[s], ids, 256);
        CHECK(count >= 0, "sentence %d: tokenize failed: %s", s, codir_last_error());
        CHECK(count <= 256, "sentence %d: %d pieces, more than the 256 expected", s, count);
        for (i = 0; i < count && i < 256; i++) unknown += ids[i] == vocab->unk_id;
    }
    CHECK(unknown == 0, "%d [UNK] pieces in the training sentences", unknown);

    /* The same input gives the same vocabulary. */
    again = codir_vocab_build((const char *const *)texts, SENTENCES, TARGET, 2, 1);
    CHECK(again != NULL, "second build failed: %s", codir_last_error());
    if (again) CHECK_INT("second build size", again->size, vocab->size);
    ok = again != NULL && again->size == vocab->size;
    for (i = 0; ok && i < vocab->size; i++) ok = strcmp(again->tokens[i], vocab->tokens[i]) == 0;
    CHECK(ok, "second build differs at token %d", i - 1);

    /* Save and load keep every id. */
    CHECK(make_temp_path(path, sizeof path, ".txt"), "cannot make a temporary path");
    CHECK(codir_vocab_save(vocab, path) == 0, "save failed: %s", codir_last_error());
    loaded = codir_vocab_load(path, 1);
    remove(path);
    CHECK(loaded != NULL, "reload failed: %s", codir_last_error());
    if (loaded) CHECK_INT("reloaded size", loaded->size, vocab->size);
    ok = loaded != NULL && loaded->size == vocab->size;
    for (i = 0; ok && i < vocab->size; i++) ok = strcmp(loaded->tokens[i], vocab->tokens[i]) == 0;
    CHECK(ok, "reloaded vocabulary differs at token %d", i - 1);
    if (loaded) check_special_ids_at(__LINE__, loaded);

done:
    codir_vocab_free(vocab);
    codir_vocab_free(again);
    codir_vocab_free(loaded);
    free_corpus(texts, SENTENCES);
}

static void test_vocab_build_stops_when_merged_out(void)
{
    /* 3 distinct words can merge at most into 3 whole-word pieces plus the pieces on
       the way: "abc" (a ##b ##c) needs 2 merges, "de" 1, "f" none. */
    static const char *const texts[] = {"abc de f abc"};
    codir_vocab *vocab = codir_vocab_build(texts, 1, 1000, 0, 0);
    CHECK(vocab != NULL, "build failed: %s", codir_last_error());
    if (!vocab) return;
    /* 5 specials + 6 characters x 2 forms + 3 merges (ab, abc, de). */
    CHECK(vocab->size == 5 + 12 + 3, "size %d, want 20", vocab->size);
    CHECK(codir_vocab_id(vocab, "abc") >= 0, "abc was not learned");
    CHECK(codir_vocab_id(vocab, "de") >= 0, "de was not learned");
    codir_vocab_free(vocab);
}

/* ---- TSV ---- */

/* Writes content to a temporary .tsv, loads it and removes the file. The path is
   stored in path[512] for the error message checks. */
static codir_dataset *load_tsv_text(const char *content, size_t length, char *path)
{
    codir_dataset *data;
    if (!write_temp_file(path, 512, ".tsv", content, length)) {
        CHECK(0, "cannot write a temporary file");
        return NULL;
    }
    data = codir_dataset_load_tsv(path);
    remove(path);
    return data;
}
#define LOAD_TSV(literal, path) load_tsv_text(literal, sizeof(literal) - 1, path)

/* Checks that loading failed with a message containing "path:line:" and `detail`. */
static void check_tsv_error_at(int line, const codir_dataset *data, const char *path, int bad_line,
                               const char *detail)
{
    char where[600];
    if (data) {
        check_fail(__FILE__, line, "the load succeeded, want an error at line %d", bad_line);
        return;
    }
    snprintf(where, sizeof where, "%s:%d:", path, bad_line);
    if (!strstr(codir_last_error(), where))
        check_fail(__FILE__, line, "message does not contain '%s': %s", where, codir_last_error());
    if (!strstr(codir_last_error(), detail))
        check_fail(__FILE__, line, "message does not contain '%s': %s", detail, codir_last_error());
}

static void test_tsv_quotes_literal(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("sentence\tlabel\n\"quoted\" text\t1\nit's \"open\t0\n", path);
    CHECK(data != NULL, "load failed: %s", codir_last_error());
    if (!data) return;
    CHECK(data->count == 2, "count %d, want 2", data->count);
    if (data->count == 2) {
        CHECK(strcmp(data->texts[0], "\"quoted\" text") == 0, "text 0 is [%s]", data->texts[0]);
        CHECK(strcmp(data->texts[1], "it's \"open") == 0, "text 1 is [%s]", data->texts[1]);
        CHECK_INT("label 0", data->labels[0], 1);
        CHECK_INT("label 1", data->labels[1], 0);
    }
    CHECK(data->num_classes == 2, "num_classes %d, want 2", data->num_classes);
    codir_dataset_free(data);
}

static void test_tsv_crlf_bom_no_final_newline(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("\xEF\xBB\xBFsentence\tlabel\r\nfirst one\t0\r\nsecond\t2", path);
    CHECK(data != NULL, "load failed: %s", codir_last_error());
    if (!data) return;
    CHECK(data->count == 2, "count %d, want 2", data->count);
    if (data->count == 2) {
        CHECK(strcmp(data->texts[0], "first one") == 0, "text 0 is [%s]", data->texts[0]);
        CHECK(strcmp(data->texts[1], "second") == 0, "text 1 is [%s]", data->texts[1]);
        CHECK_INT("label 0", data->labels[0], 0);
        CHECK_INT("label 1", data->labels[1], 2);
    }
    CHECK(data->num_classes == 3, "num_classes %d, want 3", data->num_classes);
    codir_dataset_free(data);
}

static void test_tsv_trailing_empty_lines(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("sentence\tlabel\na b\t1\n\r\n\n", path);
    CHECK(data != NULL, "load failed: %s", codir_last_error());
    if (!data) return;
    CHECK(data->count == 1, "count %d, want 1", data->count);
    if (data->count == 1) CHECK(strcmp(data->texts[0], "a b") == 0, "text 0 is [%s]", data->texts[0]);
    codir_dataset_free(data);
}

static void test_tsv_columns_by_name(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("label\tsentence\n1\thello\n0\tbye\n", path);
    CHECK(data != NULL, "load failed: %s", codir_last_error());
    if (data) CHECK_INT("count", data->count, 2);
    if (data && data->count == 2) {
        CHECK(strcmp(data->texts[0], "hello") == 0, "text 0 is [%s]", data->texts[0]);
        CHECK_INT("label 0", data->labels[0], 1);
        CHECK(strcmp(data->texts[1], "bye") == 0, "text 1 is [%s]", data->texts[1]);
        CHECK_INT("label 1", data->labels[1], 0);
    }
    codir_dataset_free(data);

    data = LOAD_TSV("index\tsentence\tlabel\n0\thi there\t4\n", path);
    CHECK(data != NULL, "load with an extra column failed: %s", codir_last_error());
    if (data) CHECK_INT("count", data->count, 1);
    if (data && data->count == 1) {
        CHECK(strcmp(data->texts[0], "hi there") == 0, "text 0 is [%s]", data->texts[0]);
        CHECK_INT("label 0", data->labels[0], 4);
        CHECK(data->num_classes == 5, "num_classes %d, want 5", data->num_classes);
    }
    codir_dataset_free(data);
}

static void test_tsv_bad_field_count(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("sentence\tlabel\na\t1\nb\tc\t0\nd\t1\n", path);
    check_tsv_error_at(__LINE__, data, path, 3, "expected 2 tab-separated fields, found 3");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\r\na\t1\r\nno tab here\r\nd\t1\r\n", path);
    check_tsv_error_at(__LINE__, data, path, 3, "expected 2 tab-separated fields, found 1");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\na\t1\n\nd\t1\n", path);
    check_tsv_error_at(__LINE__, data, path, 3, "empty line");
    codir_dataset_free(data);
}

static void test_tsv_bad_label(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("sentence\tlabel\na\t1\nb\t0\nc\tpositive\n", path);
    check_tsv_error_at(__LINE__, data, path, 4, "invalid label 'positive'");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\na\t-1\n", path);
    check_tsv_error_at(__LINE__, data, path, 2, "invalid label '-1'");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\na\t\n", path);
    check_tsv_error_at(__LINE__, data, path, 2, "invalid label ''");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\na\t1 \n", path);
    check_tsv_error_at(__LINE__, data, path, 2, "invalid label '1 '");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\na\t99999999999\n", path);
    check_tsv_error_at(__LINE__, data, path, 2, "invalid label");
    codir_dataset_free(data);
}

static void test_tsv_missing_column(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("sentence\tclass\na\t1\n", path);
    check_tsv_error_at(__LINE__, data, path, 1, "no column named 'label'");
    codir_dataset_free(data);

    data = LOAD_TSV("a fine movie\t1\nbad\t0\n", path);
    check_tsv_error_at(__LINE__, data, path, 1, "no column named 'sentence'");
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\tlabel\na\t1\t1\n", path);
    check_tsv_error_at(__LINE__, data, path, 1, "twice");
    codir_dataset_free(data);
}

static void test_tsv_empty_and_missing_files(void)
{
    char path[512];
    codir_dataset *data = LOAD_TSV("", path);
    CHECK(data == NULL, "an empty file loaded");
    CHECK(strstr(codir_last_error(), path) != NULL, "message does not name the file: %s", codir_last_error());
    codir_dataset_free(data);

    data = LOAD_TSV("sentence\tlabel\n", path);
    CHECK(data == NULL, "a header without rows loaded");
    CHECK(strstr(codir_last_error(), "no rows") != NULL, "message does not say 'no rows': %s", codir_last_error());
    codir_dataset_free(data);

    CHECK(make_temp_path(path, sizeof path, ".tsv"), "cannot make a temporary path");
    data = codir_dataset_load_tsv(path);
    CHECK(data == NULL, "a missing file loaded");
    CHECK(strstr(codir_last_error(), path) != NULL, "message does not name the file: %s", codir_last_error());
    codir_dataset_free(data);
}

/* ---- sentence pairs and GLUE layouts ---- */

static void test_encode_pair_types(void)
{
    codir_vocab *vocab = test_vocab(0);
    int ids[16], types[16], length, i;
    if (!vocab) return;

    /* [CLS] hello [SEP] world ! [SEP]; types 0 up to the first [SEP], then 1. */
    for (i = 0; i < 16; i++) ids[i] = types[i] = -7;
    length = codir_encode_pair(vocab, "hello", "world!", ids, types, 16);
    CHECK_IDS("pair ids", ids, length, 2, 11, 3, 13, 14, 3);
    CHECK_IDS("pair types", types, length, 0, 0, 0, 1, 1, 1);
    CHECK(ids[6] == -7 && types[6] == -7, "wrote past the sequence");

    /* Single sentence through the pair function: types all 0. */
    length = codir_encode_pair(vocab, "hello world", NULL, ids, types, 16);
    CHECK_IDS("single ids", ids, length, 2, 11, 13, 3);
    CHECK_IDS("single types", types, length, 0, 0, 0, 0);

    /* types may be NULL; an empty second text still gets its [SEP]. */
    length = codir_encode_pair(vocab, "hello", "", ids, NULL, 16);
    CHECK_IDS("empty b", ids, length, 2, 11, 3, 3);

    /* max_len 3 holds only the special tokens; 2 cannot hold them. */
    length = codir_encode_pair(vocab, "hello", "world", ids, types, 3);
    CHECK_IDS("max_len 3", ids, length, 2, 3, 3);
    CHECK_IDS("max_len 3 types", types, length, 0, 0, 1);
    length = codir_encode_pair(vocab, "hello", "world", ids, types, 2);
    CHECK(length == CODIR_ERR_INVALID, "max_len 2 with a pair returned %d, want CODIR_ERR_INVALID", length);
    CHECK(strstr(codir_last_error(), "max_len") != NULL, "message does not name max_len: %s", codir_last_error());
    length = codir_encode_pair(vocab, NULL, "world", ids, types, 8);
    CHECK(length == CODIR_ERR_INVALID, "NULL a returned %d, want CODIR_ERR_INVALID", length);
    codir_vocab_free(vocab);
}

static void test_encode_pair_truncation(void)
{
    codir_vocab *vocab = test_vocab(0);
    int ids[32], types[32], length;
    if (!vocab) return;

    /* a = x x x x x (5 pieces), b = hello (1): m = 4 keeps b whole, a gets 3. */
    length = codir_encode_pair(vocab, "x x x x x", "hello", ids, types, 7);
    CHECK_IDS("longer first side cut", ids, length, 2, 23, 23, 23, 3, 11, 3);
    CHECK_IDS("types", types, length, 0, 0, 0, 0, 0, 1, 1);

    /* a = x x x (3), b = hello , world ! (4): m = 3, both cut: shorter a keeps 1,
       longer b keeps 2. */
    length = codir_encode_pair(vocab, "x x x", "hello , world !", ids, types, 6);
    CHECK_IDS("both cut", ids, length, 2, 23, 3, 11, 12, 3);

    /* A tie (3 and 3) with m = 3: the first side keeps 1, the second 2. */
    length = codir_encode_pair(vocab, "x x x", "hello , world", ids, types, 6);
    CHECK_IDS("tie", ids, length, 2, 23, 3, 11, 12, 3);

    /* Nothing cut when both fit exactly. */
    length = codir_encode_pair(vocab, "x x", "hello world", ids, types, 7);
    CHECK_IDS("exact fit", ids, length, 2, 23, 23, 3, 11, 13, 3);
    codir_vocab_free(vocab);
}

/* Loads tests/fixtures/glue/<name> with the automatic layout, or with options. */
static codir_dataset *load_glue(const char *name, const codir_tsv_options *options, char *path, size_t size)
{
    static const char *const dirs[] = {"tests/fixtures/glue", "fixtures/glue"};
    size_t i;
    for (i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        FILE *probe;
        snprintf(path, size, "%s/%s", dirs[i], name);
        probe = fopen(path, "rb");
        if (probe) {
            fclose(probe);
            return options ? codir_dataset_load_tsv_opts(path, options) : codir_dataset_load_tsv(path);
        }
    }
    CHECK(0, "cannot find the fixture tests/fixtures/glue/%s", name);
    return NULL;
}

#define CHECK_STR(what, got, want)                                                            \
    do {                                                                                      \
        const char *got_ = (got);                                                             \
        CHECK(got_ != NULL && strcmp(got_, want) == 0, "%s is [%s], want [%s]", what,         \
              got_ ? got_ : "(null)", want);                                                  \
    } while (0)

static void test_tsv_glue_pair_layouts(void)
{
    char path[512];
    codir_dataset *data;

    data = load_glue("mrpc.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "MRPC: %s", codir_last_error());
    if (data) {
        CHECK_INT("MRPC count", data->count, 3);
        CHECK(data->texts_b != NULL, "MRPC has no second texts");
        if (data->count == 3 && data->texts_b) {
            CHECK_STR("MRPC text 1", data->texts[1],
                      "Yucaipa owned Dominick's before selling the chain to Safeway in 1998 for $2.5 billion.");
            CHECK_STR("MRPC text b 2", data->texts_b[2],
                      "On June 10, the ship's owners had published an advertisement on the Internet.");
            CHECK_INT("MRPC label 0", data->labels[0], 1);
            CHECK_INT("MRPC label 1", data->labels[1], 0);
        }
        CHECK_INT("MRPC classes", data->num_classes, 2);
        CHECK(data->label_names == NULL, "MRPC: labels are ids, but label names were set");
        CHECK(data->targets == NULL, "MRPC: classification, but targets were set");
        CHECK(!data->is_regression, "MRPC: read as regression");
    }
    codir_dataset_free(data);

    data = load_glue("qnli.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "QNLI: %s", codir_last_error());
    if (data) {
        CHECK_INT("QNLI count", data->count, 3);
        if (data->count == 3 && data->texts_b) {
            CHECK_STR("QNLI question 2", data->texts[2], "What is the minimum required if you want to teach?");
            CHECK_STR("QNLI sentence 2", data->texts_b[2], "In most countries a degree is required.");
            CHECK_INT("QNLI label 0", data->labels[0], 0);
            CHECK_INT("QNLI label 1", data->labels[1], 1);
        }
        CHECK_INT("QNLI classes", data->num_classes, 2);
        if (data->label_names) {
            CHECK_STR("QNLI name 0", data->label_names[0], "entailment");
            CHECK_STR("QNLI name 1", data->label_names[1], "not_entailment");
        } else {
            CHECK(0, "QNLI has no label names");
        }
    }
    codir_dataset_free(data);

    /* RTE: BOM and CRLF. */
    data = load_glue("rte.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "RTE: %s", codir_last_error());
    if (data) {
        CHECK_INT("RTE count", data->count, 2);
        if (data->count == 2 && data->texts_b) {
            CHECK_STR("RTE text b 0", data->texts_b[0], "Weapons of Mass Destruction Found in Iraq.");
            CHECK_INT("RTE label 0", data->labels[0], 1);
            CHECK_INT("RTE label 1", data->labels[1], 0);
        }
    }
    codir_dataset_free(data);

    /* STS-B: regression, no final newline. */
    data = load_glue("stsb.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "STS-B: %s", codir_last_error());
    if (data) {
        CHECK_INT("STS-B count", data->count, 3);
        CHECK(data->is_regression == 1, "STS-B is not read as regression");
        CHECK(data->targets != NULL, "STS-B has no targets");
        CHECK_INT("STS-B classes", data->num_classes, 1);
        if (data->count == 3 && data->targets && data->texts_b) {
            CHECK(data->targets[0] == 5.0f && data->targets[1] == 3.8f && data->targets[2] == 0.0f,
                  "STS-B targets %g %g %g, want 5 3.8 0", data->targets[0], data->targets[1], data->targets[2]);
            CHECK_STR("STS-B text 1", data->texts[1], "A man is playing a large flute.");
            CHECK_STR("STS-B text b 1", data->texts_b[1], "A man is playing a flute.");
            CHECK_INT("STS-B label 2", data->labels[2], 0);
        }
    }
    codir_dataset_free(data);

    data = load_glue("qqp.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "QQP: %s", codir_last_error());
    if (data) {
        CHECK_INT("QQP count", data->count, 2);
        if (data->count == 2 && data->texts_b) {
            CHECK_STR("QQP question2 1", data->texts_b[1], "How do you control your horniness?");
            CHECK_INT("QQP label 0", data->labels[0], 0);
            CHECK_INT("QQP label 1", data->labels[1], 1);
        }
    }
    codir_dataset_free(data);

    /* SST-2 stays single: no second texts. */
    data = load_glue("sst2.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "SST-2: %s", codir_last_error());
    if (data) {
        CHECK_INT("SST-2 count", data->count, 3);
        CHECK(data->texts_b == NULL, "SST-2 got second texts");
        if (data->count == 3) CHECK_STR("SST-2 text 1", data->texts[1], "contains no wit , only labored gags ");
    }
    codir_dataset_free(data);
}

static void test_tsv_mnli_labels_stable(void)
{
    char path[512];
    codir_dataset *train = load_glue("mnli_train.tsv", NULL, path, sizeof path);
    codir_dataset *dev = load_glue("mnli_dev.tsv", NULL, path, sizeof path);
    CHECK(train != NULL, "MNLI train: %s", codir_last_error());
    CHECK(dev != NULL, "MNLI dev: %s", codir_last_error());
    if (train && dev && train->count == 4 && dev->count == 2 && train->texts_b) {
        /* entailment 0, neutral 1, contradiction 2 in both files, whatever order the
           names appear in. */
        CHECK_INT("train label 0 (neutral)", train->labels[0], 1);
        CHECK_INT("train label 1 (entailment)", train->labels[1], 0);
        CHECK_INT("train label 3 (contradiction)", train->labels[3], 2);
        CHECK_INT("dev label 0 (neutral)", dev->labels[0], 1);
        CHECK_INT("dev label 1 (contradiction)", dev->labels[1], 2);
        CHECK_INT("classes", train->num_classes, 3);
        CHECK_INT("dev classes", dev->num_classes, 3);
        CHECK_STR("train text b 0", train->texts_b[0], "Product and geography are what make cream skimming work. ");
        if (train->label_names) CHECK_STR("name 2", train->label_names[2], "contradiction");
    } else {
        CHECK(0, "MNLI fixtures did not load as expected");
    }
    codir_dataset_free(train);
    codir_dataset_free(dev);
}

static void test_tsv_label_names_from_train(void)
{
    char path[512];
    codir_tsv_options options = codir_tsv_options_default();
    codir_dataset *train, *dev;

    /* Names derived from the file: sorted by strcmp, so contradiction 0, entailment
       1, neutral 2. */
    options.text_a = "sentence1";
    options.text_b = "sentence2";
    options.label = "gold_label";
    options.label_kind = CODIR_LABEL_NAMES;
    train = load_glue("mnli_train.tsv", &options, path, sizeof path);
    CHECK(train != NULL, "derived names: %s", codir_last_error());
    if (!train) return;
    CHECK_INT("classes", train->num_classes, 3);
    if (train->label_names && train->num_classes == 3) {
        CHECK_STR("name 0", train->label_names[0], "contradiction");
        CHECK_STR("name 1", train->label_names[1], "entailment");
        CHECK_STR("name 2", train->label_names[2], "neutral");
    }
    if (train->count == 4) {
        CHECK_INT("label 0 (neutral)", train->labels[0], 2);
        CHECK_INT("label 1 (entailment)", train->labels[1], 1);
        CHECK_INT("label 3 (contradiction)", train->labels[3], 0);
    }

    /* The dev set reuses the training names, so its ids agree although it lacks
       entailment. */
    options.label_names = (const char *const *)train->label_names;
    options.label_name_count = train->num_classes;
    dev = load_glue("mnli_dev.tsv", &options, path, sizeof path);
    CHECK(dev != NULL, "dev with train names: %s", codir_last_error());
    if (dev && dev->count == 2) {
        CHECK_INT("dev label 0 (neutral)", dev->labels[0], 2);
        CHECK_INT("dev label 1 (contradiction)", dev->labels[1], 0);
        CHECK_INT("dev classes", dev->num_classes, 3);
    }
    codir_dataset_free(dev);

    /* A name outside the GLUE list (RTE: entailment, not_entailment) is an error at
       its line. */
    dev = load_glue("rte_bad_label.tsv", NULL, path, sizeof path);
    check_tsv_error_at(__LINE__, dev, path, 3, "invalid label 'neutral'");
    codir_dataset_free(dev);
    codir_dataset_free(train);
}

static void test_tsv_pair_bad_rows(void)
{
    char path[512];
    codir_dataset *data = load_glue("rte_bad_fields.tsv", NULL, path, sizeof path);
    check_tsv_error_at(__LINE__, data, path, 3, "expected 4 tab-separated fields, found 5");
    codir_dataset_free(data);

    data = load_glue("stsb_bad_score.tsv", NULL, path, sizeof path);
    check_tsv_error_at(__LINE__, data, path, 3, "invalid label 'high'");
    codir_dataset_free(data);

    data = LOAD_TSV("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                    "0\tg\tf\t2012\t1\tnone\tnone\ta\tb\tnan\n", path);
    check_tsv_error_at(__LINE__, data, path, 2, "finite");
    codir_dataset_free(data);

    data = LOAD_TSV("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                    "0\tg\tf\t2012\t1\tnone\tnone\ta\tb\t\n", path);
    check_tsv_error_at(__LINE__, data, path, 2, "invalid label ''");
    codir_dataset_free(data);
}

static void test_tsv_cola_without_header(void)
{
    char path[512];
    codir_tsv_options options = codir_tsv_options_default();
    codir_dataset *data = load_glue("cola.tsv", NULL, path, sizeof path);
    CHECK(data != NULL, "CoLA detection: %s", codir_last_error());
    if (data) {
        CHECK_INT("CoLA count", data->count, 4);
        if (data->count == 4) {
            CHECK_STR("CoLA text 0", data->texts[0], "Our friends won't buy this analysis, let alone the next one we propose.");
            CHECK_STR("CoLA text 3", data->texts[3], "The more we study verbs, the crazier they get.");
            CHECK_INT("CoLA label 2", data->labels[2], 0);
            CHECK_INT("CoLA label 3", data->labels[3], 1);
        }
        CHECK(data->texts_b == NULL, "CoLA got second texts");
    }
    codir_dataset_free(data);

    /* The same through explicit column indexes. */
    options.has_header = 0;
    options.text_a = options.label = NULL;
    options.text_a_index = 3;
    options.label_index = 1;
    data = load_glue("cola.tsv", &options, path, sizeof path);
    CHECK(data != NULL, "CoLA by index: %s", codir_last_error());
    if (data) CHECK_INT("CoLA count by index", data->count, 4);
    codir_dataset_free(data);

    /* An index past the fields is an error naming it. */
    options.label_index = 7;
    data = load_glue("cola.tsv", &options, path, sizeof path);
    CHECK(data == NULL, "label index 7 of 4 fields loaded");
    CHECK(strstr(codir_last_error(), "index is 7") != NULL, "message does not name the index: %s", codir_last_error());
    codir_dataset_free(data);

    /* No column at all for the text. */
    options.label_index = 1;
    options.text_a_index = -1;
    data = load_glue("cola.tsv", &options, path, sizeof path);
    CHECK(data == NULL, "a load without a text column succeeded");
    codir_dataset_free(data);
}

/* ---- Hugging Face fixtures ---- */

/* The fixtures in tests/fixtures come from make_tokenizer_fixture.js, which runs
   Hugging Face tokenizers (npm) on the same inputs; see tests/fixtures/README.md. */

/* Reads a whole file into a NUL-terminated buffer; NULL if it cannot be read. */
static char *read_whole_file(const char *path, size_t *length)
{
    FILE *file = fopen(path, "rb");
    char *data = NULL;
    long size;
    if (!file) return NULL;
    if (fseek(file, 0, SEEK_END) == 0 && (size = ftell(file)) >= 0 && fseek(file, 0, SEEK_SET) == 0) {
        data = (char *)malloc((size_t)size + 1);
        if (data && fread(data, 1, (size_t)size, file) != (size_t)size) {
            free(data);
            data = NULL;
        }
        if (data) {
            data[size] = '\0';
            *length = (size_t)size;
        }
    }
    fclose(file);
    return data;
}

/* Reads tests/fixtures/<name>, from the repository root or from tests/. */
static char *read_fixture(const char *name, size_t *length)
{
    static const char *const dirs[] = {"tests/fixtures", "fixtures"};
    char path[512];
    size_t i;
    for (i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        char *data;
        snprintf(path, sizeof path, "%s/%s", dirs[i], name);
        data = read_whole_file(path, length);
        if (data) return data;
    }
    CHECK(0, "cannot read the fixture tests/fixtures/%s; run the tests from the repository root or tests/", name);
    return NULL;
}

static codir_vocab *load_fixture_vocab(const char *name)
{
    char file[128], path[512];
    static const char *const dirs[] = {"tests/fixtures", "fixtures"};
    size_t i;
    snprintf(file, sizeof file, "vocab_%s.txt", name);
    for (i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        FILE *probe;
        snprintf(path, sizeof path, "%s/%s", dirs[i], file);
        probe = fopen(path, "rb");
        if (probe) {
            codir_vocab *vocab;
            fclose(probe);
            vocab = codir_vocab_load(path, strstr(name, "uncased") != NULL);
            CHECK(vocab != NULL, "loading %s failed: %s", path, codir_last_error());
            return vocab;
        }
    }
    CHECK(0, "cannot find the fixture tests/fixtures/%s", file);
    return NULL;
}

/* Splits data in place into lines as make_tokenizer_fixture.js does: at "\n", without
   an empty last line after a final "\n". For a TSV the header line is dropped and each
   line ends at its first tab. Returns a malloc'ed array of *count pointers into data. */
static char **split_lines(char *data, size_t length, int is_tsv, int *count)
{
    char **lines = NULL, *p = data, *end = data + length;
    int n = 0, capacity = 0, index = 0;
    while (p < end) {
        char *newline = (char *)memchr(p, '\n', (size_t)(end - p)), *tab;
        if (!newline) newline = end;
        *newline = '\0';
        if (is_tsv && (tab = strchr(p, '\t')) != NULL) *tab = '\0';
        if (!is_tsv || index > 0) {
            if (n == capacity) {
                char **grown;
                capacity = capacity ? 2 * capacity : 256;
                grown = (char **)realloc(lines, (size_t)capacity * sizeof *lines);
                if (!grown) {
                    free(lines);
                    *count = 0;
                    return NULL;
                }
                lines = grown;
            }
            lines[n++] = p;
        }
        index++;
        p = newline + 1;
    }
    *count = n;
    return lines;
}

/* Formats up to 40 ids as "a b c ..." into out[size]. */
static const char *format_ids(char *out, size_t size, const int *ids, int count)
{
    size_t used = 0;
    int i;
    out[0] = '\0';
    for (i = 0; i < count && i < 40 && used + 16 < size; i++)
        used += (size_t)snprintf(out + used, size - used, "%s%d", i ? " " : "", ids[i]);
    if (count > 40 && used + 8 < size) snprintf(out + used, size - used, " ...");
    return out;
}

/* Parses up to max_ids integers from s into ids and returns the count. */
static int parse_ids(const char *s, int *ids, int max_ids)
{
    int n = 0;
    char *end;
    for (;;) {
        long value = strtol(s, &end, 10);
        if (end == s || n == max_ids) break;
        ids[n++] = (int)value;
        s = end;
    }
    return n;
}

/* Reports a mismatch of an id sequence with both sequences; returns 1 if they match. */
static int compare_ids_at(int line, const char *what, const int *got, int got_count, const int *want, int want_count)
{
    char got_text[400], want_text[400];
    if (got_count == want_count && memcmp(got, want, (size_t)got_count * sizeof *got) == 0) return 1;
    check_fail(__FILE__, line, "%s\n  codir.h:      %s (%d ids)\n  Hugging Face: %s (%d ids)", what,
               format_ids(got_text, sizeof got_text, got, got_count), got_count,
               format_ids(want_text, sizeof want_text, want, want_count), want_count);
    return 0;
}

#define FIXTURE_VOCABS 4
static const char *const fixture_vocab_names[FIXTURE_VOCABS] = {"corpus_uncased", "corpus_cased", "hard_uncased",
                                                                "hard_cased"};

/* The texts after the hard cases that expected_pairs.txt numbers, as in
   make_tokenizer_fixture.js. */
static const char *const pair_texts[] = {"short", "a b c d e f g h i j", "one two three", "the cat sat on the mat ."};

static void test_tokenizer_hf_hard_cases(void)
{
    codir_vocab *vocabs[FIXTURE_VOCABS] = {NULL, NULL, NULL, NULL};
    char *texts_data = NULL, *expected = NULL, **texts = NULL, *line;
    size_t length;
    int text_count = 0, i, checked = 0, failures = 0;
    enum { MAX_IDS = 4096 };
    static int got[MAX_IDS], want[MAX_IDS];

    for (i = 0; i < FIXTURE_VOCABS; i++) vocabs[i] = load_fixture_vocab(fixture_vocab_names[i]);
    texts_data = read_fixture("hard_cases.txt", &length);
    if (texts_data) texts = split_lines(texts_data, length, 0, &text_count);
    expected = read_fixture("expected_hard.txt", &length);
    if (!texts || !expected || !vocabs[0] || !vocabs[1] || !vocabs[2] || !vocabs[3]) goto done;

    for (line = strtok(expected, "\n"); line; line = strtok(NULL, "\n")) {
        char name[64], what[600];
        int number, consumed = 0, v, got_count, want_count;
        if (line[0] == '#') continue;
        if (sscanf(line, "%63s %d%n", name, &number, &consumed) != 2 || number < 1 || number > text_count) {
            CHECK(0, "expected_hard.txt: malformed line '%.60s'", line);
            break;
        }
        for (v = 0; v < FIXTURE_VOCABS && strcmp(name, fixture_vocab_names[v]) != 0; v++) continue;
        if (v == FIXTURE_VOCABS) {
            CHECK(0, "expected_hard.txt: unknown vocabulary '%s'", name);
            break;
        }
        want_count = parse_ids(line + consumed, want, MAX_IDS);
        got_count = codir_encode(vocabs[v], texts[number - 1], got, MAX_IDS);
        snprintf(what, sizeof what, "hard_cases.txt line %d with vocab_%s.txt, text \"%.200s\"", number, name,
                 texts[number - 1]);
        checked++;
        if (!compare_ids_at(__LINE__, what, got, got_count, want, want_count) && ++failures >= 5) break;
    }
    CHECK(checked == FIXTURE_VOCABS * text_count, "checked %d sequences, want %d", checked,
          FIXTURE_VOCABS * text_count);

done:
    for (i = 0; i < FIXTURE_VOCABS; i++) codir_vocab_free(vocabs[i]);
    free(texts);
    free(texts_data);
    free(expected);
}

static void test_tokenizer_hf_pairs(void)
{
    codir_vocab *vocabs[2] = {NULL, NULL};
    char *texts_data = NULL, *expected = NULL, **texts = NULL, *line;
    size_t length;
    int text_count = 0, i, checked = 0, failures = 0;
    enum { MAX_IDS = 1024 };
    static int got[MAX_IDS], types[MAX_IDS], want[MAX_IDS], want_types[MAX_IDS];

    for (i = 0; i < 2; i++) vocabs[i] = load_fixture_vocab(fixture_vocab_names[i]);
    texts_data = read_fixture("hard_cases.txt", &length);
    if (texts_data) texts = split_lines(texts_data, length, 0, &text_count);
    expected = read_fixture("expected_pairs.txt", &length);
    if (!texts || !expected || !vocabs[0] || !vocabs[1]) goto done;

    for (line = strtok(expected, "\n"); line; line = strtok(NULL, "\n")) {
        char name[64], what[800];
        const char *a, *b;
        int max_len, ia, ib, zeros, consumed = 0, v, got_count, want_count, total = text_count + 4;
        if (line[0] == '#') continue;
        if (sscanf(line, "%63s %d %d %d %d%n", name, &max_len, &ia, &ib, &zeros, &consumed) != 5 || ia < 1 ||
            ia > total || ib < 1 || ib > total || max_len > MAX_IDS) {
            CHECK(0, "expected_pairs.txt: malformed line '%.60s'", line);
            break;
        }
        v = strcmp(name, "corpus_uncased") == 0 ? 0 : 1;
        a = ia <= text_count ? texts[ia - 1] : pair_texts[ia - 1 - text_count];
        b = ib <= text_count ? texts[ib - 1] : pair_texts[ib - 1 - text_count];
        want_count = parse_ids(line + consumed, want, MAX_IDS);
        for (i = 0; i < want_count; i++) want_types[i] = i < zeros ? 0 : 1;
        got_count = codir_encode_pair(vocabs[v], a, b, got, types, max_len);
        snprintf(what, sizeof what, "pair of texts %d and %d, max_len %d, vocab_%s.txt: \"%.100s\" / \"%.100s\"", ia,
                 ib, max_len, name, a, b);
        checked++;
        if (!compare_ids_at(__LINE__, what, got, got_count, want, want_count) && ++failures >= 5) break;
        if (got_count == want_count && !compare_ids_at(__LINE__, what, types, got_count, want_types, want_count) &&
            ++failures >= 5)
            break;
    }
    CHECK(checked > 1000, "checked only %d pairs", checked);

done:
    for (i = 0; i < 2; i++) codir_vocab_free(vocabs[i]);
    free(texts);
    free(texts_data);
    free(expected);
}

/* FNV-1a 64 over ids as 4 little-endian bytes each, as make_tokenizer_fixture.js. */
static uint64_t fnv_ids(uint64_t hash, const int *ids, int count)
{
    int i, k;
    for (i = 0; i < count; i++) {
        for (k = 0; k < 4; k++) {
            hash ^= ((uint32_t)ids[i] >> (8 * k)) & 0xFF;
            hash *= 1099511628211ull;
        }
    }
    return hash;
}

static int base64_value(char c)
{
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const char *p = strchr(digits, c);
    return c && p ? (int)(p - digits) : -1;
}

/* Finds the shared corpora: $CODIR_DATA_DIR, else ../shared/data from the repository
   root or from tests/. Returns NULL when none is present. */
static const char *find_data_dir(void)
{
    static const char *const candidates[] = {"../shared/data", "../../shared/data"};
    static char env_dir[512];
    const char *env = getenv("CODIR_DATA_DIR");
    char path[600];
    size_t i;
    FILE *probe;
    if (env && env[0]) {
        snprintf(env_dir, sizeof env_dir, "%s", env);
        return env_dir;
    }
    for (i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        snprintf(path, sizeof path, "%s/austen/train.txt", candidates[i]);
        probe = fopen(path, "rb");
        if (probe) {
            fclose(probe);
            return candidates[i];
        }
    }
    return NULL;
}

/* Checks one corpus file against its hash rows and sample lines, which start at
   *cursor in expected_corpus.txt; advances *cursor past them. Every `step`-th line is
   checked (1 for all). Returns the number of failures. */
static int check_corpus_file(const codir_vocab *uncased, const codir_vocab *cased, const char *data_dir,
                             const char *file, int want_lines, char **cursor, int step)
{
    enum { MAX_IDS = 65536 };
    static int ids_u[MAX_IDS], ids_c[MAX_IDS], want[MAX_IDS];
    char path[1024], *data, **lines, *row = NULL;
    size_t length;
    int count = 0, i, failures = 0, is_tsv = strstr(file, ".tsv") != NULL;

    snprintf(path, sizeof path, "%s/%s", data_dir, file);
    data = read_whole_file(path, &length);
    CHECK(data != NULL, "cannot read %s", path);
    if (!data) return 1;
    lines = split_lines(data, length, is_tsv, &count);
    CHECK(count == want_lines, "%s has %d lines, the fixture %d; regenerate the fixture for this data", path, count,
          want_lines);

    for (i = 0; i < count && count == want_lines; i++) {
        char *next;
        int n_u, n_c, got_hash, want_hash;
        if (i % 100 == 0) {
            /* Next hash row: "h " then 100 groups of 4 base64 characters. */
            row = *cursor;
            next = strchr(row, '\n');
            if (strncmp(row, "h ", 2) != 0 || !next) {
                CHECK(0, "expected_corpus.txt: missing hash row for %s line %d", file, i + 1);
                failures++;
                break;
            }
            *next = '\0';
            *cursor = next + 1;
            row += 2;
        }
        if (i % step != 0) continue;
        n_u = codir_encode(uncased, lines[i], ids_u, MAX_IDS);
        n_c = codir_encode(cased, lines[i], ids_c, MAX_IDS);
        if (n_u < 0 || n_c < 0 || n_u == MAX_IDS || n_c == MAX_IDS) {
            CHECK(0, "%s line %d: encode returned %d and %d: %s", file, i + 1, n_u, n_c, codir_last_error());
            failures++;
            continue;
        }
        got_hash = (int)(fnv_ids(fnv_ids(14695981039346656037ull, ids_u, n_u), ids_c, n_c) >> 40);
        {
            const char *group = row + 4 * (i % 100);
            int k;
            want_hash = 0;
            for (k = 0; k < 4; k++) {
                int value = base64_value(group[k]);
                if (value < 0) {
                    want_hash = -1;
                    break;
                }
                want_hash = want_hash << 6 | value;
            }
        }
        if (got_hash != want_hash) {
            char text_u[400], text_c[400];
            CHECK(0, "%s line %d differs from Hugging Face (hash %06x, want %06x): \"%.200s\"\n"
                  "  codir.h uncased: %s (%d ids)\n  codir.h cased:   %s (%d ids)\n"
                  "  (the fixture stores Hugging Face's full ids only for every 1000th line)",
                  file, i + 1, got_hash, want_hash, lines[i], format_ids(text_u, sizeof text_u, ids_u, n_u), n_u,
                  format_ids(text_c, sizeof text_c, ids_c, n_c), n_c);
            if (++failures >= 3) break;
        }
    }

    /* Sample lines with full ids: "s <line> u|c <ids>". */
    while (strncmp(*cursor, "s ", 2) == 0) {
        char *line = *cursor, *next = strchr(line, '\n'), mode;
        int number, consumed = 0, want_count, got_count;
        if (!next) break;
        *next = '\0';
        *cursor = next + 1;
        if (sscanf(line, "s %d %c%n", &number, &mode, &consumed) != 2 || number < 1 || number > count) continue;
        if ((number - 1) % step != 0) continue;
        want_count = parse_ids(line + consumed, want, MAX_IDS);
        got_count = codir_encode(mode == 'u' ? uncased : cased, lines[number - 1], ids_u, MAX_IDS);
        {
            char what[800];
            snprintf(what, sizeof what, "%s line %d (%s): \"%.200s\"", file, number, mode == 'u' ? "uncased" : "cased",
                     lines[number - 1]);
            if (!compare_ids_at(__LINE__, what, ids_u, got_count, want, want_count)) failures++;
        }
    }
    free(lines);
    free(data);
    return failures;
}

static void test_tokenizer_hf_corpora(void)
{
    const char *data_dir = find_data_dir(), *quick = getenv("CODIR_TEST_QUICK");
    codir_vocab *uncased = NULL, *cased = NULL;
    char *expected = NULL, *cursor;
    size_t length;
    int files = 0, step = quick && quick[0] == '1' ? 10 : 1;

    if (!data_dir) {
        printf("skipped: tokenizer hf corpora: no corpora in ../shared/data or $CODIR_DATA_DIR\n");
        return;
    }
    uncased = load_fixture_vocab("corpus_uncased");
    cased = load_fixture_vocab("corpus_cased");
    expected = read_fixture("expected_corpus.txt", &length);
    if (!uncased || !cased || !expected) goto done;

    cursor = expected;
    while (*cursor) {
        char *next = strchr(cursor, '\n'), file[256];
        int lines;
        if (!next) break;
        *next = '\0';
        if (sscanf(cursor, "file %255s %d", file, &lines) == 2) {
            cursor = next + 1;
            check_corpus_file(uncased, cased, data_dir, file, lines, &cursor, step);
            files++;
        } else {
            cursor = next + 1;
        }
    }
    CHECK(files == 8, "expected_corpus.txt lists %d files, want 8", files);
    if (step > 1) printf("note: tokenizer hf corpora checked every %dth line (CODIR_TEST_QUICK=1)\n", step);

done:
    codir_vocab_free(uncased);
    codir_vocab_free(cased);
    free(expected);
}

/* Appends cp as UTF-8 to out and returns the new end. */
static char *put_utf8(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        *out++ = (char)cp;
    } else if (cp < 0x800) {
        *out++ = (char)(0xC0 | (cp >> 6));
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *out++ = (char)(0xE0 | (cp >> 12));
        *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *out++ = (char)(0xF0 | (cp >> 18));
        *out++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    }
    *out = '\0';
    return out;
}

/* Writes the output that a kind of hf_unicode.txt stands for, for "x" + cp + "x". */
static void expand_kind(const char *kind, uint32_t cp, char *out)
{
    char *p = out;
    if (kind == NULL || strcmp(kind, "-") == 0) {
        p = put_utf8(p, 'x');
        p = put_utf8(p, cp);
        put_utf8(p, 'x');
    } else if (strcmp(kind, "R") == 0) {
        strcpy(out, "xx");
    } else if (strcmp(kind, "S") == 0) {
        strcpy(out, "x x");
    } else if (kind[0] == 'I' || kind[0] == 'A') {
        uint32_t target = kind[1] == '=' ? (uint32_t)strtoul(kind + 2, NULL, 16) : (uint32_t)((long)cp + strtol(kind + 1, NULL, 10));
        p = put_utf8(p, 'x');
        if (kind[0] == 'A') p = put_utf8(p, ' ');
        p = put_utf8(p, target);
        if (kind[0] == 'A') p = put_utf8(p, ' ');
        put_utf8(p, 'x');
    } else if (strcmp(kind, "H") == 0) {
        /* The Hangul syllable decomposition of the Unicode standard, section 3.12. */
        uint32_t s = cp - 0xAC00;
        p = put_utf8(p, 'x');
        p = put_utf8(p, 0x1100 + s / 588);
        p = put_utf8(p, 0x1161 + (s % 588) / 28);
        if (s % 28) p = put_utf8(p, 0x11A7 + s % 28);
        put_utf8(p, 'x');
    } else if (kind[0] == 'X') {
        const char *q = kind + 1;
        *p = '\0';
        while (*q) {
            char *end;
            p = put_utf8(p, (uint32_t)strtoul(q, &end, 16));
            q = *end == ',' ? end + 1 : end;
            if (end == q && *q) break;
        }
    } else {
        strcpy(out, "?");
    }
}

/* One line of hf_unicode.txt or hf_unicode_differences.txt. */
typedef struct unicode_range {
    uint32_t first, last;
    char kind[64];    /* Hugging Face's kind */
    char codir[64];   /* differences only: codir.h's kind */
} unicode_range;

/* Parses the lines of one mode ('u' or 'c') into ranges sorted by first. */
static unicode_range *parse_unicode_ranges(char *text, char mode, int differences, int *count)
{
    unicode_range *ranges = NULL;
    int n = 0, capacity = 0;
    char *line, *save = NULL, *copy = (char *)malloc(strlen(text) + 1);
    if (!copy) return NULL;
    strcpy(copy, text);
    for (line = strtok(copy, "\n"); line; line = strtok(NULL, "\n")) {
        unicode_range r;
        unsigned first, last;
        char m;
        (void)save;
        if (line[0] != mode) continue;
        memset(&r, 0, sizeof r);
        if (differences) {
            if (sscanf(line, "%c %x %x hf=%63s codir=%63s", &m, &first, &last, r.kind, r.codir) != 5) continue;
        } else if (sscanf(line, "%c %x %x %63s", &m, &first, &last, r.kind) != 4) {
            continue;
        }
        r.first = first;
        r.last = last;
        if (n == capacity) {
            unicode_range *grown;
            capacity = capacity ? 2 * capacity : 512;
            grown = (unicode_range *)realloc(ranges, (size_t)capacity * sizeof *ranges);
            if (!grown) break;
            ranges = grown;
        }
        ranges[n++] = r;
    }
    free(copy);
    *count = n;
    return ranges;
}

static void test_tokenizer_hf_every_code_point(void)
{
    char *hf_text, *diff_text;
    size_t length;
    int mode_index;

    hf_text = read_fixture("hf_unicode.txt", &length);
    diff_text = read_fixture("hf_unicode_differences.txt", &length);
    if (!hf_text || !diff_text) {
        free(hf_text);
        free(diff_text);
        return;
    }
    for (mode_index = 0; mode_index < 2; mode_index++) {
        char mode = mode_index == 0 ? 'u' : 'c';
        int range_count = 0, diff_count = 0, r = 0, d = 0, failures = 0, differences = 0;
        unicode_range *ranges = parse_unicode_ranges(hf_text, mode, 0, &range_count);
        unicode_range *diffs = parse_unicode_ranges(diff_text, mode, 1, &diff_count);
        uint32_t cp;
        CHECK(range_count > 100, "hf_unicode.txt has %d ranges for mode %c", range_count, mode);
        /* NUL cannot be inside a C string; Hugging Face drops it like codir.h would. */
        for (cp = 1; cp <= 0x10FFFF && failures < 5; cp++) {
            char text[16], got[64], want[64], *p;
            const char *kind = NULL;
            int listed, n;
            if (cp >= 0xD800 && cp <= 0xDFFF) continue;
            while (r < range_count && ranges[r].last < cp) r++;
            if (r < range_count && ranges[r].first <= cp) kind = ranges[r].kind;
            while (d < diff_count && diffs[d].last < cp) d++;
            listed = d < diff_count && diffs[d].first <= cp;

            p = put_utf8(text, 'x');
            p = put_utf8(p, cp);
            put_utf8(p, 'x');
            n = codir_pretokenize(text, mode == 'u', got, sizeof got);
            expand_kind(kind, cp, want);
            if (!listed) {
                if (n < 0 || strcmp(got, want) != 0) {
                    CHECK(0, "U+%04X (%s): codir.h gives \"%s\", Hugging Face \"%s\"", (unsigned)cp,
                          mode == 'u' ? "uncased" : "cased", got, want);
                    failures++;
                }
            } else {
                char documented[64];
                expand_kind(diffs[d].codir, cp, documented);
                differences++;
                if (strcmp(got, want) == 0 || strcmp(got, documented) != 0) {
                    CHECK(0, "U+%04X (%s) is listed in hf_unicode_differences.txt, but codir.h gives \"%s\", "
                          "Hugging Face \"%s\", the list \"%s\"; regenerate the list with make_unicode_tables.py",
                          (unsigned)cp, mode == 'u' ? "uncased" : "cased", got, want, documented);
                    failures++;
                }
            }
        }
        CHECK(differences > 0 && differences < 1000, "%d documented differences for mode %c", differences, mode);
        free(ranges);
        free(diffs);
    }
    free(hf_text);
    free(diff_text);
}

const test_case tests_text[] = {
    {"text tokenizer longest match", test_tokenizer_longest_match},
    {"text tokenizer whole-word unk", test_tokenizer_whole_word_unk},
    {"text tokenizer punctuation split", test_tokenizer_punctuation_split},
    {"text tokenizer lowercase strips accents", test_tokenizer_lowercase},
    {"text tokenizer pretokenize", test_tokenizer_pretokenize},
    {"text tokenizer long word", test_tokenizer_long_word},
    {"text tokenizer control characters", test_tokenizer_control_chars},
    {"text tokenizer cjk split", test_tokenizer_cjk_split},
    {"text tokenizer invalid utf-8", test_tokenizer_invalid_utf8},
    {"text tokenizer count like snprintf", test_tokenizer_count_like_snprintf},
    {"text encode truncation", test_encode_truncation},
    {"tokenizer hf hard cases", test_tokenizer_hf_hard_cases},
    {"tokenizer hf sentence pairs", test_tokenizer_hf_pairs},
    {"tokenizer hf corpora", test_tokenizer_hf_corpora},
    {"tokenizer hf every code point", test_tokenizer_hf_every_code_point},
    {"text vocab load crlf", test_vocab_load_crlf},
    {"text vocab load missing special", test_vocab_load_missing_special},
    {"text vocab load missing file", test_vocab_load_missing_file},
    {"text vocab load duplicate later wins", test_vocab_load_duplicate_later_wins},
    {"text vocab save round trip", test_vocab_save_round_trip},
    {"text vocab build hand example", test_vocab_build_hand_example},
    {"text vocab build small target", test_vocab_build_small_target},
    {"text vocab build bad arguments", test_vocab_build_bad_arguments},
    {"text vocab build lowercase", test_vocab_build_lowercase},
    {"text vocab build corpus properties", test_vocab_build_corpus_properties},
    {"text vocab build stops when merged", test_vocab_build_stops_when_merged_out},
    {"text tsv quotes literal", test_tsv_quotes_literal},
    {"text tsv crlf bom no newline", test_tsv_crlf_bom_no_final_newline},
    {"text tsv trailing empty lines", test_tsv_trailing_empty_lines},
    {"text tsv columns by name", test_tsv_columns_by_name},
    {"text tsv bad field count", test_tsv_bad_field_count},
    {"text tsv bad label", test_tsv_bad_label},
    {"text tsv missing column", test_tsv_missing_column},
    {"text tsv empty or missing file", test_tsv_empty_and_missing_files},
    {"text encode pair types", test_encode_pair_types},
    {"text encode pair truncation", test_encode_pair_truncation},
    {"text tsv glue pair layouts", test_tsv_glue_pair_layouts},
    {"text tsv mnli labels stable", test_tsv_mnli_labels_stable},
    {"text tsv label names from train", test_tsv_label_names_from_train},
    {"text tsv pair bad rows", test_tsv_pair_bad_rows},
    {"text tsv cola without header", test_tsv_cola_without_header},
};
const int tests_text_count = (int)(sizeof tests_text / sizeof tests_text[0]);
