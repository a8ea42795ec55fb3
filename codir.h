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
     4. GEMM                          C = alpha op(A) op(B) + beta C
     5. Autograd                      tape of ops that call the kernels
     6. Transformer                   BERT-style post-LayerNorm encoder
     7. Losses                        task, KD and the contrastive term, memory bank
     8. Optimizer                     AdamW with linear warmup and decay
     9. Data and tokenizer            WordPiece, vocabulary builder, TSV, batches
    10. Training loop                 task step, CoDIR step, evaluation

   Compile-time options (define before the #include that has CODIR_IMPLEMENTATION,
   or before every #include for CODIR_STATIC):
     CODIR_STATIC       make every public function static to its translation unit
     CODIR_MALLOC(n), CODIR_REALLOC(p, n), CODIR_FREE(p)
                        replace the allocator; define all three or none
     CODIR_ASSERT(x)    internal invariant check; by default prints file:line and
                        the expression to stderr and aborts, also under NDEBUG
     CODIR_NO_SIMD      use the portable scalar GEMM micro-kernel only

   Quick start: examples/distill.c trains a teacher on review sentences and distils it
   into a student with half the layers.

   Limitations:
     - float32 on the CPU only; no mixed precision.
     - Single sentences only in this version: no sentence pairs, no regression head,
       no masked-LM head.
     - The contrastive term implements the InfoNCE form with mean pooling only.
     - The tokenizer lowercases and splits ASCII punctuation; it does not apply
       Unicode normalization or accent stripping, so it can differ from Hugging Face's
       BERT tokenizer on non-ASCII text.
*/
#ifndef CODIR_H
#define CODIR_H

#include <stddef.h>
#include <stdint.h>

#ifdef CODIR_STATIC
#define CODIR_DEF static
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
   arena of a codir_ctx. */
typedef struct codir_tensor {
    float *data;                /* [numel] values */
    float *grad;                /* [numel] gradient, or NULL when none is tracked */
    int ndim;                   /* 1 to CODIR_MAX_DIMS */
    int shape[CODIR_MAX_DIMS];  /* sizes, outermost first; unused entries are 1 */
    size_t numel;               /* product of the shape */
    int no_decay;               /* parameters only: 1 excludes it from weight decay */
    const char *name;           /* parameters only: stable name, e.g. "layer.0.ln1.gamma" */
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
   probabilities, which the backward pass reads. out[B,T,C]. */
CODIR_DEF void codir_attention_forward(float *out, float *att, const float *qkv, const int *mask,
                                       int B, int T, int C, int NH);
CODIR_DEF void codir_attention_backward(float *dqkv, const float *dout, const float *qkv,
                                        const float *att, int B, int T, int C, int NH);

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
   its end; codir_last_error() and ctx->status say what went wrong. */

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

/* Seeds loss->grad with 1, zeroes the gradients of all recorded intermediate tensors
   and runs the tape backward. Parameter gradients accumulate: zero them first. */
CODIR_DEF int codir_backward(codir_ctx *ctx, codir_tensor *loss);
/* The same with the seed gradient `seed` instead of 1. */
CODIR_DEF int codir_backward_scaled(codir_ctx *ctx, codir_tensor *loss, float seed);

/* x[..., C] w[OC, C]^T + b[OC] -> [..., OC]; b may be NULL. */
CODIR_DEF codir_tensor *codir_linear(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b);
CODIR_DEF codir_tensor *codir_add(codir_ctx *ctx, codir_tensor *a, codir_tensor *b);
CODIR_DEF codir_tensor *codir_layernorm(codir_ctx *ctx, codir_tensor *x, codir_tensor *gamma,
                                        codir_tensor *beta, float eps);
CODIR_DEF codir_tensor *codir_gelu(codir_ctx *ctx, codir_tensor *x);
CODIR_DEF codir_tensor *codir_tanh(codir_ctx *ctx, codir_tensor *x);
CODIR_DEF codir_tensor *codir_softmax(codir_ctx *ctx, codir_tensor *x);
/* qkv[B,T,3C], mask[B,T] -> [B,T,C] */
CODIR_DEF codir_tensor *codir_attention(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask, int num_heads);
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
} codir_model;

/* Creates a model with BERT's initialization: weights from N(0, 0.02^2), biases 0,
   LayerNorm gamma 1 and beta 0. Returns NULL on failure. */
CODIR_DEF codir_model *codir_model_create(const codir_config *cfg, uint64_t seed);
CODIR_DEF void codir_model_free(codir_model *model);

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
   nothing is recorded unless ctx->recording. Returns CODIR_OK or an error. */
CODIR_DEF int codir_model_forward(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
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
   decoder weight cls.predictions.decoder.weight is not written, as Hugging Face's own
   safetensors export drops tensors that share memory. vocab.txt belongs in the folder
   too; save it with codir_vocab_save. */

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

/* Writes dir/model.safetensors (with metadata {"format": "pt"}, which Hugging Face's
   loader requires) and dir/config.json. `dir` must exist. Each file is written to a
   .tmp file and renamed, so neither is ever left half-written, but a crash between the
   two renames can leave a new weights file beside an old config.json. */
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
   config.json. Returns NULL on failure. */
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
    double max_bank_bytes;      /* refuse memory banks larger than this; 4 GiB */
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
   as many as exist. Regression: see codir_distiller_set_targets. Never the anchor. */
CODIR_DEF int codir_sample_negatives(codir_distiller *d, int anchor, int *out, int K);

/* Values of each term after a step. */
typedef struct codir_loss_terms {
    double total, task, kd, crd;
} codir_loss_terms;

/* Builds the contrastive term of a batch: mean-pools the mapped layers of student and
   teacher over non-padding tokens, concatenates them, projects and L2-normalizes both,
   and scores each student projection against its teacher projection and K bank rows.
   *zt_out receives the teacher projections [B,D] for codir_bank_update. */
CODIR_DEF codir_tensor *codir_crd_loss(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                       const codir_output *teacher, const codir_batch *batch,
                                       codir_tensor **zt_out);
/* Moves bank rows toward new teacher projections: row <- normalize(m row + (1 - m) z).
   In NCE mode the student bank moves toward d->last_zs the same way. */
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

   Tokenization follows BERT's tokenizer (google-research/bert tokenization.py, which
   Hugging Face's BertTokenizer copies). It drops NUL, U+FFFD and control characters,
   splits on whitespace, optionally lowercases, and splits off punctuation and CJK
   ideographs as single-character words. Then it cuts each word into the longest
   vocabulary pieces from the left, continuation pieces carrying a "##" prefix. A word
   that cannot be cut completely, or that is longer than 100 characters, becomes one
   [UNK]. Text is UTF-8. Each invalid byte counts as U+FFFD and is dropped, so
   "ab\xFFcd" is the word "abcd". Lowercasing covers ASCII letters only, and only ASCII
   punctuation is split. */

/* A WordPiece vocabulary: token strings indexed by id, as in BERT's vocab.txt. */
typedef struct codir_vocab {
    int size;              /* number of tokens; ids are 0..size-1 */
    char **tokens;         /* [size] NUL-terminated token strings */
    int pad_id, unk_id, cls_id, sep_id, mask_id;
    int lowercase;         /* 1: lowercase ASCII before matching */
    /* private: an open-addressing hash table from token to id */
    int *table; size_t table_size;
} codir_vocab;

/* Loads a vocab.txt: one token per line, id = line index (0-based), "\n" or "\r\n"
   line ends, an optional UTF-8 BOM. The file must contain [PAD], [UNK], [CLS], [SEP]
   and [MASK]. If a token occurs twice, lookups return the later id, as in Hugging
   Face's loader. `lowercase` (0 or 1) is stored in the vocabulary and applied by
   codir_tokenize. Returns NULL on failure. */
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

/* Writes at most max_ids WordPiece ids of text (no special tokens) to ids. Returns the
   total count of pieces, which may exceed max_ids as with snprintf, or a negative
   error. ids may be NULL when max_ids is 0, to measure the length first. Special-token
   strings in the text, such as "[SEP]", are split like any other text. */
CODIR_DEF int codir_tokenize(const codir_vocab *vocab, const char *text, int *ids, int max_ids);

/* Writes [CLS] pieces [SEP] truncated to max_len ids and returns the length (>= 2) or
   a negative error. Truncation drops pieces from the end and keeps [SEP]. A max_len
   below 2 is CODIR_ERR_INVALID. */
CODIR_DEF int codir_encode(const codir_vocab *vocab, const char *text, int *ids, int max_len);

/* Labelled single sentences, as read from a GLUE-style TSV file. */
typedef struct codir_dataset {
    int count;             /* number of examples */
    char **texts;          /* [count] sentences */
    int *labels;           /* [count] class ids */
    int num_classes;       /* max label + 1 */
} codir_dataset;

/* Reads a GLUE-style single-sentence TSV file such as SST-2's train.tsv. The first
   line is a header that names the columns. The columns named "sentence" and "label"
   are read, and other columns are ignored. Fields are separated by tabs only, and
   quotes are literal text. Every row must have as many fields as the header and an
   integer label >= 0. "\r\n" line ends, a UTF-8 BOM, a missing final newline and empty
   lines at the end are accepted. A malformed row fails the whole load with a message
   that starts "path:line:". Returns NULL on failure. */
CODIR_DEF codir_dataset *codir_dataset_load_tsv(const char *path);

/* Frees the dataset and its sentences; NULL is allowed. */
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
/* Writes the model's outputs for every example of enc to out[count, num_labels], in
   batches of batch_size, without dropout or tape. */
CODIR_DEF int codir_predict(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc, int batch_size,
                            float *out);

/* GLUE's metrics. Classification: accuracy, F1 of class 1 (MRPC, QQP) and Matthews
   correlation (CoLA); regression: Pearson and Spearman correlation (STS-B). A metric
   that does not apply, or whose denominator is zero, is NaN (so is F1 with no
   positive prediction and no positive label). */
typedef struct codir_scores {
    double accuracy, f1, matthews;
    double pearson, spearman;
} codir_scores;

CODIR_DEF double codir_accuracy(const int *pred, const int *gold, int n);
/* F1 of class `positive`: 2 tp / (2 tp + fp + fn). */
CODIR_DEF double codir_f1(const int *pred, const int *gold, int n, int positive);
/* Matthews correlation for any number of classes (Gorodkin's R_K, as
   sklearn.metrics.matthews_corrcoef); the usual phi coefficient for two. */
CODIR_DEF double codir_matthews(const int *pred, const int *gold, int n, int num_classes);
CODIR_DEF double codir_pearson(const float *x, const float *y, int n);
/* Pearson correlation of the ranks; tied values share their average rank. Returns
   CODIR_OK, or CODIR_ERR_NOMEM for its rank buffers. */
CODIR_DEF int codir_spearman(const float *x, const float *y, int n, double *out);

/* Scores of model on enc: every metric that applies to its task, the rest NaN. */
CODIR_DEF int codir_evaluate(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc,
                             int batch_size, codir_scores *scores);

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
    p = codir__malloc(n);
    if (p) memset(p, 0, n);
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

CODIR_DEF void codir_params_zero_grad(codir_params *params)
{
    memset(params->grad, 0, params->count * sizeof(float));
}

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
    if (arena->extra) {
        /* The last step overflowed: replace all blocks by one of the high-water size. */
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
#else
#define CODIR__OMP_FOR(work)
#endif

/* ---- linear ---- */

CODIR_DEF int codir_linear_forward(struct codir_gemm_ws *ws, float *out, const float *inp, const float *w,
                                   const float *b, int N, int C, int OC)
{
    int i, o;
    if (!b) return codir_gemm(ws, 0, 1, N, OC, C, 1.0f, inp, C, w, C, 0.0f, out, OC);

    /* Start from the bias and let GEMM add x W^T onto it. */
    for (i = 0; i < N; i++)
        for (o = 0; o < OC; o++) out[(size_t)i * OC + o] = b[o];
    return codir_gemm(ws, 0, 1, N, OC, C, 1.0f, inp, C, w, C, 1.0f, out, OC);
}

CODIR_DEF int codir_linear_backward(struct codir_gemm_ws *ws, float *dinp, float *dw, float *db,
                                    const float *dout, const float *inp, const float *w, int N, int C, int OC)
{
    int rc = CODIR_OK, i, o;

    /* dinp[N,C] += dout[N,OC] w[OC,C] */
    if (dinp) rc = codir_gemm(ws, 0, 0, N, C, OC, 1.0f, dout, OC, w, C, 1.0f, dinp, C);

    /* dw[OC,C] += dout^T[OC,N] inp[N,C] */
    if (rc == CODIR_OK && dw) rc = codir_gemm(ws, 1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dw, C);

    /* db[OC] += column sums of dout */
    if (rc == CODIR_OK && db) {
        CODIR__OMP_FOR((double)N * OC)
        for (o = 0; o < OC; o++) {
            float sum = 0.0f;
            for (i = 0; i < N; i++) sum += dout[(size_t)i * OC + o];
            db[o] += sum;
        }
    }
    return rc;
}

/* ---- add ---- */

CODIR_DEF void codir_add_forward(float *out, const float *a, const float *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) out[i] = a[i] + b[i];
}

CODIR_DEF void codir_add_backward(float *da, float *db, const float *dout, size_t n)
{
    size_t i;
    if (da)
        for (i = 0; i < n; i++) da[i] += dout[i];
    if (db)
        for (i = 0; i < n; i++) db[i] += dout[i];
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
        for (c = 0; c < C; c++) m += x[c];
        m /= C;
        for (c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        v /= C;
        fr = (float)(1.0 / sqrt(v + eps));

        for (c = 0; c < C; c++) y[c] = (float)((x[c] - m) * fr) * gamma[c] + beta[c];
        if (mean) mean[i] = m;
        if (rstd) rstd[i] = fr;
    }
}

CODIR_DEF void codir_layernorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                                        const float *inp, const float *gamma, const double *mean,
                                        const float *rstd, int N, int C)
{
    int i, c;

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
            for (k = 0; k < C; k++) {
                float xhat = (float)((x[k] - mean[i]) * rstd[i]);
                float g = dy[k] * gamma[k];
                sum_g += g;
                sum_gx += g * xhat;
            }
            g_mean = (float)(sum_g / C);
            gx_mean = (float)(sum_gx / C);
            for (k = 0; k < C; k++) {
                float xhat = (float)((x[k] - mean[i]) * rstd[i]);
                dx[k] += rstd[i] * (dy[k] * gamma[k] - g_mean - xhat * gx_mean);
            }
        }
    }

    /* dgamma = sum over rows of dout * xhat, dbeta = sum over rows of dout */
    if (dgamma || dbeta) {
        CODIR__OMP_FOR((double)N * C)
        for (c = 0; c < C; c++) {
            float sg = 0.0f, sb = 0.0f;
            for (i = 0; i < N; i++) {
                float dy = dout[(size_t)i * C + c];
                sg += dy * (float)((inp[(size_t)i * C + c] - mean[i]) * rstd[i]);
                sb += dy;
            }
            if (dgamma) dgamma[c] += sg;
            if (dbeta) dbeta[c] += sb;
        }
    }
}

/* ---- GELU, tanh ---- */

#define CODIR__SQRT1_2 0.70710678118654752440
#define CODIR__INV_SQRT_2PI 0.39894228040143267794

CODIR_DEF void codir_gelu_forward(float *out, const float *inp, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) out[i] = 0.5f * inp[i] * (1.0f + erff(inp[i] * (float)CODIR__SQRT1_2));
}

CODIR_DEF void codir_gelu_backward(float *dinp, const float *inp, const float *dout, size_t n)
{
    size_t i;
    /* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
    for (i = 0; i < n; i++) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * (float)CODIR__SQRT1_2));
        float pdf = (float)CODIR__INV_SQRT_2PI * expf(-0.5f * x * x);
        dinp[i] += dout[i] * (cdf + x * pdf);
    }
}

CODIR_DEF void codir_tanh_forward(float *out, const float *inp, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) out[i] = tanhf(inp[i]);
}

CODIR_DEF void codir_tanh_backward(float *dinp, const float *out, const float *dout, size_t n)
{
    size_t i;
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

CODIR_DEF void codir_attention_forward(float *out, float *att, const float *qkv, const int *mask,
                                       int B, int T, int C, int NH)
{
    int HS = C / NH, bh;
    float scale = 1.0f / sqrtf((float)HS);
    CODIR__OMP_FOR((double)B * T * T * C)
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH, t, j, k;
        const int *keep = mask + (size_t)b * T;
        for (t = 0; t < T; t++) {
            const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * HS;
            float *p = att + (((size_t)b * NH + h) * T + t) * T;
            float *o = out + ((size_t)b * T + t) * C + h * HS;
            float mx = -INFINITY;
            double sum = 0.0;

            /* scores q . k_j / sqrt(HS) over the keys that are not padding */
            for (j = 0; j < T; j++) {
                const float *kj = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                float s = 0.0f;
                if (!keep[j]) {
                    p[j] = -INFINITY;
                    continue;
                }
                for (k = 0; k < HS; k++) s += q[k] * kj[k];
                p[j] = s * scale;
                mx = p[j] > mx ? p[j] : mx;
            }

            /* softmax; a row with no key left stays all zero instead of 0/0 = NaN */
            for (j = 0; j < T; j++) {
                p[j] = keep[j] ? expf(p[j] - mx) : 0.0f;
                sum += p[j];
            }
            for (j = 0; j < T; j++) p[j] = sum != 0.0 ? (float)(p[j] / sum) : 0.0f;

            /* weighted sum of the values */
            for (k = 0; k < HS; k++) o[k] = 0.0f;
            for (j = 0; j < T; j++) {
                const float *vj = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
                if (p[j] == 0.0f) continue;
                for (k = 0; k < HS; k++) o[k] += p[j] * vj[k];
            }
        }
    }
}

CODIR_DEF void codir_attention_backward(float *dqkv, const float *dout, const float *qkv,
                                        const float *att, int B, int T, int C, int NH)
{
    int HS = C / NH, bh;
    float scale = 1.0f / sqrtf((float)HS);
    /* Each (batch, head) pair owns its slice of dqkv, so the pairs run in parallel. */
    CODIR__OMP_FOR((double)B * T * T * C)
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH, t, j, k;
        for (t = 0; t < T; t++) {
            const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * HS;
            float *dq = dqkv + ((size_t)b * T + t) * 3 * C + h * HS;
            const float *p = att + (((size_t)b * NH + h) * T + t) * T;
            const float *dy = dout + ((size_t)b * T + t) * C + h * HS;
            double dot = 0.0;

            /* o = sum_j p_j v_j: dv_j += p_j dy, and dp_j = dy . v_j.
               The softmax backward needs sum_j p_j dp_j first. */
            for (j = 0; j < T; j++) {
                const float *vj = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
                float *dvj = dqkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
                float dp = 0.0f;
                if (p[j] == 0.0f) continue;
                for (k = 0; k < HS; k++) {
                    dvj[k] += p[j] * dy[k];
                    dp += dy[k] * vj[k];
                }
                dot += (double)p[j] * dp;
            }

            /* ds_j = p_j (dp_j - sum p dp); s_j = scale q . k_j */
            for (j = 0; j < T; j++) {
                const float *vj = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
                const float *kj = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                float *dkj = dqkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
                float dp = 0.0f, ds;
                if (p[j] == 0.0f) continue;
                for (k = 0; k < HS; k++) dp += dy[k] * vj[k];
                ds = p[j] * (dp - (float)dot) * scale;
                for (k = 0; k < HS; k++) {
                    dq[k] += ds * kj[k];
                    dkj[k] += ds * q[k];
                }
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
static uint64_t codir__hash64(uint64_t key, uint64_t i)
{
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* 1 if element i is kept: its 24 random bits, as a fraction of 2^24, are >= p. */
static int codir__dropout_keep(uint64_t key, size_t i, float p)
{
    uint32_t bits = (uint32_t)(codir__hash64(key, (uint64_t)i) >> 40);
    return (double)bits >= (double)p * 16777216.0;
}

CODIR_DEF void codir_dropout_forward(float *out, const float *inp, size_t n, float p, uint64_t key)
{
    float scale = 1.0f / (1.0f - p);
    size_t i;
    for (i = 0; i < n; i++) out[i] = codir__dropout_keep(key, i, p) ? inp[i] * scale : 0.0f;
}

CODIR_DEF void codir_dropout_backward(float *dinp, const float *dout, size_t n, float p, uint64_t key)
{
    float scale = 1.0f / (1.0f - p);
    size_t i;
    for (i = 0; i < n; i++)
        if (codir__dropout_keep(key, i, p)) dinp[i] += dout[i] * scale;
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
    int b, t, c;
    for (b = 0; b < B; b++) {
        int n = codir__count_tokens(mask + (size_t)b * T, T);
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
    int b, t, c;
    for (b = 0; b < B; b++) {
        int n = codir__count_tokens(mask + (size_t)b * T, T);
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
   its own A~ and B~ buffers. So the threads never wait for each other, at the price
   of packing the shared operand once per thread. Sharing one B~ would need two
   barriers per KC block, and each barrier stalls the team whenever the OS deschedules
   one of its threads, as happens when another process keeps a core busy.
   Every element of C is computed by one thread with the same sequence of operations
   whatever the thread count, so results are bit-identical for any number of threads.
   KC depends only on k for the same reason. */

#if !defined(CODIR_NO_SIMD) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* x86-64 with GCC or Clang: both SIMD kernels are compiled with target attributes and
   one is picked at run time, so no -mavx2 or -march flag is needed. */
#define CODIR__GEMM_AVX512 1
#define CODIR__GEMM_AVX2 1
#define CODIR__GEMM_RUNTIME_DISPATCH 1
#define CODIR__GEMM_TARGET_AVX512 __attribute__((target("avx512f")))
#define CODIR__GEMM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#elif !defined(CODIR_NO_SIMD) && defined(__AVX512F__)
/* Other compilers: use what the build flags enable (for example MSVC /arch:AVX512). */
#define CODIR__GEMM_AVX512 1
#define CODIR__GEMM_TARGET_AVX512
#include <immintrin.h>
#elif !defined(CODIR_NO_SIMD) && defined(__AVX2__) && defined(__FMA__)
#define CODIR__GEMM_AVX2 1
#define CODIR__GEMM_TARGET_AVX2
#include <immintrin.h>
#elif !defined(CODIR_NO_SIMD) && defined(__aarch64__) && defined(__ARM_NEON)
#define CODIR__GEMM_NEON 1
#include <arm_neon.h>
#endif

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

#ifdef CODIR__GEMM_AVX512
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

CODIR__GEMM_TARGET_AVX512
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
#endif /* CODIR__GEMM_AVX512 */

#ifdef CODIR__GEMM_AVX2
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

CODIR__GEMM_TARGET_AVX2
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
#endif /* CODIR__GEMM_AVX2 */

#ifdef CODIR__GEMM_NEON
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
#endif /* CODIR__GEMM_NEON */

/* ---- GEMM: kernel selection ---- */

#ifdef CODIR__GEMM_AVX512
static const codir__gemm_kernel codir__gemm_avx512 = {
    "avx512", codir__gemm_kernel_avx512, CODIR__GEMM_AVX512_MR, CODIR__GEMM_AVX512_NR,
    CODIR__GEMM_AVX512_MC, CODIR__GEMM_AVX512_KC, CODIR__GEMM_AVX512_NC};
#endif
#ifdef CODIR__GEMM_AVX2
static const codir__gemm_kernel codir__gemm_avx2 = {
    "avx2", codir__gemm_kernel_avx2, CODIR__GEMM_AVX2_MR, CODIR__GEMM_AVX2_NR,
    CODIR__GEMM_AVX2_MC, CODIR__GEMM_AVX2_KC, CODIR__GEMM_AVX2_NC};
#endif
#ifdef CODIR__GEMM_NEON
static const codir__gemm_kernel codir__gemm_neon = {
    "neon", codir__gemm_kernel_neon, CODIR__GEMM_NEON_MR, CODIR__GEMM_NEON_NR,
    CODIR__GEMM_NEON_MC, CODIR__GEMM_NEON_KC, CODIR__GEMM_NEON_NC};
#endif
static const codir__gemm_kernel codir__gemm_scalar = {
    "scalar", codir__gemm_kernel_scalar, CODIR__GEMM_SCALAR_MR, CODIR__GEMM_SCALAR_NR,
    CODIR__GEMM_SCALAR_MC, CODIR__GEMM_SCALAR_KC, CODIR__GEMM_SCALAR_NC};

/* Returns the fastest kernel this build and CPU support. __builtin_cpu_supports reads
   CPU features that the runtime library detected before main, and it checks that the OS
   saves the vector registers, so the call is cheap and safe from any thread. */
static const codir__gemm_kernel *codir__gemm_select_kernel(void)
{
#if defined(CODIR__GEMM_RUNTIME_DISPATCH)
    if (__builtin_cpu_supports("avx512f")) return &codir__gemm_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &codir__gemm_avx2;
    return &codir__gemm_scalar;
#elif defined(CODIR__GEMM_AVX512)
    return &codir__gemm_avx512;
#elif defined(CODIR__GEMM_AVX2)
    return &codir__gemm_avx2;
#elif defined(CODIR__GEMM_NEON)
    return &codir__gemm_neon;
#else
    return &codir__gemm_scalar;
#endif
}

CODIR_DEF const char *codir_gemm_kernel_name(void) { return codir__gemm_select_kernel()->name; }

/* ---- GEMM: workspace ---- */

/* One packing buffer: `data` is `raw` rounded up to CODIR__GEMM_ALIGN bytes. */
typedef struct codir__gemm_buffer {
    void *raw;
    float *data;
    size_t capacity;  /* floats usable from data */
} codir__gemm_buffer;

struct codir_gemm_ws {
    codir__gemm_buffer a_packs;  /* one A~ block per thread, each a_stride floats apart */
    codir__gemm_buffer b_packs;  /* one B~ panel per thread, each b_stride floats apart */
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

/* Packs op(A)[i0 : i0+mc, p0 : p0+kc] into A~ (layout above): ceil(mc/mr) panels of
   mr x kc, rows past mc zero. */
static void codir__gemm_pack_a(int trans_a, const float *a, int lda, int i0, int mc, int p0, int kc, int mr,
                               float *packed)
{
    int ir, i, p;
    for (ir = 0; ir < mc; ir += mr) {
        int rows = mc - ir < mr ? mc - ir : mr;
        float *dst = packed + (size_t)ir * (size_t)kc;

        if (trans_a) {
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
            codir__gemm_pack_a_rows(src, (size_t)lda, rows, kc, mr, dst);
        }
    }
}

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
    float *a_packs;         /* thread t packs A~ at a_packs + t * a_stride */
    size_t a_stride;
    float *b_packs;         /* thread t packs B~ at b_packs + t * b_stride */
    size_t b_stride;
} codir__gemm_plan;

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
   columns) of C, with its own A~ and B~ buffers. */
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

            codir__gemm_pack_b(plan->trans_b, plan->b, plan->ldb, pc, kc, jc, nc, nr, 0, n_panels, b_pack);

            for (ic = row_lo; ic < row_hi; ic += plan->mc) {
                int mc = row_hi - ic < plan->mc ? row_hi - ic : plan->mc;
                codir__gemm_pack_a(plan->trans_a, plan->a, plan->lda, ic, mc, pc, kc, mr, a_pack);

                /* Macro-kernel: each KC x NR panel of B~ stays in cache while all
                   MR-panels of A~ pass it. */
                for (jr_panel = 0; jr_panel < n_panels; jr_panel++) {
                    int jr = jr_panel * nr;
                    int cols = nc - jr < nr ? nc - jr : nr;
                    const float *b_panel = b_pack + (size_t)jr * (size_t)kc;
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

CODIR_DEF int codir_gemm(codir_gemm_ws *ws, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc)
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

    memset(&plan, 0, sizeof plan);
    plan.kernel = kernel;
    plan.trans_a = trans_a;
    plan.trans_b = trans_b;
    plan.m = m;
    plan.n = n;
    plan.k = k;
    plan.alpha = alpha;
    plan.beta = beta;
    plan.a = a;
    plan.b = b;
    plan.c = c;
    plan.lda = lda;
    plan.ldb = ldb;
    plan.ldc = ldc;
    /* Each thread packs all of op(B) for its rows, or all of op(A) for its columns, so
       split the larger of m and n: that duplicates the smaller operand. */
    plan.split_columns = threads > 1 && (m_panels < threads || (n > m && n_panels >= threads));

    /* KC depends on k alone, so the order of the sums, and with it every bit of the
       result, does not change with the thread count. MC and NC only move work. */
    plan.kc = codir__gemm_even_block(k, kernel->kc, 8);
    rows_per_thread = plan.split_columns ? m : ((m_panels + threads - 1) / threads) * kernel->mr;
    cols_per_thread = plan.split_columns ? ((n_panels + threads - 1) / threads) * kernel->nr : n;
    plan.mc = codir__gemm_even_block(rows_per_thread, kernel->mc, kernel->mr);
    plan.nc = codir__gemm_even_block(cols_per_thread, kernel->nc, kernel->nr);

    /* Buffer sizes: per thread one A~ block and one B~ panel of whole NR-panels, each
       rounded up to the alignment. The block sizes bound both, so only the products
       with the thread count need an overflow check.
       NOTE: B~ takes up to KC x NC floats per thread (4 MiB with the AVX-512 blocks),
       so the workspace grows linearly with the thread count. */
    plan.a_stride = codir__gemm_align_floats((size_t)plan.mc * (size_t)plan.kc);
    plan.b_stride = codir__gemm_align_floats((size_t)plan.kc * (size_t)((plan.nc + kernel->nr - 1) / kernel->nr * kernel->nr));
    if (!codir__size_mul(plan.a_stride, (size_t)threads, &a_floats) ||
        !codir__size_mul(plan.b_stride, (size_t)threads, &b_floats))
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

/* ===================================================================================
   5. Autograd (implementation)
   =================================================================================== */

enum codir__op {
    CODIR__OP_LINEAR,
    CODIR__OP_ADD,
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
    return (a && a->grad) || (b && b->grad) || (c && c->grad);
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
    n->in[0] = a;
    n->in[1] = b;
    n->in[2] = c;
    return n;
}

/* Returns a new tensor shaped like x but with last dimension `last`. */
static codir_tensor *codir__new_like(codir_ctx *ctx, const codir_tensor *x, int last, int with_grad)
{
    int shape[CODIR_MAX_DIMS], d;
    for (d = 0; d < x->ndim; d++) shape[d] = x->shape[d];
    shape[x->ndim - 1] = last;
    return codir_tensor_new(ctx, x->ndim, shape, with_grad);
}

/* Returns a new scalar (shape [1]). */
static codir_tensor *codir__new_scalar(codir_ctx *ctx, int with_grad)
{
    int one = 1;
    return codir_tensor_new(ctx, 1, &one, with_grad);
}

CODIR_DEF codir_tensor *codir_linear(codir_ctx *ctx, codir_tensor *x, codir_tensor *w, codir_tensor *b)
{
    codir_tensor *out;
    codir_node *node;
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
    out = codir__new_like(ctx, x, OC, rg);
    if (!out) return NULL;
    rc = codir_linear_forward(ctx->gemm, out->data, x->data, w->data, b ? b->data : NULL, N, C, OC);
    if (rc) return codir__op_failed(ctx, rc);
    if (rg && !(node = codir__record(ctx, CODIR__OP_LINEAR, out, x, w, b))) return NULL;
    return out;
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
    out = codir__new_like(ctx, a, a->shape[a->ndim - 1], rg);
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
    out = codir__new_like(ctx, x, C, rg);
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
    out = codir__new_like(ctx, x, x->shape[x->ndim - 1], rg);
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

CODIR_DEF codir_tensor *codir_attention(codir_ctx *ctx, codir_tensor *qkv, const codir_itensor *mask, int num_heads)
{
    codir_tensor *out;
    codir_node *node;
    float *att;
    int B, T, C, rg, shape[3];
    size_t att_n;
    if (!qkv) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
    if (qkv->ndim != 3 || qkv->shape[2] % 3 != 0)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "attention: qkv must be [B, T, 3C]");
    B = qkv->shape[0];
    T = qkv->shape[1];
    C = qkv->shape[2] / 3;
    if (num_heads < 1 || C % num_heads != 0)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "attention: %d heads do not divide width %d", num_heads, C);
    if (!mask || mask->numel != (size_t)B * T)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "attention: mask must be [%d, %d]", B, T);
    if (!codir__size_mul((size_t)B * num_heads, (size_t)T * T, &att_n))
        return codir__op_error(ctx, CODIR_ERR_OVERFLOW, "attention: B * NH * T * T overflows size_t");
    rg = codir__needs_grad(ctx, qkv, NULL, NULL);
    shape[0] = B;
    shape[1] = T;
    shape[2] = C;
    out = codir_tensor_new(ctx, 3, shape, rg);
    att = codir__scratch(ctx, att_n);
    if (!out || !att) return NULL;
    codir_attention_forward(out->data, att, qkv->data, mask->data, B, T, C, num_heads);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_ATTENTION, out, qkv, NULL, NULL))) return NULL;
        node->saved[0] = att;
        node->dims[0] = num_heads;
    }
    return out;
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
    out = codir_tensor_new(ctx, 3, shape, rg);
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

    /* The mask depends on the seed, the step and the op's position in the step only. */
    key = codir__hash64(codir__hash64(ctx->seed, ctx->step), ctx->dropout_calls++);
    rg = codir__needs_grad(ctx, x, NULL, NULL);
    out = codir__new_like(ctx, x, x->shape[x->ndim - 1], rg);
    if (!out) return NULL;
    codir_dropout_forward(out->data, x->data, x->numel, p, key);
    if (rg) {
        if (!(node = codir__record(ctx, CODIR__OP_DROPOUT, out, x, NULL, NULL))) return NULL;
        node->scalar = p;
        node->key = key;
    }
    return out;
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
    out = codir_tensor_new(ctx, 2, shape, rg);
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
    out = codir_tensor_new(ctx, 2, shape, rg);
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
    out = codir_tensor_new(ctx, 2, shape, rg);
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
    out = codir__new_like(ctx, x, C, rg);
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
    out = codir__new_scalar(ctx, rg);
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
    out = codir__new_scalar(ctx, rg);
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
    out = codir__new_scalar(ctx, rg);
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
    out = codir__new_scalar(ctx, rg);
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
    out = codir__new_scalar(ctx, rg);
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
    for (i = 0; i < count; i++) {
        if (!terms[i] && weights[i] != 0.0f) return codir__op_failed(ctx, ctx->status ? ctx->status : CODIR_ERR_INVALID);
        if (terms[i] && terms[i]->numel != 1)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "weighted sum: term %d is not a scalar", i);
        if (terms[i]) rg |= codir__needs_grad(ctx, terms[i], NULL, NULL);
    }
    out = codir__new_scalar(ctx, rg);
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
    case CODIR__OP_ADD:
        codir_add_backward(dx, y->grad, out->grad, out->numel);
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
    case CODIR__OP_ATTENTION:
        if (dx)
            codir_attention_backward(dx, out->grad, x->data, n->saved[0], x->shape[0], x->shape[1], x->shape[2] / 3,
                                     n->dims[0]);
        break;
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

CODIR_DEF int codir_backward_scaled(codir_ctx *ctx, codir_tensor *loss, float seed)
{
    int i, rc;
    if (ctx->status) return codir__fail(ctx->status, "backward after a failed forward op: %s", codir_last_error());
    if (!loss || !loss->grad || loss->numel != 1)
        return codir__fail(CODIR_ERR_INVALID, "backward needs a scalar loss recorded with a gradient");

    /* Intermediate gradients start from zero on every backward pass; only parameter
       gradients, which are not node outputs, accumulate across passes. */
    for (i = 0; i < ctx->tape_len; i++)
        memset(ctx->tape[i].out->grad, 0, ctx->tape[i].out->numel * sizeof(float));
    loss->grad[0] = seed;
    for (i = ctx->tape_len - 1; i >= 0; i--) {
        rc = codir__node_backward(ctx, &ctx->tape[i]);
        if (rc) return rc;
    }
    return CODIR_OK;
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

CODIR_DEF void codir_model_free(codir_model *model)
{
    if (!model) return;
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
                           "ffn %d vs %d, vocabulary %d vs %d, max_len %d vs %d, labels %d vs %d); initialize randomly instead",
                           s->hidden, t->hidden, s->num_heads, t->num_heads, s->ffn, t->ffn, s->vocab_size, t->vocab_size,
                           s->max_len, t->max_len, s->num_labels, t->num_labels);
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
    a = codir_dropout(ctx, a, cfg->dropout);
    x = codir_layernorm(ctx, codir_add(ctx, x, a), ly->ln1_gamma, ly->ln1_beta, cfg->ln_eps);

    /* feed-forward sub-block */
    h = codir_gelu(ctx, codir_linear(ctx, x, ly->ffn_up_w, ly->ffn_up_b));
    h = codir_linear(ctx, h, ly->ffn_down_w, ly->ffn_down_b);
    h = codir_dropout(ctx, h, cfg->dropout);
    return codir_layernorm(ctx, codir_add(ctx, x, h), ly->ln2_gamma, ly->ln2_beta, cfg->ln_eps);
}

CODIR_DEF int codir_model_forward(codir_ctx *ctx, const codir_model *model, const codir_batch *batch,
                                  codir_output *out)
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
        x = codir__block_forward(ctx, &model->layers[l], cfg, x, &batch->mask);
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
    return cfg;
}

/* Checks a distillation configuration against the two models. */
static int codir__distill_check(const codir_distill_config *cfg, const codir_config *student,
                                const codir_config *teacher, int num_examples)
{
    int k;
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
        if (!d->bank || !d->bank_s)
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

/* Orders example ids by target (ties by id) for the regression sampler. */
static void codir__sort_by_target(int *order, const float *targets, int n)
{
    int i, j;
    for (i = 0; i < n; i++) {
        int e = i;
        for (j = i; j > 0 && targets[order[j - 1]] > targets[e]; j--) order[j] = order[j - 1];
        order[j] = e;
    }
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
    codir__sort_by_target(order, t, d->num_examples);
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

CODIR_DEF int codir_sample_negatives(codir_distiller *d, int anchor, int *out, int K)
{
    int own, own_lo, own_n, pool, i;
    if (d->targets) return codir__sample_regression(d, anchor, out, K);
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

CODIR_DEF codir_tensor *codir_crd_loss(codir_ctx *ctx, codir_distiller *d, const codir_output *student,
                                       const codir_output *teacher, const codir_batch *batch,
                                       codir_tensor **zt_out)
{
    codir_tensor **fs, **ft, *zs, *zt, *dirs[2];
    static const float half[2] = {0.5f, 0.5f};
    int Ls = d->student_layers, k, b, B = batch->batch, K = d->cfg.num_negatives, drawn = K;
    int *neg, *idx;
    d->last_zs = NULL;
    if (student->num_hidden != Ls + 1 || teacher->num_hidden != d->teacher_layers + 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID, "contrastive loss: models do not match the distiller's layer counts");
    fs = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)Ls * sizeof *fs);
    ft = (codir_tensor **)codir_arena_alloc(&ctx->arena, (size_t)Ls * sizeof *ft);
    if (!fs || !ft) return codir__op_failed(ctx, CODIR_ERR_NOMEM);

    /* Pool each mapped layer (mean over non-padding tokens, or the first token) and
       concatenate: f_s is [B, Ls * Cs] and f_t is [B, Ls * Ct]; layer 0 (the
       embeddings) is not used. */
    for (k = 0; k < Ls; k++) {
        codir_tensor *hs = student->hidden[k + 1], *ht = teacher->hidden[d->layer_map[k]];
        fs[k] = d->cfg.pooling == CODIR_POOL_FIRST ? codir_select_first(ctx, hs) : codir_mean_pool(ctx, hs, &batch->mask);
        ft[k] = d->cfg.pooling == CODIR_POOL_FIRST ? codir_select_first(ctx, ht) : codir_mean_pool(ctx, ht, &batch->mask);
    }

    /* Project and L2-normalize: z = normalize(W f + b). */
    zs = codir_l2_normalize(ctx, codir_linear(ctx, codir_concat(ctx, fs, Ls), d->proj_s_w, d->proj_s_b));
    zt = codir_l2_normalize(ctx, codir_linear(ctx, codir_concat(ctx, ft, Ls), d->proj_t_w, d->proj_t_b));
    if (!zs || !zt) return NULL;

    /* K negatives per example; K shrinks to the smallest pool in the batch so every
       row has the same count. idx holds each row's own id first, then its negatives. */
    for (b = 0; b < B; b++) {
        int e = batch->example_ids.data[b], pool;
        if (e < 0 || e >= d->num_examples)
            return codir__op_error(ctx, CODIR_ERR_INVALID, "contrastive loss: example id %d is outside the bank of %d rows",
                                   e, d->num_examples);
        pool = d->targets ? d->num_examples - 1
                          : d->num_examples - (d->label_start[d->labels[e] + 1] - d->label_start[d->labels[e]]);
        if (pool < drawn) drawn = pool;
    }
    if (drawn < 1)
        return codir__op_error(ctx, CODIR_ERR_INVALID,
                               "contrastive loss: no negatives, because every training example has the same label");
    idx = (int *)codir_arena_alloc(&ctx->arena, (size_t)B * (size_t)(drawn + 1) * sizeof(int));
    neg = (int *)codir_arena_alloc(&ctx->arena, (size_t)B * (size_t)drawn * sizeof(int));
    if (!idx || !neg) return codir__op_failed(ctx, CODIR_ERR_NOMEM);
    for (b = 0; b < B; b++) {
        int *row = idx + (size_t)b * (drawn + 1);
        row[0] = batch->example_ids.data[b];
        codir_sample_negatives(d, row[0], row + 1, drawn);
        memcpy(neg + (size_t)b * drawn, row + 1, (size_t)drawn * sizeof(int));
    }
    if (zt_out) *zt_out = zt;
    d->last_zs = zs;
    if (d->cfg.mode == CODIR_CRD_INFONCE) return codir_infonce(ctx, zs, zt, d->bank, d->num_examples, neg, drawn, d->cfg.tau);

    /* NCE: the teacher projection scored against the student bank and the student
       projection against the teacher bank, averaged. The normalizers come from the
       first batch and stay frozen, as in the official code. */
    if (!d->z_ready) {
        d->log_z_t = codir_nce_log_normalizer(zt->data, d->bank_s, idx, B, d->cfg.proj_dim, drawn, d->cfg.tau,
                                              d->num_examples);
        d->log_z_s = codir_nce_log_normalizer(zs->data, d->bank, idx, B, d->cfg.proj_dim, drawn, d->cfg.tau,
                                              d->num_examples);
        d->z_ready = 1;
    }
    dirs[0] = codir_nce(ctx, zt, d->bank_s, d->num_examples, idx, drawn, d->cfg.tau, d->log_z_t, d->num_examples);
    dirs[1] = codir_nce(ctx, zs, d->bank, d->num_examples, idx, drawn, d->cfg.tau, d->log_z_s, d->num_examples);
    return codir_weighted_sum(ctx, dirs, half, 2);
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

CODIR_DEF void codir_adamw_step(codir_adamw *opt, codir_params *params, float lr)
{
    int i;
    double bc1, bc2;
    float step_size, bc2_sqrt;
    opt->step++;

    /* torch.optim.AdamW: p -= lr * wd * p; m, v updated; p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps) */
    bc1 = 1.0 - pow((double)opt->beta1, (double)opt->step);
    bc2 = 1.0 - pow((double)opt->beta2, (double)opt->step);
    step_size = (float)(lr / bc1);
    bc2_sqrt = (float)sqrt(bc2);
    for (i = 0; i < params->num_tensors; i++) {
        codir_tensor *t = &params->tensors[i];
        size_t off = (size_t)(t->data - params->data), k;
        float decay = t->no_decay ? 1.0f : 1.0f - lr * opt->weight_decay;
        float *p = t->data, *g = t->grad, *m = opt->m + off, *v = opt->v + off;
        for (k = 0; k < t->numel; k++) {
            p[k] *= decay;
            m[k] = opt->beta1 * m[k] + (1.0f - opt->beta1) * g[k];
            v[k] = opt->beta2 * v[k] + (1.0f - opt->beta2) * g[k] * g[k];
            p[k] -= step_size * m[k] / (sqrtf(v[k]) / bc2_sqrt + opt->eps);
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

typedef struct codir__range {
    uint32_t first, last;
} codir__range;

/* Unicode general category Cf (format characters such as U+200B ZERO WIDTH SPACE and
   U+FEFF), listed from Python 3.11's unicodedata, which implements Unicode 14.0.0. */
static const codir__range codir__format_chars[] = {
    {0xAD, 0xAD},       {0x600, 0x605},     {0x61C, 0x61C},     {0x6DD, 0x6DD},
    {0x70F, 0x70F},     {0x890, 0x891},     {0x8E2, 0x8E2},     {0x180E, 0x180E},
    {0x200B, 0x200F},   {0x202A, 0x202E},   {0x2060, 0x2064},   {0x2066, 0x206F},
    {0xFEFF, 0xFEFF},   {0xFFF9, 0xFFFB},   {0x110BD, 0x110BD}, {0x110CD, 0x110CD},
    {0x13430, 0x13438}, {0x1BCA0, 0x1BCA3}, {0x1D173, 0x1D17A}, {0xE0001, 0xE0001},
    {0xE0020, 0xE007F}};

/* Unicode general category Zs (space separators), same source. */
static const codir__range codir__space_chars[] = {
    {0x20, 0x20},     {0xA0, 0xA0},     {0x1680, 0x1680}, {0x2000, 0x200A},
    {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000}};

/* The CJK ideograph blocks that BERT's _is_chinese_char lists. Kana and Hangul are
   not among them, so BERT keeps those inside words. */
static const codir__range codir__cjk_chars[] = {
    {0x4E00, 0x9FFF},   {0x3400, 0x4DBF},   {0x20000, 0x2A6DF}, {0x2A700, 0x2B73F},
    {0x2B740, 0x2B81F}, {0x2B820, 0x2CEAF}, {0xF900, 0xFAFF},   {0x2F800, 0x2FA1F}};

static int codir__in_ranges(uint32_t cp, const codir__range *ranges, size_t count)
{
    size_t i;
    for (i = 0; i < count; i++)
        if (cp >= ranges[i].first && cp <= ranges[i].last) return 1;
    return 0;
}

/* BERT drops every character of a Unicode category starting with C, except tab, LF
   and CR, which it treats as whitespace. Surrogates never get here because the
   decoder rejects them.
   NOTE: unassigned code points (category Cn) are kept, because recognising them needs
   the full Unicode table; BERT drops them. */
static int codir__is_control(uint32_t cp)
{
    if (cp == '\t' || cp == '\n' || cp == '\r') return 0;
    if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F)) return 1;      /* Cc */
    if ((cp >= 0xE000 && cp <= 0xF8FF) || cp >= 0xF0000) return 1; /* Co, and Cn above U+FFFFD */
    return codir__in_ranges(cp, codir__format_chars,
                            sizeof codir__format_chars / sizeof codir__format_chars[0]);
}

/* BERT splits words at Zs characters and at tab, LF and CR. It also splits at U+2028
   and U+2029 (categories Zl, Zp), because its whitespace step uses Python's
   str.split(). */
static int codir__is_whitespace(uint32_t cp)
{
    if (cp == '\t' || cp == '\n' || cp == '\r' || cp == 0x2028 || cp == 0x2029) return 1;
    return codir__in_ranges(cp, codir__space_chars,
                            sizeof codir__space_chars / sizeof codir__space_chars[0]);
}

/* BERT counts all non-alphanumeric printable ASCII characters as punctuation, "$",
   "+", "<", "=", ">", "^", "`" and "|" included.
   NOTE: non-ASCII punctuation (Unicode categories P*, such as U+2019 or U+3002) is not
   split off yet; BERT splits it. */
static int codir__is_punctuation(uint32_t cp)
{
    return (cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
           (cp >= 123 && cp <= 126);
}

static int codir__is_cjk(uint32_t cp)
{
    return codir__in_ranges(cp, codir__cjk_chars, sizeof codir__cjk_chars / sizeof codir__cjk_chars[0]);
}

/* ---- basic tokenization: text to words ---- */

/* Reads a text word by word the way BERT's BasicTokenizer splits it. The words are
   copied because dropped control characters can sit inside a word. */
typedef struct codir__word_reader {
    const unsigned char *next;        /* first byte not read yet */
    int lowercase;                    /* 1: map A-Z to a-z */
    char word[CODIR__WORD_BYTES];     /* the current word, NUL-terminated, at most
                                         CODIR__MAX_WORD_CHARS characters of it */
    size_t length;                    /* bytes in word */
    int chars;                        /* characters in the word, saturating at
                                         CODIR__MAX_WORD_CHARS + 1 */
} codir__word_reader;

static void codir__word_reader_init(codir__word_reader *reader, const char *text, int lowercase)
{
    reader->next = (const unsigned char *)text;
    reader->lowercase = lowercase;
    reader->length = 0;
    reader->chars = 0;
    reader->word[0] = '\0';
}

static void codir__word_append(codir__word_reader *reader, const unsigned char *bytes, int length)
{
    if (reader->chars < CODIR__MAX_WORD_CHARS) {
        int i;
        for (i = 0; i < length; i++) {
            unsigned char c = bytes[i];
            if (reader->lowercase && c >= 'A' && c <= 'Z') c = (unsigned char)(c - 'A' + 'a');
            reader->word[reader->length++] = (char)c;
        }
    }
    if (reader->chars <= CODIR__MAX_WORD_CHARS) reader->chars++;
}

/* Stores the next word in reader->word and returns 1, or returns 0 at the end of the
   text. Punctuation and CJK ideographs come back as one-character words.
   NOTE: with lowercasing, only ASCII letters are lowercased, and accents are not
   stripped (BERT's uncased models lowercase all of Unicode, apply NFD and drop
   combining marks), so U+00C9 (capital E with acute) stays as it is. */
static int codir__next_word(codir__word_reader *reader)
{
    reader->length = 0;
    reader->chars = 0;
    while (*reader->next != '\0') {
        const unsigned char *p = reader->next;
        int length;
        uint32_t cp = codir__utf8_decode(p, &length);

        if (cp == 0xFFFD || codir__is_control(cp)) {
            reader->next += length;
            continue;
        }
        if (codir__is_whitespace(cp)) {
            reader->next += length;
            if (reader->chars > 0) break;
            continue;
        }
        if (codir__is_punctuation(cp) || codir__is_cjk(cp)) {
            /* End the current word here. The character becomes the next word. */
            if (reader->chars > 0) break;
            codir__word_append(reader, p, length);
            reader->next += length;
            break;
        }
        codir__word_append(reader, p, length);
        reader->next += length;
    }
    reader->word[reader->length] = '\0';
    return reader->chars > 0;
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

/* ---- reading files ---- */

/* Reads a whole file into a NUL-terminated heap buffer and stores its length (without
   the NUL) in *length. `role` names the kind of file in error messages. */
static char *codir__read_file(const char *path, const char *role, size_t *length)
{
    FILE *file = fopen(path, "rb");
    char *data = NULL;
    size_t size = 0, capacity = 0;

    if (!file) {
        codir__fail(CODIR_ERR_IO, "failed to open %s '%s': %s; check the path", role, path, strerror(errno));
        return NULL;
    }
    for (;;) {
        size_t got;
        if (capacity - size < 2) {
            size_t grown = capacity ? capacity : 65536;
            char *bigger;
            if (!codir__size_mul(grown, 2, &grown)) {
                codir__fail(CODIR_ERR_OVERFLOW, "%s '%s' is too large to read into memory", role, path);
                goto fail;
            }
            bigger = (char *)codir__realloc(data, grown);
            if (!bigger) goto fail;
            data = bigger;
            capacity = grown;
        }
        got = fread(data + size, 1, capacity - size - 1, file);
        size += got;
        if (got == 0) break;
    }
    if (ferror(file)) {
        codir__fail(CODIR_ERR_IO, "failed to read %s '%s'", role, path);
        goto fail;
    }
    fclose(file);
    data[size] = '\0';
    *length = size;
    return data;

fail:
    fclose(file);
    codir__free(data);
    return NULL;
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
    data = codir__read_file(path, "vocabulary file", &length);
    if (!data) return NULL;

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
    size_t path_length, tmp_size;
    char *tmp_path;
    FILE *file;
    int i, write_failed = 0;

    if (!vocab || !path) return codir__fail(CODIR_ERR_INVALID, "codir_vocab_save: vocab or path is NULL");
    for (i = 0; i < vocab->size; i++) {
        if (strpbrk(vocab->tokens[i], "\r\n"))
            return codir__fail(CODIR_ERR_INVALID,
                               "codir_vocab_save: token %d contains a line break, which vocab.txt cannot store",
                               i);
    }

    path_length = strlen(path);
    if (!codir__size_add(path_length, sizeof ".tmp", &tmp_size))
        return codir__fail(CODIR_ERR_OVERFLOW, "codir_vocab_save: path length overflows size_t");
    tmp_path = (char *)codir__malloc(tmp_size);
    if (!tmp_path) return CODIR_ERR_NOMEM;
    memcpy(tmp_path, path, path_length);
    memcpy(tmp_path + path_length, ".tmp", sizeof ".tmp");

    file = fopen(tmp_path, "wb");
    if (!file) {
        int rc = codir__fail(CODIR_ERR_IO, "failed to create '%s': %s; check that the directory exists and is writable",
                             tmp_path, strerror(errno));
        codir__free(tmp_path);
        return rc;
    }
    for (i = 0; i < vocab->size && !write_failed; i++) {
        if (fputs(vocab->tokens[i], file) == EOF || fputc('\n', file) == EOF) write_failed = 1;
    }
    if (ferror(file)) write_failed = 1;
    if (fclose(file) != 0) write_failed = 1;
    if (write_failed) {
        int rc = codir__fail(CODIR_ERR_IO, "failed to write '%s'; check the free disk space", tmp_path);
        remove(tmp_path);
        codir__free(tmp_path);
        return rc;
    }

    if (rename(tmp_path, path) != 0) {
        int rc;
#ifdef _WIN32
        /* Windows' rename() does not replace an existing file. */
        remove(path);
        if (rename(tmp_path, path) == 0) {
            codir__free(tmp_path);
            return 0;
        }
#endif
        rc = codir__fail(CODIR_ERR_IO, "failed to rename '%s' to '%s': %s", tmp_path, path, strerror(errno));
        remove(tmp_path);
        codir__free(tmp_path);
        return rc;
    }
    codir__free(tmp_path);
    return 0;
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

CODIR_DEF int codir_tokenize(const codir_vocab *vocab, const char *text, int *ids, int max_ids)
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
    while (codir__next_word(&reader)) {
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

CODIR_DEF int codir_encode(const codir_vocab *vocab, const char *text, int *ids, int max_len)
{
    int count;
    if (max_len < 2)
        return codir__fail(CODIR_ERR_INVALID, "codir_encode: max_len is %d but [CLS] and [SEP] need at least 2",
                           max_len);
    if (!ids) return codir__fail(CODIR_ERR_INVALID, "codir_encode: ids is NULL");
    count = codir_tokenize(vocab, text, ids + 1, max_len - 2);
    if (count < 0) return count;
    if (count > max_len - 2) count = max_len - 2;
    ids[0] = vocab->cls_id;
    ids[count + 1] = vocab->sep_id;
    return count + 2;
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

/* Parses the header line and finds the two columns. */
static int codir__tsv_header(const char *path, const char *line, const char *end, int *fields, int *sentence_column,
                             int *label_column)
{
    static const char *const names[2] = {"sentence", "label"};
    int *columns[2], i;
    columns[0] = sentence_column;
    columns[1] = label_column;
    *fields = codir__tsv_field_count(line, end);
    for (i = 0; i < 2; i++) {
        *columns[i] = codir__tsv_column(line, end, *fields, names[i]);
        if (*columns[i] == -1)
            return codir__fail(CODIR_ERR_PARSE,
                               "%s:1: the header has no column named '%s'; the first line must name the "
                               "columns, e.g. 'sentence<TAB>label'",
                               path, names[i]);
        if (*columns[i] == -2)
            return codir__fail(CODIR_ERR_PARSE, "%s:1: the header names the column '%s' twice", path, names[i]);
    }
    return 0;
}

CODIR_DEF codir_dataset *codir_dataset_load_tsv(const char *path)
{
    codir_dataset *data = NULL;
    char *contents;
    const char *p, *end, *line_end;
    size_t length, rows = 1;
    int fields, sentence_column, label_column, line_number, max_label = -1;

    if (!path) {
        codir__fail(CODIR_ERR_INVALID, "codir_dataset_load_tsv: path is NULL");
        return NULL;
    }
    contents = codir__read_file(path, "TSV file", &length);
    if (!contents) return NULL;
    end = contents + length;
    p = codir__skip_bom(contents, end);

    /* Stripping every trailing line break ignores empty lines at the end and makes a
       missing final newline harmless. */
    while (end > p && (end[-1] == '\n' || end[-1] == '\r')) end--;
    if (p == end) {
        codir__fail(CODIR_ERR_PARSE, "%s is empty; expected a header line naming the columns 'sentence' and 'label'",
                    path);
        goto fail;
    }

    /* Header. */
    line_end = (const char *)memchr(p, '\n', (size_t)(end - p));
    if (!line_end) line_end = end;
    {
        const char *header_end = line_end > p && line_end[-1] == '\r' ? line_end - 1 : line_end;
        if (codir__tsv_header(path, p, header_end, &fields, &sentence_column, &label_column) < 0) goto fail;
    }
    if (line_end == end) {
        codir__fail(CODIR_ERR_PARSE, "%s has a header but no rows", path);
        goto fail;
    }
    p = line_end + 1;

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

    /* Rows: line 1 is the header. */
    for (line_number = 2;; line_number++) {
        const char *row_end, *text, *label_text;
        size_t text_length, label_length;
        int found, label;

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
        codir__tsv_field(p, row_end, label_column, &label_text, &label_length);
        label = codir__parse_label(label_text, label_length);
        if (label < 0) {
            codir__fail(CODIR_ERR_PARSE, "%s:%d: invalid label '%.*s'; labels must be integers >= 0", path,
                        line_number, (int)(label_length > 40 ? 40 : label_length), label_text);
            goto fail;
        }
        codir__tsv_field(p, row_end, sentence_column, &text, &text_length);
        data->texts[data->count] = codir__strndup(text, text_length);
        if (!data->texts[data->count]) goto fail;
        data->labels[data->count] = label;
        data->count++;
        if (label > max_label) max_label = label;
        if (line_end == end) break;
        p = line_end + 1;
    }
    data->num_classes = max_label + 1;
    codir__free(contents);
    return data;

fail:
    codir__free(contents);
    codir_dataset_free(data);
    return NULL;
}

CODIR_DEF void codir_dataset_free(codir_dataset *data)
{
    int i;
    if (!data) return;
    if (data->texts) {
        for (i = 0; i < data->count; i++) codir__free(data->texts[i]);
    }
    codir__free(data->texts);
    codir__free(data->labels);
    codir__free(data);
}

/* ===================================================================================
   9. Batches (implementation)
   =================================================================================== */

CODIR_DEF codir_encoded *codir_encode_dataset(const codir_vocab *vocab, const codir_dataset *data, int max_len)
{
    codir_encoded *enc;
    int i;
    if (max_len < 2) {
        codir__fail(CODIR_ERR_INVALID, "max_len %d cannot hold [CLS] and [SEP]", max_len);
        return NULL;
    }
    enc = (codir_encoded *)codir__calloc(1, sizeof *enc);
    if (!enc) return NULL;
    enc->count = data->count;
    enc->max_len = max_len;
    enc->num_classes = data->num_classes;
    enc->lengths = (int *)codir__calloc((size_t)(data->count ? data->count : 1), sizeof(int));
    enc->labels = (int *)codir__calloc((size_t)(data->count ? data->count : 1), sizeof(int));
    enc->ids = (int *)codir__calloc((size_t)(data->count ? data->count : 1), (size_t)max_len * sizeof(int));
    if (!enc->lengths || !enc->labels || !enc->ids) goto fail;
    for (i = 0; i < data->count; i++) {
        int n = codir_encode(vocab, data->texts[i], enc->ids + (size_t)i * max_len, max_len);
        if (n < 0) {
            codir__fail(n, "example %d: %s", i, codir_last_error());
            goto fail;
        }
        enc->lengths[i] = n;
        enc->labels[i] = data->labels[i];
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
    rc = codir_model_forward(ctx, model, batch, &out);
    if (rc) return rc;
    loss = codir__task_loss(ctx, model, out.logits, batch);
    if (!loss) return ctx->status;
    memset(terms, 0, sizeof *terms);
    terms->task = terms->total = loss->data[0];
    rc = codir__check_terms(terms, step);
    if (rc) return rc;
    return codir_backward_scaled(ctx, loss, weight);
}

/* Runs the CoDIR forward and backward passes of codir_distill_accumulate; *zt_out
   receives the teacher projections for the bank update, or NULL when lambda is 0. */
static int codir__distill_backward(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                   codir_distiller *d, const codir_batch *batch, float weight, uint64_t step,
                                   codir_loss_terms *terms, codir_tensor **zt_out)
{
    codir_output s_out, t_out;
    codir_tensor *parts[3] = {NULL, NULL, NULL}, *loss, *zt = NULL;
    float weights[3];
    int rc;
    *zt_out = NULL;

    /* 1. The frozen teacher: no dropout, no tape. */
    codir_ctx_begin(ctx, 0, 0, step);
    rc = codir_model_forward(ctx, teacher, batch, &t_out);
    if (rc) return rc;

    /* 2. The student with dropout, recorded for backward. */
    ctx->recording = 1;
    ctx->training = 1;
    rc = codir_model_forward(ctx, student, batch, &s_out);
    if (rc) return rc;

    /* 3. L = (1 - beta) L_task + beta L_kd + lambda L_crd, each a batch mean. L_kd is
       T^2 KL(p_t || p_s) for classification and the squared error between student and
       teacher outputs for regression, where there is no distribution to soften. */
    weights[0] = 1.0f - d->cfg.beta;
    weights[1] = d->cfg.beta;
    weights[2] = d->cfg.lambda;
    parts[0] = codir__task_loss(ctx, student, s_out.logits, batch);
    if (weights[1] != 0.0f) {
        if (student->cfg.num_labels == 1)
            parts[1] = codir_mse(ctx, s_out.logits, t_out.logits ? t_out.logits->data : NULL);
        else
            parts[1] = codir_kl_div(ctx, s_out.logits, t_out.logits, d->cfg.temperature);
    }
    if (weights[2] != 0.0f) parts[2] = codir_crd_loss(ctx, d, &s_out, &t_out, batch, &zt);
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
    int rc = codir__distill_backward(ctx, student, teacher, d, batch, weight, step, terms, &zt);
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

CODIR_DEF int codir_distill_step(codir_ctx *ctx, codir_model *student, const codir_model *teacher,
                                 codir_distiller *d, codir_adamw *opt_student, codir_adamw *opt_heads,
                                 const codir_batch *batch, float lr, codir_loss_terms *terms)
{
    uint64_t step = (uint64_t)opt_student->step;
    codir_tensor *zt;
    const char *bad;
    int rc;
    codir_params_zero_grad(&student->params);
    codir_params_zero_grad(&d->params);
    rc = codir__distill_backward(ctx, student, teacher, d, batch, 1.0f, step, terms, &zt);
    if (rc) return rc;
    if ((bad = codir__nonfinite_grad(&student->params)) || (bad = codir__nonfinite_grad(&d->params)))
        return codir__fail(CODIR_ERR_NONFINITE, "step %llu: gradient of %s is NaN or Inf", (unsigned long long)step, bad);
    codir_adamw_step(opt_student, &student->params, lr);
    codir_adamw_step(opt_heads, &d->params, lr);

    /* The bank moves only after the step succeeded, so a rejected step leaves it as it was. */
    if (zt) codir_bank_update(d, zt->data, batch->example_ids.data, batch->batch);
    return CODIR_OK;
}

CODIR_DEF int codir_predict(codir_ctx *ctx, const codir_model *model, const codir_encoded *enc, int batch_size,
                            float *out)
{
    codir_batch batch;
    int start, rc, V = model->cfg.num_labels;
    if (enc->count < 1) return codir__fail(CODIR_ERR_INVALID, "cannot predict on an empty data set");
    rc = codir_batch_init(&batch, batch_size, enc->max_len);
    if (rc) return rc;
    for (start = 0; start < enc->count && !rc; start += batch_size) {
        int n = enc->count - start < batch_size ? enc->count - start : batch_size;
        codir_output o;
        rc = codir_batch_fill(&batch, enc, NULL, start, n);
        if (rc) break;
        codir_ctx_begin(ctx, 0, 0, 0);
        rc = codir_model_forward(ctx, model, &batch, &o);
        if (!rc) memcpy(out + (size_t)start * V, o.logits->data, (size_t)n * V * sizeof(float));
    }
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
    return denom > 0.0 ? (c * s - pt) / denom : NAN;
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
