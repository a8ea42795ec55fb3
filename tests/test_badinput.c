#include "check.h"

const test_case tests_badinput[] = {{NULL, NULL}};
const int tests_badinput_count = 0;
