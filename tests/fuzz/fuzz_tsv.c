/* libFuzzer harness for the TSV reader: codir_dataset_load_tsv (layout found from the
   header) and codir_dataset_load_tsv_opts with several column and label layouts, then
   codir_encode_dataset on every data set that loads.

   The first input byte picks the reader and layout, the rest is the file. Every call
   must either fail with a reason that names the file, or return a data set whose
   fields are consistent: texts present, class ids in [0, num_classes), finite
   regression targets. Build and run (tests/fuzz/run.sh does both):

       clang -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
           tests/fuzz/fuzz_tsv.c -o /tmp/fuzz_tsv -lm
       /tmp/fuzz_tsv -max_total_time=60 tests/fuzz/corpus/tsv */
#define _POSIX_C_SOURCE 200809L
#define CODIR_IMPLEMENTATION
#include "../../codir.h"
#include "fuzz_util.h"

#include <math.h>

enum { MAX_LEN = 12, LAYOUTS = 7 };

static codir_vocab *vocab;
static const char *tsv_path;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static const char *const texts[] = {"the movie was great", "a dull and boring film",
                                        "entailment neutral contradiction", "caf\xC3\xA9 na\xC3\xAFve \xE4\xB8\xAD"};
    (void)argc;
    (void)argv;
    fuzz_make_dir();
    tsv_path = fuzz_path("data.tsv");
    vocab = codir_vocab_build(texts, 4, 60, 1, 1);
    if (!vocab) fuzz_fail(codir_last_error());
    return 0;
}

/* Fills `o` with layout `layout` (0 is codir_dataset_load_tsv's own choice). */
static void tsv_layout(int layout, codir_tsv_options *o)
{
    static const char *const nli2[2] = {"entailment", "not_entailment"};
    *o = codir_tsv_options_default();
    switch (layout) {
    case 1: /* SST-2: sentence, label; integer ids */
        break;
    case 2: /* sentence pairs with class names sorted from the file */
        o->text_a = "sentence1";
        o->text_b = "sentence2";
        o->label = "label";
        o->label_kind = CODIR_LABEL_NAMES;
        break;
    case 3: /* STS-B: regression scores */
        o->text_a = "sentence1";
        o->text_b = "sentence2";
        o->label = "score";
        o->label_kind = CODIR_LABEL_FLOAT;
        break;
    case 4: /* CoLA: no header, label in field 1, sentence in field 3 */
        o->has_header = 0;
        o->text_a = o->label = NULL;
        o->text_a_index = 3;
        o->label_index = 1;
        break;
    case 5: /* RTE: pairs with given class names */
        o->text_a = "sentence1";
        o->text_b = "sentence2";
        o->label = "label";
        o->label_kind = CODIR_LABEL_NAMES;
        o->label_names = nli2;
        o->label_name_count = 2;
        break;
    default: /* no header, pair by index, class names from the file */
        o->has_header = 0;
        o->text_a = o->label = NULL;
        o->text_a_index = 0;
        o->text_b_index = 1;
        o->label_index = 2;
        o->label_kind = CODIR_LABEL_NAMES;
        break;
    }
}

/* Checks the fields of a loaded data set and encodes it. */
static void check_dataset(const codir_dataset *d)
{
    codir_encoded *enc;
    int i, t;
    if (d->count < 1) fuzz_fail("a data set loaded with no examples");
    if (d->num_classes < 1) fuzz_fail("num_classes is below 1");
    for (i = 0; i < d->count; i++) {
        if (!d->texts[i]) fuzz_fail("a text is NULL");
        if (d->texts_b && !d->texts_b[i]) fuzz_fail("a second text is NULL");
        if (d->labels[i] < 0 || d->labels[i] >= d->num_classes) fuzz_fail("a label is outside [0, num_classes)");
        if (d->is_regression && (!d->targets || !isfinite(d->targets[i]))) fuzz_fail("a regression target is not finite");
    }
    if (d->label_names)
        for (i = 0; i < d->num_classes; i++)
            if (!d->label_names[i]) fuzz_fail("a label name is NULL");

    enc = codir_encode_dataset(vocab, d, MAX_LEN);
    if (!enc) fuzz_fail(codir_last_error());
    if (enc->count != d->count) fuzz_fail("the encoded data set has another example count");
    for (i = 0; i < enc->count; i++) {
        int n = enc->lengths[i];
        if (n < 2 || n > MAX_LEN) fuzz_fail("an encoded length is outside [2, max_len]");
        for (t = 0; t < n; t++) {
            int id = enc->ids[(size_t)i * (size_t)enc->max_len + (size_t)t];
            if (id < 0 || id >= vocab->size) fuzz_fail("an encoded id is outside the vocabulary");
        }
    }
    codir_encoded_free(enc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    codir_tsv_options options;
    codir_dataset *d;
    int layout;
    if (size < 1) return 0;
    layout = data[0] % LAYOUTS;
    fuzz_write(tsv_path, data + 1, size - 1);
    codir_clear_error();
    if (layout == 0) {
        d = codir_dataset_load_tsv(tsv_path);
    } else {
        tsv_layout(layout, &options);
        d = codir_dataset_load_tsv_opts(tsv_path, &options);
    }
    if (d) check_dataset(d);
    else fuzz_expect_error_naming(tsv_path);
    codir_dataset_free(d);
    return 0;
}
