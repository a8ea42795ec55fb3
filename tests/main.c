/* Test runner: the one translation unit with CODIR_IMPLEMENTATION.
   Usage: tests [substring]  runs the tests whose name contains the substring. */
#define CODIR_IMPLEMENTATION
#include "check.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define TEST_GROUP(g) extern const test_case g[]; extern const int g##_count;
#include "groups.h"
#undef TEST_GROUP

static int current_failed;
static const char *current_name = "";

void check_fail(const char *file, int line, const char *fmt, ...)
{
    va_list args;
    current_failed = 1;
    fprintf(stderr, "FAIL %s (%s:%d): ", current_name, file, line);
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
}

int check_close_at(const char *file, int line, const char *what, const float *got,
                   const double *want, size_t n, double atol, double rtol)
{
    size_t i, worst = 0, bad = 0;
    double worst_excess = -1.0;
    for (i = 0; i < n; i++) {
        double g = (double)got[i], w = want[i];
        double excess = fabs(g - w) - (atol + rtol * fabs(w));
        if (!(excess <= 0.0)) {  /* also true for NaN */
            bad++;
            if (!(excess <= worst_excess)) {
                worst_excess = excess;
                worst = i;
            }
        }
    }
    if (bad) {
        check_fail(file, line, "%s: %zu of %zu values off; worst [%zu] got %.9g want %.9g (atol %g, rtol %g)",
                   what, bad, n, worst, (double)got[worst], want[worst], atol, rtol);
        return 0;
    }
    return 1;
}

double check_uniform(unsigned long long *state, double lo, double hi)
{
    unsigned long long z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return lo + (hi - lo) * (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

int main(int argc, char **argv)
{
    struct { const test_case *cases; int count; } groups[] = {
#define TEST_GROUP(g) { g, g##_count },
#include "groups.h"
#undef TEST_GROUP
    };
    int passed = 0, failed = 0;
    size_t gi;
    const char *filter = argc > 1 ? argv[1] : NULL;
    for (gi = 0; gi < sizeof groups / sizeof groups[0]; gi++) {
        int i;
        for (i = 0; i < groups[gi].count; i++) {
            const test_case *t = &groups[gi].cases[i];
            if (filter && !strstr(t->name, filter)) continue;
            current_name = t->name;
            current_failed = 0;
            codir_clear_error();
            t->run();
            if (current_failed) failed++; else passed++;
            if (current_failed) printf("failed: %s\n", t->name);
            fflush(stdout);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
