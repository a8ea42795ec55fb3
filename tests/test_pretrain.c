#include "check.h"

const test_case tests_pretrain[] = {{NULL, NULL}};
const int tests_pretrain_count = 0;
