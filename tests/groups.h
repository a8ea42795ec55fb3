/* One TEST_GROUP line per tests/test_*.c file; main.c expands this list twice. */
TEST_GROUP(tests_kernels)
TEST_GROUP(tests_model)
TEST_GROUP(tests_text)
TEST_GROUP(tests_gemm)
TEST_GROUP(tests_io)
TEST_GROUP(tests_train)
