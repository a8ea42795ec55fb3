/* Helpers shared by the libFuzzer harnesses in this folder: a private temporary
   folder, removed at exit, and writing a fuzzer input to a file in it.

   Each harness defines _POSIX_C_SOURCE 200809L before any #include (for mkdtemp) and
   includes this file after codir.h. */
#ifndef CODIR_FUZZ_UTIL_H
#define CODIR_FUZZ_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_MAX_FILES 8

static char fuzz_dir[4096];
static char fuzz_files[FUZZ_MAX_FILES][4200];
static int fuzz_file_count;

/* Removes the files that fuzz_path named, then the folder. */
static void fuzz_remove_dir(void)
{
    int i;
    for (i = 0; i < fuzz_file_count; i++) unlink(fuzz_files[i]);
    if (fuzz_dir[0]) rmdir(fuzz_dir);
}

/* Stops the fuzzer with a message. libFuzzer reports the abort as a crash and saves
   the input that caused it. */
static void fuzz_fail(const char *what)
{
    fprintf(stderr, "fuzz: %s\n", what);
    abort();
}

/* Creates the folder under $TMPDIR (or /tmp) once. */
static void fuzz_make_dir(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(fuzz_dir, sizeof fuzz_dir, "%s/codir_fuzz_XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(fuzz_dir)) fuzz_fail("mkdtemp failed; set TMPDIR to a writable folder");
    atexit(fuzz_remove_dir);
}

/* Returns the path of file `name` inside the folder and remembers it for removal. */
static const char *fuzz_path(const char *name)
{
    int i;
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", fuzz_dir, name);
    for (i = 0; i < fuzz_file_count; i++)
        if (strcmp(fuzz_files[i], path) == 0) return fuzz_files[i];
    if (fuzz_file_count == FUZZ_MAX_FILES) fuzz_fail("too many temporary files");
    memcpy(fuzz_files[fuzz_file_count], path, sizeof path);
    return fuzz_files[fuzz_file_count++];
}

/* Writes data[size] to path. Any failure stops the fuzzer, since it is not the
   library's fault. */
static void fuzz_write(const char *path, const uint8_t *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f) fuzz_fail("cannot create a temporary file");
    if (size && fwrite(data, 1, size, f) != size) fuzz_fail("cannot write a temporary file");
    if (fclose(f) != 0) fuzz_fail("cannot close a temporary file");
}

/* Checks that a failed call left a reason that names `path`. */
static void fuzz_expect_error_naming(const char *path)
{
    const char *reason = codir_last_error();
    if (!reason[0]) fuzz_fail("a call failed without a reason in codir_last_error()");
    if (!strstr(reason, path)) {
        fprintf(stderr, "fuzz: reason: %s\n", reason);
        fuzz_fail("the reason does not name the file");
    }
}

#endif
