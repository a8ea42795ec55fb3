#!/usr/bin/python3
"""Write the PyTorch reference that tests/test_reference.c checks codir.h against.

The script builds a BERT-style teacher (2 blocks) and student (1 block) from random
weights, runs one fixed batch through them in float64, computes the CoDIR objective

    L = (1 - beta) L_task + beta L_kd + lambda L_crd

in several settings, backpropagates, takes one torch.optim.AdamW step and stores every
result. It uses only PyTorch's own layers and functions, written from the formulas of
the method, never from codir.h. Run it with Debian's PyTorch:

    /usr/bin/python3 tests/reference/make_reference.py

It writes, beside itself:

    teacher/, student/                 Hugging Face BERT folders (config.json and
                                       model.safetensors) of the classification models,
                                       both with the masked-LM head
    teacher_regression/, student_regression/
                                       the same for one-output regression models
    reference.safetensors              the batch, the projection heads, the memory banks,
                                       the hyperparameters and every expected result,
                                       all as F32

Every weight is rounded to float32 before it is used, so that the float32 C code and
this float64 reference start from identical values. Results are rounded to float32
only when they are written.
"""
import json
import math
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
HERE = os.path.dirname(os.path.abspath(__file__))

# Model sizes.
VOCAB = 50
MAX_LEN = 16
TYPE_VOCAB = 2
HIDDEN = 32
HEADS = 4
FFN = 64
LN_EPS = 1e-12
TEACHER_LAYERS = 2
STUDENT_LAYERS = 1
NUM_LABELS = 3

# Special token ids in the order codir's vocabulary uses.
PAD, CLS, SEP = 0, 2, 3

# The contrastive term: projection size, memory bank rows and negatives per example.
PROJ_DIM = 8
NUM_EXAMPLES = 12
NUM_NEGATIVES = 8


def f32(x):
    """Round a Python float to the nearest float32, as the C side stores it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# Hyperparameters. beta is not 0.5, so swapped loss weights show. lambda is larger than
# the default 0.1, so the contrastive gradient is a large part of the student's. The
# bank momentum is not 0.5, so swapping m and 1 - m shows.
BETA = f32(0.4)
TEMPERATURE = f32(2.0)
LAMBDA = f32(0.7)
TAU = f32(0.07)
LR = f32(1e-2)
WEIGHT_DECAY = f32(0.1)
ADAM_BETAS = (f32(0.9), f32(0.98))
ADAM_EPS = f32(1e-6)
BANK_MOMENTUM = f32(0.75)

INFONCE, NCE = 0, 1
POOL_MEAN, POOL_FIRST = 0, 1


# ---- models with Hugging Face's module layout, so parameter names match ----


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)


class DenseLayerNorm(nn.Module):
    def __init__(self, inputs):
        super().__init__()
        self.dense = nn.Linear(inputs, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = SelfAttention()
        self.output = DenseLayerNorm(HIDDEN)


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, FFN)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.intermediate = Intermediate()
        self.output = DenseLayerNorm(FFN)


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_LEN, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)


class Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList([Block() for _ in range(layers)])


class Pooler(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)


class Bert(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.embeddings = Embeddings()
        self.encoder = Encoder(layers)
        self.pooler = Pooler()


class Transform(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)


class Predictions(nn.Module):
    def __init__(self):
        super().__init__()
        self.transform = Transform()
        self.bias = nn.Parameter(torch.zeros(VOCAB))


class MlmHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.predictions = Predictions()


class BertModel(nn.Module):
    """BertForSequenceClassification, plus BertForPreTraining's masked-LM head when
    mlm is set. The decoder of the masked-LM head is the word embedding matrix."""

    def __init__(self, layers, num_labels, mlm):
        super().__init__()
        self.bert = Bert(layers)
        self.classifier = nn.Linear(HIDDEN, num_labels)
        if mlm:
            self.cls = MlmHead()
        self.num_labels = num_labels
        self.gelu = nn.GELU()  # approximate='none': x * Phi(x) with the exact erf

    def block(self, layer, x, mask):
        """One post-LayerNorm block, as BERT's BertLayer without dropout."""
        B, T, C = x.shape
        hs = C // HEADS
        sa = layer.attention.self

        def heads(t):
            return t.view(B, T, HEADS, hs).transpose(1, 2)

        q, k, v = heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(B, T, C)
        x = layer.attention.output.LayerNorm(x + layer.attention.output.dense(context))
        h = layer.output.dense(self.gelu(layer.intermediate.dense(x)))
        return layer.output.LayerNorm(x + h)

    def forward(self, ids, types, mask):
        """Returns the hidden states [embeddings, block 1, ...] and the logits."""
        emb = self.bert.embeddings
        T = ids.shape[1]
        x = emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(T))[None] + emb.token_type_embeddings(types)
        x = emb.LayerNorm(x)
        hidden = [x]
        for layer in self.bert.encoder.layer:
            x = self.block(layer, x, mask)
            hidden.append(x)
        pooled = torch.tanh(self.bert.pooler.dense(x[:, 0]))
        return hidden, self.classifier(pooled)

    def mlm_logits(self, last_hidden, positions):
        """Masked-LM logits at rows `positions` (b * T + t) of the last hidden layer."""
        p = self.cls.predictions
        h = last_hidden.reshape(-1, HIDDEN)[positions]
        h = p.transform.LayerNorm(self.gelu(p.transform.dense(h)))
        return F.linear(h, self.bert.embeddings.word_embeddings.weight, p.bias)


def round_to_f32(t):
    return t.to(torch.float32).to(torch.float64)


def init_weights(model, gen):
    """Random weights of unit gain, so that attention, GELU and tanh all work away from
    their linear region (BERT's N(0, 0.02^2) would leave them nearly linear). The
    embeddings are small, so the input of the embedding LayerNorm has a variance of
    about 0.008, and an epsilon of 1e-5 in place of 1e-12 moves its output by about
    1e-3."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=gen)
            elif "embeddings" in name:
                v = 0.05 * torch.randn(p.shape, generator=gen)
            else:
                v = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
            p.copy_(round_to_f32(v))


# ---- files ----


def write_safetensors(path, tensors, metadata=None):
    """Writes tensors (name -> tensor) as F32 in the safetensors format: an 8-byte
    little-endian header length, a JSON header padded with spaces to a multiple of 8,
    then the raw little-endian data in header order."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous()
        data = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def save_hf_folder(model, layers, folder):
    """Writes a Hugging Face BERT folder: config.json and model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    config = {
        "architectures": ["BertForSequenceClassification"],
        "attention_probs_dropout_prob": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "layer_norm_eps": LN_EPS,
        "max_position_embeddings": MAX_LEN,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "position_embedding_type": "absolute",
        "type_vocab_size": TYPE_VOCAB,
        "vocab_size": VOCAB,
        "id2label": {str(i): "LABEL_%d" % i for i in range(model.num_labels)},
        "label2id": {"LABEL_%d" % i: i for i in range(model.num_labels)},
        "problem_type": "regression" if model.num_labels == 1 else "single_label_classification",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    write_safetensors(os.path.join(folder, "model.safetensors"), dict(model.named_parameters()), {"format": "pt"})


def codir_names(model, values):
    """Maps Hugging Face parameter names to codir.h's, stacking query, key and value
    into one [3C, C] matrix and [3C] bias per block. values(name) returns the tensor to
    store for a Hugging Face name."""
    out = {}

    hf = "bert.embeddings."
    out["embeddings.token"] = values(hf + "word_embeddings.weight")
    out["embeddings.position"] = values(hf + "position_embeddings.weight")
    out["embeddings.token_type"] = values(hf + "token_type_embeddings.weight")
    out["embeddings.ln.gamma"] = values(hf + "LayerNorm.weight")
    out["embeddings.ln.beta"] = values(hf + "LayerNorm.bias")
    for l in range(len(model.bert.encoder.layer)):
        hf = "bert.encoder.layer.%d." % l
        cd = "layer.%d." % l
        for kind in ("weight", "bias"):
            out[cd + "attn.qkv." + kind] = torch.cat(
                [values(hf + "attention.self.%s.%s" % (part, kind)) for part in ("query", "key", "value")])
            out[cd + "attn.out." + kind] = values(hf + "attention.output.dense." + kind)
            out[cd + "ffn.up." + kind] = values(hf + "intermediate.dense." + kind)
            out[cd + "ffn.down." + kind] = values(hf + "output.dense." + kind)
        out[cd + "ln1.gamma"] = values(hf + "attention.output.LayerNorm.weight")
        out[cd + "ln1.beta"] = values(hf + "attention.output.LayerNorm.bias")
        out[cd + "ln2.gamma"] = values(hf + "output.LayerNorm.weight")
        out[cd + "ln2.beta"] = values(hf + "output.LayerNorm.bias")

    for kind in ("weight", "bias"):
        out["pooler." + kind] = values("bert.pooler.dense." + kind)
        out["classifier." + kind] = values("classifier." + kind)

    if hasattr(model, "cls"):
        hf = "cls.predictions."
        out["mlm.dense.weight"] = values(hf + "transform.dense.weight")
        out["mlm.dense.bias"] = values(hf + "transform.dense.bias")
        out["mlm.ln.gamma"] = values(hf + "transform.LayerNorm.weight")
        out["mlm.ln.beta"] = values(hf + "transform.LayerNorm.bias")
        out["mlm.decoder.bias"] = values(hf + "bias")
    return out


# ---- the batch ----


def make_batch(gen):
    """Three sequences padded to T = 10: a sentence pair of 10 tokens, a pair of 7 and
    a single sentence of 5, so both token types and padding occur."""
    def words(n):
        return torch.randint(5, VOCAB, (n,), generator=gen).tolist()

    a0, b0 = words(3), words(4)
    a1, b1 = words(2), words(2)
    a2 = words(3)
    a1[0] = a0[1]  # one token twice in the batch: its embedding gradient has two sources
    seqs = [
        ([CLS] + a0 + [SEP] + b0 + [SEP], [0] * 5 + [1] * 5),
        ([CLS] + a1 + [SEP] + b1 + [SEP], [0] * 4 + [1] * 3),
        ([CLS] + a2 + [SEP], [0] * 5),
    ]
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((3, T), PAD, dtype=torch.long)
    types = torch.zeros((3, T), dtype=torch.long)
    mask = torch.zeros((3, T), dtype=torch.long)
    for b, (s, t) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        types[b, : len(t)] = torch.tensor(t)
        mask[b, : len(s)] = 1
    return ids, types, mask


# ---- the CoDIR objective ----


class Heads(nn.Module):
    """The two projection heads of the contrastive term."""

    def __init__(self, gen):
        super().__init__()
        self.student = nn.Linear(STUDENT_LAYERS * HIDDEN, PROJ_DIM)
        self.teacher = nn.Linear(STUDENT_LAYERS * HIDDEN, PROJ_DIM)
        bound = 1.0 / math.sqrt(STUDENT_LAYERS * HIDDEN)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(round_to_f32((2.0 * torch.rand(p.shape, generator=gen) - 1.0) * bound))

    def codir_params(self):
        return {
            "crd.student_proj.weight": self.student.weight,
            "crd.student_proj.bias": self.student.bias,
            "crd.teacher_proj.weight": self.teacher.weight,
            "crd.teacher_proj.bias": self.teacher.bias,
        }


def pool(h, mask, pooling):
    """[B,T,C] -> [B,C]: the mean over non-padding tokens, or the first token."""
    if pooling == POOL_FIRST:
        return h[:, 0]
    m = mask.to(h.dtype)[:, :, None]
    return (h * m).sum(1) / m.sum(1)


def project(heads, s_hidden, t_hidden, mask, pooling):
    """z_s = normalize(W_s f_s + b_s) and z_t = normalize(W_t f_t + b_t), where f
    concatenates the pooled mapped layers. Student layer k (1..Ls) pairs with teacher
    layer (k - 1) * Lt / Ls + 1; layer 0, the embeddings, is not used."""
    layer_map = [(k - 1) * TEACHER_LAYERS // STUDENT_LAYERS + 1 for k in range(1, STUDENT_LAYERS + 1)]
    fs = torch.cat([pool(s_hidden[k], mask, pooling) for k in range(1, STUDENT_LAYERS + 1)], dim=-1)
    ft = torch.cat([pool(t_hidden[m], mask, pooling) for m in layer_map], dim=-1)
    zs = F.normalize(heads.student(fs), dim=-1, eps=1e-12)
    zt = F.normalize(heads.teacher(ft), dim=-1, eps=1e-12)
    return zs, zt


def infonce(zs, zt, bank, neg):
    """mean_b [logsumexp_j x_bj - x_b0] with x_b0 = <zs_b, zt_b> / tau (the live
    teacher projection is the positive) and x_bj = <zs_b, bank[neg_bj]> / tau."""
    positive = (zs * zt).sum(-1, keepdim=True) / TAU
    negatives = torch.einsum("bd,bkd->bk", zs, bank[neg]) / TAU
    x = torch.cat([positive, negatives], dim=1)
    return (torch.logsumexp(x, dim=1) - x[:, 0]).mean()


def nce_scores(anchor, bank, idx):
    """exp(<anchor_b, bank[idx_bj]> / tau) for the positive row idx_b0 and the negatives."""
    return torch.exp(torch.einsum("bd,bkd->bk", anchor, bank[idx]) / TAU)


def nce_log_normalizer(anchor, bank, idx):
    """log Z with Z = N * mean(scores), CRD's estimate from the first batch."""
    return math.log(NUM_EXAMPLES * nce_scores(anchor, bank, idx).mean().item())


def nce(anchor, bank, idx, log_z):
    """One direction of CRD's binary NCE loss with P = score / Z and c = K / N:
    -(1/B) sum_b [log(P_b0 / (P_b0 + c)) + sum_{j>=1} log(c / (P_bj + c))]."""
    P = nce_scores(anchor, bank, idx) / math.exp(log_z)
    c = NUM_NEGATIVES / NUM_EXAMPLES
    return -(torch.log(P[:, 0] / (P[:, 0] + c)) + torch.log(c / (P[:, 1:] + c)).sum(1)).mean()


def kd_kl(student_logits, teacher_logits):
    """T^2 mean_b KL(p_t || p_s) with p = softmax(logits / T)."""
    log_ps = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
    pt = F.softmax(teacher_logits / TEMPERATURE, dim=-1)
    return TEMPERATURE ** 2 * F.kl_div(log_ps, pt, reduction="batchmean")


def bank_update(bank, z, ids):
    """row <- normalize(m row + (1 - m) z) for the rows of this batch."""
    out = bank.clone()
    for b, e in enumerate(ids.tolist()):
        out[e] = F.normalize(BANK_MOMENTUM * bank[e] + (1.0 - BANK_MOMENTUM) * z[b], dim=0, eps=1e-12)
    return out


def make_adamw(student, heads):
    """Returns torch.optim.AdamW over the student and the heads with codir's rule for
    weight decay: biases and LayerNorm parameters get none. A parameter without
    gradient gets a zero gradient first, because codir steps every tensor (decaying it)
    where torch would skip it."""
    named = list(student.named_parameters()) + [("crd." + n, p) for n, p in heads.named_parameters()]
    for _, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    decay = [p for n, p in named if not (n.endswith("bias") or n.endswith("LayerNorm.weight"))]
    no_decay = [p for n, p in named if n.endswith("bias") or n.endswith("LayerNorm.weight")]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS)


def main():
    gen = torch.Generator().manual_seed(20200930)
    out = {}

    # Weights: classification models with the masked-LM head, regression models without.
    teacher = BertModel(TEACHER_LAYERS, NUM_LABELS, mlm=True)
    student = BertModel(STUDENT_LAYERS, NUM_LABELS, mlm=True)
    teacher_reg = BertModel(TEACHER_LAYERS, 1, mlm=False)
    student_reg = BertModel(STUDENT_LAYERS, 1, mlm=False)
    for model in (teacher, student, teacher_reg, student_reg):
        init_weights(model, gen)
    heads = Heads(gen)
    a = math.sqrt(3.0 / PROJ_DIM)
    bank_t = round_to_f32((2.0 * torch.rand(NUM_EXAMPLES, PROJ_DIM, generator=gen) - 1.0) * a)
    bank_s = round_to_f32((2.0 * torch.rand(NUM_EXAMPLES, PROJ_DIM, generator=gen) - 1.0) * a)
    save_hf_folder(teacher, TEACHER_LAYERS, os.path.join(HERE, "teacher"))
    save_hf_folder(student, STUDENT_LAYERS, os.path.join(HERE, "student"))
    save_hf_folder(teacher_reg, TEACHER_LAYERS, os.path.join(HERE, "teacher_regression"))
    save_hf_folder(student_reg, STUDENT_LAYERS, os.path.join(HERE, "student_regression"))
    initial = {name: p.detach().clone() for name, p in heads.codir_params().items()}

    # The batch: example ids into the bank, labels i % 3 for example i, regression
    # targets, and as negatives every example of another label, shuffled. Taking the
    # whole pool lets the library's steps (codir_distill_step and the others), which
    # sample their own negatives, reach the same loss, because both scores are sums over
    # the negatives in any order.
    ids, types, mask = make_batch(gen)
    all_labels = [i % NUM_LABELS for i in range(NUM_EXAMPLES)]
    example_ids = torch.tensor([4, 2, 9])
    labels = torch.tensor([all_labels[e] for e in example_ids.tolist()])
    targets = torch.tensor([0.25, -1.5, 2.0])
    neg = []
    for e in example_ids.tolist():
        pool_ids = torch.tensor([j for j in range(NUM_EXAMPLES) if all_labels[j] != all_labels[e]])
        neg.append(pool_ids[torch.randperm(len(pool_ids), generator=gen)])
    neg = torch.stack(neg)
    assert neg.shape[1] == NUM_NEGATIVES
    idx = torch.cat([example_ids[:, None], neg], dim=1)
    T = ids.shape[1]
    mlm_positions = torch.tensor([0 * T + 2, 0 * T + 7, 1 * T + 4, 2 * T + 3])
    mlm_targets = torch.randint(5, VOCAB, (4,), generator=gen)

    out.update({
        "input.ids": ids, "input.types": types, "input.mask": mask, "input.labels": labels,
        "input.example_ids": example_ids, "input.targets": targets, "input.negatives": neg,
        "input.all_labels": torch.tensor(all_labels), "input.mlm_positions": mlm_positions,
        "input.mlm_targets": mlm_targets, "bank.teacher": bank_t, "bank.student": bank_s,
        "config.beta": torch.tensor([BETA]), "config.temperature": torch.tensor([TEMPERATURE]),
        "config.lambda": torch.tensor([LAMBDA]), "config.tau": torch.tensor([TAU]),
        "config.lr": torch.tensor([LR]), "config.weight_decay": torch.tensor([WEIGHT_DECAY]),
        "config.adam_beta1": torch.tensor([ADAM_BETAS[0]]), "config.adam_beta2": torch.tensor([ADAM_BETAS[1]]),
        "config.adam_eps": torch.tensor([ADAM_EPS]), "config.momentum": torch.tensor([BANK_MOMENTUM]),
    })
    for name, p in initial.items():
        out["heads." + name] = p

    # The teacher is frozen: no gradient through its backbone.
    with torch.no_grad():
        t_hidden, t_logits = teacher(ids, types, mask)
        t_mlm = teacher.mlm_logits(t_hidden[-1], mlm_positions)
        t_hidden_reg, t_logits_reg = teacher_reg(ids, types, mask)
    for i, h in enumerate(t_hidden):
        out["forward.teacher.hidden.%d" % i] = h
    out["forward.teacher.logits"] = t_logits
    out["forward.teacher.mlm_logits"] = t_mlm
    out["forward.teacher_regression.logits"] = t_logits_reg

    # Normalizers for the NCE settings: estimated on this batch with the initial heads
    # (the "estimated" settings, where codir estimates them too), and fixed values
    # near them that the C side is given.
    with torch.no_grad():
        s_hidden0, _ = student(ids, types, mask)
        given_log_z = {}
        for pooling in (POOL_MEAN, POOL_FIRST):
            zs0, zt0 = project(heads, s_hidden0, t_hidden, mask, pooling)
            given_log_z[pooling] = (nce_log_normalizer(zt0, bank_s, idx), nce_log_normalizer(zs0, bank_t, idx))

    # Scenarios: (name, model kind, mode, pooling, normalizers, store the step).
    scenarios = [
        ("infonce_mean", "classification", INFONCE, POOL_MEAN, None, True),
        ("infonce_first", "classification", INFONCE, POOL_FIRST, None, False),
        ("nce_mean", "classification", NCE, POOL_MEAN, "estimated", False),
        ("nce_first", "classification", NCE, POOL_FIRST, "given", True),
        ("mlm", "mlm", INFONCE, POOL_MEAN, None, True),
        ("regression", "regression", NCE, POOL_MEAN, "given", True),
    ]
    for name, kind, mode, pooling, normalizers, store_step in scenarios:
        s_model = BertModel(STUDENT_LAYERS, 1 if kind == "regression" else NUM_LABELS, kind != "regression")
        s_model.load_state_dict((student_reg if kind == "regression" else student).state_dict())
        h = Heads(torch.Generator())
        h.load_state_dict(heads.state_dict())
        t_h = t_hidden_reg if kind == "regression" else t_hidden

        def objective(bank_teacher):
            """Returns the terms of this scenario with the current parameters and the
            teacher bank bank_teacher, and what else the fixture stores."""
            r = {}
            r["hidden"], r["logits"] = s_model(ids, types, mask)

            # Task and KD terms of each kind.
            if kind == "classification":
                r["task"] = F.cross_entropy(r["logits"], labels)
                r["kd"] = kd_kl(r["logits"], t_logits)
            elif kind == "regression":
                r["task"] = F.mse_loss(r["logits"].view(-1), targets)
                r["kd"] = F.mse_loss(r["logits"], t_logits_reg)
            else:
                r["mlm_logits"] = s_model.mlm_logits(r["hidden"][-1], mlm_positions)
                r["task"] = F.cross_entropy(r["mlm_logits"], mlm_targets)
                r["kd"] = kd_kl(r["mlm_logits"], t_mlm)

            # The contrastive term.
            zs, zt = project(h, r["hidden"], t_h, mask, pooling)
            r["zs"], r["zt"] = zs, zt
            if mode == INFONCE:
                r["crd"] = infonce(zs, zt, bank_teacher, neg)
            else:
                if normalizers == "estimated":
                    log_z_t = nce_log_normalizer(zt.detach(), bank_s, idx)
                    log_z_s = nce_log_normalizer(zs.detach(), bank_teacher, idx)
                else:
                    # Given values: the estimate of this pooling on the classification
                    # models, moved by 0.5 and rounded to float32 as the C side stores them.
                    log_z_t = f32(given_log_z[pooling][0] + 0.5)
                    log_z_s = f32(given_log_z[pooling][1] - 0.5)
                r["log_z_t"], r["log_z_s"] = torch.tensor([log_z_t]), torch.tensor([log_z_s])
                r["crd"] = 0.5 * (nce(zt, bank_s, idx, log_z_t) + nce(zs, bank_teacher, idx, log_z_s))
            r["total"] = (1.0 - BETA) * r["task"] + BETA * r["kd"] + LAMBDA * r["crd"]
            return r

        def store_terms(prefix, r, bank_teacher):
            for term in ("task", "kd", "crd", "total"):
                out["%s.loss.%s" % (prefix, term)] = r[term].detach().reshape(1)
            for key in ("zs", "zt", "log_z_t", "log_z_s"):
                if key in r:
                    out["%s.%s" % (prefix, key)] = r[key]
            out[prefix + ".bank_after.teacher"] = bank_update(bank_teacher, r["zt"].detach(), example_ids)
            if mode == NCE:
                out[prefix + ".bank_after.student"] = bank_update(bank_s, r["zs"].detach(), example_ids)

        r = objective(bank_t)
        store_terms(name, r, bank_t)
        if name == "infonce_mean":
            for i, x in enumerate(r["hidden"]):
                out["forward.student.hidden.%d" % i] = x
            out["forward.student.logits"] = r["logits"]
        if kind == "regression":
            out["forward.student_regression.logits"] = r["logits"]
        if kind == "mlm":
            out["forward.student.mlm_logits"] = r["mlm_logits"]

        # Gradients of every student parameter and both heads, zero where none flows.
        r["total"].backward()
        by_name = dict(s_model.named_parameters())
        grads = codir_names(s_model, lambda n: by_name[n].grad if by_name[n].grad is not None
                            else torch.zeros_like(by_name[n]))
        for k, p in h.codir_params().items():
            grads[k] = p.grad
        for k, g in grads.items():
            out["%s.grad.%s" % (name, k)] = g.detach().clone()
        if not store_step:
            continue

        # One AdamW step, then every parameter.
        opt = make_adamw(s_model, h)
        opt.step()
        params = codir_names(s_model, lambda n: by_name[n])
        params.update(h.codir_params())
        for k, p in params.items():
            out["%s.after.%s" % (name, k)] = p.detach().clone()
        if name != "infonce_mean":
            continue

        # A second step from the updated parameters and teacher bank. At the first step
        # AdamW's update lr * g / (|g| + eps) does not depend on the betas; at the second
        # it does. Only the heads are stored, to keep the fixture small: the optimizer
        # runs the same code on every tensor.
        prefix = name + "_step2"
        bank_t2 = out[name + ".bank_after.teacher"]
        opt.zero_grad(set_to_none=False)
        r = objective(bank_t2)
        store_terms(prefix, r, bank_t2)
        r["total"].backward()
        opt.step()
        for k, p in h.codir_params().items():
            out["%s.grad.%s" % (prefix, k)] = p.grad.detach().clone()
            out["%s.after.%s" % (prefix, k)] = p.detach().clone()

    write_safetensors(os.path.join(HERE, "reference.safetensors"), out)

    # Gradients near zero make AdamW's step ill-conditioned (g / (|g| + eps) swings
    # for |g| ~ eps), so list the smallest nonzero ones for the tolerance choice.
    small = sorted((v.abs()[v != 0].min().item(), k) for k, v in out.items() if ".grad." in k and (v != 0).any())
    for value, key in small[:8]:
        print("smallest nonzero |gradient| %.3g in %s" % (value, key))
    written = [os.path.join(HERE, "reference.safetensors")]
    for folder in ("teacher", "student", "teacher_regression", "student_regression"):
        written += [os.path.join(HERE, folder, f) for f in ("config.json", "model.safetensors")]
    print("wrote %d tensors; the files written hold %d bytes" % (len(out), sum(map(os.path.getsize, written))))


if __name__ == "__main__":
    main()
