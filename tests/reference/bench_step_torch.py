#!/usr/bin/env python3
"""Time the PyTorch twin of examples/bench_step.c.

The same models, batches and steps as bench_step.c, built from torch.nn layers and run
eager in float32, printing lines of the same format so both benchmarks can run side by
side in one session:

    step bench=<train|distill|distill_cached|infer> model=<name> batch=<b> seq=<t> threads=<n> median_ms=<x> gflops=<x> peak_rss_mb=<x>

Run (from the repository root, with Debian's python3-torch 1.13):

    /usr/bin/python3 tests/reference/bench_step_torch.py            sequence 64 and 128, 1 thread and all threads
    /usr/bin/python3 tests/reference/bench_step_torch.py --quick    sequence 64 only, 5 timed runs per case
    /usr/bin/python3 tests/reference/bench_step_torch.py --threads 2
    /usr/bin/python3 tests/reference/bench_step_torch.py --seq 128    (with --quick: 5 timed runs per case)

Models: a post-LayerNorm BERT encoder of nn.TransformerEncoderLayer blocks (erf GELU,
LayerNorm eps 1e-12), token, position and token-type embeddings, and BERT's pooler
and classifier on the first token. Dropout 0.1 sits where codir.h puts it: after the
embeddings, after the attention output and FFN output projections, and around the
pooler. The layer's other two dropouts (on the attention probabilities and inside the
FFN) are switched off, because codir.h has none there. In eval mode under
torch.no_grad() (inference and the teacher), PyTorch 1.13 runs each block through its
fused torch._transformer_encoder_layer_fwd. That path skips odd head counts, so the
small student has 6 heads.

Steps:
    train           AdamW step on cross-entropy (zero_grad, forward, backward, step)
    distill         teacher forward under torch.no_grad(), student forward and backward
                    on (1 - beta) CE + beta T^2 KL + lambda InfoNCE against a memory
                    bank with K = 100 negatives of the other label sampled without
                    replacement, AdamW on the student and both projection heads, bank
                    update with momentum
    distill_cached  the same with the teacher's logits and pooled layers read from
                    tensors computed before timing, as codir_distill_step_cached does
    infer           forward in eval mode under torch.no_grad()

Threads: torch.set_num_threads sets ATen's OpenMP threads, but the matrix products of
Debian's build run in OpenBLAS (pthreads), which keeps its own count, so this script
also calls openblas_set_num_threads through ctypes where libopenblas is loaded.

The FLOP count, the timing rule (median of at least 10 calls after 2 warm-up calls)
and peak_rss_mb follow bench_step.c (the median is the upper one of an even count). peak_rss_mb is resource.getrusage's ru_maxrss
after resetting the kernel's peak through /proc/self/clear_refs before each case. It
includes what the imported torch libraries keep resident, which the header line prints
as baseline_rss_mb.
"""

import argparse
import ctypes
import gc
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 8192
MAX_LEN = 128
LABELS = 2
BATCH = 32
EXAMPLES = 4096  # memory bank rows
DISTINCT_BATCHES = 4  # timed steps cycle through these, and the teacher cache covers them
WARMUP = 2
MIN_RUNS = 10
QUICK_RUNS = 5
MIN_SECONDS = 0.5  # cases faster than this in total repeat up to MAX_RUNS times
MAX_RUNS = 100

# CoDIR hyperparameters, codir_distill_config_default's values.
BETA = 0.5
KD_TEMPERATURE = 2.0
LAMBDA = 0.1
TAU = 0.07
NUM_NEGATIVES = 100
PROJ_DIM = 128
MOMENTUM = 0.5
LR = 1e-4

# name: (layers, hidden, heads, ffn)
TEACHER = ("L6-H384", (6, 384, 6, 1536))
STUDENTS = [("L3-H384", (3, 384, 6, 1536)), ("L3-H192", (3, 192, 6, 768))]


class Bert(nn.Module):
    """Post-LayerNorm BERT encoder with a pooler and a classifier on the first token."""

    def __init__(self, layers, hidden, heads, ffn, dropout=0.1):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, hidden)
        self.pos = nn.Embedding(MAX_LEN, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.emb_ln = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=dropout, activation="gelu",
                                               layer_norm_eps=1e-12, batch_first=True)
            block.self_attn.dropout = 0.0
            block.dropout = nn.Identity()
            self.blocks.append(block)
        self.pool = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, LABELS)

    def forward(self, ids):
        """Return the logits [B, LABELS] and the hidden states, embeddings first."""
        positions = torch.arange(ids.shape[1])
        x = self.tok(ids) + self.pos(positions) + self.token_type(torch.zeros_like(ids))
        x = self.drop(self.emb_ln(x))
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        first = self.drop(x[:, 0])
        pooled = self.drop(torch.tanh(self.pool(first)))
        return self.cls(pooled), hidden


def adamw(params):
    """Return AdamW set up as in the C benchmark, without weight decay on biases and LayerNorm."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6)


def forward_flops(size, batch, seq):
    """Return the matrix-multiply FLOPs of one forward pass, by the formula of bench_step.c."""
    layers, c, _, f = size
    tokens = batch * seq
    per_layer = 2.0 * tokens * (3 * c * c + c * c + 2 * c * f) + 4.0 * batch * seq * seq * c
    return layers * per_layer + 2.0 * batch * (c * c + c * LABELS)


def case_flops(kind, size, batch, seq):
    if kind in ("train", "distill_cached"):
        return 3.0 * forward_flops(size, batch, seq)
    if kind == "distill":
        return forward_flops(TEACHER[1], batch, seq) + 3.0 * forward_flops(size, batch, seq)
    return forward_flops(size, batch, seq)


def layer_map(student_layers, teacher_layers):
    """Return the teacher layer of each student layer, m(k) = (k - 1) * Lt / Ls + 1 as in codir.h."""
    return [(k - 1) * teacher_layers // student_layers + 1 for k in range(1, student_layers + 1)]


class Distiller(nn.Module):
    """Projection heads, memory bank and negative sampler of the contrastive term."""

    def __init__(self, student_size, labels):
        super().__init__()
        s_layers, s_hidden = student_size[0], student_size[1]
        t_layers, t_hidden = TEACHER[1][0], TEACHER[1][1]
        self.map = layer_map(s_layers, t_layers)
        self.proj_s = nn.Linear(s_layers * s_hidden, PROJ_DIM)
        self.proj_t = nn.Linear(s_layers * t_hidden, PROJ_DIM)
        bound = (3.0 / PROJ_DIM) ** 0.5
        self.register_buffer("bank", torch.empty(EXAMPLES, PROJ_DIM).uniform_(-bound, bound))
        self.labels = labels
        self.other = [torch.nonzero(labels != c).flatten() for c in range(LABELS)]

    def negatives(self, example_ids):
        """Return K distinct bank rows of another label for each example, as a [B, K] tensor."""
        rows = []
        for e in example_ids.tolist():
            pool = self.other[int(self.labels[e])]
            rows.append(pool[torch.randperm(pool.numel())[:NUM_NEGATIVES]])
        return torch.stack(rows)

    def teacher_features(self, hidden):
        """Return the mean-pooled mapped teacher layers side by side, [B, Ls * Ct]."""
        return torch.cat([hidden[m].mean(dim=1) for m in self.map], dim=1)

    def loss(self, s_hidden, t_features, example_ids):
        """Return the InfoNCE loss and the teacher projection.

        The student projection is scored against the live teacher projection of the same
        example and K bank rows of the other label.
        """
        fs = torch.cat([h.mean(dim=1) for h in s_hidden[1:]], dim=1)
        zs = F.normalize(self.proj_s(fs), dim=1)
        zt = F.normalize(self.proj_t(t_features), dim=1)
        neg = self.negatives(example_ids)
        positive = (zs * zt).sum(dim=1, keepdim=True)
        negative = torch.bmm(self.bank[neg], zs.unsqueeze(2)).squeeze(2)
        scores = torch.cat([positive, negative], dim=1) / TAU
        target = torch.zeros(scores.shape[0], dtype=torch.long)
        return F.cross_entropy(scores, target), zt

    @torch.no_grad()
    def update_bank(self, zt, example_ids):
        rows = MOMENTUM * self.bank[example_ids] + (1.0 - MOMENTUM) * zt
        self.bank[example_ids] = F.normalize(rows, dim=1)


def codir_loss(s_logits, s_hidden, t_logits, t_features, labels, example_ids, distiller):
    task = F.cross_entropy(s_logits, labels)
    kd = F.kl_div(F.log_softmax(s_logits / KD_TEMPERATURE, dim=1), F.softmax(t_logits / KD_TEMPERATURE, dim=1),
                  reduction="batchmean") * KD_TEMPERATURE ** 2
    crd, zt = distiller.loss(s_hidden, t_features, example_ids)
    return (1.0 - BETA) * task + BETA * kd + LAMBDA * crd, zt


class Case:
    """The models, optimizers and batches of one timed case."""

    def __init__(self, kind, name, size, batch, seq, data):
        ids, labels = data
        self.kind, self.batch = kind, batch
        self.student = Bert(*size)
        self.batches = []
        for i in range(DISTINCT_BATCHES):
            rows = torch.arange(i * batch, (i + 1) * batch)
            self.batches.append((ids[rows, :seq].contiguous(), labels[rows], rows))
        if kind == "infer":
            self.student.eval()
            return
        self.opt = adamw(self.student.parameters())
        if kind == "train":
            return
        self.teacher = Bert(*TEACHER[1]).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.distiller = Distiller(size, labels)
        self.opt_heads = adamw(self.distiller.parameters())
        if kind == "distill_cached":
            self.build_cache(name, seq)

    def build_cache(self, name, seq):
        """Run the teacher once over the timed batches, keep its outputs, free the teacher."""
        start = time.perf_counter()
        self.cache_logits = torch.zeros(EXAMPLES, LABELS)
        self.cache_features = torch.zeros(EXAMPLES, len(self.distiller.map) * TEACHER[1][1])
        with torch.no_grad():
            for ids, _, rows in self.batches:
                logits, hidden = self.teacher(ids)
                self.cache_logits[rows] = logits
                self.cache_features[rows] = self.distiller.teacher_features(hidden)
        print(f"# teacher cache: model={name} seq={seq} examples={DISTINCT_BATCHES * BATCH} "
              f"build_ms={1e3 * (time.perf_counter() - start):.1f}", flush=True)
        del self.teacher

    def run(self, iteration):
        ids, labels, rows = self.batches[iteration % len(self.batches)]
        if self.kind == "infer":
            with torch.no_grad():
                self.student(ids)
            return
        self.opt.zero_grad(set_to_none=True)
        if self.kind == "train":
            logits, _ = self.student(ids)
            F.cross_entropy(logits, labels).backward()
            self.opt.step()
            return
        self.opt_heads.zero_grad(set_to_none=True)
        if self.kind == "distill":
            with torch.no_grad():
                t_logits, t_hidden = self.teacher(ids)
                t_features = self.distiller.teacher_features(t_hidden)
        else:
            t_logits, t_features = self.cache_logits[rows], self.cache_features[rows]
        s_logits, s_hidden = self.student(ids)
        loss, zt = codir_loss(s_logits, s_hidden, t_logits, t_features, labels, rows, self.distiller)
        loss.backward()
        self.opt.step()
        self.opt_heads.step()
        self.distiller.update_bank(zt.detach(), rows)


def release_free_memory():
    """Return the C heap's free pages to the kernel (glibc only).

    glibc keeps memory that torch freed, and its mmap threshold grows after large
    frees, so without this the resident memory left over from one case would count
    toward the peak of the next.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_reset():
    """Reset the kernel's peak resident memory to the current one and return whether that worked (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def openblas_library():
    """Return the loaded libopenblas through ctypes, or None."""
    for soname in ("libopenblas.so.0", "libopenblaso.so.0", "libopenblasp.so.0"):
        try:
            lib = ctypes.CDLL(soname)
            lib.openblas_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def set_threads(threads, openblas):
    torch.set_num_threads(threads)
    if openblas is not None:
        openblas.openblas_set_num_threads(threads)


def bench_one(kind, name, size, batch, seq, threads, data, min_runs, rss_resettable):
    gc.collect()
    release_free_memory()
    if rss_resettable and kind != "distill_cached":
        peak_rss_reset()
    case = Case(kind, name, size, batch, seq, data)
    if rss_resettable and kind == "distill_cached":
        gc.collect()
        release_free_memory()
        peak_rss_reset()
    for i in range(WARMUP):
        case.run(i)
    wall, cpu = [], []
    while len(wall) < MAX_RUNS and (len(wall) < min_runs or sum(wall) < MIN_SECONDS):
        start, start_cpu = time.perf_counter(), time.process_time()
        case.run(len(wall))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = sorted(wall)[len(wall) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    print(f"step bench={kind} model={name} batch={batch} seq={seq} threads={threads} median_ms={1e3 * median:.2f} "
          f"gflops={case_flops(kind, size, batch, seq) / median * 1e-9:.1f} peak_rss_mb={peak:.1f}")
    print(f"#   runs={len(wall)} fastest_ms={1e3 * min(wall):.2f} slowest_ms={1e3 * max(wall):.2f} "
          f"cpu_ms={1e3 * sorted(cpu)[len(cpu) // 2]:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"time sequence length 64 only, {QUICK_RUNS} timed runs per case instead of {MIN_RUNS}")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="time on N threads only, instead of 1 thread and then all threads")
    parser.add_argument("--seq", type=int, metavar="T",
                        help=f"time sequence length T only (1 to {MAX_LEN}), instead of 64 and 128")
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error(f"invalid thread count {args.threads}; give a positive integer")
    if args.seq is not None and not 1 <= args.seq <= MAX_LEN:
        parser.error(f"invalid sequence length {args.seq}; give an integer from 1 to {MAX_LEN}")

    max_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    thread_list = [args.threads] if args.threads else sorted({1, max_threads})
    seqs = [64, 128]
    if args.quick:
        seqs = [64]
    if args.seq:
        seqs = [args.seq]
    min_runs = QUICK_RUNS if args.quick else MIN_RUNS
    openblas = openblas_library()
    rss_resettable = peak_rss_reset()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"# torch {torch.__version__} bench_step_torch: openblas={'yes' if openblas else 'not found'} "
          f"max_threads={max_threads} peak_rss={'per_case' if rss_resettable else 'cumulative_since_start'} "
          f"baseline_rss_mb={baseline:.1f} load_average={load_average()}", flush=True)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    ids_all = torch.randint(0, VOCAB, (EXAMPLES, MAX_LEN), generator=generator)
    labels = torch.randint(0, LABELS, (EXAMPLES,), generator=generator)
    for threads in thread_list:
        set_threads(threads, openblas)
        for seq in seqs:
            for name, size in STUDENTS:
                print(f"# model={name} seq={seq} threads={threads} load_average={load_average()}", flush=True)
                for kind in ("train", "distill", "distill_cached"):
                    bench_one(kind, name, size, BATCH, seq, threads, (ids_all, labels), min_runs, rss_resettable)
                for batch in (BATCH, 1):
                    bench_one("infer", name, size, batch, seq, threads, (ids_all, labels), min_runs, rss_resettable)
    print(f"# done load_average={load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
