#include "check.h"

const test_case tests_reference[] = {{NULL, NULL}};
const int tests_reference_count = 0;
