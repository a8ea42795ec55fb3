#include "check.h"

const test_case tests_train[] = {{NULL, NULL}};
const int tests_train_count = 0;
