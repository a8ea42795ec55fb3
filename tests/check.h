/* A minimal test harness shared by the test_*.c files in this folder.

   Each test is a void function that calls CHECK or check_close. A test passes when no
   check in it failed. main.c runs every test, prints one line per failure and ends
   with "N passed, N failed", exiting non-zero on any failure. */
#ifndef CODIR_CHECK_H
#define CODIR_CHECK_H

#include <stddef.h>
#include "../codir.h"

typedef struct test_case {
    const char *name;
    void (*run)(void);
} test_case;

/* Records a failure of the running test and prints where and why. */
void check_fail(const char *file, int line, const char *fmt, ...);

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) check_fail(__FILE__, __LINE__, __VA_ARGS__);           \
    } while (0)

/* Compares got[i] with want[i] for i < n under |got - want| <= atol + rtol * |want|.
   On failure it prints `what`, the worst index and both values, and returns 0. */
#define check_close(what, got, want, n, atol, rtol) \
    check_close_at(__FILE__, __LINE__, what, got, want, n, atol, rtol)
int check_close_at(const char *file, int line, const char *what, const float *got,
                   const double *want, size_t n, double atol, double rtol);

/* Deterministic test data: uniform in [lo, hi) from a 64-bit state. */
double check_uniform(unsigned long long *state, double lo, double hi);

#endif
