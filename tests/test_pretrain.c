/* Tests of masked-LM pre-training and CoDIR-Pre: the corpus reader, segment packing
   at document boundaries, token masking, the masked-LM loss, same-document negatives,
   the training steps and the masked-LM evaluation.

   Expected values come from hand-written segments, from plain float64 code in this
   file (cross-entropy, KL divergence, binomial bounds on the masking rates) and from
   re-tokenizing each line on its own and comparing it with the packed segments. */
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- fixtures ---- */

/* check_close on one value. */
#define CHECK_SCALAR(what, got, want, atol, rtol)                  \
    do {                                                          \
        float got_ = (float)(got);                                \
        double want_ = (want);                                    \
        check_close(what, &got_, &want_, 1, atol, rtol);          \
    } while (0)

/* Allocates or exits: a test without its buffers cannot report anything useful. */
static void *test_alloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_pretrain.c: out of memory allocating %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

/* A vocabulary of the special tokens and the 26 lowercase letters, so every
   single-letter word is exactly one piece. */
static codir_vocab *letter_vocab(void)
{
    static const char *const text[1] = {"a b c d e f g h i j k l m n o p q r s t u v w x y z"};
    return codir_vocab_build(text, 1, 100, 1, 1);
}

/* Writes [CLS] letters [SEP] of `letters` (words of one letter) into ids; returns the length. */
static int letter_ids(const codir_vocab *vocab, const char *letters, int *ids)
{
    int n = 0;
    char word[2] = {0, 0};
    ids[n++] = vocab->cls_id;
    for (; *letters; letters++) {
        if (*letters == ' ') continue;
        word[0] = *letters;
        ids[n++] = codir_vocab_id(vocab, word);
    }
    ids[n++] = vocab->sep_id;
    return n;
}

/* A hand-made mask configuration: specials 0..4, [MASK] = 4. */
static codir_mlm_config plain_mlm_config(int vocab_size)
{
    codir_mlm_config cfg;
    int k;
    cfg.select_prob = 0.15f;
    cfg.mask_prob = 0.8f;
    cfg.random_prob = 0.1f;
    cfg.vocab_size = vocab_size;
    cfg.mask_id = 4;
    for (k = 0; k < 5; k++) cfg.special_ids[k] = k;
    return cfg;
}

/* Segments of random non-special ids in [5, V) with [CLS] = 2 first and [SEP] = 3
   last, lengths in [min_len, max_len], and [UNK] = 1 at about one position in 20. */
static codir_encoded *random_segments(int count, int min_len, int max_len, int vocab_size, unsigned long long *rng)
{
    codir_encoded *enc = (codir_encoded *)test_alloc(sizeof *enc);
    int s, t;
    enc->count = count;
    enc->max_len = max_len;
    enc->lengths = (int *)test_alloc((size_t)count * sizeof(int));
    enc->labels = (int *)test_alloc((size_t)count * sizeof(int));
    enc->ids = (int *)test_alloc((size_t)count * max_len * sizeof(int));
    enc->num_classes = 1;
    for (s = 0; s < count; s++) {
        int n = min_len + (int)check_uniform(rng, 0, max_len - min_len + 1);
        int *row = enc->ids + (size_t)s * max_len;
        if (n > max_len) n = max_len;
        enc->lengths[s] = n;
        row[0] = 2;
        for (t = 1; t < n - 1; t++)
            row[t] = check_uniform(rng, 0, 1) < 0.05 ? 1 : 5 + (int)check_uniform(rng, 0, vocab_size - 5);
        row[n - 1] = 3;
    }
    return enc;
}

/* Frees what random_segments and the tests' own codir_encoded allocate. */
static void free_segments(codir_encoded *enc)
{
    if (!enc) return;
    free(enc->lengths);
    free(enc->labels);
    free(enc->ids);
    free(enc);
}

/* The number of tokens BERT's create_pretraining_data.py chooses among n. */
static int expected_chosen(int n)
{
    long want;
    if (n == 0) return 0;
    want = lround((double)0.15f * n);
    return want < 1 ? 1 : (int)want;
}

/* ---- corpus ---- */

static void test_corpus_documents(void)
{
    /* A BOM, CRLF, blank lines before the first document, whitespace-only lines and
       runs of blank lines, and no final newline. */
    static const char text[] = "\xEF\xBB\xBF\n\nfirst one\r\nfirst two\n \t\nsecond one\n\n\n\nthird one\nthird two";
    codir_corpus *c = codir_corpus_parse(text, sizeof text - 1, "hand.txt");
    static const char *const lines[5] = {"first one", "first two", "second one", "third one", "third two"};
    static const int docs[5] = {0, 0, 1, 2, 2}, numbers[5] = {3, 4, 6, 10, 11};
    int i;
    CHECK(c != NULL, "parse failed: %s", codir_last_error());
    if (!c) return;
    CHECK(c->num_lines == 5, "num_lines %d, want 5", c->num_lines);
    CHECK(c->num_docs == 3, "num_docs %d, want 3", c->num_docs);
    for (i = 0; i < 5 && i < c->num_lines; i++) {
        CHECK(strcmp(c->lines[i], lines[i]) == 0, "line %d is \"%s\", want \"%s\"", i, c->lines[i], lines[i]);
        CHECK(c->docs[i] == docs[i], "line %d in document %d, want %d", i, c->docs[i], docs[i]);
        CHECK(c->line_numbers[i] == numbers[i], "line %d has number %d, want %d", i, c->line_numbers[i], numbers[i]);
    }
    CHECK(strcmp(c->name, "hand.txt") == 0, "name \"%s\"", c->name);
    codir_corpus_free(c);
}

static void test_corpus_rejects_nul(void)
{
    static const char text[] = "one\ntwo\nth\0ree\n";
    codir_corpus *c = codir_corpus_parse(text, sizeof text - 1, "nul.txt");
    CHECK(c == NULL, "a NUL byte was accepted");
    CHECK(strstr(codir_last_error(), "nul.txt:3:") != NULL, "message \"%s\" does not name nul.txt:3", codir_last_error());
    codir_corpus_free(c);
}

static void test_corpus_rejects_empty(void)
{
    static const char text[] = "\n  \n\t\n";
    codir_corpus *c = codir_corpus_parse(text, sizeof text - 1, "blank.txt");
    CHECK(c == NULL, "a corpus without text was accepted");
    CHECK(strstr(codir_last_error(), "blank.txt") != NULL, "message \"%s\" does not name the file", codir_last_error());
    codir_corpus_free(c);
}

static void test_corpus_load_missing(void)
{
    codir_corpus *c = codir_corpus_load("/nonexistent-folder/train.txt");
    CHECK(c == NULL, "a missing file loaded");
    CHECK(strstr(codir_last_error(), "/nonexistent-folder/train.txt") != NULL, "message \"%s\" does not name the path",
          codir_last_error());
    codir_corpus_free(c);
}

static void test_corpus_load_shipped(void)
{
    static const char *const paths[2] = {"examples/data/austen-persuasion/train.txt",
                                         "../examples/data/austen-persuasion/train.txt"};
    codir_corpus *c = NULL;
    int i;
    for (i = 0; i < 2 && !c; i++) c = codir_corpus_load(paths[i]);
    CHECK(c != NULL, "cannot load examples/data/austen-persuasion/train.txt from the repository root or tests/: %s",
          codir_last_error());
    if (!c) return;
    CHECK(c->num_docs == 11, "%d documents, want the 11 chapters", c->num_docs);
    CHECK(c->num_lines == 378, "%d paragraphs, want 378", c->num_lines);
    CHECK(strncmp(c->lines[0], "Sir Walter Elliot, of Kellynch Hall", 35) == 0, "first paragraph starts \"%.40s\"",
          c->lines[0]);
    codir_corpus_free(c);
}

/* ---- segments ---- */

static void test_segments_hand_packed(void)
{
    /* Room for 4 pieces per segment (max_len 6). "f" would fit after "c d e" but
       starts document 1; the line of 10 pieces after it fills two segments and
       leaves "o p" open for "q". */
    static const char text[] = "a b\nc d e\n\nf\ng h i j k l m n o p\nq\nr s t u\n\nv w x y\n";
    static const char *const want[8] = {"a b", "c d e", "f", "g h i j", "k l m n", "o p q", "r s t u", "v w x y"};
    static const int want_doc[8] = {0, 0, 1, 1, 1, 1, 1, 2};
    codir_vocab *vocab = letter_vocab();
    codir_corpus *c = codir_corpus_parse(text, sizeof text - 1, "hand.txt");
    codir_encoded *enc = NULL;
    int s, t;
    CHECK(vocab != NULL, "vocabulary failed: %s", codir_last_error());
    CHECK(c != NULL, "corpus failed: %s", codir_last_error());
    if (vocab && c) enc = codir_segment_corpus(vocab, c, 6);
    CHECK(enc != NULL, "segmenting failed: %s", codir_last_error());
    if (enc) {
        CHECK(enc->count == 8, "%d segments, want 8", enc->count);
        CHECK(enc->max_len == 6, "row stride %d, want 6", enc->max_len);
        CHECK(enc->num_classes == 3, "num_classes %d, want 3 documents", enc->num_classes);
        CHECK(enc->types == NULL, "segments carry token types");
        CHECK(enc->targets == NULL, "segments carry regression targets");
        for (s = 0; s < 8 && s < enc->count; s++) {
            int ids[8], n = letter_ids(vocab, want[s], ids);
            const int *row = enc->ids + (size_t)s * enc->max_len;
            CHECK(enc->lengths[s] == n, "segment %d has %d tokens, want %d (\"%s\")", s, enc->lengths[s], n, want[s]);
            CHECK(enc->labels[s] == want_doc[s], "segment %d in document %d, want %d", s, enc->labels[s], want_doc[s]);
            for (t = 0; t < n && t < enc->lengths[s]; t++)
                CHECK(row[t] == ids[t], "segment %d token %d is %d, want %d (\"%s\")", s, t, row[t], ids[t], want[s]);
        }
    }
    codir_encoded_free(enc);
    codir_corpus_free(c);
    codir_vocab_free(vocab);
}

/* Checks the packing rules on a random corpus against each line tokenized alone. Per
   document, the segments' pieces in order are the lines' pieces in order. [CLS] and
   [SEP] frame every segment, and no segment exceeds max_len. A line that fits in one
   segment is never split, and no segment could have taken the next line. */
static void check_random_packing(int max_len, unsigned long long seed)
{
    enum { DOCS = 9, MAX_TEXT = 60000 };
    char *text = (char *)test_alloc(MAX_TEXT);
    size_t used = 0;
    unsigned long long rng = seed;
    codir_vocab *vocab = letter_vocab();
    codir_corpus *c;
    codir_encoded *enc = NULL;
    int room = max_len - 2, d, i, s, k;

    /* Documents of 1 to 12 lines of 1 to 3 * room one-letter words. */
    for (d = 0; d < DOCS; d++) {
        int lines = 1 + (int)check_uniform(&rng, 0, 12);
        for (i = 0; i < lines; i++) {
            int words = 1 + (int)check_uniform(&rng, 0, 3 * room);
            for (k = 0; k < words; k++) {
                text[used++] = (char)('a' + (int)check_uniform(&rng, 0, 26));
                text[used++] = k + 1 < words ? ' ' : '\n';
            }
        }
        text[used++] = '\n';
    }
    c = codir_corpus_parse(text, used, "random.txt");
    if (vocab && c) enc = codir_segment_corpus(vocab, c, max_len);
    CHECK(enc != NULL, "segmenting failed at max_len %d: %s", max_len, codir_last_error());
    if (enc) {
        int line = 0, piece = 0, failures = 0;
        int line_ids[200];
        int n_line = codir_tokenize(vocab, c->lines[0], line_ids, 200);

        for (s = 0; s < enc->count && failures == 0; s++) {
            const int *row = enc->ids + (size_t)s * enc->max_len;
            int n = enc->lengths[s], first_line = -1;
            CHECK(n >= 3, "segment %d has %d tokens, fewer than [CLS], a piece and [SEP]", s, n);
            CHECK(n <= max_len, "segment %d has %d tokens at max_len %d", s, n, max_len);
            CHECK(row[0] == vocab->cls_id, "segment %d starts with %d, not [CLS]", s, row[0]);
            CHECK(row[n - 1] == vocab->sep_id, "segment %d ends with %d, not [SEP]", s, row[n - 1]);

            /* Walk the segment's pieces through the lines. */
            for (k = 1; k < n - 1 && failures == 0; k++) {
                if (piece == n_line) {
                    line++;
                    piece = 0;
                    if (line >= c->num_lines) {
                        CHECK(0, "segment %d runs past the corpus", s);
                        failures++;
                        break;
                    }
                    n_line = codir_tokenize(vocab, c->lines[line], line_ids, 200);
                }
                if (first_line < 0) first_line = line;
                if (row[k] != line_ids[piece] || c->docs[line] != c->docs[first_line] || enc->labels[s] != c->docs[line]) {
                    CHECK(row[k] == line_ids[piece], "segment %d token %d is %d, want %d (line %d piece %d)", s, k,
                          row[k], line_ids[piece], line, piece);
                    CHECK(c->docs[line] == c->docs[first_line], "segment %d mixes documents %d and %d", s,
                          c->docs[first_line], c->docs[line]);
                    CHECK(enc->labels[s] == c->docs[line], "segment %d labelled %d holds document %d", s,
                          enc->labels[s], c->docs[line]);
                    failures++;
                }
                piece++;
            }

            /* A line that fits in a segment starts at the start of one. */
            if (n_line <= room && piece < n_line) {
                CHECK(0, "segment %d ends inside line %d of %d pieces, which fits in one segment", s, line, n_line);
                failures++;
            }

            /* A segment closes early only for a document end or a line that does not fit. */
            if (piece == n_line && line + 1 < c->num_lines && c->docs[line + 1] == c->docs[line]) {
                int next = codir_tokenize(vocab, c->lines[line + 1], NULL, 0);
                if (n - 2 + next <= room) {
                    CHECK(0, "segment %d of %d pieces closed although the next line (%d) fits", s, n - 2, next);
                    failures++;
                }
            }
        }
        if (failures == 0) {
            CHECK(line == c->num_lines - 1, "segments end at line %d of %d", line, c->num_lines);
            CHECK(piece == n_line, "segments end at piece %d of the last line's %d", piece, n_line);
        }
    }
    codir_encoded_free(enc);
    codir_corpus_free(c);
    codir_vocab_free(vocab);
    free(text);
}

static void test_segments_random_packing(void)
{
    check_random_packing(3, 11);
    check_random_packing(8, 12);
    check_random_packing(20, 13);
    check_random_packing(64, 14);
}

static void test_segments_reject_short_length(void)
{
    static const char text[] = "a b\n";
    codir_vocab *vocab = letter_vocab();
    codir_corpus *c = codir_corpus_parse(text, sizeof text - 1, "short.txt");
    codir_encoded *enc = vocab && c ? codir_segment_corpus(vocab, c, 2) : NULL;
    CHECK(enc == NULL, "max_len 2 was accepted");
    CHECK(strstr(codir_last_error(), "at least 3") != NULL, "message \"%s\"", codir_last_error());
    codir_encoded_free(enc);
    codir_corpus_free(c);
    codir_vocab_free(vocab);
}

/* ---- masking ---- */

/* Fills a batch with segments order[start..start+count-1] and masks it. */
static int fill_and_mask(codir_batch *batch, codir_mlm_batch *mb, const codir_encoded *enc, const int *order, int start,
                         int count, const codir_mlm_config *cfg, uint64_t seed)
{
    int rc = codir_batch_fill(batch, enc, order, start, count);
    if (!rc) rc = codir_mlm_mask(mb, batch, cfg, seed);
    CHECK(rc == CODIR_OK, "masking failed: %s", codir_last_error());
    return rc;
}

static void test_mask_statistics(void)
{
    enum { V = 1000, B = 64, T = 96, SEEDS = 24 };
    unsigned long long rng = 21;
    codir_encoded *enc = random_segments(B, 3, T, V, &rng);
    codir_mlm_config cfg = plain_mlm_config(V);
    codir_batch batch;
    codir_mlm_batch mb;
    long eligible = 0, chosen = 0, masked = 0, random = 0, kept = 0, want_chosen = 0;
    double random_sum = 0.0;
    int seed, b, t, k;
    codir_batch_init(&batch, B, T);
    codir_mlm_batch_init(&mb, B, T);
    for (seed = 0; seed < SEEDS; seed++) {
        if (fill_and_mask(&batch, &mb, enc, NULL, 0, B, &cfg, (uint64_t)seed)) break;
        k = 0;
        for (b = 0; b < B; b++) {
            int n = 0, got = 0;
            for (t = 0; t < batch.seq; t++) {
                int p = b * batch.seq + t, id = batch.ids.data[p], out = mb.masked_ids[p];
                int special = id < 5, is_chosen = k < mb.count && mb.positions[k] == p;
                n += batch.mask.data[p] && !special;
                if (!batch.mask.data[p] || special) {
                    CHECK(!is_chosen, "seed %d: padding or special token %d at %d was chosen", seed, id, p);
                    CHECK(out == id, "seed %d: unchosen token at %d changed from %d to %d", seed, p, id, out);
                    continue;
                }
                if (!is_chosen) {
                    CHECK(out == id, "seed %d: unchosen token at %d changed from %d to %d", seed, p, id, out);
                    continue;
                }
                CHECK(mb.targets[k] == id, "seed %d: target %d at %d, want the original %d", seed, mb.targets[k], p, id);
                if (out == cfg.mask_id) masked++;
                else if (out == id) kept++;
                else {
                    random++;
                    random_sum += out;
                    CHECK(out >= 5, "seed %d: random replacement %d at %d is special", seed, out, p);
                    CHECK(out < V, "seed %d: random replacement %d at %d is outside the vocabulary", seed, out, p);
                }
                got++;
                k++;
            }
            CHECK(got == expected_chosen(n), "seed %d: segment %d has %d chosen of %d eligible, want %d", seed, b, got, n,
                  expected_chosen(n));
            eligible += n;
            want_chosen += expected_chosen(n);
        }
        CHECK(k == mb.count, "seed %d: %d chosen positions seen in order, count is %d", seed, k, mb.count);
    }
    chosen = masked + random + kept;
    CHECK(chosen == want_chosen, "%ld chosen, want %ld", chosen, want_chosen);
    CHECK(fabs((double)chosen / eligible - 0.15) < 0.005, "chosen share %.4f of %ld tokens, want 0.15", (double)chosen / eligible,
          eligible);

    /* 80 / 10 / 10 within 5 binomial standard deviations. A random draw equal to the
       original id counts as kept: probability 0.1 / (V - 5) each. */
    {
        double p_mask = 0.8, p_keep = 0.1 + 0.1 / (V - 5), p_random = 0.1 - 0.1 / (V - 5), n = (double)chosen;
        CHECK(fabs(masked - n * p_mask) <= 5.0 * sqrt(n * p_mask * (1 - p_mask)), "%ld of %ld masked, want %.0f", masked,
              chosen, n * p_mask);
        CHECK(fabs(random - n * p_random) <= 5.0 * sqrt(n * p_random * (1 - p_random)), "%ld of %ld random, want %.0f",
              random, chosen, n * p_random);
        CHECK(fabs(kept - n * p_keep) <= 5.0 * sqrt(n * p_keep * (1 - p_keep)), "%ld of %ld kept, want %.0f", kept, chosen,
              n * p_keep);
    }

    /* Random ids are uniform over 5..V-1: their mean is within 5 standard errors. */
    if (random > 0) {
        double mean = random_sum / random, sd = (V - 5) / sqrt(12.0);
        CHECK(fabs(mean - (V + 4) / 2.0) <= 5.0 * sd / sqrt((double)random), "random ids have mean %.1f, want %.1f", mean,
              (V + 4) / 2.0);
    }
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    free_segments(enc);
}

static void test_mask_custom_specials(void)
{
    /* Specials at scattered ids, as in BERT's vocab.txt ([PAD] 0, [UNK] 100, [CLS] 101,
       [SEP] 102, [MASK] 103): random replacements must skip every one of them. With
       only 3 non-special ids every random draw is visible. */
    enum { V = 8, B = 32, T = 40 };
    codir_mlm_config cfg = plain_mlm_config(V);
    codir_encoded *enc = (codir_encoded *)test_alloc(sizeof *enc);
    codir_batch batch;
    codir_mlm_batch mb;
    int counts[V] = {0}, b, t, seed, v;
    static const int normal[3] = {1, 4, 6};
    cfg.special_ids[0] = 0;
    cfg.special_ids[1] = 2;
    cfg.special_ids[2] = 3;
    cfg.special_ids[3] = 5;
    cfg.special_ids[4] = 7;
    cfg.mask_id = 7;
    cfg.mask_prob = 0.0f;
    cfg.random_prob = 1.0f;
    enc->count = B;
    enc->max_len = T;
    enc->lengths = (int *)test_alloc(B * sizeof(int));
    enc->labels = (int *)test_alloc(B * sizeof(int));
    enc->ids = (int *)test_alloc((size_t)B * T * sizeof(int));
    for (b = 0; b < B; b++) {
        enc->lengths[b] = T;
        for (t = 0; t < T; t++) enc->ids[b * T + t] = normal[(b + t) % 3];
    }
    codir_batch_init(&batch, B, T);
    codir_mlm_batch_init(&mb, B, T);
    for (seed = 0; seed < 8; seed++) {
        if (fill_and_mask(&batch, &mb, enc, NULL, 0, B, &cfg, (uint64_t)seed + 100)) break;
        for (t = 0; t < mb.count; t++) counts[mb.masked_ids[mb.positions[t]]]++;
    }
    for (v = 0; v < V; v++) {
        int is_normal = v == 1 || v == 4 || v == 6;
        if (is_normal) CHECK(counts[v] > 0, "non-special id %d was never drawn", v);
        else CHECK(counts[v] == 0, "special id %d was drawn %d times", v, counts[v]);
    }
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    free_segments(enc);
}

static void test_mask_independent_of_batch(void)
{
    /* The same segment gets the same masks alone, in another order, or in another
       batch with other padding. */
    enum { V = 300, N = 24, T = 50 };
    unsigned long long rng = 5;
    codir_encoded *enc = random_segments(N, 3, T, V, &rng);
    codir_mlm_config cfg = plain_mlm_config(V);
    codir_batch full, part;
    codir_mlm_batch mfull, mpart;
    int order[N], i, b, t;
    for (i = 0; i < N; i++) order[i] = N - 1 - i;
    codir_batch_init(&full, N, T);
    codir_batch_init(&part, N, T);
    codir_mlm_batch_init(&mfull, N, T);
    codir_mlm_batch_init(&mpart, N, T);
    if (!fill_and_mask(&full, &mfull, enc, NULL, 0, N, &cfg, 77)) {
        for (i = 0; i < N; i += 5) {
            int n = N - i < 5 ? N - i : 5;
            if (fill_and_mask(&part, &mpart, enc, order, i, n, &cfg, 77)) break;
            for (b = 0; b < n; b++) {
                int e = order[i + b];
                for (t = 0; t < enc->lengths[e]; t++) {
                    int a = mfull.masked_ids[e * full.seq + t], c = mpart.masked_ids[b * part.seq + t];
                    CHECK(a == c, "segment %d token %d: %d in the full batch, %d in a batch of %d", e, t, a, c, n);
                }
            }
        }

        /* Another seed changes the choice. */
        if (!fill_and_mask(&part, &mpart, enc, NULL, 0, N, &cfg, 78)) {
            int same = mpart.count == mfull.count;
            for (i = 0; same && i < mfull.count; i++) same = mpart.positions[i] == mfull.positions[i];
            CHECK(!same, "seeds 77 and 78 chose the same %d positions", mfull.count);
        }
    }
    codir_batch_free(&full);
    codir_batch_free(&part);
    codir_mlm_batch_free(&mfull);
    codir_mlm_batch_free(&mpart);
    free_segments(enc);
}

static void test_mask_short_segments(void)
{
    /* A segment with one eligible token gets it chosen; one with none gets nothing. */
    enum { T = 4 };
    codir_mlm_config cfg = plain_mlm_config(50);
    codir_encoded *enc = (codir_encoded *)test_alloc(sizeof *enc);
    codir_batch batch;
    codir_mlm_batch mb;
    static const int rows[3][T] = {{2, 17, 3, 0}, {2, 1, 3, 0}, {2, 3, 0, 0}};
    static const int lengths[3] = {3, 3, 2};
    int b;
    enc->count = 3;
    enc->max_len = T;
    enc->lengths = (int *)test_alloc(3 * sizeof(int));
    enc->labels = (int *)test_alloc(3 * sizeof(int));
    enc->ids = (int *)test_alloc(3 * T * sizeof(int));
    for (b = 0; b < 3; b++) {
        enc->lengths[b] = lengths[b];
        memcpy(enc->ids + b * T, rows[b], sizeof rows[b]);
    }
    codir_batch_init(&batch, 3, T);
    codir_mlm_batch_init(&mb, 3, T);
    if (!fill_and_mask(&batch, &mb, enc, NULL, 0, 3, &cfg, 9)) {
        CHECK(mb.count == 1, "%d positions chosen, want only the one eligible token", mb.count);
        CHECK(mb.count < 1 || mb.positions[0] == 1, "position %d chosen, want 1", mb.positions[0]);
        CHECK(mb.count < 1 || mb.targets[0] == 17, "target %d, want 17", mb.targets[0]);
    }
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    free_segments(enc);
}

static void test_mask_rejects_bad_config(void)
{
    enum { T = 4 };
    codir_mlm_config cfg = plain_mlm_config(50);
    codir_encoded *enc = (codir_encoded *)test_alloc(sizeof *enc);
    codir_batch batch;
    codir_mlm_batch mb;
    enc->count = 1;
    enc->max_len = T;
    enc->lengths = (int *)test_alloc(sizeof(int));
    enc->labels = (int *)test_alloc(sizeof(int));
    enc->ids = (int *)test_alloc(T * sizeof(int));
    enc->lengths[0] = 3;
    enc->ids[0] = 2;
    enc->ids[1] = 9;
    enc->ids[2] = 3;
    codir_batch_init(&batch, 1, T);
    codir_mlm_batch_init(&mb, 1, T);
    codir_batch_fill(&batch, enc, NULL, 0, 1);
    cfg.mask_prob = 0.95f;
    CHECK(codir_mlm_mask(&mb, &batch, &cfg, 1) == CODIR_ERR_INVALID, "mask 0.95 + random 0.1 was accepted");
    cfg = plain_mlm_config(50);
    cfg.select_prob = 0.0f;
    CHECK(codir_mlm_mask(&mb, &batch, &cfg, 1) == CODIR_ERR_INVALID, "selection rate 0 was accepted");
    cfg = plain_mlm_config(5);
    CHECK(codir_mlm_mask(&mb, &batch, &cfg, 1) == CODIR_ERR_INVALID, "a vocabulary of only special tokens was accepted");
    codir_mlm_batch_free(&mb);
    codir_mlm_batch_init(&mb, 1, 2);
    cfg = plain_mlm_config(50);
    CHECK(codir_mlm_mask(&mb, &batch, &cfg, 1) == CODIR_ERR_INVALID, "a batch over the capacity was accepted");
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    free_segments(enc);
}

/* ---- loss ---- */

/* A model configuration with the masked-LM head and no dropout. */
static codir_config mlm_config(int vocab_size, int max_len, int layers, int hidden)
{
    codir_config cfg = codir_config_default();
    cfg.vocab_size = vocab_size;
    cfg.max_len = max_len;
    cfg.num_layers = layers;
    cfg.hidden = hidden;
    cfg.num_heads = 2;
    cfg.ffn = 2 * hidden;
    cfg.num_labels = 2;
    cfg.mlm_head = 1;
    cfg.dropout = 0.0f;
    return cfg;
}

/* Replaces BERT's small initialization by values large enough that logits differ. */
static void scramble(codir_model *m, unsigned long long seed)
{
    unsigned long long rng = seed;
    int i;
    size_t k;
    for (i = 0; i < m->params.num_tensors; i++) {
        codir_tensor *t = &m->params.tensors[i];
        int gamma = strstr(t->name, "gamma") != NULL;
        for (k = 0; k < t->numel; k++)
            t->data[k] = gamma ? (float)check_uniform(&rng, 0.7, 1.3) : (float)check_uniform(&rng, -0.3, 0.3);
    }
}

/* mean over rows r of -log softmax(logits[rows[r]])[targets[r]], in float64. */
static double reference_cross_entropy(const float *logits, const int *rows, const int *targets, int count, int V)
{
    double sum = 0.0;
    int r, v;
    for (r = 0; r < count; r++) {
        const float *x = logits + (size_t)rows[r] * V;
        double mx = x[0], z = 0.0;
        for (v = 1; v < V; v++) mx = x[v] > mx ? x[v] : mx;
        for (v = 0; v < V; v++) z += exp((double)x[v] - mx);
        sum += log(z) + mx - x[targets[r]];
    }
    return sum / count;
}

static void test_loss_only_chosen_positions(void)
{
    enum { V = 40, B = 3, T = 12, C = 16 };
    unsigned long long rng = 31;
    codir_encoded *enc = random_segments(B, 6, T, V, &rng);
    codir_mlm_config mcfg = plain_mlm_config(V);
    codir_config cfg = mlm_config(V, T, 1, C);
    codir_model *model = codir_model_create(&cfg, 3);
    codir_batch batch;
    codir_mlm_batch mb;
    codir_ctx ctx;
    int shape[3], all[B * T], i, k, chosen[B * T] = {0};
    float *hidden0 = (float *)test_alloc(B * T * C * sizeof(float));
    codir_ctx_init(&ctx, 1 << 20, 1);
    codir_batch_init(&batch, B, T);
    codir_mlm_batch_init(&mb, B, T);
    scramble(model, 4);
    if (fill_and_mask(&batch, &mb, enc, NULL, 0, B, &mcfg, 5)) goto done;
    CHECK(mb.count >= 2, "only %d positions chosen", mb.count);
    for (k = 0; k < mb.count; k++) chosen[mb.positions[k]] = 1;
    for (i = 0; i < B * batch.seq * C; i++) hidden0[i] = (float)check_uniform(&rng, -1, 1);
    shape[0] = B;
    shape[1] = batch.seq;
    shape[2] = C;
    for (i = 0; i < B * batch.seq; i++) all[i] = i;

    {
        codir_tensor *hidden, *loss, *logits, *full;
        double want;
        float first, again;

        /* The loss against float64 cross-entropy over the chosen rows of the full logits. */
        codir_ctx_begin(&ctx, 1, 0, 0);
        hidden = codir_tensor_new(&ctx, 3, shape, 1);
        memcpy(hidden->data, hidden0, (size_t)B * batch.seq * C * sizeof(float));
        loss = codir_mlm_loss(&ctx, model, hidden, &mb, &logits);
        full = codir_mlm_logits(&ctx, model, hidden, all, B * batch.seq);
        CHECK(loss != NULL, "loss failed: %s", codir_last_error());
        CHECK(logits != NULL, "the loss returned no logits");
        CHECK(full != NULL, "full logits failed: %s", codir_last_error());
        if (!loss || !logits || !full) goto done;
        CHECK(logits->shape[0] == mb.count, "logits have %d rows, want %d", logits->shape[0], mb.count);
        CHECK(logits->shape[1] == V, "logits have %d columns, want %d", logits->shape[1], V);
        want = reference_cross_entropy(full->data, mb.positions, mb.targets, mb.count, V);
        check_close("masked-LM loss", &loss->data[0], &want, 1, 1e-5, 1e-5);
        first = loss->data[0];

        /* No gradient reaches an unchosen position; every chosen one gets some. */
        CHECK(codir_backward(&ctx, loss) == CODIR_OK, "backward failed: %s", codir_last_error());
        for (i = 0; i < B * batch.seq; i++) {
            double norm = 0.0;
            for (k = 0; k < C; k++) norm += fabs(hidden->grad[(size_t)i * C + k]);
            if (chosen[i]) CHECK(norm > 0.0, "chosen position %d got no gradient", i);
            else CHECK(norm == 0.0, "unchosen position %d got gradient %g", i, norm);
        }

        /* Changing every unchosen position, padding included, leaves the loss as it was. */
        codir_ctx_begin(&ctx, 0, 0, 0);
        hidden = codir_tensor_new(&ctx, 3, shape, 0);
        memcpy(hidden->data, hidden0, (size_t)B * batch.seq * C * sizeof(float));
        for (i = 0; i < B * batch.seq; i++)
            if (!chosen[i])
                for (k = 0; k < C; k++) hidden->data[(size_t)i * C + k] = (float)check_uniform(&rng, -50, 50);
        loss = codir_mlm_loss(&ctx, model, hidden, &mb, NULL);
        again = loss ? loss->data[0] : NAN;
        CHECK(again == first, "loss %.9g became %.9g after changing unchosen positions", (double)first, (double)again);

        /* Changing one chosen position does change it. */
        hidden->data[(size_t)mb.positions[0] * C] += 5.0f;
        loss = codir_mlm_loss(&ctx, model, hidden, &mb, NULL);
        CHECK(loss != NULL, "loss failed: %s", codir_last_error());
        CHECK(!loss || loss->data[0] != first, "loss did not move with a chosen position");
    }

done:
    free(hidden0);
    codir_ctx_free(&ctx);
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    codir_model_free(model);
    free_segments(enc);
}

static void test_loss_needs_head(void)
{
    enum { V = 30, T = 6 };
    codir_config cfg = mlm_config(V, T, 1, 8);
    codir_model *model;
    codir_mlm_batch mb;
    codir_adamw opt;
    codir_ctx ctx;
    codir_loss_terms terms;
    cfg.mlm_head = 0;
    model = codir_model_create(&cfg, 1);
    codir_ctx_init(&ctx, 1 << 16, 1);
    codir_mlm_batch_init(&mb, 1, T);
    codir_adamw_init(&opt, &model->params, 0.9f, 0.98f, 1e-6f, 0.0f);
    mb.count = 1;
    CHECK(codir_mlm_step(&ctx, model, &opt, &mb, 1e-3f, &terms) == CODIR_ERR_INVALID, "a model without head trained");
    CHECK(strstr(codir_last_error(), "mlm_head") != NULL, "message \"%s\" does not name mlm_head", codir_last_error());
    codir_adamw_free(&opt);
    codir_mlm_batch_free(&mb);
    codir_ctx_free(&ctx);
    codir_model_free(model);
}

/* ---- same-document negatives ---- */

static void test_negatives_same_document(void)
{
    /* Documents of 12, 3, 1 and 8 segments, built from a corpus, with K = 5. */
    enum { K = 5, DRAWS = 400 };
    static const char text[] =
        "a b c\nd e f\ng h i\nj k l\nm n o\np q r\ns t u\nv w x\ny z a\nb c d\ne f g\nh i j\n\n"
        "k l m\nn o p\nq r s\n\n"
        "t u v\n\n"
        "w x y\nz a b\nc d e\nf g h\ni j k\nl m n\no p q\nr s t\n";
    static const int doc_size[4] = {12, 3, 1, 8};
    codir_vocab *vocab = letter_vocab();
    codir_corpus *c = codir_corpus_parse(text, sizeof text - 1, "docs.txt");
    codir_encoded *enc = vocab && c ? codir_segment_corpus(vocab, c, 5) : NULL;
    codir_config cfg = mlm_config(40, 5, 2, 8);
    codir_distill_config dcfg = codir_distill_config_default();
    codir_distiller *d = NULL;
    int hits[24] = {0}, neg[K], anchor, draw, j, i, N;
    CHECK(enc != NULL, "segmenting failed: %s", codir_last_error());
    if (!enc) goto done;
    N = enc->count;
    CHECK(N == 24, "%d segments, want one per line (24)", N);
    if (N != 24) goto done;
    dcfg.negatives_from = CODIR_NEG_SAME_GROUP;
    dcfg.num_negatives = K;
    dcfg.proj_dim = 4;
    d = codir_distiller_create(&dcfg, &cfg, &cfg, enc->labels, N, 8);
    CHECK(d != NULL, "distiller failed: %s", codir_last_error());
    if (!d) goto done;

    for (anchor = 0; anchor < N; anchor++) {
        int doc = enc->labels[anchor], others = doc_size[doc] - 1;
        memset(hits, 0, sizeof hits);
        for (draw = 0; draw < DRAWS; draw++) {
            int got = codir_sample_negatives(d, anchor, neg, K), inside = 0;
            CHECK(got == K, "anchor %d: %d negatives, want %d", anchor, got, K);
            for (j = 0; j < got; j++) {
                CHECK(neg[j] != anchor, "anchor %d drew itself", anchor);
                CHECK(neg[j] >= 0, "anchor %d drew %d", anchor, neg[j]);
                CHECK(neg[j] < N, "anchor %d drew %d of %d segments", anchor, neg[j], N);
                for (i = 0; i < j; i++) CHECK(neg[i] != neg[j], "anchor %d drew %d twice", anchor, neg[j]);
                inside += enc->labels[neg[j]] == doc;
                hits[neg[j]]++;
            }

            /* All from the document when it has K others; else all of them, then others. */
            CHECK(inside == (others >= K ? K : others), "anchor %d (document %d, %d others): %d negatives from it", anchor,
                  doc, others, inside);
        }

        /* Uniform within the document: each other segment near K / others of the draws. */
        if (others >= K)
            for (i = 0; i < N; i++)
                if (i != anchor && enc->labels[i] == doc) {
                    double p = (double)K / others, sd = sqrt(DRAWS * p * (1 - p));
                    CHECK(fabs(hits[i] - DRAWS * p) <= 5 * sd + 1, "anchor %d: segment %d drawn %d of %d times, want %.0f",
                          anchor, i, hits[i], DRAWS, DRAWS * p);
                }
    }

done:
    codir_distiller_free(d);
    codir_encoded_free(enc);
    codir_corpus_free(c);
    codir_vocab_free(vocab);
}

/* ---- training steps ---- */

/* Segments with a learnable pattern: document d counts upward in steps of d + 1 over
   ids 5..V-1, so a masked token follows from its neighbours. */
static codir_encoded *pattern_segments(int docs, int per_doc, int T, int V)
{
    codir_encoded *enc = (codir_encoded *)test_alloc(sizeof *enc);
    int N = docs * per_doc, s, t;
    enc->count = N;
    enc->max_len = T;
    enc->num_classes = docs;
    enc->lengths = (int *)test_alloc((size_t)N * sizeof(int));
    enc->labels = (int *)test_alloc((size_t)N * sizeof(int));
    enc->ids = (int *)test_alloc((size_t)N * T * sizeof(int));
    for (s = 0; s < N; s++) {
        int d = s / per_doc, *row = enc->ids + (size_t)s * T, n = T - (s % 3);
        enc->labels[s] = d;
        enc->lengths[s] = n;
        row[0] = 2;
        for (t = 1; t < n - 1; t++) row[t] = 5 + (s * 7 + t * (d + 1)) % (V - 5);
        row[n - 1] = 3;
    }
    return enc;
}

static void test_mlm_step_lowers_loss(void)
{
    enum { V = 24, T = 12, N = 8, STEPS = 20 };
    codir_encoded *enc = pattern_segments(2, 4, T, V);
    codir_mlm_config mcfg = plain_mlm_config(V);
    codir_config cfg = mlm_config(V, T, 2, 16);
    codir_model *model = codir_model_create(&cfg, 11);
    codir_batch batch;
    codir_mlm_batch mb;
    codir_adamw opt;
    codir_ctx ctx;
    codir_loss_terms terms;
    double loss[STEPS];
    int i;
    codir_ctx_init(&ctx, 1 << 20, 1);
    codir_batch_init(&batch, N, T);
    codir_mlm_batch_init(&mb, N, T);
    codir_adamw_init(&opt, &model->params, 0.9f, 0.98f, 1e-6f, 0.01f);
    if (fill_and_mask(&batch, &mb, enc, NULL, 0, N, &mcfg, 3)) goto done;
    for (i = 0; i < STEPS; i++) {
        int rc = codir_mlm_step(&ctx, model, &opt, &mb, 3e-3f, &terms);
        CHECK(rc == CODIR_OK, "step %d failed: %s", i, codir_last_error());
        if (rc) goto done;
        CHECK(terms.total == terms.task, "step %d: total %g differs from the masked-LM loss %g", i, terms.total,
              terms.task);
        CHECK(terms.kd == 0.0, "step %d: KD term %g without a teacher", i, terms.kd);
        CHECK(terms.crd == 0.0, "step %d: contrastive term %g without a teacher", i, terms.crd);
        loss[i] = terms.task;
    }
    CHECK(fabs(loss[0] - log((double)V)) < 0.5, "first loss %.4f, want near log V = %.4f", loss[0], log((double)V));
    CHECK(loss[STEPS - 1] < 0.8 * loss[0], "loss went from %.4f to %.4f in %d steps", loss[0], loss[STEPS - 1], STEPS);
    CHECK(opt.step == STEPS, "the optimizer took %ld steps, want %d", opt.step, STEPS);

done:
    codir_adamw_free(&opt);
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    codir_ctx_free(&ctx);
    codir_model_free(model);
    free_segments(enc);
}

/* T^2 mean_r KL(softmax(t_r / T) || softmax(s_r / T)) over rows [count, V], in float64. */
static double reference_kd(const float *s, const float *t, int count, int V, double temp)
{
    double sum = 0.0;
    int r, v;
    for (r = 0; r < count; r++) {
        const float *x = s + (size_t)r * V, *y = t + (size_t)r * V;
        double mx = -INFINITY, my = -INFINITY, zx = 0.0, zy = 0.0;
        for (v = 0; v < V; v++) {
            mx = x[v] / temp > mx ? x[v] / temp : mx;
            my = y[v] / temp > my ? y[v] / temp : my;
        }
        for (v = 0; v < V; v++) {
            zx += exp(x[v] / temp - mx);
            zy += exp(y[v] / temp - my);
        }
        for (v = 0; v < V; v++) {
            double lp = y[v] / temp - my - log(zy), lq = x[v] / temp - mx - log(zx);
            sum += exp(lp) * (lp - lq);
        }
    }
    return temp * temp * sum / count;
}

/* Computes a model's masked-LM logits at mb's positions without tape into out[count, V]. */
static int masked_logits(codir_ctx *ctx, const codir_model *model, const codir_mlm_batch *mb, float *out)
{
    codir_output o;
    codir_tensor *logits;
    codir_ctx_begin(ctx, 0, 0, 0);
    if (codir_model_forward(ctx, model, &mb->batch, &o)) return 1;
    logits = codir_mlm_logits(ctx, model, o.hidden[o.num_hidden - 1], mb->positions, mb->count);
    if (!logits) return 1;
    memcpy(out, logits->data, (size_t)mb->count * model->cfg.vocab_size * sizeof(float));
    return 0;
}

static void test_pretrain_step_lowers_loss(void)
{
    enum { V = 24, T = 12, DOCS = 4, PER_DOC = 4, N = DOCS * PER_DOC, STEPS = 20 };
    codir_encoded *enc = pattern_segments(DOCS, PER_DOC, T, V);
    codir_mlm_config mcfg = plain_mlm_config(V);
    codir_config tcfg = mlm_config(V, T, 2, 16), scfg = tcfg;
    codir_model *teacher = codir_model_create(&tcfg, 21), *student;
    codir_distill_config dcfg = codir_distill_config_default();
    codir_distiller *d = NULL;
    codir_batch batch;
    codir_mlm_batch mb;
    codir_adamw opt_t, opt_s, opt_h;
    codir_ctx ctx;
    codir_loss_terms terms;
    double total[STEPS];
    float *s_logits = NULL, *t_logits = NULL, *bank_before = NULL;
    int i;
    scfg.num_layers = 1;
    student = codir_model_create(&scfg, 22);
    codir_ctx_init(&ctx, 1 << 20, 1);
    codir_batch_init(&batch, N, T);
    codir_mlm_batch_init(&mb, N, T);
    memset(&opt_h, 0, sizeof opt_h);
    codir_adamw_init(&opt_t, &teacher->params, 0.9f, 0.98f, 1e-6f, 0.01f);
    codir_adamw_init(&opt_s, &student->params, 0.9f, 0.98f, 1e-6f, 0.01f);
    if (fill_and_mask(&batch, &mb, enc, NULL, 0, N, &mcfg, 3)) goto done;

    /* A teacher trained a little on the patterns, and a student from its blocks. */
    for (i = 0; i < 30; i++)
        if (codir_mlm_step(&ctx, teacher, &opt_t, &mb, 3e-3f, &terms)) break;
    CHECK(codir_model_init_from(student, teacher, CODIR_INIT_EVERY_OTHER) == CODIR_OK, "init failed: %s",
          codir_last_error());

    /* Same-document negatives: each segment's 3 document mates, then 1 from elsewhere. */
    dcfg.negatives_from = CODIR_NEG_SAME_GROUP;
    dcfg.num_negatives = 4;
    dcfg.proj_dim = 8;
    dcfg.lambda = 0.5f;
    d = codir_distiller_create(&dcfg, &scfg, &tcfg, enc->labels, N, 23);
    CHECK(d != NULL, "distiller failed: %s", codir_last_error());
    if (!d || codir_adamw_init(&opt_h, &d->params, 0.9f, 0.98f, 1e-6f, 0.01f)) goto done;
    s_logits = (float *)test_alloc((size_t)mb.count * V * sizeof(float));
    t_logits = (float *)test_alloc((size_t)mb.count * V * sizeof(float));
    bank_before = (float *)test_alloc((size_t)N * dcfg.proj_dim * sizeof(float));
    memcpy(bank_before, d->bank, (size_t)N * dcfg.proj_dim * sizeof(float));

    for (i = 0; i < STEPS; i++) {
        int rc;
        if (i == 0 && (masked_logits(&ctx, student, &mb, s_logits) || masked_logits(&ctx, teacher, &mb, t_logits))) {
            CHECK(0, "reference logits failed: %s", codir_last_error());
            goto done;
        }
        rc = codir_pretrain_distill_step(&ctx, student, teacher, d, &opt_s, &opt_h, &mb, 2e-3f, &terms);
        CHECK(rc == CODIR_OK, "step %d failed: %s", i, codir_last_error());
        if (rc) goto done;
        total[i] = terms.total;
        if (i == 0) {
            /* The first step's terms against float64 on the models before the update. */
            double ce, want;
            int *rows = (int *)test_alloc((size_t)mb.count * sizeof(int)), r;
            for (r = 0; r < mb.count; r++) rows[r] = r;
            ce = reference_cross_entropy(s_logits, rows, mb.targets, mb.count, V);
            free(rows);
            CHECK_SCALAR("CoDIR-Pre MLM term", terms.task, ce, 1e-5, 1e-5);
            want = reference_kd(s_logits, t_logits, mb.count, V, dcfg.temperature);
            CHECK_SCALAR("CoDIR-Pre KD term", terms.kd, want, 1e-6, 1e-4);
            want = (1.0 - dcfg.beta) * terms.task + dcfg.beta * terms.kd + dcfg.lambda * terms.crd;
            CHECK_SCALAR("CoDIR-Pre total", terms.total, want, 1e-6, 1e-5);
            CHECK(terms.kd > 0.0, "KD term %g must be positive", terms.kd);
            CHECK(terms.crd > 0.0, "contrastive term %g must be positive", terms.crd);
        }
    }
    CHECK(total[STEPS - 1] < 0.8 * total[0], "total loss went from %.4f to %.4f in %d steps", total[0],
          total[STEPS - 1], STEPS);

    /* The bank rows of the batch moved toward the teacher projections. */
    {
        double moved = 0.0;
        for (i = 0; i < N * dcfg.proj_dim; i++) moved += fabs(d->bank[i] - bank_before[i]);
        CHECK(moved > 0.0, "the memory bank did not move");
    }

done:
    free(s_logits);
    free(t_logits);
    free(bank_before);
    codir_adamw_free(&opt_t);
    codir_adamw_free(&opt_s);
    codir_adamw_free(&opt_h);
    codir_distiller_free(d);
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    codir_ctx_free(&ctx);
    codir_model_free(teacher);
    codir_model_free(student);
    free_segments(enc);
}

/* ---- evaluation ---- */

static void test_evaluate_matches_reference(void)
{
    enum { V = 30, T = 10, N = 11 };
    unsigned long long rng = 41;
    codir_encoded *enc = random_segments(N, 3, T, V, &rng);
    codir_mlm_config mcfg = plain_mlm_config(V);
    codir_config cfg = mlm_config(V, T, 1, 16);
    codir_model *model = codir_model_create(&cfg, 5);
    codir_mlm_scores s7, s1;
    codir_batch batch;
    codir_mlm_batch mb;
    codir_ctx ctx;
    float *logits = (float *)test_alloc((size_t)T * V * sizeof(float));
    double nll = 0.0, want;
    long correct = 0, count = 0;
    int e, r, v;
    scramble(model, 6);
    codir_ctx_init(&ctx, 1 << 20, 1);
    codir_batch_init(&batch, 1, T);
    codir_mlm_batch_init(&mb, 1, T);

    /* The reference: one segment at a time, float64 log-softmax and argmax. */
    for (e = 0; e < N; e++) {
        int *rows = (int *)test_alloc((size_t)T * sizeof(int));
        if (fill_and_mask(&batch, &mb, enc, NULL, e, 1, &mcfg, 99) || masked_logits(&ctx, model, &mb, logits)) {
            free(rows);
            goto done;
        }
        for (r = 0; r < mb.count; r++) {
            int best = 0;
            rows[r] = r;
            for (v = 1; v < V; v++)
                if (logits[(size_t)r * V + v] > logits[(size_t)r * V + best]) best = v;
            correct += best == mb.targets[r];
        }
        nll += reference_cross_entropy(logits, rows, mb.targets, mb.count, V) * mb.count;
        count += mb.count;
        free(rows);
    }

    CHECK(codir_mlm_evaluate(&ctx, model, enc, 7, &mcfg, 99, &s7) == CODIR_OK, "evaluate failed: %s", codir_last_error());
    CHECK(codir_mlm_evaluate(&ctx, model, enc, 1, &mcfg, 99, &s1) == CODIR_OK, "evaluate failed: %s", codir_last_error());
    CHECK(s7.count == count, "%ld tokens scored at batch 7, want %ld", s7.count, count);
    CHECK(s1.count == count, "%ld tokens scored at batch 1, want %ld", s1.count, count);
    want = nll / count;
    CHECK_SCALAR("evaluation loss, batch 7", s7.loss, want, 1e-5, 1e-5);
    CHECK_SCALAR("evaluation loss, batch 1", s1.loss, want, 1e-5, 1e-5);
    want = exp(nll / count);
    CHECK_SCALAR("perplexity", s7.perplexity, want, 1e-5, 1e-5);
    CHECK(s1.accuracy == (double)correct / count, "accuracy %.6f, want %ld / %ld", s1.accuracy, correct, count);
    CHECK(fabs(s7.accuracy - s1.accuracy) <= 1.0 / count, "accuracy %.6f at batch 7, %.6f at batch 1", s7.accuracy,
          s1.accuracy);

done:
    free(logits);
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    codir_ctx_free(&ctx);
    codir_model_free(model);
    free_segments(enc);
}

const test_case tests_pretrain[] = {
    {"pretrain corpus splits documents", test_corpus_documents},
    {"pretrain corpus rejects NUL byte", test_corpus_rejects_nul},
    {"pretrain corpus rejects empty text", test_corpus_rejects_empty},
    {"pretrain corpus names missing file", test_corpus_load_missing},
    {"pretrain corpus loads shipped text", test_corpus_load_shipped},
    {"pretrain segments hand-packed", test_segments_hand_packed},
    {"pretrain segments random packing", test_segments_random_packing},
    {"pretrain segments reject max_len 2", test_segments_reject_short_length},
    {"pretrain mask statistics", test_mask_statistics},
    {"pretrain mask skips scattered specials", test_mask_custom_specials},
    {"pretrain mask independent of batch", test_mask_independent_of_batch},
    {"pretrain mask short segments", test_mask_short_segments},
    {"pretrain mask rejects bad config", test_mask_rejects_bad_config},
    {"pretrain loss only at chosen positions", test_loss_only_chosen_positions},
    {"pretrain step needs masked-LM head", test_loss_needs_head},
    {"pretrain negatives from same document", test_negatives_same_document},
    {"pretrain mlm steps lower loss", test_mlm_step_lowers_loss},
    {"pretrain distill steps lower loss", test_pretrain_step_lowers_loss},
    {"pretrain evaluate matches reference", test_evaluate_matches_reference},
};
const int tests_pretrain_count = (int)(sizeof tests_pretrain / sizeof tests_pretrain[0]);
