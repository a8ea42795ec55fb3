/* codir.h - contrastive distillation of transformer encoders (CoDIR), one C11 header.
   Version 0.1.0. MIT license (see the end of this file).

   Build a program that uses it:

       cc -std=c11 -O2 -fopenmp prog.c -o prog -lm      (-fopenmp is optional)

   In exactly one translation unit:

       #define CODIR_IMPLEMENTATION
       #include "codir.h"

   Other translation units include "codir.h" without the define.

   CoDIR (Sun et al., "Contrastive Distillation on Intermediate Representations for
   Language Model Compression", EMNLP 2020, arXiv:2009.14167) trains a small student
   transformer from a large frozen teacher with three losses:

       L = (1 - beta) * L_task + beta * L_kd + lambda * L_crd

   L_task is the cross-entropy on the labels, L_kd = T^2 * KL(p_teacher || p_student)
   on temperature-softened outputs, and L_crd a contrastive loss that pulls a projection
   of the student's pooled intermediate layers toward the teacher's projection of the
   same example and away from teacher projections of K differently labelled examples
   kept in a memory bank.

   Contents, in the order the data flows:
     1. Configuration and API         declarations, options, error handling
     2. Tensors and memory            parameters, arena, tensors
     3. Kernels                       forward/backward pairs on plain float arrays
     4. GEMM                          C = alpha op(A) op(B) + beta C, packed SIMD kernels
     5. Autograd                      tape of ops that call the kernels
     6. Transformer                   BERT-style post-LayerNorm encoder and its heads;
                                      safetensors checkpoints and Hugging Face folders
     7. Losses                        task, KD and the contrastive term, memory banks
     8. Optimizer                     AdamW with linear warmup and decay
     9. Data and tokenizer            WordPiece, vocabulary builder, GLUE TSV, batches
    10. Training loop                 task and CoDIR steps, teacher cache, metrics,
                                      training checkpoints, masked-LM pre-training

   Compile-time options (define before the #include that has CODIR_IMPLEMENTATION,
   or before every #include for CODIR_STATIC):
     CODIR_STATIC       make every public function static to its translation unit
     CODIR_MALLOC(n), CODIR_REALLOC(p, n), CODIR_FREE(p)
                        replace the allocator; define all three or none
     CODIR_ASSERT(x)    internal invariant check; by default prints file:line and
                        the expression to stderr and aborts, also under NDEBUG
     CODIR_NO_SIMD      use the portable scalar GEMM micro-kernel, and compile the
                        vector-math loops for the baseline instruction set only
     CODIR_NO_FSYNC     skip the POSIX fsync before a saved file is renamed into place
     CODIR_ALLOW_FAST_MATH
                        allow -ffast-math, which disables the NaN and Inf checks

   Quick start: examples/distill.c trains a teacher on review sentences and distils it
   into a student with half the layers; examples/train.c fine-tunes one model on a GLUE
   task folder; examples/pretrain.c pre-trains and pre-distils with masked-LM.

   Limitations:
     - float32 on the CPU only; no mixed precision.
     - No dropout on attention probabilities (BERT's attention_probs_dropout_prob);
       dropout is applied to the embeddings, the sub-block outputs and the classifier.
     - The tokenizer supports BERT's uncased (lowercase and strip accents) and cased
       set-ups, with Unicode 14 tables; see the tokenizer section for the code points
       where Hugging Face tokenizers' older tables differ.
     - Files are written to a temporary name, fsynced and renamed. fsync is POSIX, not
       C11: on other systems (Windows) a write survives a killed process but not
       necessarily a power loss.
*/
#ifndef CODIR_H
#define CODIR_H

#include <stddef.h>
#include <stdint.h>

/* -ffast-math lets the compiler assume no NaN or Inf, which silently removes the checks
   that stop training on a non-finite loss or gradient, and reorders sums. */
#if defined(__FAST_MATH__) && !defined(CODIR_ALLOW_FAST_MATH)
#error "codir.h: -ffast-math disables NaN and Inf checks; build without it, or define CODIR_ALLOW_FAST_MATH to accept that"
#endif

#ifdef CODIR_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define CODIR_DEF static __attribute__((unused)) /* a program uses only some functions */
#else
#define CODIR_DEF static
#endif
#else
#define CODIR_DEF extern
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ===================================================================================
   1. Configuration and API
   =================================================================================== */

/* Error codes. Every function that can fail returns one of these (or NULL) and records
   a readable reason that codir_last_error() returns. */
enum {
    CODIR_OK = 0,
    CODIR_ERR_NOMEM = -1,     /* an allocation failed */
    CODIR_ERR_INVALID = -2,   /* an argument or option is out of range */
    CODIR_ERR_IO = -3,        /* a file could not be opened, read or written */
    CODIR_ERR_PARSE = -4,     /* a file's content is malformed */
    CODIR_ERR_OVERFLOW = -5,  /* a size product does not fit in size_t */
    CODIR_ERR_NONFINITE = -6  /* a loss or gradient became NaN or Inf */
};

/* Returns the reason for the last failure on the calling thread ("" if none). */
CODIR_DEF const char *codir_last_error(void);
/* Clears the calling thread's error message. */
CODIR_DEF void codir_clear_error(void);

/* ===================================================================================
   2. Tensors and memory
   =================================================================================== */

#define CODIR_MAX_DIMS 4

/* A float32 tensor of up to 4 dimensions, contiguous and row-major. Parameters point
   into one allocation per model (codir_params); activations point into the per-step
   arena of a codir_ctx. A tensor filled in by hand must start zeroed
   (codir_tensor t = {0}), because ops read every field below. */
typedef struct codir_tensor {
    float *data;                /* [numel] values */
    float *grad;                /* [numel] gradient, or NULL when none is tracked. An op
                                   output has one only while codir_backward runs, unless
                                   codir_retain_grad keeps it (see section 5). */
    int ndim;                   /* 1 to CODIR_MAX_DIMS */
    int shape[CODIR_MAX_DIMS];  /* sizes, outermost first; unused entries are 1 */
    size_t numel;               /* product of the shape */
    int no_decay;               /* parameters only: 1 excludes it from weight decay */
    const char *name;           /* parameters only: stable name, e.g. "layer.0.ln1.gamma" */
    const float *packed;        /* parameters only: W^T in the GEMM's layout (codir_model_pack) */
    int node;                   /* op outputs: 1 + the index of the tape node that made it */
    int retain_grad;            /* op outputs: 1 keeps the gradient after codir_backward */
} codir_tensor;

/* An int32 tensor for token ids, masks and labels. */
typedef struct codir_itensor {
    int *data;                  /* [numel] values */
    int ndim;
    int shape[CODIR_MAX_DIMS];
    size_t numel;
} codir_itensor;

/* One entry of a parameter size table. */
typedef struct codir_param_spec {
    const char *name;           /* copied into the codir_params */
    int ndim;
    int shape[CODIR_MAX_DIMS];
    int no_decay;               /* 1 for biases and LayerNorm parameters */
} codir_param_spec;

/* All parameters of a model in one allocation, and their gradients in a second one of
   the same layout, so an optimizer can walk both as flat arrays. */
typedef struct codir_params {
    float *data;                /* [count] values */
    float *grad;                /* [count] gradients */
    size_t count;               /* number of floats */
    codir_tensor *tensors;      /* [num_tensors] views into data and grad */
    int num_tensors;
    char *names;                /* storage for the tensors' names */
} codir_params;

/* Carves the tensors of `specs` out of one zeroed value block and one zeroed gradient
   block. Returns CODIR_OK or an error (sizes overflow, out of memory). */
CODIR_DEF int codir_params_init(codir_params *params, const codir_param_spec *specs, int num_specs);
CODIR_DEF void codir_params_free(codir_params *params);
/* Sets every gradient to zero. Backward passes accumulate, so call this before each. */
CODIR_DEF void codir_params_zero_grad(codir_params *params);
/* Returns the parameter named `name`, or NULL. */
CODIR_DEF codir_tensor *codir_params_find(const codir_params *params, const char *name);
/* Copies values from a parameter set of the same layout (same names and shapes). */
CODIR_DEF int codir_params_copy(codir_params *dst, const codir_params *src);

/* Bump allocator for the activations of one step. Reset frees everything at once.
   When a step needs more than the block holds, it takes extra blocks, and the next
   reset replaces them all by one block of the high-water size, so a steady run stops
   allocating after its first step. */
typedef struct codir_arena {
    char *base;                 /* [size] main block, 64-byte aligned offsets */
    size_t size;                /* bytes in the main block */
    size_t used;                /* bytes handed out from the main block */
    size_t extra_used;          /* bytes handed out from extra blocks this step */
    size_t peak;                /* high-water mark of used + extra_used over all steps */
    void *extra;                /* linked list of extra blocks */
} codir_arena;

CODIR_DEF int codir_arena_init(codir_arena *arena, size_t bytes);
/* Returns `bytes` bytes aligned to 64, or NULL with an error set. */
CODIR_DEF void *codir_arena_alloc(codir_arena *arena, size_t bytes);
CODIR_DEF void codir_arena_reset(codir_arena *arena);
/* A position in the arena. codir_arena_rewind(arena, codir_arena_mark(arena)) gives
   back everything allocated after the mark, including extra blocks, so a pass whose
   intermediate values are dead (a teacher forward without a tape) does not raise the
   high-water mark of the step. Rewinding to a mark taken before the last reset is an
   error the arena cannot detect. */
typedef struct codir_arena_pos {
    size_t used, extra_used, block_used;
    void *extra;
} codir_arena_pos;
CODIR_DEF codir_arena_pos codir_arena_mark(const codir_arena *arena);
CODIR_DEF void codir_arena_rewind(codir_arena *arena, codir_arena_pos mark);
/* Returns the high-water mark in bytes since codir_arena_init. */
CODIR_DEF size_t codir_arena_peak(const codir_arena *arena);
CODIR_DEF void codir_arena_free(codir_arena *arena);

/* ===================================================================================
   3. Kernels: forward/backward pairs on plain float arrays
   ===================================================================================
   Dimensions: B batch, T sequence length, C channels (hidden size), OC output channels,
   N rows (B * T, or B for pooled rows), NH attention heads, HS = C / NH head size,
   V classes, D projection size, K negatives per example.
   Every backward kernel adds (+=) into its gradient outputs; a NULL gradient output is
   skipped. Parameter gradients get one addition per element and call, so running the
   same backward twice doubles them exactly. */

struct codir_gemm_ws;

/* out[N,OC] = inp[N,C] w[OC,C]^T + b[OC]; b may be NULL. */
CODIR_DEF int codir_linear_forward(struct codir_gemm_ws *ws, float *out, const float *inp, const float *w,
                                   const float *b, int N, int C, int OC);
/* dinp[N,C] += dout w; dw[OC,C] += dout^T inp; db[OC] += column sums of dout. */
CODIR_DEF int codir_linear_backward(struct codir_gemm_ws *ws, float *dinp, float *dw, float *db,
                                    const float *dout, const float *inp, const float *w, int N, int C, int OC);

/* out[n] = a[n] + b[n] */
CODIR_DEF void codir_add_forward(float *out, const float *a, const float *b, size_t n);
CODIR_DEF void codir_add_backward(float *da, float *db, const float *dout, size_t n);

/* out[N,C] = (inp - mean) / sqrt(var + eps) * gamma + beta per row, with the biased
   variance as torch.nn.LayerNorm. mean[N] and rstd[N] receive the statistics for the
   backward pass and may be NULL. */
CODIR_DEF void codir_layernorm_forward(float *out, double *mean, float *rstd, const float *inp,
                                       const float *gamma, const float *beta, int N, int C, float eps);
/* The mean is kept in double: rounded to float, the mean of a row near 1e4 moves by up
   to 5e-4, which is 5% of a spread of 1e-2 and would shift every normalized value. */
CODIR_DEF void codir_layernorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                                        const float *inp, const float *gamma, const double *mean,
                                        const float *rstd, int N, int C);

/* out = x * Phi(x), the exact erf form of GELU (torch.nn.GELU(approximate='none')). */
CODIR_DEF void codir_gelu_forward(float *out, const float *inp, size_t n);
CODIR_DEF void codir_gelu_backward(float *dinp, const float *inp, const float *dout, size_t n);

CODIR_DEF void codir_tanh_forward(float *out, const float *inp, size_t n);
/* Uses the forward output: d tanh(x) / dx = 1 - tanh(x)^2. */
CODIR_DEF void codir_tanh_backward(float *dinp, const float *out, const float *dout, size_t n);

/* Softmax over the last dimension of [N,V]. */
CODIR_DEF void codir_softmax_forward(float *out, const float *inp, int N, int V);
CODIR_DEF void codir_softmax_backward(float *dinp, const float *out, const float *dout, int N, int V);

/* Multi-head scaled dot-product attention with a key padding mask.
   qkv[B,T,3C] holds the query, key and value projections side by side; head h uses
   channels h*HS .. h*HS+HS-1 of each. mask[B,T] is 1 for tokens and 0 for padding;
   padded keys get probability 0, and a query whose keys are all padding gets an
   all-zero probability row and output instead of NaN. att[B,NH,T,T] receives the
   probabilities, which the backward pass reads. It may be NULL, and then the backward
   pass recomputes them, to the same bits. The autograd op works that way, because
   storing them took 10 to 16% of the arena peak of a step at T = 128 in
   examples/bench_step.c. out[B,T,C].
   The backward pass takes the same mask. Keys and values of padded tokens never reach
   the other tokens' results, even when they hold NaN or Inf.
   The (sequence, head) pairs run in parallel on up to `threads` OpenMP threads, each
   with its own part of `scratch`, which holds threads * codir_attention_scratch(T, C,
   NH) floats. The result does not depend on the thread count. */
CODIR_DEF size_t codir_attention_scratch(int T, int C, int NH);
CODIR_DEF void codir_attention_forward(float *out, float *att, const float *qkv, const int *mask, int B, int T,
                                       int C, int NH, float *scratch, int threads);
CODIR_DEF void codir_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                        const int *mask, int B, int T, int C, int NH, float *scratch, int threads);
/* The same attention for the first query of each sequence only, which is all that a
   classifier on the first token reads from the last block. out[B,C] and att[B,NH,T]
   (NULL when no backward pass follows) take the place of the full kernel's, with the
   same mask rules and the same scratch. out equals the first token's row of
   codir_attention_forward bit for bit. The backward pass adds to the query of token 0
   and to the keys and values of every kept token. */
CODIR_DEF void codir_attention_first_forward(float *out, float *att, const float *qkv, const int *mask, int B, int T,
                                             int C, int NH, float *scratch, int threads);
CODIR_DEF void codir_attention_first_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                              const int *mask, int B, int T, int C, int NH, float *scratch,
                                              int threads);

/* out[B,T,C] = tok[ids] + pos[t] + type[types]; types may be NULL (all type 0).
   The caller checks ids < vocabulary size and t < maximum length. */
CODIR_DEF void codir_embedding_forward(float *out, const int *ids, const int *types, const float *tok,
                                       const float *pos, const float *type, int B, int T, int C);
/* order[B*T] is scratch; row[C] is scratch. Rows of the same token are summed before
   they are added to dtok, so each element of dtok gets one addition per call. */
CODIR_DEF void codir_embedding_backward(float *dtok, float *dpos, float *dtype, const float *dout,
                                        const int *ids, const int *types, int B, int T, int C,
                                        int *order, float *row);

/* Inverted dropout: each element is kept with probability 1 - p and scaled by
   1 / (1 - p). Whether element i is kept depends only on (key, i), so the mask is the
   same for any thread count and the backward pass recomputes it instead of storing it. */
CODIR_DEF void codir_dropout_forward(float *out, const float *inp, size_t n, float p, uint64_t key);
CODIR_DEF void codir_dropout_backward(float *dinp, const float *dout, size_t n, float p, uint64_t key);

/* out[B,C] = inp[B,0,C], the first ([CLS]) token of each sequence. */
CODIR_DEF void codir_select_first_forward(float *out, const float *inp, int B, int T, int C);
CODIR_DEF void codir_select_first_backward(float *dinp, const float *dout, int B, int T, int C);

/* out[B,C] = mean of inp[b,t,:] over the t with mask[b,t] != 0; zero if there are none. */
CODIR_DEF void codir_mean_pool_forward(float *out, const float *inp, const int *mask, int B, int T, int C);
CODIR_DEF void codir_mean_pool_backward(float *dinp, const float *dout, const int *mask, int B, int T, int C);

/* out[P,C] = inp[rows[p], :]; backward: dinp[rows[p], :] += dout[p, :]. */
CODIR_DEF void codir_gather_rows_forward(float *out, const float *inp, const int *rows, int P, int C);
CODIR_DEF void codir_gather_rows_backward(float *dinp, const float *dout, const int *rows, int P, int C);

/* out[N, sum of widths] = the rows of inps[0..count-1] side by side. */
CODIR_DEF void codir_concat_forward(float *out, const float *const *inps, const int *widths, int count, int N);
CODIR_DEF void codir_concat_backward(float *const *dinps, const float *dout, const int *widths, int count, int N);

/* out[N,C] = inp / max(||inp||_2, eps) per row, as torch.nn.functional.normalize, so a
   zero row maps to zero instead of NaN. norm[N] receives ||inp||_2. */
CODIR_DEF void codir_l2_normalize_forward(float *out, float *norm, const float *inp, int N, int C, float eps);
CODIR_DEF void codir_l2_normalize_backward(float *dinp, const float *dout, const float *out,
                                           const float *norm, int N, int C, float eps);

/* Mean cross-entropy of softmax(logits[N,V]) against targets[N], through a fused
   log-softmax (log(softmax(x)) would underflow to -inf for extreme logits).
   probs[N,V] receives softmax(logits) for the backward pass. Returns the mean loss. */
CODIR_DEF double codir_cross_entropy_forward(float *probs, const float *logits, const int *targets, int N, int V);
/* dlogits += dloss * (probs - onehot(target)) / N */
CODIR_DEF void codir_cross_entropy_backward(float *dlogits, const float *probs, const int *targets,
                                            float dloss, int N, int V);

/* Mean squared error over n values. */
CODIR_DEF double codir_mse_forward(const float *pred, const float *target, int n);
CODIR_DEF void codir_mse_backward(float *dpred, const float *pred, const float *target, float dloss, int n);

/* Knowledge-distillation loss T^2 * mean_n KL(p_t || p_s) with p = softmax(logits / T).
   The teacher's distribution is the target; the T^2 factor keeps the gradient size
   independent of T (Hinton et al. 2015). ps[N,V] receives the student's softened
   distribution, pt[N,V] the teacher's. Returns the loss. */
CODIR_DEF double codir_kl_div_forward(float *ps, float *pt, const float *student, const float *teacher,
                                      int N, int V, float temperature);
/* dstudent += dloss * T / N * (ps - pt); the teacher gets no gradient. */
CODIR_DEF void codir_kl_div_backward(float *dstudent, const float *ps, const float *pt, float dloss,
                                     int N, int V, float temperature);

/* InfoNCE over a memory bank: for example b the scores are x_0 = <zs_b, zt_b> / tau
   (the positive: the teacher's projection of the same example) and
   x_j = <zs_b, bank[neg[b,j-1]]> / tau for j = 1..K, and the loss is
   mean_b (logsumexp_j x_j - x_0), computed with the maximum subtracted so that
   exp never overflows at small tau. probs[B,K+1] receives softmax(x). */
CODIR_DEF double codir_infonce_forward(float *probs, const float *zs, const float *zt, const float *bank,
                                       const int *neg, int B, int D, int K, float tau);
/* One direction of the NCE loss of CRD (Tian, Krishnan, Isola 2020) as the official
   CoDIR code uses it. idx[B, K+1] lists bank rows, the positive (the example's own
   row) first. With log P_j = <anchor_b, bank[idx_bj]> / tau - log_z and c = K / N:
       loss = mean_b [ softplus(log c - log P_0) + sum_{j>=1} softplus(log P_j - log c) ]
   which is -log(P_0 / (P_0 + c)) - sum log(c / (P_j + c)) computed in log space, so
   exp(<a, b> / 0.07) never has to be represented. logp[B, K+1] receives log P. */
CODIR_DEF double codir_nce_forward(float *logp, const float *anchor, const float *bank, const int *idx, int B,
                                   int D, int K, float tau, double log_z, double log_c);
CODIR_DEF void codir_nce_backward(float *danchor, const float *logp, const float *bank, const int *idx,
                                  float dloss, int B, int D, int K, float tau, double log_c);
/* log Z = log N + log mean_{b,j} exp(<anchor_b, bank[idx_bj]> / tau): the normalizer
   CRD estimates from the first batch, computed with the maximum taken out. */
CODIR_DEF double codir_nce_log_normalizer(const float *anchor, const float *bank, const int *idx, int B, int D,
                                          int K, float tau, int N);

/* dzs and dzt may be NULL; bank rows never receive a gradient. */
CODIR_DEF void codir_infonce_backward(float *dzs, float *dzt, const float *probs, const float *zs,
                                      const float *zt, const float *bank, const int *neg, float dloss,
                                      int B, int D, int K, float tau);

/* ===================================================================================
   4. GEMM (declarations)
   =================================================================================== */
/* Single-precision matrix product in the BLAS sgemm contract, row-major:

       C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C[m,n]

   op(X) is X (trans_x = 0) or its transpose (trans_x = 1). Leading dimensions are row
   strides in floats:
       A is stored m x k with row stride lda (trans_a = 0) or k x m (trans_a = 1);
       B is stored k x n with row stride ldb (trans_b = 0) or n x k (trans_b = 1);
       C is stored m x n with row stride ldc.
   Each leading dimension must be at least max(1, columns of the stored matrix).

   The linear layers call it as
       forward   out[B,out] = x[B,in] W[out,in]^T     trans_a = 0, trans_b = 1
       backward  dx[B,in]   = dy[B,out] W[out,in]     trans_a = 0, trans_b = 0
                 dW[out,in] += dy[B,out]^T x[B,in]    trans_a = 1, trans_b = 0, beta = 1

   Edge cases follow BLAS: beta = 0 overwrites C without reading it, so C may hold NaN
   or Inf; alpha = 0 or k = 0 sets C = beta * C without reading A or B; m = 0 or n = 0
   returns at once. The result is bit-identical for every OpenMP thread count, because
   the K dimension is never split across threads. It is not bit-identical to
   codir_gemm_ref or across micro-kernels (the kernels fuse multiply and add). */

/* Packing buffers for codir_gemm, grown on demand and reused across calls. One
   workspace serves one call at a time; threads that call codir_gemm concurrently need
   one workspace each (or pass NULL). */
typedef struct codir_gemm_ws codir_gemm_ws;

/* Allocates an empty workspace. Returns NULL on failure, and codir_last_error() returns
   the reason. */
CODIR_DEF codir_gemm_ws *codir_gemm_ws_create(void);

/* Frees the workspace and its buffers. NULL is allowed. */
CODIR_DEF void codir_gemm_ws_free(codir_gemm_ws *ws);

/* Computes C = alpha * op(A) * op(B) + beta * C as described above, on the fastest
   micro-kernel the CPU supports. When compiled with OpenMP and called outside a
   parallel region, it uses up to omp_get_max_threads() threads (one for small
   products); inside a parallel region it runs on the calling thread only. ws may be NULL, in which case the
   call allocates and frees its own buffers.
   Returns CODIR_OK, CODIR_ERR_INVALID (a transpose flag other than 0 or 1, a negative
   size, a leading dimension below its minimum, or a NULL matrix that would be read or
   written), CODIR_ERR_NOMEM, or CODIR_ERR_OVERFLOW if a packing buffer's size overflows
   size_t. On error C is unchanged. */
CODIR_DEF int codir_gemm(codir_gemm_ws *ws, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

/* Computes the same product as codir_gemm with three plain loops, summing in double and
   rounding once per element of C. It is always compiled and serves as the test oracle
   and as the executable definition of the contract. It has no error return: with
   invalid arguments (those codir_gemm rejects) it does nothing. */
CODIR_DEF void codir_gemm_ref(int trans_a, int trans_b, int m, int n, int k, float alpha,
                              const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

/* Returns the name of the micro-kernel codir_gemm uses on this CPU: "avx512", "avx2",
   "neon" or "scalar". */
CODIR_DEF const char *codir_gemm_kernel_name(void);

/* ===================================================================================
   5. Autograd
   ===================================================================================
   Each op below runs a forward kernel into a tensor from the context's arena and, when
   the context is recording and an input has a gradient, appends a node to the tape.
   codir_backward walks the tape in reverse and calls the backward kernels. Ops take
   NULL inputs and return NULL after any failure, so a chain of ops needs one check at
   its end; codir_last_error() and ctx->status say what went wrong.

   Memory. An op output that needs a gradient gets no gradient buffer in the forward
   pass. The backward walk needs that gradient only for a while: the first op to write
   it is the output's last consumer, and the last to read it is the op that made the
   output. codir_backward gives each gradient a buffer for that stretch alone, in one
   pool where later gradients reuse the space of dead ones. The pool holds what is
   alive at the busiest point of the walk, about one block's worth, instead of a copy
   of every activation. Afterwards op outputs have grad == NULL again, as PyTorch
   frees the gradients of non-leaf tensors; codir_retain_grad keeps one. Leaves
   (parameters and tensors made with codir_tensor_new(..., 1)) keep their own buffers.
   A struct copy of an op output (a reshape: same values, other shape) shares the
   output's gradient.
   A forward pass that records nothing needs less: codir_model_forward then drops each
   block's intermediate values once the block's output exists. */

typedef struct codir_node codir_node;

typedef struct codir_ctx {
    codir_arena arena;          /* activations, gradients and saved values of one step */
    struct codir_gemm_ws *gemm; /* GEMM packing buffers */
    codir_node *tape;           /* [tape_len] recorded ops, oldest first */
    int tape_len, tape_cap;
    int recording;              /* 1: ops with a gradient-carrying input are recorded */
    int training;               /* 1: dropout is active */
    uint64_t seed;              /* dropout seed */
    uint64_t step;              /* dropout masks depend on (seed, step, op index) */
    uint64_t dropout_calls;     /* dropout ops run since codir_ctx_begin */
    int status;                 /* first error since codir_ctx_begin, else CODIR_OK */
} codir_ctx;

CODIR_DEF int codir_ctx_init(codir_ctx *ctx, size_t arena_bytes, uint64_t seed);
CODIR_DEF void codir_ctx_free(codir_ctx *ctx);
/* Starts a step: frees all activations, clears the tape and sets the modes. */
CODIR_DEF void codir_ctx_begin(codir_ctx *ctx, int recording, int training, uint64_t step);

/* Returns a tensor of the given shape from the arena, with a zeroed gradient buffer
   when with_grad is 1. Data is uninitialized. */
CODIR_DEF codir_tensor *codir_tensor_new(codir_ctx *ctx, int ndim, const int *shape, int with_grad);

/* Runs the tape backward from loss (a scalar op output of this step, that is, made
   since the last codir_ctx_begin; an older tensor is gone with its arena) with the
   seed gradient 1. Gradients of op outputs start from zero on every call; leaf
   gradients, parameters' among them, accumulate: zero them first. Ops whose output
   does not lead to loss are skipped. */
CODIR_DEF int codir_backward(codir_ctx *ctx, codir_tensor *loss);
/* The same with the seed gradient `seed` instead of 1. */
CODIR_DEF int codir_backward_scaled(codir_ctx *ctx, codir_tensor *loss, float seed);
/* Keeps the gradient of op output t after the next backward passes, until the next
   codir_ctx_begin (PyTorch's Tensor.retain_grad). t may also be a struct copy of the
   output that a later op reads; a copy no op reads is not seen. Does nothing for a
   leaf, which keeps its gradient anyway, or for an output that was not recorded. */
CODIR_DEF void codir_retain_grad(codir_tensor *t);

/* x[..., C] w[OC, C]^T + b[OC] -> [..., OC]; b may be NULL. */
CODIR_DEF codir_tensor *codir_linear(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b);
/* codir_linear(ctx, codir_gelu(ctx, x), w, b) without keeping GELU(x): the backward
   pass computes it again from x. The results are bit-identical (with -ffast-math, the
   input gradient may differ in the last bit); the feed-forward block keeps one [N, F]
   activation instead of two. */
CODIR_DEF codir_tensor *codir_gelu_linear(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b);
CODIR_DEF codir_tensor *codir_add(codir_ctx *ctx, codir_tensor *a, codir_tensor *b);
/* codir_add(ctx, x, codir_dropout(ctx, a, p)) without keeping the dropped-out copy of
   a; bit-identical, with the same dropout mask. */
CODIR_DEF codir_tensor *codir_add_dropout(codir_ctx *ctx, codir_tensor *x, codir_tensor *a, float p);
CODIR_DEF codir_tensor *codir_layernorm(codir_ctx *ctx, codir_tensor *x, codir_tensor *gamma,
                                        codir_tensor *beta, float eps);
CODIR_DEF codir_tensor *codir_gelu(codir_ctx *ctx, codir_tensor *x);
CODIR_DEF codir_tensor *codir_tanh(codir_ctx *ctx, codir_tensor *x);
CODIR_DEF codir_tensor *codir_softmax(codir_ctx *ctx, codir_tensor *x);
/* qkv[B,T,3C], mask[B,T] -> [B,T,C] */
CODIR_DEF codir_tensor *codir_attention(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask, int num_heads);
/* qkv[B,T,3C], mask[B,T] -> [B,C]: codir_select_first of codir_attention, computing
   the first query only. Rejects T = 0. */
CODIR_DEF codir_tensor *codir_attention_first(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask,
                                              int num_heads);
/* ids[B,T], types[B,T] or NULL; tok[V,C], pos[P,C], type[TV,C] -> [B,T,C]. Rejects
   ids or types out of range and T > P. */
CODIR_DEF codir_tensor *codir_embedding(codir_ctx *ctx, const codir_itensor *ids, const codir_itensor *types,
                                        codir_tensor *tok, codir_tensor *pos, codir_tensor *type);
/* Returns x itself when the context is not training or p is 0. */
CODIR_DEF codir_tensor *codir_dropout(codir_ctx *ctx, codir_tensor *x, float p);
/* [B,T,C] -> [B,C] */
CODIR_DEF codir_tensor *codir_select_first(codir_ctx *ctx, codir_tensor *x);
/* [B,T,C], mask[B,T] -> [B,C] */
CODIR_DEF codir_tensor *codir_mean_pool(codir_ctx *ctx, codir_tensor *x, const codir_itensor *mask);
/* count tensors [N, C_i] -> [N, sum C_i] */
CODIR_DEF codir_tensor *codir_concat(codir_ctx *ctx, codir_tensor *const *xs, int count);
/* x[N, C], rows[P] -> [P, C], the listed rows of x; the backward pass adds into them. */
CODIR_DEF codir_tensor *codir_gather_rows(codir_ctx *ctx, codir_tensor *x, const int *rows, int count);
/* [N,C] -> [N,C], rows scaled to unit L2 norm (zero rows stay zero) */
CODIR_DEF codir_tensor *codir_l2_normalize(codir_ctx *ctx, codir_tensor *x);
/* logits[N,V], targets[N] -> scalar mean cross-entropy. Rejects targets out of range. */
CODIR_DEF codir_tensor *codir_cross_entropy(codir_ctx *ctx, codir_tensor *logits, const codir_itensor *targets);
/* pred[N], target[N] -> scalar mean squared error. */
CODIR_DEF codir_tensor *codir_mse(codir_ctx *ctx, codir_tensor *pred, const float *target);
/* student[N,V], teacher[N,V] -> scalar T^2 * mean KL(p_teacher || p_student). */
CODIR_DEF codir_tensor *codir_kl_div(codir_ctx *ctx, codir_tensor *student, codir_tensor *teacher, float temperature);
/* zs[B,D], zt[B,D], bank[rows,D], neg[B,K] -> scalar InfoNCE loss. */
CODIR_DEF codir_tensor *codir_infonce(codir_ctx *ctx, codir_tensor *zs, codir_tensor *zt, const float *bank,
                                      int bank_rows, const int *neg, int K, float tau);
/* anchor[B,D], bank[rows,D], idx[B,K+1] -> scalar NCE loss of one direction. */
CODIR_DEF codir_tensor *codir_nce(codir_ctx *ctx, codir_tensor *anchor, const float *bank, int bank_rows,
                                  const int *idx, int K, float tau, double log_z, int num_data);
/* sum_i weights[i] * terms[i] for scalar terms; NULL terms with weight 0 are skipped. */
CODIR_DEF codir_tensor *codir_weighted_sum(codir_ctx *ctx, codir_tensor *const *terms, const float *weights, int count);

/* ===================================================================================
   6. Transformer
   =================================================================================== */

/* Shape of a BERT/RoBERTa-style post-LayerNorm encoder with a classification head. */
typedef struct codir_config {
    int vocab_size;             /* token embedding rows */
    int max_len;                /* position embedding rows: the longest sequence */
    int type_vocab_size;        /* token-type embedding rows (2 in BERT) */
    int num_layers;             /* transformer blocks */
    int hidden;                 /* C, the model width */
    int num_heads;              /* NH; must divide hidden */
    int ffn;                    /* inner width of the feed-forward block */
    int num_labels;             /* classifier outputs; 1 means regression trained with MSE,
                                   as Hugging Face's BertForSequenceClassification does */
    int mlm_head;               /* 1 adds the masked-LM head: dense, GELU, LayerNorm, then a
                                   decoder tied to the token embeddings plus a bias */
    float dropout;              /* probability, 0.1 in BERT */
    float ln_eps;               /* LayerNorm epsilon, 1e-12 in BERT */
} codir_config;

/* Returns BERT's defaults for every field but the sizes, which are small:
   4 layers, hidden 256, 4 heads, FFN 1024, vocabulary 8192, max length 128, 2 labels. */
CODIR_DEF codir_config codir_config_default(void);
/* Returns CODIR_OK or CODIR_ERR_INVALID naming the first bad field. */
CODIR_DEF int codir_config_check(const codir_config *cfg);

/* Parameters of one transformer block; each points into the model's codir_params. */
typedef struct codir_layer {
    codir_tensor *qkv_w;        /* [3C, C] query, key and value projections stacked */
    codir_tensor *qkv_b;        /* [3C] */
    codir_tensor *attn_out_w;   /* [C, C] */
    codir_tensor *attn_out_b;   /* [C] */
    codir_tensor *ln1_gamma;    /* [C] LayerNorm after attention */
    codir_tensor *ln1_beta;     /* [C] */
    codir_tensor *ffn_up_w;     /* [F, C] */
    codir_tensor *ffn_up_b;     /* [F] */
    codir_tensor *ffn_down_w;   /* [C, F] */
    codir_tensor *ffn_down_b;   /* [C] */
    codir_tensor *ln2_gamma;    /* [C] LayerNorm after the feed-forward block */
    codir_tensor *ln2_beta;     /* [C] */
} codir_layer;

typedef struct codir_model {
    codir_config cfg;
    codir_params params;        /* every tensor below lives here */
    codir_tensor *tok_emb;      /* [V, C] */
    codir_tensor *pos_emb;      /* [max_len, C] */
    codir_tensor *type_emb;     /* [type_vocab_size, C] */
    codir_tensor *emb_ln_gamma; /* [C] */
    codir_tensor *emb_ln_beta;  /* [C] */
    codir_layer *layers;        /* [num_layers] */
    codir_tensor *pool_w;       /* [C, C] dense layer on the first token */
    codir_tensor *pool_b;       /* [C] */
    codir_tensor *cls_w;        /* [num_labels, C] */
    codir_tensor *cls_b;        /* [num_labels] */
    codir_tensor *mlm_dense_w;  /* [C, C] masked-LM transform, or NULL without mlm_head */
    codir_tensor *mlm_dense_b;  /* [C] */
    codir_tensor *mlm_ln_gamma; /* [C] */
    codir_tensor *mlm_ln_beta;  /* [C] */
    codir_tensor *mlm_bias;     /* [V] decoder bias; the decoder weight is tok_emb */
    float *packed;              /* codir_model_pack's copies of the linear weights, or NULL */
} codir_model;

/* Creates a model with BERT's initialization: weights from N(0, 0.02^2), biases 0,
   LayerNorm gamma 1 and beta 0. Returns NULL on failure. */
CODIR_DEF codir_model *codir_model_create(const codir_config *cfg, uint64_t seed);
CODIR_DEF void codir_model_free(codir_model *model);

/* Packs the model's linear weights (every block's four, the pooler's and the
   classifier's) once in the matrix-multiply kernel's layout, so forward passes skip
   that step, which costs as much as the product at batch 1. For a model whose weights
   no longer change: a model being served, a frozen teacher. The copies take as much
   memory as those weights, until codir_model_free. codir_adamw_step,
   codir_params_copy, codir_model_init_from and codir_checkpoint_load stop using the
   copies of the tensors they change, and so do struct copies of those tensors. After
   changing weights any other way, call codir_model_unpack (stop using all copies) or
   codir_model_pack (pack the new values, in the same block). */
CODIR_DEF int codir_model_pack(codir_model *model);
CODIR_DEF void codir_model_unpack(codir_model *model);

/* Which teacher blocks initialize a student. */
enum {
    CODIR_INIT_EVERY_OTHER = 0, /* student block k from teacher block (k-1) * Lt / Ls + 1,
                                   the layer map's rule (12 -> 6 takes 1, 3, 5, 7, 9, 11) */
    CODIR_INIT_FIRST_K = 1      /* student block k from teacher block k */
};

/* Copies the teacher's embeddings, the chosen blocks, the pooler, the classifier and
   the masked-LM head (when both have one) into the student. All widths, the
   vocabulary, the lengths and the label count must match; the layer counts need not. */
CODIR_DEF int codir_model_init_from(codir_model *student, const codir_model *teacher, int mode);

/* A padded batch. Sequences shorter than seq are padded with mask 0. */
typedef struct codir_batch {
    int batch;                  /* B, the examples in this batch */
    int seq;                    /* T, the longest sequence in this batch */
    codir_itensor ids;          /* [B, T] token ids */
    codir_itensor types;        /* [B, T] token-type ids */
    codir_itensor mask;         /* [B, T] 1 for tokens, 0 for padding */
    codir_itensor labels;       /* [B] class ids (0 for regression) */
    codir_itensor example_ids;  /* [B] index of each example in its data set */
    float *targets;             /* [B] regression targets (0 for classification) */
    int capacity_batch, capacity_seq; /* sizes the buffers were allocated for */
} codir_batch;

/* Activations a forward pass exposes. */
typedef struct codir_output {
    codir_tensor **hidden;      /* [num_layers + 1] of [B,T,C]; 0 is the embedding output */
    codir_tensor *logits;       /* [B, num_labels] */
    int num_hidden;
} codir_output;

/* Runs the encoder and classifier on a batch. Dropout is active when ctx->training;
   nothing is recorded unless ctx->recording. When nothing is recorded, each block's
   intermediate values go back to the arena once its output is copied out, so the
   arena holds the hidden states and one block's work. Returns CODIR_OK or an error. */
CODIR_DEF int codir_model_forward(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                  codir_output *out);
/* The same forward pass for when only the logits are needed (fine-tuning, prediction):
   the classifier reads the first token, so the last block's QKV product runs on every
   token (the keys and values need them all), and its attention and everything after
   it for that token alone. out->hidden[num_layers] is [B, 1, C]. The logits equal
   codir_model_forward's up to rounding (bit for bit in practice), and the last
   block costs about a quarter. With dropout the last block draws other masks, from
   the same distribution. */
CODIR_DEF int codir_model_logits(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                 codir_output *out);
/* Masked-LM logits [P, V] at the P rows `positions` (indexes b * T + t) of the last
   hidden layer [B, T, C]: dense, GELU, LayerNorm, then the decoder tied to the token
   embeddings plus its bias. Computing them only where a token was masked saves the
   V-wide product at every other position. Needs cfg.mlm_head. */
CODIR_DEF codir_tensor *codir_mlm_logits(codir_ctx *ctx, const codir_model *model, codir_tensor *hidden,
                                         const int *positions, int count);

/* Checkpoints: safetensors files and Hugging Face BERT model folders. */
/* ---- safetensors files ----

   The safetensors format (https://github.com/huggingface/safetensors) is
       8 bytes      N, the header length, unsigned little-endian
       N bytes      a UTF-8 JSON object: {"NAME": {"dtype": "F32", "shape": [2, 3],
                    "data_offsets": [BEGIN, END]}, ..., "__metadata__": {"KEY": "VALUE"}}
       the rest     the data region: raw little-endian, row-major tensor data; each
                    tensor's bytes are [BEGIN, END) counted from the start of the region.

   codir_safetensors_open checks what the official Rust implementation checks
   (safetensors/src/tensor.rs, Metadata::validate and SafeTensors::read_metadata):
   N is at most 100,000,000 and fits in the file, the header is valid UTF-8 JSON, every
   END - BEGIN equals the dtype size times the shape product (which must not overflow),
   and the tensors, sorted by offsets, cover the data region from its first to its last
   byte with no gap and no overlap. It is stricter in a few places the official reader
   leaves open: the header must start with '{', names and object keys must be unique,
   a tensor entry may hold only dtype, shape and data_offsets, and a shape may have at
   most CODIR_ST_MAX_DIMS dimensions. Every rejection names the file and, for a
   malformed header, the byte offset in the file. */

#define CODIR_ST_MAX_DIMS 8

/* Element types, in the order of the official Dtype enum. */
enum {
    CODIR_ST_BOOL, CODIR_ST_U8, CODIR_ST_I8, CODIR_ST_F8_E5M2, CODIR_ST_F8_E4M3,
    CODIR_ST_I16, CODIR_ST_U16, CODIR_ST_F16, CODIR_ST_BF16, CODIR_ST_I32, CODIR_ST_U32,
    CODIR_ST_F32, CODIR_ST_F64, CODIR_ST_I64, CODIR_ST_U64,
    CODIR_ST_DTYPE_COUNT
};

/* One tensor of an open file, as its header entry describes it. */
typedef struct codir_st_tensor {
    char *name;                         /* NUL-terminated UTF-8 */
    int dtype;                          /* CODIR_ST_F32, ... */
    int ndim;                           /* 0 (a scalar) to CODIR_ST_MAX_DIMS */
    int64_t shape[CODIR_ST_MAX_DIMS];   /* sizes, outermost first; unused entries are 1 */
    size_t numel;                       /* product of the shape */
    uint64_t offset;                    /* BEGIN: bytes from the start of the data region */
    uint64_t nbytes;                    /* END - BEGIN */
} codir_st_tensor;

/* An open safetensors file. Tensor data stays on disk until codir_safetensors_read_f32
   reads it, so opening a large checkpoint costs only its header. */
typedef struct codir_safetensors {
    char *path;
    void *file;                 /* the FILE *, open until codir_safetensors_close */
    uint64_t file_bytes;        /* size of the whole file */
    uint64_t data_start;        /* 8 + N: file offset of the data region */
    codir_st_tensor *tensors;   /* [num_tensors] in header order */
    int num_tensors;
    char **metadata;            /* [2 * num_metadata]: key, value, key, value, ... */
    int num_metadata;
} codir_safetensors;

/* Opens `path` and validates its header and offsets. Returns NULL on failure. */
CODIR_DEF codir_safetensors *codir_safetensors_open(const char *path);
/* Closes the file and frees everything; NULL is allowed. */
CODIR_DEF void codir_safetensors_close(codir_safetensors *st);
/* Returns the tensor named `name`, or NULL. */
CODIR_DEF const codir_st_tensor *codir_safetensors_find(const codir_safetensors *st, const char *name);
/* Returns the __metadata__ value of `key`, or NULL. */
CODIR_DEF const char *codir_safetensors_metadata(const codir_safetensors *st, const char *key);
/* Returns the format's name of a dtype ("F32", "BF16", ...), or "?" when out of range. */
CODIR_DEF const char *codir_st_dtype_name(int dtype);

/* Reads tensor `name` into dst[count] as float32; count must equal its numel. F32 is
   copied, and F16 and BF16 are widened exactly: F16 subnormals become normal floats,
   infinities stay infinities and NaN keeps its sign and payload. Other dtypes are
   rejected. Returns CODIR_OK or a negative error. */
CODIR_DEF int codir_safetensors_read_f32(const codir_safetensors *st, const char *name, float *dst, size_t count);

/* One tensor to write. */
typedef struct codir_st_write {
    const char *name;                   /* UTF-8, unique, not "__metadata__" */
    int ndim;                           /* 0 (a scalar) to CODIR_ST_MAX_DIMS */
    int64_t shape[CODIR_ST_MAX_DIMS];   /* sizes, outermost first; each >= 0 */
    const float *data;                  /* [product of shape], row-major */
} codir_st_write;

/* Writes tensors[count] as F32 and the string pairs metadata[2 * num_metadata] (key,
   value, ...; none when num_metadata is 0) to `path`, byte for byte as the official
   serializer (safetensors/src/tensor.rs, prepare) writes the same tensors: sorted by
   name, as it orders tensors of one dtype, the header JSON without spaces with
   "__metadata__" first, then padded with spaces to a multiple of 8 bytes. Metadata keys
   are sorted by name too, where the official serializer keeps the unspecified order of
   a Rust HashMap, so files with two or more metadata keys may differ in that order. Data is written byte by byte in
   little-endian order, so the file is the same on a big-endian host. The file goes to
   `path`.tmp first and is renamed over `path` only when complete. Returns CODIR_OK or
   a negative error. */
CODIR_DEF int codir_safetensors_write(const char *path, const codir_st_write *tensors, int count,
                                      const char *const *metadata, int num_metadata);

/* ---- Hugging Face BERT model folders ----

   A model folder holds config.json (Hugging Face's BertConfig keys) and
   model.safetensors with the tensor names of BertForSequenceClassification:

       bert.embeddings.{word,position,token_type}_embeddings.weight
       bert.embeddings.LayerNorm.{weight,bias}
       bert.encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
       bert.encoder.layer.N.attention.output.dense.{weight,bias}
       bert.encoder.layer.N.attention.output.LayerNorm.{weight,bias}   (ln1)
       bert.encoder.layer.N.intermediate.dense.{weight,bias}          (ffn up)
       bert.encoder.layer.N.output.dense.{weight,bias}                (ffn down)
       bert.encoder.layer.N.output.LayerNorm.{weight,bias}            (ln2)
       bert.pooler.dense.{weight,bias}
       classifier.{weight,bias}

   and, for a model with the masked-LM head, BertForPreTraining's
       cls.predictions.transform.dense.{weight,bias}
       cls.predictions.transform.LayerNorm.{weight,bias}
       cls.predictions.bias

   Query, key and value are the three row blocks of codir's stacked qkv_w and qkv_b.
   Linear weights are [out, in] in both libraries, so no tensor is transposed. The tied
   decoder weight cls.predictions.decoder.weight is not written, just as transformers'
   save_pretrained keeps only one of the tensors that share memory when it writes
   safetensors. vocab.txt belongs in the folder too; save it with codir_vocab_save. */

/* Writes cfg as a Hugging Face BertConfig config.json: sorted keys, two-space indent,
   id2label and label2id for num_labels labels, and problem_type "regression" when
   num_labels is 1. codir has no dropout on attention probabilities; the file repeats
   cfg.dropout as attention_probs_dropout_prob, as BERT's configs do, for use by other
   libraries. The file goes to `path`.tmp first and is renamed. */
CODIR_DEF int codir_config_save(const codir_config *cfg, const char *path);

/* Reads a Hugging Face BERT config.json into *cfg, with mlm_head set to 0. Missing keys
   take BertConfig's defaults (vocab_size 30522, hidden_size 768, num_hidden_layers 12,
   num_attention_heads 12, intermediate_size 3072, max_position_embeddings 512,
   type_vocab_size 2, layer_norm_eps 1e-12, hidden_dropout_prob 0.1, 2 labels), and
   unknown keys are ignored. num_labels is the size of id2label, or the key num_labels.
   Rejects hidden_act other than "gelu" (the exact erf GELU that codir implements), a
   model_type other than "bert", a position_embedding_type other than "absolute",
   problem_type "multi_label_classification", and a problem_type that contradicts the
   number of labels. attention_probs_dropout_prob is ignored. Returns CODIR_OK or a
   negative error. */
CODIR_DEF int codir_config_load(const char *path, codir_config *cfg);

/* Writes dir/model.safetensors (with metadata {"format": "pt"}, which transformers'
   loader checks) and dir/config.json. `dir` must exist. Each file is written to a
   .tmp file and renamed, so a failed save never leaves a half-written file under the
   final name; each is fsynced before its rename on POSIX systems. A crash between the
   two renames can leave new weights beside an old config.json. */
CODIR_DEF int codir_model_save(const codir_model *model, const char *dir);

/* Loads a model folder written by codir_model_save or by Hugging Face's
   save_pretrained for BertForSequenceClassification. The masked-LM head is created when
   model.safetensors holds cls.predictions.transform.dense.weight; then every masked-LM
   tensor is required. Tensors may be F32, F16 or BF16. LayerNorm parameters may use
   the old names gamma and beta for weight and bias, as Hugging Face's loader accepts.
   Rejects a missing tensor, a shape that differs from what config.json implies (naming
   both shapes), and any tensor outside the lists above, except these, which are
   checked or ignored:
     bert.embeddings.position_ids      an index buffer of older checkpoints; ignored
     cls.predictions.decoder.weight    with the masked-LM head only; must equal the
                                       word embeddings bit for bit, since codir ties them
     cls.predictions.decoder.bias      with the masked-LM head only; another name of
                                       cls.predictions.bias, equal to it if both are given
   The number of attention heads cannot be seen in the weights; it comes from
   config.json. Returns NULL on failure.
   NOTE: sharded checkpoints (model.safetensors.index.json), pytorch_model.bin and
   BertModel checkpoints, whose names lack the "bert." prefix, are not read. */
CODIR_DEF codir_model *codir_model_load(const char *dir);

/* ===================================================================================
   7. Losses: the CoDIR objective
   =================================================================================== */

/* Scoring of the contrastive term. */
enum {
    CODIR_CRD_INFONCE = 0,      /* the paper: softmax over the live positive and K bank rows */
    CODIR_CRD_NCE = 1           /* the official code (CRD-style): two banks, binary NCE with a
                                   normalizer estimated on the first batch, then frozen */
};

/* Pooling of each mapped layer's tokens into one vector. */
enum {
    CODIR_POOL_MEAN = 0,        /* mean over non-padding tokens, as the paper describes */
    CODIR_POOL_FIRST = 1        /* the first ([CLS]) token, as the official code does */
};

/* Where negatives come from, given the group (label) of each bank row. */
enum {
    CODIR_NEG_OTHER_GROUP = 0,  /* fine-tuning: examples whose label differs from the anchor's */
    CODIR_NEG_SAME_GROUP = 1    /* pre-training: other segments of the anchor's document, which
                                   are close in meaning and so make hard negatives; random
                                   segments of other documents fill up a short document */
};

/* Hyperparameters of L = (1 - beta) L_task + beta L_kd + lambda L_crd. */
typedef struct codir_distill_config {
    float beta;                 /* weight of KD against the task loss; 0.5 */
    float temperature;          /* T of the KD loss; 2 */
    float lambda;               /* weight of the contrastive term; 0.1. The official code's
                                   crd_weight sums over the batch, so it equals lambda * B. */
    float tau;                  /* contrastive temperature; 0.07 */
    int num_negatives;          /* K, capped by the number of eligible examples; 100 */
    int proj_dim;               /* D of both projection heads; 128 */
    float momentum;             /* memory bank momentum m; 0.5 */
    const int *layer_map;       /* [student layers] teacher layer of each student layer
                                   1..Ls, or NULL for m(k) = (k-1) * Lt / Ls + 1 */
    int mode;                   /* CODIR_CRD_INFONCE or CODIR_CRD_NCE */
    int pooling;                /* CODIR_POOL_MEAN or CODIR_POOL_FIRST */
    float neg_margin;           /* regression: negatives are examples whose target differs
                                   by more than this; 0.5 */
    double max_bank_bytes;      /* reject memory banks (both banks in NCE mode) larger than
                                   this; 4 GiB */
    int negatives_from;         /* CODIR_NEG_OTHER_GROUP or CODIR_NEG_SAME_GROUP */
} codir_distill_config;

CODIR_DEF codir_distill_config codir_distill_config_default(void);

/* The trainable parts of the contrastive term and its memory bank. */
typedef struct codir_distiller {
    codir_distill_config cfg;
    int *layer_map;             /* [student_layers] teacher layer index for each student layer */
    int student_layers, teacher_layers;
    int student_hidden, teacher_hidden;
    codir_params params;        /* the two projection heads */
    codir_tensor *proj_s_w;     /* [D, Ls * Cs] student head */
    codir_tensor *proj_s_b;     /* [D] */
    codir_tensor *proj_t_w;     /* [D, Ls * Ct] teacher head */
    codir_tensor *proj_t_b;     /* [D] */
    float *bank;                /* [num_examples, D] teacher projections by example id */
    int num_examples;
    int *labels;                /* [num_examples] training labels, for negative sampling */
    int *by_label;              /* [num_examples] example ids grouped by label */
    int *label_start;           /* [num_classes + 1] start of each label's group in by_label */
    int num_classes;
    uint64_t rng;               /* state of the negative sampler */
    float *bank_s;              /* [num_examples, D] student projections (NCE only, else NULL) */
    double log_z_t;             /* NCE: log normalizer of teacher-anchored scores against bank_s */
    double log_z_s;             /* NCE: log normalizer of student-anchored scores against bank */
    int z_ready;                /* NCE: 1 once both normalizers were estimated and frozen */
    float *targets;             /* [num_examples] regression targets, or NULL */
    int *by_target;             /* [num_examples] example ids sorted by target */
    codir_tensor *last_zs;      /* student projections of the last codir_crd_loss call */
} codir_distiller;

/* Creates the projection heads and a memory bank of one row per training example,
   rows uniform in (-a, a) with a = sqrt(3 / D). labels[num_examples] are the
   training labels, which negative sampling uses. Returns NULL on failure. */
CODIR_DEF codir_distiller *codir_distiller_create(const codir_distill_config *cfg, const codir_config *student,
                                                  const codir_config *teacher, const int *labels,
                                                  int num_examples, uint64_t seed);
CODIR_DEF void codir_distiller_free(codir_distiller *d);

/* Switches negative sampling to regression targets[num_examples]. Negatives are then
   drawn uniformly from the examples whose target differs from the anchor's by more
   than cfg.neg_margin; when fewer than K exist, the rest are drawn from all other
   examples (instance discrimination), so a regression task always gets K negatives
   while the training set has more than K examples. */
CODIR_DEF int codir_distiller_set_targets(codir_distiller *d, const float *targets);

/* Draws distinct negatives for `anchor` into out[K], uniformly without replacement,
   and returns how many it drew. Classification: examples with another label, at most
   as many as exist. Same-group mode: see CODIR_NEG_SAME_GROUP, at most N - 1.
   Regression: see codir_distiller_set_targets. Never the anchor. */
CODIR_DEF int codir_sample_negatives(codir_distiller *d, int anchor, int *out, int K);

/* Values of each term after a step. */
typedef struct codir_loss_terms {
    double total, task, kd, crd;
} codir_loss_terms;

/* Builds the contrastive term of a batch: pools the mapped layers of student and
   teacher (cfg.pooling), concatenates them, projects and L2-normalizes both, samples K
   negatives per example and scores them in cfg.mode (InfoNCE or NCE). *zt_out receives
   the teacher projections [B,D] for codir_bank_update. */
CODIR_DEF codir_tensor *codir_crd_loss(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                       const codir_output *teacher, const codir_batch *batch,
                                       codir_tensor **zt_out);
/* codir_crd_loss with given negatives instead of sampled ones: neg[B, K] lists K bank
   rows for each example of the batch. For tests and reproductions. */
CODIR_DEF codir_tensor *codir_crd_loss_fixed(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                             const codir_output *teacher, const codir_batch *batch, const int *neg,
                                             int K, codir_tensor **zt_out);
/* Moves bank rows toward new teacher projections: row <- normalize(m row + (1 - m) z).
   In NCE mode the student bank moves toward d->last_zs the same way.
   NOTE: d->last_zs lives in the context's arena, so call this before the next
   codir_ctx_begin, as the library's training steps do. */
CODIR_DEF void codir_bank_update(codir_distiller *d, const float *z, const int *example_ids, int B);

/* ===================================================================================
   8. Optimizer
   =================================================================================== */

/* AdamW as torch.optim.AdamW: p <- p (1 - lr wd), then the bias-corrected Adam step. */
typedef struct codir_adamw {
    float beta1, beta2, eps, weight_decay;
    float *m, *v;               /* [count] first and second moments */
    size_t count;
    long step;                  /* updates done so far */
} codir_adamw;

CODIR_DEF int codir_adamw_init(codir_adamw *opt, const codir_params *params, float beta1, float beta2,
                               float eps, float weight_decay);
CODIR_DEF void codir_adamw_free(codir_adamw *opt);
/* Applies one update with learning rate lr; tensors with no_decay skip weight decay. */
CODIR_DEF void codir_adamw_step(codir_adamw *opt, codir_params *params, float lr);
/* Linear warmup from 0 to peak over `warmup` steps, then linear decay to 0 at `total`. */
CODIR_DEF float codir_lr_schedule(long step, long total, long warmup, float peak);

/* ===================================================================================
   9. Data and tokenizer (declarations)
   =================================================================================== */
/* WordPiece tokenizer (BERT), vocabulary builder and GLUE-style TSV reader.

   Tokenization equals Hugging Face tokenizers' BERT pipeline (BertNormalizer with
   clean_text and handle_chinese_chars, BertPreTokenizer, WordPiece with "##" and
   max_input_chars_per_word 100, BertProcessing), which tests/test_text.c checks against
   ids written by tokenizers 0.23.2 (npm). In order:
     1. Clean: NUL, U+FFFD and every character of category Cc, Cf or Co is dropped,
        except tab, LF and CR, which count as whitespace like Zs, U+2028 and U+2029.
        Unassigned code points (Cn) are kept, as Hugging Face keeps them.
     2. CJK ideographs (the blocks of BERT's _is_chinese_char) become words by themselves.
     3. With lowercasing (uncased models): Unicode NFD, drop every Mn character, then
        full Unicode lowercase. Hangul syllables decompose into their jamo, as in NFD.
     4. Split at whitespace. Each punctuation character (ASCII punctuation such as "$",
        "+" and "`", and every P* category) becomes a word by itself.
     5. WordPiece: the longest vocabulary pieces from the left, continuation pieces
        carrying a "##" prefix. A word that cannot be cut completely, or that has more
        than 100 characters after normalization, becomes one [UNK].
   Special-token strings in the text, such as "[SEP]", are split like any other text,
   as in a Hugging Face pipeline without added tokens. (A tokenizer.json from a model
   hub does add them, and then matches "[SEP]" in the text as one token.)

   Text is UTF-8. An invalid byte (stray continuation byte, overlong form, surrogate,
   value above U+10FFFF, truncated sequence) counts as one U+FFFD and is dropped like
   it, without splitting the word: "ab\xFFcd" is the word "abcd". That equals Hugging
   Face on the string decoded with U+FFFD replacement, as Python's
   bytes.decode("utf-8", "replace") does.

   NOTE: the character tables follow Unicode 14.0 (Python 3.11's unicodedata), while
   tokenizers 0.23.2 takes categories from an older table (Unicode 8.0) and lowercase
   from Rust's standard library (Unicode 16.0). About 560 code points, all assigned or
   recategorized after Unicode 8.0, tokenize differently; tests/fixtures/README.md lists
   the kinds, and hf_unicode_differences.txt there lists every one. */

/* A WordPiece vocabulary: token strings indexed by id, as in BERT's vocab.txt. */
typedef struct codir_vocab {
    int size;              /* number of tokens; ids are 0..size-1 */
    char **tokens;         /* [size] NUL-terminated token strings */
    int pad_id, unk_id, cls_id, sep_id, mask_id;
    int lowercase;         /* 1: uncased: strip accents and lowercase before matching */
    /* private: an open-addressing hash table from token to id */
    int *table; size_t table_size;
} codir_vocab;

/* Loads a vocab.txt: one token per line, id = line index (0-based), "\n" or "\r\n"
   line ends, an optional UTF-8 BOM. The file must contain [PAD], [UNK], [CLS], [SEP]
   and [MASK]. If a token occurs twice, lookups return the later id, as in Hugging
   Face's loader. `lowercase` is 1 for uncased models (BertNormalizer with lowercase
   and strip_accents) and 0 for cased ones (neither); it is stored in the vocabulary
   and applied by codir_tokenize. Returns NULL on failure.
   NOTE: Hugging Face's loader also strips trailing whitespace from each line, which
   this loader keeps; no vocabulary that codir_vocab_build writes has such tokens. */
CODIR_DEF codir_vocab *codir_vocab_load(const char *path, int lowercase);

/* Writes the vocabulary as vocab.txt, one token per line in id order, so that
   codir_vocab_load returns the same ids. It writes `path`.tmp first and renames it,
   so a crash never leaves a truncated file at `path`. Returns 0 or a negative
   CODIR_ERR_* code. A token containing "\n" or "\r" is rejected (CODIR_ERR_INVALID)
   because it cannot be stored on one line. */
CODIR_DEF int codir_vocab_save(const codir_vocab *vocab, const char *path);

/* Learns a WordPiece vocabulary of at most `target_size` tokens from `count` UTF-8
   texts. The method is BPE over word counts with "##" continuation pieces, as in
   Hugging Face's WordPieceTrainer, but the alphabet, the id order and the tie-breaking
   are this library's own:
     ids 0..4      [PAD], [UNK], [CLS], [SEP], [MASK]
     then          every character seen, word-initial forms sorted by code point,
                   then "##" continuation forms sorted by code point
     then          merged pieces in the order they were learned.
   Each step merges the adjacent pair of pieces with the highest total count over all
   words. Ties go to the pair with the smaller left id, then the smaller right id, so
   the result depends only on the texts and the options. Training stops when the
   vocabulary has target_size tokens, when no pair occurs at least `min_frequency`
   times (0 and 1 both mean any pair), or when every word is a single piece. A merge
   that recreates an existing piece adds no token. Words are split as codir_tokenize
   splits them (lowercased if `lowercase` is 1), so every training word with at most
   100 characters tokenizes without [UNK], unless target_size is too small to hold
   every character in both forms: then only the most frequent character forms are
   kept and no merges are made. target_size must be at least 5. Returns NULL on
   failure. */
CODIR_DEF codir_vocab *codir_vocab_build(const char *const *texts, int count, int target_size,
                                         int min_frequency, int lowercase);

/* Frees the vocabulary and its tokens; NULL is allowed. */
CODIR_DEF void codir_vocab_free(codir_vocab *vocab);

/* Returns the id of `token` (matched exactly, no lowercasing), or -1 if absent. */
CODIR_DEF int codir_vocab_id(const codir_vocab *vocab, const char *token);

/* Returns the token string for `id`, or NULL if id is out of range. */
CODIR_DEF const char *codir_vocab_token(const codir_vocab *vocab, int id);

/* Writes the words of text after normalization and pre-tokenization (steps 1 to 4
   above; lowercase as in codir_vocab_load) to out, separated by single spaces and
   NUL-terminated. Words of more than 100 characters are written whole. Returns the
   length without the NUL, which may exceed out_size - 1 as with snprintf, or a
   negative error. out may be NULL when out_size is 0. Meant for inspecting and
   testing the tokenizer. */
CODIR_DEF int codir_pretokenize(const char *text, int lowercase, char *out, int out_size);

/* Writes at most max_ids WordPiece ids of text (no special tokens) to ids. Returns the
   total count of pieces, which may exceed max_ids as with snprintf, or a negative
   error. ids may be NULL when max_ids is 0, to measure the length first. */
CODIR_DEF int codir_tokenize(const codir_vocab *vocab, const char *text, int *ids, int max_ids);

/* Writes [CLS] pieces [SEP] truncated to max_len ids and returns the length (>= 2) or
   a negative error. Truncation drops pieces from the end and keeps [SEP]. A max_len
   below 2 is CODIR_ERR_INVALID. Equals codir_encode_pair with b = NULL. */
CODIR_DEF int codir_encode(const codir_vocab *vocab, const char *text, int *ids, int max_len);

/* Writes "[CLS] a [SEP] b [SEP]" to ids[max_len] and the token-type ids to types (0 for
   [CLS], the pieces of a and the first [SEP]; 1 for the pieces of b and the last
   [SEP]), and returns the length or a negative error. With b = NULL it writes
   "[CLS] a [SEP]" with all types 0, like codir_encode. types may be NULL.

   Truncation matches Hugging Face's "longest_first" strategy as tokenizers 0.23.2
   applies it, with m = max_len - 3 slots for pieces. If both sides fit, nothing is
   cut. Else each side's length is counted up to the end of the word that reaches
   max_len pieces (the library reads no further). If the shorter side has at most
   m / 2 pieces, it is kept whole and the longer side is cut to the rest. Otherwise the
   longer side keeps m - m / 2 pieces and the shorter m / 2, and on a tie the first
   sentence keeps m / 2: with m odd, the first sentence loses the extra piece. Pieces
   are dropped from the end of each side. A max_len below 3 (2 without b) is
   CODIR_ERR_INVALID, because the special tokens would not fit. */
CODIR_DEF int codir_encode_pair(const codir_vocab *vocab, const char *a, const char *b, int *ids, int *types,
                                int max_len);

/* Labelled sentences or sentence pairs, as read from a GLUE-style TSV file. */
typedef struct codir_dataset {
    int count;             /* number of examples */
    char **texts;          /* [count] sentences (the first sentence of a pair) */
    int *labels;           /* [count] class ids; all 0 for regression */
    int num_classes;       /* max label + 1, or the number of label names; 1 for regression */
    char **texts_b;        /* [count] second sentences, or NULL for single sentences */
    float *targets;        /* [count] regression targets, or NULL for classification */
    int is_regression;     /* 1: targets holds the labels (STS-B scores) */
    char **label_names;    /* [num_classes] class names in id order, or NULL when the
                              file stores class ids */
} codir_dataset;

/* How labels are written in a TSV file. */
typedef enum codir_label_kind {
    CODIR_LABEL_IDS = 0,   /* integers >= 0, used as class ids */
    CODIR_LABEL_NAMES,     /* class names such as "entailment"; see label_names below */
    CODIR_LABEL_FLOAT      /* real numbers, for regression */
} codir_label_kind;

/* Where codir_dataset_load_tsv_opts finds the columns. A column is found by its header
   name when the name is set and has_header is 1, else by its 0-based index. */
typedef struct codir_tsv_options {
    int has_header;            /* 1: the first line names the columns and is skipped */
    const char *text_a;        /* name of the first text column, e.g. "sentence1" */
    const char *text_b;        /* name of the second text column, NULL for none */
    const char *label;         /* name of the label column */
    int text_a_index;          /* used when text_a is NULL */
    int text_b_index;          /* used when text_b is NULL; -1 for single sentences */
    int label_index;           /* used when label is NULL */
    codir_label_kind label_kind;
    /* CODIR_LABEL_NAMES only: the class names, name i being class i; every label must
       be one of them. NULL: the distinct labels of this file sorted by strcmp. Pass
       the training set's label_names and num_classes when loading its dev set, so
       both use the same ids. */
    const char *const *label_names;
    int label_name_count;
} codir_tsv_options;

/* Returns options for a file with a header, columns "sentence" and "label", no second
   text and integer labels; every index is -1. */
CODIR_DEF codir_tsv_options codir_tsv_options_default(void);

/* Reads a TSV file laid out as `options` says. Fields are separated by tabs only, and
   quotes are literal text. Every row must have as many fields as the first line and a
   valid label. "\r\n" line ends, a UTF-8 BOM, a missing final newline and empty lines
   at the end are accepted. A malformed row fails the whole load with a message that
   starts "path:line:". Returns NULL on failure. */
CODIR_DEF codir_dataset *codir_dataset_load_tsv_opts(const char *path, const codir_tsv_options *options);

/* Reads a GLUE task's train.tsv or dev.tsv, recognizing the layout by its header:
     header contains                      text columns             labels
     sentence, label (SST-2)              sentence                 ids
     #1 String, #2 String, Quality (MRPC) #1 String, #2 String     ids from Quality
     question, sentence, label (QNLI)     question, sentence       entailment, not_entailment
     sentence1, sentence2, score (STS-B)  sentence1, sentence2     floats (regression)
     sentence1, sentence2, gold_label     sentence1, sentence2     entailment, neutral,
       (MNLI)                                                        contradiction
     sentence1, sentence2, label (RTE)    sentence1, sentence2     entailment, not_entailment
     question1, question2, is_duplicate   question1, question2     ids
       (QQP)
   Class names get the ids of the order listed, as in Hugging Face's GLUE datasets, so
   train and dev agree. A file whose first line has 4 fields, the second "0" or "1"
   and the third empty or "*", and no known header, is read as CoLA (no header; source,
   label, original label, sentence). Other columns are ignored. Returns NULL on failure,
   with a message naming the expected headers. */
CODIR_DEF codir_dataset *codir_dataset_load_tsv(const char *path);

/* Keeps the first `count` examples and frees the rest; a larger count changes nothing. */
CODIR_DEF void codir_dataset_truncate(codir_dataset *data, int count);

/* Frees the dataset, its sentences and label names; NULL is allowed. */
CODIR_DEF void codir_dataset_free(codir_dataset *data);

/* A data set encoded to token ids, each sequence [CLS] pieces [SEP]. */
typedef struct codir_encoded {
    int count;                  /* examples */
    int max_len;                /* row stride of ids and types */
    int *lengths;               /* [count] tokens in each sequence */
    int *ids;                   /* [count, max_len] */
    int *types;                 /* [count, max_len] token types, or NULL for all 0 */
    int *labels;                /* [count] class ids */
    float *targets;             /* [count] regression targets, or NULL for classification */
    int num_classes;
} codir_encoded;

CODIR_DEF codir_encoded *codir_encode_dataset(const codir_vocab *vocab, const codir_dataset *data, int max_len);
CODIR_DEF void codir_encoded_free(codir_encoded *enc);
/* Allocates a batch able to hold max_batch sequences of max_len tokens. */
CODIR_DEF int codir_batch_init(codir_batch *batch, int max_batch, int max_len);
CODIR_DEF void codir_batch_free(codir_batch *batch);
/* Fills batch with examples order[start .. start+count-1], padded to the longest. */
CODIR_DEF int codir_batch_fill(codir_batch *batch, const codir_encoded *enc, const int *order, int start, int count);
/* Fisher-Yates shuffle driven by a SplitMix64 state. */
CODIR_DEF void codir_shuffle(int *order, int n, uint64_t *rng);
/* Sorts each window of `window` consecutive entries of order[n] by sequence length,
   then shuffles the batches of batch_size within the whole order. After codir_shuffle
   this keeps batches random but cuts the padding, and with it the time per epoch. */
CODIR_DEF int codir_bucket_by_length(int *order, int n, const codir_encoded *enc, int window, int batch_size,
                                     uint64_t *rng);

/* ===================================================================================
   10. Training loop
   =================================================================================== */

/* Adds the gradients of the task loss on one batch, times `weight`, to the model's
   parameter gradients: cross-entropy for classification, mean squared error when
   num_labels is 1. With weight = micro-batch size / full batch size, micro-batches
   accumulate the gradient of the full batch's mean loss. Does not zero gradients. */
CODIR_DEF int codir_task_accumulate(codir_ctx *ctx, codir_model *model, const codir_batch *batch, float weight,
                                    uint64_t step, codir_loss_terms *terms);
/* The same for the CoDIR objective. With update_bank = 1 the batch's bank rows move
   toward the new teacher projections afterwards. */
CODIR_DEF int codir_distill_accumulate(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                       codir_distiller *d, const codir_batch *batch, float weight, uint64_t step,
                                       int update_bank, codir_loss_terms *terms);
/* Scales all gradients of params[count] so that their joint L2 norm is at most max_norm,
   as torch.nn.utils.clip_grad_norm_ (scale max_norm / (norm + 1e-6) when the norm is
   larger). Returns the norm before clipping. */
CODIR_DEF double codir_clip_grad_norm(codir_params *const *params, int count, double max_norm);

/* One step of task-only training: forward with dropout, task loss, backward,
   AdamW. Returns CODIR_ERR_NONFINITE naming the term if the loss or a gradient is
   NaN or Inf, before any parameter changes. */
CODIR_DEF int codir_task_step(codir_ctx *ctx, codir_model *model, codir_adamw *opt, const codir_batch *batch,
                              float lr, codir_loss_terms *terms);
/* One CoDIR step: the frozen teacher runs without dropout or tape, the student and the
   projection heads are trained on the three-part objective, and the bank is updated. */
CODIR_DEF int codir_distill_step(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                 codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                 const codir_batch *batch, float lr, codir_loss_terms *terms);
/* The teacher's outputs for every training example, computed once. A frozen teacher
   without dropout gives the same logits and the same pooled mapped layers for an
   example every epoch, and its forward pass is a large share of a CoDIR step, so
   computing them once makes a CoDIR step cost about a student training step. Rows
   are the same as running the teacher in the step because every op of the forward
   pass computes each example independently of the others in its batch. It does not
   apply to pre-training, where the masked positions change every step. */
typedef struct codir_teacher_cache {
    int count;                  /* examples */
    int num_labels;             /* width of a logits row */
    int feature_dim;            /* Ls * Ct pooled features per example, 0 when lambda is 0 */
    float *logits;              /* [count, num_labels] */
    float *features;            /* [count, feature_dim], or NULL */
    size_t bytes;               /* memory of logits and features */
} codir_teacher_cache;

/* Returns the bytes a cache of `count` examples needs for this teacher and distiller. */
CODIR_DEF double codir_teacher_cache_bytes(const codir_config *teacher, const codir_distiller *d, int count);
/* Runs the teacher once over enc in batches of batch_size and stores its outputs.
   Returns NULL with CODIR_ERR_NOMEM's reason when the cache would exceed max_bytes
   (0 for no limit); run codir_distill_step with the teacher instead then. */
CODIR_DEF codir_teacher_cache *codir_teacher_cache_build(codir_ctx *ctx, const codir_model *teacher,
                                                         const codir_distiller *d, const codir_encoded *enc,
                                                         int batch_size, double max_bytes);
CODIR_DEF void codir_teacher_cache_free(codir_teacher_cache *cache);
/* codir_distill_step with the teacher's outputs read from the cache by example id. */
CODIR_DEF int codir_distill_step_cached(codir_ctx *ctx, codir_model *student, const codir_teacher_cache *cache,
                                        codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                        const codir_batch *batch, float lr, codir_loss_terms *terms);

/* Writes the model's outputs for every example of enc to out[count, num_labels], in
   batches of batch_size, without dropout or tape. The batches are cut from the
   examples sorted by length, so padding costs little; out keeps enc's order. */
CODIR_DEF int codir_predict(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc, int batch_size,
                            float *out);

/* GLUE's metrics. Classification: accuracy, F1 of class 1 (MRPC, QQP) and Matthews
   correlation (CoLA); regression: Pearson and Spearman correlation (STS-B). A metric
   that does not apply, or whose denominator is zero, is NaN (so is F1 with no
   positive prediction and no positive label), except Matthews, which is 0 then, as
   in scikit-learn. */
typedef struct codir_scores {
    double accuracy, f1, matthews;
    double pearson, spearman;
} codir_scores;

CODIR_DEF double codir_accuracy(const int *pred, const int *gold, int n);
/* F1 of class `positive`: 2 tp / (2 tp + fp + fn). */
CODIR_DEF double codir_f1(const int *pred, const int *gold, int n, int positive);
/* Matthews correlation for any number of classes (Gorodkin's R_K, as
   sklearn.metrics.matthews_corrcoef); the usual phi coefficient for two. 0 when the
   predictions or the labels are all one class. */
CODIR_DEF double codir_matthews(const int *pred, const int *gold, int n, int num_classes);
CODIR_DEF double codir_pearson(const float *x, const float *y, int n);
/* Pearson correlation of the ranks; tied values share their average rank. Returns
   CODIR_OK, or CODIR_ERR_NOMEM for its rank buffers. */
CODIR_DEF int codir_spearman(const float *x, const float *y, int n, double *out);

/* Scores of model on enc: every metric that applies to its task, the rest NaN. */
CODIR_DEF int codir_evaluate(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc,
                             int batch_size, codir_scores *scores);

/* Everything that a resumed run needs to continue bit for bit where a saved one
   stopped: parameters, AdamW moments and step counts, projection heads, memory banks,
   the sampler's and the caller's random states, the NCE normalizers and the epoch.
   Only `model` is required; NULL members are neither saved nor loaded. */
typedef struct codir_train_state {
    codir_model *model;
    codir_adamw *opt;           /* the model's optimizer */
    codir_distiller *distiller; /* heads, banks, sampler state, NCE normalizers */
    codir_adamw *opt_heads;     /* the heads' optimizer */
    uint64_t *rng;              /* the caller's shuffling state; for a bit-identical resume the
                                   data order must follow from it, e.g. by shuffling the
                                   identity order at the start of each epoch */
    long epoch;                 /* the caller's position, e.g. epochs completed */
} codir_train_state;

/* Writes the state as one safetensors file (tensors "model.*", "adam_m.model.*", ...,
   "bank.teacher"; scalars in its metadata), to `path`.tmp first and then renamed over
   `path`, so a run killed at any moment leaves the old or the new file whole.
   The temporary file is fsynced before the rename on POSIX systems, so a power loss
   also leaves one of the two whole; elsewhere (or with CODIR_NO_FSYNC) only a killed
   process is covered. */
CODIR_DEF int codir_checkpoint_save(const char *path, const codir_train_state *state);
/* Reads a checkpoint into objects created with the same shapes as the saved ones. On
   failure the objects may be partly overwritten and should be discarded. */
CODIR_DEF int codir_checkpoint_load(const char *path, codir_train_state *state);

/* Masked-LM pre-training and CoDIR-Pre. */
/* ---- masked-LM pre-training and CoDIR-Pre ----

   CoDIR-Pre distils a teacher into a student while both see masked-LM input, with no
   task labels, so that one small student can later be fine-tuned on any task:

       L = (1 - beta) L_mlm + beta L_kd + lambda L_crd

   L_mlm is the student's cross-entropy at the chosen (masked) positions, L_kd is
   T^2 KL(p_teacher || p_student) on the vocabulary logits at the same positions, and
   L_crd is the contrastive term of section 7 with negatives drawn from other segments
   of the anchor's document. The official CoDIR code released only MLM + KD for this
   stage; the contrastive part follows the paper's description.

   The pipeline, in the order the data flows:

       codir_corpus_load            paragraphs and the document each belongs to
       codir_segment_corpus         segments [CLS] pieces [SEP] as a codir_encoded
                                    whose labels are document ids
       codir_batch_fill             a padded batch of segments (section 9)
       codir_mlm_mask               choose and corrupt tokens in a copy of the ids
       codir_mlm_step               the teacher: masked-LM loss only
       codir_pretrain_distill_step  the student: the three-part loss above
       codir_mlm_evaluate           masked-token accuracy and perplexity

   For the contrastive term, create the distiller with the segments' labels (document
   ids), one bank row per segment, and cfg.negatives_from = CODIR_NEG_SAME_GROUP:

       dcfg.negatives_from = CODIR_NEG_SAME_GROUP;
       d = codir_distiller_create(&dcfg, &student->cfg, &teacher->cfg, segments->labels,
                                  segments->count, seed); */

/* Pre-training text: UTF-8, one paragraph per line, documents separated by empty
   lines, the input format of create_pretraining_data.py in google-research/bert. As
   there, a line of only whitespace counts as empty (here ASCII whitespace only), and
   several empty lines in a row end one document, so no document is empty. */
typedef struct codir_corpus {
    int num_lines;              /* non-empty lines */
    char **lines;               /* [num_lines] paragraphs without the line end ("\n", "\r\n") */
    int *docs;                  /* [num_lines] document of each line, 0-based, non-decreasing */
    int *line_numbers;          /* [num_lines] 1-based line number in the source, for messages */
    int num_docs;
    char *name;                 /* the file path, or the name given to codir_corpus_parse */
} codir_corpus;

/* Reads a corpus file; see codir_corpus_parse. Returns NULL on failure. */
CODIR_DEF codir_corpus *codir_corpus_load(const char *path);
/* Splits text[length] into lines and documents. A UTF-8 byte order mark at the start
   is skipped. Rejects a NUL byte (naming "name:line") and a text without any non-empty
   line. `name` appears in messages. Returns NULL on failure. */
CODIR_DEF codir_corpus *codir_corpus_parse(const char *text, size_t length, const char *name);
/* Frees the corpus; NULL is allowed. */
CODIR_DEF void codir_corpus_free(codir_corpus *corpus);

/* Cuts every document into segments [CLS] pieces [SEP] of at most max_len ids, with
   P = max_len - 2 pieces of room. The lines of a document are packed in order: a line
   that does not fit in the room left starts a new segment, and a line of more than P
   pieces fills whole segments, its last part starting the next segment, which later
   lines of the document may join. No segment holds pieces of two documents; lines
   without pieces are skipped. Returns a codir_encoded (free with codir_encoded_free)
   with labels[i] the document of segment i, num_classes = corpus->num_docs, and no
   types or targets; segments are in corpus order. A tokenizer failure names the
   corpus and line. max_len must be at least 3. Returns NULL on failure. */
CODIR_DEF codir_encoded *codir_segment_corpus(const codir_vocab *vocab, const codir_corpus *corpus, int max_len);

/* Token corruption of BERT's masked-LM task, with the rates of create_pretraining_data.py
   in google-research/bert. */
typedef struct codir_mlm_config {
    float select_prob;          /* share of the eligible tokens chosen for prediction; 0.15 */
    float mask_prob;            /* share of chosen tokens replaced by mask_id; 0.8 */
    float random_prob;          /* share of chosen tokens replaced by a random eligible id;
                                   0.1. The other chosen tokens keep their id. */
    int vocab_size;             /* ids are 0..vocab_size-1 */
    int mask_id;                /* the [MASK] token */
    int special_ids[5];         /* [PAD], [UNK], [CLS], [SEP], [MASK]: never chosen and never
                                   drawn as a random token; -1 marks an unused entry */
} codir_mlm_config;

/* Returns BERT's rates (0.15, then 0.8 / 0.1 / 0.1) and the special ids of vocab. */
CODIR_DEF codir_mlm_config codir_mlm_config_default(const codir_vocab *vocab);

/* A batch after masking. `batch` is a copy of the source codir_batch whose ids point
   to masked_ids; its other buffers (types, mask, labels, example ids) still belong to
   the source batch, which must outlive every use of this one. */
typedef struct codir_mlm_batch {
    codir_batch batch;          /* the model input: the source batch with masked ids */
    int *masked_ids;            /* [B * T] the source ids with the chosen tokens replaced */
    int *positions;             /* [count] chosen positions b * T + t, ascending */
    int *targets;               /* [count] the original ids at those positions */
    int count;                  /* chosen positions in this batch */
    size_t capacity;            /* B * T that the buffers hold */
} codir_mlm_batch;

/* Allocates buffers for batches of up to max_batch segments of max_len tokens. */
CODIR_DEF int codir_mlm_batch_init(codir_mlm_batch *mb, int max_batch, int max_len);
CODIR_DEF void codir_mlm_batch_free(codir_mlm_batch *mb);

/* Chooses and corrupts tokens of `batch` into mb. Eligible tokens are the non-padding
   tokens whose id is not special. Each segment with n eligible tokens gets a uniform
   random subset of exactly max(1, round(select_prob * n)) chosen ones (none when n is
   0; halves round up). Each chosen token becomes mask_id with probability mask_prob, a
   uniform random non-special id with probability random_prob, and stays as it is
   otherwise. BERT's create_pretraining_data.py differs in three details: its n also
   counts [CLS] and [SEP] and is capped by max_predictions_per_seq, [UNK] can be
   chosen, and the random token may be a special one.
   Every decision depends only on (seed, example id, position) through a counter-based
   hash. A segment thus gets the same masks in any batch and at any batch size, so an
   evaluation with a fixed seed is reproducible, and training passes a new seed per
   step for dynamic masking. Returns CODIR_OK or CODIR_ERR_INVALID (bad rates, ids or
   capacity). */
CODIR_DEF int codir_mlm_mask(codir_mlm_batch *mb, const codir_batch *batch, const codir_mlm_config *cfg,
                             uint64_t seed);

/* Masked-LM cross-entropy, the mean over mb's chosen positions of the last hidden
   layer hidden[B, T, C]; no other position enters the loss or receives gradient.
   *logits_out, when not NULL, receives the logits [count, V]. Needs cfg.mlm_head and
   mb->count >= 1. */
CODIR_DEF codir_tensor *codir_mlm_loss(codir_ctx *ctx, const codir_model *model, codir_tensor *hidden,
                                       const codir_mlm_batch *mb, codir_tensor **logits_out);

/* One masked-LM step of a model with cfg.mlm_head: forward with dropout, loss at the
   chosen positions, backward, AdamW. terms->task and terms->total receive the loss.
   A batch without chosen positions changes nothing and leaves every term 0. Returns
   CODIR_ERR_NONFINITE naming the term or parameter before any parameter changes. */
CODIR_DEF int codir_mlm_step(codir_ctx *ctx, codir_model *model, codir_adamw *opt, const codir_mlm_batch *mb,
                             float lr, codir_loss_terms *terms);

/* One CoDIR-Pre step: the frozen teacher runs on the masked batch without dropout or
   tape; the student and the projection heads of d are trained on
   (1 - beta) L_mlm + beta L_kd + lambda L_crd (weights and T from d->cfg), and the bank
   rows of the batch's segments move toward the new teacher projections. Both models
   need cfg.mlm_head and the same vocabulary. terms->task receives L_mlm. Without
   chosen positions, L_mlm and L_kd are left out for that batch, and with lambda 0 as
   well the step changes nothing. */
CODIR_DEF int codir_pretrain_distill_step(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                          codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                          const codir_mlm_batch *mb, float lr, codir_loss_terms *terms);

/* Masked-LM scores on held-out segments. */
typedef struct codir_mlm_scores {
    double accuracy;            /* share of chosen tokens whose highest logit is the original id */
    double loss;                /* mean cross-entropy over all chosen tokens, in nats */
    double perplexity;          /* exp(loss) */
    long count;                 /* chosen tokens scored */
} codir_mlm_scores;

/* Masks every segment of enc with codir_mlm_mask(cfg, seed) and scores model at the
   chosen positions, in batches of batch_size, without dropout or tape. The means are
   over tokens, not batches, and the same seed chooses the same tokens at any batch
   size. This perplexity is over the corrupted input of the masked-LM task (80% [MASK],
   10% random, 10% kept), not a left-to-right language-model perplexity. */
CODIR_DEF int codir_mlm_evaluate(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc,
                                 int batch_size, const codir_mlm_config *cfg, uint64_t seed,
                                 codir_mlm_scores *scores);

#ifdef __cplusplus
}
#endif
#endif /* CODIR_H */

/* ===================================================================================
   Implementation
   =================================================================================== */
#ifdef CODIR_IMPLEMENTATION
#ifndef CODIR_IMPLEMENTATION_DONE
#define CODIR_IMPLEMENTATION_DONE

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(CODIR_MALLOC) && defined(CODIR_REALLOC) && defined(CODIR_FREE)
/* all three given */
#elif !defined(CODIR_MALLOC) && !defined(CODIR_REALLOC) && !defined(CODIR_FREE)
#define CODIR_MALLOC(n) malloc(n)
#define CODIR_REALLOC(p, n) realloc(p, n)
#define CODIR_FREE(p) free(p)
/* calloc maps large blocks to zero pages the kernel fills on first touch, so gradient
   buffers of a frozen model cost no memory until written. */
#define CODIR__STD_CALLOC 1
#else
#if !defined(CODIR_MALLOC)
#error "codir.h: CODIR_REALLOC or CODIR_FREE is defined but CODIR_MALLOC is missing; define all three or none"
#endif
#if !defined(CODIR_REALLOC)
#error "codir.h: CODIR_MALLOC or CODIR_FREE is defined but CODIR_REALLOC is missing; define all three or none"
#endif
#if !defined(CODIR_FREE)
#error "codir.h: CODIR_MALLOC or CODIR_REALLOC is defined but CODIR_FREE is missing; define all three or none"
#endif
#endif

/* Always-on invariant check: unlike assert(), it stays in release builds, because a
   broken invariant in a training run silently corrupts results. */
#ifndef CODIR_ASSERT
#define CODIR_ASSERT(x)                                                                 \
    do {                                                                                \
        if (!(x)) {                                                                     \
            fprintf(stderr, "codir.h:%d: internal check failed: %s\n", __LINE__, #x);   \
            abort();                                                                    \
        }                                                                               \
    } while (0)
#endif

#if defined(__cplusplus)
#define CODIR__THREAD_LOCAL thread_local
#elif defined(_MSC_VER)
#define CODIR__THREAD_LOCAL __declspec(thread)
#else
#define CODIR__THREAD_LOCAL _Thread_local
#endif

/* ---- errors ---- */

static CODIR__THREAD_LOCAL char codir__error_message[512];

CODIR_DEF const char *codir_last_error(void) { return codir__error_message; }

CODIR_DEF void codir_clear_error(void) { codir__error_message[0] = '\0'; }

/* Records a printf-style reason and returns `code`, so a caller can write
   `return codir__fail(CODIR_ERR_INVALID, "...", ...);`. */
static int codir__fail(int code, const char *fmt, ...)
{
    char message[sizeof codir__error_message];
    va_list args;

    /* Format into a copy first: callers may pass codir_last_error() as an argument to
       add context to an inner error. */
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    memcpy(codir__error_message, message, sizeof message);
    return code;
}

/* ---- checked sizes and allocation ---- */

/* Stores a * b in *out and returns 1, or returns 0 when the product overflows size_t. */
static int codir__size_mul(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* Stores a + b in *out and returns 1, or returns 0 when the sum overflows size_t. */
static int codir__size_add(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

/* Allocates n bytes (at least 1), recording an error and returning NULL on failure. */
static void *codir__malloc(size_t n)
{
    void *p = CODIR_MALLOC(n ? n : 1);
    if (!p) codir__fail(CODIR_ERR_NOMEM, "out of memory allocating %zu bytes", n);
    return p;
}

/* Allocates count * size zeroed bytes, with the product checked for overflow. */
static void *codir__calloc(size_t count, size_t size)
{
    size_t n;
    void *p;
    if (!codir__size_mul(count, size, &n)) {
        codir__fail(CODIR_ERR_OVERFLOW, "allocation of %zu x %zu bytes overflows size_t", count, size);
        return NULL;
    }
#ifdef CODIR__STD_CALLOC
    p = calloc(n ? n : 1, 1);
    if (!p) codir__fail(CODIR_ERR_NOMEM, "out of memory allocating %zu bytes", n);
#else
    p = codir__malloc(n);
    if (p) memset(p, 0, n);
#endif
    return p;
}

/* Resizes p to n bytes; on failure p is left untouched and NULL is returned. */
static void *codir__realloc(void *p, size_t n)
{
    void *q = CODIR_REALLOC(p, n ? n : 1);
    if (!q) codir__fail(CODIR_ERR_NOMEM, "out of memory growing a buffer to %zu bytes", n);
    return q;
}

static void codir__free(void *p)
{
    if (p) CODIR_FREE(p);
}

/* Returns a heap copy of the n bytes at s followed by a NUL, or NULL. */
static char *codir__strndup(const char *s, size_t n)
{
    char *d;
    if (n == SIZE_MAX) {
        codir__fail(CODIR_ERR_OVERFLOW, "string length overflows size_t");
        return NULL;
    }
    d = (char *)codir__malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* ---- reading files ---- */

/* Reads a whole file into *out, a NUL-terminated heap buffer, and stores its length
   (without the NUL) in *length. `role` names the kind of file in error messages ("" for
   none); a file over max_bytes (0 for no limit) is rejected as invalid. */
static int codir__read_file(const char *path, const char *role, size_t max_bytes, char **out, size_t *length)
{
    FILE *file = fopen(path, "rb");
    const char *space = role[0] ? " " : "";
    char *data = NULL;
    size_t size = 0, capacity = 0;
    int rc;

    *out = NULL;
    if (!file)
        return codir__fail(CODIR_ERR_IO, "failed to open %s%s'%s': %s; check the path", role, space, path,
                           strerror(errno));
    for (;;) {
        size_t got;
        if (max_bytes && size > max_bytes) break;
        if (capacity - size < 2) {
            size_t grown = capacity ? capacity : 32768;
            char *bigger;
            if (!codir__size_mul(grown, 2, &grown)) {
                rc = codir__fail(CODIR_ERR_OVERFLOW, "%s%s'%s' is too large to read into memory", role, space, path);
                goto fail;
            }
            bigger = (char *)codir__realloc(data, grown);
            if (!bigger) {
                rc = CODIR_ERR_NOMEM;
                goto fail;
            }
            data = bigger;
            capacity = grown;
        }
        got = fread(data + size, 1, capacity - size - 1, file);
        size += got;
        if (got == 0) break;
    }
    if (ferror(file)) {
        rc = codir__fail(CODIR_ERR_IO, "failed to read %s%s'%s'", role, space, path);
        goto fail;
    }
    if (max_bytes && size > max_bytes) {
        rc = codir__fail(CODIR_ERR_INVALID, "%s%s'%s' is larger than the %zu bytes allowed for it", role, space, path,
                         max_bytes);
        goto fail;
    }
    fclose(file);
    data[size] = '\0';
    *out = data;
    *length = size;
    return CODIR_OK;

fail:
    fclose(file);
    codir__free(data);
    return rc;
}

/* ---- random numbers ---- */

/* SplitMix64 (Steele, Lea, Flood 2014): advances *state and returns 64 random bits. */
static uint64_t codir__splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ===================================================================================
   2. Tensors and memory (implementation)
   =================================================================================== */

/* Stores the product of shape[0..ndim-1] in *numel; returns CODIR_OK or an error. */
static int codir__shape_numel(int ndim, const int *shape, size_t *numel)
{
    size_t n = 1;
    int i;
    if (ndim < 1 || ndim > CODIR_MAX_DIMS)
        return codir__fail(CODIR_ERR_INVALID, "tensor rank %d is outside 1..%d", ndim, CODIR_MAX_DIMS);
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return codir__fail(CODIR_ERR_INVALID, "tensor dimension %d is negative (%d)", i, shape[i]);
        if (!codir__size_mul(n, (size_t)shape[i], &n))
            return codir__fail(CODIR_ERR_OVERFLOW, "tensor shape overflows size_t at dimension %d", i);
    }
    *numel = n;
    return CODIR_OK;
}

CODIR_DEF int codir_params_init(codir_params *params, const codir_param_spec *specs, int num_specs)
{
    size_t total = 0, name_bytes = 0, offset = 0, name_offset = 0;
    int i, rc;
    memset(params, 0, sizeof *params);
    if (num_specs < 1) return codir__fail(CODIR_ERR_INVALID, "a parameter set needs at least one tensor");
    for (i = 0; i < num_specs; i++) {
        size_t numel;
        rc = codir__shape_numel(specs[i].ndim, specs[i].shape, &numel);
        if (rc) return codir__fail(rc, "parameter %s: %s", specs[i].name, codir_last_error());
        if (!codir__size_add(total, numel, &total) || !codir__size_add(name_bytes, strlen(specs[i].name) + 1, &name_bytes))
            return codir__fail(CODIR_ERR_OVERFLOW, "parameter sizes overflow size_t");
    }
    if (total > SIZE_MAX / sizeof(float)) return codir__fail(CODIR_ERR_OVERFLOW, "a parameter block of %zu floats overflows size_t in bytes", total);
    params->data = (float *)codir__calloc(total, sizeof(float));
    params->grad = (float *)codir__calloc(total, sizeof(float));
    params->tensors = (codir_tensor *)codir__calloc((size_t)num_specs, sizeof(codir_tensor));
    params->names = (char *)codir__malloc(name_bytes);
    if (!params->data || !params->grad || !params->tensors || !params->names) {
        codir_params_free(params);
        return CODIR_ERR_NOMEM;
    }
    params->count = total;
    params->num_tensors = num_specs;
    for (i = 0; i < num_specs; i++) {
        codir_tensor *t = &params->tensors[i];
        size_t len = strlen(specs[i].name) + 1;
        int d;
        t->ndim = specs[i].ndim;
        for (d = 0; d < CODIR_MAX_DIMS; d++) t->shape[d] = d < t->ndim ? specs[i].shape[d] : 1;
        codir__shape_numel(t->ndim, t->shape, &t->numel);
        t->data = params->data + offset;
        t->grad = params->grad + offset;
        t->no_decay = specs[i].no_decay;
        memcpy(params->names + name_offset, specs[i].name, len);
        t->name = params->names + name_offset;
        offset += t->numel;
        name_offset += len;
    }
    return CODIR_OK;
}

CODIR_DEF void codir_params_free(codir_params *params)
{
    codir__free(params->data);
    codir__free(params->grad);
    codir__free(params->tensors);
    codir__free(params->names);
    memset(params, 0, sizeof *params);
}

static void codir__zero_floats(float *p, size_t n);

/* What a packed copy of a weight (codir_model_pack) was made from. It sits in the 16
   floats before the copy, so the copy stays 64-byte aligned. A struct copy of the
   weight carries the same `packed` pointer: the check below lets it use the packed
   copy only while that still matches its own data and shape. */
typedef struct codir__pack_header {
    const float *source;
    int rows, cols;
    int valid;                  /* 0 once the weight changed */
} codir__pack_header;
#define CODIR__PACK_HEADER_FLOATS 16

static codir__pack_header *codir__pack_header_of(const float *packed)
{
    return (codir__pack_header *)(void *)(uintptr_t)(packed - CODIR__PACK_HEADER_FLOATS);
}

/* Marks t's packed copy stale (for every struct copy of t too) and drops it from t. */
static void codir__drop_pack(codir_tensor *t)
{
    if (t->packed) codir__pack_header_of(t->packed)->valid = 0;
    t->packed = NULL;
}

/* Returns w's packed copy when it was made from w's current values and shape, else NULL. */
static const float *codir__usable_pack(const codir_tensor *w)
{
    const codir__pack_header *h;
    if (!w->packed) return NULL;
    h = codir__pack_header_of(w->packed);
    return h->valid && h->source == w->data && w->ndim == 2 && h->rows == w->shape[0] && h->cols == w->shape[1]
               ? w->packed : NULL;
}

CODIR_DEF void codir_params_zero_grad(codir_params *params) { codir__zero_floats(params->grad, params->count); }

CODIR_DEF codir_tensor *codir_params_find(const codir_params *params, const char *name)
{
    int i;
    for (i = 0; i < params->num_tensors; i++)
        if (strcmp(params->tensors[i].name, name) == 0) return &params->tensors[i];
    return NULL;
}

CODIR_DEF int codir_params_copy(codir_params *dst, const codir_params *src)
{
    int i, d;
    if (dst->num_tensors != src->num_tensors)
        return codir__fail(CODIR_ERR_INVALID, "cannot copy parameters: %d tensors into %d", src->num_tensors,
                           dst->num_tensors);
    for (i = 0; i < src->num_tensors; i++) {
        const codir_tensor *s = &src->tensors[i];
        const codir_tensor *t = &dst->tensors[i];
        int same = strcmp(s->name, t->name) == 0 && s->ndim == t->ndim;
        for (d = 0; same && d < s->ndim; d++) same = s->shape[d] == t->shape[d];
        if (!same)
            return codir__fail(CODIR_ERR_INVALID, "cannot copy parameter %s into %s: names or shapes differ",
                               s->name, t->name);
    }
    memcpy(dst->data, src->data, src->count * sizeof(float));
    for (i = 0; i < dst->num_tensors; i++) codir__drop_pack(&dst->tensors[i]); /* now stale */
    return CODIR_OK;
}

/* ---- arena ---- */

#define CODIR__ALIGN 64

/* An extra arena block; its bytes follow the header. */
typedef struct codir__arena_block {
    struct codir__arena_block *next;
    size_t size, used;
} codir__arena_block;

CODIR_DEF int codir_arena_init(codir_arena *arena, size_t bytes)
{
    memset(arena, 0, sizeof *arena);
    bytes = (bytes + CODIR__ALIGN - 1) / CODIR__ALIGN * CODIR__ALIGN;
    if (bytes == 0) bytes = CODIR__ALIGN;
    arena->base = (char *)codir__malloc(bytes + CODIR__ALIGN);
    if (!arena->base) return CODIR_ERR_NOMEM;
    arena->size = bytes;
    return CODIR_OK;
}

/* Rounds p up to the next multiple of CODIR__ALIGN. */
static char *codir__align_ptr(char *p)
{
    uintptr_t u = (uintptr_t)p;
    return p + ((CODIR__ALIGN - u % CODIR__ALIGN) % CODIR__ALIGN);
}

CODIR_DEF void *codir_arena_alloc(codir_arena *arena, size_t bytes)
{
    codir__arena_block *blk;
    size_t rounded, block_size;
    if (bytes > SIZE_MAX - 2 * CODIR__ALIGN - sizeof(codir__arena_block)) {
        codir__fail(CODIR_ERR_OVERFLOW, "arena request of %zu bytes overflows size_t", bytes);
        return NULL;
    }
    rounded = (bytes + CODIR__ALIGN - 1) / CODIR__ALIGN * CODIR__ALIGN;
    if (rounded <= arena->size - arena->used) {
        char *p = codir__align_ptr(arena->base) + arena->used;
        arena->used += rounded;
        if (arena->used + arena->extra_used > arena->peak) arena->peak = arena->used + arena->extra_used;
        return p;
    }
    blk = (codir__arena_block *)arena->extra;
    if (blk && rounded <= blk->size - blk->used) {
        blk->used += rounded;
    } else {
        /* Grow geometrically so a step that overflows takes few extra blocks. */
        block_size = arena->size > rounded ? arena->size : rounded;
        blk = (codir__arena_block *)codir__malloc(sizeof(codir__arena_block) + block_size + CODIR__ALIGN);
        if (!blk) return NULL;
        blk->next = (codir__arena_block *)arena->extra;
        blk->size = block_size;
        blk->used = rounded;
        arena->extra = blk;
    }
    arena->extra_used += rounded;
    if (arena->used + arena->extra_used > arena->peak) arena->peak = arena->used + arena->extra_used;
    return codir__align_ptr((char *)(blk + 1)) + blk->used - rounded;
}

CODIR_DEF void codir_arena_reset(codir_arena *arena)
{
    if (arena->extra || arena->peak > arena->size) {
        /* A step overflowed (its extra blocks may be gone after a rewind): replace all
           blocks by one of the high-water size. */
        codir__arena_block *blk = (codir__arena_block *)arena->extra;
        size_t want = arena->peak + arena->peak / 8;
        char *base;
        while (blk) {
            codir__arena_block *next = blk->next;
            codir__free(blk);
            blk = next;
        }
        arena->extra = NULL;
        want = (want + CODIR__ALIGN - 1) / CODIR__ALIGN * CODIR__ALIGN;
        base = (char *)CODIR_MALLOC(want + CODIR__ALIGN);
        if (base) {
            codir__free(arena->base);
            arena->base = base;
            arena->size = want;
        }
        /* On failure the old block stays and the next step takes extra blocks again. */
    }
    arena->used = 0;
    arena->extra_used = 0;
}

CODIR_DEF codir_arena_pos codir_arena_mark(const codir_arena *arena)
{
    codir_arena_pos mark;
    mark.used = arena->used;
    mark.extra_used = arena->extra_used;
    mark.extra = arena->extra;
    mark.block_used = arena->extra ? ((const codir__arena_block *)arena->extra)->used : 0;
    return mark;
}

CODIR_DEF void codir_arena_rewind(codir_arena *arena, codir_arena_pos mark)
{
    /* Extra blocks taken after the mark are newer, so they sit at the head of the list. */
    while (arena->extra && arena->extra != mark.extra) {
        codir__arena_block *blk = (codir__arena_block *)arena->extra;
        arena->extra = blk->next;
        codir__free(blk);
    }
    if (arena->extra) ((codir__arena_block *)arena->extra)->used = mark.block_used;
    arena->used = mark.used;
    arena->extra_used = mark.extra_used;
}

CODIR_DEF size_t codir_arena_peak(const codir_arena *arena) { return arena->peak; }

CODIR_DEF void codir_arena_free(codir_arena *arena)
{
    codir__arena_block *blk = (codir__arena_block *)arena->extra;
    while (blk) {
        codir__arena_block *next = blk->next;
        codir__free(blk);
        blk = next;
    }
    codir__free(arena->base);
    memset(arena, 0, sizeof *arena);
}

/* ===================================================================================
   3. Kernels (implementation)
   ===================================================================================
   These loops are the scalar reference of every op; only the linear layers run through
   the fast GEMM. Row-independent loops are split across OpenMP threads, and each row's
   arithmetic is the same for any thread count, so results are bit-identical. Sums that
   decide a result (means, variances, norms, losses) accumulate in double. */

/* Splits the following loop across threads when it has at least CODIR__OMP_MIN_WORK
   multiply-adds in total and no parallel region is active. Smaller loops run on one
   thread, because starting a team costs more than they take. */
#define CODIR__OMP_MIN_WORK 32768
#if defined(_OPENMP)
#define CODIR__PRAGMA(x) _Pragma(#x)
#define CODIR__OMP_FOR(work) \
    CODIR__PRAGMA(omp parallel for schedule(static) if (!omp_in_parallel() && (double)(work) >= CODIR__OMP_MIN_WORK))
#define CODIR__OMP_FOR_SIMD(work)                                  \
    CODIR__PRAGMA(omp parallel for simd schedule(static) if (!omp_in_parallel() && \
                                                             (double)(work) >= CODIR__OMP_MIN_WORK))
#else
#define CODIR__OMP_FOR(work)
#define CODIR__OMP_FOR_SIMD(work)
#endif

/* Vectorizes the following loop, or a sum over it, with OpenMP's simd directive. GCC
   at -O2 vectorizes few loops on its own; these are the hot element loops. The
   vector width is fixed when the code is compiled, so a sum is rounded the same way
   for every thread count. */
#if defined(_OPENMP)
#define CODIR__OMP_SIMD CODIR__PRAGMA(omp simd)
#define CODIR__OMP_SIMD_SUM(x) CODIR__PRAGMA(omp simd reduction(+ : x))
#define CODIR__OMP_SIMD_SUM2(x, y) CODIR__PRAGMA(omp simd reduction(+ : x, y))
#else
#define CODIR__OMP_SIMD
#define CODIR__OMP_SIMD_SUM(x)
#define CODIR__OMP_SIMD_SUM2(x, y)
#endif

/* Column block of the column-sum loops: a thread sums columns [lo, lo + 64) row after
   row, so the reads stream through memory instead of striding down each column. Each
   column is summed row by row whatever the block width, so the width changes no
   result. Blocks of 256 left a layer 192 wide a single block, for one thread; blocks
   of 64 give it three. */
#define CODIR__COL_BLOCK 64

/* Instruction sets compiled in, for the GEMM micro-kernels and the vector math below:
   CODIR__SIMD_AVX512, CODIR__SIMD_AVX2 and CODIR__SIMD_NEON. CODIR_NO_SIMD turns all
   of them off. */
#if !defined(CODIR_NO_SIMD) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* x86-64 with GCC or Clang: the SIMD code is compiled with target attributes and the
   widest version the CPU runs is picked at run time, so no -mavx2 or -march flag is
   needed. */
#define CODIR__SIMD_AVX512 1
#define CODIR__SIMD_AVX2 1
#define CODIR__SIMD_RUNTIME_DISPATCH 1
#define CODIR__SIMD_TARGET_AVX512 __attribute__((target("avx512f")))
#define CODIR__SIMD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#elif !defined(CODIR_NO_SIMD) && defined(__AVX512F__)
/* Other compilers: use what the build flags enable (for example MSVC /arch:AVX512). */
#define CODIR__SIMD_AVX512 1
#define CODIR__SIMD_TARGET_AVX512
#include <immintrin.h>
#elif !defined(CODIR_NO_SIMD) && defined(__AVX2__) && defined(__FMA__)
#define CODIR__SIMD_AVX2 1
#define CODIR__SIMD_TARGET_AVX2
#include <immintrin.h>
#elif !defined(CODIR_NO_SIMD) && defined(__aarch64__) && defined(__ARM_NEON)
#define CODIR__SIMD_NEON 1
#include <arm_neon.h>
#endif

/* Returns 1 when this build has the AVX-512 code and the CPU runs it. With run-time
   dispatch, __builtin_cpu_supports reads CPU features detected before main and checks
   that the OS saves the vector registers, so the call is cheap and safe from any
   thread. */
static inline int codir__has_avx512(void)
{
#if defined(CODIR__SIMD_RUNTIME_DISPATCH)
    return __builtin_cpu_supports("avx512f");
#elif defined(CODIR__SIMD_AVX512)
    return 1;
#else
    return 0;
#endif
}

/* Returns 1 when this build has the AVX2 + FMA code and the CPU runs it. */
static inline int codir__has_avx2(void)
{
#if defined(CODIR__SIMD_RUNTIME_DISPATCH)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(CODIR__SIMD_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* GCC 12's avx512fintrin.h builds several intrinsics on a deliberately undefined
   vector, which g++ -O2 -Wall reports as maybe uninitialized; these brackets silence
   that report around the functions that use them. */
#if defined(__GNUC__) && !defined(__clang__)
#define CODIR__QUIET_UNDEFINED_BEGIN \
    _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define CODIR__QUIET_UNDEFINED_END _Pragma("GCC diagnostic pop")
#else
#define CODIR__QUIET_UNDEFINED_BEGIN
#define CODIR__QUIET_UNDEFINED_END
#endif

/* ---- linear ---- */

/* w is packed for the GEMM on every call. With few rows (batch-1 inference) that
   packing reads the whole weight matrix and takes about as long as the product, so
   codir_model_pack keeps a frozen model's weights packed; codir_linear uses them. */
static int codir__gemm(codir_gemm_ws *ws, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                       int lda, const float *b, int ldb, const float *b_packed, float beta, float *c, int ldc);

/* codir_linear_forward, reading W^T from w_packed (codir_model_pack) when not NULL. */
static int codir__linear_forward(struct codir_gemm_ws *ws, float *out, const float *inp, const float *w,
                                 const float *w_packed, const float *b, int N, int C, int OC)
{
    int i;
    if (!b) return codir__gemm(ws, 0, 1, N, OC, C, 1.0f, inp, C, w, C, w_packed, 0.0f, out, OC);

    /* Start from the bias and let GEMM add x W^T onto it. */
    CODIR__OMP_FOR((double)N * OC)
    for (i = 0; i < N; i++) memcpy(out + (size_t)i * OC, b, (size_t)OC * sizeof(float));
    return codir__gemm(ws, 0, 1, N, OC, C, 1.0f, inp, C, w, C, w_packed, 1.0f, out, OC);
}

CODIR_DEF int codir_linear_forward(struct codir_gemm_ws *ws, float *out, const float *inp, const float *w,
                                   const float *b, int N, int C, int OC)
{
    return codir__linear_forward(ws, out, inp, w, NULL, b, N, C, OC);
}

CODIR_DEF int codir_linear_backward(struct codir_gemm_ws *ws, float *dinp, float *dw, float *db,
                                    const float *dout, const float *inp, const float *w, int N, int C, int OC)
{
    int rc = CODIR_OK;

    /* dinp[N,C] += dout[N,OC] w[OC,C] */
    if (dinp) rc = codir_gemm(ws, 0, 0, N, C, OC, 1.0f, dout, OC, w, C, 1.0f, dinp, C);

    /* dw[OC,C] += dout^T[OC,N] inp[N,C] */
    if (rc == CODIR_OK && dw) rc = codir_gemm(ws, 1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dw, C);

    /* db[OC] += column sums of dout */
    if (rc == CODIR_OK && db) {
        int block, blocks = (OC + CODIR__COL_BLOCK - 1) / CODIR__COL_BLOCK;
        CODIR__OMP_FOR((double)N * OC)
        for (block = 0; block < blocks; block++) {
            int lo = block * CODIR__COL_BLOCK, width = OC - lo < CODIR__COL_BLOCK ? OC - lo : CODIR__COL_BLOCK, i, o;
            float sum[CODIR__COL_BLOCK];
            for (o = 0; o < width; o++) sum[o] = 0.0f;
            for (i = 0; i < N; i++) {
                const float *row = dout + (size_t)i * OC + lo;
                CODIR__OMP_SIMD
                for (o = 0; o < width; o++) sum[o] += row[o];
            }
            for (o = 0; o < width; o++) db[lo + o] += sum[o];
        }
    }
    return rc;
}

/* ---- add ---- */

CODIR_DEF void codir_add_forward(float *out, const float *a, const float *b, size_t n)
{
    size_t i;
    CODIR__OMP_FOR_SIMD(n)
    for (i = 0; i < n; i++) out[i] = a[i] + b[i];
}

CODIR_DEF void codir_add_backward(float *da, float *db, const float *dout, size_t n)
{
    size_t i;
    CODIR__OMP_FOR(n)
    for (i = 0; i < n; i++) {
        if (da) da[i] += dout[i];
        if (db) db[i] += dout[i];
    }
}

/* ---- LayerNorm ---- */

CODIR_DEF void codir_layernorm_forward(float *out, double *mean, float *rstd, const float *inp,
                                       const float *gamma, const float *beta, int N, int C, float eps)
{
    int i;
    CODIR__OMP_FOR((double)N * C)
    for (i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C;
        float *y = out + (size_t)i * C;
        double m = 0.0, v = 0.0;
        float fr;
        int c;

        /* Two passes in double: one pass (E[x^2] - E[x]^2) cancels catastrophically on
           rows like mean 1e4 with spread 1e-2. */
        CODIR__OMP_SIMD_SUM(m)
        for (c = 0; c < C; c++) m += x[c];
        m /= C;
        CODIR__OMP_SIMD_SUM(v)
        for (c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        v /= C;
        fr = (float)(1.0 / sqrt(v + eps));

        CODIR__OMP_SIMD
        for (c = 0; c < C; c++) y[c] = (float)((x[c] - m) * fr) * gamma[c] + beta[c];
        if (mean) mean[i] = m;
        if (rstd) rstd[i] = fr;
    }
}

CODIR_DEF void codir_layernorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                                        const float *inp, const float *gamma, const double *mean,
                                        const float *rstd, int N, int C)
{
    int i;

    /* dinp = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * gamma */
    if (dinp) {
        CODIR__OMP_FOR((double)N * C)
        for (i = 0; i < N; i++) {
            const float *x = inp + (size_t)i * C;
            const float *dy = dout + (size_t)i * C;
            float *dx = dinp + (size_t)i * C;
            double sum_g = 0.0, sum_gx = 0.0;
            float g_mean, gx_mean;
            int k;
            CODIR__OMP_SIMD_SUM2(sum_g, sum_gx)
            for (k = 0; k < C; k++) {
                float xhat = (float)((x[k] - mean[i]) * rstd[i]);
                float g = dy[k] * gamma[k];
                sum_g += g;
                sum_gx += g * xhat;
            }
            g_mean = (float)(sum_g / C);
            gx_mean = (float)(sum_gx / C);
            CODIR__OMP_SIMD
            for (k = 0; k < C; k++) {
                float xhat = (float)((x[k] - mean[i]) * rstd[i]);
                dx[k] += rstd[i] * (dy[k] * gamma[k] - g_mean - xhat * gx_mean);
            }
        }
    }

    /* dgamma = sum over rows of dout * xhat, dbeta = sum over rows of dout */
    if (dgamma || dbeta) {
        int block, blocks = (C + CODIR__COL_BLOCK - 1) / CODIR__COL_BLOCK;
        CODIR__OMP_FOR((double)N * C)
        for (block = 0; block < blocks; block++) {
            int lo = block * CODIR__COL_BLOCK, width = C - lo < CODIR__COL_BLOCK ? C - lo : CODIR__COL_BLOCK, row, c;
            float sg[CODIR__COL_BLOCK], sb[CODIR__COL_BLOCK];
            for (c = 0; c < width; c++) sg[c] = sb[c] = 0.0f;
            for (row = 0; row < N; row++) {
                const float *dy = dout + (size_t)row * C + lo, *x = inp + (size_t)row * C + lo;
                double m = mean[row];
                float r = rstd[row];
                CODIR__OMP_SIMD
                for (c = 0; c < width; c++) {
                    sg[c] += dy[c] * (float)((x[c] - m) * r);
                    sb[c] += dy[c];
                }
            }
            for (c = 0; c < width; c++) {
                if (dgamma) dgamma[lo + c] += sg[c];
                if (dbeta) dbeta[lo + c] += sb[c];
            }
        }
    }
}

/* ---- vector math ----

   GELU and the attention softmax spend most of their time in erff and expf, which libm
   evaluates one value per call. These kernels use their own exp and normal CDF,
   written as straight-line float code that OpenMP's `simd` directive vectorizes (with
   -fopenmp). On x86-64 with GCC or Clang each loop is compiled for AVX-512, for
   AVX2+FMA and for the baseline, and the widest version the CPU runs is called.

   exp(x): x = n ln2 + r with |r| <= ln2/2 (Cody and Waite's ln2 in two parts), e^r
   = 1 + r + r^2 P(r) with Cephes expf's degree-5 P, and 2^n written into the exponent
   bits. The error measured against double exp on [-87.3, 1] is at most 1.01 ulp. Below
   -87.3 the result is 0, and x is clamped to 88.37 above, which no caller reaches:
   they pass x <= 0, or at most about 1e-7 above.

   Phi(x) = P(Z <= x) for a standard normal Z, from erfc(z) with z = |x|/sqrt(2), by
   the Chebyshev fit of Press et al., Numerical Recipes in C, 2nd ed., section 6.2:
       erfc(z) = t exp(-z^2 - 1.26551223 + t (1.00002368 + ... + t 0.17087277)),
       t = 1 / (1 + z/2), fractional error below 1.2e-7 for every z >= 0.
   Phi(x) = erfc(z)/2 for x <= 0 and 1 - erfc(z)/2 above, so the relative error stays
   small in the left tail, where 1 + erf(x/sqrt(2)) would cancel. */

#define CODIR__SQRT1_2 0.70710678118654752440
#define CODIR__INV_SQRT_2PI 0.39894228040143267794
#define CODIR__VEC_BLOCK 2048  /* elements per task when a kernel is split over threads */

/* Sets p[0..n) to zero, split over threads when large: zeroing gradient buffers was a
   serial tenth of the CoDIR step on 2 threads. */
static void codir__zero_floats(float *p, size_t n)
{
    const size_t chunk = 16 * CODIR__VEC_BLOCK;
    long block, blocks = (long)((n + chunk - 1) / chunk);
    CODIR__OMP_FOR(n)
    for (block = 0; block < blocks; block++) {
        size_t lo = (size_t)block * chunk;
        memset(p + lo, 0, (n - lo < chunk ? n - lo : chunk) * sizeof(float));
    }
}

/* The loop bodies below are inlined into one copy per instruction set. */
#if defined(__GNUC__) || defined(__clang__)
#define CODIR__INLINE static inline __attribute__((always_inline))
#else
#define CODIR__INLINE static inline
#endif

CODIR__INLINE float codir__vexp(float x)
{
    /* The comparisons send NaN to the lower bound, so the conversion to int below is
       always defined; the NaN comes back at the end. rintf keeps the rounding under
       -ffast-math, where an add-and-subtract trick would be folded away. */
    float y = x > -87.33654f ? x : -87.33654f, n, r, p, scale;
    uint32_t bits;
    y = y < 88.37626f ? y : 88.37626f;
    n = rintf(y * 1.44269504088896341f);
    bits = (uint32_t)((int32_t)n + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    r = y - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r * r + r + 1.0f) * scale;
    return x < -87.33654f ? 0.0f : (x == x ? p : x);
}

CODIR__INLINE float codir__vnormal_cdf(float x)
{
    float z = (x < 0.0f ? -x : x) * (float)CODIR__SQRT1_2;
    float t = 1.0f / (1.0f + 0.5f * z), u = 0.17087277f, half_erfc;
    u = u * t - 0.82215223f;
    u = u * t + 1.48851587f;
    u = u * t - 1.13520398f;
    u = u * t + 0.27886807f;
    u = u * t - 0.18628806f;
    u = u * t + 0.09678418f;
    u = u * t + 0.37409196f;
    u = u * t + 1.00002368f;
    u = u * t - 1.26551223f;
    half_erfc = 0.5f * t * codir__vexp(u - z * z);
    return x > 0.0f ? 1.0f - half_erfc : half_erfc;
}

/* out = x Phi(x) */
CODIR__INLINE void codir__gelu_forward_loop(float *out, const float *inp, size_t n)
{
    size_t i;
    CODIR__OMP_SIMD
    for (i = 0; i < n; i++) out[i] = inp[i] * codir__vnormal_cdf(inp[i]);
}

/* dinp += dout (Phi(x) + x phi(x)) */
CODIR__INLINE void codir__gelu_backward_loop(float *dinp, const float *inp, const float *dout, size_t n)
{
    size_t i;
    CODIR__OMP_SIMD
    for (i = 0; i < n; i++) {
        float x = inp[i];
        float pdf = (float)CODIR__INV_SQRT_2PI * codir__vexp(-0.5f * x * x);
        dinp[i] += dout[i] * (codir__vnormal_cdf(x) + x * pdf);
    }
}

/* The backward pass of a GELU whose output feeds a linear layer (codir_gelu_linear):
   the buffer g comes in as dL/dg and leaves as g = GELU(x), which the weight gradient
   reads next, and dinp += dL/dg GELU'(x). One pass shares Phi(x) between the two, and
   each value is the one the two loops above compute (under -ffast-math the compiler
   may round them differently, by about one unit in the last place). */
CODIR__INLINE void codir__gelu_regrad_loop(float *g, float *dinp, const float *inp, size_t n)
{
    size_t i;
    CODIR__OMP_SIMD
    for (i = 0; i < n; i++) {
        float x = inp[i], cdf = codir__vnormal_cdf(x);
        float pdf = (float)CODIR__INV_SQRT_2PI * codir__vexp(-0.5f * x * x);
        dinp[i] += g[i] * (cdf + x * pdf);
        g[i] = x * cdf;
    }
}

/* p[j] = exp(p[j] - mx) for kept keys and 0 for padded ones; *total = their sum.
   The sum runs in eight double lanes added in a fixed order: compilers vectorize that
   form (they leave a float-to-double reduction scalar, even under omp simd), and it
   rounds the same way on every instruction set. */
CODIR__INLINE void codir__exp_shifted_loop(float *p, const int *keep, float mx, int n, double *total)
{
    double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, sum;
    int j, k;
    CODIR__OMP_SIMD
    for (j = 0; j < n; j++) {
        float e = codir__vexp(p[j] - mx);
        p[j] = keep[j] ? e : 0.0f;
    }
    for (j = 0; j + 8 <= n; j += 8)
        for (k = 0; k < 8; k++) lane[k] += p[j + k];
    sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; j < n; j++) sum += p[j];
    *total = sum;
}

/* One row of attention probabilities, in place: p[j] = exp(p[j] - max) / sum over the
   kept keys and 0 for padded ones, the max and sum taken over kept keys. A row with no
   key left stays all zero instead of 0/0 = NaN. A NaN score never becomes the max, so
   it comes out as NaN probabilities, as it should. The max runs in 16 lanes, because
   a max is exact in any order and the fixed form vectorizes. */
CODIR__INLINE void codir__softmax_row_loop(float *p, const int *keep, int n)
{
    float lane[16], mx = -INFINITY;
    double sum, inv;
    int j, k, kept = 0;
    for (k = 0; k < 16; k++) lane[k] = -INFINITY;
    for (j = 0; j + 16 <= n; j += 16) {
        CODIR__OMP_SIMD
        for (k = 0; k < 16; k++) {
            float v = keep[j + k] ? p[j + k] : -INFINITY;
            lane[k] = v > lane[k] ? v : lane[k];
        }
    }
    for (k = 0; k < 16; k++) mx = lane[k] > mx ? lane[k] : mx;
    for (; j < n; j++)
        if (keep[j] && p[j] > mx) mx = p[j];
    CODIR__OMP_SIMD_SUM(kept)
    for (j = 0; j < n; j++) kept += keep[j] != 0;
    if (!kept) {
        for (j = 0; j < n; j++) p[j] = 0.0f;
        return;
    }
    codir__exp_shifted_loop(p, keep, mx, n, &sum);
    inv = 1.0 / sum;
    CODIR__OMP_SIMD
    for (j = 0; j < n; j++) p[j] = (float)(p[j] * inv);
}

/* Softmax backward of one row, in place: dp[j] = p[j] (dp[j] - sum_k p[k] dp[k]) scale.
   The dot product runs in eight double lanes, as the sum above. */
CODIR__INLINE void codir__softmax_grad_row_loop(const float *p, float *dp, int n, float scale)
{
    double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, dot;
    float d;
    int j, k;
    for (j = 0; j + 8 <= n; j += 8)
        for (k = 0; k < 8; k++) lane[k] += (double)p[j + k] * dp[j + k];
    dot = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; j < n; j++) dot += (double)p[j] * dp[j];
    d = (float)dot;
    CODIR__OMP_SIMD
    for (j = 0; j < n; j++) dp[j] = p[j] * (dp[j] - d) * scale;
}

/* Defines name_avx512, name_avx2 and name_base, each compiling `loop` for its target. */
#if defined(CODIR__SIMD_RUNTIME_DISPATCH)
#define CODIR__VEC_VERSIONS(name, params, args)                                                  \
    CODIR__SIMD_TARGET_AVX512 static void name##_avx512 params { name##_loop args; }             \
    CODIR__SIMD_TARGET_AVX2 static void name##_avx2 params { name##_loop args; }                 \
    static void name##_base params { name##_loop args; }                                         \
    static void name params                                                                      \
    {                                                                                            \
        if (codir__has_avx512())                                                                 \
            name##_avx512 args;                                                                  \
        else if (codir__has_avx2())                                                              \
            name##_avx2 args;                                                                    \
        else                                                                                     \
            name##_base args;                                                                    \
    }
#else
#define CODIR__VEC_VERSIONS(name, params, args) \
    static void name params { name##_loop args; }
#endif

CODIR__VEC_VERSIONS(codir__gelu_forward, (float *out, const float *inp, size_t n), (out, inp, n))
CODIR__VEC_VERSIONS(codir__gelu_backward, (float *dinp, const float *inp, const float *dout, size_t n),
                    (dinp, inp, dout, n))
CODIR__VEC_VERSIONS(codir__gelu_regrad, (float *g, float *dinp, const float *inp, size_t n), (g, dinp, inp, n))
CODIR__VEC_VERSIONS(codir__softmax_row, (float *p, const int *keep, int n), (p, keep, n))
CODIR__VEC_VERSIONS(codir__softmax_grad_row, (const float *p, float *dp, int n, float scale), (p, dp, n, scale))

#ifdef CODIR__SIMD_AVX512
/* Transposes a 16 x 16 block in registers: r[i] holds row i on entry and column i on
   return. Three rounds of two-source shuffles: interleave pairs of rows within each
   128-bit lane, then pairs of pairs, then move whole lanes. */
CODIR__QUIET_UNDEFINED_BEGIN
CODIR__SIMD_TARGET_AVX512 CODIR__INLINE void codir__transpose16_avx512(__m512 r[16])
{
    __m512 t[16], u[16];
    int i;
    for (i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    /* In each 128-bit lane k, u[4q + m] now gets element 4k + m of rows 4q .. 4q+3. */
    for (i = 0; i < 16; i += 4) {
        __m512d a = _mm512_castps_pd(t[i]), c = _mm512_castps_pd(t[i + 2]);
        __m512d a2 = _mm512_castps_pd(t[i + 1]), c2 = _mm512_castps_pd(t[i + 3]);
        u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a2, c2));
        u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a2, c2));
    }
    /* Column 4k + m is lane k of u[m], u[4 + m], u[8 + m] and u[12 + m]. */
    for (i = 0; i < 4; i++) {
        __m512 lo01 = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x44), hi01 = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xEE);
        __m512 lo23 = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x44);
        __m512 hi23 = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xEE);
        r[i] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
        r[8 + i] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
        r[12 + i] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
    }
}
CODIR__QUIET_UNDEFINED_END
#endif

/* ---- GELU, tanh ---- */

/* GELU(x) = x Phi(x), with Phi from the vector math above. */
CODIR_DEF void codir_gelu_forward(float *out, const float *inp, size_t n)
{
    long block, blocks = (long)((n + CODIR__VEC_BLOCK - 1) / CODIR__VEC_BLOCK);
    CODIR__OMP_FOR(8 * n)
    for (block = 0; block < blocks; block++) {
        size_t lo = (size_t)block * CODIR__VEC_BLOCK;
        codir__gelu_forward(out + lo, inp + lo, n - lo < CODIR__VEC_BLOCK ? n - lo : CODIR__VEC_BLOCK);
    }
}

/* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
CODIR_DEF void codir_gelu_backward(float *dinp, const float *inp, const float *dout, size_t n)
{
    long block, blocks = (long)((n + CODIR__VEC_BLOCK - 1) / CODIR__VEC_BLOCK);
    CODIR__OMP_FOR(16 * n)
    for (block = 0; block < blocks; block++) {
        size_t lo = (size_t)block * CODIR__VEC_BLOCK;
        codir__gelu_backward(dinp + lo, inp + lo, dout + lo, n - lo < CODIR__VEC_BLOCK ? n - lo : CODIR__VEC_BLOCK);
    }
}

/* codir__gelu_regrad_loop over threads. */
static void codir__gelu_regrad_blocks(float *g, float *dinp, const float *inp, size_t n)
{
    long block, blocks = (long)((n + CODIR__VEC_BLOCK - 1) / CODIR__VEC_BLOCK);
    CODIR__OMP_FOR(16 * n)
    for (block = 0; block < blocks; block++) {
        size_t lo = (size_t)block * CODIR__VEC_BLOCK;
        codir__gelu_regrad(g + lo, dinp + lo, inp + lo, n - lo < CODIR__VEC_BLOCK ? n - lo : CODIR__VEC_BLOCK);
    }
}

CODIR_DEF void codir_tanh_forward(float *out, const float *inp, size_t n)
{
    size_t i;
    CODIR__OMP_FOR(8 * n)
    for (i = 0; i < n; i++) out[i] = tanhf(inp[i]);
}

CODIR_DEF void codir_tanh_backward(float *dinp, const float *out, const float *dout, size_t n)
{
    size_t i;
    CODIR__OMP_FOR(n)
    for (i = 0; i < n; i++) dinp[i] += dout[i] * (1.0f - out[i] * out[i]);
}

/* ---- softmax ---- */

CODIR_DEF void codir_softmax_forward(float *out, const float *inp, int N, int V)
{
    int i;
    CODIR__OMP_FOR((double)N * V)
    for (i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * V;
        float *y = out + (size_t)i * V;
        float mx = -INFINITY;
        double sum = 0.0;
        int v;
        for (v = 0; v < V; v++) mx = x[v] > mx ? x[v] : mx;
        for (v = 0; v < V; v++) {
            y[v] = expf(x[v] - mx);
            sum += y[v];
        }
        for (v = 0; v < V; v++) y[v] = (float)(y[v] / sum);
    }
}

CODIR_DEF void codir_softmax_backward(float *dinp, const float *out, const float *dout, int N, int V)
{
    int i;
    /* dx = y * (dy - <dy, y>) */
    CODIR__OMP_FOR((double)N * V)
    for (i = 0; i < N; i++) {
        const float *y = out + (size_t)i * V;
        const float *dy = dout + (size_t)i * V;
        float *dx = dinp + (size_t)i * V;
        double dot = 0.0;
        int v;
        for (v = 0; v < V; v++) dot += (double)dy[v] * y[v];
        for (v = 0; v < V; v++) dx[v] += y[v] * (dy[v] - (float)dot);
    }
}

/* ---- attention ---- */

/* The attention kernels run each (sequence, head) pair on one thread, as a handful of
   small GEMMs on strided views of qkv, so no head is copied out:
       S  = scale * Q K^T          T x T, NT          (forward)
       P  = softmax(S) per row     padded keys get 0
       O  = P V                    T x HS, NN
       dP = dO V^T                 T x T, NT          (backward)
       dV += P^T dO                T x HS, TN
       dS = P * (dP - rowsum(P * dP)) * scale
       dQ += dS K                  T x HS, NN
       dK += dS^T Q                T x HS, TN
   Q, K and V of head h are columns h*HS.. of the three thirds of a qkv row, so their
   leading dimension is 3C. The GEMM section defines codir__gemm_serial. */
static size_t codir__gemm_serial_floats(int m, int n, int k);
static int codir__gemm_nr(void);
static void codir__gemm_serial(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                               const float *b, int ldb, float beta, float *c, int ldc, float *pack);

/* Floats of GEMM packing buffer that one thread's products need, in either
   orientation of the T x HS products (see codir__attention_mix). */
static size_t codir__attention_pack_floats(int T, int HS)
{
    size_t scores = codir__gemm_serial_floats(T, T, HS), most = scores;
    size_t mixes = codir__gemm_serial_floats(T, HS, T), turned = codir__gemm_serial_floats(HS, T, T);
    if (mixes > most) most = mixes;
    return turned > most ? turned : most;
}

/* Per thread: the packing buffer, one T x T block of scores, the keys and values of
   one head (T x HS each) with the rows of padded tokens zeroed, one T x HS block for
   a transposed product, and a second T x T block for the probabilities that the
   backward pass recomputes. */
CODIR_DEF size_t codir_attention_scratch(int T, int C, int NH)
{
    int HS = NH > 0 ? C / NH : 0;
    size_t squares, rows, total;
    if (T <= 0 || HS <= 0) return 0;
    /* SIZE_MAX on overflow (possible with a 32-bit size_t), which no allocation passes */
    if (!codir__size_mul((size_t)T, 2 * (size_t)T, &squares) || !codir__size_mul((size_t)T, 3 * (size_t)HS, &rows) ||
        !codir__size_add(squares, rows, &total) || !codir__size_add(total, codir__attention_pack_floats(T, HS), &total))
        return SIZE_MAX;
    return total;
}

#ifdef CODIR__SIMD_AVX512
/* The loop at the end of codir__attention_mix in 16 x 16 blocks transposed in
   registers, with the same additions. The strided scalar loop took 4% of the L3-H192
   training step at T = 128 in a perf profile of examples/bench_step.c on 1 thread
   (the machine of examples/BENCHMARKS.md). */
CODIR__SIMD_TARGET_AVX512
static void codir__attention_add_back_avx512(int T, int HS, const float *tmp, int accumulate, float *c, int ldc)
{
    int t0, j0, i;
    for (t0 = 0; t0 < T; t0 += 16) {
        int tn = T - t0 < 16 ? T - t0 : 16;
        __mmask16 tmask = (__mmask16)((1u << tn) - 1u);
        for (j0 = 0; j0 < HS; j0 += 16) {
            int jn = HS - j0 < 16 ? HS - j0 : 16;
            __mmask16 jmask = (__mmask16)((1u << jn) - 1u);
            __m512 r[16];
            for (i = 0; i < 16; i++)
                r[i] = i < jn ? _mm512_maskz_loadu_ps(tmask, tmp + (size_t)(j0 + i) * T + t0) : _mm512_setzero_ps();
            codir__transpose16_avx512(r);
            for (i = 0; i < tn; i++) {
                float *row = c + (size_t)(t0 + i) * ldc + j0;
                __m512 v = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(jmask, row), r[i]) : r[i];
                _mm512_mask_storeu_ps(row, jmask, v);
            }
        }
    }
}
#endif

/* c[T, HS] (row stride ldc) = op(a)[T, K] op(b)[K, HS], plus c when accumulate is 1.
   When HS is not a multiple of the micro-kernel's NR columns (a head size of 32
   against AVX-512's 64), half of every tile would be padding, so the product runs
   transposed, c^T = op(b)^T op(a)^T with T columns, into tmp[HS, T] and is added back
   (in 16 x 16 register blocks on AVX-512). Both orders sum the same products in the
   same order; only when K spans several KC blocks and c accumulates do they group the
   blocks' partial sums differently, which can change the last bit. */
static void codir__attention_mix(int trans_a, int trans_b, int T, int HS, int K, const float *a, int lda,
                                 const float *b, int ldb, int accumulate, float *c, int ldc, float *tmp, float *pack)
{
    int t, j;
    if (HS % codir__gemm_nr() == 0) {
        codir__gemm_serial(trans_a, trans_b, T, HS, K, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc, pack);
        return;
    }
    codir__gemm_serial(!trans_b, !trans_a, HS, T, K, 1.0f, b, ldb, a, lda, 0.0f, tmp, T, pack);
#ifdef CODIR__SIMD_AVX512
    if (codir__has_avx512()) {
        codir__attention_add_back_avx512(T, HS, tmp, accumulate, c, ldc);
        return;
    }
#endif
    for (t = 0; t < T; t++) {
        float *row = c + (size_t)t * ldc;
        if (accumulate)
            for (j = 0; j < HS; j++) row[j] += tmp[(size_t)j * T + t];
        else
            for (j = 0; j < HS; j++) row[j] = tmp[(size_t)j * T + t];
    }
}

/* Returns one head's keys or values (T rows of HS at x, row stride 3C) for the GEMMs:
   x itself when no token is padded, else a copy in buf whose padded rows are zero, so
   a NaN or Inf in a padded token cannot reach the others through 0 * NaN. *ld
   receives the row stride of the result. */
static const float *codir__attention_kept_rows(const float *x, int C, const int *keep, int T, int HS, float *buf,
                                               int *ld)
{
    int j;
    for (j = 0; j < T && keep[j]; j++) continue;
    if (j == T) {
        *ld = 3 * C;
        return x;
    }
    for (j = 0; j < T; j++) {
        if (keep[j])
            memcpy(buf + (size_t)j * HS, x + (size_t)j * 3 * C, (size_t)HS * sizeof(float));
        else
            memset(buf + (size_t)j * HS, 0, (size_t)HS * sizeof(float));
    }
    *ld = HS;
    return buf;
}

/* Threads for the attention kernels: the caller's limit, capped by OpenMP's and by the
   number of (sequence, head) pairs. */
static int codir__attention_threads(int limit, int pairs)
{
    int threads = limit < pairs ? limit : pairs;
#ifdef _OPENMP
    if (omp_in_parallel()) return 1;
    if (threads > omp_get_max_threads()) threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    return threads > 1 ? threads : 1;
}

/* Returns the calling thread's part of per_thread floats of scratch. */
static float *codir__thread_scratch(float *scratch, size_t per_thread)
{
#ifdef _OPENMP
    return scratch + (size_t)omp_get_thread_num() * per_thread;
#else
    (void)per_thread;
    return scratch;
#endif
}

/* Sets p[rows, T] to the probabilities of the first `rows` queries of one (sequence,
   head) pair, q pointing at its query in qkv. The backward pass calls it again to
   recompute them, so both passes get the same bits. */
static void codir__attention_probs(const float *q, int C, int HS, const int *keep, int T, int rows, float scale,
                                   float *p, float *pack)
{
    int t;
    /* Scores of padded keys are computed but never read: the softmax skips them. */
    codir__gemm_serial(0, 1, rows, T, HS, scale, q, 3 * C, q + C, 3 * C, 0.0f, p, T, pack);
    for (t = 0; t < rows; t++) codir__softmax_row(p + (size_t)t * T, keep, T);
}

/* Shared body of codir_attention_forward (queries = T) and
   codir_attention_first_forward (queries = 1): out[B, queries, C], att[B, NH, queries, T]. */
static void codir__attention_forward(float *out, float *att, const float *qkv, const int *mask, int B, int T, int C,
                                     int NH, float *scratch, int threads, int queries)
{
    int HS = NH > 0 ? C / NH : 0, bh;
    float scale;
    size_t per_thread = codir_attention_scratch(T, C, NH), pack;
    if (B <= 0 || per_thread == 0) return;
    scale = 1.0f / sqrtf((float)HS);
    pack = codir__attention_pack_floats(T, HS);
    threads = codir__attention_threads(threads, B * NH);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH, ldv;
        float *mine = codir__thread_scratch(scratch, per_thread);
        float *scores = mine + pack, *vbuf = scores + (size_t)T * T + (size_t)T * HS, *tmp = vbuf + (size_t)T * HS;
        const int *keep = mask + (size_t)b * T;
        const float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
        const float *v = codir__attention_kept_rows(q + 2 * C, C, keep, T, HS, vbuf, &ldv);
        float *p = att ? att + ((size_t)b * NH + h) * queries * T : scores;
        float *o = out + (size_t)b * queries * C + (size_t)h * HS;
        codir__attention_probs(q, C, HS, keep, T, queries, scale, p, mine);
        codir__attention_mix(0, 0, queries, HS, T, p, T, v, ldv, 0, o, C, tmp, mine);
    }
}

CODIR_DEF void codir_attention_forward(float *out, float *att, const float *qkv, const int *mask, int B, int T,
                                       int C, int NH, float *scratch, int threads)
{
    codir__attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, threads, T);
}

CODIR_DEF void codir_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                        const int *mask, int B, int T, int C, int NH, float *scratch, int threads)
{
    int HS = NH > 0 ? C / NH : 0, bh;
    float scale;
    size_t per_thread = codir_attention_scratch(T, C, NH), pack;
    if (B <= 0 || per_thread == 0) return;
    scale = 1.0f / sqrtf((float)HS);
    pack = codir__attention_pack_floats(T, HS);
    threads = codir__attention_threads(threads, B * NH);
    (void)threads;
    /* Each (sequence, head) pair owns its slice of dqkv, so the pairs run in parallel. */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH, t, ldk, ldv;
        float *mine = codir__thread_scratch(scratch, per_thread);
        float *ds = mine + pack, *kbuf = ds + (size_t)T * T, *vbuf = kbuf + (size_t)T * HS, *tmp = vbuf + (size_t)T * HS;
        float *pbuf = tmp + (size_t)T * HS;
        const int *keep = mask + (size_t)b * T;
        const float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
        const float *k = codir__attention_kept_rows(q + C, C, keep, T, HS, kbuf, &ldk);
        const float *v = codir__attention_kept_rows(q + 2 * C, C, keep, T, HS, vbuf, &ldv);
        const float *p = att ? att + ((size_t)b * NH + h) * T * T : pbuf;
        const float *dy = dout + (size_t)b * T * C + (size_t)h * HS;
        float *dq = dqkv + (size_t)b * T * 3 * C + (size_t)h * HS;

        if (!att) codir__attention_probs(q, C, HS, keep, T, T, scale, pbuf, mine);
        codir__gemm_serial(0, 1, T, T, HS, 1.0f, dy, C, v, ldv, 0.0f, ds, T, mine);
        codir__attention_mix(1, 0, T, HS, T, p, T, dy, C, 1, dq + 2 * C, 3 * C, tmp, mine);
        for (t = 0; t < T; t++) codir__softmax_grad_row(p + (size_t)t * T, ds + (size_t)t * T, T, scale);
        codir__attention_mix(0, 0, T, HS, T, ds, T, k, ldk, 1, dq, 3 * C, tmp, mine);
        codir__attention_mix(1, 0, T, HS, T, ds, T, q, 3 * C, 1, dq + C, 3 * C, tmp, mine);
    }
}

/* The first query alone: the products above with one row. The micro-kernel sums each
   element of C in the same order whatever its place in the tile, so the scores and the
   output have the bits of row 0 of the full kernel. */
CODIR_DEF void codir_attention_first_forward(float *out, float *att, const float *qkv, const int *mask, int B, int T,
                                             int C, int NH, float *scratch, int threads)
{
    codir__attention_forward(out, att, qkv, mask, B, T, C, NH, scratch, threads, 1);
}

/* With one query the backward products are outer products and dot products of
   length HS, written as loops. Padded keys are skipped, so a NaN in their keys or
   values cannot reach the gradients. */
CODIR_DEF void codir_attention_first_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                              const int *mask, int B, int T, int C, int NH, float *scratch,
                                              int threads)
{
    int HS = NH > 0 ? C / NH : 0, bh;
    float scale;
    size_t per_thread = codir_attention_scratch(T, C, NH);
    if (B <= 0 || per_thread == 0) return;
    scale = 1.0f / sqrtf((float)HS);
    threads = codir__attention_threads(threads, B * NH);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH, j, d;
        float *ds = codir__thread_scratch(scratch, per_thread);
        const int *keep = mask + (size_t)b * T;
        const float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
        const float *p = att + ((size_t)b * NH + h) * T;
        const float *dy = dout + (size_t)b * C + (size_t)h * HS;
        float *dq = dqkv + (size_t)b * T * 3 * C + (size_t)h * HS;

        /* dP_j = dO . v_j, then dS = P * (dP - P . dP) * scale */
        for (j = 0; j < T; j++) {
            const float *v = q + (size_t)j * 3 * C + 2 * C;
            float dot = 0.0f;
            if (keep[j])
                for (d = 0; d < HS; d++) dot += dy[d] * v[d];
            ds[j] = dot;
        }
        codir__softmax_grad_row(p, ds, T, scale);

        /* dv_j += P_j dO, dk_j += dS_j q_0, dq_0 += sum_j dS_j k_j */
        for (j = 0; j < T; j++) {
            const float *k = q + (size_t)j * 3 * C + C;
            float *dk = dq + (size_t)j * 3 * C + C, *dv = dk + C;
            if (!keep[j]) continue;
            for (d = 0; d < HS; d++) {
                dv[d] += p[j] * dy[d];
                dk[d] += ds[j] * q[d];
                dq[d] += ds[j] * k[d];
            }
        }
    }
}

/* ---- embeddings ---- */

CODIR_DEF void codir_embedding_forward(float *out, const int *ids, const int *types, const float *tok,
                                       const float *pos, const float *type, int B, int T, int C)
{
    int bt;
    CODIR__OMP_FOR((double)B * T * C)
    for (bt = 0; bt < B * T; bt++) {
        int t = bt % T, c;
        const float *te = tok + (size_t)ids[bt] * C;
        const float *pe = pos + (size_t)t * C;
        const float *ye = type + (size_t)(types ? types[bt] : 0) * C;
        float *o = out + (size_t)bt * C;
        for (c = 0; c < C; c++) o[c] = te[c] + pe[c] + ye[c];
    }
}

/* 1 if row a sorts after row b: by key, then by row index. */
static int codir__sorts_after(const int *key, int a, int b)
{
    return key[a] > key[b] || (key[a] == key[b] && a > b);
}

static void codir__sift_down(int *order, const int *key, int root, int n)
{
    for (;;) {
        int child = 2 * root + 1, largest = root, tmp;
        if (child < n && codir__sorts_after(key, order[child], order[largest])) largest = child;
        if (child + 1 < n && codir__sorts_after(key, order[child + 1], order[largest])) largest = child + 1;
        if (largest == root) return;
        tmp = order[root];
        order[root] = order[largest];
        order[largest] = tmp;
        root = largest;
    }
}

/* Heap-sorts the row indices 0..n-1 by key so that equal keys are adjacent, in
   O(n log n) time and no extra memory. */
static void codir__sort_by_id(int *order, const int *key, int n)
{
    int i, end;
    for (i = 0; i < n; i++) order[i] = i;
    for (i = n / 2 - 1; i >= 0; i--) codir__sift_down(order, key, i, n);
    for (end = n - 1; end > 0; end--) {
        int tmp = order[0];
        order[0] = order[end];
        order[end] = tmp;
        codir__sift_down(order, key, 0, end);
    }
}

/* Adds the rows dout[order[lo..hi-1]] into row, then row into dst once. */
static void codir__add_row_group(float *dst, float *row, const float *dout, const int *order, int lo, int hi, int C)
{
    int i, c;
    for (c = 0; c < C; c++) row[c] = 0.0f;
    for (i = lo; i < hi; i++)
        for (c = 0; c < C; c++) row[c] += dout[(size_t)order[i] * C + c];
    for (c = 0; c < C; c++) dst[c] += row[c];
}

CODIR_DEF void codir_embedding_backward(float *dtok, float *dpos, float *dtype, const float *dout,
                                        const int *ids, const int *types, int B, int T, int C,
                                        int *order, float *row)
{
    int n = B * T, lo, hi, t, b;
    if (dtok) {
        codir__sort_by_id(order, ids, n);
        for (lo = 0; lo < n; lo = hi) {
            for (hi = lo + 1; hi < n && ids[order[hi]] == ids[order[lo]]; hi++) {}
            codir__add_row_group(dtok + (size_t)ids[order[lo]] * C, row, dout, order, lo, hi, C);
        }
    }
    if (dpos) {
        for (t = 0; t < T; t++) {
            for (b = 0; b < B; b++) order[b] = b * T + t;
            codir__add_row_group(dpos + (size_t)t * C, row, dout, order, 0, B, C);
        }
    }
    if (dtype) {
        if (types) {
            codir__sort_by_id(order, types, n);
        } else {
            for (lo = 0; lo < n; lo++) order[lo] = lo;
        }
        for (lo = 0; lo < n; lo = hi) {
            int id = types ? types[order[lo]] : 0;
            for (hi = lo + 1; hi < n && (types ? types[order[hi]] : 0) == id; hi++) {}
            codir__add_row_group(dtype + (size_t)id * C, row, dout, order, lo, hi, C);
        }
    }
}

/* ---- dropout ---- */

/* Counter-based random bits: a SplitMix64 finalizer of (key, i). Nothing is carried
   between elements, so any thread can compute any element's mask bit. */
CODIR__INLINE uint64_t codir__hash64(uint64_t key, uint64_t i)
{
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Element i is kept when its 24 random bits, as a fraction of 2^24, are >= p, that is
   when the bits are >= ceil(p * 2^24), the threshold below (p * 2^24 is exact in
   double). */
static uint64_t codir__dropout_threshold(float p) { return (uint64_t)ceil((double)p * 16777216.0); }

/* The two loops below run on blocks of CODIR__VEC_BLOCK elements starting at `first`,
   vectorized like the GELU loops (the hash needs 64-bit lanes). */
CODIR__INLINE void codir__dropout_forward_loop(float *out, const float *inp, size_t first, size_t n, float scale,
                                               uint64_t threshold, uint64_t key)
{
    size_t i;
    CODIR__OMP_SIMD
    for (i = 0; i < n; i++) out[i] = (codir__hash64(key, first + i) >> 40) >= threshold ? inp[i] * scale : 0.0f;
}

CODIR__INLINE void codir__dropout_backward_loop(float *dinp, const float *dout, size_t first, size_t n, float scale,
                                                uint64_t threshold, uint64_t key)
{
    size_t i;
    CODIR__OMP_SIMD
    for (i = 0; i < n; i++) dinp[i] += (codir__hash64(key, first + i) >> 40) >= threshold ? dout[i] * scale : 0.0f;
}

CODIR__VEC_VERSIONS(codir__dropout_forward,
                    (float *out, const float *inp, size_t first, size_t n, float scale, uint64_t threshold,
                     uint64_t key),
                    (out, inp, first, n, scale, threshold, key))
CODIR__VEC_VERSIONS(codir__dropout_backward,
                    (float *dinp, const float *dout, size_t first, size_t n, float scale, uint64_t threshold,
                     uint64_t key),
                    (dinp, dout, first, n, scale, threshold, key))

CODIR_DEF void codir_dropout_forward(float *out, const float *inp, size_t n, float p, uint64_t key)
{
    float scale = 1.0f / (1.0f - p);
    uint64_t threshold = codir__dropout_threshold(p);
    long block, blocks = (long)((n + CODIR__VEC_BLOCK - 1) / CODIR__VEC_BLOCK);
    CODIR__OMP_FOR(4 * n)
    for (block = 0; block < blocks; block++) {
        size_t lo = (size_t)block * CODIR__VEC_BLOCK;
        codir__dropout_forward(out + lo, inp + lo, lo, n - lo < CODIR__VEC_BLOCK ? n - lo : CODIR__VEC_BLOCK, scale,
                               threshold, key);
    }
}

CODIR_DEF void codir_dropout_backward(float *dinp, const float *dout, size_t n, float p, uint64_t key)
{
    float scale = 1.0f / (1.0f - p);
    uint64_t threshold = codir__dropout_threshold(p);
    long block, blocks = (long)((n + CODIR__VEC_BLOCK - 1) / CODIR__VEC_BLOCK);
    CODIR__OMP_FOR(4 * n)
    for (block = 0; block < blocks; block++) {
        size_t lo = (size_t)block * CODIR__VEC_BLOCK;
        codir__dropout_backward(dinp + lo, dout + lo, lo, n - lo < CODIR__VEC_BLOCK ? n - lo : CODIR__VEC_BLOCK, scale,
                                threshold, key);
    }
}

/* ---- pooling and concatenation ---- */

CODIR_DEF void codir_select_first_forward(float *out, const float *inp, int B, int T, int C)
{
    int b;
    for (b = 0; b < B; b++) memcpy(out + (size_t)b * C, inp + (size_t)b * T * C, (size_t)C * sizeof(float));
}

CODIR_DEF void codir_select_first_backward(float *dinp, const float *dout, int B, int T, int C)
{
    int b, c;
    for (b = 0; b < B; b++)
        for (c = 0; c < C; c++) dinp[(size_t)b * T * C + c] += dout[(size_t)b * C + c];
}

/* Returns the number of non-padding tokens in mask[T]. */
static int codir__count_tokens(const int *mask, int T)
{
    int t, n = 0;
    for (t = 0; t < T; t++) n += mask[t] != 0;
    return n;
}

CODIR_DEF void codir_mean_pool_forward(float *out, const float *inp, const int *mask, int B, int T, int C)
{
    int b;
    CODIR__OMP_FOR((double)B * T * C)
    for (b = 0; b < B; b++) {
        int n = codir__count_tokens(mask + (size_t)b * T, T), t, c;
        float *o = out + (size_t)b * C;
        for (c = 0; c < C; c++) o[c] = 0.0f;
        if (n == 0) continue;
        for (t = 0; t < T; t++) {
            const float *x = inp + ((size_t)b * T + t) * C;
            if (!mask[(size_t)b * T + t]) continue;
            for (c = 0; c < C; c++) o[c] += x[c];
        }
        for (c = 0; c < C; c++) o[c] /= (float)n;
    }
}

CODIR_DEF void codir_mean_pool_backward(float *dinp, const float *dout, const int *mask, int B, int T, int C)
{
    int b;
    CODIR__OMP_FOR((double)B * T * C)
    for (b = 0; b < B; b++) {
        int n = codir__count_tokens(mask + (size_t)b * T, T), t, c;
        if (n == 0) continue;
        for (t = 0; t < T; t++) {
            float *dx = dinp + ((size_t)b * T + t) * C;
            if (!mask[(size_t)b * T + t]) continue;
            for (c = 0; c < C; c++) dx[c] += dout[(size_t)b * C + c] / (float)n;
        }
    }
}

CODIR_DEF void codir_gather_rows_forward(float *out, const float *inp, const int *rows, int P, int C)
{
    int p;
    for (p = 0; p < P; p++) memcpy(out + (size_t)p * C, inp + (size_t)rows[p] * C, (size_t)C * sizeof(float));
}

CODIR_DEF void codir_gather_rows_backward(float *dinp, const float *dout, const int *rows, int P, int C)
{
    int p, c;
    for (p = 0; p < P; p++)
        for (c = 0; c < C; c++) dinp[(size_t)rows[p] * C + c] += dout[(size_t)p * C + c];
}

CODIR_DEF void codir_concat_forward(float *out, const float *const *inps, const int *widths, int count, int N)
{
    int total = 0, i, r, off;
    for (i = 0; i < count; i++) total += widths[i];
    for (r = 0; r < N; r++) {
        for (i = 0, off = 0; i < count; off += widths[i], i++)
            memcpy(out + (size_t)r * total + off, inps[i] + (size_t)r * widths[i], (size_t)widths[i] * sizeof(float));
    }
}

CODIR_DEF void codir_concat_backward(float *const *dinps, const float *dout, const int *widths, int count, int N)
{
    int total = 0, i, r, c, off;
    for (i = 0; i < count; i++) total += widths[i];
    for (r = 0; r < N; r++) {
        for (i = 0, off = 0; i < count; off += widths[i], i++) {
            if (!dinps[i]) continue;
            for (c = 0; c < widths[i]; c++) dinps[i][(size_t)r * widths[i] + c] += dout[(size_t)r * total + off + c];
        }
    }
}

/* ---- L2 normalization ---- */

CODIR_DEF void codir_l2_normalize_forward(float *out, float *norm, const float *inp, int N, int C, float eps)
{
    int i, c;
    for (i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C;
        double ss = 0.0;
        float nrm, d;
        for (c = 0; c < C; c++) ss += (double)x[c] * x[c];
        nrm = (float)sqrt(ss);
        d = nrm > eps ? nrm : eps;
        for (c = 0; c < C; c++) out[(size_t)i * C + c] = x[c] / d;
        if (norm) norm[i] = nrm;
    }
}

CODIR_DEF void codir_l2_normalize_backward(float *dinp, const float *dout, const float *out,
                                           const float *norm, int N, int C, float eps)
{
    int i, c;
    for (i = 0; i < N; i++) {
        const float *y = out + (size_t)i * C;
        const float *dy = dout + (size_t)i * C;
        float *dx = dinp + (size_t)i * C;
        if (norm[i] > eps) {
            /* y = x / |x|: dx = (dy - y <y, dy>) / |x| */
            double dot = 0.0;
            for (c = 0; c < C; c++) dot += (double)y[c] * dy[c];
            for (c = 0; c < C; c++) dx[c] += (dy[c] - y[c] * (float)dot) / norm[i];
        } else {
            /* y = x / eps is linear below the clamp */
            for (c = 0; c < C; c++) dx[c] += dy[c] / eps;
        }
    }
}

/* ---- losses ---- */

/* Writes log_softmax(x[V] / temperature) to out[V] and returns nothing; the
   maximum is subtracted before exp so no term overflows. */
static void codir__log_softmax(float *out, const float *x, int V, float temperature)
{
    float mx = -INFINITY;
    double sum = 0.0, lse;
    int v;
    for (v = 0; v < V; v++) mx = x[v] / temperature > mx ? x[v] / temperature : mx;
    for (v = 0; v < V; v++) sum += exp((double)(x[v] / temperature - mx));
    lse = mx + log(sum);
    for (v = 0; v < V; v++) out[v] = (float)(x[v] / temperature - lse);
}

CODIR_DEF double codir_cross_entropy_forward(float *probs, const float *logits, const int *targets, int N, int V)
{
    double total = 0.0;
    int i, v;
    for (i = 0; i < N; i++) {
        float *p = probs + (size_t)i * V;
        codir__log_softmax(p, logits + (size_t)i * V, V, 1.0f);
        total -= p[targets[i]];
        for (v = 0; v < V; v++) p[v] = expf(p[v]);
    }
    return N > 0 ? total / N : 0.0;
}

CODIR_DEF void codir_cross_entropy_backward(float *dlogits, const float *probs, const int *targets,
                                            float dloss, int N, int V)
{
    float scale = dloss / (float)N;
    int i, v;
    for (i = 0; i < N; i++)
        for (v = 0; v < V; v++)
            dlogits[(size_t)i * V + v] += scale * (probs[(size_t)i * V + v] - (v == targets[i] ? 1.0f : 0.0f));
}

CODIR_DEF double codir_mse_forward(const float *pred, const float *target, int n)
{
    double total = 0.0;
    int i;
    for (i = 0; i < n; i++) total += ((double)pred[i] - target[i]) * ((double)pred[i] - target[i]);
    return n > 0 ? total / n : 0.0;
}

CODIR_DEF void codir_mse_backward(float *dpred, const float *pred, const float *target, float dloss, int n)
{
    int i;
    for (i = 0; i < n; i++) dpred[i] += dloss * 2.0f * (pred[i] - target[i]) / (float)n;
}

CODIR_DEF double codir_kl_div_forward(float *ps, float *pt, const float *student, const float *teacher,
                                      int N, int V, float temperature)
{
    double total = 0.0;
    int i, v;
    for (i = 0; i < N; i++) {
        float *s = ps + (size_t)i * V;
        float *t = pt + (size_t)i * V;
        codir__log_softmax(s, student + (size_t)i * V, V, temperature);
        codir__log_softmax(t, teacher + (size_t)i * V, V, temperature);

        /* KL(p_t || p_s) = sum p_t (log p_t - log p_s); 0 log 0 counts as 0 */
        for (v = 0; v < V; v++) {
            double lt = t[v], ls = s[v];
            if (lt > -INFINITY) total += exp(lt) * (lt - ls);
            s[v] = (float)exp(ls);
            t[v] = (float)exp(lt);
        }
    }
    return N > 0 ? (double)temperature * temperature * total / N : 0.0;
}

CODIR_DEF void codir_kl_div_backward(float *dstudent, const float *ps, const float *pt, float dloss,
                                     int N, int V, float temperature)
{
    /* d/ds [T^2 KL] = T^2 * (p_s - p_t) / T for logits scaled by 1/T */
    float scale = dloss * temperature / (float)N;
    size_t i, n = (size_t)N * V;
    for (i = 0; i < n; i++) dstudent[i] += scale * (ps[i] - pt[i]);
}

/* log(1 + exp(x)) without overflow for large x or loss of precision for small. */
static double codir__softplus(double x)
{
    return (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x)));
}

static double codir__sigmoid(double x)
{
    return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
}

CODIR_DEF double codir_nce_forward(float *logp, const float *anchor, const float *bank, const int *idx, int B,
                                   int D, int K, float tau, double log_z, double log_c)
{
    double total = 0.0;
    int b, j, d;
    for (b = 0; b < B; b++) {
        const float *a = anchor + (size_t)b * D;
        for (j = 0; j <= K; j++) {
            const float *row = bank + (size_t)idx[(size_t)b * (K + 1) + j] * D;
            double dot = 0.0, lp;
            for (d = 0; d < D; d++) dot += (double)a[d] * row[d];
            lp = dot / tau - log_z;
            logp[(size_t)b * (K + 1) + j] = (float)lp;

            /* positive: -log(P / (P + c)); negative: -log(c / (P + c)) */
            total += j == 0 ? codir__softplus(log_c - lp) : codir__softplus(lp - log_c);
        }
    }
    return B > 0 ? total / B : 0.0;
}

CODIR_DEF void codir_nce_backward(float *danchor, const float *logp, const float *bank, const int *idx,
                                  float dloss, int B, int D, int K, float tau, double log_c)
{
    int b, j, d;
    for (b = 0; b < B; b++) {
        for (j = 0; j <= K; j++) {
            double lp = logp[(size_t)b * (K + 1) + j];
            /* d softplus(log c - lp) / d lp = -sigmoid(log c - lp); d softplus(lp - log c) / d lp = sigmoid(lp - log c) */
            double g = j == 0 ? -codir__sigmoid(log_c - lp) : codir__sigmoid(lp - log_c);
            const float *row = bank + (size_t)idx[(size_t)b * (K + 1) + j] * D;
            float scale = (float)(g * dloss / ((double)B * tau));
            for (d = 0; d < D; d++) danchor[(size_t)b * D + d] += scale * row[d];
        }
    }
}

CODIR_DEF double codir_nce_log_normalizer(const float *anchor, const float *bank, const int *idx, int B, int D,
                                          int K, float tau, int N)
{
    double mx = -INFINITY, sum = 0.0;
    int b, j, d, pass;
    /* Two passes: the maximum, then the sum of exp(x - max). */
    for (pass = 0; pass < 2; pass++)
        for (b = 0; b < B; b++)
            for (j = 0; j <= K; j++) {
                const float *row = bank + (size_t)idx[(size_t)b * (K + 1) + j] * D;
                double dot = 0.0, x;
                for (d = 0; d < D; d++) dot += (double)anchor[(size_t)b * D + d] * row[d];
                x = dot / tau;
                if (pass == 0) mx = x > mx ? x : mx;
                else sum += exp(x - mx);
            }
    return log((double)N) + mx + log(sum / ((double)B * (K + 1)));
}

/* Returns row j of the candidates of example b: zt[b] for j = 0, a bank row after. */
static const float *codir__infonce_candidate(const float *zt, const float *bank, const int *neg, int b, int j,
                                              int D, int K)
{
    if (j == 0) return zt + (size_t)b * D;
    return bank + (size_t)neg[(size_t)b * K + j - 1] * D;
}

CODIR_DEF double codir_infonce_forward(float *probs, const float *zs, const float *zt, const float *bank,
                                       const int *neg, int B, int D, int K, float tau)
{
    double total = 0.0;
    int b, j, d;
    for (b = 0; b < B; b++) {
        const float *anchor = zs + (size_t)b * D;
        float *x = probs + (size_t)b * (K + 1);
        float mx = -INFINITY;
        double sum = 0.0, lse;

        /* x_j = <zs_b, candidate_j> / tau */
        for (j = 0; j <= K; j++) {
            const float *cand = codir__infonce_candidate(zt, bank, neg, b, j, D, K);
            double dot = 0.0;
            for (d = 0; d < D; d++) dot += (double)anchor[d] * cand[d];
            x[j] = (float)(dot / tau);
            mx = x[j] > mx ? x[j] : mx;
        }

        /* loss_b = logsumexp(x) - x_0, with the maximum taken out of the exponent */
        for (j = 0; j <= K; j++) sum += exp((double)x[j] - mx);
        lse = mx + log(sum);
        total += lse - x[0];
        for (j = 0; j <= K; j++) x[j] = (float)exp((double)x[j] - lse);
    }
    return B > 0 ? total / B : 0.0;
}

CODIR_DEF void codir_infonce_backward(float *dzs, float *dzt, const float *probs, const float *zs,
                                      const float *zt, const float *bank, const int *neg, float dloss,
                                      int B, int D, int K, float tau)
{
    int b, j, d;
    for (b = 0; b < B; b++) {
        const float *p = probs + (size_t)b * (K + 1);
        for (j = 0; j <= K; j++) {
            /* dL/dx_j = (p_j - [j == 0]) / B, and x_j = <zs, cand_j> / tau */
            float g = dloss * (p[j] - (j == 0 ? 1.0f : 0.0f)) / ((float)B * tau);
            const float *cand = codir__infonce_candidate(zt, bank, neg, b, j, D, K);
            if (dzs)
                for (d = 0; d < D; d++) dzs[(size_t)b * D + d] += g * cand[d];
            if (dzt && j == 0)
                for (d = 0; d < D; d++) dzt[(size_t)b * D + d] += g * zs[(size_t)b * D + d];
        }
    }
}

/* ---- GEMM ----

   codir_gemm follows the GotoBLAS/BLIS design (Goto and van de Geijn, "Anatomy of
   High-Performance Matrix Multiplication", ACM TOMS 34(3), 2008; Van Zee and van de
   Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS Functionality", ACM TOMS
   41(3), 2015). Five loops around one micro-kernel:

       for jc in 0..n step NC               columns of C and op(B)
         for pc in 0..k step KC             the shared dimension, always in order
           pack op(B)[pc:pc+KC, jc:jc+NC] into B~
           for ic in 0..m step MC           rows of C and op(A)
             pack op(A)[ic:ic+MC, pc:pc+KC] into A~
             for jr in 0..NC step NR        macro-kernel
               for ir in 0..MC step MR
                 C[ir:ir+MR, jr:jr+NR] = alpha * A~ panel * B~ panel + beta' * C tile

   beta' is beta on the first KC block and 1 after it, so beta = 0 never reads C.
   Packing pads the edges of A~ and B~ with zeros, so the micro-kernel always computes
   a full MR x NR tile. On edge tiles the macro-kernel runs it on a local MR x NR tile
   and copies only the valid rows and columns in and out, so the same instructions
   compute every element of C, and a value outside the m x n part of C is never
   touched.

   Cache use, as in BLIS: one KC x NR panel of B~ is reused by every MR-panel of A~ in
   the jr iteration, so it stays in L1 (or in L2 for the 64 KiB AVX-512 panel); the
   MC x KC block A~ is reread once per NR columns from L2; the KC x NC panel B~ is
   read once per MC rows from L3. NC is large so that A is packed only once for the
   products of a BERT-sized layer.

   Packed layouts, shown for MR = 3, NR = 4 and KC = 2. A~ holds MC/MR panels of MR
   rows; inside a panel, the MR values of one column of op(A) are contiguous. B~ holds
   NC/NR panels of NR columns; inside a panel, the NR values of one row of op(B) are
   contiguous. Letters are matrix elements, 0 is zero padding (here m = 5, n = 7).

       op(A) rows 0..4           A~ (panel after panel, column after column)
         a00 a01                 | a00 a10 a20  a01 a11 a21 | a30 a40 0  a31 a41 0 |
         a10 a11                   panel 0: rows 0..2         panel 1: rows 3..4, padded
         a20 a21
         a30 a31
         a40 a41

       op(B) columns 0..6        B~ (panel after panel, row after row)
         b00 b01 b02 b03 b04 b05 b06
         b10 b11 b12 b13 b14 b15 b16
                                 | b00 b01 b02 b03  b10 b11 b12 b13 | b04 b05 b06 0  b14 b15 b16 0 |
                                   panel 0: columns 0..3              panel 1: columns 4..6, padded

   The micro-kernel reads one MR-column of A~ and one NR-row of B~ per step of k and
   adds their outer product to MR x NR accumulators kept in registers.

   Threads: each thread of one parallel region runs these loops on its own rows of C
   (or on its own columns, when n is larger than m or m has too few MR-panels), with
   its own A~ buffer. With the rows split, every thread reads all of op(B), so the
   team packs each KC x NC block of B~ once, into one buffer, each thread a share of
   its panels between two barriers. Packing it once per thread had doubled the
   packing of a 2-thread CoDIR step (4.3% of its samples, against 2.2% shared).
   NOTE: each barrier stalls the team while the OS deschedules one of its threads, as
   happens when another process keeps a core busy. With the columns split, each thread
   packs its own A~ and B~ and never waits for the others.
   Every element of C is computed by one thread with the same sequence of operations
   whatever the thread count, so results are bit-identical for any number of threads.
   KC depends only on k for the same reason. */


/* Blocking constants, one set per micro-kernel:
       MR x NR   register tile of C
       KC        depth of one block (each kernel call reads a KC x NR panel of B~)
       MC        rows of the A~ block, MC x KC floats, meant to stay in L2
       NC        columns of the B~ panel, KC x NC floats, meant to stay in L3
   MC is a multiple of MR and NC a multiple of NR. The AVX-512 values were tuned with
   examples/bench_gemm.c on an AMD EPYC Zen 4 (32 KiB L1d and 1 MiB L2 per core,
   32 MiB L3): A~ is 144 KiB, B~ 4 MiB. The AVX2 values reuse them with the 6 x 16 tile
   (a 16 KiB panel of B~ fits L1). The NEON values are the common 8 x 12 shape with
   block sizes of the same order, untuned. */
#define CODIR__GEMM_AVX512_MR 6
#define CODIR__GEMM_AVX512_NR 64
#define CODIR__GEMM_AVX512_MC 144
#define CODIR__GEMM_AVX512_KC 256
#define CODIR__GEMM_AVX512_NC 4096

#define CODIR__GEMM_AVX2_MR 6
#define CODIR__GEMM_AVX2_NR 16
#define CODIR__GEMM_AVX2_MC 144
#define CODIR__GEMM_AVX2_KC 256
#define CODIR__GEMM_AVX2_NC 4096

/* NOTE: the NEON block sizes are guesses, not tuned on AArch64 hardware. */
#define CODIR__GEMM_NEON_MR 8
#define CODIR__GEMM_NEON_NR 12
#define CODIR__GEMM_NEON_MC 128
#define CODIR__GEMM_NEON_KC 256
#define CODIR__GEMM_NEON_NC 3072

#define CODIR__GEMM_SCALAR_MR 4
#define CODIR__GEMM_SCALAR_NR 8
#define CODIR__GEMM_SCALAR_MC 128
#define CODIR__GEMM_SCALAR_KC 256
#define CODIR__GEMM_SCALAR_NC 2048

/* Largest MR * NR over all kernels: the size of the local tile used on edges. */
#define CODIR__GEMM_TILE_MAX 384

/* Byte alignment of the packed buffers: one cache line, and one AVX-512 vector. */
#define CODIR__GEMM_ALIGN 64

/* Products with fewer multiply-adds than this run on one thread, because starting a
   parallel region costs more than it saves. */
#define CODIR__GEMM_MIN_PARALLEL_FMAS (64.0 * 64.0 * 64.0)

/* A micro-kernel computes one MR x NR tile of C:
       C[i,j] = alpha * sum_p a[p*MR + i] * b[p*NR + j] + beta * C[i,j]    (p < kc)
   with a an MR x kc panel of A~, b a kc x NR panel of B~ and C[i,j] at c[i*ldc + j].
   beta = 0 stores without reading C. kc >= 1. */
typedef void (*codir__gemm_kernel_fn)(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                                      float alpha, float beta);

typedef struct codir__gemm_kernel {
    const char *name;
    codir__gemm_kernel_fn run;
    int mr, nr;      /* register tile of C */
    int mc, kc, nc;  /* block sizes of A~ (mc x kc) and B~ (kc x nc) */
} codir__gemm_kernel;

/* ---- GEMM: reference ---- */

/* Returns the minimum leading dimension of a stored matrix with `cols` columns. */
static int codir__gemm_min_ld(int cols) { return cols > 1 ? cols : 1; }

CODIR_DEF void codir_gemm_ref(int trans_a, int trans_b, int m, int n, int k, float alpha,
                              const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    int i, j, p;
    if ((trans_a != 0 && trans_a != 1) || (trans_b != 0 && trans_b != 1)) return;
    if (m < 0 || n < 0 || k < 0) return;
    if (lda < codir__gemm_min_ld(trans_a ? m : k) || ldb < codir__gemm_min_ld(trans_b ? k : n) ||
        ldc < codir__gemm_min_ld(n))
        return;
    if (m == 0 || n == 0 || !c) return;
    if (alpha != 0.0f && k > 0 && (!a || !b)) return;

    for (i = 0; i < m; i++) {
        float *c_row = c + (size_t)i * (size_t)ldc;
        for (j = 0; j < n; j++) {
            double sum = 0.0, out;

            /* alpha = 0 reads neither A nor B, as in BLAS. */
            if (alpha != 0.0f) {
                for (p = 0; p < k; p++) {
                    float a_ip = trans_a ? a[(size_t)p * (size_t)lda + (size_t)i] : a[(size_t)i * (size_t)lda + (size_t)p];
                    float b_pj = trans_b ? b[(size_t)j * (size_t)ldb + (size_t)p] : b[(size_t)p * (size_t)ldb + (size_t)j];
                    sum += (double)a_ip * (double)b_pj;
                }
            }

            /* beta = 0 overwrites C without reading it, so NaN in C does not leak. */
            out = (double)alpha * sum;
            if (beta != 0.0f) out += (double)beta * (double)c_row[j];
            c_row[j] = (float)out;
        }
    }
}

/* ---- GEMM: micro-kernels ---- */

/* Portable kernel, MR x NR = 4 x 8. Compilers usually vectorize the j loops. */
static void codir__gemm_kernel_scalar(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                                      float alpha, float beta)
{
    enum { MR = CODIR__GEMM_SCALAR_MR, NR = CODIR__GEMM_SCALAR_NR };
    float acc[MR][NR];
    int i, j, p;

    memset(acc, 0, sizeof acc);
    for (p = 0; p < kc; p++) {
        const float *a_p = a + (size_t)p * MR;
        const float *b_p = b + (size_t)p * NR;
        for (i = 0; i < MR; i++) {
            for (j = 0; j < NR; j++) acc[i][j] += a_p[i] * b_p[j];
        }
    }

    for (i = 0; i < MR; i++) {
        float *c_row = c + i * ldc;
        for (j = 0; j < NR; j++) {
            float out = alpha * acc[i][j];
            if (beta != 0.0f) out += beta * c_row[j];
            c_row[j] = out;
        }
    }
}

#ifdef CODIR__SIMD_AVX512
/* AVX-512F kernel, MR x NR = 6 x 64: 24 zmm accumulators (6 rows of 4 vectors), 4 zmm
   for a row of B~ and 1 for the broadcast element of A~, out of 32 registers. */

/* Adds row i of the outer product: broadcast a[i], multiply-add with the 4 B vectors. */
#define CODIR__AVX512_FMA_ROW(i)                                 \
    do {                                                         \
        __m512 a_i = _mm512_set1_ps(a[i]);                       \
        acc##i##0 = _mm512_fmadd_ps(a_i, b0, acc##i##0);         \
        acc##i##1 = _mm512_fmadd_ps(a_i, b1, acc##i##1);         \
        acc##i##2 = _mm512_fmadd_ps(a_i, b2, acc##i##2);         \
        acc##i##3 = _mm512_fmadd_ps(a_i, b3, acc##i##3);         \
    } while (0)

/* Stores row i of the tile as alpha * acc (+ beta * C when beta != 0). */
#define CODIR__AVX512_STORE_ROW(i)                                                            \
    do {                                                                                      \
        float *c_i = c + (i) * ldc;                                                           \
        __m512 out0 = _mm512_mul_ps(alpha_v, acc##i##0);                                      \
        __m512 out1 = _mm512_mul_ps(alpha_v, acc##i##1);                                      \
        __m512 out2 = _mm512_mul_ps(alpha_v, acc##i##2);                                      \
        __m512 out3 = _mm512_mul_ps(alpha_v, acc##i##3);                                      \
        if (beta != 0.0f) {                                                                   \
            out0 = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(c_i), out0);                       \
            out1 = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(c_i + 16), out1);                  \
            out2 = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(c_i + 32), out2);                  \
            out3 = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(c_i + 48), out3);                  \
        }                                                                                     \
        _mm512_storeu_ps(c_i, out0);                                                          \
        _mm512_storeu_ps(c_i + 16, out1);                                                     \
        _mm512_storeu_ps(c_i + 32, out2);                                                     \
        _mm512_storeu_ps(c_i + 48, out3);                                                     \
    } while (0)

CODIR__SIMD_TARGET_AVX512
static void codir__gemm_kernel_avx512(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                                      float alpha, float beta)
{
    __m512 acc00 = _mm512_setzero_ps(), acc01 = acc00, acc02 = acc00, acc03 = acc00;
    __m512 acc10 = acc00, acc11 = acc00, acc12 = acc00, acc13 = acc00;
    __m512 acc20 = acc00, acc21 = acc00, acc22 = acc00, acc23 = acc00;
    __m512 acc30 = acc00, acc31 = acc00, acc32 = acc00, acc33 = acc00;
    __m512 acc40 = acc00, acc41 = acc00, acc42 = acc00, acc43 = acc00;
    __m512 acc50 = acc00, acc51 = acc00, acc52 = acc00, acc53 = acc00;
    __m512 alpha_v, beta_v;
    int p, i;

    /* Start loading the C tile now: its rows are far apart, so the hardware prefetcher
       does not fetch them, and a miss at the stores would stall the kernel. */
    for (i = 0; i < CODIR__GEMM_AVX512_MR; i++) {
        const char *c_i = (const char *)(c + i * ldc);
        _mm_prefetch(c_i, _MM_HINT_T0);
        _mm_prefetch(c_i + 64, _MM_HINT_T0);
        _mm_prefetch(c_i + 128, _MM_HINT_T0);
        _mm_prefetch(c_i + 192, _MM_HINT_T0);
        _mm_prefetch(c_i + 255, _MM_HINT_T0);
    }

    for (p = 0; p < kc; p++) {
        __m512 b0 = _mm512_loadu_ps(b);
        __m512 b1 = _mm512_loadu_ps(b + 16);
        __m512 b2 = _mm512_loadu_ps(b + 32);
        __m512 b3 = _mm512_loadu_ps(b + 48);
        CODIR__AVX512_FMA_ROW(0);
        CODIR__AVX512_FMA_ROW(1);
        CODIR__AVX512_FMA_ROW(2);
        CODIR__AVX512_FMA_ROW(3);
        CODIR__AVX512_FMA_ROW(4);
        CODIR__AVX512_FMA_ROW(5);
        a += CODIR__GEMM_AVX512_MR;
        b += CODIR__GEMM_AVX512_NR;
    }

    alpha_v = _mm512_set1_ps(alpha);
    beta_v = _mm512_set1_ps(beta);
    CODIR__AVX512_STORE_ROW(0);
    CODIR__AVX512_STORE_ROW(1);
    CODIR__AVX512_STORE_ROW(2);
    CODIR__AVX512_STORE_ROW(3);
    CODIR__AVX512_STORE_ROW(4);
    CODIR__AVX512_STORE_ROW(5);
}
#undef CODIR__AVX512_FMA_ROW
#undef CODIR__AVX512_STORE_ROW
#endif /* CODIR__SIMD_AVX512 */

#ifdef CODIR__SIMD_AVX2
/* AVX2 + FMA kernel, MR x NR = 6 x 16: 12 ymm accumulators, 2 for a row of B~ and 1 for
   the broadcast element of A~, out of 16 registers. */

#define CODIR__AVX2_FMA_ROW(i)                                   \
    do {                                                         \
        __m256 a_i = _mm256_broadcast_ss(a + (i));               \
        acc##i##0 = _mm256_fmadd_ps(a_i, b0, acc##i##0);         \
        acc##i##1 = _mm256_fmadd_ps(a_i, b1, acc##i##1);         \
    } while (0)

#define CODIR__AVX2_STORE_ROW(i)                                                              \
    do {                                                                                      \
        float *c_i = c + (i) * ldc;                                                           \
        __m256 out0 = _mm256_mul_ps(alpha_v, acc##i##0);                                      \
        __m256 out1 = _mm256_mul_ps(alpha_v, acc##i##1);                                      \
        if (beta != 0.0f) {                                                                   \
            out0 = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(c_i), out0);                       \
            out1 = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(c_i + 8), out1);                   \
        }                                                                                     \
        _mm256_storeu_ps(c_i, out0);                                                          \
        _mm256_storeu_ps(c_i + 8, out1);                                                      \
    } while (0)

CODIR__SIMD_TARGET_AVX2
static void codir__gemm_kernel_avx2(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                                    float alpha, float beta)
{
    __m256 acc00 = _mm256_setzero_ps(), acc01 = acc00;
    __m256 acc10 = acc00, acc11 = acc00;
    __m256 acc20 = acc00, acc21 = acc00;
    __m256 acc30 = acc00, acc31 = acc00;
    __m256 acc40 = acc00, acc41 = acc00;
    __m256 acc50 = acc00, acc51 = acc00;
    __m256 alpha_v, beta_v;
    int p, i;

    /* Start loading the C tile now, as in the AVX-512 kernel. */
    for (i = 0; i < CODIR__GEMM_AVX2_MR; i++) {
        const char *c_i = (const char *)(c + i * ldc);
        _mm_prefetch(c_i, _MM_HINT_T0);
        _mm_prefetch(c_i + 63, _MM_HINT_T0);
    }

    for (p = 0; p < kc; p++) {
        __m256 b0 = _mm256_loadu_ps(b);
        __m256 b1 = _mm256_loadu_ps(b + 8);
        CODIR__AVX2_FMA_ROW(0);
        CODIR__AVX2_FMA_ROW(1);
        CODIR__AVX2_FMA_ROW(2);
        CODIR__AVX2_FMA_ROW(3);
        CODIR__AVX2_FMA_ROW(4);
        CODIR__AVX2_FMA_ROW(5);
        a += CODIR__GEMM_AVX2_MR;
        b += CODIR__GEMM_AVX2_NR;
    }

    alpha_v = _mm256_set1_ps(alpha);
    beta_v = _mm256_set1_ps(beta);
    CODIR__AVX2_STORE_ROW(0);
    CODIR__AVX2_STORE_ROW(1);
    CODIR__AVX2_STORE_ROW(2);
    CODIR__AVX2_STORE_ROW(3);
    CODIR__AVX2_STORE_ROW(4);
    CODIR__AVX2_STORE_ROW(5);
}
#undef CODIR__AVX2_FMA_ROW
#undef CODIR__AVX2_STORE_ROW
#endif /* CODIR__SIMD_AVX2 */

#ifdef CODIR__SIMD_NEON
/* AArch64 NEON kernel, MR x NR = 8 x 12: 24 q-register accumulators, 3 for a row of B~
   and 2 holding the 8 elements of A~, out of 32 registers. Each multiply-add takes its
   A element from a vector lane (vfmaq_laneq_f32), which saves the broadcasts.
   NOTE: run only under QEMU user-mode emulation (the test suite passes there), never
   timed on AArch64 hardware. */

#define CODIR__NEON_FMA_ROW(i, a_vec, lane)                               \
    do {                                                                  \
        acc##i##0 = vfmaq_laneq_f32(acc##i##0, b0, a_vec, lane);          \
        acc##i##1 = vfmaq_laneq_f32(acc##i##1, b1, a_vec, lane);          \
        acc##i##2 = vfmaq_laneq_f32(acc##i##2, b2, a_vec, lane);          \
    } while (0)

#define CODIR__NEON_STORE_ROW(i)                                                              \
    do {                                                                                      \
        float *c_i = c + (i) * ldc;                                                           \
        float32x4_t out0 = vmulq_n_f32(acc##i##0, alpha);                                     \
        float32x4_t out1 = vmulq_n_f32(acc##i##1, alpha);                                     \
        float32x4_t out2 = vmulq_n_f32(acc##i##2, alpha);                                     \
        if (beta != 0.0f) {                                                                   \
            out0 = vfmaq_n_f32(out0, vld1q_f32(c_i), beta);                                   \
            out1 = vfmaq_n_f32(out1, vld1q_f32(c_i + 4), beta);                               \
            out2 = vfmaq_n_f32(out2, vld1q_f32(c_i + 8), beta);                               \
        }                                                                                     \
        vst1q_f32(c_i, out0);                                                                 \
        vst1q_f32(c_i + 4, out1);                                                             \
        vst1q_f32(c_i + 8, out2);                                                             \
    } while (0)

static void codir__gemm_kernel_neon(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                                    float alpha, float beta)
{
    float32x4_t acc00 = vdupq_n_f32(0.0f), acc01 = acc00, acc02 = acc00;
    float32x4_t acc10 = acc00, acc11 = acc00, acc12 = acc00;
    float32x4_t acc20 = acc00, acc21 = acc00, acc22 = acc00;
    float32x4_t acc30 = acc00, acc31 = acc00, acc32 = acc00;
    float32x4_t acc40 = acc00, acc41 = acc00, acc42 = acc00;
    float32x4_t acc50 = acc00, acc51 = acc00, acc52 = acc00;
    float32x4_t acc60 = acc00, acc61 = acc00, acc62 = acc00;
    float32x4_t acc70 = acc00, acc71 = acc00, acc72 = acc00;
    int p;

#if defined(__GNUC__) || defined(__clang__)
    /* Start loading the C tile now, as in the AVX-512 kernel. */
    for (p = 0; p < CODIR__GEMM_NEON_MR; p++) {
        __builtin_prefetch(c + p * ldc);
        __builtin_prefetch(c + p * ldc + CODIR__GEMM_NEON_NR - 1);
    }
#endif

    for (p = 0; p < kc; p++) {
        float32x4_t a_lo = vld1q_f32(a);
        float32x4_t a_hi = vld1q_f32(a + 4);
        float32x4_t b0 = vld1q_f32(b);
        float32x4_t b1 = vld1q_f32(b + 4);
        float32x4_t b2 = vld1q_f32(b + 8);
        CODIR__NEON_FMA_ROW(0, a_lo, 0);
        CODIR__NEON_FMA_ROW(1, a_lo, 1);
        CODIR__NEON_FMA_ROW(2, a_lo, 2);
        CODIR__NEON_FMA_ROW(3, a_lo, 3);
        CODIR__NEON_FMA_ROW(4, a_hi, 0);
        CODIR__NEON_FMA_ROW(5, a_hi, 1);
        CODIR__NEON_FMA_ROW(6, a_hi, 2);
        CODIR__NEON_FMA_ROW(7, a_hi, 3);
        a += CODIR__GEMM_NEON_MR;
        b += CODIR__GEMM_NEON_NR;
    }

    CODIR__NEON_STORE_ROW(0);
    CODIR__NEON_STORE_ROW(1);
    CODIR__NEON_STORE_ROW(2);
    CODIR__NEON_STORE_ROW(3);
    CODIR__NEON_STORE_ROW(4);
    CODIR__NEON_STORE_ROW(5);
    CODIR__NEON_STORE_ROW(6);
    CODIR__NEON_STORE_ROW(7);
}
#undef CODIR__NEON_FMA_ROW
#undef CODIR__NEON_STORE_ROW
#endif /* CODIR__SIMD_NEON */

/* ---- GEMM: kernel selection ---- */

#ifdef CODIR__SIMD_AVX512
static const codir__gemm_kernel codir__gemm_avx512 = {
    "avx512", codir__gemm_kernel_avx512, CODIR__GEMM_AVX512_MR, CODIR__GEMM_AVX512_NR,
    CODIR__GEMM_AVX512_MC, CODIR__GEMM_AVX512_KC, CODIR__GEMM_AVX512_NC};
#endif
#ifdef CODIR__SIMD_AVX2
static const codir__gemm_kernel codir__gemm_avx2 = {
    "avx2", codir__gemm_kernel_avx2, CODIR__GEMM_AVX2_MR, CODIR__GEMM_AVX2_NR,
    CODIR__GEMM_AVX2_MC, CODIR__GEMM_AVX2_KC, CODIR__GEMM_AVX2_NC};
#endif
#ifdef CODIR__SIMD_NEON
static const codir__gemm_kernel codir__gemm_neon = {
    "neon", codir__gemm_kernel_neon, CODIR__GEMM_NEON_MR, CODIR__GEMM_NEON_NR,
    CODIR__GEMM_NEON_MC, CODIR__GEMM_NEON_KC, CODIR__GEMM_NEON_NC};
#endif
static const codir__gemm_kernel codir__gemm_scalar = {
    "scalar", codir__gemm_kernel_scalar, CODIR__GEMM_SCALAR_MR, CODIR__GEMM_SCALAR_NR,
    CODIR__GEMM_SCALAR_MC, CODIR__GEMM_SCALAR_KC, CODIR__GEMM_SCALAR_NC};

/* Returns the fastest kernel this build and CPU support. */
static const codir__gemm_kernel *codir__gemm_select_kernel(void)
{
#ifdef CODIR__SIMD_AVX512
    if (codir__has_avx512()) return &codir__gemm_avx512;
#endif
#ifdef CODIR__SIMD_AVX2
    if (codir__has_avx2()) return &codir__gemm_avx2;
#endif
#ifdef CODIR__SIMD_NEON
    return &codir__gemm_neon;
#else
    return &codir__gemm_scalar;
#endif
}

CODIR_DEF const char *codir_gemm_kernel_name(void) { return codir__gemm_select_kernel()->name; }

/* Columns of C that one micro-kernel call computes. */
static int codir__gemm_nr(void) { return codir__gemm_select_kernel()->nr; }

/* ---- GEMM: workspace ---- */

/* One packing buffer: `data` is `raw` rounded up to CODIR__GEMM_ALIGN bytes. */
typedef struct codir__gemm_buffer {
    void *raw;
    float *data;
    size_t capacity;  /* floats usable from data */
} codir__gemm_buffer;

struct codir_gemm_ws {
    codir__gemm_buffer a_packs;  /* one A~ block per thread, each a_stride floats apart */
    codir__gemm_buffer b_packs;  /* one B~ panel per thread, each b_stride floats apart,
                                    or one for the team when it shares B~ */
};

CODIR_DEF codir_gemm_ws *codir_gemm_ws_create(void)
{
    return (codir_gemm_ws *)codir__calloc(1, sizeof(codir_gemm_ws));
}

static void codir__gemm_buffer_free(codir__gemm_buffer *buffer)
{
    codir__free(buffer->raw);
    buffer->raw = NULL;
    buffer->data = NULL;
    buffer->capacity = 0;
}

CODIR_DEF void codir_gemm_ws_free(codir_gemm_ws *ws)
{
    if (!ws) return;
    codir__gemm_buffer_free(&ws->a_packs);
    codir__gemm_buffer_free(&ws->b_packs);
    codir__free(ws);
}

/* Makes room for `floats` floats, discarding the old contents. Returns CODIR_OK,
   CODIR_ERR_OVERFLOW or CODIR_ERR_NOMEM. */
static int codir__gemm_buffer_reserve(codir__gemm_buffer *buffer, size_t floats)
{
    size_t bytes;
    uintptr_t address;
    if (buffer->capacity >= floats) return CODIR_OK;
    if (!codir__size_mul(floats, sizeof(float), &bytes) || !codir__size_add(bytes, CODIR__GEMM_ALIGN, &bytes))
        return codir__fail(CODIR_ERR_OVERFLOW, "codir_gemm: a packing buffer of %zu floats overflows size_t", floats);
    codir__gemm_buffer_free(buffer);
    buffer->raw = codir__malloc(bytes);
    if (!buffer->raw) return CODIR_ERR_NOMEM;
    address = ((uintptr_t)buffer->raw + (CODIR__GEMM_ALIGN - 1)) & ~(uintptr_t)(CODIR__GEMM_ALIGN - 1);
    buffer->data = (float *)address;
    buffer->capacity = floats;
    return CODIR_OK;
}

/* ---- GEMM: packing ---- */

/* Copies `rows` rows of A (stored m x k, row stride lda) into one A~ panel of mr x kc,
   padding rows past `rows` with zeros. Each step of p gathers one value from every
   row, so the writes stay contiguous. Full panels of the kernels' MR values take an
   unrolled path, because the generic loop costs several percent of a whole product. */
static void codir__gemm_pack_a_rows(const float *src, size_t lda, int rows, int kc, int mr, float *dst)
{
    const float *r0 = src, *r1 = src + lda, *r2 = src + 2 * lda, *r3 = src + 3 * lda;
    int i, p;

    if (rows == 4 && mr == 4) {
        for (p = 0; p < kc; p++, dst += 4) {
            dst[0] = r0[p];
            dst[1] = r1[p];
            dst[2] = r2[p];
            dst[3] = r3[p];
        }
        return;
    }
    if (rows == 6 && mr == 6) {
        const float *r4 = src + 4 * lda, *r5 = src + 5 * lda;
        for (p = 0; p < kc; p++, dst += 6) {
            dst[0] = r0[p];
            dst[1] = r1[p];
            dst[2] = r2[p];
            dst[3] = r3[p];
            dst[4] = r4[p];
            dst[5] = r5[p];
        }
        return;
    }
    if (rows == 8 && mr == 8) {
        const float *r4 = src + 4 * lda, *r5 = src + 5 * lda, *r6 = src + 6 * lda, *r7 = src + 7 * lda;
        for (p = 0; p < kc; p++, dst += 8) {
            dst[0] = r0[p];
            dst[1] = r1[p];
            dst[2] = r2[p];
            dst[3] = r3[p];
            dst[4] = r4[p];
            dst[5] = r5[p];
            dst[6] = r6[p];
            dst[7] = r7[p];
        }
        return;
    }
    for (p = 0; p < kc; p++, dst += mr) {
        for (i = 0; i < rows; i++) dst[i] = src[(size_t)i * lda + (size_t)p];
        for (; i < mr; i++) dst[i] = 0.0f;
    }
}

#ifdef CODIR__SIMD_AVX512
/* Packs one full 6-row panel of A (6 rows of kc values, row stride lda) for the AVX-512
   kernel: column p of A~ holds the 6 values A[0..5][p] side by side. Blocks of 16
   columns move in registers, where the scalar gather above moved one float per load
   and store and took 5% of the L3-H192 training step at T = 128 (perf, as for the
   attention add-back).
   Step 1 interleaves rows 2q and 2q+1 into two pair vectors per q: index 2c + s of
   half h holds row 2q + s of column 8h + c.
   Step 2 fills the six output vectors. Value e of output v is row r = f % 6 of column
   c = f / 6, where f = 16v + e. It sits in pair vector r / 2 of half v / 3, at index
   2 (c % 8) + r % 2. One two-source permute takes the values of rows 0 to 3 (indices
   16 and up pick pair 1), and a masked permute adds rows 4 and 5. The pattern repeats
   every three outputs. */
static const int codir__pack_a6_rows03[3][16] = {{0, 1, 16, 17, 0, 0, 2, 3, 18, 19, 0, 0, 4, 5, 20, 21},
                                                 {0, 0, 6, 7, 22, 23, 0, 0, 8, 9, 24, 25, 0, 0, 10, 11},
                                                 {26, 27, 0, 0, 12, 13, 28, 29, 0, 0, 14, 15, 30, 31, 0, 0}};
static const int codir__pack_a6_rows45[3][16] = {{0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 3, 0, 0, 0, 0},
                                                 {4, 5, 0, 0, 0, 0, 6, 7, 0, 0, 0, 0, 8, 9, 0, 0},
                                                 {0, 0, 10, 11, 0, 0, 0, 0, 12, 13, 0, 0, 0, 0, 14, 15}};
static const unsigned short codir__pack_a6_mask45[3] = {0x0C30, 0x30C3, 0xC30C};

CODIR__QUIET_UNDEFINED_BEGIN
CODIR__SIMD_TARGET_AVX512
static void codir__gemm_pack_a6_avx512(const float *src, size_t lda, int kc, const float *next, float *dst)
{
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    __m512i rows03[3], rows45[3];
    int p, v, q;
    for (v = 0; v < 3; v++) {
        rows03[v] = _mm512_loadu_si512((const void *)codir__pack_a6_rows03[v]);
        rows45[v] = _mm512_loadu_si512((const void *)codir__pack_a6_rows45[v]);
    }
    for (p = 0; p + 16 <= kc; p += 16, dst += 96) {
        __m512 pair[3][2];
        if (next)
            for (q = 0; q < 6; q++) _mm_prefetch((const char *)(next + (size_t)q * lda + (size_t)p), _MM_HINT_T0);
        for (q = 0; q < 3; q++) {
            __m512 even = _mm512_loadu_ps(src + (size_t)(2 * q) * lda + (size_t)p);
            __m512 odd = _mm512_loadu_ps(src + (size_t)(2 * q + 1) * lda + (size_t)p);
            pair[q][0] = _mm512_permutex2var_ps(even, lo, odd);
            pair[q][1] = _mm512_permutex2var_ps(even, hi, odd);
        }
        for (v = 0; v < 6; v++) {
            __m512 out = _mm512_permutex2var_ps(pair[0][v / 3], rows03[v % 3], pair[1][v / 3]);
            out = _mm512_mask_permutexvar_ps(out, (__mmask16)codir__pack_a6_mask45[v % 3], rows45[v % 3],
                                             pair[2][v / 3]);
            _mm512_storeu_ps(dst + 16 * v, out);
        }
    }
    for (; p < kc; p++, dst += 6)
        for (q = 0; q < 6; q++) dst[q] = src[(size_t)q * lda + (size_t)p];
}
CODIR__QUIET_UNDEFINED_END
#endif

/* Packs op(A)[i0 : i0+mc, p0 : p0+kc] into A~ (layout above): ceil(mc/mr) panels of
   mr x kc, rows past mc zero. */
static void codir__gemm_pack_a(const codir__gemm_kernel *kernel, int trans_a, const float *a, int lda, int i0,
                               int mc, int p0, int kc, float *packed)
{
    const int mr = kernel->mr;
    int ir, i, p;
    for (ir = 0; ir < mc; ir += mr) {
        int rows = mc - ir < mr ? mc - ir : mr;
        float *dst = packed + (size_t)ir * (size_t)kc;

        if (trans_a && rows == 6 && mr == 6) {
            /* The x86 kernels' full panel: a fixed-size copy compiles to two moves,
               where the loop below runs element by element (it was 10% of a
               training step, in the weight gradients' products). */
            for (p = 0; p < kc; p++) {
                const float *src = a + (size_t)(p0 + p) * (size_t)lda + (size_t)(i0 + ir);
                memcpy(dst + (size_t)p * 6, src, 6 * sizeof(float));
            }
        } else if (trans_a) {
            /* A is k x m: the mr values of one column of op(A) are contiguous. */
            for (p = 0; p < kc; p++) {
                const float *src = a + (size_t)(p0 + p) * (size_t)lda + (size_t)(i0 + ir);
                float *dst_p = dst + (size_t)p * (size_t)mr;
                for (i = 0; i < rows; i++) dst_p[i] = src[i];
                for (; i < mr; i++) dst_p[i] = 0.0f;
            }
        } else {
            /* A is m x k: gather across the rows of the panel. */
            const float *src = a + (size_t)(i0 + ir) * (size_t)lda + (size_t)p0;
#ifdef CODIR__SIMD_AVX512
            if (kernel == &codir__gemm_avx512 && rows == 6) {
                codir__gemm_pack_a6_avx512(src, (size_t)lda, kc, mc - ir >= 12 ? src + 6 * (size_t)lda : NULL, dst);
                continue;
            }
#endif
            codir__gemm_pack_a_rows(src, (size_t)lda, rows, kc, mr, dst);
        }
    }
}

#ifdef CODIR__SIMD_AVX512
/* Packs one full 64-column panel of op(B) = B^T for the AVX-512 kernel: row j of B
   (at b + j*ldb, kc values) becomes column j of the kc x 64 panel. Blocks of 16 x 16
   are transposed in registers, so each store writes one whole 64-byte row of the
   panel; the scalar loop below writes one float per 256-byte stride, and for a
   product with few rows of A it took longer than the multiplication itself. */
CODIR__QUIET_UNDEFINED_BEGIN
CODIR__SIMD_TARGET_AVX512
static void codir__gemm_pack_bt_panel_avx512(const float *b, size_t ldb, int kc, float *dst)
{
    int p0, jb, i;
    for (p0 = 0; p0 < kc; p0 += 16) {
        int rows = kc - p0 < 16 ? kc - p0 : 16;
        __mmask16 valid = (__mmask16)((1u << rows) - 1u);
        for (jb = 0; jb < 64; jb += 16) {
            __m512 r[16];
            for (i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_ps(valid, b + (size_t)(jb + i) * ldb + (size_t)p0);
            codir__transpose16_avx512(r);
            /* r[i] is column p0 + i of the block, that is row p0 + i of the panel */
            for (i = 0; i < rows; i++) _mm512_storeu_ps(dst + (size_t)(p0 + i) * 64 + (size_t)jb, r[i]);
        }
    }
}
CODIR__QUIET_UNDEFINED_END
#endif

/* Packs NR-panels [panel_lo, panel_hi) of op(B)[p0 : p0+kc, j0 : j0+nc] into B~ (layout
   above): each panel is kc x nr, columns past nc zero. */
static void codir__gemm_pack_b(int trans_b, const float *b, int ldb, int p0, int kc, int j0, int nc, int nr,
                               int panel_lo, int panel_hi, float *packed)
{
    int panel, j, p;
    for (panel = panel_lo; panel < panel_hi; panel++) {
        int jr = panel * nr;
        int cols = nc - jr < nr ? nc - jr : nr;
        float *dst = packed + (size_t)jr * (size_t)kc;

#ifdef CODIR__SIMD_AVX512
        /* Only the AVX-512 kernel has 64-column panels. */
        if (trans_b && nr == CODIR__GEMM_AVX512_NR && cols == nr) {
            codir__gemm_pack_bt_panel_avx512(b + (size_t)(j0 + jr) * (size_t)ldb + (size_t)p0, (size_t)ldb, kc, dst);
            continue;
        }
#endif
        if (trans_b) {
            /* B is n x k: column j of op(B) is row j of B, so read rows and scatter them
               into the panel, in blocks of 16 values of k to keep the writes in L1. */
            int p_block;
            for (p_block = 0; p_block < kc; p_block += 16) {
                int p_end = p_block + 16 < kc ? p_block + 16 : kc;
                for (j = 0; j < cols; j++) {
                    const float *src = b + (size_t)(j0 + jr + j) * (size_t)ldb + (size_t)p0;
                    for (p = p_block; p < p_end; p++) dst[(size_t)p * (size_t)nr + (size_t)j] = src[p];
                }
                for (; j < nr; j++) {
                    for (p = p_block; p < p_end; p++) dst[(size_t)p * (size_t)nr + (size_t)j] = 0.0f;
                }
            }
        } else {
            /* B is k x n: each row of the panel is a contiguous piece of a row of B. */
            for (p = 0; p < kc; p++) {
                const float *src = b + (size_t)(p0 + p) * (size_t)ldb + (size_t)(j0 + jr);
                float *dst_p = dst + (size_t)p * (size_t)nr;
                memcpy(dst_p, src, (size_t)cols * sizeof(float));
                for (j = cols; j < nr; j++) dst_p[j] = 0.0f;
            }
        }
    }
}

/* ---- GEMM: macro-kernel and threads ---- */

/* Everything one thread needs to run its share of a product. */
typedef struct codir__gemm_plan {
    const codir__gemm_kernel *kernel;
    int trans_a, trans_b, m, n, k;
    float alpha, beta;
    const float *a, *b;
    float *c;
    int lda, ldb, ldc;
    int mc, kc, nc;         /* block sizes used for this product */
    int split_columns;      /* 1: threads split the columns of C, 0: the rows */
    int shared_b;           /* 1: the team packs one B~ together (rows split, B not packed) */
    float *a_packs;         /* thread t packs A~ at a_packs + t * a_stride */
    size_t a_stride;
    float *b_packs;         /* thread t packs B~ at b_packs + t * b_stride, or all at b_packs */
    size_t b_stride;
    const float *b_packed;  /* all of op(B), packed by codir__gemm_pack_full_b, or NULL */
} codir__gemm_plan;

/* Fills the product's operands into a zeroed plan; the caller sets the blocking. */
static void codir__gemm_plan_init(codir__gemm_plan *plan, const codir__gemm_kernel *kernel, int trans_a, int trans_b,
                                  int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                                  float beta, float *c, int ldc)
{
    memset(plan, 0, sizeof *plan);
    plan->kernel = kernel;
    plan->trans_a = trans_a;
    plan->trans_b = trans_b;
    plan->m = m;
    plan->n = n;
    plan->k = k;
    plan->alpha = alpha;
    plan->beta = beta;
    plan->a = a;
    plan->b = b;
    plan->c = c;
    plan->lda = lda;
    plan->ldb = ldb;
    plan->ldc = ldc;
}

/* Stores in [*lo, *hi) the share of `count` items that thread `tid` of `threads` gets:
   contiguous ranges whose sizes differ by at most one. */
static void codir__gemm_share(int count, int tid, int threads, int *lo, int *hi)
{
    *lo = (int)((long long)count * tid / threads);
    *hi = (int)((long long)count * (tid + 1) / threads);
}

/* Computes the tile of C at rows [i0, i0+rows) and columns [j0, j0+cols) of this
   kernel call, where rows <= MR and cols <= NR. */
static void codir__gemm_tile(const codir__gemm_plan *plan, const float *a_panel, const float *b_panel, int kc,
                             int i0, int rows, int j0, int cols, float beta)
{
    const codir__gemm_kernel *kernel = plan->kernel;
    float *c = plan->c + (size_t)i0 * (size_t)plan->ldc + (size_t)j0;
    float tile[CODIR__GEMM_TILE_MAX];
    int i;

    if (rows == kernel->mr && cols == kernel->nr) {
        kernel->run(kc, a_panel, b_panel, c, plan->ldc, plan->alpha, beta);
        return;
    }

    /* Edge: the kernel works on a full local tile, and only the valid part of C is
       copied in and out. The rest of the tile is zero, so beta * tile is never NaN. */
    memset(tile, 0, sizeof tile);
    if (beta != 0.0f) {
        for (i = 0; i < rows; i++)
            memcpy(tile + (size_t)i * (size_t)kernel->nr, c + (size_t)i * (size_t)plan->ldc, (size_t)cols * sizeof(float));
    }
    kernel->run(kc, a_panel, b_panel, tile, kernel->nr, plan->alpha, beta);
    for (i = 0; i < rows; i++)
        memcpy(c + (size_t)i * (size_t)plan->ldc, tile + (size_t)i * (size_t)kernel->nr, (size_t)cols * sizeof(float));
}

/* Runs thread tid's share of the product: the serial algorithm on its own rows (or
   columns) of C, with its own A~ buffer and its own or the team's B~. With a shared
   B~ (plan->shared_b) it meets barriers, so every thread of the team must call it. */
static void codir__gemm_run_thread(const codir__gemm_plan *plan, int tid, int threads)
{
    const codir__gemm_kernel *kernel = plan->kernel;
    const int mr = kernel->mr, nr = kernel->nr;
    float *a_pack = plan->a_packs + (size_t)tid * plan->a_stride;
    float *b_pack = plan->b_packs + (size_t)tid * plan->b_stride;
    int row_lo = 0, row_hi = plan->m, col_lo = 0, col_hi = plan->n;
    int jc, pc, ic, ir, jr_panel, lo, hi;

    /* This thread's part of C, cut at whole MR-panels or NR-panels. */
    if (plan->split_columns) {
        codir__gemm_share((plan->n + nr - 1) / nr, tid, threads, &lo, &hi);
        col_lo = lo * nr;
        col_hi = hi * nr < plan->n ? hi * nr : plan->n;
    } else {
        codir__gemm_share((plan->m + mr - 1) / mr, tid, threads, &lo, &hi);
        row_lo = lo * mr;
        row_hi = hi * mr < plan->m ? hi * mr : plan->m;
    }

    for (jc = col_lo; jc < col_hi; jc += plan->nc) {
        int nc = col_hi - jc < plan->nc ? col_hi - jc : plan->nc;
        int n_panels = (nc + nr - 1) / nr;

        for (pc = 0; pc < plan->k; pc += plan->kc) {
            int kc = plan->k - pc < plan->kc ? plan->k - pc : plan->kc;
            float beta = pc == 0 ? plan->beta : 1.0f;

            const float *b_block = b_pack;
            if (plan->b_packed) {
                /* Block pc of the full packing: kc rows of every panel, after the
                   pc rows of all panels before it. */
                size_t padded_n = (size_t)((plan->n + nr - 1) / nr) * (size_t)nr;
                b_block = plan->b_packed + (size_t)pc * padded_n + (size_t)jc * (size_t)kc;
#ifdef _OPENMP
            } else if (plan->shared_b) {
                /* Every thread reads all of B~, so each packs a share of its panels
                   into the one buffer: between two barriers, the first of which waits
                   until the team is done with the previous block. Every thread runs
                   the same jc and pc loops, so all of them meet every barrier. */
                codir__gemm_share(n_panels, tid, threads, &lo, &hi);
#pragma omp barrier
                codir__gemm_pack_b(plan->trans_b, plan->b, plan->ldb, pc, kc, jc, nc, nr, lo, hi, plan->b_packs);
#pragma omp barrier
                b_block = plan->b_packs;
#endif
            } else {
                codir__gemm_pack_b(plan->trans_b, plan->b, plan->ldb, pc, kc, jc, nc, nr, 0, n_panels, b_pack);
            }

            for (ic = row_lo; ic < row_hi; ic += plan->mc) {
                int mc = row_hi - ic < plan->mc ? row_hi - ic : plan->mc;
                codir__gemm_pack_a(kernel, plan->trans_a, plan->a, plan->lda, ic, mc, pc, kc, a_pack);

                /* Macro-kernel: each KC x NR panel of B~ stays in cache while all
                   MR-panels of A~ pass it. */
                for (jr_panel = 0; jr_panel < n_panels; jr_panel++) {
                    int jr = jr_panel * nr;
                    int cols = nc - jr < nr ? nc - jr : nr;
                    const float *b_panel = b_block + (size_t)jr * (size_t)kc;
                    for (ir = 0; ir < mc; ir += mr) {
                        int rows = mc - ir < mr ? mc - ir : mr;
                        const float *a_panel = a_pack + (size_t)ir * (size_t)kc;
                        codir__gemm_tile(plan, a_panel, b_panel, kc, ic + ir, rows, jc + jr, cols, beta);
                    }
                }
            }
        }
    }
}

/* ---- GEMM: entry point ---- */

/* Sets C = beta * C; beta = 0 writes zeros without reading C. */
static void codir__gemm_scale_c(int m, int n, float beta, float *c, int ldc)
{
    int i, j;
    if (beta == 1.0f) return;
    for (i = 0; i < m; i++) {
        float *c_row = c + (size_t)i * (size_t)ldc;
        if (beta == 0.0f) {
            memset(c_row, 0, (size_t)n * sizeof(float));
        } else {
            for (j = 0; j < n; j++) c_row[j] = beta * c_row[j];
        }
    }
}

/* Returns CODIR_OK or records which argument of codir_gemm is invalid. */
static int codir__gemm_validate(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                                const float *b, int ldb, const float *c, int ldc)
{
    if (trans_a != 0 && trans_a != 1)
        return codir__fail(CODIR_ERR_INVALID, "codir_gemm: trans_a is %d; expected 0 (no transpose) or 1 (transpose)", trans_a);
    if (trans_b != 0 && trans_b != 1)
        return codir__fail(CODIR_ERR_INVALID, "codir_gemm: trans_b is %d; expected 0 (no transpose) or 1 (transpose)", trans_b);
    if (m < 0) return codir__fail(CODIR_ERR_INVALID, "codir_gemm: m is %d; expected m >= 0", m);
    if (n < 0) return codir__fail(CODIR_ERR_INVALID, "codir_gemm: n is %d; expected n >= 0", n);
    if (k < 0) return codir__fail(CODIR_ERR_INVALID, "codir_gemm: k is %d; expected k >= 0", k);
    if (lda < codir__gemm_min_ld(trans_a ? m : k))
        return codir__fail(CODIR_ERR_INVALID, "codir_gemm: lda is %d but A is stored with %d columns (%s); expected lda >= %d",
                           lda, trans_a ? m : k, trans_a ? "k x m" : "m x k", codir__gemm_min_ld(trans_a ? m : k));
    if (ldb < codir__gemm_min_ld(trans_b ? k : n))
        return codir__fail(CODIR_ERR_INVALID, "codir_gemm: ldb is %d but B is stored with %d columns (%s); expected ldb >= %d",
                           ldb, trans_b ? k : n, trans_b ? "n x k" : "k x n", codir__gemm_min_ld(trans_b ? k : n));
    if (ldc < codir__gemm_min_ld(n))
        return codir__fail(CODIR_ERR_INVALID, "codir_gemm: ldc is %d but C has %d columns; expected ldc >= %d", ldc, n,
                           codir__gemm_min_ld(n));
    if (m > 0 && n > 0 && !c) return codir__fail(CODIR_ERR_INVALID, "codir_gemm: c is NULL for a %d x %d product", m, n);
    if (m > 0 && n > 0 && k > 0 && alpha != 0.0f && (!a || !b))
        return codir__fail(CODIR_ERR_INVALID, "codir_gemm: %s is NULL but alpha != 0 and k = %d", !a ? "a" : "b", k);
    return CODIR_OK;
}

/* Rounds a count of floats up to a whole number of CODIR__GEMM_ALIGN blocks. */
static size_t codir__gemm_align_floats(size_t floats)
{
    const size_t per_block = CODIR__GEMM_ALIGN / sizeof(float);
    return (floats + per_block - 1) / per_block * per_block;
}

/* Returns the size of `count` items cut into the fewest blocks of at most `block`,
   made as even as possible and rounded up to a multiple of `multiple`. */
static int codir__gemm_even_block(int count, int block, int multiple)
{
    int blocks = (count + block - 1) / block;
    int size = (count + blocks - 1) / blocks;
    size = (size + multiple - 1) / multiple * multiple;
    return size < block ? size : block;
}

/* Sets the per-thread sizes of A~ (mc x kc) and B~ (kc x nc, in whole NR-panels), each
   rounded up to the alignment, from the plan's block sizes. */
static void codir__gemm_set_strides(codir__gemm_plan *plan)
{
    size_t nr = (size_t)plan->kernel->nr, panels = ((size_t)plan->nc + nr - 1) / nr;
    plan->a_stride = codir__gemm_align_floats((size_t)plan->mc * (size_t)plan->kc);
    plan->b_stride = codir__gemm_align_floats((size_t)plan->kc * panels * nr);
}

/* codir_gemm, with op(B) already packed in full when b_packed is not NULL. */
static int codir__gemm(codir_gemm_ws *ws, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                       int lda, const float *b, int ldb, const float *b_packed, float beta, float *c, int ldc)
{
    codir_gemm_ws local_ws;
    codir__gemm_plan plan;
    const codir__gemm_kernel *kernel;
    int threads = 1, m_panels, n_panels, rows_per_thread, cols_per_thread, status;
    size_t a_floats, b_floats;

    status = codir__gemm_validate(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc);
    if (status != CODIR_OK) return status;
    if (m == 0 || n == 0) return CODIR_OK;
    if (alpha == 0.0f || k == 0) {
        codir__gemm_scale_c(m, n, beta, c, ldc);
        return CODIR_OK;
    }

    kernel = codir__gemm_select_kernel();
    CODIR_ASSERT(kernel->mr * kernel->nr <= CODIR__GEMM_TILE_MAX);
    m_panels = (m + kernel->mr - 1) / kernel->mr;
    n_panels = (n + kernel->nr - 1) / kernel->nr;

    /* Threads: only outside a parallel region, and only for products large enough to
       pay for the region. */
#ifdef _OPENMP
    if (!omp_in_parallel() && (double)m * (double)n * (double)k >= CODIR__GEMM_MIN_PARALLEL_FMAS) {
        int useful = m_panels > n_panels ? m_panels : n_panels;
        threads = omp_get_max_threads();
        if (threads > useful) threads = useful;
        if (threads < 1) threads = 1;
    }
#endif

    codir__gemm_plan_init(&plan, kernel, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    /* Split the larger of m and n. With the rows split, the team packs each block of
       op(B) once, together; with the columns split, each thread packs all of op(A) for
       its columns, which duplicates the smaller operand. */
    plan.split_columns = threads > 1 && (m_panels < threads || (n > m && n_panels >= threads));
    plan.shared_b = threads > 1 && !plan.split_columns && !b_packed;

    /* KC depends on k alone, so the order of the sums, and with it every bit of the
       result, does not change with the thread count. MC and NC only move work. */
    plan.kc = codir__gemm_even_block(k, kernel->kc, 8);
    rows_per_thread = plan.split_columns ? m : ((m_panels + threads - 1) / threads) * kernel->mr;
    cols_per_thread = plan.split_columns ? ((n_panels + threads - 1) / threads) * kernel->nr : n;
    plan.mc = codir__gemm_even_block(rows_per_thread, kernel->mc, kernel->mr);
    plan.nc = codir__gemm_even_block(cols_per_thread, kernel->nc, kernel->nr);

    /* Buffer sizes: per thread one A~ block and one B~ panel of whole NR-panels (one
       B~ for the team when it shares it), each rounded up to the alignment. The block
       sizes bound both, so only the products with the thread count need an overflow
       check. NOTE: with the columns split, B~ takes up to KC x NC floats per thread
       (4 MiB with the AVX-512 blocks), so the workspace grows with the thread count. */
    codir__gemm_set_strides(&plan);
    if (b_packed) {
        plan.b_packed = b_packed;
        plan.b_stride = 0;
    }
    if (!codir__size_mul(plan.a_stride, (size_t)threads, &a_floats) ||
        !codir__size_mul(plan.b_stride, plan.shared_b ? 1 : (size_t)threads, &b_floats))
        return codir__fail(CODIR_ERR_OVERFLOW, "codir_gemm: packing buffers for %d threads overflow size_t", threads);

    if (!ws) {
        memset(&local_ws, 0, sizeof local_ws);
        ws = &local_ws;
    }
    status = codir__gemm_buffer_reserve(&ws->a_packs, a_floats);
    if (status == CODIR_OK) status = codir__gemm_buffer_reserve(&ws->b_packs, b_floats);
    if (status != CODIR_OK) {
        if (ws == &local_ws) {
            codir__gemm_buffer_free(&local_ws.a_packs);
            codir__gemm_buffer_free(&local_ws.b_packs);
        }
        return status;
    }
    plan.a_packs = ws->a_packs.data;
    plan.b_packs = ws->b_packs.data;

#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            /* The team can be smaller than requested (OMP_DYNAMIC); the buffers were
               sized for `threads`, so a smaller team fits. */
            codir__gemm_run_thread(&plan, omp_get_thread_num(), omp_get_num_threads());
        }
    } else {
        codir__gemm_run_thread(&plan, 0, 1);
    }
#else
    codir__gemm_run_thread(&plan, 0, 1);
#endif

    if (ws == &local_ws) {
        codir__gemm_buffer_free(&local_ws.a_packs);
        codir__gemm_buffer_free(&local_ws.b_packs);
    }
    return CODIR_OK;
}

CODIR_DEF int codir_gemm(codir_gemm_ws *ws, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    return codir__gemm(ws, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, NULL, beta, c, ldc);
}

/* ---- GEMM: op(B) packed once ----

   A frozen weight matrix can be packed once for every later product: the full
   packing holds, for each block of KC rows (KC depends on k alone), all NR-panels of
   op(B) side by side, each zero-padded to NR columns. The macro-kernel then reads
   its panels in place instead of packing B~. The layout depends on the micro-kernel,
   which the CPU fixes for the life of the process. */

/* Floats of the full packing of an op(B) of k x n. */
static size_t codir__gemm_packed_b_floats(int n, int k)
{
    size_t nr = (size_t)codir__gemm_select_kernel()->nr;
    return ((size_t)n + nr - 1) / nr * nr * (size_t)k;
}

/* Packs op(B) [k x n] in full into dst (64-byte aligned, codir__gemm_packed_b_floats). */
static void codir__gemm_pack_full_b(int trans_b, const float *b, int ldb, int n, int k, float *dst)
{
    const codir__gemm_kernel *kernel = codir__gemm_select_kernel();
    int nr = kernel->nr, panels = (n + nr - 1) / nr, block = codir__gemm_even_block(k, kernel->kc, 8), pc;
    for (pc = 0; pc < k; pc += block) {
        int kc = k - pc < block ? k - pc : block;
        codir__gemm_pack_b(trans_b, b, ldb, pc, kc, 0, n, nr, 0, panels, dst + (size_t)pc * (size_t)panels * (size_t)nr);
    }
}

/* ---- GEMM: serial products into caller buffers ----

   The attention kernels run many small products, one (sequence, head) pair per
   thread. They cannot share a workspace or start a parallel region per product, so
   they call this serial form with packing buffers of their own. The blocking depends
   only on m, n and k, as in codir_gemm. */

/* Fills the block sizes and buffer strides of a one-thread plan. */
static void codir__gemm_serial_blocks(const codir__gemm_kernel *kernel, int m, int n, int k, codir__gemm_plan *plan)
{
    plan->kernel = kernel;
    plan->kc = codir__gemm_even_block(k, kernel->kc, 8);
    plan->mc = codir__gemm_even_block(m, kernel->mc, kernel->mr);
    plan->nc = codir__gemm_even_block(n, kernel->nc, kernel->nr);
    codir__gemm_set_strides(plan);
}

/* Floats of packing buffer that codir__gemm_serial needs for an m x n x k product,
   alignment slack included. m, n, k >= 1. */
static size_t codir__gemm_serial_floats(int m, int n, int k)
{
    codir__gemm_plan plan;
    codir__gemm_serial_blocks(codir__gemm_select_kernel(), m, n, k, &plan);
    return plan.a_stride + plan.b_stride + CODIR__GEMM_ALIGN / sizeof(float);
}

/* C = alpha * op(A) * op(B) + beta * C on the calling thread, packing into `pack`
   (codir__gemm_serial_floats(m, n, k) floats). For internal callers, whose arguments
   are valid by construction: m, n, k >= 1 and alpha != 0. */
static void codir__gemm_serial(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                               const float *b, int ldb, float beta, float *c, int ldc, float *pack)
{
    codir__gemm_plan plan;
    uintptr_t aligned = ((uintptr_t)pack + (CODIR__GEMM_ALIGN - 1)) & ~(uintptr_t)(CODIR__GEMM_ALIGN - 1);
    codir__gemm_plan_init(&plan, codir__gemm_select_kernel(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
                          c, ldc);
    codir__gemm_serial_blocks(plan.kernel, m, n, k, &plan);
    plan.a_packs = (float *)aligned;
    plan.b_packs = plan.a_packs + plan.a_stride;
    codir__gemm_run_thread(&plan, 0, 1);
}

/* ===================================================================================
   5. Autograd (implementation)
   =================================================================================== */

enum codir__op {
    CODIR__OP_LINEAR,
    CODIR__OP_GELU_LINEAR,
    CODIR__OP_ADD,
    CODIR__OP_ADD_DROPOUT,
    CODIR__OP_LAYERNORM,
    CODIR__OP_GELU,
    CODIR__OP_TANH,
    CODIR__OP_SOFTMAX,
    CODIR__OP_ATTENTION,
    CODIR__OP_EMBEDDING,
    CODIR__OP_DROPOUT,
    CODIR__OP_SELECT_FIRST,
    CODIR__OP_MEAN_POOL,
    CODIR__OP_CONCAT,
    CODIR__OP_GATHER_ROWS,
    CODIR__OP_L2_NORMALIZE,
    CODIR__OP_CROSS_ENTROPY,
    CODIR__OP_MSE,
    CODIR__OP_KL_DIV,
    CODIR__OP_INFONCE,
    CODIR__OP_NCE,
    CODIR__OP_WEIGHTED_SUM,
    CODIR__OP_COUNT
};

/* One recorded op: what backward needs to call the op's backward kernel. */
struct codir_node {
    enum codir__op op;
    codir_tensor *out;
    codir_tensor *in[3];        /* tensor inputs in the op's argument order; NULL if unused */
    codir_tensor **list;        /* [count] concat inputs or weighted-sum terms */
    int count;
    float *saved[2];            /* values saved by the forward pass, e.g. LayerNorm rstd */
    double *saved_double;       /* LayerNorm row means */
    const int *ints[2];         /* ids and types, mask, targets or negatives */
    const float *floats;        /* memory bank, regression targets or sum weights */
    int dims[4];                /* op-specific sizes */
    float scalar;               /* eps, dropout p, temperature or tau */
    double scalar_double;       /* NCE: log c */
    uint64_t key;               /* dropout key */
};

CODIR_DEF int codir_ctx_init(codir_ctx *ctx, size_t arena_bytes, uint64_t seed)
{
    int rc;
    memset(ctx, 0, sizeof *ctx);
    rc = codir_arena_init(&ctx->arena, arena_bytes);
    if (rc) return rc;
    ctx->gemm = codir_gemm_ws_create();
    if (!ctx->gemm) {
        codir_arena_free(&ctx->arena);
        return CODIR_ERR_NOMEM;
    }
    ctx->seed = seed;
    return CODIR_OK;
}

CODIR_DEF void codir_ctx_free(codir_ctx *ctx)
{
    codir_arena_free(&ctx->arena);
    codir_gemm_ws_free(ctx->gemm);
    codir__free(ctx->tape);
    memset(ctx, 0, sizeof *ctx);
}

CODIR_DEF void codir_ctx_begin(codir_ctx *ctx, int recording, int training, uint64_t step)
{
    codir_arena_reset(&ctx->arena);
    ctx->tape_len = 0;
    ctx->recording = recording;
    ctx->training = training;
    ctx->step = step;
    ctx->dropout_calls = 0;
    ctx->status = CODIR_OK;
}

/* Records the first failure of the step and returns NULL for the op to return. */
static codir_tensor *codir__op_failed(codir_ctx *ctx, int code)
{
    if (ctx->status == CODIR_OK) ctx->status = code;
    return NULL;
}

/* Formats a reason, records the failure and returns NULL. */
static codir_tensor *codir__op_error(codir_ctx *ctx, int code, const char *fmt, ...)
{
    char message[sizeof codir__error_message];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    memcpy(codir__error_message, message, sizeof message);
    return codir__op_failed(ctx, code);
}

CODIR_DEF codir_tensor *codir_tensor_new(codir_ctx *ctx, int ndim, const int *shape, int with_grad)
{
    codir_tensor *t;
    size_t numel, bytes;
    int d, rc = codir__shape_numel(ndim, shape, &numel);
    if (rc) return codir__op_failed(ctx, rc);
    if (!codir__size_mul(numel, sizeof(float), &bytes))
        return codir__op_error(ctx, CODIR_ERR_OVERFLOW, "tensor of %zu floats overflows size_t", numel);
    t = (codir_tensor *)codir_arena_alloc(&ctx->arena, sizeof *t);
    if (!t) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    for (d = 0; d < CODIR_MAX_DIMS; d++) t->shape[d] = d < ndim ? shape[d] : 1;
    t->numel = numel;
    t->data = (float *)codir_arena_alloc(&ctx->arena, bytes);
    if (!t->data) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
    if (with_grad) {
        t->grad = (float *)codir_arena_alloc(&ctx->arena, bytes);
        if (!t->grad) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
        memset(t->grad, 0, bytes);
    }
    return t;
}

/* Returns n floats of arena scratch, or NULL after recording the failure. */
static float *codir__scratch(codir_ctx *ctx, size_t n)
{
    size_t bytes;
    float *p;
    if (!codir__size_mul(n, sizeof(float), &bytes)) {
        codir__op_error(ctx, CODIR_ERR_OVERFLOW, "scratch of %zu floats overflows size_t", n);
        return NULL;
    }
    p = (float *)codir_arena_alloc(&ctx->arena, bytes);
    if (!p) codir__op_failed(ctx, CODIR_ERR_NOMEM);
    return p;
}

/* 1 if the op's output needs a gradient: recording is on and an input has one. */
static int codir__needs_grad(const codir_ctx *ctx, const codir_tensor *a, const codir_tensor *b,
                             const codir_tensor *c)
{
    if (!ctx->recording) return 0;
    return (a && (a->grad || a->node)) || (b && (b->grad || b->node)) || (c && (c->grad || c->node));
}

/* Appends a node for `op` producing `out`, or returns NULL after recording a failure. */
static codir_node *codir__record(codir_ctx *ctx, enum codir__op op, codir_tensor *out, codir_tensor *a,
                                 codir_tensor *b, codir_tensor *c)
{
    codir_node *n;
    if (ctx->tape_len == ctx->tape_cap) {
        int cap = ctx->tape_cap ? 2 * ctx->tape_cap : 256;
        codir_node *grown;
        if (cap > INT_MAX / 2 || (size_t)cap > SIZE_MAX / sizeof(codir_node)) {
            codir__op_error(ctx, CODIR_ERR_OVERFLOW, "the tape cannot hold more than %d ops", ctx->tape_cap);
            return NULL;
        }
        grown = (codir_node *)codir__realloc(ctx->tape, (size_t)cap * sizeof(codir_node));
        if (!grown) {
            codir__op_failed(ctx, CODIR_ERR_NOMEM);
            return NULL;
        }
        ctx->tape = grown;
        ctx->tape_cap = cap;
    }
    n = &ctx->tape[ctx->tape_len++];
    memset(n, 0, sizeof *n);
    n->op = op;
    n->out = out;
    out->node = ctx->tape_len;
    n->in[0] = a;
    n->in[1] = b;
    n->in[2] = c;
    return n;
}

/* Returns a new tensor shaped like x but with last dimension `last`. */
static codir_tensor *codir__new_like(codir_ctx *ctx, const codir_tensor *x, int last)
{
    int shape[CODIR_MAX_DIMS], d;
    for (d = 0; d < x->ndim; d++) shape[d] = x->shape[d];
    shape[x->ndim - 1] = last;
    return codir_tensor_new(ctx, x->ndim, shape, 0);
}

/* Returns a new scalar (shape [1]). */
static codir_tensor *codir__new_scalar(codir_ctx *ctx)
{
    int one = 1;
    return codir_tensor_new(ctx, 1, &one, 0);
}

/* Shared body of codir_linear (gelu_first 0) and codir_gelu_linear (1). */
static codir_tensor *codir__linear_op(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b, int gelu_first)
{
    codir_tensor *out;
    codir_arena_pos mark;
    const float *inp;
    int C, OC, N, rg, rc;
    if (!x || !w) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    C = x->shape[x->ndim - 1];
    OC = w->shape[0];
    if (w->ndim != 2 || w->shape[1] != C || (b && (int)b->numel != OC))
        return codir__op_error(ctx, CODIR_ERR_INVALID,
                               "linear: input width %d does not match weight %s [%d, %d]", C,
                               w->name ? w->name : "", w->shape[0], w->shape[1]);
    N = (int)(x->numel / (size_t)(C ? C : 1));
    rg = codir__needs_grad(ctx, x, w, b);
    out = codir__new_like(ctx, x, OC);
    if (!out) return NULL;

    /* GELU(x) lives only for the product: the arena takes it back right after. */
    mark = codir_arena_mark(&ctx->arena);
    inp = x->data;
    if (gelu_first) {
        float *g = codir__scratch(ctx, x->numel);
        if (!g) return NULL;
        codir_gelu_forward(g, x->data, x->numel);
        inp = g;
    }
    rc = codir__linear_forward(ctx->gemm, out->data, inp, w->data, codir__usable_pack(w), b ? b->data : NULL, N, C, OC);
    codir_arena_rewind(&ctx->arena, mark);
    if (rc) return codir__op_failed(ctx, rc);
    if (rg && !codir__record(ctx, gelu_first ? CODIR__OP_GELU_LINEAR : CODIR__OP_LINEAR, out, x, w, b)) return NULL;
    return out;
}

CODIR_DEF codir_tensor *codir_linear(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b)
{
    return codir__linear_op(ctx, x, w, b, 0);
}

CODIR_DEF codir_tensor *codir_gelu_linear(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b)
{
    return codir__linear_op(ctx, x, w, b, 1);
}

static int codir__rows(const codir_tensor *x);

/* Returns 1 if a and b have the same shape. */
static int codir__same_shape(const codir_tensor *a, const codir_tensor *b)
{
    int d;
    if (a->ndim != b->ndim) return 0;
    for (d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d]) return 0;
    return 1;
}

CODIR_DEF codir_tensor *codir_add(codir_ctx *ctx, codir_tensor *a, codir_tensor *b)
{
    codir_tensor *out;
    int rg;
    if (!a || !b) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (!codir__same_shape(a, b)) return codir__op_error(ctx, CODIR_ERR_INVALID, "add: operand shapes differ");
    rg = codir__needs_grad(ctx, a, b, NULL);
    out = codir__new_like(ctx, a, a->shape[a->ndim - 1]);
    if (!out) return NULL;
    codir_add_forward(out->data, a->data, b->data, a->numel);
    if (rg && !codir__record(ctx, CODIR__OP_ADD, out, a, b, NULL)) return NULL;
    return out;
}

CODIR_DEF codir_tensor *codir_layernorm(codir_ctx *ctx, codir_tensor *x, codir_tensor *gamma,
                                        codir_tensor *beta, float eps)
{
    codir_tensor *out;
    codir_node *node = NULL;
    double *mean = NULL;
    float *rstd = NULL;
    int C, N, rg;
    if (!x || !gamma || !beta) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    C = x->shape[x->ndim - 1];
    if ((int)gamma->numel != C || (int)beta->numel != C)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "layernorm: gamma and beta must have %d values", C);
    N = (int)(x->numel / (size_t)(C ? C : 1));
    rg = codir__needs_grad(ctx, x, gamma, beta);
    out = codir__new_like(ctx, x, C);
    if (!out) return NULL;
    if (rg) {
        mean = (double *)codir_arena_alloc(&ctx->arena, (size_t)N * sizeof(double));
        rstd = codir__scratch(ctx, (size_t)N);
        if (!mean || !rstd) return NULL;
    }
    codir_layernorm_forward(out->data, mean, rstd, x->data, gamma->data, beta->data, N, C, eps);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_LAYERNORM, out, x, gamma, beta))) return NULL;
        node->saved_double = mean;
        node->saved[0] = rstd;
    }
    return out;
}

/* Shared body of the elementwise ops GELU and tanh. */
static codir_tensor *codir__unary(codir_ctx *ctx, codir_tensor *x, enum codir__op op)
{
    codir_tensor *out;
    int rg;
    if (!x) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    rg = codir__needs_grad(ctx, x, NULL, NULL);
    out = codir__new_like(ctx, x, x->shape[x->ndim - 1]);
    if (!out) return NULL;
    if (op == CODIR__OP_GELU) codir_gelu_forward(out->data, x->data, x->numel);
    if (op == CODIR__OP_TANH) codir_tanh_forward(out->data, x->data, x->numel);
    if (op == CODIR__OP_SOFTMAX) {
        int V = x->shape[x->ndim - 1];
        codir_softmax_forward(out->data, x->data, (int)(x->numel / (size_t)(V ? V : 1)), V);
    }
    if (rg && !codir__record(ctx, op, out, x, NULL, NULL)) return NULL;
    return out;
}

CODIR_DEF codir_tensor *codir_gelu(codir_ctx *ctx, codir_tensor *x) { return codir__unary(ctx, x, CODIR__OP_GELU); }
CODIR_DEF codir_tensor *codir_tanh(codir_ctx *ctx, codir_tensor *x) { return codir__unary(ctx, x, CODIR__OP_TANH); }
CODIR_DEF codir_tensor *codir_softmax(codir_ctx *ctx, codir_tensor *x) { return codir__unary(ctx, x, CODIR__OP_SOFTMAX); }

/* Arena scratch for the attention kernels on `threads` threads, or NULL after
   recording a failure. */
static float *codir__attention_scratch_alloc(codir_ctx *ctx, int T, int C, int NH, int threads)
{
    size_t floats;
    if (!codir__size_mul(codir_attention_scratch(T, C, NH), (size_t)threads, &floats)) {
        codir__op_error(ctx, CODIR_ERR_OVERFLOW, "attention: scratch for %d threads overflows size_t", threads);
        return NULL;
    }
    return codir__scratch(ctx, floats);
}

/* Shared body of codir_attention (first 0) and codir_attention_first (1). */
static codir_tensor *codir__attention_op(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask, int num_heads,
                                         int first)
{
    codir_tensor *out;
    codir_node *node;
    codir_arena_pos mark;
    float *att, *scratch;
    const char *name = first ? "attention_first" : "attention";
    int B, T, C, rg, threads, shape[3];
    size_t att_n;
    if (!qkv) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (qkv->ndim != 3 || qkv->shape[2] % 3 != 0)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "%s: qkv must be [B, T, 3C]", name);
    B = qkv->shape[0];
    T = qkv->shape[1];
    C = qkv->shape[2] / 3;
    if (num_heads < 1 || C % num_heads != 0)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "%s: %d heads do not divide width %d", name, num_heads, C);
    if (!mask || mask->numel != (size_t)B * T)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "%s: mask must be [%d, %d]", name, B, T);
    if (first && T < 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "%s: qkv has no token (T = 0), so there is no first query", name);
    if (!codir__size_mul((size_t)B * num_heads, (size_t)T * (first ? 1 : T), &att_n))
        return codir__op_error(ctx, CODIR_ERR_OVERFLOW, "%s: B * NH * T%s overflows size_t", name, first ? "" : " * T");
    rg = codir__needs_grad(ctx, qkv, NULL, NULL);
    shape[0] = B;
    shape[1] = first ? C : T;
    shape[2] = C;
    out = codir_tensor_new(ctx, first ? 2 : 3, shape, 0);
    if (!out) return NULL;
    /* Each thread keeps one head's scores in its scratch. Only the first query's
       probabilities are kept for the backward pass. The backward pass recomputes the
       full T x T ones: in examples/bench_step.c at T = 128 that added 3 to 5% to the
       L3-H192 training step and took 10 to 16% off the arena peaks. */
    att = NULL;
    if (rg && first && !(att = codir__scratch(ctx, att_n))) return NULL;
    /* The threads' scratch lives only for the kernel: the arena takes it back after. */
    threads = codir__attention_threads(INT_MAX, B * num_heads);
    mark = codir_arena_mark(&ctx->arena);
    if (!(scratch = codir__attention_scratch_alloc(ctx, T, C, num_heads, threads))) return NULL;
    if (first)
        codir_attention_first_forward(out->data, att, qkv->data, mask->data, B, T, C, num_heads, scratch, threads);
    else
        codir_attention_forward(out->data, att, qkv->data, mask->data, B, T, C, num_heads, scratch, threads);
    codir_arena_rewind(&ctx->arena, mark);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_ATTENTION, out, qkv, NULL, NULL))) return NULL;
        node->saved[0] = att;
        node->ints[0] = mask->data;
        node->dims[0] = num_heads;
        node->dims[1] = first;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_attention(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask, int num_heads)
{
    return codir__attention_op(ctx, qkv, mask, num_heads, 0);
}

CODIR_DEF codir_tensor *codir_attention_first(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask,
                                              int num_heads)
{
    return codir__attention_op(ctx, qkv, mask, num_heads, 1);
}

CODIR_DEF codir_tensor *codir_embedding(codir_ctx *ctx, const codir_itensor *ids, const codir_itensor *types,
                                        codir_tensor *tok, codir_tensor *pos, codir_tensor *type)
{
    codir_tensor *out;
    codir_node *node;
    int B, T, C, rg, shape[3];
    size_t i;
    if (!ids || !tok || !pos || !type) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    B = ids->shape[0];
    T = ids->ndim > 1 ? ids->shape[1] : 1;
    C = tok->shape[1];
    if (pos->shape[1] != C || type->shape[1] != C)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "embedding: tables have different widths");
    if (T > pos->shape[0])
        return codir__op_error(ctx, CODIR_ERR_INVALID,
                               "embedding: sequence length %d exceeds the %d positions of the model; "
                               "truncate inputs or raise max_len", T, pos->shape[0]);
    for (i = 0; i < ids->numel; i++)
        if (ids->data[i] < 0 || ids->data[i] >= tok->shape[0])
            return codir__op_error(ctx, CODIR_ERR_INVALID,
                                   "embedding: token id %d at position %zu is outside the vocabulary of %d",
                                   ids->data[i], i, tok->shape[0]);
    if (types) {
        if (types->numel != ids->numel)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "embedding: token types and ids differ in shape");
        for (i = 0; i < types->numel; i++)
            if (types->data[i] < 0 || types->data[i] >= type->shape[0])
                return codir__op_error(ctx, CODIR_ERR_INVALID,
                                       "embedding: token type %d at position %zu is outside 0..%d",
                                       types->data[i], i, type->shape[0] - 1);
    }
    rg = codir__needs_grad(ctx, tok, pos, type);
    shape[0] = B;
    shape[1] = T;
    shape[2] = C;
    out = codir_tensor_new(ctx, 3, shape, 0);
    if (!out) return NULL;
    codir_embedding_forward(out->data, ids->data, types ? types->data : NULL, tok->data, pos->data, type->data,
                            B, T, C);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_EMBEDDING, out, tok, pos, type))) return NULL;
        node->ints[0] = ids->data;
        node->ints[1] = types ? types->data : NULL;
        node->dims[0] = B;
        node->dims[1] = T;
    }
    return out;
}

/* Returns the next dropout op's key. A mask depends on the seed, the step and the op's
   position in the step only, so a fused op that draws at the same position draws the
   same mask. */
static uint64_t codir__next_dropout_key(codir_ctx *ctx)
{
    return codir__hash64(codir__hash64(ctx->seed, ctx->step), ctx->dropout_calls++);
}

CODIR_DEF codir_tensor *codir_dropout(codir_ctx *ctx, codir_tensor *x, float p)
{
    codir_tensor *out;
    codir_node *node;
    uint64_t key;
    int rg;
    if (!x) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (!(p >= 0.0f && p < 1.0f))
        return codir__op_error(ctx, CODIR_ERR_INVALID, "dropout: probability %g is outside [0, 1)", (double)p);
    if (!ctx->training || p == 0.0f) return x;

    key = codir__next_dropout_key(ctx);
    rg = codir__needs_grad(ctx, x, NULL, NULL);
    out = codir__new_like(ctx, x, x->shape[x->ndim - 1]);
    if (!out) return NULL;
    codir_dropout_forward(out->data, x->data, x->numel, p, key);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_DROPOUT, out, x, NULL, NULL))) return NULL;
        node->scalar = p;
        node->key = key;
    }
    return out;
}

/* x + dropout(a, p), written into a fresh tensor, or over a's values when in_place
   is 1. The block uses that for the output of a linear op, which no backward step
   reads: it saves one [N, C] activation per residual connection. */
static codir_tensor *codir__add_dropout(codir_ctx *ctx, codir_tensor *x, codir_tensor *a, float p, int in_place)
{
    codir_tensor *out;
    codir_node *node;
    uint64_t key = 0;
    int rg, drop;
    if (!x || !a) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (!(p >= 0.0f && p < 1.0f))
        return codir__op_error(ctx, CODIR_ERR_INVALID, "dropout: probability %g is outside [0, 1)", (double)p);
    if (!codir__same_shape(x, a)) return codir__op_error(ctx, CODIR_ERR_INVALID, "add: operand shapes differ");
    drop = ctx->training && p != 0.0f;

    if (drop) key = codir__next_dropout_key(ctx);
    rg = codir__needs_grad(ctx, x, a, NULL);
    if (in_place) {
        if (!(out = (codir_tensor *)codir_arena_alloc(&ctx->arena, sizeof *out))) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
        *out = *a;
        out->grad = NULL;
        out->node = 0;
        out->retain_grad = 0;
    } else if (!(out = codir__new_like(ctx, x, x->shape[x->ndim - 1]))) {
        return NULL;
    }
    if (drop) codir_dropout_forward(out->data, a->data, a->numel, p, key);
    codir_add_forward(out->data, x->data, drop ? out->data : a->data, x->numel);
    if (rg) {
        if (!(node = codir__record(ctx, drop ? CODIR__OP_ADD_DROPOUT : CODIR__OP_ADD, out, x, a, NULL))) return NULL;
        node->scalar = p;
        node->key = key;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_add_dropout(codir_ctx *ctx, codir_tensor *x, codir_tensor *a, float p)
{
    return codir__add_dropout(ctx, x, a, p, 0);
}

/* Shared body of the [B,T,C] -> [B,C] poolings. */
static codir_tensor *codir__pool(codir_ctx *ctx, codir_tensor *x, const codir_itensor *mask, enum codir__op op)
{
    codir_tensor *out;
    codir_node *node;
    int rg, shape[2];
    if (!x) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (x->ndim != 3) return codir__op_error(ctx, CODIR_ERR_INVALID, "pooling: input must be [B, T, C]");
    if (mask && mask->numel != (size_t)x->shape[0] * x->shape[1])
        return codir__op_error(ctx, CODIR_ERR_INVALID, "pooling: mask must be [%d, %d]", x->shape[0], x->shape[1]);
    rg = codir__needs_grad(ctx, x, NULL, NULL);
    shape[0] = x->shape[0];
    shape[1] = x->shape[2];
    out = codir_tensor_new(ctx, 2, shape, 0);
    if (!out) return NULL;
    if (op == CODIR__OP_SELECT_FIRST)
        codir_select_first_forward(out->data, x->data, x->shape[0], x->shape[1], x->shape[2]);
    else
        codir_mean_pool_forward(out->data, x->data, mask->data, x->shape[0], x->shape[1], x->shape[2]);
    if (rg) {
        if (!(node = codir__record(ctx, op, out, x, NULL, NULL))) return NULL;
        node->ints[0] = mask ? mask->data : NULL;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_select_first(codir_ctx *ctx, codir_tensor *x)
{
    return codir__pool(ctx, x, NULL, CODIR__OP_SELECT_FIRST);
}

CODIR_DEF codir_tensor *codir_mean_pool(codir_ctx *ctx, codir_tensor *x, const codir_itensor *mask)
{
    if (!mask) return codir__op_error(ctx, CODIR_ERR_INVALID, "mean pooling needs a mask");
    return codir__pool(ctx, x, mask, CODIR__OP_MEAN_POOL);
}

/* Allocates the widths and input pointers of a concat of xs[count] in the arena. */
static codir_tensor *codir__concat_run(codir_ctx *ctx, codir_tensor *const *xs, int count, codir_tensor *out,
                                       int **widths_out)
{
    const float **inps = (const float **)codir_arena_alloc(&ctx->arena, (size_t)count * sizeof(float *));
    int *widths = (int *)codir_arena_alloc(&ctx->arena, (size_t)count * sizeof(int));
    int i;
    if (!inps || !widths) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
    for (i = 0; i < count; i++) {
        inps[i] = xs[i]->data;
        widths[i] = xs[i]->shape[1];
    }
    codir_concat_forward(out->data, inps, widths, count, out->shape[0]);
    *widths_out = widths;
    return out;
}

CODIR_DEF codir_tensor *codir_concat(codir_ctx *ctx, codir_tensor *const *xs, int count)
{
    codir_tensor *out, **list;
    codir_node *node;
    int i, total = 0, rg = 0, shape[2], *widths;
    if (count < 1) return codir__op_error(ctx, CODIR_ERR_INVALID, "concat needs at least one input");
    for (i = 0; i < count; i++) {
        if (!xs[i]) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
        if (xs[i]->ndim != 2 || xs[i]->shape[0] != xs[0]->shape[0])
            return codir__op_error(ctx, CODIR_ERR_INVALID, "concat: input %d is not [%d, C]", i, xs[0]->shape[0]);
        if (total > INT_MAX - xs[i]->shape[1])
            return codir__op_error(ctx, CODIR_ERR_OVERFLOW, "concat: total width overflows int");
        total += xs[i]->shape[1];
        rg |= codir__needs_grad(ctx, xs[i], NULL, NULL);
    }
    shape[0] = xs[0]->shape[0];
    shape[1] = total;
    out = codir_tensor_new(ctx, 2, shape, 0);
    if (!out || !codir__concat_run(ctx, xs, count, out, &widths)) return NULL;
    if (rg) {
        list = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)count * sizeof *list);
        if (!list) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
        for (i = 0; i < count; i++) list[i] = xs[i];
        if (!(node = codir__record(ctx, CODIR__OP_CONCAT, out, NULL, NULL, NULL))) return NULL;
        node->list = list;
        node->count = count;
        node->ints[0] = widths;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_gather_rows(codir_ctx *ctx, codir_tensor *x, const int *rows, int count)
{
    codir_tensor *out;
    codir_node *node;
    int C, N, rg, shape[2], p;
    if (!x || (count > 0 && !rows)) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    C = x->shape[x->ndim - 1];
    N = codir__rows(x);
    if (count < 1) return codir__op_error(ctx, CODIR_ERR_INVALID, "gather: %d rows requested; need at least 1", count);
    for (p = 0; p < count; p++)
        if (rows[p] < 0 || rows[p] >= N)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "gather: row %d is outside 0..%d", rows[p], N - 1);
    rg = codir__needs_grad(ctx, x, NULL, NULL);
    shape[0] = count;
    shape[1] = C;
    out = codir_tensor_new(ctx, 2, shape, 0);
    if (!out) return NULL;
    codir_gather_rows_forward(out->data, x->data, rows, count, C);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_GATHER_ROWS, out, x, NULL, NULL))) return NULL;
        node->ints[0] = rows;
    }
    return out;
}

/* eps of F.normalize's default, so a zero row stays zero. */
#define CODIR__NORMALIZE_EPS 1e-12f

CODIR_DEF codir_tensor *codir_l2_normalize(codir_ctx *ctx, codir_tensor *x)
{
    codir_tensor *out;
    codir_node *node;
    float *norm;
    int rg, N, C;
    if (!x) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    C = x->shape[x->ndim - 1];
    N = (int)(x->numel / (size_t)(C ? C : 1));
    rg = codir__needs_grad(ctx, x, NULL, NULL);
    out = codir__new_like(ctx, x, C);
    norm = codir__scratch(ctx, (size_t)N);
    if (!out || !norm) return NULL;
    codir_l2_normalize_forward(out->data, norm, x->data, N, C, CODIR__NORMALIZE_EPS);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_L2_NORMALIZE, out, x, NULL, NULL))) return NULL;
        node->saved[0] = norm;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_cross_entropy(codir_ctx *ctx, codir_tensor *logits, const codir_itensor *targets)
{
    codir_tensor *out;
    codir_node *node;
    float *probs;
    int N, V, rg, i;
    if (!logits || !targets) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    V = logits->shape[logits->ndim - 1];
    N = (int)(logits->numel / (size_t)(V ? V : 1));
    if ((int)targets->numel != N)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "cross-entropy: %zu targets for %d rows", targets->numel, N);
    for (i = 0; i < N; i++)
        if (targets->data[i] < 0 || targets->data[i] >= V)
            return codir__op_error(ctx, CODIR_ERR_INVALID,
                                   "cross-entropy: label %d of row %d is outside 0..%d", targets->data[i], i, V - 1);
    rg = codir__needs_grad(ctx, logits, NULL, NULL);
    out = codir__new_scalar(ctx);
    probs = codir__scratch(ctx, logits->numel);
    if (!out || !probs) return NULL;
    out->data[0] = (float)codir_cross_entropy_forward(probs, logits->data, targets->data, N, V);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_CROSS_ENTROPY, out, logits, NULL, NULL))) return NULL;
        node->saved[0] = probs;
        node->ints[0] = targets->data;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_mse(codir_ctx *ctx, codir_tensor *pred, const float *target)
{
    codir_tensor *out;
    codir_node *node;
    int rg;
    if (!pred || !target) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    rg = codir__needs_grad(ctx, pred, NULL, NULL);
    out = codir__new_scalar(ctx);
    if (!out) return NULL;
    out->data[0] = (float)codir_mse_forward(pred->data, target, (int)pred->numel);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_MSE, out, pred, NULL, NULL))) return NULL;
        node->floats = target;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_kl_div(codir_ctx *ctx, codir_tensor *student, codir_tensor *teacher, float temperature)
{
    codir_tensor *out;
    codir_node *node;
    float *ps, *pt;
    int N, V, rg;
    if (!student || !teacher) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (!codir__same_shape(student, teacher))
        return codir__op_error(ctx, CODIR_ERR_INVALID, "KD loss: student and teacher logits differ in shape");
    if (!(temperature > 0.0f) || !isfinite(temperature))
        return codir__op_error(ctx, CODIR_ERR_INVALID, "KD loss: temperature %g must be positive and finite",
                               (double)temperature);
    V = student->shape[student->ndim - 1];
    N = (int)(student->numel / (size_t)(V ? V : 1));
    rg = codir__needs_grad(ctx, student, NULL, NULL);
    out = codir__new_scalar(ctx);
    ps = codir__scratch(ctx, student->numel);
    pt = codir__scratch(ctx, student->numel);
    if (!out || !ps || !pt) return NULL;
    out->data[0] = (float)codir_kl_div_forward(ps, pt, student->data, teacher->data, N, V, temperature);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_KL_DIV, out, student, NULL, NULL))) return NULL;
        node->saved[0] = ps;
        node->saved[1] = pt;
        node->scalar = temperature;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_infonce(codir_ctx *ctx, codir_tensor *zs, codir_tensor *zt, const float *bank,
                                      int bank_rows, const int *neg, int K, float tau)
{
    codir_tensor *out;
    codir_node *node;
    float *probs;
    int B, D, rg, i;
    if (!zs || !zt || !bank || (K > 0 && !neg)) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (!codir__same_shape(zs, zt) || zs->ndim != 2)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "InfoNCE: student and teacher projections must both be [B, D]");
    if (!(tau > 0.0f) || !isfinite(tau))
        return codir__op_error(ctx, CODIR_ERR_INVALID, "InfoNCE: temperature tau %g must be positive", (double)tau);
    if (K < 0) return codir__op_error(ctx, CODIR_ERR_INVALID, "InfoNCE: K = %d negatives is negative", K);
    B = zs->shape[0];
    D = zs->shape[1];
    for (i = 0; i < B * K; i++)
        if (neg[i] < 0 || neg[i] >= bank_rows)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "InfoNCE: negative %d is outside the bank of %d rows",
                                   neg[i], bank_rows);
    rg = codir__needs_grad(ctx, zs, zt, NULL);
    out = codir__new_scalar(ctx);
    probs = codir__scratch(ctx, (size_t)B * (size_t)(K + 1));
    if (!out || !probs) return NULL;
    out->data[0] = (float)codir_infonce_forward(probs, zs->data, zt->data, bank, neg, B, D, K, tau);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_INFONCE, out, zs, zt, NULL))) return NULL;
        node->saved[0] = probs;
        node->floats = bank;
        node->ints[0] = neg;
        node->dims[0] = K;
        node->scalar = tau;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_nce(codir_ctx *ctx, codir_tensor *anchor, const float *bank, int bank_rows,
                                  const int *idx, int K, float tau, double log_z, int num_data)
{
    codir_tensor *out;
    codir_node *node;
    float *logp;
    double log_c;
    int B, D, rg, i;
    if (!anchor || !bank || !idx) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (anchor->ndim != 2) return codir__op_error(ctx, CODIR_ERR_INVALID, "NCE: the anchor must be [B, D]");
    if (!(tau > 0.0f) || !isfinite(tau))
        return codir__op_error(ctx, CODIR_ERR_INVALID, "NCE: temperature tau %g must be positive", (double)tau);
    if (K < 1 || num_data <= K)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "NCE: needs 1 <= K < N, got K = %d and N = %d", K, num_data);
    if (!isfinite(log_z)) return codir__op_error(ctx, CODIR_ERR_INVALID, "NCE: log normalizer %g is not finite", log_z);
    B = anchor->shape[0];
    D = anchor->shape[1];
    for (i = 0; i < B * (K + 1); i++)
        if (idx[i] < 0 || idx[i] >= bank_rows)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "NCE: bank row %d is outside the bank of %d rows", idx[i],
                                   bank_rows);
    log_c = log((double)K / (double)num_data);
    rg = codir__needs_grad(ctx, anchor, NULL, NULL);
    out = codir__new_scalar(ctx);
    logp = codir__scratch(ctx, (size_t)B * (size_t)(K + 1));
    if (!out || !logp) return NULL;
    out->data[0] = (float)codir_nce_forward(logp, anchor->data, bank, idx, B, D, K, tau, log_z, log_c);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_NCE, out, anchor, NULL, NULL))) return NULL;
        node->saved[0] = logp;
        node->floats = bank;
        node->ints[0] = idx;
        node->dims[0] = K;
        node->scalar = tau;
        node->scalar_double = log_c;
    }
    return out;
}

CODIR_DEF codir_tensor *codir_weighted_sum(codir_ctx *ctx, codir_tensor *const *terms, const float *weights, int count)
{
    codir_tensor *out, **list;
    codir_node *node;
    float *w;
    double sum = 0.0;
    int i, rg = 0;
    if (count < 0) return codir__op_error(ctx, CODIR_ERR_INVALID, "weighted sum: count %d is negative", count);
    for (i = 0; i < count; i++) {
        if (!terms[i] && weights[i] != 0.0f) {
            if (ctx->status) return codir__op_failed(ctx, ctx->status); /* an earlier op failed and said why */
            return codir__op_error(ctx, CODIR_ERR_INVALID, "weighted sum: term %d is NULL but its weight is %g", i,
                                   (double)weights[i]);
        }
        if (terms[i] && terms[i]->numel != 1)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "weighted sum: term %d is not a scalar", i);
        if (terms[i]) rg |= codir__needs_grad(ctx, terms[i], NULL, NULL);
    }
    out = codir__new_scalar(ctx);
    list = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)(count ? count : 1) * sizeof *list);
    w = codir__scratch(ctx, (size_t)(count ? count : 1));
    if (!out || !list || !w) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_NOMEM);
    for (i = 0; i < count; i++) {
        list[i] = weights[i] != 0.0f ? terms[i] : NULL;
        w[i] = weights[i];
        if (list[i]) sum += (double)w[i] * list[i]->data[0];
    }
    out->data[0] = (float)sum;
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_WEIGHTED_SUM, out, NULL, NULL, NULL))) return NULL;
        node->list = list;
        node->count = count;
        node->floats = w;
    }
    return out;
}

/* Number of rows of x when its last dimension is the feature dimension. */
static int codir__rows(const codir_tensor *x)
{
    int C = x->shape[x->ndim - 1];
    return (int)(x->numel / (size_t)(C ? C : 1));
}

/* Runs the backward kernel of one node. */
static int codir__node_backward(codir_ctx *ctx, const codir_node *n)
{
    codir_tensor *x = n->in[0], *y = n->in[1], *z = n->in[2], *out = n->out;
    float *dx = x ? x->grad : NULL;
    int i;
    switch (n->op) {
    case CODIR__OP_LINEAR: {
        int C = x->shape[x->ndim - 1], OC = y->shape[0];
        return codir_linear_backward(ctx->gemm, dx, y->grad, z ? z->grad : NULL, out->grad, x->data, y->data,
                                     codir__rows(x), C, OC);
    }
    case CODIR__OP_GELU_LINEAR: {
        /* One [N, F] scratch g: it first takes dg = dL/dg, then one pass adds
           dg GELU'(x) to dx and writes GELU(x) over dg, for the weight gradient. */
        int C = x->shape[x->ndim - 1], OC = y->shape[0], N = codir__rows(x), rc;
        float *g = codir__scratch(ctx, x->numel);
        if (!g) return ctx->status ? ctx->status : CODIR_ERR_NOMEM;
        if (dx) {
            rc = codir_gemm(ctx->gemm, 0, 0, N, C, OC, 1.0f, out->grad, OC, y->data, C, 0.0f, g, C);
            if (rc) return rc;
            codir__gelu_regrad_blocks(g, dx, x->data, x->numel);
        } else {
            codir_gelu_forward(g, x->data, x->numel);
        }
        return codir_linear_backward(ctx->gemm, NULL, y->grad, z ? z->grad : NULL, out->grad, g, y->data, N, C, OC);
    }
    case CODIR__OP_ADD:
        codir_add_backward(dx, y->grad, out->grad, out->numel);
        break;
    case CODIR__OP_ADD_DROPOUT:
        codir_add_backward(dx, NULL, out->grad, out->numel);
        if (y->grad) codir_dropout_backward(y->grad, out->grad, out->numel, n->scalar, n->key);
        break;
    case CODIR__OP_LAYERNORM: {
        int C = x->shape[x->ndim - 1];
        codir_layernorm_backward(dx, y->grad, z->grad, out->grad, x->data, y->data, n->saved_double, n->saved[0],
                                 codir__rows(x), C);
        break;
    }
    case CODIR__OP_GELU:
        if (dx) codir_gelu_backward(dx, x->data, out->grad, x->numel);
        break;
    case CODIR__OP_TANH:
        if (dx) codir_tanh_backward(dx, out->data, out->grad, x->numel);
        break;
    case CODIR__OP_SOFTMAX: {
        int V = x->shape[x->ndim - 1];
        if (dx) codir_softmax_backward(dx, out->data, out->grad, codir__rows(x), V);
        break;
    }
    case CODIR__OP_ATTENTION: {
        int B = x->shape[0], T = x->shape[1], C = x->shape[2] / 3, NH = n->dims[0];
        int threads = codir__attention_threads(INT_MAX, B * NH);
        float *scratch;
        if (!dx) break;
        if (!(scratch = codir__attention_scratch_alloc(ctx, T, C, NH, threads)))
            return ctx->status ? ctx->status : CODIR_ERR_NOMEM;
        if (n->dims[1])
            codir_attention_first_backward(dx, out->grad, x->data, n->saved[0], n->ints[0], B, T, C, NH, scratch,
                                           threads);
        else
            codir_attention_backward(dx, out->grad, x->data, n->saved[0], n->ints[0], B, T, C, NH, scratch, threads);
        break;
    }
    case CODIR__OP_EMBEDDING: {
        int B = n->dims[0], T = n->dims[1], C = x->shape[1];
        int *order = (int *)codir_arena_alloc(&ctx->arena, (size_t)B * T * sizeof(int));
        float *row = codir__scratch(ctx, (size_t)C);
        if (!order || !row) return ctx->status ? ctx->status : CODIR_ERR_NOMEM;
        codir_embedding_backward(x->grad, y->grad, z->grad, out->grad, n->ints[0], n->ints[1], B, T, C, order, row);
        break;
    }
    case CODIR__OP_DROPOUT:
        if (dx) codir_dropout_backward(dx, out->grad, x->numel, n->scalar, n->key);
        break;
    case CODIR__OP_SELECT_FIRST:
        if (dx) codir_select_first_backward(dx, out->grad, x->shape[0], x->shape[1], x->shape[2]);
        break;
    case CODIR__OP_MEAN_POOL:
        if (dx) codir_mean_pool_backward(dx, out->grad, n->ints[0], x->shape[0], x->shape[1], x->shape[2]);
        break;
    case CODIR__OP_CONCAT: {
        float **dinps = (float **)codir_arena_alloc(&ctx->arena, (size_t)n->count * sizeof(float *));
        if (!dinps) return CODIR_ERR_NOMEM;
        for (i = 0; i < n->count; i++) dinps[i] = n->list[i]->grad;
        codir_concat_backward(dinps, out->grad, n->ints[0], n->count, out->shape[0]);
        break;
    }
    case CODIR__OP_GATHER_ROWS:
        if (dx) codir_gather_rows_backward(dx, out->grad, n->ints[0], out->shape[0], out->shape[1]);
        break;
    case CODIR__OP_L2_NORMALIZE: {
        int C = x->shape[x->ndim - 1];
        if (dx) codir_l2_normalize_backward(dx, out->grad, out->data, n->saved[0], codir__rows(x), C, CODIR__NORMALIZE_EPS);
        break;
    }
    case CODIR__OP_CROSS_ENTROPY: {
        int V = x->shape[x->ndim - 1];
        if (dx) codir_cross_entropy_backward(dx, n->saved[0], n->ints[0], out->grad[0], codir__rows(x), V);
        break;
    }
    case CODIR__OP_MSE:
        if (dx) codir_mse_backward(dx, x->data, n->floats, out->grad[0], (int)x->numel);
        break;
    case CODIR__OP_KL_DIV: {
        int V = x->shape[x->ndim - 1];
        if (dx) codir_kl_div_backward(dx, n->saved[0], n->saved[1], out->grad[0], codir__rows(x), V, n->scalar);
        break;
    }
    case CODIR__OP_INFONCE:
        codir_infonce_backward(dx, y->grad, n->saved[0], x->data, y->data, n->floats, n->ints[0], out->grad[0],
                               x->shape[0], x->shape[1], n->dims[0], n->scalar);
        break;
    case CODIR__OP_NCE:
        if (dx)
            codir_nce_backward(dx, n->saved[0], n->floats, n->ints[0], out->grad[0], x->shape[0], x->shape[1],
                               n->dims[0], n->scalar, n->scalar_double);
        break;
    case CODIR__OP_WEIGHTED_SUM:
        for (i = 0; i < n->count; i++)
            if (n->list[i] && n->list[i]->grad) n->list[i]->grad[0] += n->floats[i] * out->grad[0];
        break;
    case CODIR__OP_COUNT:
        CODIR_ASSERT(0 && "invalid op on the tape");
        break;
    }
    return CODIR_OK;
}

/* Input slot k of node n: in[0..2], then the concat inputs or sum terms. Returns the
   tensor when it is an op output (one whose gradient the walk manages), else NULL. It
   may be a struct copy of the output (a reshape); the tape's own tensor is
   codir__recorded(ctx, t). */
static codir_tensor *codir__node_input(const codir_node *n, int k)
{
    codir_tensor *t = k < 3 ? n->in[k] : n->list[k - 3];
    return t && t->node ? t : NULL;
}

static codir_tensor *codir__recorded(const codir_ctx *ctx, const codir_tensor *t) { return ctx->tape[t->node - 1].out; }

/* Checks that every op-output input of the tape, and the loss, is an output of this
   tape or a struct copy of one with the same number of values. A codir_retain_grad on
   a copy passes to the output. */
static int codir__check_tape_inputs(codir_ctx *ctx, const codir_tensor *loss)
{
    int i, k;
    if (!loss || loss->numel != 1 || !loss->node || loss->node > ctx->tape_len ||
        codir__recorded(ctx, loss)->numel != 1)
        return codir__fail(CODIR_ERR_INVALID, "backward needs a scalar loss recorded on this context's tape since the "
                           "last codir_ctx_begin");
    for (i = 0; i < ctx->tape_len; i++)
        for (k = 0; k < 3 + ctx->tape[i].count; k++) {
            const codir_tensor *t = codir__node_input(&ctx->tape[i], k);
            if (t && (t->node > i || codir__recorded(ctx, t)->numel != t->numel))
                return codir__fail(CODIR_ERR_INVALID,
                                   "backward: input %d of op %d is not an output of an earlier op of this step, "
                                   "nor a copy of one with the same number of values", k, i);
            if (t && t->retain_grad) codir__recorded(ctx, t)->retain_grad = 1; /* asked on a copy */
        }
    return CODIR_OK;
}

/* A gradient buffer alive in the pool during the backward walk: [begin, end) bytes. */
typedef struct codir__span {
    size_t begin, end;
    int node;
} codir__span;

/* Places `bytes` at the lowest offset where they fit between the live spans (first
   fit), keeps spans sorted by offset and returns the offset. */
static size_t codir__pool_place(codir__span *live, int *count, size_t bytes, int node, size_t *top)
{
    size_t at = 0;
    int k;
    for (k = 0; k < *count; k++) {
        if (live[k].begin - at >= bytes) break;
        at = live[k].end;
    }
    memmove(live + k + 1, live + k, (size_t)(*count - k) * sizeof *live);
    live[k].begin = at;
    live[k].end = at + bytes;
    live[k].node = node;
    (*count)++;
    if (at + bytes > *top) *top = at + bytes;
    return at;
}

static void codir__pool_release(codir__span *live, int *count, int node)
{
    int k;
    for (k = 0; k < *count; k++)
        if (live[k].node == node) {
            memmove(live + k, live + k + 1, (size_t)(*count - k - 1) * sizeof *live);
            (*count)--;
            return;
        }
}

/* Bytes of an op output's gradient, rounded to the arena's alignment. */
static size_t codir__grad_bytes(const codir_tensor *t)
{
    return (t->numel * sizeof(float) + CODIR__ALIGN - 1) / CODIR__ALIGN * CODIR__ALIGN;
}

CODIR_DEF void codir_retain_grad(codir_tensor *t)
{
    if (t && t->node) t->retain_grad = 1;
}

CODIR_DEF int codir_backward_scaled(codir_ctx *ctx, codir_tensor *loss, float seed)
{
    codir_arena_pos mark, node_mark;
    codir__span *live;
    size_t *offset, top = 0;
    unsigned char *used;
    char *pool;
    int i, k, num_live = 0, n = ctx->tape_len, rc;
    if (ctx->status) return codir__fail(ctx->status, "backward after a failed forward op: %s", codir_last_error());
    rc = codir__check_tape_inputs(ctx, loss);
    if (rc) return rc;
    loss = codir__recorded(ctx, loss);

    /* Retained gradients are allocated once and outlive the pool; like every op
       output's gradient they restart from zero on each pass. */
    for (i = 0; i < n; i++) {
        codir_tensor *t = ctx->tape[i].out;
        if (!t->retain_grad) continue;
        if (!t->grad && !(t->grad = (float *)codir_arena_alloc(&ctx->arena, codir__grad_bytes(t))))
            return ctx->status = CODIR_ERR_NOMEM;
        memset(t->grad, 0, t->numel * sizeof(float));
    }

    /* Pass 1 plays the walk without running it. A node runs when its output has a
       gradient; that gradient lives from the step of the last node that reads the
       output (the first to run) down to the node's own step. */
    mark = codir_arena_mark(&ctx->arena);
    offset = (size_t *)codir_arena_alloc(&ctx->arena, (size_t)n * sizeof *offset);
    used = (unsigned char *)codir_arena_alloc(&ctx->arena, (size_t)n);
    live = (codir__span *)codir_arena_alloc(&ctx->arena, (size_t)(n + 1) * sizeof *live);
    if (!offset || !used || !live) {
        codir_arena_rewind(&ctx->arena, mark);
        return ctx->status = CODIR_ERR_NOMEM;
    }
    memset(used, 0, (size_t)n);
    used[loss->node - 1] = 1;
    if (!loss->retain_grad) offset[loss->node - 1] = codir__pool_place(live, &num_live, codir__grad_bytes(loss), loss->node, &top);
    for (i = n - 1; i >= 0; i--) {
        if (!used[i]) continue;
        for (k = 0; k < 3 + ctx->tape[i].count; k++) {
            codir_tensor *t = codir__node_input(&ctx->tape[i], k);
            if (!t || used[t->node - 1]) continue;
            t = codir__recorded(ctx, t);
            used[t->node - 1] = 1;
            if (!t->retain_grad) offset[t->node - 1] = codir__pool_place(live, &num_live, codir__grad_bytes(t), t->node, &top);
        }
        codir__pool_release(live, &num_live, i + 1);
    }

    /* Pass 2 runs it: a gradient buffer is zeroed where pass 1 placed it when its
       first writer runs and dropped after its own node's step. A struct copy of an
       output gets the output's buffer. */
    pool = (char *)codir_arena_alloc(&ctx->arena, top ? top : 1);
    if (!pool) {
        codir_arena_rewind(&ctx->arena, mark);
        return ctx->status = CODIR_ERR_NOMEM;
    }
    for (i = 0; i < n; i++) used[i] = 0;
    if (!loss->retain_grad) loss->grad = (float *)(pool + offset[loss->node - 1]);
    loss->grad[0] = seed;
    used[loss->node - 1] = 1;
    node_mark = codir_arena_mark(&ctx->arena);
    for (i = n - 1; i >= 0 && !rc; i--) {
        codir_node *node = &ctx->tape[i];
        if (!used[i]) continue;
        for (k = 0; k < 3 + node->count; k++) {
            codir_tensor *t = codir__node_input(node, k), *o;
            if (!t) continue;
            o = codir__recorded(ctx, t);
            if (!used[o->node - 1]) {
                used[o->node - 1] = 1;
                if (!o->retain_grad) {
                    o->grad = (float *)(pool + offset[o->node - 1]);
                    codir__zero_floats(o->grad, o->numel);
                }
            }
            t->grad = o->grad;
        }
        rc = codir__node_backward(ctx, node);
        if (!node->out->retain_grad) node->out->grad = NULL;
        codir_arena_rewind(&ctx->arena, node_mark); /* the node's scratch */
    }

    /* Gradients of op outputs, and of their copies, end with the walk. */
    for (i = 0; i < n; i++) {
        codir_tensor *o = ctx->tape[i].out;
        if (!o->retain_grad) o->grad = NULL;
        for (k = 0; k < 3 + ctx->tape[i].count; k++) {
            codir_tensor *t = codir__node_input(&ctx->tape[i], k);
            if (t) t->grad = codir__recorded(ctx, t)->grad;
        }
    }
    codir_arena_rewind(&ctx->arena, mark);
    return rc;
}

CODIR_DEF int codir_backward(codir_ctx *ctx, codir_tensor *loss) { return codir_backward_scaled(ctx, loss, 1.0f); }

/* ===================================================================================
   6. Transformer (implementation)
   =================================================================================== */

CODIR_DEF codir_config codir_config_default(void)
{
    codir_config cfg;
    cfg.vocab_size = 8192;
    cfg.max_len = 128;
    cfg.type_vocab_size = 2;
    cfg.num_layers = 4;
    cfg.hidden = 256;
    cfg.num_heads = 4;
    cfg.ffn = 1024;
    cfg.num_labels = 2;
    cfg.mlm_head = 0;
    cfg.dropout = 0.1f;
    cfg.ln_eps = 1e-12f;
    return cfg;
}

CODIR_DEF int codir_config_check(const codir_config *cfg)
{
    if (cfg->vocab_size < 5)
        return codir__fail(CODIR_ERR_INVALID, "vocab_size %d is too small: it needs the 5 special tokens", cfg->vocab_size);
    if (cfg->max_len < 2) return codir__fail(CODIR_ERR_INVALID, "max_len %d must be at least 2", cfg->max_len);
    if (cfg->type_vocab_size < 1)
        return codir__fail(CODIR_ERR_INVALID, "type_vocab_size %d must be at least 1", cfg->type_vocab_size);
    if (cfg->num_layers < 1) return codir__fail(CODIR_ERR_INVALID, "num_layers %d must be at least 1", cfg->num_layers);
    if (cfg->hidden < 1) return codir__fail(CODIR_ERR_INVALID, "hidden %d must be positive", cfg->hidden);
    if (cfg->num_heads < 1 || cfg->hidden % cfg->num_heads != 0)
        return codir__fail(CODIR_ERR_INVALID, "num_heads %d must be positive and divide hidden %d", cfg->num_heads,
                           cfg->hidden);
    if (cfg->ffn < 1) return codir__fail(CODIR_ERR_INVALID, "ffn %d must be positive", cfg->ffn);
    if (cfg->num_labels < 1) return codir__fail(CODIR_ERR_INVALID, "num_labels %d must be positive", cfg->num_labels);
    if (cfg->hidden > INT_MAX / 3 || cfg->hidden > INT_MAX / cfg->num_layers)
        return codir__fail(CODIR_ERR_OVERFLOW, "hidden %d is too large", cfg->hidden);
    if (!(cfg->dropout >= 0.0f && cfg->dropout < 1.0f))
        return codir__fail(CODIR_ERR_INVALID, "dropout %g must be in [0, 1)", (double)cfg->dropout);
    if (!(cfg->ln_eps > 0.0f)) return codir__fail(CODIR_ERR_INVALID, "ln_eps %g must be positive", (double)cfg->ln_eps);
    if (cfg->mlm_head != 0 && cfg->mlm_head != 1)
        return codir__fail(CODIR_ERR_INVALID, "mlm_head %d must be 0 or 1", cfg->mlm_head);
    return CODIR_OK;
}

/* Appends a spec to specs[*n]; the name is formatted into names[*n]. */
static void codir__spec(codir_param_spec *specs, char (*names)[48], int *n, int no_decay, int d0, int d1,
                        const char *fmt, int layer)
{
    codir_param_spec *s = &specs[*n];
    snprintf(names[*n], sizeof names[*n], fmt, layer);
    s->name = names[*n];
    s->ndim = d1 > 0 ? 2 : 1;
    s->shape[0] = d0;
    s->shape[1] = d1 > 0 ? d1 : 1;
    s->shape[2] = 1;
    s->shape[3] = 1;
    s->no_decay = no_decay;
    (*n)++;
}

/* Standard normal deviate by the Box-Muller transform. */
static float codir__normal(uint64_t *rng)
{
    double u1 = ((double)(codir__splitmix64(rng) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(codir__splitmix64(rng) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

#define CODIR__TENSORS_PER_LAYER 12

CODIR_DEF codir_model *codir_model_create(const codir_config *cfg, uint64_t seed)
{
    codir_model *m;
    codir_param_spec *specs;
    char (*names)[48];
    int C, F, L, n = 0, l, i, max_specs, rc;
    uint64_t rng = seed;
    if (codir_config_check(cfg)) return NULL;
    C = cfg->hidden;
    F = cfg->ffn;
    L = cfg->num_layers;
    max_specs = 14 + CODIR__TENSORS_PER_LAYER * L;
    m = (codir_model *)codir__calloc(1, sizeof *m);
    specs = (codir_param_spec *)codir__calloc((size_t)max_specs, sizeof *specs);
    names = (char(*)[48])codir__calloc((size_t)max_specs, 48);
    if (m) m->layers = (codir_layer *)codir__calloc((size_t)L, sizeof(codir_layer));
    if (!m || !specs || !names || !m->layers) goto fail;
    m->cfg = *cfg;

    /* The size table: one entry per tensor, in the order they are laid out. */
    codir__spec(specs, names, &n, 0, cfg->vocab_size, C, "embeddings.token", 0);
    codir__spec(specs, names, &n, 0, cfg->max_len, C, "embeddings.position", 0);
    codir__spec(specs, names, &n, 0, cfg->type_vocab_size, C, "embeddings.token_type", 0);
    codir__spec(specs, names, &n, 1, C, 0, "embeddings.ln.gamma", 0);
    codir__spec(specs, names, &n, 1, C, 0, "embeddings.ln.beta", 0);
    for (l = 0; l < L; l++) {
        codir__spec(specs, names, &n, 0, 3 * C, C, "layer.%d.attn.qkv.weight", l);
        codir__spec(specs, names, &n, 1, 3 * C, 0, "layer.%d.attn.qkv.bias", l);
        codir__spec(specs, names, &n, 0, C, C, "layer.%d.attn.out.weight", l);
        codir__spec(specs, names, &n, 1, C, 0, "layer.%d.attn.out.bias", l);
        codir__spec(specs, names, &n, 1, C, 0, "layer.%d.ln1.gamma", l);
        codir__spec(specs, names, &n, 1, C, 0, "layer.%d.ln1.beta", l);
        codir__spec(specs, names, &n, 0, F, C, "layer.%d.ffn.up.weight", l);
        codir__spec(specs, names, &n, 1, F, 0, "layer.%d.ffn.up.bias", l);
        codir__spec(specs, names, &n, 0, C, F, "layer.%d.ffn.down.weight", l);
        codir__spec(specs, names, &n, 1, C, 0, "layer.%d.ffn.down.bias", l);
        codir__spec(specs, names, &n, 1, C, 0, "layer.%d.ln2.gamma", l);
        codir__spec(specs, names, &n, 1, C, 0, "layer.%d.ln2.beta", l);
    }
    codir__spec(specs, names, &n, 0, C, C, "pooler.weight", 0);
    codir__spec(specs, names, &n, 1, C, 0, "pooler.bias", 0);
    codir__spec(specs, names, &n, 0, cfg->num_labels, C, "classifier.weight", 0);
    codir__spec(specs, names, &n, 1, cfg->num_labels, 0, "classifier.bias", 0);
    if (cfg->mlm_head) {
        codir__spec(specs, names, &n, 0, C, C, "mlm.dense.weight", 0);
        codir__spec(specs, names, &n, 1, C, 0, "mlm.dense.bias", 0);
        codir__spec(specs, names, &n, 1, C, 0, "mlm.ln.gamma", 0);
        codir__spec(specs, names, &n, 1, C, 0, "mlm.ln.beta", 0);
        codir__spec(specs, names, &n, 1, cfg->vocab_size, 0, "mlm.decoder.bias", 0);
    }
    rc = codir_params_init(&m->params, specs, n);
    if (rc) goto fail;

    /* Point the named fields at their tensors, in table order. */
    i = 0;
    m->tok_emb = &m->params.tensors[i++];
    m->pos_emb = &m->params.tensors[i++];
    m->type_emb = &m->params.tensors[i++];
    m->emb_ln_gamma = &m->params.tensors[i++];
    m->emb_ln_beta = &m->params.tensors[i++];
    for (l = 0; l < L; l++) {
        codir_layer *ly = &m->layers[l];
        ly->qkv_w = &m->params.tensors[i++];
        ly->qkv_b = &m->params.tensors[i++];
        ly->attn_out_w = &m->params.tensors[i++];
        ly->attn_out_b = &m->params.tensors[i++];
        ly->ln1_gamma = &m->params.tensors[i++];
        ly->ln1_beta = &m->params.tensors[i++];
        ly->ffn_up_w = &m->params.tensors[i++];
        ly->ffn_up_b = &m->params.tensors[i++];
        ly->ffn_down_w = &m->params.tensors[i++];
        ly->ffn_down_b = &m->params.tensors[i++];
        ly->ln2_gamma = &m->params.tensors[i++];
        ly->ln2_beta = &m->params.tensors[i++];
    }
    m->pool_w = &m->params.tensors[i++];
    m->pool_b = &m->params.tensors[i++];
    m->cls_w = &m->params.tensors[i++];
    m->cls_b = &m->params.tensors[i++];
    if (cfg->mlm_head) {
        m->mlm_dense_w = &m->params.tensors[i++];
        m->mlm_dense_b = &m->params.tensors[i++];
        m->mlm_ln_gamma = &m->params.tensors[i++];
        m->mlm_ln_beta = &m->params.tensors[i++];
        m->mlm_bias = &m->params.tensors[i++];
    }

    /* BERT's initialization: matrices and embeddings N(0, 0.02^2); biases and
       LayerNorm beta 0 (the blocks are zeroed); LayerNorm gamma 1. */
    for (i = 0; i < m->params.num_tensors; i++) {
        codir_tensor *t = &m->params.tensors[i];
        size_t k;
        if (t->ndim == 2)
            for (k = 0; k < t->numel; k++) t->data[k] = 0.02f * codir__normal(&rng);
        else if (strstr(t->name, ".gamma"))
            for (k = 0; k < t->numel; k++) t->data[k] = 1.0f;
    }
    codir__free(specs);
    codir__free(names);
    return m;

fail:
    codir__free(specs);
    codir__free(names);
    codir_model_free(m);
    return NULL;
}

/* The weights codir_model_pack packs, in a fixed order; returns their count. */
static int codir__model_linear_weights(codir_model *model, codir_tensor **list)
{
    int l, count = 0;
    for (l = 0; l < model->cfg.num_layers; l++) {
        list[count++] = model->layers[l].qkv_w;
        list[count++] = model->layers[l].attn_out_w;
        list[count++] = model->layers[l].ffn_up_w;
        list[count++] = model->layers[l].ffn_down_w;
    }
    list[count++] = model->pool_w;
    list[count++] = model->cls_w;
    if (model->mlm_dense_w) list[count++] = model->mlm_dense_w;
    return count;
}

/* Floats that weight w takes in the packed block: a header and the packed copy, in
   whole 64-byte blocks, so every copy starts aligned. */
static size_t codir__packed_weight_floats(const codir_tensor *w)
{
    return CODIR__PACK_HEADER_FLOATS + (codir__gemm_packed_b_floats(w->shape[0], w->shape[1]) + 15) / 16 * 16;
}

/* Floats of the block that packs every weight of list[count], headers included. */
static int codir__packed_block_floats(codir_tensor *const *list, int count, size_t *total)
{
    int i;
    *total = 0;
    for (i = 0; i < count; i++) {
        if (!codir__size_add(*total, codir__packed_weight_floats(list[i]), total))
            return codir__fail(CODIR_ERR_OVERFLOW, "packed weights overflow size_t");
    }
    return CODIR_OK;
}

/* The block stays allocated until codir_model_free: a struct copy of a weight may still
   point at its header, which now marks the copy stale. */
CODIR_DEF void codir_model_unpack(codir_model *model)
{
    int i;
    if (!model) return;
    for (i = 0; i < model->params.num_tensors; i++) codir__drop_pack(&model->params.tensors[i]);
}

CODIR_DEF int codir_model_pack(codir_model *model)
{
    codir_tensor **list;
    size_t total, offset = 0;
    float *base;
    int i, count, rc;
    if (!model) return codir__fail(CODIR_ERR_INVALID, "codir_model_pack: model is NULL");
    codir_model_unpack(model);
    list = (codir_tensor **)codir__calloc((size_t)4 * model->cfg.num_layers + 3, sizeof *list);
    if (!list) return CODIR_ERR_NOMEM;
    count = codir__model_linear_weights(model, list);
    rc = codir__packed_block_floats(list, count, &total);
    /* The model's shapes never change, so a second packing reuses the first block. */
    if (!rc && !model->packed && !(model->packed = (float *)codir__calloc(total + 16, sizeof(float))))
        rc = CODIR_ERR_NOMEM;
    if (rc) {
        codir__free(list);
        return rc;
    }
    base = (float *)codir__align_ptr((char *)model->packed);
    for (i = 0; i < count; i++) {
        codir_tensor *w = list[i];
        codir__pack_header *h;
        float *packed = base + offset + CODIR__PACK_HEADER_FLOATS;
        codir__gemm_pack_full_b(1, w->data, w->shape[1], w->shape[0], w->shape[1], packed);
        h = codir__pack_header_of(packed);
        h->source = w->data;
        h->rows = w->shape[0];
        h->cols = w->shape[1];
        h->valid = 1;
        w->packed = packed;
        offset += codir__packed_weight_floats(w);
    }
    codir__free(list);
    return CODIR_OK;
}

CODIR_DEF void codir_model_free(codir_model *model)
{
    if (!model) return;
    codir__free(model->packed);
    codir_params_free(&model->params);
    codir__free(model->layers);
    codir__free(model);
}

/* Copies src's values into dst after checking that the shapes agree. */
static int codir__copy_tensor(codir_tensor *dst, const codir_tensor *src)
{
    if (dst->numel != src->numel)
        return codir__fail(CODIR_ERR_INVALID, "cannot copy %s (%zu values) into %s (%zu values)", src->name, src->numel,
                           dst->name, dst->numel);
    memcpy(dst->data, src->data, src->numel * sizeof(float));
    codir__drop_pack(dst);
    return CODIR_OK;
}

CODIR_DEF int codir_model_init_from(codir_model *student, const codir_model *teacher, int mode)
{
    const codir_config *s = &student->cfg, *t = &teacher->cfg;
    int k, i, rc = CODIR_OK;
    if (mode != CODIR_INIT_EVERY_OTHER && mode != CODIR_INIT_FIRST_K)
        return codir__fail(CODIR_ERR_INVALID, "initialization mode %d is neither CODIR_INIT_EVERY_OTHER nor CODIR_INIT_FIRST_K", mode);
    if (s->hidden != t->hidden || s->num_heads != t->num_heads || s->ffn != t->ffn || s->vocab_size != t->vocab_size ||
        s->max_len != t->max_len || s->type_vocab_size != t->type_vocab_size || s->num_labels != t->num_labels)
        return codir__fail(CODIR_ERR_INVALID,
                           "cannot initialize the student from the teacher: widths differ (hidden %d vs %d, heads %d vs %d, "
                           "ffn %d vs %d, vocabulary %d vs %d, max_len %d vs %d, token types %d vs %d, labels %d vs %d); "
                           "initialize randomly instead",
                           s->hidden, t->hidden, s->num_heads, t->num_heads, s->ffn, t->ffn, s->vocab_size, t->vocab_size,
                           s->max_len, t->max_len, s->type_vocab_size, t->type_vocab_size, s->num_labels, t->num_labels);
    if (s->num_layers > t->num_layers)
        return codir__fail(CODIR_ERR_INVALID, "the student has %d layers, more than the teacher's %d", s->num_layers,
                           t->num_layers);

    /* The embeddings and heads, then each block as a run of CODIR__TENSORS_PER_LAYER
       tensors that lie next to each other in both parameter sets. */
    rc = codir__copy_tensor(student->tok_emb, teacher->tok_emb);
    if (!rc) rc = codir__copy_tensor(student->pos_emb, teacher->pos_emb);
    if (!rc) rc = codir__copy_tensor(student->type_emb, teacher->type_emb);
    if (!rc) rc = codir__copy_tensor(student->emb_ln_gamma, teacher->emb_ln_gamma);
    if (!rc) rc = codir__copy_tensor(student->emb_ln_beta, teacher->emb_ln_beta);
    if (!rc) rc = codir__copy_tensor(student->pool_w, teacher->pool_w);
    if (!rc) rc = codir__copy_tensor(student->pool_b, teacher->pool_b);
    if (!rc) rc = codir__copy_tensor(student->cls_w, teacher->cls_w);
    if (!rc) rc = codir__copy_tensor(student->cls_b, teacher->cls_b);
    if (!rc && s->mlm_head && t->mlm_head) {
        rc = codir__copy_tensor(student->mlm_dense_w, teacher->mlm_dense_w);
        if (!rc) rc = codir__copy_tensor(student->mlm_dense_b, teacher->mlm_dense_b);
        if (!rc) rc = codir__copy_tensor(student->mlm_ln_gamma, teacher->mlm_ln_gamma);
        if (!rc) rc = codir__copy_tensor(student->mlm_ln_beta, teacher->mlm_ln_beta);
        if (!rc) rc = codir__copy_tensor(student->mlm_bias, teacher->mlm_bias);
    }
    for (k = 0; k < s->num_layers && !rc; k++) {
        int src = mode == CODIR_INIT_FIRST_K ? k : k * t->num_layers / s->num_layers;
        codir_tensor *dst_first = student->layers[k].qkv_w;
        const codir_tensor *src_first = teacher->layers[src].qkv_w;
        for (i = 0; i < CODIR__TENSORS_PER_LAYER && !rc; i++) rc = codir__copy_tensor(dst_first + i, src_first + i);
    }
    return rc;
}

/* One post-LayerNorm block: x = LN(x + Drop(Attn(x))), x = LN(x + Drop(W2 GELU(W1 x))). */
static codir_tensor *codir__block_forward(codir_ctx *ctx, const codir_layer *ly, const codir_config *cfg,
                                          codir_tensor *x, const codir_itensor *mask)
{
    codir_tensor *a, *h;

    /* self-attention sub-block */
    a = codir_linear(ctx, x, ly->qkv_w, ly->qkv_b);
    a = codir_attention(ctx, a, mask, cfg->num_heads);
    a = codir_linear(ctx, a, ly->attn_out_w, ly->attn_out_b);
    x = codir_layernorm(ctx, codir__add_dropout(ctx, x, a, cfg->dropout, 1), ly->ln1_gamma, ly->ln1_beta, cfg->ln_eps);

    /* feed-forward sub-block */
    h = codir_linear(ctx, x, ly->ffn_up_w, ly->ffn_up_b);
    h = codir_gelu_linear(ctx, h, ly->ffn_down_w, ly->ffn_down_b);
    return codir_layernorm(ctx, codir__add_dropout(ctx, x, h, cfg->dropout, 1), ly->ln2_gamma, ly->ln2_beta, cfg->ln_eps);
}

/* The last block for the first token only. Keys and values need every token, so the
   QKV product runs on all of them; the attention runs for the first query, and
   everything after it on [B, C]. The result is viewed as [B, 1, C] for the
   classification head. */
static codir_tensor *codir__block_forward_first(codir_ctx *ctx, const codir_layer *ly, const codir_config *cfg,
                                                codir_tensor *x, const codir_itensor *mask)
{
    codir_tensor *a, *h, *x0, *y;
    a = codir_linear(ctx, x, ly->qkv_w, ly->qkv_b);
    a = codir_attention_first(ctx, a, mask, cfg->num_heads);
    a = codir_linear(ctx, a, ly->attn_out_w, ly->attn_out_b);
    x0 = codir_select_first(ctx, x);
    x0 = codir_layernorm(ctx, codir__add_dropout(ctx, x0, a, cfg->dropout, 1), ly->ln1_gamma, ly->ln1_beta, cfg->ln_eps);
    h = codir_linear(ctx, x0, ly->ffn_up_w, ly->ffn_up_b);
    h = codir_gelu_linear(ctx, h, ly->ffn_down_w, ly->ffn_down_b);
    y = codir_layernorm(ctx, codir__add_dropout(ctx, x0, h, cfg->dropout, 1), ly->ln2_gamma, ly->ln2_beta, cfg->ln_eps);
    if (y) {
        y->ndim = 3;
        y->shape[1] = 1;
        y->shape[2] = cfg->hidden;
    }
    return y;
}

/* Shared body of codir_model_forward (first_only 0) and codir_model_logits (1). */
static int codir__model_forward(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                codir_output *out, int first_only)
{
    const codir_config *cfg = &model->cfg;
    codir_tensor *x, *cls;
    int l, L = cfg->num_layers;
    memset(out, 0, sizeof *out);
    out->hidden = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)(L + 1) * sizeof(codir_tensor *));
    if (!out->hidden) return ctx->status = CODIR_ERR_NOMEM;
    out->num_hidden = L + 1;

    /* embeddings: token + position + token type, then LayerNorm and dropout */
    x = codir_embedding(ctx, &batch->ids, &batch->types, model->tok_emb, model->pos_emb, model->type_emb);
    x = codir_layernorm(ctx, x, model->emb_ln_gamma, model->emb_ln_beta, cfg->ln_eps);
    x = codir_dropout(ctx, x, cfg->dropout);
    out->hidden[0] = x;

    for (l = 0; l < L; l++) {
        int first = first_only && l == L - 1;
        if (ctx->recording || !x) {
            x = first ? codir__block_forward_first(ctx, &model->layers[l], cfg, x, &batch->mask)
                      : codir__block_forward(ctx, &model->layers[l], cfg, x, &batch->mask);
        } else {
            /* Without a tape nothing reads a block's intermediate values again: keep
               its output and give the rest back, so the pass needs one block's worth. */
            int shape[3];
            codir_tensor *kept, *y;
            codir_arena_pos mark;
            shape[0] = x->shape[0];
            shape[1] = first ? 1 : x->shape[1];
            shape[2] = cfg->hidden;
            kept = codir_tensor_new(ctx, 3, shape, 0);
            mark = codir_arena_mark(&ctx->arena);
            y = !kept ? NULL
                : first ? codir__block_forward_first(ctx, &model->layers[l], cfg, x, &batch->mask)
                        : codir__block_forward(ctx, &model->layers[l], cfg, x, &batch->mask);
            if (y) memcpy(kept->data, y->data, kept->numel * sizeof(float));
            codir_arena_rewind(&ctx->arena, mark);
            x = y ? kept : NULL;
        }
        out->hidden[l + 1] = x;
    }

    /* classification head on the first token: dropout, dense, tanh, dropout, dense */
    cls = codir_dropout(ctx, codir_select_first(ctx, x), cfg->dropout);
    cls = codir_tanh(ctx, codir_linear(ctx, cls, model->pool_w, model->pool_b));
    cls = codir_dropout(ctx, cls, cfg->dropout);
    out->logits = codir_linear(ctx, cls, model->cls_w, model->cls_b);
    if (!out->logits) return ctx->status ? ctx->status : CODIR_ERR_INVALID;
    return CODIR_OK;
}

CODIR_DEF int codir_model_forward(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                  codir_output *out)
{
    return codir__model_forward(ctx, model, batch, out, 0);
}

CODIR_DEF int codir_model_logits(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                 codir_output *out)
{
    return codir__model_forward(ctx, model, batch, out, 1);
}

CODIR_DEF codir_tensor *codir_mlm_logits(codir_ctx *ctx, const codir_model *model, codir_tensor *hidden,
                                         const int *positions, int count)
{
    codir_tensor *h;
    if (!model->cfg.mlm_head)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "masked-LM logits need a model created with mlm_head = 1");
    h = codir_gather_rows(ctx, hidden, positions, count);
    h = codir_gelu(ctx, codir_linear(ctx, h, model->mlm_dense_w, model->mlm_dense_b));
    h = codir_layernorm(ctx, h, model->mlm_ln_gamma, model->mlm_ln_beta, model->cfg.ln_eps);
    return codir_linear(ctx, h, model->tok_emb, model->mlm_bias);
}

/* ===================================================================================
   Checkpoints: safetensors files and Hugging Face BERT model folders (implementation)
   =================================================================================== */

#include <locale.h>

/* POSIX fsync makes a saved file durable before it is renamed into place. It is not
   in C11, and a strict -std=c11 build hides the POSIX declarations of <stdio.h> and
   <unistd.h>, so C declares the two functions itself; the parentheses keep a libc's
   function-like macro for fileno out of the way. g++ always exposes them. */
#if !defined(CODIR_NO_FSYNC) && (defined(__unix__) || defined(__APPLE__))
#define CODIR__HAVE_FSYNC 1
#ifdef __cplusplus
#include <unistd.h>
#else
int(fileno)(FILE *stream);
int fsync(int fd);
#endif
#endif

/* ---- files ---- */

/* Returns a heap copy of dir + "/" + name, or NULL. */
static char *codir__io_join(const char *dir, const char *name)
{
    size_t dir_length = strlen(dir), name_length = strlen(name), bytes;
    int slash = dir_length > 0 && dir[dir_length - 1] != '/' && dir[dir_length - 1] != '\\';
    char *path;
    if (!codir__size_add(dir_length, name_length, &bytes) || !codir__size_add(bytes, 2, &bytes)) {
        codir__fail(CODIR_ERR_OVERFLOW, "path length overflows size_t");
        return NULL;
    }
    path = (char *)codir__malloc(bytes);
    if (!path) return NULL;
    memcpy(path, dir, dir_length);
    if (slash) path[dir_length] = '/';
    memcpy(path + dir_length + slash, name, name_length + 1);
    return path;
}

/* Creates `path`.tmp for writing; stores the stream in *file and its heap-allocated
   name in *tmp_path. */
static int codir__io_create_tmp(const char *path, FILE **file, char **tmp_path)
{
    size_t length = strlen(path), bytes;
    int rc;
    *file = NULL;
    *tmp_path = NULL;
    if (!codir__size_add(length, sizeof ".tmp", &bytes))
        return codir__fail(CODIR_ERR_OVERFLOW, "path length overflows size_t");
    *tmp_path = (char *)codir__malloc(bytes);
    if (!*tmp_path) return CODIR_ERR_NOMEM;
    memcpy(*tmp_path, path, length);
    memcpy(*tmp_path + length, ".tmp", sizeof ".tmp");
    *file = fopen(*tmp_path, "wb");
    if (*file) return CODIR_OK;
    rc = codir__fail(CODIR_ERR_IO, "failed to create '%s': %s; check that the directory exists and is writable",
                     *tmp_path, strerror(errno));
    codir__free(*tmp_path);
    *tmp_path = NULL;
    return rc;
}

/* Flushes, syncs and closes the file written to tmp_path and renames it to path, or
   removes it when `failed` is set or any of these steps fails. Frees tmp_path. The
   sync comes before the rename, so after a crash or a power loss the final name holds
   the old file or the whole new one (POSIX only; see CODIR_NO_FSYNC). */
static int codir__io_commit(FILE *file, char *tmp_path, const char *path, int failed)
{
    int rc = CODIR_OK, sync_error = 0;
    if (fflush(file) != 0 || ferror(file)) failed = 1;
#ifdef CODIR__HAVE_FSYNC
    if (!failed && fsync((fileno)(file)) != 0) sync_error = errno;
#endif
    if (fclose(file) != 0) failed = 1;
    if (sync_error && !failed) {
        rc = codir__fail(CODIR_ERR_IO, "failed to sync '%s' to disk: %s; '%s' was left unchanged", tmp_path,
                         strerror(sync_error), path);
        remove(tmp_path);
    } else if (failed || sync_error) {
        rc = codir__fail(CODIR_ERR_IO, "failed to write '%s'; check the free disk space", tmp_path);
        remove(tmp_path);
    } else if (rename(tmp_path, path) != 0) {
#ifdef _WIN32
        /* Windows' rename() does not replace an existing file. */
        remove(path);
        if (rename(tmp_path, path) == 0) {
            codir__free(tmp_path);
            return CODIR_OK;
        }
#endif
        rc = codir__fail(CODIR_ERR_IO, "failed to rename '%s' to '%s': %s", tmp_path, path, strerror(errno));
        remove(tmp_path);
    }
    codir__free(tmp_path);
    return rc;
}

/* Writes the n bytes at data to path through path.tmp. */
static int codir__io_write_file(const char *path, const char *data, size_t n)
{
    char *tmp_path;
    FILE *file;
    int rc = codir__io_create_tmp(path, &file, &tmp_path);
    if (rc) return rc;
    return codir__io_commit(file, tmp_path, path, fwrite(data, 1, n, file) != n);
}

/* ---- text buffers ---- */

/* A growable byte string; `failed` records an allocation failure, so a writer can
   append freely and check once. */
typedef struct codir__io_buf {
    char *data;
    size_t length, capacity;
    int failed;
} codir__io_buf;

static void codir__io_put(codir__io_buf *b, const char *s, size_t n)
{
    size_t need;
    if (b->failed) return;
    if (!codir__size_add(b->length, n, &need) || !codir__size_add(need, 1, &need)) {
        codir__fail(CODIR_ERR_OVERFLOW, "text buffer size overflows size_t");
        b->failed = 1;
        return;
    }
    if (need > b->capacity) {
        size_t grown = b->capacity ? b->capacity : 256;
        char *bigger;
        while (grown < need) {
            if (!codir__size_mul(grown, 2, &grown)) grown = need;
        }
        bigger = (char *)codir__realloc(b->data, grown);
        if (!bigger) {
            b->failed = 1;
            return;
        }
        b->data = bigger;
        b->capacity = grown;
    }
    memcpy(b->data + b->length, s, n);
    b->length += n;
    b->data[b->length] = '\0';
}

static void codir__io_puts(codir__io_buf *b, const char *s) { codir__io_put(b, s, strlen(s)); }

static void codir__io_put_u64(codir__io_buf *b, uint64_t v)
{
    char digits[24];
    int n = 0;
    do {
        digits[sizeof digits - 1 - n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    codir__io_put(b, digits + sizeof digits - n, (size_t)n);
}

/* Appends s as a JSON string. Like serde_json and Python's json.dumps with
   ensure_ascii=False, it escapes only '"', '\\' and control characters below 0x20:
   \b \t \n \f \r by letter and the others as \u00XX with lowercase hex digits. */
static void codir__io_put_json_string(codir__io_buf *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    codir__io_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char escape[6] = {'\\', 'u', '0', '0', 0, 0};
        if (c == '"' || c == '\\') {
            escape[1] = (char)c;
            codir__io_put(b, escape, 2);
        } else if (c == '\b' || c == '\t' || c == '\n' || c == '\f' || c == '\r') {
            escape[1] = c == '\b' ? 'b' : c == '\t' ? 't' : c == '\n' ? 'n' : c == '\f' ? 'f' : 'r';
            codir__io_put(b, escape, 2);
        } else if (c < 0x20) {
            escape[4] = hex[c >> 4];
            escape[5] = hex[c & 15];
            codir__io_put(b, escape, 6);
        } else {
            codir__io_put(b, (const char *)&c, 1);
        }
    }
    codir__io_put(b, "\"", 1);
}

/* Appends the shortest decimal that reads back as exactly v, written with '.' whatever
   the C locale, and with ".0" added to whole numbers as Python writes floats. */
static void codir__io_put_float(codir__io_buf *b, float v)
{
    char text[48];
    int precision, i, plain = 1;
    for (precision = 1; precision <= 9; precision++) {
        snprintf(text, sizeof text, "%.*g", precision, (double)v);
        for (i = 0; text[i]; i++)
            if (!strchr("0123456789+-eE", text[i])) text[i] = '.';
        if (precision == 9) break;
        {
            char back[48];
            struct lconv *lc = localeconv();
            memcpy(back, text, sizeof text);
            if (lc && lc->decimal_point && strlen(lc->decimal_point) == 1)
                for (i = 0; back[i]; i++)
                    if (back[i] == '.') back[i] = lc->decimal_point[0];
            if (strtof(back, NULL) == v) break;
        }
    }
    for (i = 0; text[i]; i++)
        if (!strchr("0123456789+-", text[i])) plain = 0;
    codir__io_puts(b, text);
    if (plain) codir__io_puts(b, ".0");
}

/* ---- UTF-8 and JSON ---- */

/* Returns the length of the valid UTF-8 sequence at s (at most `available` bytes), or 0
   when it is invalid: a stray continuation byte, a truncated, overlong or surrogate
   sequence, or a code point above U+10FFFF. */
static size_t codir__io_utf8_length(const unsigned char *s, size_t available)
{
    uint32_t cp;
    size_t n, i;
    if (s[0] < 0x80) return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF) n = 2;
    else if (s[0] >= 0xE0 && s[0] <= 0xEF) n = 3;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4) n = 4;
    else return 0;
    if (available < n) return 0;
    cp = s[0] & (0x7Fu >> n); /* the lead byte's payload: 5, 4 or 3 bits */
    for (i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

/* Returns 1 when the NUL-terminated s is valid UTF-8. */
static int codir__io_utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t left = strlen(s);
    while (left) {
        size_t n = codir__io_utf8_length(p, left);
        if (!n) return 0;
        p += n;
        left -= n;
    }
    return 1;
}

enum { CODIR__JSON_NULL, CODIR__JSON_FALSE, CODIR__JSON_TRUE, CODIR__JSON_NUMBER, CODIR__JSON_STRING,
       CODIR__JSON_ARRAY, CODIR__JSON_OBJECT };

#define CODIR__JSON_MAX_DEPTH 64

/* One value of a parsed JSON document. Children of an array or object form a list
   through `first` and `next`, which are indexes into the document's node array. */
typedef struct codir__json_node {
    int type;
    int count;                  /* items of an array or members of an object */
    int first;                  /* first item or member, -1 if none */
    int next;                   /* next item or member of the parent, -1 if last */
    size_t offset;              /* byte offset of the value in the text */
    size_t key, key_length;     /* object members: the key's position in the string pool */
    size_t key_offset;          /* object members: byte offset of the key in the text */
    size_t str, str_length;     /* strings: the decoded value's position in the pool */
    int is_uint;                /* numbers: 1 for a non-negative integer that fits uint64_t */
    int is_integer;             /* numbers: 1 when written without fraction or exponent */
    uint64_t uint_value;
    double number;
} codir__json_node;

/* A strict RFC 8259 parser for headers and configuration files. It rejects comments,
   trailing commas, NaN and single quotes, strings that are not valid UTF-8 or hold an
   unpaired surrogate, and objects that repeat a key. Decoded strings are NUL-terminated
   in `pool` and may contain NUL themselves (from \u0000).
   NOTE: every value costs one node (88 bytes on 64-bit hosts), so a hostile 100 MB header
   of one-digit numbers ("[1,1,1,...]") makes the parser request about 4.4 GB
   before it fails with CODIR_ERR_NOMEM. */
typedef struct codir__json {
    const char *text;
    size_t length, pos;
    size_t base;                /* added to offsets in messages: the text's offset in its file */
    const char *source;         /* file path, for messages */
    const char *role;           /* what the file should be, for messages */
    codir__json_node *nodes;
    int num_nodes, capacity;
    codir__io_buf pool;
    int depth;
} codir__json;

static int codir__json_error(codir__json *js, size_t pos, const char *what)
{
    return codir__fail(CODIR_ERR_PARSE, "%s: malformed JSON at byte %zu: %s; the file is damaged or is not %s",
                       js->source, js->base + pos, what, js->role);
}

static const char *codir__json_str(const codir__json *js, size_t at) { return js->pool.data + at; }

static int codir__json_new_node(codir__json *js, int type)
{
    codir__json_node *n;
    if (js->num_nodes == js->capacity) {
        int grown = js->capacity ? js->capacity * 2 : 64;
        codir__json_node *bigger;
        if (js->capacity > INT_MAX / 2) return codir__fail(CODIR_ERR_OVERFLOW, "%s: too many JSON values", js->source);
        bigger = (codir__json_node *)codir__realloc(js->nodes, (size_t)grown * sizeof *bigger);
        if (!bigger) return CODIR_ERR_NOMEM;
        js->nodes = bigger;
        js->capacity = grown;
    }
    n = &js->nodes[js->num_nodes];
    memset(n, 0, sizeof *n);
    n->type = type;
    n->first = n->next = -1;
    n->offset = js->pos;
    return js->num_nodes++;
}

static void codir__json_skip_space(codir__json *js)
{
    while (js->pos < js->length) {
        char c = js->text[js->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        js->pos++;
    }
}

static int codir__json_hex4(codir__json *js, size_t at, uint32_t *out)
{
    uint32_t v = 0;
    int i;
    if (js->length - at < 4) return codir__json_error(js, at, "\\u must be followed by 4 hex digits");
    for (i = 0; i < 4; i++) {
        char c = js->text[at + (size_t)i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return codir__json_error(js, at + (size_t)i, "\\u must be followed by 4 hex digits");
    }
    *out = v;
    return CODIR_OK;
}

static void codir__json_put_utf8(codir__json *js, uint32_t cp)
{
    char out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        out[0] = (char)(0xF0 | (cp >> 18));
        out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    codir__io_put(&js->pool, out, n);
}

/* Decodes the string starting at the '"' at js->pos into the pool. */
static int codir__json_string(codir__json *js, size_t *at, size_t *length)
{
    size_t start = js->pos;
    *at = js->pool.length;
    js->pos++;
    for (;;) {
        unsigned char c;
        if (js->pos >= js->length) return codir__json_error(js, start, "the string that starts here is not closed");
        c = (unsigned char)js->text[js->pos];
        if (c == '"') {
            js->pos++;
            break;
        }
        if (c < 0x20) return codir__json_error(js, js->pos, "a control character in a string must be escaped");
        if (c == '\\') {
            uint32_t cp;
            char e;
            if (js->pos + 1 >= js->length)
                return codir__json_error(js, start, "the string that starts here is not closed");
            e = js->text[js->pos + 1];
            switch (e) {
            case '"': case '\\': case '/': cp = (uint32_t)e; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u':
                if (codir__json_hex4(js, js->pos + 2, &cp)) return CODIR_ERR_PARSE;
                if (cp >= 0xDC00 && cp <= 0xDFFF)
                    return codir__json_error(js, js->pos, "a UTF-16 low surrogate without a high surrogate before it");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t low;
                    size_t next = js->pos + 6;
                    if (next + 1 >= js->length || js->text[next] != '\\' || js->text[next + 1] != 'u')
                        return codir__json_error(js, js->pos, "a UTF-16 high surrogate without a low surrogate after it");
                    if (codir__json_hex4(js, next + 2, &low)) return CODIR_ERR_PARSE;
                    if (low < 0xDC00 || low > 0xDFFF)
                        return codir__json_error(js, js->pos, "a UTF-16 high surrogate without a low surrogate after it");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    js->pos += 6;
                }
                js->pos += 4;
                break;
            default:
                return codir__json_error(js, js->pos, "invalid escape sequence");
            }
            js->pos += 2;
            codir__json_put_utf8(js, cp);
        } else if (c >= 0x80) {
            size_t n = codir__io_utf8_length((const unsigned char *)js->text + js->pos, js->length - js->pos);
            if (!n) return codir__json_error(js, js->pos, "invalid UTF-8 in a string");
            codir__io_put(&js->pool, js->text + js->pos, n);
            js->pos += n;
        } else {
            codir__io_put(&js->pool, (const char *)&c, 1);
            js->pos++;
        }
    }
    *length = js->pool.length - *at;
    codir__io_put(&js->pool, "", 1); /* the terminating NUL, which the length leaves out */
    return js->pool.failed ? CODIR_ERR_NOMEM : CODIR_OK;
}

static int codir__json_is_digit(const codir__json *js, size_t at)
{
    return at < js->length && js->text[at] >= '0' && js->text[at] <= '9';
}

static int codir__json_number(codir__json *js, int node)
{
    size_t start = js->pos, i;
    int negative = 0, integer = 1, overflow = 0;
    uint64_t v = 0;
    char local[64], *copy = local;
    struct lconv *lc;

    /* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
    if (js->text[js->pos] == '-') {
        negative = 1;
        js->pos++;
    }
    if (!codir__json_is_digit(js, js->pos)) return codir__json_error(js, js->pos, "expected a digit");
    if (js->text[js->pos] == '0' && codir__json_is_digit(js, js->pos + 1))
        return codir__json_error(js, js->pos, "a number may not start with 0");
    while (codir__json_is_digit(js, js->pos)) {
        unsigned d = (unsigned)(js->text[js->pos] - '0');
        if (v > (UINT64_MAX - d) / 10) overflow = 1;
        else v = v * 10 + d;
        js->pos++;
    }
    if (js->pos < js->length && js->text[js->pos] == '.') {
        integer = 0;
        js->pos++;
        if (!codir__json_is_digit(js, js->pos)) return codir__json_error(js, js->pos, "expected a digit after '.'");
        while (codir__json_is_digit(js, js->pos)) js->pos++;
    }
    if (js->pos < js->length && (js->text[js->pos] == 'e' || js->text[js->pos] == 'E')) {
        integer = 0;
        js->pos++;
        if (js->pos < js->length && (js->text[js->pos] == '+' || js->text[js->pos] == '-')) js->pos++;
        if (!codir__json_is_digit(js, js->pos)) return codir__json_error(js, js->pos, "expected a digit in the exponent");
        while (codir__json_is_digit(js, js->pos)) js->pos++;
    }
    js->nodes[node].is_integer = integer;
    js->nodes[node].is_uint = integer && !negative && !overflow;
    js->nodes[node].uint_value = v;

    /* strtod reads the decimal point of the C locale, so swap it in. */
    if (js->pos - start >= sizeof local) {
        copy = codir__strndup(js->text + start, js->pos - start);
        if (!copy) return CODIR_ERR_NOMEM;
    } else {
        memcpy(local, js->text + start, js->pos - start);
        local[js->pos - start] = '\0';
    }
    lc = localeconv();
    if (lc && lc->decimal_point && strlen(lc->decimal_point) == 1)
        for (i = 0; copy[i]; i++)
            if (copy[i] == '.') copy[i] = lc->decimal_point[0];
    js->nodes[node].number = strtod(copy, NULL);
    if (copy != local) codir__free(copy);
    return CODIR_OK;
}

typedef struct codir__json_key {
    const char *text;
    size_t length, offset;
} codir__json_key;

static int codir__json_key_order(const void *pa, const void *pb)
{
    const codir__json_key *a = (const codir__json_key *)pa, *b = (const codir__json_key *)pb;
    int c = memcmp(a->text, b->text, a->length < b->length ? a->length : b->length);
    if (c) return c;
    if (a->length != b->length) return a->length < b->length ? -1 : 1;
    return a->offset < b->offset ? -1 : 1;
}

/* Reports the second of two members of `object` with the same key, if any. Sorting
   the keys keeps this O(n log n) for headers with many thousands of tensors. */
static int codir__json_check_keys(codir__json *js, int object)
{
    int count = js->nodes[object].count, m, i = 0, rc = CODIR_OK;
    codir__json_key *keys;
    if (count < 2) return CODIR_OK;
    keys = (codir__json_key *)codir__calloc((size_t)count, sizeof *keys);
    if (!keys) return CODIR_ERR_NOMEM;
    for (m = js->nodes[object].first; m >= 0; m = js->nodes[m].next, i++) {
        keys[i].text = codir__json_str(js, js->nodes[m].key);
        keys[i].length = js->nodes[m].key_length;
        keys[i].offset = js->nodes[m].key_offset;
    }
    qsort(keys, (size_t)count, sizeof *keys, codir__json_key_order);
    for (i = 1; i < count && !rc; i++)
        if (keys[i].length == keys[i - 1].length && memcmp(keys[i].text, keys[i - 1].text, keys[i].length) == 0)
            rc = codir__json_error(js, keys[i].offset, "this key repeats an earlier key of the same object");
    codir__free(keys);
    return rc;
}

static int codir__json_value(codir__json *js, int *out);

static int codir__json_container(codir__json *js, int node, int is_object)
{
    char close = is_object ? '}' : ']';
    size_t open = js->pos;
    int last = -1, rc;
    if (++js->depth > CODIR__JSON_MAX_DEPTH) return codir__json_error(js, open, "nesting deeper than 64 levels");
    js->pos++;
    codir__json_skip_space(js);
    if (js->pos < js->length && js->text[js->pos] == close) {
        js->pos++;
        js->depth--;
        return CODIR_OK;
    }
    for (;;) {
        int child;
        size_t key = 0, key_length = 0, key_offset = 0;
        codir__json_skip_space(js);
        if (is_object) {
            if (js->pos >= js->length)
                return codir__json_error(js, open, "the object that starts here is not closed");
            if (js->text[js->pos] != '"') return codir__json_error(js, js->pos, "expected a string key");
            key_offset = js->pos;
            rc = codir__json_string(js, &key, &key_length);
            if (rc) return rc;
            codir__json_skip_space(js);
            if (js->pos >= js->length)
                return codir__json_error(js, open, "the object that starts here is not closed");
            if (js->text[js->pos] != ':') return codir__json_error(js, js->pos, "expected ':' after the key");
            js->pos++;
        }
        rc = codir__json_value(js, &child);
        if (rc) return rc;
        js->nodes[child].key = key;
        js->nodes[child].key_length = key_length;
        js->nodes[child].key_offset = key_offset;
        if (last < 0) js->nodes[node].first = child;
        else js->nodes[last].next = child;
        last = child;
        js->nodes[node].count++;
        codir__json_skip_space(js);
        if (js->pos >= js->length)
            return codir__json_error(js, open, is_object ? "the object that starts here is not closed"
                                                         : "the array that starts here is not closed");
        if (js->text[js->pos] == ',') {
            js->pos++;
            continue;
        }
        if (js->text[js->pos] == close) {
            js->pos++;
            break;
        }
        return codir__json_error(js, js->pos, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
    js->depth--;
    return is_object ? codir__json_check_keys(js, node) : CODIR_OK;
}

static int codir__json_value(codir__json *js, int *out)
{
    int node, rc;
    char c;
    codir__json_skip_space(js);
    if (js->pos >= js->length) return codir__json_error(js, js->pos, "unexpected end of the text: expected a value");
    c = js->text[js->pos];
    if (c == '{' || c == '[') {
        node = codir__json_new_node(js, c == '{' ? CODIR__JSON_OBJECT : CODIR__JSON_ARRAY);
        if (node < 0) return node;
        rc = codir__json_container(js, node, c == '{');
    } else if (c == '"') {
        size_t at, length;
        node = codir__json_new_node(js, CODIR__JSON_STRING);
        if (node < 0) return node;
        rc = codir__json_string(js, &at, &length);
        js->nodes[node].str = at;
        js->nodes[node].str_length = length;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        node = codir__json_new_node(js, CODIR__JSON_NUMBER);
        if (node < 0) return node;
        rc = codir__json_number(js, node);
    } else {
        static const char *const words[3] = {"null", "false", "true"};
        static const int types[3] = {CODIR__JSON_NULL, CODIR__JSON_FALSE, CODIR__JSON_TRUE};
        int w;
        for (w = 0; w < 3; w++) {
            size_t n = strlen(words[w]);
            if (js->length - js->pos >= n && memcmp(js->text + js->pos, words[w], n) == 0) break;
        }
        if (w == 3) return codir__json_error(js, js->pos, "expected a value");
        node = codir__json_new_node(js, types[w]);
        if (node < 0) return node;
        js->pos += strlen(words[w]);
        rc = CODIR_OK;
    }
    *out = node;
    return rc;
}

/* Parses text[length] as one JSON value, its root at node 0. */
static int codir__json_parse(codir__json *js, const char *text, size_t length, size_t base, const char *source,
                             const char *role)
{
    int root, rc;
    memset(js, 0, sizeof *js);
    js->text = text;
    js->length = length;
    js->base = base;
    js->source = source;
    js->role = role;
    rc = codir__json_value(js, &root);
    if (rc) return rc;
    codir__json_skip_space(js);
    if (js->pos != js->length) return codir__json_error(js, js->pos, "unexpected data after the JSON value");
    return CODIR_OK;
}

static void codir__json_free(codir__json *js)
{
    codir__free(js->nodes);
    codir__free(js->pool.data);
    memset(js, 0, sizeof *js);
}

/* Returns the member of `object` named `key`, or -1. */
static int codir__json_member(const codir__json *js, int object, const char *key)
{
    size_t n = strlen(key);
    int m;
    for (m = js->nodes[object].first; m >= 0; m = js->nodes[m].next)
        if (js->nodes[m].key_length == n && memcmp(codir__json_str(js, js->nodes[m].key), key, n) == 0) return m;
    return -1;
}

/* ---- safetensors: reading ---- */

static const char *const codir__st_dtype_names[CODIR_ST_DTYPE_COUNT] = {
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"};
static const unsigned char codir__st_dtype_sizes[CODIR_ST_DTYPE_COUNT] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};

/* The official reader's limit on the header length (MAX_HEADER_SIZE). */
#define CODIR__ST_MAX_HEADER 100000000u

CODIR_DEF const char *codir_st_dtype_name(int dtype)
{
    return dtype >= 0 && dtype < CODIR_ST_DTYPE_COUNT ? codir__st_dtype_names[dtype] : "?";
}

/* Formats a shape as "[2, 3]" into text[size]. */
static const char *codir__st_shape_text(char *text, size_t size, int ndim, const int64_t *shape)
{
    size_t used = 0;
    int d;
    text[0] = '\0';
    used += (size_t)snprintf(text, size, "[");
    for (d = 0; d < ndim && used < size; d++)
        used += (size_t)snprintf(text + used, size - used, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (used < size) snprintf(text + used, size - used, "]");
    return text;
}

static float codir__st_bits_to_float(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE half to single precision, exactly. */
static float codir__st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13); /* infinity, or NaN with its payload */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign; /* signed zero */
    } else {
        /* A subnormal half, mantissa * 2^-24, is a normal float: shift the mantissa
           until its leading 1 reaches the implicit bit, lowering the exponent. */
        uint32_t e = 127 - 15 + 1;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((mantissa & 0x3FFu) << 13);
    }
    return codir__st_bits_to_float(bits);
}

/* Reads a non-negative integer array of at most max entries from node. */
static int codir__st_uint_array(codir_safetensors *st, const codir__json *js, int node, const char *tensor,
                                const char *field, int min_count, int max_count, uint64_t *values, int *count)
{
    const codir__json_node *n = &js->nodes[node];
    int item, i = 0;
    if (n->type != CODIR__JSON_ARRAY || n->count < min_count || n->count > max_count) {
        if (min_count == max_count)
            return codir__fail(CODIR_ERR_PARSE, "%s: tensor \"%s\": %s at byte %zu must be an array of %d integers",
                               st->path, tensor, field, js->base + n->offset, min_count);
        return codir__fail(CODIR_ERR_PARSE,
                           "%s: tensor \"%s\": %s at byte %zu must be an array of at most %d integers", st->path,
                           tensor, field, js->base + n->offset, max_count);
    }
    for (item = n->first; item >= 0; item = js->nodes[item].next) {
        const codir__json_node *v = &js->nodes[item];
        if (v->type != CODIR__JSON_NUMBER || !v->is_uint || v->uint_value > (uint64_t)INT64_MAX)
            return codir__fail(CODIR_ERR_PARSE,
                               "%s: tensor \"%s\": %s entry at byte %zu must be a non-negative integer below 2^63",
                               st->path, tensor, field, js->base + v->offset);
        values[i++] = v->uint_value;
    }
    *count = i;
    return CODIR_OK;
}

/* Fills t from the header entry `member`: an object of dtype, shape and data_offsets. */
static int codir__st_entry(codir_safetensors *st, const codir__json *js, int member, codir_st_tensor *t)
{
    const codir__json_node *n = &js->nodes[member];
    int field, d, have_dtype = 0, have_shape = 0, have_offsets = 0, count;
    uint64_t values[CODIR_ST_MAX_DIMS], offsets[2], nbytes;
    size_t numel = 1, bytes;
    char shape_text[200];

    if (strlen(codir__json_str(js, n->key)) != n->key_length)
        return codir__fail(CODIR_ERR_PARSE, "%s: the tensor name at byte %zu contains a NUL character", st->path,
                           js->base + n->key_offset);
    t->name = codir__strndup(codir__json_str(js, n->key), n->key_length);
    if (!t->name) return CODIR_ERR_NOMEM;
    if (n->type != CODIR__JSON_OBJECT)
        return codir__fail(CODIR_ERR_PARSE,
                           "%s: tensor \"%s\" at byte %zu must be an object with dtype, shape and data_offsets",
                           st->path, t->name, js->base + n->offset);

    for (field = n->first; field >= 0; field = js->nodes[field].next) {
        const codir__json_node *f = &js->nodes[field];
        const char *key = codir__json_str(js, f->key);
        int rc;
        if (strcmp(key, "dtype") == 0) {
            const char *name;
            if (f->type != CODIR__JSON_STRING)
                return codir__fail(CODIR_ERR_PARSE, "%s: tensor \"%s\": dtype at byte %zu must be a string",
                                   st->path, t->name, js->base + f->offset);
            name = codir__json_str(js, f->str);
            for (t->dtype = 0; t->dtype < CODIR_ST_DTYPE_COUNT; t->dtype++)
                if (strcmp(name, codir__st_dtype_names[t->dtype]) == 0) break;
            if (t->dtype == CODIR_ST_DTYPE_COUNT)
                return codir__fail(CODIR_ERR_PARSE,
                                   "%s: tensor \"%s\": unknown dtype \"%s\" at byte %zu; known dtypes are BOOL, U8, "
                                   "I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64 and U64",
                                   st->path, t->name, name, js->base + f->offset);
            have_dtype = 1;
        } else if (strcmp(key, "shape") == 0) {
            rc = codir__st_uint_array(st, js, field, t->name, "shape", 0, CODIR_ST_MAX_DIMS, values, &count);
            if (rc) return rc;
            t->ndim = count;
            for (d = 0; d < CODIR_ST_MAX_DIMS; d++) t->shape[d] = d < count ? (int64_t)values[d] : 1;
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            rc = codir__st_uint_array(st, js, field, t->name, "data_offsets", 2, 2, offsets, &count);
            if (rc) return rc;
            have_offsets = 1;
        } else {
            return codir__fail(CODIR_ERR_PARSE,
                               "%s: tensor \"%s\": unexpected key \"%s\" at byte %zu; a tensor entry holds only "
                               "dtype, shape and data_offsets",
                               st->path, t->name, key, js->base + f->key_offset);
        }
    }
    if (!have_dtype || !have_shape || !have_offsets)
        return codir__fail(CODIR_ERR_PARSE, "%s: tensor \"%s\" at byte %zu has no %s", st->path, t->name,
                           js->base + n->offset, !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");

    /* The byte size implied by dtype and shape must equal END - BEGIN. */
    codir__st_shape_text(shape_text, sizeof shape_text, t->ndim, t->shape);
    for (d = 0; d < t->ndim; d++) {
        if ((uint64_t)t->shape[d] > (uint64_t)SIZE_MAX || !codir__size_mul(numel, (size_t)t->shape[d], &numel))
            return codir__fail(CODIR_ERR_OVERFLOW, "%s: tensor \"%s\": the element count of shape %s overflows size_t",
                               st->path, t->name, shape_text);
    }
    if (!codir__size_mul(numel, codir__st_dtype_sizes[t->dtype], &bytes))
        return codir__fail(CODIR_ERR_OVERFLOW, "%s: tensor \"%s\": the byte size of shape %s overflows size_t",
                           st->path, t->name, shape_text);
    if (offsets[1] < offsets[0])
        return codir__fail(CODIR_ERR_PARSE, "%s: tensor \"%s\": data_offsets [%llu, %llu] end before they begin",
                           st->path, t->name, (unsigned long long)offsets[0], (unsigned long long)offsets[1]);
    nbytes = offsets[1] - offsets[0];
    if (nbytes != (uint64_t)bytes)
        return codir__fail(CODIR_ERR_PARSE,
                           "%s: tensor \"%s\": data_offsets [%llu, %llu] hold %llu bytes, but dtype %s with shape %s "
                           "needs %zu",
                           st->path, t->name, (unsigned long long)offsets[0], (unsigned long long)offsets[1],
                           (unsigned long long)nbytes, codir__st_dtype_names[t->dtype], shape_text, bytes);
    t->numel = numel;
    t->offset = offsets[0];
    t->nbytes = nbytes;
    return CODIR_OK;
}

/* Reads the __metadata__ object: string keys to string values. */
static int codir__st_metadata(codir_safetensors *st, const codir__json *js, int member)
{
    const codir__json_node *n = &js->nodes[member];
    int item, i = 0;
    if (n->type != CODIR__JSON_OBJECT)
        return codir__fail(CODIR_ERR_PARSE, "%s: __metadata__ at byte %zu must be an object of strings", st->path,
                           js->base + n->offset);
    st->metadata = (char **)codir__calloc((size_t)n->count * 2 + 1, sizeof(char *));
    if (!st->metadata) return CODIR_ERR_NOMEM;
    for (item = n->first; item >= 0; item = js->nodes[item].next) {
        const codir__json_node *v = &js->nodes[item];
        if (v->type != CODIR__JSON_STRING)
            return codir__fail(CODIR_ERR_PARSE, "%s: __metadata__ value at byte %zu must be a string", st->path,
                               js->base + v->offset);
        if (strlen(codir__json_str(js, v->key)) != v->key_length || strlen(codir__json_str(js, v->str)) != v->str_length)
            return codir__fail(CODIR_ERR_PARSE, "%s: __metadata__ entry at byte %zu contains a NUL character",
                               st->path, js->base + v->key_offset);
        st->metadata[2 * i] = codir__strndup(codir__json_str(js, v->key), v->key_length);
        st->metadata[2 * i + 1] = codir__strndup(codir__json_str(js, v->str), v->str_length);
        st->num_metadata = ++i;
        if (!st->metadata[2 * i - 2] || !st->metadata[2 * i - 1]) return CODIR_ERR_NOMEM;
    }
    return CODIR_OK;
}

typedef struct codir__st_span {
    uint64_t begin, end;
    int index;
} codir__st_span;

static int codir__st_span_order(const void *pa, const void *pb)
{
    const codir__st_span *a = (const codir__st_span *)pa, *b = (const codir__st_span *)pb;
    if (a->begin != b->begin) return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end) return a->end < b->end ? -1 : 1;
    return a->index - b->index;
}

/* Checks that the tensors, sorted by offsets, cover the data region exactly. */
static int codir__st_check_coverage(codir_safetensors *st)
{
    uint64_t data_bytes = st->file_bytes - st->data_start, covered = 0;
    codir__st_span *spans;
    int i, rc = CODIR_OK;
    for (i = 0; i < st->num_tensors; i++) {
        const codir_st_tensor *t = &st->tensors[i];
        if (t->offset + t->nbytes > data_bytes)
            return codir__fail(CODIR_ERR_PARSE,
                               "%s: tensor \"%s\": data_offsets [%llu, %llu] run past the end of the data region, "
                               "which holds %llu bytes from byte %llu; the file is truncated or the offsets are wrong",
                               st->path, t->name, (unsigned long long)t->offset,
                               (unsigned long long)(t->offset + t->nbytes), (unsigned long long)data_bytes,
                               (unsigned long long)st->data_start);
    }
    spans = (codir__st_span *)codir__calloc((size_t)st->num_tensors + 1, sizeof *spans);
    if (!spans) return CODIR_ERR_NOMEM;
    for (i = 0; i < st->num_tensors; i++) {
        spans[i].begin = st->tensors[i].offset;
        spans[i].end = st->tensors[i].offset + st->tensors[i].nbytes;
        spans[i].index = i;
    }
    qsort(spans, (size_t)st->num_tensors, sizeof *spans, codir__st_span_order);
    for (i = 0; i < st->num_tensors && !rc; i++) {
        if (spans[i].begin < covered) {
            const codir__st_span *p = &spans[i - 1];
            rc = codir__fail(CODIR_ERR_PARSE,
                             "%s: tensors \"%s\" [%llu, %llu] and \"%s\" [%llu, %llu] overlap; each byte of the data "
                             "region must belong to one tensor",
                             st->path, st->tensors[p->index].name, (unsigned long long)p->begin,
                             (unsigned long long)p->end, st->tensors[spans[i].index].name,
                             (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end);
        } else if (spans[i].begin > covered) {
            rc = codir__fail(CODIR_ERR_PARSE,
                             "%s: bytes [%llu, %llu) of the data region belong to no tensor; the format requires the "
                             "tensors to cover the data region without gaps",
                             st->path, (unsigned long long)covered, (unsigned long long)spans[i].begin);
        }
        covered = spans[i].end;
    }
    if (!rc && covered != data_bytes)
        rc = codir__fail(CODIR_ERR_PARSE,
                         "%s: the data region holds %llu bytes but the tensors end at byte %llu of it; the format "
                         "requires the last tensor to end at the end of the file",
                         st->path, (unsigned long long)data_bytes, (unsigned long long)covered);
    codir__free(spans);
    return rc;
}

/* Parses and validates the header text[length] of st. */
static int codir__st_parse_header(codir_safetensors *st, const char *text, size_t length)
{
    codir__json js;
    int rc, member, i = 0;
    if (length == 0 || text[0] != '{')
        return codir__fail(CODIR_ERR_PARSE, "%s: malformed header at byte 8: it must start with '{'; the file is "
                           "damaged or is not a safetensors file", st->path);
    rc = codir__json_parse(&js, text, length, 8, st->path, "a safetensors file");
    if (!rc) {
        st->tensors = (codir_st_tensor *)codir__calloc((size_t)js.nodes[0].count + 1, sizeof *st->tensors);
        if (!st->tensors) rc = CODIR_ERR_NOMEM;
    }
    for (member = rc ? -1 : js.nodes[0].first; member >= 0 && !rc; member = js.nodes[member].next) {
        if (strcmp(codir__json_str(&js, js.nodes[member].key), "__metadata__") == 0 &&
            js.nodes[member].key_length == 12) {
            rc = codir__st_metadata(st, &js, member);
        } else {
            rc = codir__st_entry(st, &js, member, &st->tensors[i]);
            st->num_tensors = ++i;
        }
    }
    codir__json_free(&js);
    return rc ? rc : codir__st_check_coverage(st);
}

CODIR_DEF codir_safetensors *codir_safetensors_open(const char *path)
{
    codir_safetensors *st;
    FILE *file;
    unsigned char length_bytes[8];
    uint64_t header_length = 0;
    long end;
    size_t got;
    char *header = NULL;
    int i, rc;

    if (!path) {
        codir__fail(CODIR_ERR_INVALID, "codir_safetensors_open: path is NULL");
        return NULL;
    }
    st = (codir_safetensors *)codir__calloc(1, sizeof *st);
    if (!st) return NULL;
    st->path = codir__strndup(path, strlen(path));
    if (!st->path) goto fail;
    file = fopen(path, "rb");
    if (!file) {
        codir__fail(CODIR_ERR_IO, "failed to open '%s': %s; check the path", path, strerror(errno));
        goto fail;
    }
    st->file = file;

    /* NOTE: ftell returns a long, so where long has 32 bits (Windows) files of 2 GiB
       and more are rejected here. */
    end = fseek(file, 0, SEEK_END) == 0 ? ftell(file) : -1;
    if (end < 0 || fseek(file, 0, SEEK_SET) != 0) {
        codir__fail(CODIR_ERR_IO, "%s: failed to find the file size: %s", path, strerror(errno));
        goto fail;
    }
    st->file_bytes = (uint64_t)end;

    /* The 8-byte little-endian header length N. */
    got = fread(length_bytes, 1, 8, file);
    if (got < 8) {
        codir__fail(CODIR_ERR_PARSE, "%s: the file has %zu bytes, fewer than the 8-byte header length; it is "
                    "truncated or is not a safetensors file", path, got);
        goto fail;
    }
    for (i = 7; i >= 0; i--) header_length = header_length << 8 | length_bytes[i];
    if (header_length > CODIR__ST_MAX_HEADER) {
        codir__fail(CODIR_ERR_PARSE, "%s: the header length %llu in bytes 0-7 exceeds the format's limit of %u "
                    "bytes; the file is damaged or is not a safetensors file",
                    path, (unsigned long long)header_length, CODIR__ST_MAX_HEADER);
        goto fail;
    }
    if (header_length > st->file_bytes - 8) {
        codir__fail(CODIR_ERR_PARSE, "%s: the header length %llu in bytes 0-7 is larger than the %llu bytes that "
                    "follow; the file is truncated or is not a safetensors file",
                    path, (unsigned long long)header_length, (unsigned long long)(st->file_bytes - 8));
        goto fail;
    }
    st->data_start = 8 + header_length;

    header = (char *)codir__malloc((size_t)header_length);
    if (!header) goto fail;
    if (fread(header, 1, (size_t)header_length, file) != (size_t)header_length) {
        codir__fail(CODIR_ERR_IO, "%s: failed to read the %llu-byte header", path, (unsigned long long)header_length);
        goto fail;
    }
    rc = codir__st_parse_header(st, header, (size_t)header_length);
    if (rc) goto fail;
    codir__free(header);
    return st;

fail:
    codir__free(header);
    codir_safetensors_close(st);
    return NULL;
}

CODIR_DEF void codir_safetensors_close(codir_safetensors *st)
{
    int i;
    if (!st) return;
    if (st->file) fclose((FILE *)st->file);
    if (st->tensors)
        for (i = 0; i < st->num_tensors; i++) codir__free(st->tensors[i].name);
    if (st->metadata)
        for (i = 0; i < 2 * st->num_metadata; i++) codir__free(st->metadata[i]);
    codir__free(st->tensors);
    codir__free(st->metadata);
    codir__free(st->path);
    codir__free(st);
}

CODIR_DEF const codir_st_tensor *codir_safetensors_find(const codir_safetensors *st, const char *name)
{
    int i;
    for (i = 0; i < st->num_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

CODIR_DEF const char *codir_safetensors_metadata(const codir_safetensors *st, const char *key)
{
    int i;
    for (i = 0; i < st->num_metadata; i++)
        if (strcmp(st->metadata[2 * i], key) == 0) return st->metadata[2 * i + 1];
    return NULL;
}

CODIR_DEF int codir_safetensors_read_f32(const codir_safetensors *st, const char *name, float *dst, size_t count)
{
    enum { CHUNK = 4096 };
    unsigned char bytes[CHUNK * 4];
    const codir_st_tensor *t;
    FILE *file;
    uint64_t position;
    size_t done = 0, width;
    char shape_text[200];

    if (!st || !name || (!dst && count > 0))
        return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_read_f32: st, name or dst is NULL");
    t = codir_safetensors_find(st, name);
    if (!t) return codir__fail(CODIR_ERR_INVALID, "%s: no tensor is named \"%s\"", st->path, name);
    codir__st_shape_text(shape_text, sizeof shape_text, t->ndim, t->shape);
    if (count != t->numel)
        return codir__fail(CODIR_ERR_INVALID, "%s: tensor \"%s\" has %zu elements (shape %s), not the %zu requested",
                           st->path, name, t->numel, shape_text, count);
    if (t->dtype != CODIR_ST_F32 && t->dtype != CODIR_ST_F16 && t->dtype != CODIR_ST_BF16)
        return codir__fail(CODIR_ERR_INVALID, "%s: tensor \"%s\" has dtype %s; only F32, F16 and BF16 convert to float32",
                           st->path, name, codir__st_dtype_names[t->dtype]);
    file = (FILE *)st->file;
    width = codir__st_dtype_sizes[t->dtype];
    position = st->data_start + t->offset;
    if (position > (uint64_t)LONG_MAX)
        return codir__fail(CODIR_ERR_IO, "%s: tensor \"%s\" starts at byte %llu, beyond what fseek can address here",
                           st->path, name, (unsigned long long)position);
    if (fseek(file, (long)position, SEEK_SET) != 0)
        return codir__fail(CODIR_ERR_IO, "%s: failed to seek to byte %llu: %s", st->path,
                           (unsigned long long)position, strerror(errno));

    /* Convert in chunks from little-endian bytes, whatever the host's byte order. */
    while (done < count) {
        size_t n = count - done < (size_t)CHUNK ? count - done : (size_t)CHUNK, i;
        if (fread(bytes, width, n, file) != n)
            return codir__fail(CODIR_ERR_IO, "%s: failed to read tensor \"%s\" at byte %llu; the file was truncated "
                               "or changed after it was opened",
                               st->path, name, (unsigned long long)(position + done * width));
        for (i = 0; i < n; i++) {
            const unsigned char *p = bytes + i * width;
            if (t->dtype == CODIR_ST_F32)
                dst[done + i] = codir__st_bits_to_float((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                                                        (uint32_t)p[3] << 24);
            else if (t->dtype == CODIR_ST_F16)
                dst[done + i] = codir__st_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
            else /* BF16 is the top half of a float32 */
                dst[done + i] = codir__st_bits_to_float((uint32_t)p[0] << 16 | (uint32_t)p[1] << 24);
        }
        done += n;
    }
    return CODIR_OK;
}

/* ---- safetensors: writing ---- */

static int codir__st_write_order(const void *pa, const void *pb)
{
    const codir_st_write *a = *(const codir_st_write *const *)pa, *b = *(const codir_st_write *const *)pb;
    return strcmp(a->name, b->name);
}

static int codir__st_key_order(const void *pa, const void *pb)
{
    return strcmp(**(const char *const *const *)pa, **(const char *const *const *)pb);
}

/* Checks one tensor to write and stores its byte size in *bytes. */
static int codir__st_check_write(const char *path, const codir_st_write *t, int index, size_t *bytes)
{
    size_t numel = 1;
    int d;
    if (!t->name)
        return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': tensor %d has no name", path, index);
    if (!codir__io_utf8_valid(t->name) || strcmp(t->name, "__metadata__") == 0)
        return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': tensor name \"%s\" is %s", path, t->name,
                           strcmp(t->name, "__metadata__") == 0 ? "reserved for the metadata" : "not valid UTF-8");
    if (t->ndim < 0 || t->ndim > CODIR_ST_MAX_DIMS)
        return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': tensor \"%s\" has %d dimensions, outside "
                           "0..%d", path, t->name, t->ndim, CODIR_ST_MAX_DIMS);
    for (d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0)
            return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': tensor \"%s\" has negative dimension "
                               "%d (%lld)", path, t->name, d, (long long)t->shape[d]);
        if ((uint64_t)t->shape[d] > (uint64_t)SIZE_MAX || !codir__size_mul(numel, (size_t)t->shape[d], &numel))
            return codir__fail(CODIR_ERR_OVERFLOW, "codir_safetensors_write '%s': the size of tensor \"%s\" overflows "
                               "size_t", path, t->name);
    }
    if (!codir__size_mul(numel, 4, bytes))
        return codir__fail(CODIR_ERR_OVERFLOW, "codir_safetensors_write '%s': the size of tensor \"%s\" overflows "
                           "size_t", path, t->name);
    if (numel > 0 && !t->data)
        return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': tensor \"%s\" has no data", path, t->name);
    return CODIR_OK;
}

/* Builds the header: the JSON padded with spaces to a multiple of 8 bytes. */
static int codir__st_header(codir__io_buf *h, const char *path, const codir_st_write *const *order, int count,
                            const char *const *const *keys, int num_metadata)
{
    uint64_t offset = 0;
    int i, d;
    codir__io_puts(h, "{");
    if (num_metadata > 0) {
        codir__io_puts(h, "\"__metadata__\":{");
        for (i = 0; i < num_metadata; i++) {
            if (i) codir__io_puts(h, ",");
            codir__io_put_json_string(h, keys[i][0]);
            codir__io_puts(h, ":");
            codir__io_put_json_string(h, keys[i][1]);
        }
        codir__io_puts(h, "}");
        if (count > 0) codir__io_puts(h, ",");
    }
    for (i = 0; i < count; i++) {
        const codir_st_write *t = order[i];
        size_t bytes = 0;
        int rc = codir__st_check_write(path, t, i, &bytes);
        if (rc) return rc;
        if (i) codir__io_puts(h, ",");
        codir__io_put_json_string(h, t->name);
        codir__io_puts(h, ":{\"dtype\":\"F32\",\"shape\":[");
        for (d = 0; d < t->ndim; d++) {
            if (d) codir__io_puts(h, ",");
            codir__io_put_u64(h, (uint64_t)t->shape[d]);
        }
        codir__io_puts(h, "],\"data_offsets\":[");
        codir__io_put_u64(h, offset);
        codir__io_puts(h, ",");
        if (offset > UINT64_MAX - bytes)
            return codir__fail(CODIR_ERR_OVERFLOW, "codir_safetensors_write '%s': the data size overflows", path);
        offset += bytes;
        codir__io_put_u64(h, offset);
        codir__io_puts(h, "]}");
    }
    codir__io_puts(h, "}");
    while (!h->failed && h->length % 8 != 0) codir__io_puts(h, " ");
    if (h->failed) return codir_last_error()[0] ? CODIR_ERR_OVERFLOW : CODIR_ERR_NOMEM;
    return CODIR_OK;
}

/* Writes n floats as little-endian bytes. */
static int codir__st_write_floats(FILE *file, const float *data, size_t n)
{
    enum { CHUNK = 4096 };
    unsigned char bytes[CHUNK * 4];
    while (n > 0) {
        size_t m = n < (size_t)CHUNK ? n : (size_t)CHUNK, i;
        for (i = 0; i < m; i++) {
            uint32_t bits;
            memcpy(&bits, &data[i], sizeof bits);
            bytes[4 * i] = (unsigned char)(bits & 0xFF);
            bytes[4 * i + 1] = (unsigned char)(bits >> 8 & 0xFF);
            bytes[4 * i + 2] = (unsigned char)(bits >> 16 & 0xFF);
            bytes[4 * i + 3] = (unsigned char)(bits >> 24);
        }
        if (fwrite(bytes, 4, m, file) != m) return 0;
        data += m;
        n -= m;
    }
    return 1;
}

CODIR_DEF int codir_safetensors_write(const char *path, const codir_st_write *tensors, int count,
                                      const char *const *metadata, int num_metadata)
{
    const codir_st_write **order = NULL;
    const char *const **keys = NULL;
    codir__io_buf header = {NULL, 0, 0, 0};
    unsigned char length_bytes[8];
    char *tmp_path = NULL;
    FILE *file;
    int i, rc = CODIR_OK, failed = 0;

    if (!path || count < 0 || num_metadata < 0 || (count > 0 && !tensors) || (num_metadata > 0 && !metadata))
        return codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write: path, tensors or metadata is NULL or a count "
                           "is negative");
    order = (const codir_st_write **)codir__calloc((size_t)count + 1, sizeof *order);
    keys = (const char *const **)codir__calloc((size_t)num_metadata + 1, sizeof *keys);
    if (!order || !keys) {
        rc = CODIR_ERR_NOMEM;
        goto done;
    }

    /* Tensors and metadata keys in byte order of their names; equal neighbours are
       duplicates. */
    for (i = 0; i < count; i++) order[i] = &tensors[i];
    for (i = 0; i < count; i++) {
        if (!tensors[i].name) {
            rc = codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': tensor %d has no name", path, i);
            goto done;
        }
    }
    qsort(order, (size_t)count, sizeof *order, codir__st_write_order);
    for (i = 1; i < count; i++) {
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            rc = codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': two tensors are named \"%s\"", path,
                             order[i]->name);
            goto done;
        }
    }
    for (i = 0; i < num_metadata; i++) {
        keys[i] = metadata + 2 * i;
        if (!keys[i][0] || !keys[i][1] || !codir__io_utf8_valid(keys[i][0]) || !codir__io_utf8_valid(keys[i][1])) {
            rc = codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': metadata entry %d is NULL or not valid "
                             "UTF-8", path, i);
            goto done;
        }
    }
    qsort(keys, (size_t)num_metadata, sizeof *keys, codir__st_key_order);
    for (i = 1; i < num_metadata; i++) {
        if (strcmp(keys[i - 1][0], keys[i][0]) == 0) {
            rc = codir__fail(CODIR_ERR_INVALID, "codir_safetensors_write '%s': metadata key \"%s\" is given twice",
                             path, keys[i][0]);
            goto done;
        }
    }
    rc = codir__st_header(&header, path, order, count, keys, num_metadata);
    if (rc) goto done;

    rc = codir__io_create_tmp(path, &file, &tmp_path);
    if (rc) goto done;
    for (i = 0; i < 8; i++) length_bytes[i] = (unsigned char)(((uint64_t)header.length >> (8 * i)) & 0xFF);
    if (fwrite(length_bytes, 1, 8, file) != 8 || fwrite(header.data, 1, header.length, file) != header.length)
        failed = 1;
    for (i = 0; i < count && !failed; i++) {
        size_t numel = 1;
        int d;
        for (d = 0; d < order[i]->ndim; d++) numel *= (size_t)order[i]->shape[d]; /* checked in the header pass */
        if (!codir__st_write_floats(file, order[i]->data, numel)) failed = 1;
    }
    rc = codir__io_commit(file, tmp_path, path, failed);

done:
    codir__free(order);
    codir__free((void *)keys);
    codir__free(header.data);
    return rc;
}

/* ---- Hugging Face BERT configuration ---- */

/* Orders label ids as Python's json.dumps(sort_keys=True) orders their decimal keys. */
static int codir__hf_label_order(const void *pa, const void *pb)
{
    char a[16], b[16];
    snprintf(a, sizeof a, "%d", *(const int *)pa);
    snprintf(b, sizeof b, "%d", *(const int *)pb);
    return strcmp(a, b);
}

static void codir__hf_put_int(codir__io_buf *b, const char *key, int value, const char *after)
{
    char text[64];
    snprintf(text, sizeof text, "  \"%s\": %d%s\n", key, value, after);
    codir__io_puts(b, text);
}

static void codir__hf_put_float(codir__io_buf *b, const char *key, float value)
{
    codir__io_puts(b, "  \"");
    codir__io_puts(b, key);
    codir__io_puts(b, "\": ");
    codir__io_put_float(b, value);
    codir__io_puts(b, ",\n");
}

CODIR_DEF int codir_config_save(const codir_config *cfg, const char *path)
{
    codir__io_buf b = {NULL, 0, 0, 0};
    int *labels, i, rc;
    char text[96];

    if (!cfg || !path) return codir__fail(CODIR_ERR_INVALID, "codir_config_save: cfg or path is NULL");
    rc = codir_config_check(cfg);
    if (rc) return rc;
    labels = (int *)codir__calloc((size_t)cfg->num_labels, sizeof *labels);
    if (!labels) return CODIR_ERR_NOMEM;
    for (i = 0; i < cfg->num_labels; i++) labels[i] = i;
    qsort(labels, (size_t)cfg->num_labels, sizeof *labels, codir__hf_label_order);

    /* The keys in sorted order, as transformers' PretrainedConfig.to_json_string
       writes them. */
    /* A model with the masked-LM head still has its classifier, so the folder names
       BertForSequenceClassification, which transformers loads while ignoring cls.*. */
    codir__io_puts(&b, "{\n  \"architectures\": [\n    \"BertForSequenceClassification\"\n  ],\n");
    codir__hf_put_float(&b, "attention_probs_dropout_prob", cfg->dropout);
    codir__io_puts(&b, "  \"hidden_act\": \"gelu\",\n");
    codir__hf_put_float(&b, "hidden_dropout_prob", cfg->dropout);
    codir__hf_put_int(&b, "hidden_size", cfg->hidden, ",");
    codir__io_puts(&b, "  \"id2label\": {\n");
    for (i = 0; i < cfg->num_labels; i++) {
        snprintf(text, sizeof text, "    \"%d\": \"LABEL_%d\"%s\n", labels[i], labels[i], i + 1 < cfg->num_labels ? "," : "");
        codir__io_puts(&b, text);
    }
    codir__io_puts(&b, "  },\n  \"initializer_range\": 0.02,\n");
    codir__hf_put_int(&b, "intermediate_size", cfg->ffn, ",");
    codir__io_puts(&b, "  \"label2id\": {\n");
    for (i = 0; i < cfg->num_labels; i++) {
        snprintf(text, sizeof text, "    \"LABEL_%d\": %d%s\n", labels[i], labels[i], i + 1 < cfg->num_labels ? "," : "");
        codir__io_puts(&b, text);
    }
    codir__io_puts(&b, "  },\n");
    codir__hf_put_float(&b, "layer_norm_eps", cfg->ln_eps);
    codir__hf_put_int(&b, "max_position_embeddings", cfg->max_len, ",");
    codir__io_puts(&b, "  \"model_type\": \"bert\",\n");
    codir__hf_put_int(&b, "num_attention_heads", cfg->num_heads, ",");
    codir__hf_put_int(&b, "num_hidden_layers", cfg->num_layers, ",");
    codir__io_puts(&b, "  \"position_embedding_type\": \"absolute\",\n");
    if (cfg->num_labels == 1) codir__io_puts(&b, "  \"problem_type\": \"regression\",\n");
    codir__io_puts(&b, "  \"torch_dtype\": \"float32\",\n");
    codir__hf_put_int(&b, "type_vocab_size", cfg->type_vocab_size, ",");
    codir__hf_put_int(&b, "vocab_size", cfg->vocab_size, "");
    codir__io_puts(&b, "}\n");
    codir__free(labels);
    if (b.failed) {
        codir__free(b.data);
        return CODIR_ERR_NOMEM;
    }
    rc = codir__io_write_file(path, b.data, b.length);
    codir__free(b.data);
    return rc;
}

/* Reads the optional integer `key` of the config object into *value, which keeps its
   default when the key is absent. */
static int codir__hf_int(const codir__json *js, const char *key, int minimum, int *value)
{
    int m = codir__json_member(js, 0, key);
    const codir__json_node *n;
    if (m < 0) return CODIR_OK;
    n = &js->nodes[m];
    if (n->type != CODIR__JSON_NUMBER || !n->is_integer || n->number < minimum || n->number > INT_MAX)
        return codir__fail(CODIR_ERR_PARSE, "%s: %s at byte %zu must be an integer from %d to %d", js->source, key,
                           js->base + n->offset, minimum, INT_MAX);
    *value = (int)n->number;
    return CODIR_OK;
}

/* The same for a number in [minimum, maximum) (maximum_open) or [minimum, maximum]. */
static int codir__hf_float(const codir__json *js, const char *key, double minimum, double maximum, int maximum_open,
                           float *value)
{
    int m = codir__json_member(js, 0, key);
    const codir__json_node *n;
    if (m < 0) return CODIR_OK;
    n = &js->nodes[m];
    if (n->type != CODIR__JSON_NUMBER || !(n->number >= minimum) || n->number > maximum ||
        (maximum_open && n->number == maximum))
        return codir__fail(CODIR_ERR_PARSE, "%s: %s at byte %zu must be a number in [%g, %g%s", js->source, key,
                           js->base + n->offset, minimum, maximum, maximum_open ? ")" : "]");
    *value = (float)n->number;
    return CODIR_OK;
}

/* Returns the string value of `key`, NULL when absent, or "" after recording an error
   when the value is not a string (null counts as absent). */
static const char *codir__hf_string(const codir__json *js, const char *key, int *rc)
{
    int m = codir__json_member(js, 0, key);
    const codir__json_node *n;
    if (m < 0 || js->nodes[m].type == CODIR__JSON_NULL) return NULL;
    n = &js->nodes[m];
    if (n->type != CODIR__JSON_STRING) {
        *rc = codir__fail(CODIR_ERR_PARSE, "%s: %s at byte %zu must be a string", js->source, key, js->base + n->offset);
        return "";
    }
    return codir__json_str(js, n->str);
}

/* Counts id2label entries, whose keys must be the decimal ids 0..n-1. */
static int codir__hf_id2label(const codir__json *js, int member, int *num_labels)
{
    const codir__json_node *n = &js->nodes[member];
    int item;
    if (n->type != CODIR__JSON_OBJECT || n->count < 1)
        return codir__fail(CODIR_ERR_PARSE, "%s: id2label at byte %zu must be a non-empty object", js->source,
                           n->offset);
    for (item = n->first; item >= 0; item = js->nodes[item].next) {
        const char *key = codir__json_str(js, js->nodes[item].key);
        char *end, canonical[24];
        long id = strtol(key, &end, 10);
        snprintf(canonical, sizeof canonical, "%ld", id);
        if (*end || strcmp(canonical, key) != 0 || id < 0 || id >= n->count)
            return codir__fail(CODIR_ERR_PARSE, "%s: id2label key \"%s\" at byte %zu must be a label id from 0 to %d",
                               js->source, key, js->nodes[item].key_offset, n->count - 1);
    }
    *num_labels = n->count;
    return CODIR_OK;
}

CODIR_DEF int codir_config_load(const char *path, codir_config *cfg)
{
    codir__json js;
    codir_config c = codir_config_default();
    char *text;
    size_t length = 0;
    const char *act, *model_type, *position_type, *problem;
    int rc, member, num_labels = 2, listed = 0;

    if (!path || !cfg) return codir__fail(CODIR_ERR_INVALID, "codir_config_load: path or cfg is NULL");
    rc = codir__read_file(path, "", (size_t)1 << 24, &text, &length);
    if (rc) return rc;
    rc = codir__json_parse(&js, text, length, 0, path, "a JSON config");
    if (!rc && js.nodes[0].type != CODIR__JSON_OBJECT)
        rc = codir__fail(CODIR_ERR_PARSE, "%s: the file must hold a JSON object", path);
    if (rc) goto done;

    /* BertConfig's defaults for absent keys. */
    c.vocab_size = 30522;
    c.hidden = 768;
    c.num_layers = 12;
    c.num_heads = 12;
    c.ffn = 3072;
    c.max_len = 512;
    c.type_vocab_size = 2;
    c.ln_eps = 1e-12f;
    c.dropout = 0.1f;
    c.mlm_head = 0;
    {
        const char *const keys[7] = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "type_vocab_size"};
        int *const fields[7] = {&c.vocab_size, &c.hidden, &c.num_layers, &c.num_heads, &c.ffn, &c.max_len,
                                &c.type_vocab_size};
        int k;
        for (k = 0; k < 7 && !rc; k++) rc = codir__hf_int(&js, keys[k], 1, fields[k]);
    }
    if (!rc) rc = codir__hf_float(&js, "layer_norm_eps", 0.0, 1.0, 0, &c.ln_eps);
    if (!rc) rc = codir__hf_float(&js, "hidden_dropout_prob", 0.0, 1.0, 1, &c.dropout);
    if (rc) goto done;
    if (!(c.ln_eps > 0.0f)) {
        rc = codir__fail(CODIR_ERR_PARSE, "%s: layer_norm_eps must be positive", path);
        goto done;
    }

    /* Settings codir cannot represent are rejected rather than silently changed. */
    act = codir__hf_string(&js, "hidden_act", &rc);
    model_type = codir__hf_string(&js, "model_type", &rc);
    position_type = codir__hf_string(&js, "position_embedding_type", &rc);
    problem = codir__hf_string(&js, "problem_type", &rc);
    if (rc) goto done;
    if (act && strcmp(act, "gelu") != 0) {
        rc = codir__fail(CODIR_ERR_INVALID, "%s: hidden_act \"%s\" is not supported: codir implements only \"gelu\", "
                         "the exact erf form; use a model trained with it", path, act);
        goto done;
    }
    if (model_type && strcmp(model_type, "bert") != 0) {
        rc = codir__fail(CODIR_ERR_INVALID, "%s: model_type \"%s\" is not supported: codir_model_load reads BERT "
                         "checkpoints (model_type \"bert\") only", path, model_type);
        goto done;
    }
    if (position_type && strcmp(position_type, "absolute") != 0) {
        rc = codir__fail(CODIR_ERR_INVALID, "%s: position_embedding_type \"%s\" is not supported: codir has absolute "
                         "position embeddings only", path, position_type);
        goto done;
    }

    /* The number of labels: id2label as transformers writes it, or num_labels. */
    member = codir__json_member(&js, 0, "id2label");
    if (member >= 0) {
        rc = codir__hf_id2label(&js, member, &num_labels);
        if (rc) goto done;
        listed = 1;
    }
    if (codir__json_member(&js, 0, "num_labels") >= 0) {
        int n = 0;
        rc = codir__hf_int(&js, "num_labels", 1, &n);
        if (rc) goto done;
        if (listed && n != num_labels) {
            rc = codir__fail(CODIR_ERR_PARSE, "%s: num_labels %d contradicts the %d entries of id2label", path, n,
                             num_labels);
            goto done;
        }
        num_labels = n;
    }
    if (problem && strcmp(problem, "regression") != 0 && strcmp(problem, "single_label_classification") != 0) {
        rc = codir__fail(CODIR_ERR_INVALID, "%s: problem_type \"%s\" is not supported: codir trains single-label "
                         "classification or, with one label, regression", path, problem);
        goto done;
    }
    if (problem && (strcmp(problem, "regression") == 0) != (num_labels == 1)) {
        rc = codir__fail(CODIR_ERR_INVALID, "%s: problem_type \"%s\" does not fit %d labels: codir treats one label "
                         "as regression and more as classification", path, problem, num_labels);
        goto done;
    }
    c.num_labels = num_labels;
    rc = codir_config_check(&c);
    if (rc) rc = codir__fail(rc, "%s: %s", path, codir_last_error());
    if (!rc) *cfg = c;

done:
    codir__json_free(&js);
    codir__free(text);
    return rc;
}

/* ---- Hugging Face BERT weights ---- */

/* One tensor of the Hugging Face layout and the codir memory it maps to. */
typedef struct codir__hf_entry {
    char name[96];
    char old_name[96];          /* LayerNorm gamma/beta name accepted on load, or "" */
    float *data;                /* a whole codir tensor or a query/key/value block of one */
    int ndim;
    int64_t shape[2];
} codir__hf_entry;

static void codir__hf_add(codir__hf_entry *e, int *n, const char *prefix, const char *suffix, float *data, int d0,
                          int d1)
{
    codir__hf_entry *x = &e[(*n)++];
    const char *old = NULL;
    snprintf(x->name, sizeof x->name, "%s%s", prefix, suffix);
    x->old_name[0] = '\0';
    if (strcmp(suffix, "LayerNorm.weight") == 0) old = "LayerNorm.gamma";
    if (strcmp(suffix, "LayerNorm.bias") == 0) old = "LayerNorm.beta";
    if (old) snprintf(x->old_name, sizeof x->old_name, "%s%s", prefix, old);
    x->data = data;
    x->ndim = d1 > 0 ? 2 : 1;
    x->shape[0] = d0;
    x->shape[1] = d1 > 0 ? d1 : 1;
}

/* Lists every Hugging Face tensor of model in *entries; returns the count or an error. */
static int codir__hf_layout(const codir_model *m, codir__hf_entry **entries)
{
    const codir_config *cfg = &m->cfg;
    int C = cfg->hidden, F = cfg->ffn, V = cfg->vocab_size, n = 0, l, k;
    size_t CC = (size_t)C * (size_t)C;
    codir__hf_entry *e = (codir__hf_entry *)codir__calloc((size_t)cfg->num_layers * 16 + 16, sizeof *e);
    static const char *const qkv[3] = {"query", "key", "value"};
    char prefix[64];
    *entries = e;
    if (!e) return CODIR_ERR_NOMEM;

    codir__hf_add(e, &n, "bert.embeddings.", "word_embeddings.weight", m->tok_emb->data, V, C);
    codir__hf_add(e, &n, "bert.embeddings.", "position_embeddings.weight", m->pos_emb->data, cfg->max_len, C);
    codir__hf_add(e, &n, "bert.embeddings.", "token_type_embeddings.weight", m->type_emb->data, cfg->type_vocab_size, C);
    codir__hf_add(e, &n, "bert.embeddings.", "LayerNorm.weight", m->emb_ln_gamma->data, C, 0);
    codir__hf_add(e, &n, "bert.embeddings.", "LayerNorm.bias", m->emb_ln_beta->data, C, 0);
    for (l = 0; l < cfg->num_layers; l++) {
        const codir_layer *ly = &m->layers[l];
        /* query, key and value are the row blocks 0..C-1, C..2C-1 and 2C..3C-1 */
        for (k = 0; k < 3; k++) {
            char suffix[32];
            snprintf(prefix, sizeof prefix, "bert.encoder.layer.%d.attention.self.", l);
            snprintf(suffix, sizeof suffix, "%s.weight", qkv[k]);
            codir__hf_add(e, &n, prefix, suffix, ly->qkv_w->data + (size_t)k * CC, C, C);
            snprintf(suffix, sizeof suffix, "%s.bias", qkv[k]);
            codir__hf_add(e, &n, prefix, suffix, ly->qkv_b->data + (size_t)k * (size_t)C, C, 0);
        }
        snprintf(prefix, sizeof prefix, "bert.encoder.layer.%d.attention.output.", l);
        codir__hf_add(e, &n, prefix, "dense.weight", ly->attn_out_w->data, C, C);
        codir__hf_add(e, &n, prefix, "dense.bias", ly->attn_out_b->data, C, 0);
        codir__hf_add(e, &n, prefix, "LayerNorm.weight", ly->ln1_gamma->data, C, 0);
        codir__hf_add(e, &n, prefix, "LayerNorm.bias", ly->ln1_beta->data, C, 0);
        snprintf(prefix, sizeof prefix, "bert.encoder.layer.%d.intermediate.", l);
        codir__hf_add(e, &n, prefix, "dense.weight", ly->ffn_up_w->data, F, C);
        codir__hf_add(e, &n, prefix, "dense.bias", ly->ffn_up_b->data, F, 0);
        snprintf(prefix, sizeof prefix, "bert.encoder.layer.%d.output.", l);
        codir__hf_add(e, &n, prefix, "dense.weight", ly->ffn_down_w->data, C, F);
        codir__hf_add(e, &n, prefix, "dense.bias", ly->ffn_down_b->data, C, 0);
        codir__hf_add(e, &n, prefix, "LayerNorm.weight", ly->ln2_gamma->data, C, 0);
        codir__hf_add(e, &n, prefix, "LayerNorm.bias", ly->ln2_beta->data, C, 0);
    }
    codir__hf_add(e, &n, "bert.pooler.", "dense.weight", m->pool_w->data, C, C);
    codir__hf_add(e, &n, "bert.pooler.", "dense.bias", m->pool_b->data, C, 0);
    codir__hf_add(e, &n, "classifier.", "weight", m->cls_w->data, cfg->num_labels, C);
    codir__hf_add(e, &n, "classifier.", "bias", m->cls_b->data, cfg->num_labels, 0);
    if (cfg->mlm_head) {
        codir__hf_add(e, &n, "cls.predictions.transform.", "dense.weight", m->mlm_dense_w->data, C, C);
        codir__hf_add(e, &n, "cls.predictions.transform.", "dense.bias", m->mlm_dense_b->data, C, 0);
        codir__hf_add(e, &n, "cls.predictions.transform.", "LayerNorm.weight", m->mlm_ln_gamma->data, C, 0);
        codir__hf_add(e, &n, "cls.predictions.transform.", "LayerNorm.bias", m->mlm_ln_beta->data, C, 0);
        codir__hf_add(e, &n, "cls.predictions.", "bias", m->mlm_bias->data, V, 0);
    }
    return n;
}

CODIR_DEF int codir_model_save(const codir_model *model, const char *dir)
{
    static const char *const metadata[2] = {"format", "pt"};
    codir__hf_entry *entries;
    codir_st_write *writes;
    char *weights_path, *config_path;
    int n, i, rc;

    if (!model || !dir) return codir__fail(CODIR_ERR_INVALID, "codir_model_save: model or dir is NULL");
    n = codir__hf_layout(model, &entries);
    if (n < 0) return n;
    writes = (codir_st_write *)codir__calloc((size_t)n, sizeof *writes);
    weights_path = codir__io_join(dir, "model.safetensors");
    config_path = codir__io_join(dir, "config.json");
    if (!writes || !weights_path || !config_path) {
        rc = CODIR_ERR_NOMEM;
        goto done;
    }
    for (i = 0; i < n; i++) {
        writes[i].name = entries[i].name;
        writes[i].ndim = entries[i].ndim;
        writes[i].shape[0] = entries[i].shape[0];
        writes[i].shape[1] = entries[i].shape[1];
        writes[i].data = entries[i].data;
    }
    rc = codir_safetensors_write(weights_path, writes, n, metadata, 1);
    if (!rc) rc = codir_config_save(&model->cfg, config_path);

done:
    codir__free(entries);
    codir__free(writes);
    codir__free(weights_path);
    codir__free(config_path);
    return rc;
}

/* Returns the tensor stored under `name` or, when given, under `old_name`, rejecting a
   file that holds both; *index receives its position, or -1 when it is missing. */
static int codir__hf_lookup(const codir_safetensors *st, const char *name, const char *old_name, int *index)
{
    const codir_st_tensor *t = codir_safetensors_find(st, name);
    const codir_st_tensor *old = old_name && old_name[0] ? codir_safetensors_find(st, old_name) : NULL;
    if (t && old)
        return codir__fail(CODIR_ERR_PARSE, "%s: both \"%s\" and its old name \"%s\" are present; keep one",
                           st->path, name, old_name);
    if (!t) t = old;
    *index = t ? (int)(t - st->tensors) : -1;
    return CODIR_OK;
}

/* Reads tensor `index` of st into e->data after checking its shape against e. */
static int codir__hf_fill(const codir_safetensors *st, int index, const codir__hf_entry *e)
{
    const codir_st_tensor *t = &st->tensors[index];
    char want[64], found[200];
    int same = t->ndim == e->ndim, d;
    for (d = 0; same && d < e->ndim; d++) same = t->shape[d] == e->shape[d];
    if (!same)
        return codir__fail(CODIR_ERR_INVALID, "%s: tensor \"%s\" has shape %s, but config.json implies %s; check that "
                           "config.json belongs to these weights",
                           st->path, t->name, codir__st_shape_text(found, sizeof found, t->ndim, t->shape),
                           codir__st_shape_text(want, sizeof want, e->ndim, e->shape));
    return codir_safetensors_read_f32(st, t->name, e->data, (size_t)e->shape[0] * (size_t)e->shape[1]);
}

/* Checks the tied decoder weight and bias that Hugging Face may store beside the
   masked-LM head, and marks them used. */
static int codir__hf_tied(const codir_safetensors *st, const codir_model *m, char *used)
{
    const codir_st_tensor *t;
    int rc = CODIR_OK;
    t = codir_safetensors_find(st, "cls.predictions.decoder.weight");
    if (t) {
        codir__hf_entry e;
        e.ndim = 2;
        e.shape[0] = m->cfg.vocab_size;
        e.shape[1] = m->cfg.hidden;
        e.data = (float *)codir__calloc(m->tok_emb->numel, sizeof(float));
        if (!e.data) return CODIR_ERR_NOMEM;
        rc = codir__hf_fill(st, (int)(t - st->tensors), &e);
        if (!rc && memcmp(e.data, m->tok_emb->data, m->tok_emb->numel * sizeof(float)) != 0)
            rc = codir__fail(CODIR_ERR_INVALID, "%s: cls.predictions.decoder.weight differs from "
                             "bert.embeddings.word_embeddings.weight; codir ties the decoder to the word embeddings "
                             "and cannot load an untied decoder", st->path);
        codir__free(e.data);
        used[t - st->tensors] = 1;
    }
    t = codir_safetensors_find(st, "cls.predictions.decoder.bias");
    if (!rc && t && codir_safetensors_find(st, "cls.predictions.bias")) {
        codir__hf_entry e;
        e.ndim = 1;
        e.shape[0] = m->cfg.vocab_size;
        e.shape[1] = 1;
        e.data = (float *)codir__calloc(m->mlm_bias->numel, sizeof(float));
        if (!e.data) return CODIR_ERR_NOMEM;
        rc = codir__hf_fill(st, (int)(t - st->tensors), &e);
        if (!rc && memcmp(e.data, m->mlm_bias->data, m->mlm_bias->numel * sizeof(float)) != 0)
            rc = codir__fail(CODIR_ERR_INVALID, "%s: cls.predictions.decoder.bias differs from cls.predictions.bias; "
                             "Hugging Face ties them, so the file is inconsistent", st->path);
        codir__free(e.data);
        used[t - st->tensors] = 1;
    }
    return rc;
}

CODIR_DEF codir_model *codir_model_load(const char *dir)
{
    codir_config cfg;
    codir_model *m = NULL;
    codir_safetensors *st = NULL;
    codir__hf_entry *entries = NULL;
    char *weights_path = NULL, *config_path = NULL, *used = NULL;
    int n = 0, i, rc, unexpected = 0, first_unexpected = -1;

    if (!dir) {
        codir__fail(CODIR_ERR_INVALID, "codir_model_load: dir is NULL");
        return NULL;
    }
    weights_path = codir__io_join(dir, "model.safetensors");
    config_path = codir__io_join(dir, "config.json");
    if (!weights_path || !config_path) goto fail;
    if (codir_config_load(config_path, &cfg)) goto fail;
    st = codir_safetensors_open(weights_path);
    if (!st) goto fail;
    cfg.mlm_head = codir_safetensors_find(st, "cls.predictions.transform.dense.weight") != NULL;
    m = codir_model_create(&cfg, 0);
    if (!m) goto fail;
    n = codir__hf_layout(m, &entries);
    used = (char *)codir__calloc((size_t)st->num_tensors + 1, 1);
    if (n < 0 || !used) goto fail;

    /* Every tensor of the layout must be present with the shape config.json implies. */
    for (i = 0; i < n; i++) {
        int index;
        rc = codir__hf_lookup(st, entries[i].name, entries[i].old_name, &index);
        if (rc) goto fail;
        if (index < 0 && strcmp(entries[i].name, "cls.predictions.bias") == 0)
            rc = codir__hf_lookup(st, "cls.predictions.decoder.bias", NULL, &index);
        if (index < 0) {
            codir__fail(CODIR_ERR_INVALID, "%s: tensor \"%s\" is missing; a %s model needs every tensor that "
                        "codir_model_save writes", weights_path, entries[i].name,
                        cfg.mlm_head ? "masked-LM" : "sequence-classification");
            goto fail;
        }
        rc = codir__hf_fill(st, index, &entries[i]);
        if (rc) goto fail;
        used[index] = 1;
    }
    if (cfg.mlm_head && codir__hf_tied(st, m, used)) goto fail;

    /* Anything else is rejected, except the position index buffer of old exports. */
    for (i = 0; i < st->num_tensors; i++) {
        if (used[i] || strcmp(st->tensors[i].name, "bert.embeddings.position_ids") == 0) continue;
        if (first_unexpected < 0) first_unexpected = i;
        unexpected++;
    }
    if (unexpected) {
        codir__fail(CODIR_ERR_INVALID, "%s: unexpected tensor \"%s\"%s; codir_model_load reads only the BERT "
                    "encoder, pooler, classifier and masked-LM weights", weights_path,
                    st->tensors[first_unexpected].name, unexpected > 1 ? " and others" : "");
        goto fail;
    }

    /* A NaN or Inf weight would only show as a non-finite loss at the first step. */
    for (i = 0; i < n; i++) {
        size_t numel = (size_t)entries[i].shape[0] * (size_t)(entries[i].ndim > 1 ? entries[i].shape[1] : 1), k;
        for (k = 0; k < numel && isfinite(entries[i].data[k]); k++) continue;
        if (k < numel) {
            codir__fail(CODIR_ERR_INVALID, "%s: tensor \"%s\" holds %s at element %zu; the file is corrupt or comes "
                        "from a run that diverged", weights_path, entries[i].name,
                        isnan(entries[i].data[k]) ? "NaN" : "Inf", k);
            goto fail;
        }
    }
    codir__free(entries);
    codir__free(used);
    codir__free(weights_path);
    codir__free(config_path);
    codir_safetensors_close(st);
    return m;

fail:
    codir__free(entries);
    codir__free(used);
    codir__free(weights_path);
    codir__free(config_path);
    codir_safetensors_close(st);
    codir_model_free(m);
    return NULL;
}

/* ===================================================================================
   7. Losses: the CoDIR objective (implementation)
   =================================================================================== */

CODIR_DEF codir_distill_config codir_distill_config_default(void)
{
    codir_distill_config cfg;
    cfg.beta = 0.5f;
    cfg.temperature = 2.0f;
    cfg.lambda = 0.1f;
    cfg.tau = 0.07f;
    cfg.num_negatives = 100;
    cfg.proj_dim = 128;
    cfg.momentum = 0.5f;
    cfg.layer_map = NULL;
    cfg.mode = CODIR_CRD_INFONCE;
    cfg.pooling = CODIR_POOL_MEAN;
    cfg.neg_margin = 0.5f;
    cfg.max_bank_bytes = 4.0 * 1024 * 1024 * 1024;
    cfg.negatives_from = CODIR_NEG_OTHER_GROUP;
    return cfg;
}

/* Checks a distillation configuration against the two models. */
static int codir__distill_check(const codir_distill_config *cfg, const codir_config *student,
                                const codir_config *teacher, int num_examples)
{
    int k, rc;
    rc = codir_config_check(student);
    if (rc) return codir__fail(rc, "student config: %s", codir_last_error());
    rc = codir_config_check(teacher);
    if (rc) return codir__fail(rc, "teacher config: %s", codir_last_error());
    if (!(cfg->beta >= 0.0f && cfg->beta <= 1.0f))
        return codir__fail(CODIR_ERR_INVALID, "beta %g must be in [0, 1]", (double)cfg->beta);
    if (!(cfg->temperature > 0.0f) || !isfinite(cfg->temperature))
        return codir__fail(CODIR_ERR_INVALID, "KD temperature %g must be positive", (double)cfg->temperature);
    if (!(cfg->lambda >= 0.0f) || !isfinite(cfg->lambda))
        return codir__fail(CODIR_ERR_INVALID, "lambda %g must be zero or positive", (double)cfg->lambda);
    if (!(cfg->tau > 0.0f) || !isfinite(cfg->tau))
        return codir__fail(CODIR_ERR_INVALID, "contrastive temperature tau %g must be positive", (double)cfg->tau);
    if (cfg->num_negatives < 1)
        return codir__fail(CODIR_ERR_INVALID, "number of negatives K = %d must be at least 1", cfg->num_negatives);
    if (cfg->proj_dim < 1) return codir__fail(CODIR_ERR_INVALID, "projection size %d must be positive", cfg->proj_dim);
    if (!(cfg->momentum >= 0.0f && cfg->momentum < 1.0f))
        return codir__fail(CODIR_ERR_INVALID, "bank momentum %g must be in [0, 1)", (double)cfg->momentum);
    if (student->num_labels != teacher->num_labels)
        return codir__fail(CODIR_ERR_INVALID, "student has %d labels but teacher has %d", student->num_labels,
                           teacher->num_labels);
    if (num_examples < 2) return codir__fail(CODIR_ERR_INVALID, "distillation needs at least 2 training examples");
    if (cfg->mode != CODIR_CRD_INFONCE && cfg->mode != CODIR_CRD_NCE)
        return codir__fail(CODIR_ERR_INVALID, "contrastive mode %d is neither CODIR_CRD_INFONCE nor CODIR_CRD_NCE",
                           cfg->mode);
    if (cfg->pooling != CODIR_POOL_MEAN && cfg->pooling != CODIR_POOL_FIRST)
        return codir__fail(CODIR_ERR_INVALID, "pooling %d is neither CODIR_POOL_MEAN nor CODIR_POOL_FIRST", cfg->pooling);
    if (!(cfg->neg_margin >= 0.0f)) return codir__fail(CODIR_ERR_INVALID, "negative margin %g must be >= 0", (double)cfg->neg_margin);
    if (cfg->negatives_from != CODIR_NEG_OTHER_GROUP && cfg->negatives_from != CODIR_NEG_SAME_GROUP)
        return codir__fail(CODIR_ERR_INVALID, "negatives_from %d is neither CODIR_NEG_OTHER_GROUP nor CODIR_NEG_SAME_GROUP",
                           cfg->negatives_from);
    if (cfg->mode == CODIR_CRD_NCE && cfg->num_negatives >= num_examples)
        return codir__fail(CODIR_ERR_INVALID, "NCE needs fewer negatives (K = %d) than training examples (%d); lower K",
                           cfg->num_negatives, num_examples);
    if (cfg->layer_map)
        for (k = 0; k < student->num_layers; k++)
            if (cfg->layer_map[k] < 1 || cfg->layer_map[k] > teacher->num_layers)
                return codir__fail(CODIR_ERR_INVALID, "layer map: student layer %d maps to teacher layer %d, outside 1..%d",
                                   k + 1, cfg->layer_map[k], teacher->num_layers);
    return CODIR_OK;
}

CODIR_DEF codir_distiller *codir_distiller_create(const codir_distill_config *cfg, const codir_config *student,
                                                  const codir_config *teacher, const int *labels,
                                                  int num_examples, uint64_t seed)
{
    codir_distiller *d;
    codir_param_spec specs[4];
    int Ls = student->num_layers, k, c, i, D = cfg->proj_dim;
    size_t bank_n;
    float a;
    uint64_t rng = seed;
    if (codir__distill_check(cfg, student, teacher, num_examples)) return NULL;
    if (!labels) {
        codir__fail(CODIR_ERR_INVALID, "codir_distiller_create needs the %d training labels, which negative sampling "
                    "reads; pass an array of zeros for regression", num_examples);
        return NULL;
    }
    if (!codir__size_mul((size_t)num_examples, (size_t)D, &bank_n) || bank_n > SIZE_MAX / sizeof(float) / 2) {
        codir__fail(CODIR_ERR_OVERFLOW, "memory bank of %d x %d overflows size_t", num_examples, D);
        return NULL;
    }
    {
        /* One bank (two in NCE mode) of num_examples rows of D floats. */
        double bytes = (double)bank_n * sizeof(float) * (cfg->mode == CODIR_CRD_NCE ? 2 : 1);
        if (cfg->max_bank_bytes > 0 && bytes > cfg->max_bank_bytes) {
            codir__fail(CODIR_ERR_NOMEM,
                        "memory bank of %d examples x %d dimensions needs %.1f MiB, over the limit of %.1f MiB; "
                        "lower the projection size, or raise max_bank_bytes",
                        num_examples, D, bytes / 1048576.0, cfg->max_bank_bytes / 1048576.0);
            return NULL;
        }
    }
    d = (codir_distiller *)codir__calloc(1, sizeof *d);
    if (!d) return NULL;
    d->cfg = *cfg;
    d->cfg.layer_map = NULL;
    d->student_layers = Ls;
    d->teacher_layers = teacher->num_layers;
    d->student_hidden = student->hidden;
    d->teacher_hidden = teacher->hidden;
    d->num_examples = num_examples;
    d->layer_map = (int *)codir__calloc((size_t)Ls, sizeof(int));
    d->bank = (float *)codir__calloc(bank_n, sizeof(float));
    d->labels = (int *)codir__calloc((size_t)num_examples, sizeof(int));
    d->by_label = (int *)codir__calloc((size_t)num_examples, sizeof(int));
    if (cfg->mode == CODIR_CRD_NCE) d->bank_s = (float *)codir__calloc(bank_n, sizeof(float));
    if (!d->layer_map || !d->bank || !d->labels || !d->by_label || (cfg->mode == CODIR_CRD_NCE && !d->bank_s)) {
        if (!d->bank || (cfg->mode == CODIR_CRD_NCE && !d->bank_s))
            codir__fail(CODIR_ERR_NOMEM, "out of memory allocating a memory bank of %d x %d floats", num_examples, D);
        goto fail;
    }

    /* Layer map: the official code pairs student layer k with teacher layer
       (k - 1) * Lt / Ls + 1 (12 -> 6 gives 1, 3, 5, 7, 9, 11). */
    for (k = 0; k < Ls; k++)
        d->layer_map[k] = cfg->layer_map ? cfg->layer_map[k] : k * teacher->num_layers / Ls + 1;

    /* Projection heads from the concatenated pooled layers to D. */
    memset(specs, 0, sizeof specs);
    specs[0].name = "crd.student_proj.weight";
    specs[0].ndim = 2;
    specs[0].shape[0] = D;
    specs[0].shape[1] = Ls * student->hidden;
    specs[1].name = "crd.student_proj.bias";
    specs[1].ndim = 1;
    specs[1].shape[0] = D;
    specs[1].no_decay = 1;
    specs[2].name = "crd.teacher_proj.weight";
    specs[2].ndim = 2;
    specs[2].shape[0] = D;
    specs[2].shape[1] = Ls * teacher->hidden;
    specs[3].name = "crd.teacher_proj.bias";
    specs[3].ndim = 1;
    specs[3].shape[0] = D;
    specs[3].no_decay = 1;
    for (i = 0; i < 4; i++) specs[i].shape[2] = specs[i].shape[3] = 1;
    if (codir_params_init(&d->params, specs, 4)) goto fail;
    d->proj_s_w = &d->params.tensors[0];
    d->proj_s_b = &d->params.tensors[1];
    d->proj_t_w = &d->params.tensors[2];
    d->proj_t_b = &d->params.tensors[3];

    /* torch.nn.Linear's default: weights uniform in +-1/sqrt(fan_in). */
    for (i = 0; i < 4; i += 2) {
        codir_tensor *w = &d->params.tensors[i];
        float bound = 1.0f / sqrtf((float)w->shape[1]);
        size_t e;
        for (e = 0; e < w->numel; e++)
            w->data[e] = bound * (float)(2.0 * ((double)(codir__splitmix64(&rng) >> 11) / 9007199254740992.0) - 1.0);
    }

    /* Bank rows uniform in (-a, a), a = sqrt(3 / D), so each coordinate has variance 1/D. */
    a = sqrtf(3.0f / (float)D);
    for (i = 0; (size_t)i < bank_n; i++)
        d->bank[i] = a * (float)(2.0 * ((double)(codir__splitmix64(&rng) >> 11) / 9007199254740992.0) - 1.0);
    if (d->bank_s)
        for (i = 0; (size_t)i < bank_n; i++)
            d->bank_s[i] = a * (float)(2.0 * ((double)(codir__splitmix64(&rng) >> 11) / 9007199254740992.0) - 1.0);

    /* Group example ids by label (counting sort) for negative sampling. */
    d->num_classes = 0;
    for (i = 0; i < num_examples; i++) {
        if (labels[i] < 0) {
            codir__fail(CODIR_ERR_INVALID, "training label %d of example %d is negative", labels[i], i);
            goto fail;
        }
        d->labels[i] = labels[i];
        if (labels[i] + 1 > d->num_classes) d->num_classes = labels[i] + 1;
    }
    d->label_start = (int *)codir__calloc((size_t)d->num_classes + 1, sizeof(int));
    if (!d->label_start) goto fail;
    for (i = 0; i < num_examples; i++) d->label_start[labels[i] + 1]++;
    for (c = 0; c < d->num_classes; c++) d->label_start[c + 1] += d->label_start[c];
    {
        int *fill = (int *)codir__calloc((size_t)d->num_classes, sizeof(int));
        if (!fill) goto fail;
        for (i = 0; i < num_examples; i++) d->by_label[d->label_start[labels[i]] + fill[labels[i]]++] = i;
        codir__free(fill);
    }
    d->rng = codir__hash64(seed, 0x6e65676174697665ull);
    return d;

fail:
    codir_distiller_free(d);
    return NULL;
}

CODIR_DEF void codir_distiller_free(codir_distiller *d)
{
    if (!d) return;
    codir_params_free(&d->params);
    codir__free(d->layer_map);
    codir__free(d->bank);
    codir__free(d->bank_s);
    codir__free(d->targets);
    codir__free(d->by_target);
    codir__free(d->labels);
    codir__free(d->by_label);
    codir__free(d->label_start);
    codir__free(d);
}

/* Robert Floyd's algorithm: writes K distinct positions of [0, pool) to out in O(K^2)
   time with no scratch memory. */
static void codir__floyd_sample(uint64_t *rng, int pool, int K, int *out)
{
    int drawn = 0, j, i;
    for (j = pool - K; j < pool; j++) {
        int r = (int)(codir__splitmix64(rng) % (uint64_t)(j + 1)), seen = 0;
        for (i = 0; i < drawn && !seen; i++) seen = out[i] == r;
        out[drawn++] = seen ? j : r;
    }
}

/* A regression target with its example id, for sorting. */
typedef struct codir__target_id {
    float target;
    int id;
} codir__target_id;

static int codir__compare_target(const void *a, const void *b)
{
    const codir__target_id *x = (const codir__target_id *)a, *y = (const codir__target_id *)b;
    if (x->target != y->target) return x->target < y->target ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Orders example ids by target (ties by id) for the regression sampler. */
static int codir__sort_by_target(int *order, const float *targets, int n)
{
    codir__target_id *pairs = (codir__target_id *)codir__calloc((size_t)(n ? n : 1), sizeof *pairs);
    int i;
    if (!pairs) return CODIR_ERR_NOMEM;
    for (i = 0; i < n; i++) {
        pairs[i].target = targets[i];
        pairs[i].id = i;
    }
    qsort(pairs, (size_t)n, sizeof *pairs, codir__compare_target);
    for (i = 0; i < n; i++) order[i] = pairs[i].id;
    codir__free(pairs);
    return CODIR_OK;
}

CODIR_DEF int codir_distiller_set_targets(codir_distiller *d, const float *targets)
{
    int i;
    float *t = (float *)codir__calloc((size_t)d->num_examples, sizeof(float));
    int *order = (int *)codir__calloc((size_t)d->num_examples, sizeof(int));
    if (!t || !order) {
        codir__free(t);
        codir__free(order);
        return CODIR_ERR_NOMEM;
    }
    for (i = 0; i < d->num_examples; i++) {
        if (!isfinite(targets[i])) {
            codir__free(t);
            codir__free(order);
            return codir__fail(CODIR_ERR_INVALID, "regression target of example %d is %g; targets must be finite", i,
                               (double)targets[i]);
        }
        t[i] = targets[i];
    }
    if (codir__sort_by_target(order, t, d->num_examples)) {
        codir__free(t);
        codir__free(order);
        return CODIR_ERR_NOMEM;
    }
    codir__free(d->targets);
    codir__free(d->by_target);
    d->targets = t;
    d->by_target = order;
    return CODIR_OK;
}

/* Regression negatives: the examples sorted by target form [0, lo) and [hi, N) below
   and above the anchor's margin band; those are drawn first, and any shortfall comes
   from the band itself minus the anchor. */
static int codir__sample_regression(codir_distiller *d, int anchor, int *out, int K)
{
    int N = d->num_examples, lo = 0, hi = N, far, i, drawn;
    float t = d->targets[anchor], margin = d->cfg.neg_margin;
    while (lo < N && d->targets[d->by_target[lo]] < t - margin) lo++;
    while (hi > lo && d->targets[d->by_target[hi - 1]] > t + margin) hi--;
    far = lo + (N - hi);
    if (K > N - 1) K = N - 1;
    if (far >= K) {
        codir__floyd_sample(&d->rng, far, K, out);
        for (i = 0; i < K; i++) out[i] = d->by_target[out[i] < lo ? out[i] : out[i] - lo + hi];
        return K;
    }

    /* Every far example, then the rest from the band without the anchor. */
    drawn = 0;
    for (i = 0; i < lo; i++) out[drawn++] = d->by_target[i];
    for (i = hi; i < N; i++) out[drawn++] = d->by_target[i];
    {
        int band = hi - lo - 1, need = K - drawn, pos = 0, anchor_pos = -1;
        for (i = lo; i < hi; i++)
            if (d->by_target[i] == anchor) anchor_pos = i - lo;
        codir__floyd_sample(&d->rng, band, need, out + drawn);
        for (i = 0; i < need; i++) {
            pos = out[drawn + i];
            out[drawn + i] = d->by_target[lo + (pos < anchor_pos ? pos : pos + 1)];
        }
    }
    return K;
}

/* Same-group negatives: the anchor's group without the anchor first, then distinct
   examples of other groups when the group is too small. */
static int codir__sample_same_group(codir_distiller *d, int anchor, int *out, int K)
{
    int own = d->labels[anchor], own_lo = d->label_start[own], own_n = d->label_start[own + 1] - own_lo;
    int anchor_pos = 0, i, inside = own_n - 1;
    if (K > d->num_examples - 1) K = d->num_examples - 1;
    while (d->by_label[own_lo + anchor_pos] != anchor) anchor_pos++;
    if (inside >= K) {
        codir__floyd_sample(&d->rng, inside, K, out);
        for (i = 0; i < K; i++) out[i] = d->by_label[own_lo + (out[i] < anchor_pos ? out[i] : out[i] + 1)];
        return K;
    }
    for (i = 0; i < inside; i++) out[i] = d->by_label[own_lo + (i < anchor_pos ? i : i + 1)];
    codir__floyd_sample(&d->rng, d->num_examples - own_n, K - inside, out + inside);
    for (i = inside; i < K; i++) out[i] = d->by_label[out[i] < own_lo ? out[i] : out[i] + own_n];
    return K;
}

CODIR_DEF int codir_sample_negatives(codir_distiller *d, int anchor, int *out, int K)
{
    int own, own_lo, own_n, pool, i;
    if (d->targets) return codir__sample_regression(d, anchor, out, K);
    if (d->cfg.negatives_from == CODIR_NEG_SAME_GROUP) return codir__sample_same_group(d, anchor, out, K);
    own = d->labels[anchor];
    own_lo = d->label_start[own];
    own_n = d->label_start[own + 1] - own_lo;
    pool = d->num_examples - own_n;
    if (K > pool) K = pool;

    /* K distinct positions of the pool (all examples but the anchor's label group),
       mapped to example ids by skipping that group. */
    codir__floyd_sample(&d->rng, pool, K, out);
    for (i = 0; i < K; i++) out[i] = d->by_label[out[i] < own_lo ? out[i] : out[i] + own_n];
    return K;
}

/* Whether the contrastive features read the last layer of the teacher (teacher_side 1)
   or of the student (0) at every token. If not, codir_model_logits is enough: its last
   block runs for the first token only after the QKV product. For the teacher, which
   has no dropout, that gives the full pass's logits and features (bit for bit in the
   tests).
   The student's last block draws other dropout masks, as codir_model_logits says.
   First-token pooling reads token 0 alone. Mean pooling reads every token of every
   student layer, but of the teacher only its mapped layers, and the default map leaves
   out the teacher's last layer whenever the student has fewer layers. */
static int codir__features_read_last_layer(const codir_distiller *d, int teacher_side)
{
    int k;
    if (d->cfg.pooling == CODIR_POOL_FIRST) return 0;
    if (!teacher_side) return 1;
    for (k = 0; k < d->student_layers; k++)
        if (d->layer_map[k] == d->teacher_layers) return 1;
    return 0;
}

/* Runs codir_model_forward when the contrastive features are needed (`features` 1)
   and read the model's last layer at every token, else codir_model_logits. */
static int codir__distill_forward(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                  codir_output *out, const codir_distiller *d, int teacher_side, int features)
{
    if (features && codir__features_read_last_layer(d, teacher_side)) return codir_model_forward(ctx, model, batch, out);
    return codir_model_logits(ctx, model, batch, out);
}

/* Pools each mapped teacher layer (mean over non-padding tokens, or the first token)
   and concatenates them: f_t [B, Ls * Ct]. Layer 0, the embeddings, is not used. */
static codir_tensor *codir__teacher_features(codir_ctx *ctx, const codir_distiller *d, const codir_output *teacher,
                                             const codir_batch *batch)
{
    codir_tensor **ft;
    int k, Ls = d->student_layers;
    if (teacher->num_hidden != d->teacher_layers + 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "contrastive loss: the teacher has %d layers, the distiller expects %d",
                               teacher->num_hidden - 1, d->teacher_layers);
    ft = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)Ls * sizeof *ft);
    if (!ft) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
    for (k = 0; k < Ls; k++) {
        codir_tensor *ht = teacher->hidden[d->layer_map[k]];
        ft[k] = d->cfg.pooling == CODIR_POOL_FIRST ? codir_select_first(ctx, ht) : codir_mean_pool(ctx, ht, &batch->mask);
    }
    return codir_concat(ctx, ft, Ls);
}

/* The contrastive term from the student's layers and the teacher's pooled features
   f_t [B, Ls * Ct], with neg[B, K] as negatives. */
static codir_tensor *codir__crd_from_features(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                              codir_tensor *ft_cat, const codir_batch *batch, const int *neg, int K,
                                              codir_tensor **zt_out)
{
    codir_tensor **fs, *zs, *zt, *dirs[2];
    static const float half[2] = {0.5f, 0.5f};
    int Ls = d->student_layers, k, b, B = batch->batch;
    int *idx;
    d->last_zs = NULL;
    if (student->num_hidden != Ls + 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "contrastive loss: the student has %d layers, the distiller expects %d",
                               student->num_hidden - 1, Ls);
    if (K < 1) return codir__op_error(ctx, CODIR_ERR_INVALID, "contrastive loss: K = %d negatives; need at least 1", K);
    fs = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)Ls * sizeof *fs);
    idx = (int *)codir_arena_alloc(&ctx->arena, (size_t)B * (size_t)(K + 1) * sizeof(int));
    if (!fs || !idx) return codir__op_failed(ctx, CODIR_ERR_NOMEM);

    /* f_s [B, Ls * Cs]: the student's layers pooled the same way as the teacher's. */
    for (k = 0; k < Ls; k++) {
        codir_tensor *hs = student->hidden[k + 1];
        fs[k] = d->cfg.pooling == CODIR_POOL_FIRST ? codir_select_first(ctx, hs) : codir_mean_pool(ctx, hs, &batch->mask);
    }

    /* Project and L2-normalize: z = normalize(W f + b). */
    zs = codir_l2_normalize(ctx, codir_linear(ctx, codir_concat(ctx, fs, Ls), d->proj_s_w, d->proj_s_b));
    zt = codir_l2_normalize(ctx, codir_linear(ctx, ft_cat, d->proj_t_w, d->proj_t_b));
    if (!zs || !zt) return NULL;
    if (zt_out) *zt_out = zt;
    d->last_zs = zs;
    if (d->cfg.mode == CODIR_CRD_INFONCE) return codir_infonce(ctx, zs, zt, d->bank, d->num_examples, neg, K, d->cfg.tau);

    /* NCE scores each example's own bank row first, then its negatives. */
    for (b = 0; b < B; b++) {
        idx[(size_t)b * (K + 1)] = batch->example_ids.data[b];
        memcpy(idx + (size_t)b * (K + 1) + 1, neg + (size_t)b * K, (size_t)K * sizeof(int));
    }

    /* The teacher projection scored against the student bank and the student
       projection against the teacher bank, averaged. The normalizers come from the
       first batch and stay frozen, as in the official code. */
    if (!d->z_ready) {
        d->log_z_t = codir_nce_log_normalizer(zt->data, d->bank_s, idx, B, d->cfg.proj_dim, K, d->cfg.tau,
                                              d->num_examples);
        d->log_z_s = codir_nce_log_normalizer(zs->data, d->bank, idx, B, d->cfg.proj_dim, K, d->cfg.tau,
                                              d->num_examples);
        d->z_ready = 1;
    }
    dirs[0] = codir_nce(ctx, zt, d->bank_s, d->num_examples, idx, K, d->cfg.tau, d->log_z_t, d->num_examples);
    dirs[1] = codir_nce(ctx, zs, d->bank, d->num_examples, idx, K, d->cfg.tau, d->log_z_s, d->num_examples);
    return codir_weighted_sum(ctx, dirs, half, 2);
}

CODIR_DEF codir_tensor *codir_crd_loss_fixed(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                             const codir_output *teacher, const codir_batch *batch, const int *neg,
                                             int K, codir_tensor **zt_out)
{
    codir_tensor *ft = codir__teacher_features(ctx, d, teacher, batch);
    return codir__crd_from_features(ctx, d, student, ft, batch, neg, K, zt_out);
}

/* The contrastive term with K negatives sampled per example; K shrinks to the
   smallest pool in the batch so every row has the same count. */
static codir_tensor *codir__crd_sampled(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                        codir_tensor *ft_cat, const codir_batch *batch, codir_tensor **zt_out)
{
    int b, B = batch->batch, K = d->cfg.num_negatives;
    int *neg;
    if (!ft_cat) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    for (b = 0; b < B; b++) {
        int e = batch->example_ids.data[b], pool;
        if (e < 0 || e >= d->num_examples)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "contrastive loss: example id %d is outside the bank of %d rows",
                                   e, d->num_examples);
        if (d->targets || d->cfg.negatives_from == CODIR_NEG_SAME_GROUP)
            pool = d->num_examples - 1;
        else
            pool = d->num_examples - (d->label_start[d->labels[e] + 1] - d->label_start[d->labels[e]]);
        if (pool < K) K = pool;
    }
    if (K < 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID,
                               "contrastive loss: no negatives, because every training example has the same label");
    neg = (int *)codir_arena_alloc(&ctx->arena, (size_t)B * (size_t)K * sizeof(int));
    if (!neg) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
    for (b = 0; b < B; b++) codir_sample_negatives(d, batch->example_ids.data[b], neg + (size_t)b * K, K);
    return codir__crd_from_features(ctx, d, student, ft_cat, batch, neg, K, zt_out);
}

CODIR_DEF codir_tensor *codir_crd_loss(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                       const codir_output *teacher, const codir_batch *batch,
                                       codir_tensor **zt_out)
{
    return codir__crd_sampled(ctx, d, student, codir__teacher_features(ctx, d, teacher, batch), batch, zt_out);
}

/* row <- normalize(m row + (1 - m) z) for the rows of bank[N, D] listed in ids[B]. */
static void codir__bank_rows_update(float *bank, int D, float m, const float *z, const int *ids, int B)
{
    int b, j;
    for (b = 0; b < B; b++) {
        float *row = bank + (size_t)ids[b] * D;
        double ss = 0.0;
        float nrm;
        for (j = 0; j < D; j++) {
            row[j] = m * row[j] + (1.0f - m) * z[(size_t)b * D + j];
            ss += (double)row[j] * row[j];
        }
        nrm = (float)sqrt(ss);
        if (nrm > CODIR__NORMALIZE_EPS)
            for (j = 0; j < D; j++) row[j] /= nrm;
    }
}

CODIR_DEF void codir_bank_update(codir_distiller *d, const float *z, const int *example_ids, int B)
{
    codir__bank_rows_update(d->bank, d->cfg.proj_dim, d->cfg.momentum, z, example_ids, B);
    if (d->bank_s && d->last_zs)
        codir__bank_rows_update(d->bank_s, d->cfg.proj_dim, d->cfg.momentum, d->last_zs->data, example_ids, B);
}

/* ===================================================================================
   8. Optimizer (implementation)
   =================================================================================== */

CODIR_DEF int codir_adamw_init(codir_adamw *opt, const codir_params *params, float beta1, float beta2,
                               float eps, float weight_decay)
{
    memset(opt, 0, sizeof *opt);
    if (!(beta1 >= 0.0f && beta1 < 1.0f) || !(beta2 >= 0.0f && beta2 < 1.0f))
        return codir__fail(CODIR_ERR_INVALID, "AdamW betas (%g, %g) must be in [0, 1)", (double)beta1, (double)beta2);
    if (!(eps > 0.0f)) return codir__fail(CODIR_ERR_INVALID, "AdamW eps %g must be positive", (double)eps);
    if (!(weight_decay >= 0.0f))
        return codir__fail(CODIR_ERR_INVALID, "AdamW weight decay %g must be zero or positive", (double)weight_decay);
    opt->m = (float *)codir__calloc(params->count, sizeof(float));
    opt->v = (float *)codir__calloc(params->count, sizeof(float));
    if (!opt->m || !opt->v) {
        codir_adamw_free(opt);
        return CODIR_ERR_NOMEM;
    }
    opt->beta1 = beta1;
    opt->beta2 = beta2;
    opt->eps = eps;
    opt->weight_decay = weight_decay;
    opt->count = params->count;
    return CODIR_OK;
}

CODIR_DEF void codir_adamw_free(codir_adamw *opt)
{
    codir__free(opt->m);
    codir__free(opt->v);
    memset(opt, 0, sizeof *opt);
}

/* The constants of one AdamW update of one tensor. */
typedef struct codir__adamw_consts {
    float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps;
} codir__adamw_consts;

/* The update of n values:
       p = p * decay;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g;
       p = p - step_size m / (sqrt(v) / bc2_sqrt + eps)
   Compilers leave this loop scalar, because sqrtf may set errno. The SIMD versions
   below do the same operations in the same order, each correctly rounded, so every
   version gives the same bits when the compiler does not fuse a multiply and an add
   (ISO modes such as -std=c11, or -ffp-contract=off). GNU modes and C++ let GCC fuse
   them, differently in each version, which changes the last bit of some values. */
static void codir__adamw_scalar(float *p, const float *g, float *m, float *v, size_t n, const codir__adamw_consts *c)
{
    size_t k;
    for (k = 0; k < n; k++) {
        p[k] *= c->decay;
        m[k] = c->beta1 * m[k] + c->one_minus_beta1 * g[k];
        v[k] = c->beta2 * v[k] + c->one_minus_beta2 * g[k] * g[k];
        p[k] -= c->step_size * m[k] / (sqrtf(v[k]) / c->bc2_sqrt + c->eps);
    }
}

#if defined(CODIR__SIMD_AVX512)
CODIR__QUIET_UNDEFINED_BEGIN
CODIR__SIMD_TARGET_AVX512 static void codir__adamw_avx512(float *p, const float *g, float *m, float *v, size_t n,
                                                          const codir__adamw_consts *c)
{
    const __m512 decay = _mm512_set1_ps(c->decay), b1 = _mm512_set1_ps(c->beta1), b2 = _mm512_set1_ps(c->beta2);
    const __m512 c1 = _mm512_set1_ps(c->one_minus_beta1), c2 = _mm512_set1_ps(c->one_minus_beta2);
    const __m512 ss = _mm512_set1_ps(c->step_size), bc = _mm512_set1_ps(c->bc2_sqrt), eps = _mm512_set1_ps(c->eps);
    size_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 gk = _mm512_loadu_ps(g + k), pk = _mm512_mul_ps(_mm512_loadu_ps(p + k), decay);
        __m512 mk = _mm512_add_ps(_mm512_mul_ps(b1, _mm512_loadu_ps(m + k)), _mm512_mul_ps(c1, gk));
        __m512 vk = _mm512_add_ps(_mm512_mul_ps(b2, _mm512_loadu_ps(v + k)), _mm512_mul_ps(_mm512_mul_ps(c2, gk), gk));
        __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vk), bc), eps);
        _mm512_storeu_ps(m + k, mk);
        _mm512_storeu_ps(v + k, vk);
        _mm512_storeu_ps(p + k, _mm512_sub_ps(pk, _mm512_div_ps(_mm512_mul_ps(ss, mk), den)));
    }
    codir__adamw_scalar(p + k, g + k, m + k, v + k, n - k, c);
}
CODIR__QUIET_UNDEFINED_END
#endif

#if defined(CODIR__SIMD_AVX2)
CODIR__SIMD_TARGET_AVX2 static void codir__adamw_avx2(float *p, const float *g, float *m, float *v, size_t n,
                                                      const codir__adamw_consts *c)
{
    const __m256 decay = _mm256_set1_ps(c->decay), b1 = _mm256_set1_ps(c->beta1), b2 = _mm256_set1_ps(c->beta2);
    const __m256 c1 = _mm256_set1_ps(c->one_minus_beta1), c2 = _mm256_set1_ps(c->one_minus_beta2);
    const __m256 ss = _mm256_set1_ps(c->step_size), bc = _mm256_set1_ps(c->bc2_sqrt), eps = _mm256_set1_ps(c->eps);
    size_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 gk = _mm256_loadu_ps(g + k), pk = _mm256_mul_ps(_mm256_loadu_ps(p + k), decay);
        __m256 mk = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + k)), _mm256_mul_ps(c1, gk));
        __m256 vk = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + k)), _mm256_mul_ps(_mm256_mul_ps(c2, gk), gk));
        __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vk), bc), eps);
        _mm256_storeu_ps(m + k, mk);
        _mm256_storeu_ps(v + k, vk);
        _mm256_storeu_ps(p + k, _mm256_sub_ps(pk, _mm256_div_ps(_mm256_mul_ps(ss, mk), den)));
    }
    codir__adamw_scalar(p + k, g + k, m + k, v + k, n - k, c);
}
#endif

/* The widest version this build and CPU run. */
static void codir__adamw_update(float *p, const float *g, float *m, float *v, size_t n, const codir__adamw_consts *c)
{
#ifdef CODIR__SIMD_AVX512
    if (codir__has_avx512()) {
        codir__adamw_avx512(p, g, m, v, n, c);
        return;
    }
#endif
#ifdef CODIR__SIMD_AVX2
    if (codir__has_avx2()) {
        codir__adamw_avx2(p, g, m, v, n, c);
        return;
    }
#endif
    codir__adamw_scalar(p, g, m, v, n, c);
}

CODIR_DEF void codir_adamw_step(codir_adamw *opt, codir_params *params, float lr)
{
    int i;
    double bc1, bc2;
    codir__adamw_consts c;
    opt->step++;

    /* torch.optim.AdamW: p -= lr * wd * p; m, v updated; p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps) */
    bc1 = 1.0 - pow((double)opt->beta1, (double)opt->step);
    bc2 = 1.0 - pow((double)opt->beta2, (double)opt->step);
    c.beta1 = opt->beta1;
    c.beta2 = opt->beta2;
    c.one_minus_beta1 = 1.0f - opt->beta1;
    c.one_minus_beta2 = 1.0f - opt->beta2;
    c.step_size = (float)(lr / bc1);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.eps = opt->eps;
    for (i = 0; i < params->num_tensors; i++) {
        codir_tensor *t = &params->tensors[i];
        size_t off = (size_t)(t->data - params->data);
        long block, blocks = (long)((t->numel + CODIR__VEC_BLOCK - 1) / CODIR__VEC_BLOCK);
        float *p = t->data, *g = t->grad, *m = opt->m + off, *v = opt->v + off;
        codir__adamw_consts ct = c;
        codir__drop_pack(t); /* the weights change: a packed copy would be stale */
        ct.decay = t->no_decay ? 1.0f : 1.0f - lr * opt->weight_decay;
        CODIR__OMP_FOR(8 * t->numel)
        for (block = 0; block < blocks; block++) {
            size_t lo = (size_t)block * CODIR__VEC_BLOCK, n = t->numel - lo < CODIR__VEC_BLOCK ? t->numel - lo : CODIR__VEC_BLOCK;
            codir__adamw_update(p + lo, g + lo, m + lo, v + lo, n, &ct);
        }
    }
}

CODIR_DEF float codir_lr_schedule(long step, long total, long warmup, float peak)
{
    /* the schedule of get_linear_schedule_with_warmup in Hugging Face transformers */
    if (step < 0) return 0.0f;
    if (warmup > 0 && step < warmup) return peak * (float)step / (float)warmup;
    if (step >= total) return 0.0f;
    return peak * (float)(total - step) / (float)(total - warmup > 0 ? total - warmup : 1);
}

/* ---- 9. Data and tokenizer ---- */

/* BERT turns a word of more than 100 characters (code points, not bytes) into [UNK]
   without matching it, which also bounds every word buffer below. */
#define CODIR__MAX_WORD_CHARS 100
/* Bytes for the longest stored word in UTF-8 (4 bytes per character) plus a NUL. */
#define CODIR__WORD_BYTES (4 * CODIR__MAX_WORD_CHARS + 1)
#define CODIR__FNV_OFFSET 14695981039346656037ull
#define CODIR__FNV_PRIME 1099511628211ull

/* ---- UTF-8 and character classes ---- */

/* Decodes the UTF-8 character at s (NUL-terminated) and stores its byte length in
   *length. An invalid byte (stray continuation byte, overlong form, surrogate, value
   above U+10FFFF, truncated sequence) returns U+FFFD with *length = 1, so decoding
   resumes at the next byte. */
static uint32_t codir__utf8_decode(const unsigned char *s, int *length)
{
    uint32_t cp;
    int n, i;

    if (s[0] < 0x80) {
        *length = 1;
        return s[0];
    }
    if (s[0] >= 0xC2 && s[0] <= 0xDF) {
        n = 2;
        cp = s[0] & 0x1Fu;
    } else if (s[0] >= 0xE0 && s[0] <= 0xEF) {
        n = 3;
        cp = s[0] & 0x0Fu;
    } else if (s[0] >= 0xF0 && s[0] <= 0xF4) {
        n = 4;
        cp = s[0] & 0x07u;
    } else {
        *length = 1;
        return 0xFFFD;
    }
    for (i = 1; i < n; i++) {
        /* The terminating NUL is not a continuation byte, so this never reads past it. */
        if ((s[i] & 0xC0) != 0x80) {
            *length = 1;
            return 0xFFFD;
        }
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
        *length = 1;
        return 0xFFFD;
    }
    *length = n;
    return cp;
}

/* Writes cp (a valid code point) as UTF-8 to out and returns the byte count. */
static int codir__utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Classes of characters for BERT's normalizer and pre-tokenizer. Every code point not
   listed in codir__class_runs is CODIR__CHAR_OTHER. */
enum {
    CODIR__CHAR_OTHER = 0,
    CODIR__CHAR_REMOVED,   /* dropped: Cc, Cf, Co, NUL and U+FFFD (but not tab, LF, CR) */
    CODIR__CHAR_SPACE,     /* splits words: Zs, U+2028, U+2029, tab, LF, CR */
    CODIR__CHAR_PUNCT,     /* a word by itself: P* and ASCII punctuation */
    CODIR__CHAR_MARK       /* Mn, dropped when stripping accents */
};

/* The tables and their lookups are at the end of this section. */
static int codir__char_class(uint32_t cp);
static int codir__uncased_form(uint32_t cp, uint32_t *out);

/* The CJK ideograph blocks of tokenizers' is_chinese_char (normalizers/bert.rs), which
   starts the fifth block at U+2B920 where BERT's Python original has U+2B820. Kana and
   Hangul are not among them, so BERT keeps those inside words. */
static int codir__is_cjk(uint32_t cp)
{
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
           (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) ||
           (cp >= 0x2B920 && cp <= 0x2CEAF) || (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

/* ---- basic tokenization: text to words ---- */

/* What codir__next_char found. */
enum {
    CODIR__NEXT_END = 0,   /* end of the text */
    CODIR__NEXT_BREAK,     /* whitespace: the current word ends */
    CODIR__NEXT_CHAR,      /* a character that continues the current word */
    CODIR__NEXT_ALONE      /* a character that is a word by itself (punctuation, CJK) */
};

/* Reads a text as normalized characters and words, the way Hugging Face's
   BertNormalizer and BertPreTokenizer do. The normalizer's steps are all per
   character, so each input character is cleaned and normalized on its own into up to
   3 output characters. */
typedef struct codir__word_reader {
    const unsigned char *next;        /* first byte not read yet */
    int lowercase;                    /* 1: strip accents and lowercase */
    uint32_t pending[3];              /* the normalized form of the last input character */
    int pending_count, pending_next;  /* pending[pending_next..pending_count) are unread */
    int pending_alone;                /* 1: each pending character is a word by itself */
    uint32_t held;                    /* a word-by-itself character read ahead */
    int has_held;                     /* 1 if held is the start of the next word */
    char word[CODIR__WORD_BYTES];     /* the current word, NUL-terminated, at most
                                         CODIR__MAX_WORD_CHARS characters of it */
    size_t length;                    /* bytes in word */
    int chars;                        /* characters in the word, saturating at
                                         CODIR__MAX_WORD_CHARS + 1 */
} codir__word_reader;

static void codir__word_reader_init(codir__word_reader *reader, const char *text, int lowercase)
{
    memset(reader, 0, sizeof *reader);
    reader->next = (const unsigned char *)text;
    reader->lowercase = lowercase ? 1 : 0;
}

/* Stores the next normalized character in *c and returns what it is (a CODIR__NEXT_*
   value). */
static int codir__next_char(codir__word_reader *reader, uint32_t *c)
{
    while (reader->pending_next == reader->pending_count) {
        int length, char_class;
        uint32_t cp;

        if (*reader->next == '\0') return CODIR__NEXT_END;
        cp = codir__utf8_decode(reader->next, &length);
        reader->next += length;

        /* Clean: invalid bytes decode to U+FFFD, which is REMOVED like the controls. */
        char_class = codir__char_class(cp);
        if (char_class == CODIR__CHAR_REMOVED) continue;
        if (char_class == CODIR__CHAR_SPACE) return CODIR__NEXT_BREAK;

        /* Hugging Face puts spaces around a CJK ideograph before stripping accents, so
           its normalized form (one ideograph) is a word by itself. */
        reader->pending_alone = codir__is_cjk(cp);
        reader->pending_next = 0;
        if (reader->lowercase) {
            reader->pending_count = codir__uncased_form(cp, reader->pending);
        } else {
            reader->pending[0] = cp;
            reader->pending_count = 1;
        }
    }

    /* Pre-tokenize: punctuation is judged after normalization, as Hugging Face's
       pre-tokenizer sees the normalized text ("\xE1\xBF\xAF", U+1FEF, becomes "`"). */
    *c = reader->pending[reader->pending_next++];
    if (reader->pending_alone || codir__char_class(*c) == CODIR__CHAR_PUNCT) return CODIR__NEXT_ALONE;
    return CODIR__NEXT_CHAR;
}

/* Appends c to the word, keeping the first CODIR__MAX_WORD_CHARS characters and
   counting one more so that a longer word can be recognized. */
static void codir__word_append(codir__word_reader *reader, uint32_t c)
{
    if (reader->chars < CODIR__MAX_WORD_CHARS) reader->length += (size_t)codir__utf8_encode(c, reader->word + reader->length);
    if (reader->chars <= CODIR__MAX_WORD_CHARS) reader->chars++;
}

/* Stores the next word in reader->word and returns 1, or returns 0 at the end of the
   text. Punctuation and CJK ideographs come back as one-character words. */
static int codir__next_word(codir__word_reader *reader)
{
    uint32_t c;
    int kind;

    reader->length = 0;
    reader->chars = 0;
    if (reader->has_held) {
        reader->has_held = 0;
        codir__word_append(reader, reader->held);
    } else {
        while ((kind = codir__next_char(reader, &c)) != CODIR__NEXT_END) {
            if (kind == CODIR__NEXT_BREAK) {
                if (reader->chars > 0) break;
                continue;
            }
            if (kind == CODIR__NEXT_ALONE) {
                /* End the current word here; the character becomes the next word. */
                if (reader->chars > 0) {
                    reader->held = c;
                    reader->has_held = 1;
                } else {
                    codir__word_append(reader, c);
                }
                break;
            }
            codir__word_append(reader, c);
        }
    }
    reader->word[reader->length] = '\0';
    return reader->chars > 0;
}

CODIR_DEF int codir_pretokenize(const char *text, int lowercase, char *out, int out_size)
{
    codir__word_reader reader;
    uint32_t c;
    int kind, in_word = 0, any = 0;
    size_t length = 0;

    if (!text) return codir__fail(CODIR_ERR_INVALID, "codir_pretokenize: text is NULL");
    if (out_size < 0 || (out_size > 0 && !out))
        return codir__fail(CODIR_ERR_INVALID, "codir_pretokenize: out_size is %d with out %s; pass out_size >= 0 "
                           "and a buffer of that many bytes", out_size, out ? "set" : "NULL");

    codir__word_reader_init(&reader, text, lowercase);
    while ((kind = codir__next_char(&reader, &c)) != CODIR__NEXT_END) {
        char bytes[4];
        int n, i;
        if (kind == CODIR__NEXT_BREAK) {
            in_word = 0;
            continue;
        }
        /* A space before each word but the first. */
        n = 0;
        if (any && (!in_word || kind == CODIR__NEXT_ALONE)) bytes[n++] = ' ';
        for (i = 0; i < n; i++, length++)
            if (length + 1 < (size_t)out_size) out[length] = bytes[i];
        n = codir__utf8_encode(c, bytes);
        for (i = 0; i < n; i++, length++)
            if (length + 1 < (size_t)out_size) out[length] = bytes[i];
        if (length > (size_t)INT_MAX - 8)
            return codir__fail(CODIR_ERR_OVERFLOW, "codir_pretokenize: the output exceeds INT_MAX bytes; split the text");
        any = 1;
        in_word = kind == CODIR__NEXT_CHAR;
    }
    if (out_size > 0) out[length < (size_t)out_size ? length : (size_t)out_size - 1] = '\0';
    return (int)length;
}

/* ---- hash tables ---- */

static uint64_t codir__fnv1a(uint64_t hash, const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        hash ^= (unsigned char)s[i];
        hash *= CODIR__FNV_PRIME;
    }
    return hash;
}

/* Looks up the n bytes at s (prefixed by "##" when `continuation` is 1) in an
   open-addressing table of ids into keys[]. Returns the id or -1. The slice s must not
   contain a NUL byte. */
static int codir__table_find(char *const *keys, const int *table, size_t table_size, const char *s,
                             size_t n, int continuation)
{
    uint64_t hash = CODIR__FNV_OFFSET;
    size_t mask, i;

    if (!table) return -1;
    if (continuation) hash = codir__fnv1a(hash, "##", 2);
    hash = codir__fnv1a(hash, s, n);
    mask = table_size - 1;
    for (i = (size_t)hash & mask; table[i] >= 0; i = (i + 1) & mask) {
        const char *key = keys[table[i]];
        if (continuation) {
            if (key[0] != '#' || key[1] != '#') continue;
            key += 2;
        }
        if (strncmp(key, s, n) == 0 && key[n] == '\0') return table[i];
    }
    return -1;
}

/* Points the table slot of keys[id] at id, replacing an earlier id with the same key,
   so that the later of two equal keys wins. The table must have a free slot. */
static void codir__table_put(char *const *keys, int *table, size_t table_size, int id)
{
    const char *key = keys[id];
    size_t mask = table_size - 1, i;
    uint64_t hash = codir__fnv1a(CODIR__FNV_OFFSET, key, strlen(key));

    for (i = (size_t)hash & mask; table[i] >= 0; i = (i + 1) & mask)
        if (strcmp(keys[table[i]], key) == 0) break;
    table[i] = id;
}

/* A growable list of strings with a hash index. It is the vocabulary while one is
   built or loaded, and the list of distinct words in the vocabulary builder. */
typedef struct codir__strmap {
    char **keys;        /* [count] NUL-terminated strings */
    int count, capacity;
    int *table;         /* [table_size] ids into keys, -1 for an empty slot */
    size_t table_size;  /* power of two, at least 2 * capacity */
} codir__strmap;

static void codir__strmap_free(codir__strmap *map)
{
    int i;
    for (i = 0; i < map->count; i++) codir__free(map->keys[i]);
    codir__free(map->keys);
    codir__free(map->table);
    memset(map, 0, sizeof *map);
}

/* Grows the key array to hold `capacity` keys and rebuilds the table at twice that. */
static int codir__strmap_reserve(codir__strmap *map, int capacity)
{
    char **keys;
    int *table;
    size_t table_size = 16, key_bytes, i;
    int id;

    if (capacity <= map->capacity) return 0;
    while (table_size / 2 < (size_t)capacity) {
        if (table_size > SIZE_MAX / 4 / sizeof(int))
            return codir__fail(CODIR_ERR_OVERFLOW, "a hash table for %d strings overflows size_t", capacity);
        table_size *= 2;
    }
    if (!codir__size_mul((size_t)capacity, sizeof *keys, &key_bytes))
        return codir__fail(CODIR_ERR_OVERFLOW, "an array of %d strings overflows size_t", capacity);

    /* The table comes first, so a failure leaves the map consistent. */
    table = (int *)codir__calloc(table_size, sizeof *table);
    if (!table) return CODIR_ERR_NOMEM;
    keys = (char **)codir__realloc(map->keys, key_bytes);
    if (!keys) {
        codir__free(table);
        return CODIR_ERR_NOMEM;
    }
    map->keys = keys;
    map->capacity = capacity;
    for (i = 0; i < table_size; i++) table[i] = -1;
    for (id = 0; id < map->count; id++) codir__table_put(map->keys, table, table_size, id);
    codir__free(map->table);
    map->table = table;
    map->table_size = table_size;
    return 0;
}

static int codir__strmap_find(const codir__strmap *map, const char *s, size_t n)
{
    return codir__table_find(map->keys, map->table, map->table_size, s, n, 0);
}

/* Appends a copy of the n bytes at s as a new key, even if an equal key exists.
   Returns the new id or a negative error. */
static int codir__strmap_append(codir__strmap *map, const char *s, size_t n)
{
    char *key;
    if (map->count == map->capacity) {
        int capacity = map->capacity < 64 ? 64 : map->capacity;
        int rc;
        if (map->count == INT_MAX)
            return codir__fail(CODIR_ERR_OVERFLOW, "more than INT_MAX strings in one table");
        capacity = capacity > INT_MAX / 2 ? INT_MAX : capacity * 2;
        rc = codir__strmap_reserve(map, capacity);
        if (rc < 0) return rc;
    }
    key = codir__strndup(s, n);
    if (!key) return CODIR_ERR_NOMEM;
    map->keys[map->count] = key;
    codir__table_put(map->keys, map->table, map->table_size, map->count);
    return map->count++;
}

/* Skips a UTF-8 byte order mark, which some editors write at the start of text files. */
static const char *codir__skip_bom(const char *data, const char *end)
{
    if (end - data >= 3 && (unsigned char)data[0] == 0xEF && (unsigned char)data[1] == 0xBB &&
        (unsigned char)data[2] == 0xBF)
        return data + 3;
    return data;
}

/* ---- vocabulary ---- */

/* Turns a filled string map into a vocabulary, taking ownership of its memory (the map
   is left empty) and looking up the special tokens. `source` names the file or the
   builder in the message about a missing special token. */
static codir_vocab *codir__vocab_from_map(codir__strmap *map, int lowercase, const char *source)
{
    static const char *const names[5] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    int ids[5], i;
    codir_vocab *vocab = (codir_vocab *)codir__calloc(1, sizeof *vocab);

    if (!vocab) {
        codir__strmap_free(map);
        return NULL;
    }
    vocab->size = map->count;
    vocab->tokens = map->keys;
    vocab->table = map->table;
    vocab->table_size = map->table_size;
    vocab->lowercase = lowercase ? 1 : 0;
    memset(map, 0, sizeof *map);

    for (i = 0; i < 5; i++) {
        ids[i] = codir_vocab_id(vocab, names[i]);
        if (ids[i] < 0) {
            codir__fail(CODIR_ERR_PARSE,
                        "%s: missing special token %s; a BERT vocabulary must contain [PAD], [UNK], "
                        "[CLS], [SEP] and [MASK], one per line",
                        source, names[i]);
            codir_vocab_free(vocab);
            return NULL;
        }
    }
    vocab->pad_id = ids[0];
    vocab->unk_id = ids[1];
    vocab->cls_id = ids[2];
    vocab->sep_id = ids[3];
    vocab->mask_id = ids[4];
    return vocab;
}

CODIR_DEF codir_vocab *codir_vocab_load(const char *path, int lowercase)
{
    codir__strmap map;
    size_t length;
    const char *p, *end;
    char *data;
    int line = 1;

    if (!path) {
        codir__fail(CODIR_ERR_INVALID, "codir_vocab_load: path is NULL");
        return NULL;
    }
    if (codir__read_file(path, "vocabulary file", 0, &data, &length)) return NULL;

    memset(&map, 0, sizeof map);
    end = data + length;
    p = codir__skip_bom(data, end);
    while (p < end) {
        const char *newline = (const char *)memchr(p, '\n', (size_t)(end - p));
        size_t n = newline ? (size_t)(newline - p) : (size_t)(end - p);
        if (n > 0 && p[n - 1] == '\r') n--;
        if (memchr(p, '\0', n)) {
            codir__fail(CODIR_ERR_PARSE, "%s:%d: the token contains a NUL byte; a vocab.txt is plain UTF-8 text",
                        path, line);
            goto fail;
        }
        if (codir__strmap_append(&map, p, n) < 0) goto fail;
        p = newline ? newline + 1 : end;
        line++;
    }
    codir__free(data);
    return codir__vocab_from_map(&map, lowercase, path);

fail:
    codir__free(data);
    codir__strmap_free(&map);
    return NULL;
}

CODIR_DEF int codir_vocab_save(const codir_vocab *vocab, const char *path)
{
    char *tmp_path;
    FILE *file;
    int i, rc, write_failed = 0;

    if (!vocab || !path) return codir__fail(CODIR_ERR_INVALID, "codir_vocab_save: vocab or path is NULL");
    for (i = 0; i < vocab->size; i++) {
        if (strpbrk(vocab->tokens[i], "\r\n"))
            return codir__fail(CODIR_ERR_INVALID,
                               "codir_vocab_save: token %d contains a line break, which vocab.txt cannot store",
                               i);
    }

    rc = codir__io_create_tmp(path, &file, &tmp_path);
    if (rc) return rc;
    for (i = 0; i < vocab->size && !write_failed; i++) {
        if (fputs(vocab->tokens[i], file) == EOF || fputc('\n', file) == EOF) write_failed = 1;
    }
    return codir__io_commit(file, tmp_path, path, write_failed);
}

CODIR_DEF void codir_vocab_free(codir_vocab *vocab)
{
    int i;
    if (!vocab) return;
    if (vocab->tokens) {
        for (i = 0; i < vocab->size; i++) codir__free(vocab->tokens[i]);
    }
    codir__free(vocab->tokens);
    codir__free(vocab->table);
    codir__free(vocab);
}

CODIR_DEF int codir_vocab_id(const codir_vocab *vocab, const char *token)
{
    if (!vocab || !token) return -1;
    return codir__table_find(vocab->tokens, vocab->table, vocab->table_size, token, strlen(token), 0);
}

CODIR_DEF const char *codir_vocab_token(const codir_vocab *vocab, int id)
{
    if (!vocab || id < 0 || id >= vocab->size) return NULL;
    return vocab->tokens[id];
}

/* ---- WordPiece ---- */

/* Cuts one word into the longest vocabulary pieces from the left, as BERT's
   WordpieceTokenizer does, and stores their ids in pieces[] (room for
   CODIR__MAX_WORD_CHARS). Returns the piece count, or 0 when the word becomes a single
   [UNK]: when it is too long or some remainder matches no piece. */
static int codir__wordpiece(const codir_vocab *vocab, const char *word, size_t length, int chars, int *pieces)
{
    size_t start = 0;
    int count = 0;

    if (chars > CODIR__MAX_WORD_CHARS) return 0;
    while (start < length) {
        size_t end = length;
        int id = -1;
        while (end > start) {
            id = codir__table_find(vocab->tokens, vocab->table, vocab->table_size, word + start, end - start,
                                   start > 0);
            if (id >= 0) break;
            /* Step back one character: the word is valid UTF-8 because the reader
               dropped invalid bytes. */
            do {
                end--;
            } while (end > start && ((unsigned char)word[end] & 0xC0) == 0x80);
        }
        if (id < 0) return 0;
        CODIR_ASSERT(count < CODIR__MAX_WORD_CHARS);
        pieces[count++] = id;
        start = end;
    }
    return count;
}

/* codir_tokenize that stops after the word that brings the piece count to
   stop_pieces or more; a negative stop_pieces reads the whole text. */
static int codir__tokenize_until(const codir_vocab *vocab, const char *text, int *ids, int max_ids, int stop_pieces)
{
    codir__word_reader reader;
    int pieces[CODIR__MAX_WORD_CHARS];
    int total = 0;

    if (!vocab || !vocab->table || !text)
        return codir__fail(CODIR_ERR_INVALID, "codir_tokenize: vocab or text is NULL");
    if (max_ids < 0 || (max_ids > 0 && !ids))
        return codir__fail(CODIR_ERR_INVALID, "codir_tokenize: max_ids is %d with ids %s; pass max_ids >= 0 "
                           "and an array of that many ints", max_ids, ids ? "set" : "NULL");

    codir__word_reader_init(&reader, text, vocab->lowercase);
    while ((stop_pieces < 0 || total < stop_pieces) && codir__next_word(&reader)) {
        int count = codir__wordpiece(vocab, reader.word, reader.length, reader.chars, pieces);
        int i;
        if (count == 0) {
            pieces[0] = vocab->unk_id;
            count = 1;
        }
        if (count > INT_MAX - total)
            return codir__fail(CODIR_ERR_OVERFLOW, "codir_tokenize: the text has more than INT_MAX pieces; "
                               "split it before tokenizing");
        for (i = 0; i < count; i++) {
            if (total + i < max_ids) ids[total + i] = pieces[i];
        }
        total += count;
    }
    return total;
}

CODIR_DEF int codir_tokenize(const codir_vocab *vocab, const char *text, int *ids, int max_ids)
{
    return codir__tokenize_until(vocab, text, ids, max_ids, -1);
}

CODIR_DEF int codir_encode(const codir_vocab *vocab, const char *text, int *ids, int max_len)
{
    return codir_encode_pair(vocab, text, NULL, ids, NULL, max_len);
}

/* Splits m = max_len - 3 piece slots between two sides of count_a and count_b pieces
   the way Hugging Face tokenizers' truncate_encodings does for "longest_first": when
   both must be cut, the shorter side gets m / 2 and the longer m - m / 2, the first
   side counting as the shorter on a tie. */
static void codir__split_longest_first(int count_a, int count_b, int m, int *keep_a, int *keep_b)
{
    int shorter, longer_keep;

    if (count_a + count_b <= m) {
        *keep_a = count_a;
        *keep_b = count_b;
        return;
    }
    shorter = count_a < count_b ? count_a : count_b;
    if (shorter <= m - shorter) {
        /* The shorter side fits whole, and the longer one gets the rest. */
        longer_keep = m - shorter;
    } else {
        /* Both are cut. */
        shorter = m / 2;
        longer_keep = m - m / 2;
    }
    if (count_a <= count_b) {
        *keep_a = shorter;
        *keep_b = longer_keep;
    } else {
        *keep_a = longer_keep;
        *keep_b = shorter;
    }
}

CODIR_DEF int codir_encode_pair(const codir_vocab *vocab, const char *a, const char *b, int *ids, int *types,
                                int max_len)
{
    int specials = b ? 3 : 2, m, count_a, count_b = 0, keep_a, keep_b, length, i;

    if (!vocab || !vocab->table || !a)
        return codir__fail(CODIR_ERR_INVALID, "codir_encode_pair: vocab or text is NULL");
    if (!ids) return codir__fail(CODIR_ERR_INVALID, "codir_encode_pair: ids is NULL");
    if (max_len < specials)
        return codir__fail(CODIR_ERR_INVALID,
                           "codir_encode_pair: max_len is %d but [CLS]%s need at least %d; raise max_len", max_len,
                           b ? ", [SEP] and [SEP]" : " and [SEP]", specials);
    m = max_len - specials;

    /* With truncation on, tokenizers 0.23.2 stops reading a side after the word that
       brings its piece count to max_len or more, and compares those counts. That
       decides which side is longer when both are long. (Inferred from the npm
       package's outputs for sides of 0 to 12 words of one or many pieces with m up to
       9, and checked by the pair fixture.) The first side is written with room for all
       m slots. Truncation only shortens it, so the second side goes right after the
       part that is kept. */
    count_a = codir__tokenize_until(vocab, a, ids + 1, m, b ? max_len : -1);
    if (count_a < 0) return count_a;
    if (b) {
        count_b = codir__tokenize_until(vocab, b, NULL, 0, max_len);
        if (count_b < 0) return count_b;
        codir__split_longest_first(count_a, count_b, m, &keep_a, &keep_b);
    } else {
        keep_a = count_a < m ? count_a : m;
        keep_b = 0;
    }

    ids[0] = vocab->cls_id;
    ids[keep_a + 1] = vocab->sep_id;
    length = keep_a + 2;
    if (b) {
        int rc = codir__tokenize_until(vocab, b, ids + length, keep_b, max_len);
        if (rc < 0) return rc;
        length += keep_b;
        ids[length++] = vocab->sep_id;
    }
    if (types) {
        for (i = 0; i < length; i++) types[i] = i < keep_a + 2 ? 0 : 1;
    }
    return length;
}

/* ---- vocabulary builder: BPE over word counts ---- */

/* A map from 64-bit keys to non-negative ints with open addressing; the builder's
   index of characters and of symbol pairs. */
typedef struct codir__u64map {
    uint64_t *keys;
    int *values;        /* -1 marks an empty slot */
    size_t size;        /* power of two */
    size_t count;
} codir__u64map;

static size_t codir__u64map_slot(const codir__u64map *map, uint64_t key)
{
    uint64_t state = key;
    size_t mask = map->size - 1, i;
    for (i = (size_t)codir__splitmix64(&state) & mask; map->values[i] >= 0; i = (i + 1) & mask)
        if (map->keys[i] == key) break;
    return i;
}

static int codir__u64map_find(const codir__u64map *map, uint64_t key)
{
    if (map->size == 0) return -1;
    return map->values[codir__u64map_slot(map, key)];
}

/* Inserts a key that is not in the map yet, growing the map below half full. */
static int codir__u64map_insert(codir__u64map *map, uint64_t key, int value)
{
    if ((map->count + 1) * 2 > map->size) {
        codir__u64map bigger;
        size_t i;
        bigger.size = map->size ? map->size * 2 : 1024;
        bigger.count = map->count;
        if (bigger.size > SIZE_MAX / 2 / sizeof(uint64_t))
            return codir__fail(CODIR_ERR_OVERFLOW, "the vocabulary builder's pair table overflows size_t");
        bigger.keys = (uint64_t *)codir__calloc(bigger.size, sizeof *bigger.keys);
        bigger.values = (int *)codir__calloc(bigger.size, sizeof *bigger.values);
        if (!bigger.keys || !bigger.values) {
            codir__free(bigger.keys);
            codir__free(bigger.values);
            return CODIR_ERR_NOMEM;
        }
        for (i = 0; i < bigger.size; i++) bigger.values[i] = -1;
        for (i = 0; i < map->size; i++) {
            if (map->values[i] >= 0) {
                size_t slot = codir__u64map_slot(&bigger, map->keys[i]);
                bigger.keys[slot] = map->keys[i];
                bigger.values[slot] = map->values[i];
            }
        }
        codir__free(map->keys);
        codir__free(map->values);
        *map = bigger;
    }
    {
        size_t slot = codir__u64map_slot(map, key);
        CODIR_ASSERT(map->values[slot] < 0);
        map->keys[slot] = key;
        map->values[slot] = value;
        map->count++;
    }
    return 0;
}

static void codir__u64map_free(codir__u64map *map)
{
    codir__free(map->keys);
    codir__free(map->values);
    memset(map, 0, sizeof *map);
}

/* Returns `array` (of *capacity elements of `size` bytes) grown to hold at least
   `needed` elements, or NULL with an error recorded and `array` left untouched. */
static void *codir__grow(void *array, size_t *capacity, size_t needed, size_t size)
{
    size_t grown, bytes;
    void *bigger;
    if (needed <= *capacity) return array;
    grown = *capacity < 16 ? 16 : *capacity;
    while (grown < needed) {
        if (!codir__size_mul(grown, 2, &grown)) {
            codir__fail(CODIR_ERR_OVERFLOW, "growing an array to %zu elements overflows size_t", needed);
            return NULL;
        }
    }
    if (!codir__size_mul(grown, size, &bytes)) {
        codir__fail(CODIR_ERR_OVERFLOW, "an array of %zu x %zu bytes overflows size_t", grown, size);
        return NULL;
    }
    bigger = codir__realloc(array, bytes);
    if (bigger) *capacity = grown;
    return bigger;
}

/* An adjacent pair of symbols (token ids) and where it occurs. */
typedef struct codir__bpe_pair {
    int left, right;       /* token ids; right is always a "##" piece */
    long long count;       /* occurrences, weighted by word frequency */
    long long count_before;/* count when the current merge first touched the pair */
    int stamp;             /* the merge that last touched the pair */
    int *words;            /* [word_count] words that contained the pair when it was
                              counted; some may no longer contain it */
    size_t word_count, word_capacity;
} codir__bpe_pair;

typedef struct codir__bpe_entry {
    long long count;
    int pair;
} codir__bpe_entry;

/* The builder's state. Each distinct word is a run of symbols in `symbols`, shortened
   in place by every merge. */
typedef struct codir__bpe {
    codir__strmap tokens;       /* the vocabulary so far */
    int word_count;
    long long *word_freq;       /* [word_count] occurrences in the texts */
    size_t *word_start;         /* [word_count] offset of the word's symbols */
    int *word_length;           /* [word_count] symbols left in the word */
    int *word_stamp;            /* [word_count] the merge that last rewrote the word */
    int *symbols;
    codir__bpe_pair *pairs;
    size_t pair_count, pair_capacity;
    codir__u64map pair_index;   /* (left << 32 | right) -> index into pairs */
    codir__bpe_entry *heap;     /* max-heap with stale entries, checked when popped */
    size_t heap_count, heap_capacity;
    int *touched;               /* pairs touched by the current merge */
    size_t touched_count, touched_capacity;
    long long min_frequency;
} codir__bpe;

static void codir__bpe_free(codir__bpe *b)
{
    size_t i;
    codir__strmap_free(&b->tokens);
    codir__free(b->word_freq);
    codir__free(b->word_start);
    codir__free(b->word_length);
    codir__free(b->word_stamp);
    codir__free(b->symbols);
    for (i = 0; i < b->pair_count; i++) codir__free(b->pairs[i].words);
    codir__free(b->pairs);
    codir__u64map_free(&b->pair_index);
    codir__free(b->heap);
    codir__free(b->touched);
}

/* Orders heap entries: higher count first, then smaller left id, then smaller right
   id, which makes the merge order deterministic. */
static int codir__bpe_before(const codir__bpe *b, codir__bpe_entry x, codir__bpe_entry y)
{
    const codir__bpe_pair *px = &b->pairs[x.pair], *py = &b->pairs[y.pair];
    if (x.count != y.count) return x.count > y.count;
    if (px->left != py->left) return px->left < py->left;
    return px->right < py->right;
}

static int codir__bpe_push(codir__bpe *b, long long count, int pair)
{
    size_t i;
    codir__bpe_entry *heap = (codir__bpe_entry *)codir__grow(b->heap, &b->heap_capacity, b->heap_count + 1,
                                                             sizeof *b->heap);
    if (!heap) return CODIR_ERR_NOMEM;
    b->heap = heap;
    i = b->heap_count++;
    b->heap[i].count = count;
    b->heap[i].pair = pair;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        codir__bpe_entry tmp;
        if (!codir__bpe_before(b, b->heap[i], b->heap[parent])) break;
        tmp = b->heap[i];
        b->heap[i] = b->heap[parent];
        b->heap[parent] = tmp;
        i = parent;
    }
    return 0;
}

static codir__bpe_entry codir__bpe_pop(codir__bpe *b)
{
    codir__bpe_entry top = b->heap[0];
    size_t i = 0;
    b->heap[0] = b->heap[--b->heap_count];
    for (;;) {
        size_t best = i, child = 2 * i + 1;
        codir__bpe_entry tmp;
        if (child < b->heap_count && codir__bpe_before(b, b->heap[child], b->heap[best])) best = child;
        if (child + 1 < b->heap_count && codir__bpe_before(b, b->heap[child + 1], b->heap[best])) best = child + 1;
        if (best == i) break;
        tmp = b->heap[i];
        b->heap[i] = b->heap[best];
        b->heap[best] = tmp;
        i = best;
    }
    return top;
}

/* Adds delta to the count of pair (left, right), creating the pair if needed, and
   records `word` as a place where it occurs when delta is positive. */
static int codir__bpe_add_pair(codir__bpe *b, int left, int right, long long delta, int word, int merge)
{
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    int index = codir__u64map_find(&b->pair_index, key);
    codir__bpe_pair *pair;
    int rc;

    if (index < 0) {
        CODIR_ASSERT(delta > 0);
        if (b->pair_count >= (size_t)INT_MAX)
            return codir__fail(CODIR_ERR_OVERFLOW, "the vocabulary builder found more than INT_MAX symbol pairs");
        pair = (codir__bpe_pair *)codir__grow(b->pairs, &b->pair_capacity, b->pair_count + 1, sizeof *b->pairs);
        if (!pair) return CODIR_ERR_NOMEM;
        b->pairs = pair;
        index = (int)b->pair_count;
        rc = codir__u64map_insert(&b->pair_index, key, index);
        if (rc < 0) return rc;
        b->pair_count++;
        pair = &b->pairs[index];
        memset(pair, 0, sizeof *pair);
        pair->left = left;
        pair->right = right;
        pair->stamp = -1;
    }
    pair = &b->pairs[index];
    if (pair->stamp != merge) {
        int *touched = (int *)codir__grow(b->touched, &b->touched_capacity, b->touched_count + 1,
                                          sizeof *b->touched);
        if (!touched) return CODIR_ERR_NOMEM;
        b->touched = touched;
        b->touched[b->touched_count++] = index;
        pair->stamp = merge;
        pair->count_before = pair->count;
    }
    pair->count += delta;
    CODIR_ASSERT(pair->count >= 0);
    if (delta > 0 && (pair->word_count == 0 || pair->words[pair->word_count - 1] != word)) {
        int *words = (int *)codir__grow(pair->words, &pair->word_capacity, pair->word_count + 1,
                                        sizeof *pair->words);
        if (!words) return CODIR_ERR_NOMEM;
        pair->words = words;
        pair->words[pair->word_count++] = word;
    }
    return 0;
}

/* Pushes the pairs whose count rose during the current merge. A pair whose count only
   fell keeps its older, higher heap entry, which codir__bpe_learn corrects when it pops. */
static int codir__bpe_push_touched(codir__bpe *b)
{
    size_t i;
    for (i = 0; i < b->touched_count; i++) {
        const codir__bpe_pair *pair = &b->pairs[b->touched[i]];
        if (pair->count > pair->count_before && pair->count >= b->min_frequency) {
            int rc = codir__bpe_push(b, pair->count, b->touched[i]);
            if (rc < 0) return rc;
        }
    }
    b->touched_count = 0;
    return 0;
}

/* Replaces every (left, right) in word w by `merged`, updating the counts of the
   neighbouring pairs. Output index j never passes input index i, so the rewrite can
   work in place. */
static int codir__bpe_merge_word(codir__bpe *b, int w, int left, int right, int merged, int merge)
{
    int *s = b->symbols + b->word_start[w];
    int n = b->word_length[w], i = 0, j = 0, rc = 0;
    long long freq = b->word_freq[w];

    while (i < n) {
        if (i + 1 < n && s[i] == left && s[i + 1] == right) {
            if (j > 0) {
                rc = codir__bpe_add_pair(b, s[j - 1], left, -freq, w, merge);
                if (rc == 0) rc = codir__bpe_add_pair(b, s[j - 1], merged, freq, w, merge);
            }
            if (rc == 0 && i + 2 < n) {
                rc = codir__bpe_add_pair(b, right, s[i + 2], -freq, w, merge);
                if (rc == 0) rc = codir__bpe_add_pair(b, merged, s[i + 2], freq, w, merge);
            }
            if (rc == 0) rc = codir__bpe_add_pair(b, left, right, -freq, w, merge);
            if (rc < 0) return rc;
            s[j++] = merged;
            i += 2;
        } else {
            s[j++] = s[i++];
        }
    }
    b->word_length[w] = j;
    return 0;
}

/* Merges the most frequent pair until the vocabulary has target_size tokens or no
   pair occurs min_frequency times. */
static int codir__bpe_learn(codir__bpe *b, int target_size)
{
    int merge = 0;
    while (b->tokens.count < target_size && b->heap_count > 0) {
        codir__bpe_entry top = codir__bpe_pop(b);
        codir__bpe_pair *pair = &b->pairs[top.pair];
        const char *left_token, *right_token;
        char merged_token[2 * CODIR__WORD_BYTES];
        size_t left_length, right_length, k;
        int merged, left, right, rc, *words;
        size_t word_count;

        if (pair->count != top.count) {
            /* A stale entry: re-queue it at its current count. An entry below the
               current count is a leftover, because every rise pushed a new entry. */
            if (pair->count < top.count && pair->count >= b->min_frequency && pair->count > 0) {
                rc = codir__bpe_push(b, pair->count, top.pair);
                if (rc < 0) return rc;
            }
            continue;
        }
        if (pair->count < b->min_frequency) break;

        /* The merged piece keeps the left piece's "##" prefix, if any, and drops the
           right piece's. */
        left = pair->left;
        right = pair->right;
        left_token = b->tokens.keys[left];
        right_token = b->tokens.keys[right];
        CODIR_ASSERT(right_token[0] == '#' && right_token[1] == '#');
        left_length = strlen(left_token);
        right_length = strlen(right_token) - 2;
        CODIR_ASSERT(left_length + right_length < sizeof merged_token);
        memcpy(merged_token, left_token, left_length);
        memcpy(merged_token + left_length, right_token + 2, right_length);
        /* If two different pairs spell the same piece, the second merge reuses the id.
           NOTE: no test reaches this reuse, and it may be unreachable: 3000 random
           corpora of words over "abc" never produced it. */
        merged = codir__strmap_find(&b->tokens, merged_token, left_length + right_length);
        if (merged < 0) {
            merged = codir__strmap_append(&b->tokens, merged_token, left_length + right_length);
            if (merged < 0) return merged;
        }

        /* Rewrite the words. New pairs all contain `merged`, which differs from left
           and right, so this pair's word list does not grow meanwhile. The pairs array
           may move, so the list is read through locals. */
        merge++;
        words = pair->words;
        word_count = pair->word_count;
        for (k = 0; k < word_count; k++) {
            int w = words[k];
            if (b->word_stamp[w] == merge) continue;
            b->word_stamp[w] = merge;
            rc = codir__bpe_merge_word(b, w, left, right, merged, merge);
            if (rc < 0) return rc;
        }
        pair = &b->pairs[top.pair];
        CODIR_ASSERT(pair->count == 0);
        codir__free(pair->words);
        pair->words = NULL;
        pair->word_count = pair->word_capacity = 0;
        rc = codir__bpe_push_touched(b);
        if (rc < 0) return rc;
    }
    return 0;
}

/* Counts the distinct words of the texts into `words` and `freq`. Words longer than
   CODIR__MAX_WORD_CHARS are skipped because they tokenize to [UNK] whatever the
   vocabulary is. */
static int codir__count_words(const char *const *texts, int count, int lowercase, codir__strmap *words,
                              long long **freq)
{
    codir__word_reader reader;
    size_t freq_capacity = 0;
    int t;

    for (t = 0; t < count; t++) {
        if (!texts[t]) return codir__fail(CODIR_ERR_INVALID, "codir_vocab_build: texts[%d] is NULL", t);
        codir__word_reader_init(&reader, texts[t], lowercase);
        while (codir__next_word(&reader)) {
            int id;
            if (reader.chars > CODIR__MAX_WORD_CHARS) continue;
            id = codir__strmap_find(words, reader.word, reader.length);
            if (id < 0) {
                id = codir__strmap_append(words, reader.word, reader.length);
                if (id < 0) return id;
                long long *grown = (long long *)codir__grow(*freq, &freq_capacity, (size_t)id + 1, sizeof **freq);
                if (!grown) return CODIR_ERR_NOMEM;
                *freq = grown;
                (*freq)[id] = 0;
            }
            (*freq)[id]++;
        }
    }
    return 0;
}

/* One character of the training words with its weighted occurrences. */
typedef struct codir__bpe_char {
    uint32_t cp;
    long long initial, continuation;  /* occurrences at a word's start, elsewhere */
    int initial_id, continuation_id;  /* token ids, -1 if left out of the vocabulary */
} codir__bpe_char;

static int codir__compare_chars(const void *a, const void *b)
{
    uint32_t x = ((const codir__bpe_char *)a)->cp, y = ((const codir__bpe_char *)b)->cp;
    return (x > y) - (x < y);
}

/* A candidate character form when not all of them fit: form 0 is word-initial. */
typedef struct codir__bpe_form {
    long long count;
    uint32_t cp;
    int form, index;
} codir__bpe_form;

static int codir__compare_forms(const void *a, const void *b)
{
    const codir__bpe_form *x = (const codir__bpe_form *)a, *y = (const codir__bpe_form *)b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    if (x->form != y->form) return x->form - y->form;
    return (x->cp > y->cp) - (x->cp < y->cp);
}

/* Collects the characters of the counted words, sorted by code point. */
static int codir__collect_chars(const codir__strmap *words, const long long *freq, codir__bpe_char **chars_out,
                                int *char_count_out, codir__u64map *char_index)
{
    codir__bpe_char *chars = NULL;
    size_t char_count = 0, char_capacity = 0;
    int w, rc = 0;
    size_t i;

    for (w = 0; w < words->count; w++) {
        const unsigned char *p = (const unsigned char *)words->keys[w];
        int position = 0;
        while (*p) {
            int length, index;
            uint32_t cp = codir__utf8_decode(p, &length);
            index = codir__u64map_find(char_index, cp);
            if (index < 0) {
                codir__bpe_char *grown =
                    (codir__bpe_char *)codir__grow(chars, &char_capacity, char_count + 1, sizeof *chars);
                if (!grown) {
                    rc = CODIR_ERR_NOMEM;
                    goto fail;
                }
                chars = grown;
                rc = codir__u64map_insert(char_index, cp, (int)char_count);
                if (rc < 0) goto fail;
                index = (int)char_count++;
                chars[index].cp = cp;
                chars[index].initial = chars[index].continuation = 0;
            }
            if (position == 0) chars[index].initial += freq[w];
            else chars[index].continuation += freq[w];
            p += length;
            position++;
        }
    }

    /* Sort, then point the index at the sorted positions. */
    if (char_count > 1) qsort(chars, char_count, sizeof *chars, codir__compare_chars);
    for (i = 0; i < char_count; i++) {
        size_t slot = codir__u64map_slot(char_index, chars[i].cp);
        char_index->values[slot] = (int)i;
        chars[i].initial_id = chars[i].continuation_id = -1;
    }
    *chars_out = chars;
    *char_count_out = (int)char_count;
    return 0;

fail:
    codir__free(chars);
    return rc;
}

/* Adds the character pieces to the vocabulary: all of them when they fit in
   target_size, else the most frequent forms. Returns 1 if all fit, 0 if not, or a
   negative error. */
static int codir__add_alphabet(codir__strmap *tokens, codir__bpe_char *chars, int char_count, int target_size)
{
    int room = target_size - tokens->count, all_fit = char_count <= room / 2, i, form;
    int *chosen = NULL;  /* [2 * char_count] 1 where the form goes into the vocabulary */

    chosen = (int *)codir__calloc(2 * (size_t)char_count, sizeof *chosen);
    if (!chosen) return CODIR_ERR_NOMEM;
    if (all_fit) {
        for (i = 0; i < 2 * char_count; i++) chosen[i] = 1;
    } else {
        codir__bpe_form *forms = (codir__bpe_form *)codir__calloc(2 * (size_t)char_count, sizeof *forms);
        if (!forms) {
            codir__free(chosen);
            return CODIR_ERR_NOMEM;
        }
        for (i = 0; i < char_count; i++) {
            for (form = 0; form < 2; form++) {
                codir__bpe_form *f = &forms[2 * i + form];
                f->count = form == 0 ? chars[i].initial : chars[i].continuation;
                f->cp = chars[i].cp;
                f->form = form;
                f->index = i;
            }
        }
        qsort(forms, 2 * (size_t)char_count, sizeof *forms, codir__compare_forms);
        for (i = 0; i < room; i++) chosen[2 * forms[i].index + forms[i].form] = 1;
        codir__free(forms);
    }

    /* Word-initial forms first, then "##" forms, each in code point order. */
    for (form = 0; form < 2; form++) {
        for (i = 0; i < char_count; i++) {
            char piece[6] = "##";
            int prefix = form ? 2 : 0, length, id;
            if (!chosen[2 * i + form]) continue;
            length = codir__utf8_encode(chars[i].cp, piece + prefix);
            id = codir__strmap_append(tokens, piece, (size_t)(prefix + length));
            if (id < 0) {
                codir__free(chosen);
                return id;
            }
            if (form == 0) chars[i].initial_id = id;
            else chars[i].continuation_id = id;
        }
    }
    codir__free(chosen);
    return all_fit;
}

/* Spells every word as character pieces and counts the adjacent pairs. */
static int codir__bpe_init_words(codir__bpe *b, const codir__strmap *words, const codir__bpe_char *chars,
                                 const codir__u64map *char_index)
{
    size_t total = 0, offset = 0;
    int w, rc;

    b->word_count = words->count;
    b->word_start = (size_t *)codir__calloc((size_t)words->count, sizeof *b->word_start);
    b->word_length = (int *)codir__calloc((size_t)words->count, sizeof *b->word_length);
    b->word_stamp = (int *)codir__calloc((size_t)words->count, sizeof *b->word_stamp);
    if (!b->word_start || !b->word_length || !b->word_stamp) return CODIR_ERR_NOMEM;
    for (w = 0; w < words->count; w++) total += strlen(words->keys[w]);  /* bytes >= characters */
    b->symbols = (int *)codir__calloc(total, sizeof *b->symbols);
    if (!b->symbols) return CODIR_ERR_NOMEM;

    for (w = 0; w < words->count; w++) {
        const unsigned char *p = (const unsigned char *)words->keys[w];
        int n = 0, i;
        b->word_start[w] = offset;
        b->word_stamp[w] = -1;
        while (*p) {
            int length;
            uint32_t cp = codir__utf8_decode(p, &length);
            const codir__bpe_char *c = &chars[codir__u64map_find(char_index, cp)];
            b->symbols[offset + (size_t)n] = n == 0 ? c->initial_id : c->continuation_id;
            n++;
            p += length;
        }
        b->word_length[w] = n;
        for (i = 0; i + 1 < n; i++) {
            rc = codir__bpe_add_pair(b, b->symbols[offset + (size_t)i], b->symbols[offset + (size_t)i + 1],
                                     b->word_freq[w], w, 0);
            if (rc < 0) return rc;
        }
        offset += (size_t)n;
    }
    return codir__bpe_push_touched(b);
}

CODIR_DEF codir_vocab *codir_vocab_build(const char *const *texts, int count, int target_size,
                                         int min_frequency, int lowercase)
{
    static const char *const specials[5] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    codir__bpe b;
    codir__strmap words;
    codir__u64map char_index;
    codir__bpe_char *chars = NULL;
    int char_count = 0, i, rc, all_fit;

    memset(&b, 0, sizeof b);
    memset(&words, 0, sizeof words);
    memset(&char_index, 0, sizeof char_index);
    lowercase = lowercase ? 1 : 0;
    if (count < 0 || (count > 0 && !texts)) {
        codir__fail(CODIR_ERR_INVALID, "codir_vocab_build: count is %d with texts %s", count,
                    texts ? "set" : "NULL");
        return NULL;
    }
    if (target_size < 5) {
        codir__fail(CODIR_ERR_INVALID,
                    "codir_vocab_build: target_size is %d but the 5 special tokens alone need 5", target_size);
        return NULL;
    }
    if (min_frequency < 0) {
        codir__fail(CODIR_ERR_INVALID, "codir_vocab_build: min_frequency is %d; use 0 or more", min_frequency);
        return NULL;
    }
    b.min_frequency = min_frequency > 1 ? min_frequency : 1;

    for (i = 0; i < 5; i++) {
        rc = codir__strmap_append(&b.tokens, specials[i], strlen(specials[i]));
        if (rc < 0) goto fail;
    }
    rc = codir__count_words(texts, count, lowercase, &words, &b.word_freq);
    if (rc < 0) goto fail;
    rc = codir__collect_chars(&words, b.word_freq, &chars, &char_count, &char_index);
    if (rc < 0) goto fail;
    all_fit = codir__add_alphabet(&b.tokens, chars, char_count, target_size);
    if (all_fit < 0) goto fail;

    /* Merging needs every character as a piece, so a truncated alphabet ends here.
       The vocabulary is full anyway. */
    if (all_fit) {
        rc = codir__bpe_init_words(&b, &words, chars, &char_index);
        if (rc == 0) rc = codir__bpe_learn(&b, target_size);
        if (rc < 0) goto fail;
    }

    codir__strmap_free(&words);
    codir__u64map_free(&char_index);
    codir__free(chars);
    {
        codir_vocab *vocab = codir__vocab_from_map(&b.tokens, lowercase, "codir_vocab_build");
        codir__bpe_free(&b);
        return vocab;
    }

fail:
    codir__strmap_free(&words);
    codir__u64map_free(&char_index);
    codir__free(chars);
    codir__bpe_free(&b);
    return NULL;
}

/* ---- GLUE-style TSV ---- */

/* Finds field `index` of the tab-separated line [line, end), which must have at least
   `index` tabs, and stores its bounds. */
static void codir__tsv_field(const char *line, const char *end, int index, const char **start, size_t *length)
{
    const char *p = line;
    int i;
    for (i = 0; i < index; i++) p = (const char *)memchr(p, '\t', (size_t)(end - p)) + 1;
    *start = p;
    {
        const char *tab = (const char *)memchr(p, '\t', (size_t)(end - p));
        *length = (size_t)((tab ? tab : end) - p);
    }
}

static int codir__tsv_field_count(const char *line, const char *end)
{
    int count = 1;
    const char *p;
    for (p = line; p < end; p++) {
        if (*p == '\t' && count < INT_MAX) count++;
    }
    return count;
}

/* Finds the header column named `name`. Returns its index, -1 if absent, or -2 if it
   appears twice. */
static int codir__tsv_column(const char *line, const char *end, int fields, const char *name)
{
    int i, found = -1;
    size_t name_length = strlen(name);
    for (i = 0; i < fields; i++) {
        const char *start;
        size_t length;
        codir__tsv_field(line, end, i, &start, &length);
        if (length == name_length && memcmp(start, name, length) == 0) {
            if (found >= 0) return -2;
            found = i;
        }
    }
    return found;
}

/* Parses a label: decimal digits only, at most INT_MAX - 1 so that the class count
   fits in an int. Returns the label or -1. */
static int codir__parse_label(const char *s, size_t length)
{
    long long value = 0;
    size_t i;
    if (length == 0) return -1;
    for (i = 0; i < length; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        value = value * 10 + (s[i] - '0');
        if (value >= INT_MAX) return -1;
    }
    return (int)value;
}

/* Parses a finite real number that fills the whole field, such as "3.8" or "-1e-2".
   Returns 1 on success. */
static int codir__parse_float(const char *s, size_t length, float *value)
{
    char buffer[64], *end;
    double parsed;
    if (length == 0 || length >= sizeof buffer) return 0;
    memcpy(buffer, s, length);
    buffer[length] = '\0';
    if (buffer[0] == ' ' || buffer[0] == '\t') return 0;
    parsed = strtod(buffer, &end);
    if (*end != '\0' || !(parsed == parsed) || parsed > FLT_MAX || parsed < -FLT_MAX) return 0;
    *value = (float)parsed;
    return 1;
}

CODIR_DEF codir_tsv_options codir_tsv_options_default(void)
{
    codir_tsv_options options;
    memset(&options, 0, sizeof options);
    options.has_header = 1;
    options.text_a = "sentence";
    options.label = "label";
    options.text_a_index = options.text_b_index = options.label_index = -1;
    options.label_kind = CODIR_LABEL_IDS;
    return options;
}

/* Finds one column: by name in the header when it has one and a name is given, else
   by index. `role` names the column in messages. Returns the index or a negative
   error; a column that is not asked for (no name, index -1) returns -1 when
   `optional` is 1. */
static int codir__tsv_find_column(const char *path, const char *header, const char *header_end, int fields,
                                  int has_header, const char *name, int index, const char *role, int optional)
{
    if (has_header && name) {
        int column = codir__tsv_column(header, header_end, fields, name);
        if (column == -1)
            return codir__fail(CODIR_ERR_PARSE,
                               "%s:1: the header has no column named '%s'; the first line must name the "
                               "columns, e.g. 'sentence<TAB>label'",
                               path, name);
        if (column == -2) return codir__fail(CODIR_ERR_PARSE, "%s:1: the header names the column '%s' twice", path, name);
        return column;
    }
    if (index < 0) {
        if (optional) return -1;
        return codir__fail(CODIR_ERR_INVALID, "%s: no %s column given; set its name (with a header) or its index",
                           path, role);
    }
    if (index >= fields)
        return codir__fail(CODIR_ERR_PARSE, "%s:1: the %s column index is %d but the line has %d fields", path, role,
                           index, fields);
    return index;
}

/* Stores the id of a label name in *id: its index in the caller's list, or in the
   names seen so far (added when new). Returns 0, 1 when a given list lacks the name,
   or a negative error. */
static int codir__label_id(const codir_tsv_options *o, codir__strmap *seen, const char *name, size_t length, int *id)
{
    int i;
    if (o->label_names) {
        for (i = 0; i < o->label_name_count; i++) {
            if (strlen(o->label_names[i]) == length && memcmp(o->label_names[i], name, length) == 0) {
                *id = i;
                return 0;
            }
        }
        return 1;
    }
    *id = codir__strmap_find(seen, name, length);
    if (*id < 0) *id = codir__strmap_append(seen, name, length);
    return *id < 0 ? *id : 0;
}

static int codir__compare_strings(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Renumbers the labels so that class names seen in the file are sorted by strcmp,
   and moves the names into data->label_names. */
static int codir__sort_label_names(codir_dataset *data, codir__strmap *seen)
{
    int *new_id, i;
    char **sorted;
    if (seen->count == 0) return 0;
    new_id = (int *)codir__calloc((size_t)seen->count, sizeof *new_id);
    sorted = (char **)codir__calloc((size_t)seen->count, sizeof *sorted);
    if (!new_id || !sorted) {
        codir__free(new_id);
        codir__free(sorted);
        return CODIR_ERR_NOMEM;
    }
    memcpy(sorted, seen->keys, (size_t)seen->count * sizeof *sorted);
    qsort(sorted, (size_t)seen->count, sizeof *sorted, codir__compare_strings);
    for (i = 0; i < seen->count; i++) new_id[codir__strmap_find(seen, sorted[i], strlen(sorted[i]))] = i;
    for (i = 0; i < data->count; i++) data->labels[i] = new_id[data->labels[i]];
    data->label_names = sorted;
    data->num_classes = seen->count;
    /* The names now belong to the dataset; only the map's arrays are freed. */
    codir__free(seen->keys);
    codir__free(seen->table);
    memset(seen, 0, sizeof *seen);
    codir__free(new_id);
    return 0;
}

/* Copies the caller's label names into the dataset. */
static int codir__copy_label_names(codir_dataset *data, const codir_tsv_options *o)
{
    int i;
    data->label_names = (char **)codir__calloc((size_t)o->label_name_count, sizeof *data->label_names);
    if (!data->label_names) return CODIR_ERR_NOMEM;
    data->num_classes = o->label_name_count;
    for (i = 0; i < o->label_name_count; i++) {
        data->label_names[i] = codir__strndup(o->label_names[i], strlen(o->label_names[i]));
        if (!data->label_names[i]) return CODIR_ERR_NOMEM;
    }
    return 0;
}

/* Checks the options before the file is read. */
static int codir__tsv_check_options(const char *path, const codir_tsv_options *o)
{
    int i, j;
    if (o->label_kind != CODIR_LABEL_IDS && o->label_kind != CODIR_LABEL_NAMES && o->label_kind != CODIR_LABEL_FLOAT)
        return codir__fail(CODIR_ERR_INVALID, "%s: label_kind is %d; use a CODIR_LABEL_* value", path, (int)o->label_kind);
    if (o->label_names) {
        if (o->label_kind != CODIR_LABEL_NAMES || o->label_name_count <= 0)
            return codir__fail(CODIR_ERR_INVALID, "%s: label_names needs label_kind CODIR_LABEL_NAMES and "
                               "label_name_count > 0 (it is %d)", path, o->label_name_count);
        for (i = 0; i < o->label_name_count; i++) {
            if (!o->label_names[i]) return codir__fail(CODIR_ERR_INVALID, "%s: label_names[%d] is NULL", path, i);
            for (j = 0; j < i; j++) {
                if (strcmp(o->label_names[i], o->label_names[j]) == 0)
                    return codir__fail(CODIR_ERR_INVALID, "%s: label name '%s' is listed twice", path, o->label_names[i]);
            }
        }
    }
    return 0;
}

CODIR_DEF codir_dataset *codir_dataset_load_tsv_opts(const char *path, const codir_tsv_options *o)
{
    codir_dataset *data = NULL;
    codir__strmap seen;
    char *contents = NULL;
    const char *p, *end, *line_end, *first_end;
    size_t length, rows = 1;
    int fields, column_a, column_b, column_label, line_number, max_label = -1;

    memset(&seen, 0, sizeof seen);
    if (!path || !o) {
        codir__fail(CODIR_ERR_INVALID, "codir_dataset_load_tsv_opts: path or options is NULL");
        return NULL;
    }
    if (codir__tsv_check_options(path, o) < 0) return NULL;
    if (codir__read_file(path, "TSV file", 0, &contents, &length)) return NULL;
    end = contents + length;
    p = codir__skip_bom(contents, end);

    /* Stripping every trailing line break ignores empty lines at the end and makes a
       missing final newline harmless. */
    while (end > p && (end[-1] == '\n' || end[-1] == '\r')) end--;
    if (p == end) {
        codir__fail(CODIR_ERR_PARSE, "%s is empty; expected %s", path,
                    o->has_header ? "a header line naming the columns" : "rows");
        goto fail;
    }

    /* The first line sets the field count and, with a header, the column names. */
    line_end = (const char *)memchr(p, '\n', (size_t)(end - p));
    if (!line_end) line_end = end;
    first_end = line_end > p && line_end[-1] == '\r' ? line_end - 1 : line_end;
    fields = codir__tsv_field_count(p, first_end);
    column_a = codir__tsv_find_column(path, p, first_end, fields, o->has_header, o->text_a, o->text_a_index,
                                      "text", 0);
    if (column_a < 0) goto fail;
    column_b = codir__tsv_find_column(path, p, first_end, fields, o->has_header, o->text_b, o->text_b_index,
                                      "second text", 1);
    if (column_b < -1) goto fail;
    column_label = codir__tsv_find_column(path, p, first_end, fields, o->has_header, o->label, o->label_index,
                                          "label", 0);
    if (column_label < 0) goto fail;
    if (o->has_header) {
        if (line_end == end) {
            codir__fail(CODIR_ERR_PARSE, "%s has a header but no rows", path);
            goto fail;
        }
        p = line_end + 1;
    }

    {
        const char *q;
        for (q = p; q < end; q++) rows += *q == '\n';
    }
    if (rows > (size_t)INT_MAX - 1) {
        codir__fail(CODIR_ERR_OVERFLOW, "%s has more than INT_MAX rows; split the file", path);
        goto fail;
    }
    data = (codir_dataset *)codir__calloc(1, sizeof *data);
    if (!data) goto fail;
    data->texts = (char **)codir__calloc(rows, sizeof *data->texts);
    data->labels = (int *)codir__calloc(rows, sizeof *data->labels);
    if (!data->texts || !data->labels) goto fail;
    if (column_b >= 0) {
        data->texts_b = (char **)codir__calloc(rows, sizeof *data->texts_b);
        if (!data->texts_b) goto fail;
    }
    if (o->label_kind == CODIR_LABEL_FLOAT) {
        data->targets = (float *)codir__calloc(rows, sizeof *data->targets);
        if (!data->targets) goto fail;
        data->is_regression = 1;
    }

    /* Rows. A row is complete before it is counted, so a failure never leaves half
       of one behind. */
    for (line_number = o->has_header ? 2 : 1;; line_number++) {
        const char *row_end, *text, *label_text;
        size_t text_length, label_length;
        int found, label = 0;
        float target = 0.0f;

        line_end = (const char *)memchr(p, '\n', (size_t)(end - p));
        if (!line_end) line_end = end;
        row_end = line_end > p && line_end[-1] == '\r' ? line_end - 1 : line_end;

        if (row_end == p) {
            codir__fail(CODIR_ERR_PARSE, "%s:%d: empty line between rows; remove it", path, line_number);
            goto fail;
        }
        found = codir__tsv_field_count(p, row_end);
        if (found != fields) {
            codir__fail(CODIR_ERR_PARSE,
                        "%s:%d: expected %d tab-separated fields, found %d; a sentence must not contain a tab",
                        path, line_number, fields, found);
            goto fail;
        }
        if (memchr(p, '\0', (size_t)(row_end - p))) {
            codir__fail(CODIR_ERR_PARSE, "%s:%d: the row contains a NUL byte; the file must be UTF-8 text", path,
                        line_number);
            goto fail;
        }

        codir__tsv_field(p, row_end, column_label, &label_text, &label_length);
        if (o->label_kind == CODIR_LABEL_IDS) {
            label = codir__parse_label(label_text, label_length);
            if (label < 0) {
                codir__fail(CODIR_ERR_PARSE, "%s:%d: invalid label '%.*s'; labels must be integers >= 0", path,
                            line_number, (int)(label_length > 40 ? 40 : label_length), label_text);
                goto fail;
            }
        } else if (o->label_kind == CODIR_LABEL_FLOAT) {
            if (!codir__parse_float(label_text, label_length, &target)) {
                codir__fail(CODIR_ERR_PARSE, "%s:%d: invalid label '%.*s'; regression labels must be finite numbers",
                            path, line_number, (int)(label_length > 40 ? 40 : label_length), label_text);
                goto fail;
            }
        } else {
            int rc = label_length == 0 ? 1 : codir__label_id(o, &seen, label_text, label_length, &label);
            if (rc < 0) goto fail;
            if (rc > 0) {
                codir__fail(CODIR_ERR_PARSE, "%s:%d: invalid label '%.*s'; expected %s", path, line_number,
                            (int)(label_length > 40 ? 40 : label_length), label_text,
                            o->label_names ? "one of the label names given" : "a class name");
                goto fail;
            }
        }

        codir__tsv_field(p, row_end, column_a, &text, &text_length);
        data->texts[data->count] = codir__strndup(text, text_length);
        if (!data->texts[data->count]) goto fail;
        if (column_b >= 0) {
            codir__tsv_field(p, row_end, column_b, &text, &text_length);
            data->texts_b[data->count] = codir__strndup(text, text_length);
            if (!data->texts_b[data->count]) {
                codir__free(data->texts[data->count]);
                data->texts[data->count] = NULL;
                goto fail;
            }
        }
        data->labels[data->count] = label;
        if (data->targets) data->targets[data->count] = target;
        data->count++;
        if (label > max_label) max_label = label;
        if (line_end == end) break;
        p = line_end + 1;
    }

    if (o->label_kind == CODIR_LABEL_FLOAT) {
        data->num_classes = 1;
    } else if (o->label_kind == CODIR_LABEL_NAMES) {
        if ((o->label_names ? codir__copy_label_names(data, o) : codir__sort_label_names(data, &seen)) < 0) goto fail;
    } else {
        data->num_classes = max_label + 1;
    }
    codir__strmap_free(&seen);
    codir__free(contents);
    return data;

fail:
    codir__strmap_free(&seen);
    codir__free(contents);
    codir_dataset_free(data);
    return NULL;
}

/* The GLUE layouts that codir_dataset_load_tsv recognizes by header. */
typedef struct codir__glue_layout {
    const char *task, *text_a, *text_b, *label;
    codir_label_kind kind;
    const char *const *names;  /* class names in Hugging Face's GLUE order, or NULL */
    int name_count;
} codir__glue_layout;

static const char *const codir__nli2_names[2] = {"entailment", "not_entailment"};
static const char *const codir__nli3_names[3] = {"entailment", "neutral", "contradiction"};

static const codir__glue_layout codir__glue_layouts[] = {
    {"MRPC", "#1 String", "#2 String", "Quality", CODIR_LABEL_IDS, NULL, 0},
    {"QQP", "question1", "question2", "is_duplicate", CODIR_LABEL_IDS, NULL, 0},
    {"STS-B", "sentence1", "sentence2", "score", CODIR_LABEL_FLOAT, NULL, 0},
    {"MNLI", "sentence1", "sentence2", "gold_label", CODIR_LABEL_NAMES, codir__nli3_names, 3},
    {"RTE", "sentence1", "sentence2", "label", CODIR_LABEL_NAMES, codir__nli2_names, 2},
    {"QNLI", "question", "sentence", "label", CODIR_LABEL_NAMES, codir__nli2_names, 2},
};

/* Returns 1 if the first line looks like a CoLA row: 4 fields, the second "0" or "1",
   the third empty or "*". */
static int codir__looks_like_cola(const char *line, const char *end)
{
    const char *label, *mark;
    size_t label_length, mark_length;
    if (codir__tsv_field_count(line, end) != 4) return 0;
    codir__tsv_field(line, end, 1, &label, &label_length);
    codir__tsv_field(line, end, 2, &mark, &mark_length);
    return label_length == 1 && (label[0] == '0' || label[0] == '1') &&
           (mark_length == 0 || (mark_length == 1 && mark[0] == '*'));
}

CODIR_DEF codir_dataset *codir_dataset_load_tsv(const char *path)
{
    codir_tsv_options options = codir_tsv_options_default();
    char *contents;
    const char *p, *end, *line_end;
    size_t length, i;

    if (!path) {
        codir__fail(CODIR_ERR_INVALID, "codir_dataset_load_tsv: path is NULL");
        return NULL;
    }

    /* Read the first line to pick the layout; the full load reads the file again. */
    if (codir__read_file(path, "TSV file", 0, &contents, &length)) return NULL;
    end = contents + length;
    p = codir__skip_bom(contents, end);
    line_end = (const char *)memchr(p, '\n', (size_t)(end - p));
    if (!line_end) line_end = end;
    if (line_end > p && line_end[-1] == '\r') line_end--;
    {
        int fields = codir__tsv_field_count(p, line_end);
        for (i = 0; i < sizeof codir__glue_layouts / sizeof codir__glue_layouts[0]; i++) {
            const codir__glue_layout *layout = &codir__glue_layouts[i];
            if (codir__tsv_column(p, line_end, fields, layout->text_a) >= 0 &&
                codir__tsv_column(p, line_end, fields, layout->text_b) >= 0 &&
                codir__tsv_column(p, line_end, fields, layout->label) >= 0) {
                options.text_a = layout->text_a;
                options.text_b = layout->text_b;
                options.label = layout->label;
                options.label_kind = layout->kind;
                options.label_names = layout->names;
                options.label_name_count = layout->name_count;
                break;
            }
        }
        if (i == sizeof codir__glue_layouts / sizeof codir__glue_layouts[0] &&
            codir__tsv_column(p, line_end, fields, "sentence") < 0 && codir__looks_like_cola(p, line_end)) {
            options.has_header = 0;
            options.text_a = options.label = NULL;
            options.text_a_index = 3;
            options.label_index = 1;
        }
    }
    codir__free(contents);

    /* Anything else is read as SST-2 (sentence, label), whose messages name the
       missing columns. */
    return codir_dataset_load_tsv_opts(path, &options);
}

CODIR_DEF void codir_dataset_truncate(codir_dataset *data, int count)
{
    int i;
    if (count < 0) count = 0;
    for (i = count; i < data->count; i++) {
        if (data->texts) codir__free(data->texts[i]);
        if (data->texts_b) codir__free(data->texts_b[i]);
    }
    if (count < data->count) data->count = count;
}

CODIR_DEF void codir_dataset_free(codir_dataset *data)
{
    int i;
    if (!data) return;
    for (i = 0; i < data->count; i++) {
        if (data->texts) codir__free(data->texts[i]);
        if (data->texts_b) codir__free(data->texts_b[i]);
    }
    if (data->label_names) {
        for (i = 0; i < data->num_classes; i++) codir__free(data->label_names[i]);
    }
    codir__free(data->texts);
    codir__free(data->texts_b);
    codir__free(data->labels);
    codir__free(data->targets);
    codir__free(data->label_names);
    codir__free(data);
}

/* ---- Unicode tables ---- */

/* A run of code points first..last of one class. */
typedef struct codir__class_run {
    uint32_t first, last;
    unsigned char char_class;  /* a CODIR__CHAR_* value */
} codir__class_run;

/* A run of the uncased map (NFD, drop Mn, lowercase) for characters that map to one
   character: first, first + stride, ..., last map to `value` when is_delta is 0, and
   to cp + value when it is 1. The code points between them map to themselves. */
typedef struct codir__fold_run {
    uint32_t first, last;
    unsigned char stride, is_delta;
    int32_t value;
} codir__fold_run;

/* A character whose uncased form has two or three characters (0 ends a shorter one). */
typedef struct codir__fold_multi {
    uint32_t cp;
    uint32_t out[3];
} codir__fold_multi;

/* Hangul syllables decompose by formula (Unicode section 3.12) into a leading
   consonant, a vowel and an optional trailing consonant. */
#define CODIR__HANGUL_FIRST 0xAC00u
#define CODIR__HANGUL_COUNT 11172u
#define CODIR__HANGUL_VOWELS_TIMES_TRAILS 588u
#define CODIR__HANGUL_TRAILS 28u

/* The tables themselves, written by tests/fixtures/make_unicode_tables.py. */
/* BEGIN UNICODE TABLES: Unicode 14.0.0, from Python 3.11's unicodedata. Regenerate them with
   python3 tests/fixtures/make_unicode_tables.py; do not edit them by hand. */

#define CODIR__UNICODE_VERSION "14.0.0"

/* R: removed (Cc, Cf, Co, NUL, U+FFFD); S: space (Zs, U+2028, U+2029, tab, LF, CR);
   P: punctuation (P*, ASCII punctuation); M: nonspacing mark (Mn). */
#define R CODIR__CHAR_REMOVED
#define S CODIR__CHAR_SPACE
#define P CODIR__CHAR_PUNCT
#define M CODIR__CHAR_MARK
static const codir__class_run codir__class_runs[559] = {
    {0x0, 0x8, R}, {0x9, 0xA, S}, {0xB, 0xC, R}, {0xD, 0xD, S},
    {0xE, 0x1F, R}, {0x20, 0x20, S}, {0x21, 0x2F, P}, {0x3A, 0x40, P},
    {0x5B, 0x60, P}, {0x7B, 0x7E, P}, {0x7F, 0x9F, R}, {0xA0, 0xA0, S},
    {0xA1, 0xA1, P}, {0xA7, 0xA7, P}, {0xAB, 0xAB, P}, {0xAD, 0xAD, R},
    {0xB6, 0xB7, P}, {0xBB, 0xBB, P}, {0xBF, 0xBF, P}, {0x300, 0x36F, M},
    {0x37E, 0x37E, P}, {0x387, 0x387, P}, {0x483, 0x487, M}, {0x55A, 0x55F, P},
    {0x589, 0x58A, P}, {0x591, 0x5BD, M}, {0x5BE, 0x5BE, P}, {0x5BF, 0x5BF, M},
    {0x5C0, 0x5C0, P}, {0x5C1, 0x5C2, M}, {0x5C3, 0x5C3, P}, {0x5C4, 0x5C5, M},
    {0x5C6, 0x5C6, P}, {0x5C7, 0x5C7, M}, {0x5F3, 0x5F4, P}, {0x600, 0x605, R},
    {0x609, 0x60A, P}, {0x60C, 0x60D, P}, {0x610, 0x61A, M}, {0x61B, 0x61B, P},
    {0x61C, 0x61C, R}, {0x61D, 0x61F, P}, {0x64B, 0x65F, M}, {0x66A, 0x66D, P},
    {0x670, 0x670, M}, {0x6D4, 0x6D4, P}, {0x6D6, 0x6DC, M}, {0x6DD, 0x6DD, R},
    {0x6DF, 0x6E4, M}, {0x6E7, 0x6E8, M}, {0x6EA, 0x6ED, M}, {0x700, 0x70D, P},
    {0x70F, 0x70F, R}, {0x711, 0x711, M}, {0x730, 0x74A, M}, {0x7A6, 0x7B0, M},
    {0x7EB, 0x7F3, M}, {0x7F7, 0x7F9, P}, {0x7FD, 0x7FD, M}, {0x816, 0x819, M},
    {0x81B, 0x823, M}, {0x825, 0x827, M}, {0x829, 0x82D, M}, {0x830, 0x83E, P},
    {0x859, 0x85B, M}, {0x85E, 0x85E, P}, {0x890, 0x891, R}, {0x898, 0x89F, M},
    {0x8CA, 0x8E1, M}, {0x8E2, 0x8E2, R}, {0x8E3, 0x902, M}, {0x93A, 0x93A, M},
    {0x93C, 0x93C, M}, {0x941, 0x948, M}, {0x94D, 0x94D, M}, {0x951, 0x957, M},
    {0x962, 0x963, M}, {0x964, 0x965, P}, {0x970, 0x970, P}, {0x981, 0x981, M},
    {0x9BC, 0x9BC, M}, {0x9C1, 0x9C4, M}, {0x9CD, 0x9CD, M}, {0x9E2, 0x9E3, M},
    {0x9FD, 0x9FD, P}, {0x9FE, 0x9FE, M}, {0xA01, 0xA02, M}, {0xA3C, 0xA3C, M},
    {0xA41, 0xA42, M}, {0xA47, 0xA48, M}, {0xA4B, 0xA4D, M}, {0xA51, 0xA51, M},
    {0xA70, 0xA71, M}, {0xA75, 0xA75, M}, {0xA76, 0xA76, P}, {0xA81, 0xA82, M},
    {0xABC, 0xABC, M}, {0xAC1, 0xAC5, M}, {0xAC7, 0xAC8, M}, {0xACD, 0xACD, M},
    {0xAE2, 0xAE3, M}, {0xAF0, 0xAF0, P}, {0xAFA, 0xAFF, M}, {0xB01, 0xB01, M},
    {0xB3C, 0xB3C, M}, {0xB3F, 0xB3F, M}, {0xB41, 0xB44, M}, {0xB4D, 0xB4D, M},
    {0xB55, 0xB56, M}, {0xB62, 0xB63, M}, {0xB82, 0xB82, M}, {0xBC0, 0xBC0, M},
    {0xBCD, 0xBCD, M}, {0xC00, 0xC00, M}, {0xC04, 0xC04, M}, {0xC3C, 0xC3C, M},
    {0xC3E, 0xC40, M}, {0xC46, 0xC48, M}, {0xC4A, 0xC4D, M}, {0xC55, 0xC56, M},
    {0xC62, 0xC63, M}, {0xC77, 0xC77, P}, {0xC81, 0xC81, M}, {0xC84, 0xC84, P},
    {0xCBC, 0xCBC, M}, {0xCBF, 0xCBF, M}, {0xCC6, 0xCC6, M}, {0xCCC, 0xCCD, M},
    {0xCE2, 0xCE3, M}, {0xD00, 0xD01, M}, {0xD3B, 0xD3C, M}, {0xD41, 0xD44, M},
    {0xD4D, 0xD4D, M}, {0xD62, 0xD63, M}, {0xD81, 0xD81, M}, {0xDCA, 0xDCA, M},
    {0xDD2, 0xDD4, M}, {0xDD6, 0xDD6, M}, {0xDF4, 0xDF4, P}, {0xE31, 0xE31, M},
    {0xE34, 0xE3A, M}, {0xE47, 0xE4E, M}, {0xE4F, 0xE4F, P}, {0xE5A, 0xE5B, P},
    {0xEB1, 0xEB1, M}, {0xEB4, 0xEBC, M}, {0xEC8, 0xECD, M}, {0xF04, 0xF12, P},
    {0xF14, 0xF14, P}, {0xF18, 0xF19, M}, {0xF35, 0xF35, M}, {0xF37, 0xF37, M},
    {0xF39, 0xF39, M}, {0xF3A, 0xF3D, P}, {0xF71, 0xF7E, M}, {0xF80, 0xF84, M},
    {0xF85, 0xF85, P}, {0xF86, 0xF87, M}, {0xF8D, 0xF97, M}, {0xF99, 0xFBC, M},
    {0xFC6, 0xFC6, M}, {0xFD0, 0xFD4, P}, {0xFD9, 0xFDA, P}, {0x102D, 0x1030, M},
    {0x1032, 0x1037, M}, {0x1039, 0x103A, M}, {0x103D, 0x103E, M}, {0x104A, 0x104F, P},
    {0x1058, 0x1059, M}, {0x105E, 0x1060, M}, {0x1071, 0x1074, M}, {0x1082, 0x1082, M},
    {0x1085, 0x1086, M}, {0x108D, 0x108D, M}, {0x109D, 0x109D, M}, {0x10FB, 0x10FB, P},
    {0x135D, 0x135F, M}, {0x1360, 0x1368, P}, {0x1400, 0x1400, P}, {0x166E, 0x166E, P},
    {0x1680, 0x1680, S}, {0x169B, 0x169C, P}, {0x16EB, 0x16ED, P}, {0x1712, 0x1714, M},
    {0x1732, 0x1733, M}, {0x1735, 0x1736, P}, {0x1752, 0x1753, M}, {0x1772, 0x1773, M},
    {0x17B4, 0x17B5, M}, {0x17B7, 0x17BD, M}, {0x17C6, 0x17C6, M}, {0x17C9, 0x17D3, M},
    {0x17D4, 0x17D6, P}, {0x17D8, 0x17DA, P}, {0x17DD, 0x17DD, M}, {0x1800, 0x180A, P},
    {0x180B, 0x180D, M}, {0x180E, 0x180E, R}, {0x180F, 0x180F, M}, {0x1885, 0x1886, M},
    {0x18A9, 0x18A9, M}, {0x1920, 0x1922, M}, {0x1927, 0x1928, M}, {0x1932, 0x1932, M},
    {0x1939, 0x193B, M}, {0x1944, 0x1945, P}, {0x1A17, 0x1A18, M}, {0x1A1B, 0x1A1B, M},
    {0x1A1E, 0x1A1F, P}, {0x1A56, 0x1A56, M}, {0x1A58, 0x1A5E, M}, {0x1A60, 0x1A60, M},
    {0x1A62, 0x1A62, M}, {0x1A65, 0x1A6C, M}, {0x1A73, 0x1A7C, M}, {0x1A7F, 0x1A7F, M},
    {0x1AA0, 0x1AA6, P}, {0x1AA8, 0x1AAD, P}, {0x1AB0, 0x1ABD, M}, {0x1ABF, 0x1ACE, M},
    {0x1B00, 0x1B03, M}, {0x1B34, 0x1B34, M}, {0x1B36, 0x1B3A, M}, {0x1B3C, 0x1B3C, M},
    {0x1B42, 0x1B42, M}, {0x1B5A, 0x1B60, P}, {0x1B6B, 0x1B73, M}, {0x1B7D, 0x1B7E, P},
    {0x1B80, 0x1B81, M}, {0x1BA2, 0x1BA5, M}, {0x1BA8, 0x1BA9, M}, {0x1BAB, 0x1BAD, M},
    {0x1BE6, 0x1BE6, M}, {0x1BE8, 0x1BE9, M}, {0x1BED, 0x1BED, M}, {0x1BEF, 0x1BF1, M},
    {0x1BFC, 0x1BFF, P}, {0x1C2C, 0x1C33, M}, {0x1C36, 0x1C37, M}, {0x1C3B, 0x1C3F, P},
    {0x1C7E, 0x1C7F, P}, {0x1CC0, 0x1CC7, P}, {0x1CD0, 0x1CD2, M}, {0x1CD3, 0x1CD3, P},
    {0x1CD4, 0x1CE0, M}, {0x1CE2, 0x1CE8, M}, {0x1CED, 0x1CED, M}, {0x1CF4, 0x1CF4, M},
    {0x1CF8, 0x1CF9, M}, {0x1DC0, 0x1DFF, M}, {0x2000, 0x200A, S}, {0x200B, 0x200F, R},
    {0x2010, 0x2027, P}, {0x2028, 0x2029, S}, {0x202A, 0x202E, R}, {0x202F, 0x202F, S},
    {0x2030, 0x2043, P}, {0x2045, 0x2051, P}, {0x2053, 0x205E, P}, {0x205F, 0x205F, S},
    {0x2060, 0x2064, R}, {0x2066, 0x206F, R}, {0x207D, 0x207E, P}, {0x208D, 0x208E, P},
    {0x20D0, 0x20DC, M}, {0x20E1, 0x20E1, M}, {0x20E5, 0x20F0, M}, {0x2308, 0x230B, P},
    {0x2329, 0x232A, P}, {0x2768, 0x2775, P}, {0x27C5, 0x27C6, P}, {0x27E6, 0x27EF, P},
    {0x2983, 0x2998, P}, {0x29D8, 0x29DB, P}, {0x29FC, 0x29FD, P}, {0x2CEF, 0x2CF1, M},
    {0x2CF9, 0x2CFC, P}, {0x2CFE, 0x2CFF, P}, {0x2D70, 0x2D70, P}, {0x2D7F, 0x2D7F, M},
    {0x2DE0, 0x2DFF, M}, {0x2E00, 0x2E2E, P}, {0x2E30, 0x2E4F, P}, {0x2E52, 0x2E5D, P},
    {0x3000, 0x3000, S}, {0x3001, 0x3003, P}, {0x3008, 0x3011, P}, {0x3014, 0x301F, P},
    {0x302A, 0x302D, M}, {0x3030, 0x3030, P}, {0x303D, 0x303D, P}, {0x3099, 0x309A, M},
    {0x30A0, 0x30A0, P}, {0x30FB, 0x30FB, P}, {0xA4FE, 0xA4FF, P}, {0xA60D, 0xA60F, P},
    {0xA66F, 0xA66F, M}, {0xA673, 0xA673, P}, {0xA674, 0xA67D, M}, {0xA67E, 0xA67E, P},
    {0xA69E, 0xA69F, M}, {0xA6F0, 0xA6F1, M}, {0xA6F2, 0xA6F7, P}, {0xA802, 0xA802, M},
    {0xA806, 0xA806, M}, {0xA80B, 0xA80B, M}, {0xA825, 0xA826, M}, {0xA82C, 0xA82C, M},
    {0xA874, 0xA877, P}, {0xA8C4, 0xA8C5, M}, {0xA8CE, 0xA8CF, P}, {0xA8E0, 0xA8F1, M},
    {0xA8F8, 0xA8FA, P}, {0xA8FC, 0xA8FC, P}, {0xA8FF, 0xA8FF, M}, {0xA926, 0xA92D, M},
    {0xA92E, 0xA92F, P}, {0xA947, 0xA951, M}, {0xA95F, 0xA95F, P}, {0xA980, 0xA982, M},
    {0xA9B3, 0xA9B3, M}, {0xA9B6, 0xA9B9, M}, {0xA9BC, 0xA9BD, M}, {0xA9C1, 0xA9CD, P},
    {0xA9DE, 0xA9DF, P}, {0xA9E5, 0xA9E5, M}, {0xAA29, 0xAA2E, M}, {0xAA31, 0xAA32, M},
    {0xAA35, 0xAA36, M}, {0xAA43, 0xAA43, M}, {0xAA4C, 0xAA4C, M}, {0xAA5C, 0xAA5F, P},
    {0xAA7C, 0xAA7C, M}, {0xAAB0, 0xAAB0, M}, {0xAAB2, 0xAAB4, M}, {0xAAB7, 0xAAB8, M},
    {0xAABE, 0xAABF, M}, {0xAAC1, 0xAAC1, M}, {0xAADE, 0xAADF, P}, {0xAAEC, 0xAAED, M},
    {0xAAF0, 0xAAF1, P}, {0xAAF6, 0xAAF6, M}, {0xABE5, 0xABE5, M}, {0xABE8, 0xABE8, M},
    {0xABEB, 0xABEB, P}, {0xABED, 0xABED, M}, {0xE000, 0xF8FF, R}, {0xFB1E, 0xFB1E, M},
    {0xFD3E, 0xFD3F, P}, {0xFE00, 0xFE0F, M}, {0xFE10, 0xFE19, P}, {0xFE20, 0xFE2F, M},
    {0xFE30, 0xFE52, P}, {0xFE54, 0xFE61, P}, {0xFE63, 0xFE63, P}, {0xFE68, 0xFE68, P},
    {0xFE6A, 0xFE6B, P}, {0xFEFF, 0xFEFF, R}, {0xFF01, 0xFF03, P}, {0xFF05, 0xFF0A, P},
    {0xFF0C, 0xFF0F, P}, {0xFF1A, 0xFF1B, P}, {0xFF1F, 0xFF20, P}, {0xFF3B, 0xFF3D, P},
    {0xFF3F, 0xFF3F, P}, {0xFF5B, 0xFF5B, P}, {0xFF5D, 0xFF5D, P}, {0xFF5F, 0xFF65, P},
    {0xFFF9, 0xFFFB, R}, {0xFFFD, 0xFFFD, R}, {0x10100, 0x10102, P}, {0x101FD, 0x101FD, M},
    {0x102E0, 0x102E0, M}, {0x10376, 0x1037A, M}, {0x1039F, 0x1039F, P}, {0x103D0, 0x103D0, P},
    {0x1056F, 0x1056F, P}, {0x10857, 0x10857, P}, {0x1091F, 0x1091F, P}, {0x1093F, 0x1093F, P},
    {0x10A01, 0x10A03, M}, {0x10A05, 0x10A06, M}, {0x10A0C, 0x10A0F, M}, {0x10A38, 0x10A3A, M},
    {0x10A3F, 0x10A3F, M}, {0x10A50, 0x10A58, P}, {0x10A7F, 0x10A7F, P}, {0x10AE5, 0x10AE6, M},
    {0x10AF0, 0x10AF6, P}, {0x10B39, 0x10B3F, P}, {0x10B99, 0x10B9C, P}, {0x10D24, 0x10D27, M},
    {0x10EAB, 0x10EAC, M}, {0x10EAD, 0x10EAD, P}, {0x10F46, 0x10F50, M}, {0x10F55, 0x10F59, P},
    {0x10F82, 0x10F85, M}, {0x10F86, 0x10F89, P}, {0x11001, 0x11001, M}, {0x11038, 0x11046, M},
    {0x11047, 0x1104D, P}, {0x11070, 0x11070, M}, {0x11073, 0x11074, M}, {0x1107F, 0x11081, M},
    {0x110B3, 0x110B6, M}, {0x110B9, 0x110BA, M}, {0x110BB, 0x110BC, P}, {0x110BD, 0x110BD, R},
    {0x110BE, 0x110C1, P}, {0x110C2, 0x110C2, M}, {0x110CD, 0x110CD, R}, {0x11100, 0x11102, M},
    {0x11127, 0x1112B, M}, {0x1112D, 0x11134, M}, {0x11140, 0x11143, P}, {0x11173, 0x11173, M},
    {0x11174, 0x11175, P}, {0x11180, 0x11181, M}, {0x111B6, 0x111BE, M}, {0x111C5, 0x111C8, P},
    {0x111C9, 0x111CC, M}, {0x111CD, 0x111CD, P}, {0x111CF, 0x111CF, M}, {0x111DB, 0x111DB, P},
    {0x111DD, 0x111DF, P}, {0x1122F, 0x11231, M}, {0x11234, 0x11234, M}, {0x11236, 0x11237, M},
    {0x11238, 0x1123D, P}, {0x1123E, 0x1123E, M}, {0x112A9, 0x112A9, P}, {0x112DF, 0x112DF, M},
    {0x112E3, 0x112EA, M}, {0x11300, 0x11301, M}, {0x1133B, 0x1133C, M}, {0x11340, 0x11340, M},
    {0x11366, 0x1136C, M}, {0x11370, 0x11374, M}, {0x11438, 0x1143F, M}, {0x11442, 0x11444, M},
    {0x11446, 0x11446, M}, {0x1144B, 0x1144F, P}, {0x1145A, 0x1145B, P}, {0x1145D, 0x1145D, P},
    {0x1145E, 0x1145E, M}, {0x114B3, 0x114B8, M}, {0x114BA, 0x114BA, M}, {0x114BF, 0x114C0, M},
    {0x114C2, 0x114C3, M}, {0x114C6, 0x114C6, P}, {0x115B2, 0x115B5, M}, {0x115BC, 0x115BD, M},
    {0x115BF, 0x115C0, M}, {0x115C1, 0x115D7, P}, {0x115DC, 0x115DD, M}, {0x11633, 0x1163A, M},
    {0x1163D, 0x1163D, M}, {0x1163F, 0x11640, M}, {0x11641, 0x11643, P}, {0x11660, 0x1166C, P},
    {0x116AB, 0x116AB, M}, {0x116AD, 0x116AD, M}, {0x116B0, 0x116B5, M}, {0x116B7, 0x116B7, M},
    {0x116B9, 0x116B9, P}, {0x1171D, 0x1171F, M}, {0x11722, 0x11725, M}, {0x11727, 0x1172B, M},
    {0x1173C, 0x1173E, P}, {0x1182F, 0x11837, M}, {0x11839, 0x1183A, M}, {0x1183B, 0x1183B, P},
    {0x1193B, 0x1193C, M}, {0x1193E, 0x1193E, M}, {0x11943, 0x11943, M}, {0x11944, 0x11946, P},
    {0x119D4, 0x119D7, M}, {0x119DA, 0x119DB, M}, {0x119E0, 0x119E0, M}, {0x119E2, 0x119E2, P},
    {0x11A01, 0x11A0A, M}, {0x11A33, 0x11A38, M}, {0x11A3B, 0x11A3E, M}, {0x11A3F, 0x11A46, P},
    {0x11A47, 0x11A47, M}, {0x11A51, 0x11A56, M}, {0x11A59, 0x11A5B, M}, {0x11A8A, 0x11A96, M},
    {0x11A98, 0x11A99, M}, {0x11A9A, 0x11A9C, P}, {0x11A9E, 0x11AA2, P}, {0x11C30, 0x11C36, M},
    {0x11C38, 0x11C3D, M}, {0x11C3F, 0x11C3F, M}, {0x11C41, 0x11C45, P}, {0x11C70, 0x11C71, P},
    {0x11C92, 0x11CA7, M}, {0x11CAA, 0x11CB0, M}, {0x11CB2, 0x11CB3, M}, {0x11CB5, 0x11CB6, M},
    {0x11D31, 0x11D36, M}, {0x11D3A, 0x11D3A, M}, {0x11D3C, 0x11D3D, M}, {0x11D3F, 0x11D45, M},
    {0x11D47, 0x11D47, M}, {0x11D90, 0x11D91, M}, {0x11D95, 0x11D95, M}, {0x11D97, 0x11D97, M},
    {0x11EF3, 0x11EF4, M}, {0x11EF7, 0x11EF8, P}, {0x11FFF, 0x11FFF, P}, {0x12470, 0x12474, P},
    {0x12FF1, 0x12FF2, P}, {0x13430, 0x13438, R}, {0x16A6E, 0x16A6F, P}, {0x16AF0, 0x16AF4, M},
    {0x16AF5, 0x16AF5, P}, {0x16B30, 0x16B36, M}, {0x16B37, 0x16B3B, P}, {0x16B44, 0x16B44, P},
    {0x16E97, 0x16E9A, P}, {0x16F4F, 0x16F4F, M}, {0x16F8F, 0x16F92, M}, {0x16FE2, 0x16FE2, P},
    {0x16FE4, 0x16FE4, M}, {0x1BC9D, 0x1BC9E, M}, {0x1BC9F, 0x1BC9F, P}, {0x1BCA0, 0x1BCA3, R},
    {0x1CF00, 0x1CF2D, M}, {0x1CF30, 0x1CF46, M}, {0x1D167, 0x1D169, M}, {0x1D173, 0x1D17A, R},
    {0x1D17B, 0x1D182, M}, {0x1D185, 0x1D18B, M}, {0x1D1AA, 0x1D1AD, M}, {0x1D242, 0x1D244, M},
    {0x1DA00, 0x1DA36, M}, {0x1DA3B, 0x1DA6C, M}, {0x1DA75, 0x1DA75, M}, {0x1DA84, 0x1DA84, M},
    {0x1DA87, 0x1DA8B, P}, {0x1DA9B, 0x1DA9F, M}, {0x1DAA1, 0x1DAAF, M}, {0x1E000, 0x1E006, M},
    {0x1E008, 0x1E018, M}, {0x1E01B, 0x1E021, M}, {0x1E023, 0x1E024, M}, {0x1E026, 0x1E02A, M},
    {0x1E130, 0x1E136, M}, {0x1E2AE, 0x1E2AE, M}, {0x1E2EC, 0x1E2EF, M}, {0x1E8D0, 0x1E8D6, M},
    {0x1E944, 0x1E94A, M}, {0x1E95E, 0x1E95F, P}, {0xE0001, 0xE0001, R}, {0xE0020, 0xE007F, R},
    {0xE0100, 0xE01EF, M}, {0xF0000, 0xFFFFD, R}, {0x100000, 0x10FFFD, R}
};
#undef R
#undef S
#undef P
#undef M

/* Uncased forms of one character: {first, last, stride, is_delta, value}. */
static const codir__fold_run codir__fold_runs[464] = {
    {0x41, 0x5A, 1, 1, 32}, {0xC0, 0xC5, 1, 0, 0x61}, {0xC6, 0xC6, 1, 0, 0xE6}, {0xC7, 0xC7, 1, 0, 0x63},
    {0xC8, 0xCB, 1, 0, 0x65}, {0xCC, 0xCF, 1, 0, 0x69}, {0xD0, 0xD0, 1, 0, 0xF0}, {0xD1, 0xD2, 1, 1, -99},
    {0xD3, 0xD6, 1, 0, 0x6F}, {0xD8, 0xD8, 1, 0, 0xF8}, {0xD9, 0xDC, 1, 0, 0x75}, {0xDD, 0xDD, 1, 0, 0x79},
    {0xDE, 0xDE, 1, 0, 0xFE}, {0xE0, 0xE5, 1, 0, 0x61}, {0xE7, 0xE7, 1, 0, 0x63}, {0xE8, 0xEB, 1, 0, 0x65},
    {0xEC, 0xEF, 1, 0, 0x69}, {0xF1, 0xF2, 1, 1, -131}, {0xF3, 0xF6, 1, 0, 0x6F}, {0xF9, 0xFC, 1, 0, 0x75},
    {0xFD, 0xFF, 2, 0, 0x79}, {0x100, 0x105, 1, 0, 0x61}, {0x106, 0x10D, 1, 0, 0x63}, {0x10E, 0x10F, 1, 0, 0x64},
    {0x110, 0x110, 1, 0, 0x111}, {0x112, 0x11B, 1, 0, 0x65}, {0x11C, 0x123, 1, 0, 0x67}, {0x124, 0x125, 1, 0, 0x68},
    {0x126, 0x126, 1, 0, 0x127}, {0x128, 0x130, 1, 0, 0x69}, {0x132, 0x132, 1, 0, 0x133}, {0x134, 0x135, 1, 0, 0x6A},
    {0x136, 0x137, 1, 0, 0x6B}, {0x139, 0x13E, 1, 0, 0x6C}, {0x13F, 0x141, 2, 1, 1}, {0x143, 0x148, 1, 0, 0x6E},
    {0x14A, 0x14A, 1, 0, 0x14B}, {0x14C, 0x151, 1, 0, 0x6F}, {0x152, 0x152, 1, 0, 0x153}, {0x154, 0x159, 1, 0, 0x72},
    {0x15A, 0x161, 1, 0, 0x73}, {0x162, 0x165, 1, 0, 0x74}, {0x166, 0x166, 1, 0, 0x167}, {0x168, 0x173, 1, 0, 0x75},
    {0x174, 0x175, 1, 0, 0x77}, {0x176, 0x178, 1, 0, 0x79}, {0x179, 0x17E, 1, 0, 0x7A}, {0x181, 0x181, 1, 0, 0x253},
    {0x182, 0x184, 2, 1, 1}, {0x186, 0x186, 1, 0, 0x254}, {0x187, 0x187, 1, 0, 0x188}, {0x189, 0x18A, 1, 1, 205},
    {0x18B, 0x18B, 1, 0, 0x18C}, {0x18E, 0x18E, 1, 0, 0x1DD}, {0x18F, 0x18F, 1, 0, 0x259}, {0x190, 0x190, 1, 0, 0x25B},
    {0x191, 0x191, 1, 0, 0x192}, {0x193, 0x193, 1, 0, 0x260}, {0x194, 0x194, 1, 0, 0x263}, {0x196, 0x196, 1, 0, 0x269},
    {0x197, 0x197, 1, 0, 0x268}, {0x198, 0x198, 1, 0, 0x199}, {0x19C, 0x19C, 1, 0, 0x26F}, {0x19D, 0x19D, 1, 0, 0x272},
    {0x19F, 0x19F, 1, 0, 0x275}, {0x1A0, 0x1A1, 1, 0, 0x6F}, {0x1A2, 0x1A4, 2, 1, 1}, {0x1A6, 0x1A6, 1, 0, 0x280},
    {0x1A7, 0x1A7, 1, 0, 0x1A8}, {0x1A9, 0x1A9, 1, 0, 0x283}, {0x1AC, 0x1AC, 1, 0, 0x1AD}, {0x1AE, 0x1AE, 1, 0, 0x288},
    {0x1AF, 0x1B0, 1, 0, 0x75}, {0x1B1, 0x1B2, 1, 1, 217}, {0x1B3, 0x1B5, 2, 1, 1}, {0x1B7, 0x1B7, 1, 0, 0x292},
    {0x1B8, 0x1B8, 1, 0, 0x1B9}, {0x1BC, 0x1BC, 1, 0, 0x1BD}, {0x1C4, 0x1C5, 1, 0, 0x1C6}, {0x1C7, 0x1C8, 1, 0, 0x1C9},
    {0x1CA, 0x1CB, 1, 0, 0x1CC}, {0x1CD, 0x1CE, 1, 0, 0x61}, {0x1CF, 0x1D0, 1, 0, 0x69}, {0x1D1, 0x1D2, 1, 0, 0x6F},
    {0x1D3, 0x1DC, 1, 0, 0x75}, {0x1DE, 0x1E1, 1, 0, 0x61}, {0x1E2, 0x1E3, 1, 0, 0xE6}, {0x1E4, 0x1E4, 1, 0, 0x1E5},
    {0x1E6, 0x1E7, 1, 0, 0x67}, {0x1E8, 0x1E9, 1, 0, 0x6B}, {0x1EA, 0x1ED, 1, 0, 0x6F}, {0x1EE, 0x1EF, 1, 0, 0x292},
    {0x1F0, 0x1F0, 1, 0, 0x6A}, {0x1F1, 0x1F2, 1, 0, 0x1F3}, {0x1F4, 0x1F5, 1, 0, 0x67}, {0x1F6, 0x1F6, 1, 0, 0x195},
    {0x1F7, 0x1F7, 1, 0, 0x1BF}, {0x1F8, 0x1F9, 1, 0, 0x6E}, {0x1FA, 0x1FB, 1, 0, 0x61}, {0x1FC, 0x1FD, 1, 0, 0xE6},
    {0x1FE, 0x1FF, 1, 0, 0xF8}, {0x200, 0x203, 1, 0, 0x61}, {0x204, 0x207, 1, 0, 0x65}, {0x208, 0x20B, 1, 0, 0x69},
    {0x20C, 0x20F, 1, 0, 0x6F}, {0x210, 0x213, 1, 0, 0x72}, {0x214, 0x217, 1, 0, 0x75}, {0x218, 0x219, 1, 0, 0x73},
    {0x21A, 0x21B, 1, 0, 0x74}, {0x21C, 0x21C, 1, 0, 0x21D}, {0x21E, 0x21F, 1, 0, 0x68}, {0x220, 0x220, 1, 0, 0x19E},
    {0x222, 0x224, 2, 1, 1}, {0x226, 0x227, 1, 0, 0x61}, {0x228, 0x229, 1, 0, 0x65}, {0x22A, 0x231, 1, 0, 0x6F},
    {0x232, 0x233, 1, 0, 0x79}, {0x23A, 0x23A, 1, 0, 0x2C65}, {0x23B, 0x23B, 1, 0, 0x23C}, {0x23D, 0x23D, 1, 0, 0x19A},
    {0x23E, 0x23E, 1, 0, 0x2C66}, {0x241, 0x241, 1, 0, 0x242}, {0x243, 0x243, 1, 0, 0x180}, {0x244, 0x244, 1, 0, 0x289},
    {0x245, 0x245, 1, 0, 0x28C}, {0x246, 0x24E, 2, 1, 1}, {0x370, 0x372, 2, 1, 1}, {0x374, 0x374, 1, 0, 0x2B9},
    {0x376, 0x376, 1, 0, 0x377}, {0x37E, 0x37E, 1, 0, 0x3B}, {0x37F, 0x37F, 1, 0, 0x3F3}, {0x385, 0x385, 1, 0, 0xA8},
    {0x386, 0x386, 1, 0, 0x3B1}, {0x387, 0x387, 1, 0, 0xB7}, {0x388, 0x388, 1, 0, 0x3B5}, {0x389, 0x389, 1, 0, 0x3B7},
    {0x38A, 0x38A, 1, 0, 0x3B9}, {0x38C, 0x38C, 1, 0, 0x3BF}, {0x38E, 0x38E, 1, 0, 0x3C5}, {0x38F, 0x38F, 1, 0, 0x3C9},
    {0x390, 0x390, 1, 0, 0x3B9}, {0x391, 0x3A1, 1, 1, 32}, {0x3A3, 0x3A9, 1, 1, 32}, {0x3AA, 0x3AA, 1, 0, 0x3B9},
    {0x3AB, 0x3AB, 1, 0, 0x3C5}, {0x3AC, 0x3AC, 1, 0, 0x3B1}, {0x3AD, 0x3AD, 1, 0, 0x3B5}, {0x3AE, 0x3AE, 1, 0, 0x3B7},
    {0x3AF, 0x3AF, 1, 0, 0x3B9}, {0x3B0, 0x3B0, 1, 0, 0x3C5}, {0x3CA, 0x3CA, 1, 0, 0x3B9}, {0x3CB, 0x3CB, 1, 0, 0x3C5},
    {0x3CC, 0x3CC, 1, 0, 0x3BF}, {0x3CD, 0x3CD, 1, 0, 0x3C5}, {0x3CE, 0x3CE, 1, 0, 0x3C9}, {0x3CF, 0x3CF, 1, 0, 0x3D7},
    {0x3D3, 0x3D4, 1, 0, 0x3D2}, {0x3D8, 0x3EE, 2, 1, 1}, {0x3F4, 0x3F4, 1, 0, 0x3B8}, {0x3F7, 0x3F7, 1, 0, 0x3F8},
    {0x3F9, 0x3F9, 1, 0, 0x3F2}, {0x3FA, 0x3FA, 1, 0, 0x3FB}, {0x3FD, 0x3FF, 1, 1, -130}, {0x400, 0x401, 1, 0, 0x435},
    {0x402, 0x402, 1, 0, 0x452}, {0x403, 0x403, 1, 0, 0x433}, {0x404, 0x406, 1, 1, 80}, {0x407, 0x407, 1, 0, 0x456},
    {0x408, 0x40B, 1, 1, 80}, {0x40C, 0x40C, 1, 0, 0x43A}, {0x40D, 0x40D, 1, 0, 0x438}, {0x40E, 0x40E, 1, 0, 0x443},
    {0x40F, 0x40F, 1, 0, 0x45F}, {0x410, 0x418, 1, 1, 32}, {0x419, 0x419, 1, 0, 0x438}, {0x41A, 0x42F, 1, 1, 32},
    {0x439, 0x439, 1, 0, 0x438}, {0x450, 0x451, 1, 0, 0x435}, {0x453, 0x453, 1, 0, 0x433}, {0x457, 0x457, 1, 0, 0x456},
    {0x45C, 0x45C, 1, 0, 0x43A}, {0x45D, 0x45D, 1, 0, 0x438}, {0x45E, 0x45E, 1, 0, 0x443}, {0x460, 0x474, 2, 1, 1},
    {0x476, 0x477, 1, 0, 0x475}, {0x478, 0x480, 2, 1, 1}, {0x48A, 0x4BE, 2, 1, 1}, {0x4C0, 0x4C0, 1, 0, 0x4CF},
    {0x4C1, 0x4C2, 1, 0, 0x436}, {0x4C3, 0x4CD, 2, 1, 1}, {0x4D0, 0x4D3, 1, 0, 0x430}, {0x4D4, 0x4D4, 1, 0, 0x4D5},
    {0x4D6, 0x4D7, 1, 0, 0x435}, {0x4D8, 0x4DA, 2, 0, 0x4D9}, {0x4DB, 0x4DB, 1, 0, 0x4D9}, {0x4DC, 0x4DD, 1, 0, 0x436},
    {0x4DE, 0x4DF, 1, 0, 0x437}, {0x4E0, 0x4E0, 1, 0, 0x4E1}, {0x4E2, 0x4E5, 1, 0, 0x438}, {0x4E6, 0x4E7, 1, 0, 0x43E},
    {0x4E8, 0x4EA, 2, 0, 0x4E9}, {0x4EB, 0x4EB, 1, 0, 0x4E9}, {0x4EC, 0x4ED, 1, 0, 0x44D}, {0x4EE, 0x4F3, 1, 0, 0x443},
    {0x4F4, 0x4F5, 1, 0, 0x447}, {0x4F6, 0x4F6, 1, 0, 0x4F7}, {0x4F8, 0x4F9, 1, 0, 0x44B}, {0x4FA, 0x52E, 2, 1, 1},
    {0x531, 0x556, 1, 1, 48}, {0x622, 0x623, 1, 0, 0x627}, {0x624, 0x624, 1, 0, 0x648}, {0x625, 0x625, 1, 0, 0x627},
    {0x626, 0x626, 1, 0, 0x64A}, {0x6C0, 0x6C0, 1, 0, 0x6D5}, {0x6C2, 0x6C2, 1, 0, 0x6C1}, {0x6D3, 0x6D3, 1, 0, 0x6D2},
    {0x929, 0x929, 1, 0, 0x928}, {0x931, 0x931, 1, 0, 0x930}, {0x934, 0x934, 1, 0, 0x933}, {0x958, 0x95A, 1, 1, -67},
    {0x95B, 0x95B, 1, 0, 0x91C}, {0x95C, 0x95D, 1, 1, -59}, {0x95E, 0x95E, 1, 0, 0x92B}, {0x95F, 0x95F, 1, 0, 0x92F},
    {0x9DC, 0x9DD, 1, 1, -59}, {0x9DF, 0x9DF, 1, 0, 0x9AF}, {0xA33, 0xA33, 1, 0, 0xA32}, {0xA36, 0xA36, 1, 0, 0xA38},
    {0xA59, 0xA5A, 1, 1, -67}, {0xA5B, 0xA5B, 1, 0, 0xA1C}, {0xA5E, 0xA5E, 1, 0, 0xA2B}, {0xB48, 0xB48, 1, 0, 0xB47},
    {0xB5C, 0xB5D, 1, 1, -59}, {0xCC0, 0xCC0, 1, 0, 0xCD5}, {0xCC7, 0xCC8, 1, 1, 14}, {0xCCA, 0xCCA, 1, 0, 0xCC2},
    {0xDDA, 0xDDA, 1, 0, 0xDD9}, {0xF43, 0xF43, 1, 0, 0xF42}, {0xF4D, 0xF4D, 1, 0, 0xF4C}, {0xF52, 0xF52, 1, 0, 0xF51},
    {0xF57, 0xF57, 1, 0, 0xF56}, {0xF5C, 0xF5C, 1, 0, 0xF5B}, {0xF69, 0xF69, 1, 0, 0xF40}, {0x1026, 0x1026, 1, 0, 0x1025},
    {0x10A0, 0x10C5, 1, 1, 7264}, {0x10C7, 0x10C7, 1, 0, 0x2D27}, {0x10CD, 0x10CD, 1, 0, 0x2D2D}, {0x13A0, 0x13EF, 1, 1, 38864},
    {0x13F0, 0x13F5, 1, 1, 8}, {0x1B3B, 0x1B3D, 2, 0, 0x1B35}, {0x1B43, 0x1B43, 1, 0, 0x1B35}, {0x1C90, 0x1CBA, 1, 1, -3008},
    {0x1CBD, 0x1CBF, 1, 1, -3008}, {0x1E00, 0x1E01, 1, 0, 0x61}, {0x1E02, 0x1E07, 1, 0, 0x62}, {0x1E08, 0x1E09, 1, 0, 0x63},
    {0x1E0A, 0x1E13, 1, 0, 0x64}, {0x1E14, 0x1E1D, 1, 0, 0x65}, {0x1E1E, 0x1E1F, 1, 0, 0x66}, {0x1E20, 0x1E21, 1, 0, 0x67},
    {0x1E22, 0x1E2B, 1, 0, 0x68}, {0x1E2C, 0x1E2F, 1, 0, 0x69}, {0x1E30, 0x1E35, 1, 0, 0x6B}, {0x1E36, 0x1E3D, 1, 0, 0x6C},
    {0x1E3E, 0x1E43, 1, 0, 0x6D}, {0x1E44, 0x1E4B, 1, 0, 0x6E}, {0x1E4C, 0x1E53, 1, 0, 0x6F}, {0x1E54, 0x1E57, 1, 0, 0x70},
    {0x1E58, 0x1E5F, 1, 0, 0x72}, {0x1E60, 0x1E69, 1, 0, 0x73}, {0x1E6A, 0x1E71, 1, 0, 0x74}, {0x1E72, 0x1E7B, 1, 0, 0x75},
    {0x1E7C, 0x1E7F, 1, 0, 0x76}, {0x1E80, 0x1E89, 1, 0, 0x77}, {0x1E8A, 0x1E8D, 1, 0, 0x78}, {0x1E8E, 0x1E8F, 1, 0, 0x79},
    {0x1E90, 0x1E95, 1, 0, 0x7A}, {0x1E96, 0x1E96, 1, 0, 0x68}, {0x1E97, 0x1E97, 1, 0, 0x74}, {0x1E98, 0x1E98, 1, 0, 0x77},
    {0x1E99, 0x1E99, 1, 0, 0x79}, {0x1E9B, 0x1E9B, 1, 0, 0x17F}, {0x1E9E, 0x1E9E, 1, 0, 0xDF}, {0x1EA0, 0x1EB7, 1, 0, 0x61},
    {0x1EB8, 0x1EC7, 1, 0, 0x65}, {0x1EC8, 0x1ECB, 1, 0, 0x69}, {0x1ECC, 0x1EE3, 1, 0, 0x6F}, {0x1EE4, 0x1EF1, 1, 0, 0x75},
    {0x1EF2, 0x1EF9, 1, 0, 0x79}, {0x1EFA, 0x1EFE, 2, 1, 1}, {0x1F00, 0x1F0F, 1, 0, 0x3B1}, {0x1F10, 0x1F15, 1, 0, 0x3B5},
    {0x1F18, 0x1F1D, 1, 0, 0x3B5}, {0x1F20, 0x1F2F, 1, 0, 0x3B7}, {0x1F30, 0x1F3F, 1, 0, 0x3B9}, {0x1F40, 0x1F45, 1, 0, 0x3BF},
    {0x1F48, 0x1F4D, 1, 0, 0x3BF}, {0x1F50, 0x1F57, 1, 0, 0x3C5}, {0x1F59, 0x1F5F, 2, 0, 0x3C5}, {0x1F60, 0x1F6F, 1, 0, 0x3C9},
    {0x1F70, 0x1F71, 1, 0, 0x3B1}, {0x1F72, 0x1F73, 1, 0, 0x3B5}, {0x1F74, 0x1F75, 1, 0, 0x3B7}, {0x1F76, 0x1F77, 1, 0, 0x3B9},
    {0x1F78, 0x1F79, 1, 0, 0x3BF}, {0x1F7A, 0x1F7B, 1, 0, 0x3C5}, {0x1F7C, 0x1F7D, 1, 0, 0x3C9}, {0x1F80, 0x1F8F, 1, 0, 0x3B1},
    {0x1F90, 0x1F9F, 1, 0, 0x3B7}, {0x1FA0, 0x1FAF, 1, 0, 0x3C9}, {0x1FB0, 0x1FB4, 1, 0, 0x3B1}, {0x1FB6, 0x1FBC, 1, 0, 0x3B1},
    {0x1FBE, 0x1FBE, 1, 0, 0x3B9}, {0x1FC1, 0x1FC1, 1, 0, 0xA8}, {0x1FC2, 0x1FC4, 1, 0, 0x3B7}, {0x1FC6, 0x1FC7, 1, 0, 0x3B7},
    {0x1FC8, 0x1FC9, 1, 0, 0x3B5}, {0x1FCA, 0x1FCC, 1, 0, 0x3B7}, {0x1FCD, 0x1FCF, 1, 0, 0x1FBF}, {0x1FD0, 0x1FD3, 1, 0, 0x3B9},
    {0x1FD6, 0x1FDB, 1, 0, 0x3B9}, {0x1FDD, 0x1FDF, 1, 0, 0x1FFE}, {0x1FE0, 0x1FE3, 1, 0, 0x3C5}, {0x1FE4, 0x1FE5, 1, 0, 0x3C1},
    {0x1FE6, 0x1FEB, 1, 0, 0x3C5}, {0x1FEC, 0x1FEC, 1, 0, 0x3C1}, {0x1FED, 0x1FEE, 1, 0, 0xA8}, {0x1FEF, 0x1FEF, 1, 0, 0x60},
    {0x1FF2, 0x1FF4, 1, 0, 0x3C9}, {0x1FF6, 0x1FF7, 1, 0, 0x3C9}, {0x1FF8, 0x1FF9, 1, 0, 0x3BF}, {0x1FFA, 0x1FFC, 1, 0, 0x3C9},
    {0x1FFD, 0x1FFD, 1, 0, 0xB4}, {0x2126, 0x2126, 1, 0, 0x3C9}, {0x212A, 0x212A, 1, 0, 0x6B}, {0x212B, 0x212B, 1, 0, 0x61},
    {0x2132, 0x2132, 1, 0, 0x214E}, {0x2160, 0x216F, 1, 1, 16}, {0x2183, 0x2183, 1, 0, 0x2184}, {0x219A, 0x219A, 1, 0, 0x2190},
    {0x219B, 0x219B, 1, 0, 0x2192}, {0x21AE, 0x21AE, 1, 0, 0x2194}, {0x21CD, 0x21CD, 1, 0, 0x21D0}, {0x21CE, 0x21CE, 1, 0, 0x21D4},
    {0x21CF, 0x21CF, 1, 0, 0x21D2}, {0x2204, 0x2204, 1, 0, 0x2203}, {0x2209, 0x2209, 1, 0, 0x2208}, {0x220C, 0x220C, 1, 0, 0x220B},
    {0x2224, 0x2226, 2, 1, -1}, {0x2241, 0x2241, 1, 0, 0x223C}, {0x2244, 0x2244, 1, 0, 0x2243}, {0x2247, 0x2247, 1, 0, 0x2245},
    {0x2249, 0x2249, 1, 0, 0x2248}, {0x2260, 0x2260, 1, 0, 0x3D}, {0x2262, 0x2262, 1, 0, 0x2261}, {0x226D, 0x226D, 1, 0, 0x224D},
    {0x226E, 0x226E, 1, 0, 0x3C}, {0x226F, 0x226F, 1, 0, 0x3E}, {0x2270, 0x2271, 1, 1, -12}, {0x2274, 0x2275, 1, 1, -2},
    {0x2278, 0x2279, 1, 1, -2}, {0x2280, 0x2281, 1, 1, -6}, {0x2284, 0x2285, 1, 1, -2}, {0x2288, 0x2289, 1, 1, -2},
    {0x22AC, 0x22AC, 1, 0, 0x22A2}, {0x22AD, 0x22AE, 1, 1, -5}, {0x22AF, 0x22AF, 1, 0, 0x22AB}, {0x22E0, 0x22E1, 1, 1, -100},
    {0x22E2, 0x22E3, 1, 1, -81}, {0x22EA, 0x22ED, 1, 1, -56}, {0x2329, 0x232A, 1, 1, 3295}, {0x24B6, 0x24CF, 1, 1, 26},
    {0x2ADC, 0x2ADC, 1, 0, 0x2ADD}, {0x2C00, 0x2C2F, 1, 1, 48}, {0x2C60, 0x2C60, 1, 0, 0x2C61}, {0x2C62, 0x2C62, 1, 0, 0x26B},
    {0x2C63, 0x2C63, 1, 0, 0x1D7D}, {0x2C64, 0x2C64, 1, 0, 0x27D}, {0x2C67, 0x2C6B, 2, 1, 1}, {0x2C6D, 0x2C6D, 1, 0, 0x251},
    {0x2C6E, 0x2C6E, 1, 0, 0x271}, {0x2C6F, 0x2C6F, 1, 0, 0x250}, {0x2C70, 0x2C70, 1, 0, 0x252}, {0x2C72, 0x2C72, 1, 0, 0x2C73},
    {0x2C75, 0x2C75, 1, 0, 0x2C76}, {0x2C7E, 0x2C7F, 1, 1, -10815}, {0x2C80, 0x2CE2, 2, 1, 1}, {0x2CEB, 0x2CED, 2, 1, 1},
    {0x2CF2, 0x2CF2, 1, 0, 0x2CF3}, {0x304C, 0x3062, 2, 1, -1}, {0x3065, 0x3069, 2, 1, -1}, {0x3070, 0x3071, 1, 0, 0x306F},
    {0x3073, 0x3074, 1, 0, 0x3072}, {0x3076, 0x3077, 1, 0, 0x3075}, {0x3079, 0x307A, 1, 0, 0x3078}, {0x307C, 0x307D, 1, 0, 0x307B},
    {0x3094, 0x3094, 1, 0, 0x3046}, {0x309E, 0x309E, 1, 0, 0x309D}, {0x30AC, 0x30C2, 2, 1, -1}, {0x30C5, 0x30C9, 2, 1, -1},
    {0x30D0, 0x30D1, 1, 0, 0x30CF}, {0x30D3, 0x30D4, 1, 0, 0x30D2}, {0x30D6, 0x30D7, 1, 0, 0x30D5}, {0x30D9, 0x30DA, 1, 0, 0x30D8},
    {0x30DC, 0x30DD, 1, 0, 0x30DB}, {0x30F4, 0x30F4, 1, 0, 0x30A6}, {0x30F7, 0x30FA, 1, 1, -8}, {0x30FE, 0x30FE, 1, 0, 0x30FD},
    {0xA640, 0xA66C, 2, 1, 1}, {0xA680, 0xA69A, 2, 1, 1}, {0xA722, 0xA72E, 2, 1, 1}, {0xA732, 0xA76E, 2, 1, 1},
    {0xA779, 0xA77B, 2, 1, 1}, {0xA77D, 0xA77D, 1, 0, 0x1D79}, {0xA77E, 0xA786, 2, 1, 1}, {0xA78B, 0xA78B, 1, 0, 0xA78C},
    {0xA78D, 0xA78D, 1, 0, 0x265}, {0xA790, 0xA792, 2, 1, 1}, {0xA796, 0xA7A8, 2, 1, 1}, {0xA7AA, 0xA7AA, 1, 0, 0x266},
    {0xA7AB, 0xA7AB, 1, 0, 0x25C}, {0xA7AC, 0xA7AC, 1, 0, 0x261}, {0xA7AD, 0xA7AD, 1, 0, 0x26C}, {0xA7AE, 0xA7AE, 1, 0, 0x26A},
    {0xA7B0, 0xA7B0, 1, 0, 0x29E}, {0xA7B1, 0xA7B1, 1, 0, 0x287}, {0xA7B2, 0xA7B2, 1, 0, 0x29D}, {0xA7B3, 0xA7B3, 1, 0, 0xAB53},
    {0xA7B4, 0xA7C2, 2, 1, 1}, {0xA7C4, 0xA7C4, 1, 0, 0xA794}, {0xA7C5, 0xA7C5, 1, 0, 0x282}, {0xA7C6, 0xA7C6, 1, 0, 0x1D8E},
    {0xA7C7, 0xA7C9, 2, 1, 1}, {0xA7D0, 0xA7D0, 1, 0, 0xA7D1}, {0xA7D6, 0xA7D8, 2, 1, 1}, {0xA7F5, 0xA7F5, 1, 0, 0xA7F6},
    {0xFB1D, 0xFB1D, 1, 0, 0x5D9}, {0xFB1F, 0xFB1F, 1, 0, 0x5F2}, {0xFB2A, 0xFB2D, 1, 0, 0x5E9}, {0xFB2E, 0xFB30, 1, 0, 0x5D0},
    {0xFB31, 0xFB36, 1, 1, -62816}, {0xFB38, 0xFB3C, 1, 1, -62816}, {0xFB3E, 0xFB40, 2, 1, -62816}, {0xFB41, 0xFB43, 2, 1, -62816},
    {0xFB44, 0xFB46, 2, 1, -62816}, {0xFB47, 0xFB4A, 1, 1, -62816}, {0xFB4B, 0xFB4B, 1, 0, 0x5D5}, {0xFB4C, 0xFB4C, 1, 0, 0x5D1},
    {0xFB4D, 0xFB4D, 1, 0, 0x5DB}, {0xFB4E, 0xFB4E, 1, 0, 0x5E4}, {0xFF21, 0xFF3A, 1, 1, 32}, {0x10400, 0x10427, 1, 1, 40},
    {0x104B0, 0x104D3, 1, 1, 40}, {0x10570, 0x1057A, 1, 1, 39}, {0x1057C, 0x1058A, 1, 1, 39}, {0x1058C, 0x10592, 1, 1, 39},
    {0x10594, 0x10595, 1, 1, 39}, {0x10C80, 0x10CB2, 1, 1, 64}, {0x1109A, 0x1109C, 2, 1, -1}, {0x110AB, 0x110AB, 1, 0, 0x110A5},
    {0x114BB, 0x114BB, 1, 0, 0x114B9}, {0x118A0, 0x118BF, 1, 1, 32}, {0x16E40, 0x16E5F, 1, 1, 32}, {0x1E900, 0x1E921, 1, 1, 34}
};

/* Uncased forms of two or three characters, sorted by code point. */
static const codir__fold_multi codir__fold_multis[43] = {
    {0x9CB, {0x9C7, 0x9BE, 0x0}}, {0x9CC, {0x9C7, 0x9D7, 0x0}}, {0xB4B, {0xB47, 0xB3E, 0x0}},
    {0xB4C, {0xB47, 0xB57, 0x0}}, {0xB94, {0xB92, 0xBD7, 0x0}}, {0xBCA, {0xBC6, 0xBBE, 0x0}},
    {0xBCB, {0xBC7, 0xBBE, 0x0}}, {0xBCC, {0xBC6, 0xBD7, 0x0}}, {0xCCB, {0xCC2, 0xCD5, 0x0}},
    {0xD4A, {0xD46, 0xD3E, 0x0}}, {0xD4B, {0xD47, 0xD3E, 0x0}}, {0xD4C, {0xD46, 0xD57, 0x0}},
    {0xDDC, {0xDD9, 0xDCF, 0x0}}, {0xDDD, {0xDD9, 0xDCF, 0x0}}, {0xDDE, {0xDD9, 0xDDF, 0x0}},
    {0x1B06, {0x1B05, 0x1B35, 0x0}}, {0x1B08, {0x1B07, 0x1B35, 0x0}}, {0x1B0A, {0x1B09, 0x1B35, 0x0}},
    {0x1B0C, {0x1B0B, 0x1B35, 0x0}}, {0x1B0E, {0x1B0D, 0x1B35, 0x0}}, {0x1B12, {0x1B11, 0x1B35, 0x0}},
    {0x1B40, {0x1B3E, 0x1B35, 0x0}}, {0x1B41, {0x1B3F, 0x1B35, 0x0}}, {0x1134B, {0x11347, 0x1133E, 0x0}},
    {0x1134C, {0x11347, 0x11357, 0x0}}, {0x114BC, {0x114B9, 0x114B0, 0x0}}, {0x114BE, {0x114B9, 0x114BD, 0x0}},
    {0x115BA, {0x115B8, 0x115AF, 0x0}}, {0x115BB, {0x115B9, 0x115AF, 0x0}}, {0x11938, {0x11935, 0x11930, 0x0}},
    {0x1D15E, {0x1D157, 0x1D165, 0x0}}, {0x1D15F, {0x1D158, 0x1D165, 0x0}}, {0x1D160, {0x1D158, 0x1D165, 0x1D16E}},
    {0x1D161, {0x1D158, 0x1D165, 0x1D16F}}, {0x1D162, {0x1D158, 0x1D165, 0x1D170}}, {0x1D163, {0x1D158, 0x1D165, 0x1D171}},
    {0x1D164, {0x1D158, 0x1D165, 0x1D172}}, {0x1D1BB, {0x1D1B9, 0x1D165, 0x0}}, {0x1D1BC, {0x1D1BA, 0x1D165, 0x0}},
    {0x1D1BD, {0x1D1B9, 0x1D165, 0x1D16E}}, {0x1D1BE, {0x1D1BA, 0x1D165, 0x1D16E}}, {0x1D1BF, {0x1D1B9, 0x1D165, 0x1D16F}},
    {0x1D1C0, {0x1D1BA, 0x1D165, 0x1D16F}}
};

/* Uncased forms of U+F900..U+FAD9 (CJK Compatibility Ideographs), 0 for unchanged. */
static const uint32_t codir__fold_cjk_f900[474] = {
    0x8C48, 0x66F4, 0x8ECA, 0x8CC8, 0x6ED1, 0x4E32, 0x53E5, 0x9F9C,
    0x9F9C, 0x5951, 0x91D1, 0x5587, 0x5948, 0x61F6, 0x7669, 0x7F85,
    0x863F, 0x87BA, 0x88F8, 0x908F, 0x6A02, 0x6D1B, 0x70D9, 0x73DE,
    0x843D, 0x916A, 0x99F1, 0x4E82, 0x5375, 0x6B04, 0x721B, 0x862D,
    0x9E1E, 0x5D50, 0x6FEB, 0x85CD, 0x8964, 0x62C9, 0x81D8, 0x881F,
    0x5ECA, 0x6717, 0x6D6A, 0x72FC, 0x90CE, 0x4F86, 0x51B7, 0x52DE,
    0x64C4, 0x6AD3, 0x7210, 0x76E7, 0x8001, 0x8606, 0x865C, 0x8DEF,
    0x9732, 0x9B6F, 0x9DFA, 0x788C, 0x797F, 0x7DA0, 0x83C9, 0x9304,
    0x9E7F, 0x8AD6, 0x58DF, 0x5F04, 0x7C60, 0x807E, 0x7262, 0x78CA,
    0x8CC2, 0x96F7, 0x58D8, 0x5C62, 0x6A13, 0x6DDA, 0x6F0F, 0x7D2F,
    0x7E37, 0x964B, 0x52D2, 0x808B, 0x51DC, 0x51CC, 0x7A1C, 0x7DBE,
    0x83F1, 0x9675, 0x8B80, 0x62CF, 0x6A02, 0x8AFE, 0x4E39, 0x5BE7,
    0x6012, 0x7387, 0x7570, 0x5317, 0x78FB, 0x4FBF, 0x5FA9, 0x4E0D,
    0x6CCC, 0x6578, 0x7D22, 0x53C3, 0x585E, 0x7701, 0x8449, 0x8AAA,
    0x6BBA, 0x8FB0, 0x6C88, 0x62FE, 0x82E5, 0x63A0, 0x7565, 0x4EAE,
    0x5169, 0x51C9, 0x6881, 0x7CE7, 0x826F, 0x8AD2, 0x91CF, 0x52F5,
    0x5442, 0x5973, 0x5EEC, 0x65C5, 0x6FFE, 0x792A, 0x95AD, 0x9A6A,
    0x9E97, 0x9ECE, 0x529B, 0x66C6, 0x6B77, 0x8F62, 0x5E74, 0x6190,
    0x6200, 0x649A, 0x6F23, 0x7149, 0x7489, 0x79CA, 0x7DF4, 0x806F,
    0x8F26, 0x84EE, 0x9023, 0x934A, 0x5217, 0x52A3, 0x54BD, 0x70C8,
    0x88C2, 0x8AAA, 0x5EC9, 0x5FF5, 0x637B, 0x6BAE, 0x7C3E, 0x7375,
    0x4EE4, 0x56F9, 0x5BE7, 0x5DBA, 0x601C, 0x73B2, 0x7469, 0x7F9A,
    0x8046, 0x9234, 0x96F6, 0x9748, 0x9818, 0x4F8B, 0x79AE, 0x91B4,
    0x96B8, 0x60E1, 0x4E86, 0x50DA, 0x5BEE, 0x5C3F, 0x6599, 0x6A02,
    0x71CE, 0x7642, 0x84FC, 0x907C, 0x9F8D, 0x6688, 0x962E, 0x5289,
    0x677B, 0x67F3, 0x6D41, 0x6E9C, 0x7409, 0x7559, 0x786B, 0x7D10,
    0x985E, 0x516D, 0x622E, 0x9678, 0x502B, 0x5D19, 0x6DEA, 0x8F2A,
    0x5F8B, 0x6144, 0x6817, 0x7387, 0x9686, 0x5229, 0x540F, 0x5C65,
    0x6613, 0x674E, 0x68A8, 0x6CE5, 0x7406, 0x75E2, 0x7F79, 0x88CF,
    0x88E1, 0x91CC, 0x96E2, 0x533F, 0x6EBA, 0x541D, 0x71D0, 0x7498,
    0x85FA, 0x96A3, 0x9C57, 0x9E9F, 0x6797, 0x6DCB, 0x81E8, 0x7ACB,
    0x7B20, 0x7C92, 0x72C0, 0x7099, 0x8B58, 0x4EC0, 0x8336, 0x523A,
    0x5207, 0x5EA6, 0x62D3, 0x7CD6, 0x5B85, 0x6D1E, 0x66B4, 0x8F3B,
    0x884C, 0x964D, 0x898B, 0x5ED3, 0x5140, 0x55C0, 0x0, 0x0,
    0x585A, 0x0, 0x6674, 0x0, 0x0, 0x51DE, 0x732A, 0x76CA,
    0x793C, 0x795E, 0x7965, 0x798F, 0x9756, 0x7CBE, 0x7FBD, 0x0,
    0x8612, 0x0, 0x8AF8, 0x0, 0x0, 0x9038, 0x90FD, 0x0,
    0x0, 0x0, 0x98EF, 0x98FC, 0x9928, 0x9DB4, 0x90DE, 0x96B7,
    0x4FAE, 0x50E7, 0x514D, 0x52C9, 0x52E4, 0x5351, 0x559D, 0x5606,
    0x5668, 0x5840, 0x58A8, 0x5C64, 0x5C6E, 0x6094, 0x6168, 0x618E,
    0x61F2, 0x654F, 0x65E2, 0x6691, 0x6885, 0x6D77, 0x6E1A, 0x6F22,
    0x716E, 0x722B, 0x7422, 0x7891, 0x793E, 0x7949, 0x7948, 0x7950,
    0x7956, 0x795D, 0x798D, 0x798E, 0x7A40, 0x7A81, 0x7BC0, 0x7DF4,
    0x7E09, 0x7E41, 0x7F72, 0x8005, 0x81ED, 0x8279, 0x8279, 0x8457,
    0x8910, 0x8996, 0x8B01, 0x8B39, 0x8CD3, 0x8D08, 0x8FB6, 0x9038,
    0x96E3, 0x97FF, 0x983B, 0x6075, 0x242EE, 0x8218, 0x0, 0x0,
    0x4E26, 0x51B5, 0x5168, 0x4F80, 0x5145, 0x5180, 0x52C7, 0x52FA,
    0x559D, 0x5555, 0x5599, 0x55E2, 0x585A, 0x58B3, 0x5944, 0x5954,
    0x5A62, 0x5B28, 0x5ED2, 0x5ED9, 0x5F69, 0x5FAD, 0x60D8, 0x614E,
    0x6108, 0x618E, 0x6160, 0x61F2, 0x6234, 0x63C4, 0x641C, 0x6452,
    0x6556, 0x6674, 0x6717, 0x671B, 0x6756, 0x6B79, 0x6BBA, 0x6D41,
    0x6EDB, 0x6ECB, 0x6F22, 0x701E, 0x716E, 0x77A7, 0x7235, 0x72AF,
    0x732A, 0x7471, 0x7506, 0x753B, 0x761D, 0x761F, 0x76CA, 0x76DB,
    0x76F4, 0x774A, 0x7740, 0x78CC, 0x7AB1, 0x7BC0, 0x7C7B, 0x7D5B,
    0x7DF4, 0x7F3E, 0x8005, 0x8352, 0x83EF, 0x8779, 0x8941, 0x8986,
    0x8996, 0x8ABF, 0x8AF8, 0x8ACB, 0x8B01, 0x8AFE, 0x8AED, 0x8B39,
    0x8B8A, 0x8D08, 0x8F38, 0x9072, 0x9199, 0x9276, 0x967C, 0x96E3,
    0x9756, 0x97DB, 0x97FF, 0x980B, 0x983B, 0x9B12, 0x9F9C, 0x2284A,
    0x22844, 0x233D5, 0x3B9D, 0x4018, 0x4039, 0x25249, 0x25CD0, 0x27ED3,
    0x9F43, 0x9F8E
};

/* Uncased forms of U+2F800..U+2FA1D (CJK Compatibility Ideographs Supplement). */
static const uint32_t codir__fold_cjk_2f800[542] = {
    0x4E3D, 0x4E38, 0x4E41, 0x20122, 0x4F60, 0x4FAE, 0x4FBB, 0x5002,
    0x507A, 0x5099, 0x50E7, 0x50CF, 0x349E, 0x2063A, 0x514D, 0x5154,
    0x5164, 0x5177, 0x2051C, 0x34B9, 0x5167, 0x518D, 0x2054B, 0x5197,
    0x51A4, 0x4ECC, 0x51AC, 0x51B5, 0x291DF, 0x51F5, 0x5203, 0x34DF,
    0x523B, 0x5246, 0x5272, 0x5277, 0x3515, 0x52C7, 0x52C9, 0x52E4,
    0x52FA, 0x5305, 0x5306, 0x5317, 0x5349, 0x5351, 0x535A, 0x5373,
    0x537D, 0x537F, 0x537F, 0x537F, 0x20A2C, 0x7070, 0x53CA, 0x53DF,
    0x20B63, 0x53EB, 0x53F1, 0x5406, 0x549E, 0x5438, 0x5448, 0x5468,
    0x54A2, 0x54F6, 0x5510, 0x5553, 0x5563, 0x5584, 0x5584, 0x5599,
    0x55AB, 0x55B3, 0x55C2, 0x5716, 0x5606, 0x5717, 0x5651, 0x5674,
    0x5207, 0x58EE, 0x57CE, 0x57F4, 0x580D, 0x578B, 0x5832, 0x5831,
    0x58AC, 0x214E4, 0x58F2, 0x58F7, 0x5906, 0x591A, 0x5922, 0x5962,
    0x216A8, 0x216EA, 0x59EC, 0x5A1B, 0x5A27, 0x59D8, 0x5A66, 0x36EE,
    0x36FC, 0x5B08, 0x5B3E, 0x5B3E, 0x219C8, 0x5BC3, 0x5BD8, 0x5BE7,
    0x5BF3, 0x21B18, 0x5BFF, 0x5C06, 0x5F53, 0x5C22, 0x3781, 0x5C60,
    0x5C6E, 0x5CC0, 0x5C8D, 0x21DE4, 0x5D43, 0x21DE6, 0x5D6E, 0x5D6B,
    0x5D7C, 0x5DE1, 0x5DE2, 0x382F, 0x5DFD, 0x5E28, 0x5E3D, 0x5E69,
    0x3862, 0x22183, 0x387C, 0x5EB0, 0x5EB3, 0x5EB6, 0x5ECA, 0x2A392,
    0x5EFE, 0x22331, 0x22331, 0x8201, 0x5F22, 0x5F22, 0x38C7, 0x232B8,
    0x261DA, 0x5F62, 0x5F6B, 0x38E3, 0x5F9A, 0x5FCD, 0x5FD7, 0x5FF9,
    0x6081, 0x393A, 0x391C, 0x6094, 0x226D4, 0x60C7, 0x6148, 0x614C,
    0x614E, 0x614C, 0x617A, 0x618E, 0x61B2, 0x61A4, 0x61AF, 0x61DE,
    0x61F2, 0x61F6, 0x6210, 0x621B, 0x625D, 0x62B1, 0x62D4, 0x6350,
    0x22B0C, 0x633D, 0x62FC, 0x6368, 0x6383, 0x63E4, 0x22BF1, 0x6422,
    0x63C5, 0x63A9, 0x3A2E, 0x6469, 0x647E, 0x649D, 0x6477, 0x3A6C,
    0x654F, 0x656C, 0x2300A, 0x65E3, 0x66F8, 0x6649, 0x3B19, 0x6691,
    0x3B08, 0x3AE4, 0x5192, 0x5195, 0x6700, 0x669C, 0x80AD, 0x43D9,
    0x6717, 0x671B, 0x6721, 0x675E, 0x6753, 0x233C3, 0x3B49, 0x67FA,
    0x6785, 0x6852, 0x6885, 0x2346D, 0x688E, 0x681F, 0x6914, 0x3B9D,
    0x6942, 0x69A3, 0x69EA, 0x6AA8, 0x236A3, 0x6ADB, 0x3C18, 0x6B21,
    0x238A7, 0x6B54, 0x3C4E, 0x6B72, 0x6B9F, 0x6BBA, 0x6BBB, 0x23A8D,
    0x21D0B, 0x23AFA, 0x6C4E, 0x23CBC, 0x6CBF, 0x6CCD, 0x6C67, 0x6D16,
    0x6D3E, 0x6D77, 0x6D41, 0x6D69, 0x6D78, 0x6D85, 0x23D1E, 0x6D34,
    0x6E2F, 0x6E6E, 0x3D33, 0x6ECB, 0x6EC7, 0x23ED1, 0x6DF9, 0x6F6E,
    0x23F5E, 0x23F8E, 0x6FC6, 0x7039, 0x701E, 0x701B, 0x3D96, 0x704A,
    0x707D, 0x7077, 0x70AD, 0x20525, 0x7145, 0x24263, 0x719C, 0x243AB,
    0x7228, 0x7235, 0x7250, 0x24608, 0x7280, 0x7295, 0x24735, 0x24814,
    0x737A, 0x738B, 0x3EAC, 0x73A5, 0x3EB8, 0x3EB8, 0x7447, 0x745C,
    0x7471, 0x7485, 0x74CA, 0x3F1B, 0x7524, 0x24C36, 0x753E, 0x24C92,
    0x7570, 0x2219F, 0x7610, 0x24FA1, 0x24FB8, 0x25044, 0x3FFC, 0x4008,
    0x76F4, 0x250F3, 0x250F2, 0x25119, 0x25133, 0x771E, 0x771F, 0x771F,
    0x774A, 0x4039, 0x778B, 0x4046, 0x4096, 0x2541D, 0x784E, 0x788C,
    0x78CC, 0x40E3, 0x25626, 0x7956, 0x2569A, 0x256C5, 0x798F, 0x79EB,
    0x412F, 0x7A40, 0x7A4A, 0x7A4F, 0x2597C, 0x25AA7, 0x25AA7, 0x7AEE,
    0x4202, 0x25BAB, 0x7BC6, 0x7BC9, 0x4227, 0x25C80, 0x7CD2, 0x42A0,
    0x7CE8, 0x7CE3, 0x7D00, 0x25F86, 0x7D63, 0x4301, 0x7DC7, 0x7E02,
    0x7E45, 0x4334, 0x26228, 0x26247, 0x4359, 0x262D9, 0x7F7A, 0x2633E,
    0x7F95, 0x7FFA, 0x8005, 0x264DA, 0x26523, 0x8060, 0x265A8, 0x8070,
    0x2335F, 0x43D5, 0x80B2, 0x8103, 0x440B, 0x813E, 0x5AB5, 0x267A7,
    0x267B5, 0x23393, 0x2339C, 0x8201, 0x8204, 0x8F9E, 0x446B, 0x8291,
    0x828B, 0x829D, 0x52B3, 0x82B1, 0x82B3, 0x82BD, 0x82E6, 0x26B3C,
    0x82E5, 0x831D, 0x8363, 0x83AD, 0x8323, 0x83BD, 0x83E7, 0x8457,
    0x8353, 0x83CA, 0x83CC, 0x83DC, 0x26C36, 0x26D6B, 0x26CD5, 0x452B,
    0x84F1, 0x84F3, 0x8516, 0x273CA, 0x8564, 0x26F2C, 0x455D, 0x4561,
    0x26FB1, 0x270D2, 0x456B, 0x8650, 0x865C, 0x8667, 0x8669, 0x86A9,
    0x8688, 0x870E, 0x86E2, 0x8779, 0x8728, 0x876B, 0x8786, 0x45D7,
    0x87E1, 0x8801, 0x45F9, 0x8860, 0x8863, 0x27667, 0x88D7, 0x88DE,
    0x4635, 0x88FA, 0x34BB, 0x278AE, 0x27966, 0x46BE, 0x46C7, 0x8AA0,
    0x8AED, 0x8B8A, 0x8C55, 0x27CA8, 0x8CAB, 0x8CC1, 0x8D1B, 0x8D77,
    0x27F2F, 0x20804, 0x8DCB, 0x8DBC, 0x8DF0, 0x208DE, 0x8ED4, 0x8F38,
    0x285D2, 0x285ED, 0x9094, 0x90F1, 0x9111, 0x2872E, 0x911B, 0x9238,
    0x92D7, 0x92D8, 0x927C, 0x93F9, 0x9415, 0x28BFA, 0x958B, 0x4995,
    0x95B7, 0x28D77, 0x49E6, 0x96C3, 0x5DB2, 0x9723, 0x29145, 0x2921A,
    0x4A6E, 0x4A76, 0x97E0, 0x2940A, 0x4AB2, 0x29496, 0x980B, 0x980B,
    0x9829, 0x295B6, 0x98E2, 0x4B33, 0x9929, 0x99A7, 0x99C2, 0x99FE,
    0x4BCE, 0x29B30, 0x9B12, 0x9C40, 0x9CFD, 0x4CCE, 0x4CED, 0x9D67,
    0x2A0CE, 0x4CF8, 0x2A105, 0x2A20E, 0x2A291, 0x9EBB, 0x4D56, 0x9EF9,
    0x9EFE, 0x9F05, 0x9F0F, 0x9F16, 0x9F3B, 0x2A600
};

/* END UNICODE TABLES */

static int codir__char_class(uint32_t cp)
{
    size_t low = 0, high = sizeof codir__class_runs / sizeof codir__class_runs[0];

    /* ASCII letters, digits and space first: they are most of the text. */
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9')) return CODIR__CHAR_OTHER;
    if (cp == ' ') return CODIR__CHAR_SPACE;

    /* Binary search for the last run that starts at or before cp. */
    while (low < high) {
        size_t mid = low + (high - low) / 2;
        if (codir__class_runs[mid].first <= cp) low = mid + 1;
        else high = mid;
    }
    if (low == 0 || cp > codir__class_runs[low - 1].last) return CODIR__CHAR_OTHER;
    return codir__class_runs[low - 1].char_class;
}

/* Writes the uncased form of cp (up to 3 characters) to out and returns its length,
   0 for a character of category Mn.
   NOTE: characters are mapped one at a time, so NFD's canonical reordering is left
   out. After Mn is dropped it could only reorder adjacent characters among 25 Mc
   characters with a nonzero combining class (such as U+1D165 and U+1D16D). */
static int codir__uncased_form(uint32_t cp, uint32_t *out)
{
    size_t low = 0, high = sizeof codir__fold_runs / sizeof codir__fold_runs[0], i;

    if (cp < 0x80) {
        out[0] = cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
        return 1;
    }
    if (cp - CODIR__HANGUL_FIRST < CODIR__HANGUL_COUNT) {
        uint32_t index = cp - CODIR__HANGUL_FIRST, trail = index % CODIR__HANGUL_TRAILS;
        out[0] = 0x1100 + index / CODIR__HANGUL_VOWELS_TIMES_TRAILS;
        out[1] = 0x1161 + (index % CODIR__HANGUL_VOWELS_TIMES_TRAILS) / CODIR__HANGUL_TRAILS;
        if (trail == 0) return 2;
        out[2] = 0x11A7 + trail;
        return 3;
    }
    if (codir__char_class(cp) == CODIR__CHAR_MARK) return 0;
    if (cp - 0xF900u < sizeof codir__fold_cjk_f900 / sizeof codir__fold_cjk_f900[0]) {
        out[0] = codir__fold_cjk_f900[cp - 0xF900u] ? codir__fold_cjk_f900[cp - 0xF900u] : cp;
        return 1;
    }
    if (cp - 0x2F800u < sizeof codir__fold_cjk_2f800 / sizeof codir__fold_cjk_2f800[0]) {
        out[0] = codir__fold_cjk_2f800[cp - 0x2F800u];
        return 1;
    }
    for (i = 0; i < sizeof codir__fold_multis / sizeof codir__fold_multis[0]; i++) {
        if (codir__fold_multis[i].cp == cp) {
            int n = 0;
            while (n < 3 && codir__fold_multis[i].out[n]) {
                out[n] = codir__fold_multis[i].out[n];
                n++;
            }
            return n;
        }
        if (codir__fold_multis[i].cp > cp) break;  /* sorted by cp */
    }

    out[0] = cp;
    while (low < high) {
        size_t mid = low + (high - low) / 2;
        if (codir__fold_runs[mid].first <= cp) low = mid + 1;
        else high = mid;
    }
    if (low > 0) {
        const codir__fold_run *run = &codir__fold_runs[low - 1];
        if (cp <= run->last && (cp - run->first) % run->stride == 0)
            out[0] = run->is_delta ? (uint32_t)((int32_t)cp + run->value) : (uint32_t)run->value;
    }
    return 1;
}

/* ===================================================================================
   9. Batches (implementation)
   =================================================================================== */

CODIR_DEF codir_encoded *codir_encode_dataset(const codir_vocab *vocab, const codir_dataset *data, int max_len)
{
    codir_encoded *enc;
    size_t rows = (size_t)(data->count ? data->count : 1);
    int i, pairs = data->texts_b != NULL;
    if (max_len < (pairs ? 3 : 2)) {
        codir__fail(CODIR_ERR_INVALID, "max_len %d cannot hold the special tokens of %s", max_len,
                    pairs ? "a sentence pair ([CLS] and two [SEP])" : "a sentence ([CLS] and [SEP])");
        return NULL;
    }
    enc = (codir_encoded *)codir__calloc(1, sizeof *enc);
    if (!enc) return NULL;
    enc->count = data->count;
    enc->max_len = max_len;
    enc->num_classes = data->num_classes;
    enc->lengths = (int *)codir__calloc(rows, sizeof(int));
    enc->labels = (int *)codir__calloc(rows, sizeof(int));
    enc->ids = (int *)codir__calloc(rows, (size_t)max_len * sizeof(int));
    if (pairs) enc->types = (int *)codir__calloc(rows, (size_t)max_len * sizeof(int));
    if (data->targets) enc->targets = (float *)codir__calloc(rows, sizeof(float));
    if (!enc->lengths || !enc->labels || !enc->ids || (pairs && !enc->types) || (data->targets && !enc->targets))
        goto fail;
    for (i = 0; i < data->count; i++) {
        int *ids = enc->ids + (size_t)i * max_len;
        int n = pairs ? codir_encode_pair(vocab, data->texts[i], data->texts_b[i], ids,
                                          enc->types + (size_t)i * max_len, max_len)
                      : codir_encode(vocab, data->texts[i], ids, max_len);
        if (n < 0) {
            codir__fail(n, "example %d: %s", i, codir_last_error());
            goto fail;
        }
        enc->lengths[i] = n;
        enc->labels[i] = data->labels[i];
        if (enc->targets) enc->targets[i] = data->targets[i];
    }
    return enc;

fail:
    codir_encoded_free(enc);
    return NULL;
}

CODIR_DEF void codir_encoded_free(codir_encoded *enc)
{
    if (!enc) return;
    codir__free(enc->lengths);
    codir__free(enc->labels);
    codir__free(enc->ids);
    codir__free(enc->types);
    codir__free(enc->targets);
    codir__free(enc);
}

/* Points t at data as a tensor of the given rank and shape. */
static void codir__itensor_view(codir_itensor *t, int *data, int ndim, int d0, int d1)
{
    t->data = data;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = ndim > 1 ? d1 : 1;
    t->shape[2] = t->shape[3] = 1;
    t->numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1);
}

CODIR_DEF int codir_batch_init(codir_batch *batch, int max_batch, int max_len)
{
    size_t n;
    memset(batch, 0, sizeof *batch);
    if (max_batch < 1 || max_len < 1)
        return codir__fail(CODIR_ERR_INVALID, "batch size %d and length %d must be positive", max_batch, max_len);
    if (!codir__size_mul((size_t)max_batch, (size_t)max_len, &n))
        return codir__fail(CODIR_ERR_OVERFLOW, "batch of %d x %d overflows size_t", max_batch, max_len);
    batch->ids.data = (int *)codir__calloc(n, sizeof(int));
    batch->types.data = (int *)codir__calloc(n, sizeof(int));
    batch->mask.data = (int *)codir__calloc(n, sizeof(int));
    batch->labels.data = (int *)codir__calloc((size_t)max_batch, sizeof(int));
    batch->example_ids.data = (int *)codir__calloc((size_t)max_batch, sizeof(int));
    batch->targets = (float *)codir__calloc((size_t)max_batch, sizeof(float));
    if (!batch->ids.data || !batch->types.data || !batch->mask.data || !batch->labels.data ||
        !batch->example_ids.data || !batch->targets) {
        codir_batch_free(batch);
        return CODIR_ERR_NOMEM;
    }
    batch->capacity_batch = max_batch;
    batch->capacity_seq = max_len;
    return CODIR_OK;
}

CODIR_DEF void codir_batch_free(codir_batch *batch)
{
    codir__free(batch->ids.data);
    codir__free(batch->types.data);
    codir__free(batch->mask.data);
    codir__free(batch->labels.data);
    codir__free(batch->example_ids.data);
    codir__free(batch->targets);
    memset(batch, 0, sizeof *batch);
}

CODIR_DEF int codir_batch_fill(codir_batch *batch, const codir_encoded *enc, const int *order, int start, int count)
{
    int b, t, T = 1;
    if (count < 1 || count > batch->capacity_batch)
        return codir__fail(CODIR_ERR_INVALID, "batch of %d examples does not fit the capacity of %d", count,
                           batch->capacity_batch);
    if (start < 0 || start > enc->count - count)
        return codir__fail(CODIR_ERR_INVALID, "examples %d..%d are outside the data set of %d", start,
                           start + count - 1, enc->count);

    /* Pad to the longest sequence of this batch, not to max_len. */
    for (b = 0; b < count; b++) {
        int e = order ? order[start + b] : start + b;
        if (e < 0 || e >= enc->count) return codir__fail(CODIR_ERR_INVALID, "example id %d is out of range", e);
        if (enc->lengths[e] > T) T = enc->lengths[e];
    }
    if (T > batch->capacity_seq)
        return codir__fail(CODIR_ERR_INVALID, "sequence of %d tokens exceeds the batch capacity of %d", T,
                           batch->capacity_seq);
    for (b = 0; b < count; b++) {
        int e = order ? order[start + b] : start + b;
        const int *src = enc->ids + (size_t)e * enc->max_len;
        const int *types = enc->types ? enc->types + (size_t)e * enc->max_len : NULL;
        for (t = 0; t < T; t++) {
            int real = t < enc->lengths[e];
            batch->ids.data[b * T + t] = real ? src[t] : 0;
            batch->types.data[b * T + t] = real && types ? types[t] : 0;
            batch->mask.data[b * T + t] = real;
        }
        batch->labels.data[b] = enc->labels ? enc->labels[e] : 0;
        batch->targets[b] = enc->targets ? enc->targets[e] : 0.0f;
        batch->example_ids.data[b] = e;
    }
    batch->batch = count;
    batch->seq = T;
    codir__itensor_view(&batch->ids, batch->ids.data, 2, count, T);
    codir__itensor_view(&batch->types, batch->types.data, 2, count, T);
    codir__itensor_view(&batch->mask, batch->mask.data, 2, count, T);
    codir__itensor_view(&batch->labels, batch->labels.data, 1, count, 1);
    codir__itensor_view(&batch->example_ids, batch->example_ids.data, 1, count, 1);
    return CODIR_OK;
}

CODIR_DEF void codir_shuffle(int *order, int n, uint64_t *rng)
{
    int i;
    for (i = n - 1; i > 0; i--) {
        int j = (int)(codir__splitmix64(rng) % (uint64_t)(i + 1));
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
}

CODIR_DEF int codir_bucket_by_length(int *order, int n, const codir_encoded *enc, int window, int batch_size,
                                     uint64_t *rng)
{
    int lo, i, j, num_batches;
    if (window < 1 || batch_size < 1)
        return codir__fail(CODIR_ERR_INVALID, "bucket window %d and batch size %d must be positive", window, batch_size);

    /* Insertion sort by length inside each window: windows are small and lengths few. */
    for (lo = 0; lo < n; lo += window) {
        int hi = lo + window < n ? lo + window : n;
        for (i = lo + 1; i < hi; i++) {
            int e = order[i];
            for (j = i; j > lo && enc->lengths[order[j - 1]] > enc->lengths[e]; j--) order[j] = order[j - 1];
            order[j] = e;
        }
    }

    /* Shuffle whole batches (the last, partial batch stays last). */
    num_batches = n / batch_size;
    for (i = num_batches - 1; i > 0; i--) {
        int k = (int)(codir__splitmix64(rng) % (uint64_t)(i + 1)), t;
        for (j = 0; j < batch_size; j++) {
            t = order[i * batch_size + j];
            order[i * batch_size + j] = order[k * batch_size + j];
            order[k * batch_size + j] = t;
        }
    }
    return CODIR_OK;
}

/* ===================================================================================
   10. Training loop (implementation)
   =================================================================================== */

/* Returns the name of the first parameter with a NaN or Inf gradient, or NULL. */
static const char *codir__nonfinite_grad(const codir_params *params)
{
    int i;
    size_t k;
    for (i = 0; i < params->num_tensors; i++) {
        const codir_tensor *t = &params->tensors[i];
        for (k = 0; k < t->numel; k++)
            if (!isfinite(t->grad[k])) return t->name;
    }
    return NULL;
}

/* Returns CODIR_ERR_NONFINITE naming the term if a loss term is NaN or Inf. */
static int codir__check_terms(const codir_loss_terms *terms, uint64_t step)
{
    if (!isfinite(terms->task)) return codir__fail(CODIR_ERR_NONFINITE, "step %llu: task loss is %g", (unsigned long long)step, terms->task);
    if (!isfinite(terms->kd)) return codir__fail(CODIR_ERR_NONFINITE, "step %llu: KD loss is %g", (unsigned long long)step, terms->kd);
    if (!isfinite(terms->crd))
        return codir__fail(CODIR_ERR_NONFINITE, "step %llu: contrastive loss is %g", (unsigned long long)step, terms->crd);
    return CODIR_OK;
}

/* Returns the task loss of a batch: mean squared error against the targets for a
   regression model (num_labels 1), cross-entropy against the labels otherwise. */
static codir_tensor *codir__task_loss(codir_ctx *ctx, const codir_model *model, codir_tensor *logits,
                                      const codir_batch *batch)
{
    if (model->cfg.num_labels == 1) return codir_mse(ctx, logits, batch->targets);
    return codir_cross_entropy(ctx, logits, &batch->labels);
}

CODIR_DEF int codir_task_accumulate(codir_ctx *ctx, codir_model *model, const codir_batch *batch, float weight,
                                    uint64_t step, codir_loss_terms *terms)
{
    codir_output out;
    codir_tensor *loss;
    int rc;

    codir_ctx_begin(ctx, 1, 1, step);
    rc = codir_model_logits(ctx, model, batch, &out);
    if (rc) return rc;
    loss = codir__task_loss(ctx, model, out.logits, batch);
    if (!loss) return ctx->status;
    memset(terms, 0, sizeof *terms);
    terms->task = terms->total = loss->data[0];
    rc = codir__check_terms(terms, step);
    if (rc) return rc;
    return codir_backward_scaled(ctx, loss, weight);
}

/* Copies the cache rows of the batch's examples into a new tensor [B, width]. */
static codir_tensor *codir__cache_rows(codir_ctx *ctx, const float *table, int width, const codir_batch *batch,
                                       int count)
{
    int shape[2], b;
    codir_tensor *t;
    shape[0] = batch->batch;
    shape[1] = width;
    t = codir_tensor_new(ctx, 2, shape, 0);
    if (!t) return NULL;
    for (b = 0; b < batch->batch; b++) {
        int e = batch->example_ids.data[b];
        if (e < 0 || e >= count)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "teacher cache: example id %d is outside the %d cached examples",
                                   e, count);
        memcpy(t->data + (size_t)b * width, table + (size_t)e * width, (size_t)width * sizeof(float));
    }
    return t;
}

/* Runs the CoDIR forward and backward passes of codir_distill_accumulate, with the
   teacher's outputs from the teacher model or, when cache is not NULL, from the cache.
   *zt_out receives the teacher projections for the bank update, or NULL when lambda
   is 0. */
static int codir__distill_backward(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                   const codir_teacher_cache *cache, codir_distiller *d, const codir_batch *batch,
                                   float weight, uint64_t step, codir_loss_terms *terms, codir_tensor **zt_out)
{
    codir_output s_out, t_out;
    codir_tensor *parts[3] = {NULL, NULL, NULL}, *loss, *zt = NULL, *t_logits, *t_features = NULL;
    float weights[3];
    int rc;
    *zt_out = NULL;
    weights[0] = 1.0f - d->cfg.beta;
    weights[1] = d->cfg.beta;
    weights[2] = d->cfg.lambda;

    /* 1. The frozen teacher, no dropout and no tape: run now, or read from the cache. */
    codir_ctx_begin(ctx, 0, 0, step);
    if (cache) {
        if (weights[2] != 0.0f && cache->feature_dim != d->student_layers * d->teacher_hidden)
            return codir__fail(CODIR_ERR_INVALID, "teacher cache holds %d features per example; the distiller needs %d",
                               cache->feature_dim, d->student_layers * d->teacher_hidden);
        t_logits = codir__cache_rows(ctx, cache->logits, cache->num_labels, batch, cache->count);
        if (weights[2] != 0.0f) t_features = codir__cache_rows(ctx, cache->features, cache->feature_dim, batch, cache->count);
    } else {
        /* Only the logits and the pooled features outlive the teacher's pass: they go
           first, and the arena is rewound over the rest. */
        int shape[2];
        codir_arena_pos mark;
        shape[0] = batch->batch;
        shape[1] = teacher->cfg.num_labels;
        t_logits = codir_tensor_new(ctx, 2, shape, 0);
        shape[1] = d->student_layers * d->teacher_hidden;
        if (weights[2] != 0.0f) t_features = codir_tensor_new(ctx, 2, shape, 0);
        if (!t_logits || (weights[2] != 0.0f && !t_features)) return ctx->status ? ctx->status : CODIR_ERR_NOMEM;
        mark = codir_arena_mark(&ctx->arena);
        rc = codir__distill_forward(ctx, teacher, batch, &t_out, d, 1, weights[2] != 0.0f);
        if (rc) return rc;
        memcpy(t_logits->data, t_out.logits->data, t_logits->numel * sizeof(float));
        if (weights[2] != 0.0f) {
            codir_tensor *pooled = codir__teacher_features(ctx, d, &t_out, batch);
            if (!pooled) return ctx->status ? ctx->status : CODIR_ERR_INVALID;
            if (pooled->numel != t_features->numel)
                return codir__fail(CODIR_ERR_INVALID, "teacher features have %zu values; the distiller expects %zu",
                                   pooled->numel, t_features->numel);
            memcpy(t_features->data, pooled->data, t_features->numel * sizeof(float));
        }
        codir_arena_rewind(&ctx->arena, mark);
    }
    if (!t_logits || (weights[2] != 0.0f && !t_features)) return ctx->status ? ctx->status : CODIR_ERR_INVALID;

    /* 2. The student with dropout, recorded for backward. */
    ctx->recording = 1;
    ctx->training = 1;
    rc = codir__distill_forward(ctx, student, batch, &s_out, d, 0, weights[2] != 0.0f);
    if (rc) return rc;

    /* 3. L = (1 - beta) L_task + beta L_kd + lambda L_crd, each a batch mean. L_kd is
       T^2 KL(p_t || p_s) for classification and the squared error between student and
       teacher outputs for regression, where there is no distribution to soften. */
    parts[0] = codir__task_loss(ctx, student, s_out.logits, batch);
    if (weights[1] != 0.0f) {
        if (student->cfg.num_labels == 1)
            parts[1] = codir_mse(ctx, s_out.logits, t_logits->data);
        else
            parts[1] = codir_kl_div(ctx, s_out.logits, t_logits, d->cfg.temperature);
    }
    if (weights[2] != 0.0f) parts[2] = codir__crd_sampled(ctx, d, &s_out, t_features, batch, &zt);
    loss = codir_weighted_sum(ctx, parts, weights, 3);
    if (!loss) return ctx->status;
    terms->task = parts[0]->data[0];
    terms->kd = parts[1] ? parts[1]->data[0] : 0.0;
    terms->crd = parts[2] ? parts[2]->data[0] : 0.0;
    terms->total = loss->data[0];
    rc = codir__check_terms(terms, step);
    if (rc) return rc;

    /* 4. Backward into the student and both projection heads. */
    *zt_out = zt;
    return codir_backward_scaled(ctx, loss, weight);
}

CODIR_DEF int codir_distill_accumulate(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                       codir_distiller *d, const codir_batch *batch, float weight, uint64_t step,
                                       int update_bank, codir_loss_terms *terms)
{
    codir_tensor *zt;
    int rc = codir__distill_backward(ctx, student, teacher, NULL, d, batch, weight, step, terms, &zt);
    if (rc) return rc;

    /* Move the bank rows of this batch toward the new teacher projections. */
    if (update_bank && zt) codir_bank_update(d, zt->data, batch->example_ids.data, batch->batch);
    return CODIR_OK;
}

CODIR_DEF double codir_clip_grad_norm(codir_params *const *params, int count, double max_norm)
{
    double ss = 0.0, norm, scale;
    size_t k;
    int i;
    for (i = 0; i < count; i++)
        for (k = 0; k < params[i]->count; k++) ss += (double)params[i]->grad[k] * params[i]->grad[k];
    norm = sqrt(ss);
    scale = max_norm / (norm + 1e-6);
    if (scale < 1.0)
        for (i = 0; i < count; i++)
            for (k = 0; k < params[i]->count; k++) params[i]->grad[k] = (float)(params[i]->grad[k] * scale);
    return norm;
}

CODIR_DEF int codir_task_step(codir_ctx *ctx, codir_model *model, codir_adamw *opt, const codir_batch *batch,
                              float lr, codir_loss_terms *terms)
{
    uint64_t step = (uint64_t)opt->step;
    const char *bad;
    int rc;
    codir_params_zero_grad(&model->params);
    rc = codir_task_accumulate(ctx, model, batch, 1.0f, step, terms);
    if (rc) return rc;
    if ((bad = codir__nonfinite_grad(&model->params)))
        return codir__fail(CODIR_ERR_NONFINITE, "step %llu: gradient of %s is NaN or Inf", (unsigned long long)step, bad);
    codir_adamw_step(opt, &model->params, lr);
    return CODIR_OK;
}

/* One CoDIR step with the teacher's outputs from `teacher` or from `cache`. */
static int codir__distill_step(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                               const codir_teacher_cache *cache, codir_distiller *d, codir_adamw *opt_student,
                               codir_adamw *opt_heads, const codir_batch *batch, float lr, codir_loss_terms *terms)
{
    uint64_t step = (uint64_t)opt_student->step;
    codir_tensor *zt;
    const char *bad;
    int rc;
    codir_params_zero_grad(&student->params);
    codir_params_zero_grad(&d->params);
    rc = codir__distill_backward(ctx, student, teacher, cache, d, batch, 1.0f, step, terms, &zt);
    if (rc) return rc;
    if ((bad = codir__nonfinite_grad(&student->params)) || (bad = codir__nonfinite_grad(&d->params)))
        return codir__fail(CODIR_ERR_NONFINITE, "step %llu: gradient of %s is NaN or Inf", (unsigned long long)step, bad);
    codir_adamw_step(opt_student, &student->params, lr);
    codir_adamw_step(opt_heads, &d->params, lr);

    /* The bank moves only after the step succeeded, so a rejected step leaves it as it was. */
    if (zt) codir_bank_update(d, zt->data, batch->example_ids.data, batch->batch);
    return CODIR_OK;
}

CODIR_DEF int codir_distill_step(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                 codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                 const codir_batch *batch, float lr, codir_loss_terms *terms)
{
    return codir__distill_step(ctx, student, teacher, NULL, d, opt_student, opt_heads, batch, lr, terms);
}

CODIR_DEF int codir_distill_step_cached(codir_ctx *ctx, codir_model *student, const codir_teacher_cache *cache,
                                        codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                        const codir_batch *batch, float lr, codir_loss_terms *terms)
{
    return codir__distill_step(ctx, student, NULL, cache, d, opt_student, opt_heads, batch, lr, terms);
}

CODIR_DEF double codir_teacher_cache_bytes(const codir_config *teacher, const codir_distiller *d, int count)
{
    double per_example = (double)teacher->num_labels;
    if (d && d->cfg.lambda != 0.0f) per_example += (double)d->student_layers * teacher->hidden;
    return per_example * sizeof(float) * count;
}

/* Sets *order to a new array of the example ids of enc sorted by length, shortest
   first, ties in order (a counting sort), so batches cut from it carry little padding.
   Returns CODIR_OK or an error. */
static int codir__order_by_length(const codir_encoded *enc, int **order)
{
    int *count_by_len, i, len;
    *order = NULL;
    for (i = 0; i < enc->count; i++)
        if (enc->lengths[i] < 0 || enc->lengths[i] > enc->max_len)
            return codir__fail(CODIR_ERR_INVALID, "example %d has length %d, outside 0..%d", i, enc->lengths[i],
                               enc->max_len);
    *order = (int *)codir__calloc((size_t)(enc->count ? enc->count : 1), sizeof(int));
    count_by_len = (int *)codir__calloc((size_t)enc->max_len + 2, sizeof(int));
    if (!*order || !count_by_len) {
        codir__free(*order);
        codir__free(count_by_len);
        *order = NULL;
        return CODIR_ERR_NOMEM;
    }
    for (i = 0; i < enc->count; i++) count_by_len[enc->lengths[i] + 1]++;
    for (len = 0; len <= enc->max_len; len++) count_by_len[len + 1] += count_by_len[len];
    for (i = 0; i < enc->count; i++) (*order)[count_by_len[enc->lengths[i]]++] = i;
    codir__free(count_by_len);
    return CODIR_OK;
}

CODIR_DEF codir_teacher_cache *codir_teacher_cache_build(codir_ctx *ctx, const codir_model *teacher,
                                                         const codir_distiller *d, const codir_encoded *enc,
                                                         int batch_size, double max_bytes)
{
    codir_teacher_cache *c;
    codir_batch batch;
    double bytes = codir_teacher_cache_bytes(&teacher->cfg, d, enc->count);
    int start, rc = CODIR_OK, V = teacher->cfg.num_labels;
    int *order = NULL;
    if (max_bytes > 0 && bytes > max_bytes) {
        codir__fail(CODIR_ERR_NOMEM, "teacher cache of %d examples needs %.1f MiB, over the limit of %.1f MiB",
                    enc->count, bytes / 1048576.0, max_bytes / 1048576.0);
        return NULL;
    }
    c = (codir_teacher_cache *)codir__calloc(1, sizeof *c);
    if (!c) return NULL;
    c->count = enc->count;
    c->num_labels = V;
    c->feature_dim = d && d->cfg.lambda != 0.0f ? d->student_layers * teacher->cfg.hidden : 0;
    c->bytes = (size_t)bytes;
    c->logits = (float *)codir__calloc((size_t)(enc->count ? enc->count : 1), (size_t)V * sizeof(float));
    if (c->feature_dim)
        c->features = (float *)codir__calloc((size_t)(enc->count ? enc->count : 1), (size_t)c->feature_dim * sizeof(float));
    if (!c->logits || (c->feature_dim && !c->features) || codir__order_by_length(enc, &order) ||
        codir_batch_init(&batch, enc->count > 0 && enc->count < batch_size ? enc->count : batch_size, enc->max_len)) {
        codir__free(order);
        codir_teacher_cache_free(c);
        return NULL;
    }

    /* One pass over the data, in batches of similar lengths, as at evaluation: no dropout, no tape. */
    for (start = 0; start < enc->count && !rc; start += batch_size) {
        int n = enc->count - start < batch_size ? enc->count - start : batch_size, b;
        codir_output out;
        codir_tensor *ft = NULL;
        rc = codir_batch_fill(&batch, enc, order, start, n);
        if (rc) break;
        codir_ctx_begin(ctx, 0, 0, 0);
        rc = codir__distill_forward(ctx, teacher, &batch, &out, d, 1, c->feature_dim != 0);
        if (!rc && c->feature_dim) {
            ft = codir__teacher_features(ctx, d, &out, &batch);
            if (!ft) rc = ctx->status ? ctx->status : CODIR_ERR_INVALID;
        }
        if (rc) break;
        for (b = 0; b < n; b++) {
            int e = order[start + b];
            memcpy(c->logits + (size_t)e * V, out.logits->data + (size_t)b * V, (size_t)V * sizeof(float));
            if (ft)
                memcpy(c->features + (size_t)e * c->feature_dim, ft->data + (size_t)b * c->feature_dim,
                       (size_t)c->feature_dim * sizeof(float));
        }
    }
    codir__free(order);
    codir_batch_free(&batch);
    if (rc) {
        codir_teacher_cache_free(c);
        return NULL;
    }
    return c;
}

CODIR_DEF void codir_teacher_cache_free(codir_teacher_cache *cache)
{
    if (!cache) return;
    codir__free(cache->logits);
    codir__free(cache->features);
    codir__free(cache);
}

CODIR_DEF int codir_predict(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc, int batch_size,
                            float *out)
{
    codir_batch batch;
    int start, rc, V = model->cfg.num_labels, *order, b;
    if (enc->count < 1) return codir__fail(CODIR_ERR_INVALID, "cannot predict on an empty data set");
    rc = codir__order_by_length(enc, &order);
    if (rc) return rc;
    rc = codir_batch_init(&batch, batch_size < enc->count ? batch_size : enc->count, enc->max_len);
    if (rc) {
        codir__free(order);
        return rc;
    }
    /* Batches of similar lengths, so each is padded to little more than its own. */
    for (start = 0; start < enc->count && !rc; start += batch_size) {
        int n = enc->count - start < batch_size ? enc->count - start : batch_size;
        codir_output o;
        rc = codir_batch_fill(&batch, enc, order, start, n);
        if (rc) break;
        codir_ctx_begin(ctx, 0, 0, 0);
        rc = codir_model_logits(ctx, model, &batch, &o);
        for (b = 0; b < n && !rc; b++)
            memcpy(out + (size_t)order[start + b] * V, o.logits->data + (size_t)b * V, (size_t)V * sizeof(float));
    }
    codir__free(order);
    codir_batch_free(&batch);
    return rc;
}

/* ---- metrics ---- */

CODIR_DEF double codir_accuracy(const int *pred, const int *gold, int n)
{
    int i, correct = 0;
    for (i = 0; i < n; i++) correct += pred[i] == gold[i];
    return n > 0 ? (double)correct / n : NAN;
}

CODIR_DEF double codir_f1(const int *pred, const int *gold, int n, int positive)
{
    long tp = 0, fp = 0, fn = 0;
    int i;
    for (i = 0; i < n; i++) {
        tp += pred[i] == positive && gold[i] == positive;
        fp += pred[i] == positive && gold[i] != positive;
        fn += pred[i] != positive && gold[i] == positive;
    }
    return tp + fp + fn > 0 ? 2.0 * tp / (2.0 * tp + fp + fn) : NAN;
}

CODIR_DEF double codir_matthews(const int *pred, const int *gold, int n, int num_classes)
{
    /* R_K = (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), with c
       correct predictions, s samples, p_k predictions of class k, t_k labels of class k. */
    double c = 0, s = n, pt = 0, pp = 0, tt = 0, denom;
    int i, k;
    for (k = 0; k < num_classes; k++) {
        double p = 0, t = 0;
        for (i = 0; i < n; i++) {
            p += pred[i] == k;
            t += gold[i] == k;
        }
        pt += p * t;
        pp += p * p;
        tt += t * t;
    }
    for (i = 0; i < n; i++) c += pred[i] == gold[i];
    denom = sqrt((s * s - pp) * (s * s - tt));
    /* sklearn.metrics.matthews_corrcoef returns 0 when a marginal is constant. */
    return denom > 0.0 ? (c * s - pt) / denom : 0.0;
}

CODIR_DEF double codir_pearson(const float *x, const float *y, int n)
{
    double mx = 0, my = 0, sxy = 0, sxx = 0, syy = 0;
    int i;
    if (n < 2) return NAN;
    for (i = 0; i < n; i++) {
        mx += x[i];
        my += y[i];
    }
    mx /= n;
    my /= n;
    for (i = 0; i < n; i++) {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
        syy += (y[i] - my) * (y[i] - my);
    }
    return sxx > 0.0 && syy > 0.0 ? sxy / sqrt(sxx * syy) : NAN;
}

/* Writes the 1-based ranks of x[n] to rank[n], ties sharing their average rank;
   order[n] is scratch. */
static void codir__ranks(const float *x, int n, int *order, float *rank)
{
    int i, j, lo;
    /* insertion sort of indexes by value: n is a dev set, and this keeps ties stable */
    for (i = 0; i < n; i++) {
        int e = i;
        for (j = i; j > 0 && x[order[j - 1]] > x[e]; j--) order[j] = order[j - 1];
        order[j] = e;
    }
    for (lo = 0; lo < n;) {
        int hi = lo + 1;
        while (hi < n && x[order[hi]] == x[order[lo]]) hi++;
        for (j = lo; j < hi; j++) rank[order[j]] = (float)(0.5 * (lo + 1 + hi));
        lo = hi;
    }
}

CODIR_DEF int codir_spearman(const float *x, const float *y, int n, double *out)
{
    int *order = (int *)codir__calloc((size_t)(n > 0 ? n : 1), sizeof(int));
    float *rx = (float *)codir__calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    float *ry = (float *)codir__calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    if (!order || !rx || !ry) {
        codir__free(order);
        codir__free(rx);
        codir__free(ry);
        return CODIR_ERR_NOMEM;
    }
    codir__ranks(x, n, order, rx);
    codir__ranks(y, n, order, ry);
    *out = codir_pearson(rx, ry, n);
    codir__free(order);
    codir__free(rx);
    codir__free(ry);
    return CODIR_OK;
}

CODIR_DEF int codir_evaluate(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc,
                             int batch_size, codir_scores *scores)
{
    int V = model->cfg.num_labels, i, v, rc;
    float *out;
    int *pred = NULL;
    size_t n;
    scores->accuracy = scores->f1 = scores->matthews = scores->pearson = scores->spearman = NAN;
    if (!codir__size_mul((size_t)(enc->count > 0 ? enc->count : 1), (size_t)V, &n))
        return codir__fail(CODIR_ERR_OVERFLOW, "%d examples x %d outputs overflow size_t", enc->count, V);
    out = (float *)codir__calloc(n, sizeof(float));
    if (!out) return CODIR_ERR_NOMEM;
    rc = codir_predict(ctx, model, enc, batch_size, out);
    if (rc) goto done;
    if (V == 1) {
        if (!enc->targets) {
            rc = codir__fail(CODIR_ERR_INVALID, "a regression model needs data with float targets");
            goto done;
        }
        scores->pearson = codir_pearson(out, enc->targets, enc->count);
        rc = codir_spearman(out, enc->targets, enc->count, &scores->spearman);
        goto done;
    }
    pred = (int *)codir__calloc((size_t)enc->count, sizeof(int));
    if (!pred) {
        rc = CODIR_ERR_NOMEM;
        goto done;
    }
    for (i = 0; i < enc->count; i++) {
        const float *row = out + (size_t)i * V;
        int best = 0;
        for (v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        pred[i] = best;
    }
    scores->accuracy = codir_accuracy(pred, enc->labels, enc->count);
    scores->matthews = codir_matthews(pred, enc->labels, enc->count, V);
    if (V == 2) scores->f1 = codir_f1(pred, enc->labels, enc->count, 1);

done:
    codir__free(out);
    codir__free(pred);
    return rc;
}

/* ---- training checkpoints ---- */

/* Returns "prefix.name" in buf[size] (truncated names are rejected by the caller's
   uniqueness: names are short). */
static const char *codir__ckpt_name(char *buf, size_t size, const char *prefix, const char *name)
{
    snprintf(buf, size, "%s.%s", prefix, name);
    return buf;
}

/* Appends one entry per tensor of params, with data taken at `values` (the values,
   or an optimizer moment laid out like them), to w[*n]; names go to names[*n]. */
static void codir__ckpt_add(codir_st_write *w, char (*names)[160], int *n, const codir_params *params,
                            const float *values, const char *prefix)
{
    int i, k;
    for (i = 0; i < params->num_tensors; i++) {
        const codir_tensor *t = &params->tensors[i];
        codir_st_write *e = &w[*n];
        e->name = codir__ckpt_name(names[*n], sizeof names[*n], prefix, t->name);
        e->ndim = t->ndim;
        for (k = 0; k < CODIR_ST_MAX_DIMS; k++) e->shape[k] = k < t->ndim ? t->shape[k] : 1;
        e->data = values + (t->data - params->data);
        (*n)++;
    }
}

/* Appends a [rows, cols] float array as one entry. */
static void codir__ckpt_add_array(codir_st_write *w, int *n, const char *name, const float *data, int rows, int cols)
{
    codir_st_write *e = &w[*n];
    int k;
    e->name = name;
    e->ndim = 2;
    for (k = 0; k < CODIR_ST_MAX_DIMS; k++) e->shape[k] = 1;
    e->shape[0] = rows;
    e->shape[1] = cols;
    e->data = data;
    (*n)++;
}

CODIR_DEF int codir_checkpoint_save(const char *path, const codir_train_state *s)
{
    codir_st_write *w;
    char (*names)[160];
    char values[8][64];
    const char *meta[16];
    int n = 0, m = 0, max = 0, rc;
    const codir_distiller *d = s->distiller;
    if (!s->model) return codir__fail(CODIR_ERR_INVALID, "checkpoint %s: no model to save", path);
    max = s->model->params.num_tensors * 3 + (d ? d->params.num_tensors * 3 + 2 : 0);
    w = (codir_st_write *)codir__calloc((size_t)max, sizeof *w);
    names = (char(*)[160])codir__calloc((size_t)max, 160);
    if (!w || !names) {
        codir__free(w);
        codir__free(names);
        return CODIR_ERR_NOMEM;
    }

    /* Tensors: parameters, AdamW moments, heads, memory banks. */
    codir__ckpt_add(w, names, &n, &s->model->params, s->model->params.data, "model");
    if (s->opt) {
        codir__ckpt_add(w, names, &n, &s->model->params, s->opt->m, "adam_m.model");
        codir__ckpt_add(w, names, &n, &s->model->params, s->opt->v, "adam_v.model");
    }
    if (d) {
        codir__ckpt_add(w, names, &n, &d->params, d->params.data, "heads");
        if (s->opt_heads) {
            codir__ckpt_add(w, names, &n, &d->params, s->opt_heads->m, "adam_m.heads");
            codir__ckpt_add(w, names, &n, &d->params, s->opt_heads->v, "adam_v.heads");
        }
        codir__ckpt_add_array(w, &n, "bank.teacher", d->bank, d->num_examples, d->cfg.proj_dim);
        if (d->bank_s) codir__ckpt_add_array(w, &n, "bank.student", d->bank_s, d->num_examples, d->cfg.proj_dim);
    }

    /* Scalars as metadata text: integers in decimal, doubles with 17 digits, which
       round-trip exactly through strtod. */
    snprintf(values[0], sizeof values[0], "%ld", s->opt ? s->opt->step : 0L);
    snprintf(values[1], sizeof values[1], "%ld", s->opt_heads ? s->opt_heads->step : 0L);
    snprintf(values[2], sizeof values[2], "%llu", (unsigned long long)(s->rng ? *s->rng : 0));
    snprintf(values[3], sizeof values[3], "%llu", (unsigned long long)(d ? d->rng : 0));
    snprintf(values[4], sizeof values[4], "%.17g", d ? d->log_z_t : 0.0);
    snprintf(values[5], sizeof values[5], "%.17g", d ? d->log_z_s : 0.0);
    snprintf(values[6], sizeof values[6], "%d", d ? d->z_ready : 0);
    snprintf(values[7], sizeof values[7], "%ld", s->epoch);
    meta[m++] = "adam_step.model", meta[m++] = values[0];
    meta[m++] = "adam_step.heads", meta[m++] = values[1];
    meta[m++] = "rng.user", meta[m++] = values[2];
    meta[m++] = "rng.sampler", meta[m++] = values[3];
    meta[m++] = "nce.log_z_teacher_anchor", meta[m++] = values[4];
    meta[m++] = "nce.log_z_student_anchor", meta[m++] = values[5];
    meta[m++] = "nce.ready", meta[m++] = values[6];
    meta[m++] = "epoch", meta[m++] = values[7];
    rc = codir_safetensors_write(path, w, n, meta, m / 2);
    codir__free(w);
    codir__free(names);
    return rc;
}

/* Reads every tensor of params under `prefix` into `values`. */
static int codir__ckpt_read(const codir_safetensors *st, const codir_params *params, float *values, const char *prefix)
{
    char name[160];
    int i, rc;
    for (i = 0; i < params->num_tensors; i++) {
        const codir_tensor *t = &params->tensors[i];
        const codir_st_tensor *e = codir_safetensors_find(st, codir__ckpt_name(name, sizeof name, prefix, t->name));
        if (!e) return codir__fail(CODIR_ERR_PARSE, "checkpoint %s: tensor %s is missing", st->path, name);
        rc = codir_safetensors_read_f32(st, name, values + (t->data - params->data), t->numel);
        if (rc) return rc;
    }
    return CODIR_OK;
}

/* Parses metadata `key` as a signed or unsigned integer, or a double. */
static int codir__ckpt_meta(const codir_safetensors *st, const char *key, int kind, void *out)
{
    const char *text = codir_safetensors_metadata(st, key);
    char *end;
    errno = 0;
    if (!text) return codir__fail(CODIR_ERR_PARSE, "checkpoint %s: metadata %s is missing", st->path, key);
    if (kind == 0) *(long *)out = strtol(text, &end, 10);
    else if (kind == 1) *(uint64_t *)out = (uint64_t)strtoull(text, &end, 10);
    else *(double *)out = strtod(text, &end);
    if (end == text || *end != '\0' || errno)
        return codir__fail(CODIR_ERR_PARSE, "checkpoint %s: metadata %s = \"%s\" is not a number", st->path, key, text);
    return CODIR_OK;
}

CODIR_DEF int codir_checkpoint_load(const char *path, codir_train_state *s)
{
    codir_safetensors *st;
    codir_distiller *d = s->distiller;
    long z_ready = 0, step = 0;
    uint64_t u = 0;
    int rc;
    if (!s->model) return codir__fail(CODIR_ERR_INVALID, "checkpoint %s: no model to load into", path);
    st = codir_safetensors_open(path);
    if (!st) return CODIR_ERR_IO;

    /* Read everything into the objects; on failure they may be partly overwritten,
       which the caller discards. */
    codir_model_unpack(s->model); /* its weights change */
    rc = codir__ckpt_read(st, &s->model->params, s->model->params.data, "model");
    if (!rc && s->opt) rc = codir__ckpt_read(st, &s->model->params, s->opt->m, "adam_m.model");
    if (!rc && s->opt) rc = codir__ckpt_read(st, &s->model->params, s->opt->v, "adam_v.model");
    if (!rc && s->opt) rc = codir__ckpt_meta(st, "adam_step.model", 0, &s->opt->step);
    if (!rc && d) rc = codir__ckpt_read(st, &d->params, d->params.data, "heads");
    if (!rc && d && s->opt_heads) rc = codir__ckpt_read(st, &d->params, s->opt_heads->m, "adam_m.heads");
    if (!rc && d && s->opt_heads) rc = codir__ckpt_read(st, &d->params, s->opt_heads->v, "adam_v.heads");
    if (!rc && d && s->opt_heads) rc = codir__ckpt_meta(st, "adam_step.heads", 0, &s->opt_heads->step);
    if (!rc && d)
        rc = codir_safetensors_read_f32(st, "bank.teacher", d->bank, (size_t)d->num_examples * (size_t)d->cfg.proj_dim);
    if (!rc && d && d->bank_s)
        rc = codir_safetensors_read_f32(st, "bank.student", d->bank_s, (size_t)d->num_examples * (size_t)d->cfg.proj_dim);
    if (!rc && d) rc = codir__ckpt_meta(st, "rng.sampler", 1, &d->rng);
    if (!rc && d) rc = codir__ckpt_meta(st, "nce.log_z_teacher_anchor", 2, &d->log_z_t);
    if (!rc && d) rc = codir__ckpt_meta(st, "nce.log_z_student_anchor", 2, &d->log_z_s);
    if (!rc && d) rc = codir__ckpt_meta(st, "nce.ready", 0, &z_ready);
    if (!rc && d) d->z_ready = (int)z_ready;
    if (!rc && s->rng) rc = codir__ckpt_meta(st, "rng.user", 1, &u);
    if (!rc && s->rng) *s->rng = u;
    if (!rc) rc = codir__ckpt_meta(st, "epoch", 0, &step);
    if (!rc) s->epoch = step;
    codir_safetensors_close(st);
    return rc;
}

/* ===================================================================================
   Masked-LM pre-training and CoDIR-Pre (implementation)
   =================================================================================== */

/* ---- corpus ---- */

/* 1 if line[0..n-1] holds only ASCII whitespace, so it separates documents. */
static int codir__blank_line(const char *line, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r' && line[i] != '\v' && line[i] != '\f') return 0;
    return 1;
}

CODIR_DEF void codir_corpus_free(codir_corpus *corpus)
{
    int i;
    if (!corpus) return;
    for (i = 0; i < corpus->num_lines; i++) codir__free(corpus->lines[i]);
    codir__free(corpus->lines);
    codir__free(corpus->docs);
    codir__free(corpus->line_numbers);
    codir__free(corpus->name);
    codir__free(corpus);
}

CODIR_DEF codir_corpus *codir_corpus_parse(const char *text, size_t length, const char *name)
{
    codir_corpus *c;
    size_t pos = 0, lines = 0, i;
    long line_number = 0;
    int in_doc = 0;
    if (!text || !name) {
        codir__fail(CODIR_ERR_INVALID, "codir_corpus_parse: text or name is NULL");
        return NULL;
    }
    if (length >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) pos = 3;

    /* Count the lines first, so every array is allocated once. */
    for (i = pos; i < length; i++) {
        if (text[i] == '\0') {
            long at = 1;
            size_t k;
            for (k = 0; k < i; k++) at += text[k] == '\n';
            codir__fail(CODIR_ERR_PARSE, "%s:%ld: contains a NUL byte; a corpus must be UTF-8 text", name, at);
            return NULL;
        }
        if (text[i] == '\n') lines++;
    }
    lines++;
    if (lines > (size_t)INT_MAX) {
        codir__fail(CODIR_ERR_OVERFLOW, "%s: more than %d lines", name, INT_MAX);
        return NULL;
    }
    c = (codir_corpus *)codir__calloc(1, sizeof *c);
    if (!c) return NULL;
    c->lines = (char **)codir__calloc(lines, sizeof(char *));
    c->docs = (int *)codir__calloc(lines, sizeof(int));
    c->line_numbers = (int *)codir__calloc(lines, sizeof(int));
    c->name = codir__strndup(name, strlen(name));
    if (!c->lines || !c->docs || !c->line_numbers || !c->name) goto fail;

    /* One paragraph per line; a blank line closes the current document. */
    while (pos < length) {
        const char *start = text + pos, *nl = (const char *)memchr(start, '\n', length - pos);
        size_t n = nl ? (size_t)(nl - start) : length - pos;
        pos += n + (nl ? 1 : 0);
        line_number++;
        if (n > 0 && start[n - 1] == '\r') n--;
        if (codir__blank_line(start, n)) {
            if (in_doc) c->num_docs++;
            in_doc = 0;
            continue;
        }
        c->lines[c->num_lines] = codir__strndup(start, n);
        if (!c->lines[c->num_lines]) goto fail;
        c->docs[c->num_lines] = c->num_docs;
        c->line_numbers[c->num_lines] = (int)line_number;
        c->num_lines++;
        in_doc = 1;
    }
    if (in_doc) c->num_docs++;
    if (c->num_lines == 0) {
        codir__fail(CODIR_ERR_PARSE, "%s: no text; expected one paragraph per line, documents separated by an empty line",
                    name);
        goto fail;
    }
    return c;

fail:
    codir_corpus_free(c);
    return NULL;
}

CODIR_DEF codir_corpus *codir_corpus_load(const char *path)
{
    FILE *f;
    char *data = NULL;
    size_t length = 0, cap = 0;
    int out_of_memory = 0, read_error;
    codir_corpus *c;
    if (!path) {
        codir__fail(CODIR_ERR_INVALID, "codir_corpus_load: path is NULL");
        return NULL;
    }
    f = fopen(path, "rb");
    if (!f) {
        codir__fail(CODIR_ERR_IO, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }

    /* Read in doubling blocks: C11 has no portable way to ask for a file's size. */
    for (;;) {
        size_t got;
        if (length == cap) {
            char *bigger = cap > SIZE_MAX / 2 ? NULL : (char *)codir__realloc(data, cap ? cap * 2 : (size_t)1 << 16);
            if (!bigger) {
                out_of_memory = 1;
                break;
            }
            data = bigger;
            cap = cap ? cap * 2 : (size_t)1 << 16;
        }
        got = fread(data + length, 1, cap - length, f);
        length += got;
        if (length < cap) break;
    }
    read_error = ferror(f);
    fclose(f);
    if (out_of_memory || read_error) {
        codir__free(data);
        if (out_of_memory) codir__fail(CODIR_ERR_NOMEM, "out of memory reading %s", path);
        else codir__fail(CODIR_ERR_IO, "reading %s failed", path);
        return NULL;
    }
    c = codir_corpus_parse(data, length, path);
    codir__free(data);
    return c;
}

/* ---- segments ---- */

/* Plans segments over the corpus' pieces, which lie line after line in one array with
   line i at [line_start[i], line_start[i + 1]). Every segment is a contiguous range of
   that array, because its lines are consecutive. Writes the ranges and documents to
   begin, end and doc when they are not NULL, and returns the number of segments. */
static size_t codir__plan_segments(const codir_corpus *corpus, const size_t *line_start, int room, size_t *begin,
                                   size_t *end, int *doc)
{
    size_t count = 0, open_begin = 0;
    int i, fill = 0, open_doc = -1;

    for (i = 0; i < corpus->num_lines; i++) {
        size_t next = line_start[i], stop = line_start[i + 1];

        /* A new document, or a line that does not fit in the room left, closes the
           open segment. */
        if (fill > 0 && (corpus->docs[i] != open_doc || (size_t)fill + (stop - next) > (size_t)room)) {
            if (begin) {
                begin[count] = open_begin;
                end[count] = open_begin + (size_t)fill;
                doc[count] = open_doc;
            }
            count++;
            fill = 0;
        }

        /* Add the line; a line longer than a segment fills whole segments. */
        while (next < stop) {
            size_t take = stop - next < (size_t)(room - fill) ? stop - next : (size_t)(room - fill);
            if (fill == 0) {
                open_begin = next;
                open_doc = corpus->docs[i];
            }
            fill += (int)take;
            next += take;
            if (fill == room) {
                if (begin) {
                    begin[count] = open_begin;
                    end[count] = open_begin + (size_t)fill;
                    doc[count] = open_doc;
                }
                count++;
                fill = 0;
            }
        }
    }
    if (fill > 0) {
        if (begin) {
            begin[count] = open_begin;
            end[count] = open_begin + (size_t)fill;
            doc[count] = open_doc;
        }
        count++;
    }
    return count;
}

/* Tokenizes every line of the corpus into one array; *line_start_out receives
   [num_lines + 1] offsets into it. */
static int codir__tokenize_corpus(const codir_vocab *vocab, const codir_corpus *corpus, int **pieces_out,
                                  size_t **line_start_out)
{
    size_t cap = 1 << 16, used = 0;
    int *pieces = (int *)codir__calloc(cap, sizeof(int));
    size_t *line_start = (size_t *)codir__calloc((size_t)corpus->num_lines + 1, sizeof(size_t));
    int i, rc = CODIR_ERR_NOMEM;
    if (!pieces || !line_start) goto fail;
    for (i = 0; i < corpus->num_lines; i++) {
        int room = cap - used > (size_t)INT_MAX ? INT_MAX : (int)(cap - used);
        int n = codir_tokenize(vocab, corpus->lines[i], pieces + used, room);
        line_start[i] = used;
        if (n < 0) {
            rc = codir__fail(n, "%s:%d: tokenizing failed: %s", corpus->name, corpus->line_numbers[i],
                             codir_last_error());
            goto fail;
        }
        if ((size_t)n > cap - used) {
            /* Grow to fit this line and tokenize it again. */
            size_t need = used + (size_t)n, grown = cap;
            int *bigger;
            while (grown < need) {
                if (grown > SIZE_MAX / 2 / sizeof(int)) {
                    rc = codir__fail(CODIR_ERR_OVERFLOW, "%s: too many pieces to hold in memory", corpus->name);
                    goto fail;
                }
                grown *= 2;
            }
            bigger = (int *)codir__realloc(pieces, grown * sizeof(int));
            if (!bigger) goto fail;
            pieces = bigger;
            cap = grown;
            codir_tokenize(vocab, corpus->lines[i], pieces + used, n);
        }
        used += (size_t)n;
    }
    line_start[corpus->num_lines] = used;
    *pieces_out = pieces;
    *line_start_out = line_start;
    return CODIR_OK;

fail:
    codir__free(pieces);
    codir__free(line_start);
    return rc;
}

CODIR_DEF codir_encoded *codir_segment_corpus(const codir_vocab *vocab, const codir_corpus *corpus, int max_len)
{
    codir_encoded *enc = NULL;
    int *pieces = NULL, *doc = NULL;
    size_t *line_start = NULL, *begin = NULL, *end = NULL, count, s, ids_n;
    if (!vocab || !corpus) {
        codir__fail(CODIR_ERR_INVALID, "codir_segment_corpus: vocab or corpus is NULL");
        return NULL;
    }
    if (max_len < 3) {
        codir__fail(CODIR_ERR_INVALID, "segment length %d cannot hold [CLS], one piece and [SEP]; use at least 3",
                    max_len);
        return NULL;
    }
    if (codir__tokenize_corpus(vocab, corpus, &pieces, &line_start)) return NULL;

    /* Count the segments, then record their ranges. */
    count = codir__plan_segments(corpus, line_start, max_len - 2, NULL, NULL, NULL);
    if (count == 0) {
        codir__fail(CODIR_ERR_PARSE, "%s: no segments, because no line has a WordPiece piece", corpus->name);
        goto done;
    }
    if (count > (size_t)INT_MAX || !codir__size_mul(count, (size_t)max_len, &ids_n)) {
        codir__fail(CODIR_ERR_OVERFLOW, "%s: %zu segments of %d tokens overflow the index range", corpus->name, count,
                    max_len);
        goto done;
    }
    begin = (size_t *)codir__calloc(count, sizeof(size_t));
    end = (size_t *)codir__calloc(count, sizeof(size_t));
    doc = (int *)codir__calloc(count, sizeof(int));
    enc = (codir_encoded *)codir__calloc(1, sizeof *enc);
    if (!begin || !end || !doc || !enc) goto fail;
    codir__plan_segments(corpus, line_start, max_len - 2, begin, end, doc);

    /* [CLS] pieces [SEP], padded with [PAD] to the row stride. */
    enc->count = (int)count;
    enc->max_len = max_len;
    enc->num_classes = corpus->num_docs;
    enc->lengths = (int *)codir__calloc(count, sizeof(int));
    enc->labels = (int *)codir__calloc(count, sizeof(int));
    enc->ids = (int *)codir__calloc(ids_n, sizeof(int));
    if (!enc->lengths || !enc->labels || !enc->ids) goto fail;
    for (s = 0; s < count; s++) {
        int *row = enc->ids + s * (size_t)max_len, n = (int)(end[s] - begin[s]), t;
        row[0] = vocab->cls_id;
        memcpy(row + 1, pieces + begin[s], (size_t)n * sizeof(int));
        row[n + 1] = vocab->sep_id;
        for (t = n + 2; t < max_len; t++) row[t] = vocab->pad_id;
        enc->lengths[s] = n + 2;
        enc->labels[s] = doc[s];
    }
    goto done;

fail:
    codir_encoded_free(enc);
    enc = NULL;
done:
    codir__free(pieces);
    codir__free(line_start);
    codir__free(begin);
    codir__free(end);
    codir__free(doc);
    return enc;
}

/* ---- masking ---- */

CODIR_DEF codir_mlm_config codir_mlm_config_default(const codir_vocab *vocab)
{
    codir_mlm_config cfg;
    cfg.select_prob = 0.15f;
    cfg.mask_prob = 0.8f;
    cfg.random_prob = 0.1f;
    cfg.vocab_size = vocab->size;
    cfg.mask_id = vocab->mask_id;
    cfg.special_ids[0] = vocab->pad_id;
    cfg.special_ids[1] = vocab->unk_id;
    cfg.special_ids[2] = vocab->cls_id;
    cfg.special_ids[3] = vocab->sep_id;
    cfg.special_ids[4] = vocab->mask_id;
    return cfg;
}

CODIR_DEF int codir_mlm_batch_init(codir_mlm_batch *mb, int max_batch, int max_len)
{
    size_t n;
    memset(mb, 0, sizeof *mb);
    if (max_batch < 1 || max_len < 1)
        return codir__fail(CODIR_ERR_INVALID, "batch size %d and length %d must be positive", max_batch, max_len);
    if (!codir__size_mul((size_t)max_batch, (size_t)max_len, &n) || n > (size_t)INT_MAX)
        return codir__fail(CODIR_ERR_OVERFLOW, "masked batch of %d x %d tokens is too large", max_batch, max_len);
    mb->masked_ids = (int *)codir__calloc(n, sizeof(int));
    mb->positions = (int *)codir__calloc(n, sizeof(int));
    mb->targets = (int *)codir__calloc(n, sizeof(int));
    if (!mb->masked_ids || !mb->positions || !mb->targets) {
        codir_mlm_batch_free(mb);
        return CODIR_ERR_NOMEM;
    }
    mb->capacity = n;
    return CODIR_OK;
}

CODIR_DEF void codir_mlm_batch_free(codir_mlm_batch *mb)
{
    codir__free(mb->masked_ids);
    codir__free(mb->positions);
    codir__free(mb->targets);
    memset(mb, 0, sizeof *mb);
}

/* 1 if id is one of the special ids of cfg. */
static int codir__mlm_special(const codir_mlm_config *cfg, int id)
{
    int k;
    for (k = 0; k < 5; k++)
        if (cfg->special_ids[k] == id) return 1;
    return 0;
}

/* Sorts the distinct special ids of cfg into sorted[] and returns how many there are. */
static int codir__mlm_sorted_specials(const codir_mlm_config *cfg, int *sorted)
{
    int n = 0, k, j;
    for (k = 0; k < 5; k++) {
        int id = cfg->special_ids[k], dup = 0;
        if (id < 0) continue;
        for (j = 0; j < n; j++) dup |= sorted[j] == id;
        if (dup) continue;
        for (j = n; j > 0 && sorted[j - 1] > id; j--) sorted[j] = sorted[j - 1];
        sorted[j] = id;
        n++;
    }
    return n;
}

static int codir__mlm_check(const codir_mlm_config *cfg, int num_special)
{
    int k;
    if (!(cfg->select_prob > 0.0f && cfg->select_prob <= 1.0f))
        return codir__fail(CODIR_ERR_INVALID, "masked-LM selection rate %g must be in (0, 1]", (double)cfg->select_prob);
    if (!(cfg->mask_prob >= 0.0f && cfg->random_prob >= 0.0f && cfg->mask_prob + cfg->random_prob <= 1.0f))
        return codir__fail(CODIR_ERR_INVALID,
                           "masked-LM replacement rates (mask %g, random %g) must be >= 0 with a sum of at most 1",
                           (double)cfg->mask_prob, (double)cfg->random_prob);
    if (cfg->mask_id < 0 || cfg->mask_id >= cfg->vocab_size)
        return codir__fail(CODIR_ERR_INVALID, "[MASK] id %d is outside the vocabulary of %d", cfg->mask_id,
                           cfg->vocab_size);
    for (k = 0; k < 5; k++)
        if (cfg->special_ids[k] < -1 || cfg->special_ids[k] >= cfg->vocab_size)
            return codir__fail(CODIR_ERR_INVALID, "special id %d is outside the vocabulary of %d", cfg->special_ids[k],
                               cfg->vocab_size);
    if (cfg->vocab_size - num_special < 1)
        return codir__fail(CODIR_ERR_INVALID, "a vocabulary of %d has no token besides the special ones",
                           cfg->vocab_size);
    return CODIR_OK;
}

/* A uniform double in [0, 1) from the top 53 bits. */
static double codir__unit(uint64_t bits) { return (double)(bits >> 11) * (1.0 / 9007199254740992.0); }

CODIR_DEF int codir_mlm_mask(codir_mlm_batch *mb, const codir_batch *batch, const codir_mlm_config *cfg,
                             uint64_t seed)
{
    int sorted[5], num_special, B = batch->batch, T = batch->seq, b, t, k, rc;
    size_t n = (size_t)B * (size_t)T;
    num_special = codir__mlm_sorted_specials(cfg, sorted);
    rc = codir__mlm_check(cfg, num_special);
    if (rc) return rc;
    if (n > mb->capacity)
        return codir__fail(CODIR_ERR_INVALID, "batch of %d x %d tokens exceeds the masked batch capacity of %zu", B, T,
                           mb->capacity);
    memcpy(mb->masked_ids, batch->ids.data, n * sizeof(int));
    mb->batch = *batch;
    mb->batch.ids.data = mb->masked_ids;
    mb->count = 0;

    for (b = 0; b < B; b++) {
        const int *ids = batch->ids.data + (size_t)b * T, *mask = batch->mask.data + (size_t)b * T;
        int *out = mb->masked_ids + (size_t)b * T, *pos = mb->positions + mb->count;
        uint64_t key = codir__hash64(codir__hash64(seed, 0x6d6c6dull), (uint64_t)(int64_t)batch->example_ids.data[b]);
        int eligible = 0, want, chosen = 0;

        /* The segment's eligible tokens: not padding, not special. */
        for (t = 0; t < T; t++) eligible += mask[t] && !codir__mlm_special(cfg, ids[t]);
        if (eligible == 0) continue;
        want = (int)floor((double)cfg->select_prob * eligible + 0.5);
        if (want < 1) want = 1;
        if (want > eligible) want = eligible;

        /* A uniform random subset of `want` tokens: the eligible positions with the
           smallest hash values, kept sorted by (hash, position) in pos[]. */
        for (t = 0; t < T; t++) {
            uint64_t h;
            if (!mask[t] || codir__mlm_special(cfg, ids[t])) continue;
            h = codir__hash64(key, 3 * (uint64_t)t);
            if (chosen == want && h >= codir__hash64(key, 3 * (uint64_t)pos[chosen - 1])) continue;
            k = chosen < want ? chosen++ : want - 1;
            for (; k > 0 && codir__hash64(key, 3 * (uint64_t)pos[k - 1]) > h; k--) pos[k] = pos[k - 1];
            pos[k] = t;
        }

        /* Positions ascending, then replace each chosen token: 80% [MASK], 10% random,
           10% kept at the default rates. */
        for (k = 1; k < chosen; k++) {
            int p = pos[k], j = k;
            for (; j > 0 && pos[j - 1] > p; j--) pos[j] = pos[j - 1];
            pos[j] = p;
        }
        for (k = 0; k < chosen; k++) {
            int tt = pos[k];
            double u = codir__unit(codir__hash64(key, 3 * (uint64_t)tt + 1));
            mb->targets[mb->count + k] = ids[tt];
            if (u < (double)cfg->mask_prob) {
                out[tt] = cfg->mask_id;
            } else if (u < (double)cfg->mask_prob + (double)cfg->random_prob) {
                /* The r-th non-special id: skip each special id at or below it. */
                int r = (int)(codir__hash64(key, 3 * (uint64_t)tt + 2) % (uint64_t)(cfg->vocab_size - num_special)), j;
                for (j = 0; j < num_special; j++)
                    if (r >= sorted[j]) r++;
                out[tt] = r;
            }
            pos[k] = b * T + tt;
        }
        mb->count += chosen;
    }
    return CODIR_OK;
}

/* ---- losses and steps ---- */

CODIR_DEF codir_tensor *codir_mlm_loss(codir_ctx *ctx, const codir_model *model, codir_tensor *hidden,
                                       const codir_mlm_batch *mb, codir_tensor **logits_out)
{
    codir_tensor *logits;
    codir_itensor targets;
    if (logits_out) *logits_out = NULL;
    if (mb->count < 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "masked-LM loss: the batch has no chosen position");
    logits = codir_mlm_logits(ctx, model, hidden, mb->positions, mb->count);
    if (!logits) return NULL;
    memset(&targets, 0, sizeof targets);
    targets.data = mb->targets;
    targets.ndim = 1;
    targets.shape[0] = mb->count;
    targets.shape[1] = targets.shape[2] = targets.shape[3] = 1;
    targets.numel = (size_t)mb->count;
    if (logits_out) *logits_out = logits;
    return codir_cross_entropy(ctx, logits, &targets);
}

CODIR_DEF int codir_mlm_step(codir_ctx *ctx, codir_model *model, codir_adamw *opt, const codir_mlm_batch *mb,
                             float lr, codir_loss_terms *terms)
{
    uint64_t step = (uint64_t)opt->step;
    codir_output out;
    codir_tensor *loss;
    const char *bad;
    int rc;
    memset(terms, 0, sizeof *terms);
    if (!model->cfg.mlm_head)
        return codir__fail(CODIR_ERR_INVALID, "masked-LM training needs a model created with mlm_head = 1");
    if (mb->count == 0) return CODIR_OK;

    /* Forward with dropout, loss at the chosen positions, backward, update. */
    codir_params_zero_grad(&model->params);
    codir_ctx_begin(ctx, 1, 1, step);
    rc = codir_model_forward(ctx, model, &mb->batch, &out);
    if (rc) return rc;
    loss = codir_mlm_loss(ctx, model, out.hidden[out.num_hidden - 1], mb, NULL);
    if (!loss) return ctx->status;
    terms->task = terms->total = loss->data[0];
    rc = codir__check_terms(terms, step);
    if (!rc) rc = codir_backward(ctx, loss);
    if (rc) return rc;
    if ((bad = codir__nonfinite_grad(&model->params)))
        return codir__fail(CODIR_ERR_NONFINITE, "step %llu: gradient of %s is NaN or Inf", (unsigned long long)step, bad);
    codir_adamw_step(opt, &model->params, lr);
    return CODIR_OK;
}

/* Runs the CoDIR-Pre forward and backward passes; *zt_out receives the teacher
   projections for the bank update, or NULL when lambda is 0. */
static int codir__pretrain_backward(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                    codir_distiller *d, const codir_mlm_batch *mb, uint64_t step,
                                    codir_loss_terms *terms, codir_tensor **zt_out)
{
    codir_output s_out, t_out;
    codir_tensor *parts[3] = {NULL, NULL, NULL}, *loss, *zt = NULL, *t_logits = NULL, *s_logits = NULL;
    float weights[3];
    int rc, predict = mb->count > 0;
    *zt_out = NULL;

    /* 1. The frozen teacher, no dropout, no tape, and its logits at the chosen positions. */
    codir_ctx_begin(ctx, 0, 0, step);
    rc = codir_model_forward(ctx, teacher, &mb->batch, &t_out);
    if (rc) return rc;
    if (predict && d->cfg.beta != 0.0f) {
        t_logits = codir_mlm_logits(ctx, teacher, t_out.hidden[t_out.num_hidden - 1], mb->positions, mb->count);
        if (!t_logits) return ctx->status;
    }

    /* 2. The student with dropout, recorded for backward. */
    ctx->recording = 1;
    ctx->training = 1;
    rc = codir_model_forward(ctx, student, &mb->batch, &s_out);
    if (rc) return rc;

    /* 3. L = (1 - beta) L_mlm + beta L_kd + lambda L_crd. The KD term compares the two
       vocabulary distributions at the chosen positions only. */
    weights[0] = predict ? 1.0f - d->cfg.beta : 0.0f;
    weights[1] = predict ? d->cfg.beta : 0.0f;
    weights[2] = d->cfg.lambda;
    if (predict) parts[0] = codir_mlm_loss(ctx, student, s_out.hidden[s_out.num_hidden - 1], mb, &s_logits);
    if (weights[1] != 0.0f) parts[1] = codir_kl_div(ctx, s_logits, t_logits, d->cfg.temperature);
    if (weights[2] != 0.0f) parts[2] = codir_crd_loss(ctx, d, &s_out, &t_out, &mb->batch, &zt);
    loss = codir_weighted_sum(ctx, parts, weights, 3);
    if (!loss) return ctx->status;
    terms->task = parts[0] ? parts[0]->data[0] : 0.0;
    terms->kd = parts[1] ? parts[1]->data[0] : 0.0;
    terms->crd = parts[2] ? parts[2]->data[0] : 0.0;
    terms->total = loss->data[0];
    rc = codir__check_terms(terms, step);
    if (rc) return rc;

    /* 4. Backward into the student and both projection heads. */
    *zt_out = zt;
    return codir_backward(ctx, loss);
}

CODIR_DEF int codir_pretrain_distill_step(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                          codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                          const codir_mlm_batch *mb, float lr, codir_loss_terms *terms)
{
    uint64_t step = (uint64_t)opt_student->step;
    codir_tensor *zt;
    const char *bad;
    int rc;
    memset(terms, 0, sizeof *terms);
    if (!student->cfg.mlm_head || !teacher->cfg.mlm_head)
        return codir__fail(CODIR_ERR_INVALID, "CoDIR-Pre needs a student and a teacher created with mlm_head = 1");
    if (student->cfg.vocab_size != teacher->cfg.vocab_size)
        return codir__fail(CODIR_ERR_INVALID, "student vocabulary %d differs from the teacher's %d",
                           student->cfg.vocab_size, teacher->cfg.vocab_size);
    if (mb->count == 0 && d->cfg.lambda == 0.0f) return CODIR_OK;
    codir_params_zero_grad(&student->params);
    codir_params_zero_grad(&d->params);
    rc = codir__pretrain_backward(ctx, student, teacher, d, mb, step, terms, &zt);
    if (rc) return rc;
    if ((bad = codir__nonfinite_grad(&student->params)) || (bad = codir__nonfinite_grad(&d->params)))
        return codir__fail(CODIR_ERR_NONFINITE, "step %llu: gradient of %s is NaN or Inf", (unsigned long long)step, bad);
    codir_adamw_step(opt_student, &student->params, lr);
    codir_adamw_step(opt_heads, &d->params, lr);

    /* The bank moves only after the step succeeded, so a rejected step leaves it as it was. */
    if (zt) codir_bank_update(d, zt->data, mb->batch.example_ids.data, mb->batch.batch);
    return CODIR_OK;
}

/* ---- evaluation ---- */

CODIR_DEF int codir_mlm_evaluate(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc,
                                 int batch_size, const codir_mlm_config *cfg, uint64_t seed,
                                 codir_mlm_scores *scores)
{
    codir_batch batch;
    codir_mlm_batch mb;
    double nll = 0.0;
    long correct = 0, count = 0;
    int start, rc, V = model->cfg.vocab_size;
    scores->accuracy = scores->loss = scores->perplexity = NAN;
    scores->count = 0;
    if (!model->cfg.mlm_head)
        return codir__fail(CODIR_ERR_INVALID, "masked-LM evaluation needs a model created with mlm_head = 1");
    if (enc->count < 1) return codir__fail(CODIR_ERR_INVALID, "cannot evaluate on an empty data set");
    if (batch_size < 1) return codir__fail(CODIR_ERR_INVALID, "batch size %d must be positive", batch_size);
    rc = codir_batch_init(&batch, batch_size, enc->max_len);
    if (rc) return rc;
    rc = codir_mlm_batch_init(&mb, batch_size, enc->max_len);
    if (rc) {
        codir_batch_free(&batch);
        return rc;
    }
    for (start = 0; start < enc->count && !rc; start += batch_size) {
        int n = enc->count - start < batch_size ? enc->count - start : batch_size, i, v;
        codir_output out;
        codir_tensor *logits;
        rc = codir_batch_fill(&batch, enc, NULL, start, n);
        if (!rc) rc = codir_mlm_mask(&mb, &batch, cfg, seed);
        if (rc || mb.count == 0) continue;
        codir_ctx_begin(ctx, 0, 0, 0);
        rc = codir_model_forward(ctx, model, &mb.batch, &out);
        if (rc) break;
        logits = codir_mlm_logits(ctx, model, out.hidden[out.num_hidden - 1], mb.positions, mb.count);
        if (!logits) {
            rc = ctx->status ? ctx->status : CODIR_ERR_INVALID;
            break;
        }

        /* -log softmax(row)[target] in float64, with the maximum taken out. */
        for (i = 0; i < mb.count; i++) {
            const float *row = logits->data + (size_t)i * V;
            int best = 0;
            double sum = 0.0;
            for (v = 1; v < V; v++)
                if (row[v] > row[best]) best = v;
            for (v = 0; v < V; v++) sum += exp((double)row[v] - row[best]);
            nll += log(sum) - ((double)row[mb.targets[i]] - row[best]);
            correct += best == mb.targets[i];
        }
        count += mb.count;
    }
    codir_batch_free(&batch);
    codir_mlm_batch_free(&mb);
    if (rc) return rc;
    if (count == 0) return codir__fail(CODIR_ERR_INVALID, "no segment has a token to predict");
    scores->count = count;
    scores->accuracy = (double)correct / (double)count;
    scores->loss = nll / (double)count;
    scores->perplexity = exp(scores->loss);
    return CODIR_OK;
}

#endif /* CODIR_IMPLEMENTATION_DONE */
#endif /* CODIR_IMPLEMENTATION */

/*
MIT License

Copyright (c) 2026 the codir.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify,
merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following
conditions:

The above copyright notice and this permission notice shall be included in all copies
or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE
OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
*/
