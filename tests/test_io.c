#include "check.h"

const test_case tests_io[] = {{NULL, NULL}};
const int tests_io_count = 0;
