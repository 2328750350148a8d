"""The per-GPU memory plan: what one rank holds at its peak, term by term, from the model's
shape, the DeepSpeed JSON, the world size and the batch layout; no weights, no device.

Why a plan: a 7B job that does not fit fails after the model has loaded (or, for the continue
stage, hours into a pipeline). Every term here follows from arithmetic a reader can check,
and the activation terms follow this repository's own model (`megadrp/model/llama.py`)
tensor by tensor; `benchmarks/memory_model.py` measures the bytes a forward keeps for
backward and compares them with `retained` below (committed in
`benchmarks/results/memory_model.json`).

What one rank holds, under ZeRO-3 with W ranks and N parameters:
- weights: its 1/W shard of the 16-bit (or fp32) weights, plus every parameter small enough
  to stay whole on each rank (`stage3_param_persistence_threshold`);
- master and optimizer: the fp32 master shard and Adam's two fp32 moments (12 bytes a
  parameter over W), on the host when `offload_optimizer` is set;
- gradients: the partitioned gradient buffer (`data_types.grad_accum_dtype`: fp32 in our bf16
  configs), the reduce buckets and one whole gradient of the largest tensor before it is
  partitioned;
- live parameters: gathered full tensors, bounded by `stage3_max_live_parameters` plus the
  prefetch bucket;
- activations of one micro-batch (see `activations`), the logits with their fp32 upcast, the
  recomputed layer when checkpointing, the masks;
- runtime: the CUDA context, NCCL's buffers, cuBLAS workspaces (a fixed reserve) and the
  caching allocator's fragmentation (a share of the rest).
The peak is the larger of a training step's and an evaluation's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GIB = 2**30
# CUDA context, NCCL communicators and cuBLAS workspaces: what a rank holds before its first
# tensor (about 0.5 GiB of context and 0.5–1 GiB of NCCL buffers on H100 nodes).
RUNTIME_RESERVE = int(1.5 * GIB)
# The caching allocator rounds and splits blocks; a share of everything allocated.
FRAGMENTATION = 0.05
# The largest micro-batch `auto` chooses where checkpointing is allowed, in tokens (4 × 4096):
# a micro-batch of a ≥1B model that large already runs its matrix products at full speed, so
# more tokens buy no throughput, only a larger share of memory for the logits.
AUTO_MAX_TOKENS = 16384
# The share of the device `auto` leaves unplanned: the plan is an estimate (within a few
# percent of what the forward keeps, benchmarks/results/memory_model.json; the whole peak is
# checked on a GPU by benchmarks/gpu_check.sh), and a run that fails at step 0 costs more than
# one that runs with a smaller micro-batch.
AUTO_HEADROOM = 0.10


@dataclass(frozen=True)
class Dims:
    """The shape of a Llama-family model, as the memory arithmetic needs it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    neox: bool = False  # GPT-NeoX: one fused q/k/v tensor, a two-matrix MLP, LayerNorms with a bias
    parallel: bool = False  # GPT-NeoX's parallel residual: both LayerNorms read one input
    qk_norm: bool = False  # Qwen3: a head_dim-wide RMSNorm on queries and one on keys per layer

    @classmethod
    def from_config(cls, c) -> "Dims":
        from megadrp.model.families import arch_of, attention_biases, mlp_bias, qk_norm
        from megadrp.model.llama import head_dim_of

        qkv, o = attention_biases(c)
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim=head_dim_of(c),
                   intermediate=c.intermediate_size, vocab=c.vocab_size,
                   tied=bool(getattr(c, "tie_word_embeddings", False)), qkv_bias=qkv, o_bias=o, mlp_bias=mlp_bias(c),
                   neox=arch_of(c) == "neox", parallel=bool(getattr(c, "use_parallel_residual", False)),
                   qk_norm=qk_norm(c))

    def tensors(self) -> list[int]:
        """The element count of every parameter tensor (what ZeRO-3 partitions one by one)."""
        d, hd, h, kv, i = self.hidden, self.head_dim, self.heads, self.kv_heads, self.intermediate
        if self.neox:
            layer = [3 * h * hd * d, d * h * hd, i * d, d * i, d, d, d, d]  # qkv, dense, in, out, 2 LayerNorms
            layer += [3 * h * hd, d] if self.qkv_bias else []
            layer += [i, d]
            emb = [self.vocab * d] * (1 if self.tied else 2)
            return layer * self.layers + emb + [d, d]
        layer = [h * hd * d, kv * hd * d, kv * hd * d, d * h * hd, i * d, i * d, d * i, d, d]
        if self.qkv_bias:
            layer += [h * hd, kv * hd, kv * hd]
        if self.o_bias:
            layer += [d]
        if self.mlp_bias:
            layer += [i, i, d]
        if self.qk_norm:
            layer += [hd, hd]
        emb = [self.vocab * d] * (1 if self.tied else 2)
        return layer * self.layers + emb + [d]

    def parameters(self) -> int:
        return sum(self.tensors())


@dataclass(frozen=True)
class MaskGates:
    """Which mask gates a pruning forward applies (the active mask sets); all False when the
    stage does not prune."""

    layer: bool = False
    head: bool = False
    intermediate: bool = False
    hidden: bool = False

    @property
    def any(self) -> bool:
        return self.layer or self.head or self.intermediate or self.hidden

    def mask_parameters(self, d: Dims) -> int:
        """log α of every active set and their λ's (two a set); none without a pruning set."""
        if not self.any:
            return 0
        n = (self.layer * d.layers + self.head * d.layers * d.kv_heads + self.intermediate * d.layers * d.intermediate
             + self.hidden * d.hidden)
        return n + 2 * (self.layer + self.head + self.intermediate + self.hidden)


@dataclass(frozen=True)
class ZeroSettings:
    """What the memory arithmetic reads from a DeepSpeed JSON (after `auto` values are filled)."""

    stage: int
    param_bytes: int  # 2 under bf16/fp16, 4 in fp32
    grad_accum_bytes: int  # the partitioned gradient buffer's dtype
    comm_bytes: int  # the reduction's dtype
    offload_optimizer: bool
    offload_param: bool
    reduce_bucket: int  # elements
    prefetch_bucket: int
    max_live: int
    persistence_threshold: int
    optimizer: str  # "torch" (torch's AdamW), "fused" (DeepSpeed FusedAdam), "cpu" (DeepSpeed CPUAdam)

    @classmethod
    def from_ds(cls, ds: dict) -> "ZeroSettings":
        z = ds.get("zero_optimization", {})
        half = ds.get("bf16", {}).get("enabled", False) or ds.get("fp16", {}).get("enabled", False)
        pbytes = 2 if half else 4
        sizes = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
        accum = sizes.get(str(ds.get("data_types", {}).get("grad_accum_dtype")).lower(), pbytes)
        comm = sizes.get(str(ds.get("communication_data_type")).lower(), pbytes)
        off_opt = z.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        off_par = z.get("offload_param", {}).get("device", "none") not in ("none", None)
        params = ds.get("optimizer", {}).get("params", {})
        opt = "torch" if params.get("torch_adam") else ("cpu" if off_opt else "fused")
        return cls(stage=int(z.get("stage", 0)), param_bytes=pbytes, grad_accum_bytes=accum, comm_bytes=comm,
                   offload_optimizer=off_opt, offload_param=off_par,
                   reduce_bucket=int(float(z.get("reduce_bucket_size", 5e8))),
                   prefetch_bucket=int(float(z.get("stage3_prefetch_bucket_size", 5e7))),
                   max_live=int(float(z.get("stage3_max_live_parameters", 1e9))),
                   persistence_threshold=int(float(z.get("stage3_param_persistence_threshold", 1e5))), optimizer=opt)


def fill_auto(ds: dict, hidden: int) -> dict:
    """DeepSpeed JSON `"auto"` bucket sizes, from the hidden size as Hugging Face's
    integration sets them: reduce bucket d², prefetch bucket 0.9·d², persistence 10·d. A
    fixed 5e8 reduce bucket costs 1 GB of bf16 (2 GB in fp32) on every GPU whatever the model;
    d² is 32 MB at d = 4096 and still large enough for NCCL to run at bandwidth."""
    z = ds.get("zero_optimization", {})
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in auto.items():
        if z.get(key) == "auto":
            z[key] = value
    return ds


# ---- activations ---------------------------------------------------------------------------
def _norm(tokens: int, hidden: int, act: int) -> int:
    """What one RMSNorm keeps: its fp32 input, the normalised tensor before and after the
    weight (`act` bytes each), the fp32 reciprocal RMS of each token."""
    return (4 + 2 * act) * tokens * hidden + 4 * tokens


def layer_activations(d: Dims, tokens: int, act: int, gates: MaskGates) -> int:
    """Bytes one decoder layer keeps for backward (no checkpointing), `act` bytes an
    activation element (2 under bf16), `tokens` = micro-batch × sequence length. Tensor by
    tensor, as `megadrp/model/llama.py` computes them:
    - each RMSNorm: its fp32 input (the upcast copy; in fp32 the input itself), the
      normalised tensor before and after the weight, and the fp32 reciprocal RMS per token;
    - attention: q and k after rope, v, the output and the fp32 log-sum-exp (flash SDPA);
    - MLP: gate_proj's output, its SiLU, up_proj's output and their product;
    - under pruning, the gated weight copy of o_proj and down_proj (`GatedLinear` folds the
      gates into the weight, and the linear keeps that copy for its backward).
    Qwen3: its q/k RMSNorms their fp32 input and normalised output, and a reciprocal RMS per
    token and head.
    GPT-NeoX (model/neox.py): each LayerNorm its output and, unmasked (torch's own), its input
    (one shared by both under the parallel residual) and fp32 statistics, or under a hidden mask
    two fp32 intermediates; attention the fused q/k/v output (v is a view of it), q and k after
    the partial rope, the output, its copy for the dense projection and the log-sum-exp; the
    MLP its input and GELU output."""
    t, dm, hd = tokens, d.hidden, d.head_dim
    if d.neox:
        inputs = 1 if d.parallel else 2
        norms = 2 * (8 + act) * t * dm if gates.hidden else act * t * dm * (inputs + 2) + 16 * t
        attention = act * t * hd * 7 * d.heads + 4 * t * d.heads
        mlp = 2 * act * t * d.intermediate
    else:
        norms = 2 * _norm(t, dm, act)
        attention = act * t * hd * (2 * d.heads + 2 * d.kv_heads) + 4 * t * d.heads
        mlp = 4 * act * t * d.intermediate
        if d.qk_norm:
            norms += (4 + act) * t * hd * (d.heads + d.kv_heads) + 4 * t * (d.heads + d.kv_heads)
    gated = 0
    out_gate = gates.layer or gates.hidden
    if gates.head or out_gate:
        gated += act * dm * d.heads * hd
    if gates.intermediate or out_gate:
        gated += act * dm * d.intermediate
    return norms + attention + mlp + gated


def activations(d: Dims, micro_batch: int, seq_len: int, act: int, gates: MaskGates,
                checkpointed_layers: int) -> dict[str, int]:
    """What a training forward of one micro-batch keeps for backward, and the working set on
    top of it at the peak. Keys:
    - `layers`: the decoder layers' saved tensors; a checkpointed layer keeps only its input;
    - `outside`: the embedding (token ids; under a hidden mask its output too), the final norm,
      rope tables;
    - `logits_saved`: the fp32 log-softmax the loss keeps;
    - `retained` = the three above: what the memory benchmark measures;
    - `logits_peak`: on top of that, the loss's transients (the 16-bit logits and their fp32
      upcast in the forward; two fp32 [tokens, vocab] gradients in its backward);
    - `recompute`: one checkpointed layer recomputed in backward (0 without checkpointing);
    - `backward`: what a layer's backward holds beyond its saved tensors: the MLP's activation
      gradients less the saved tensors already released, and the residual's gradient (about
      one [tokens, intermediate] and two [tokens, hidden] tensors; `benchmarks/memory_model.py`
      measures it on a shape where it, not the logits, sets the peak)."""
    t = micro_batch * seq_len
    full = layer_activations(d, t, act, gates)
    k = max(0, min(checkpointed_layers, d.layers))
    layers = k * act * t * d.hidden + (d.layers - k) * full
    # the token ids (inputs and labels are views of one [micro, seq + 1] tensor), the final
    # norm, the rope tables
    final_norm = (((8 + act) * t * d.hidden if gates.hidden else 2 * act * t * d.hidden + 8 * t) if d.neox
                  else _norm(t, d.hidden, act))
    outside = 8 * micro_batch * (seq_len + 1) + final_norm + 2 * act * seq_len * d.head_dim
    if gates.hidden:
        outside += act * t * d.hidden
    logits_saved = 4 * t * d.vocab
    return {
        "layers": layers, "outside": outside, "logits_saved": logits_saved,
        "retained": layers + outside + logits_saved,
        "logits_peak": 8 * t * d.vocab,
        "recompute": full if k else 0,
        "backward": act * t * (d.intermediate + 2 * d.hidden),
    }


def eval_activations(d: Dims, micro_batch: int, seq_len: int, act: int) -> int:
    """An evaluation forward (no gradients): one layer's intermediates at a time, then the
    16-bit logits, their fp32 upcast and the log-softmax."""
    t = micro_batch * seq_len
    return act * t * (3 * d.intermediate + 2 * d.hidden) + (act + 8) * t * d.vocab


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Bytes per GPU, term by term (`terms`), and what they were computed for."""

    world_size: int
    micro_batch: int
    seq_len: int
    checkpointed_layers: int
    layers: int
    parameters: int
    optimizer: str
    terms: dict[str, int] = field(default_factory=dict)
    peak_phase: str = "train"
    host_bytes_per_rank: int = 0  # pinned host memory (offload), per rank
    activations: dict[str, int] = field(default_factory=dict)  # the breakdown behind the activation terms

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def largest(self) -> tuple[str, int]:
        name = max(self.terms, key=lambda k: self.terms[k])
        return name, self.terms[name]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["memory_per_gpu_bytes"] = self.total
        out["memory_per_gpu_gib"] = round(self.total / GIB, 2)
        return out

    def lines(self) -> list[str]:
        ckpt = ("every layer" if self.checkpointed_layers >= self.layers
                else f"{self.checkpointed_layers} of {self.layers} layers" if self.checkpointed_layers else "off")
        head = (f"memory per GPU: {self.total / GIB:.1f} GiB at micro-batch {self.micro_batch} × {self.seq_len} "
                f"tokens, activation checkpointing {ckpt}, {self.world_size} ranks (peak in {self.peak_phase})")
        rows = [f"  {name:<22} {b / GIB:8.2f} GiB" for name, b in self.terms.items()]
        if self.host_bytes_per_rank:
            rows.append(f"  (host, pinned, per rank: {self.host_bytes_per_rank / GIB:.1f} GiB)")
        return [head, *rows]


def distill_logits(chunk: int, vocab: int, tokens: int) -> int:
    """The peak of the chunked distillation loss (model/distill.py): one chunk's fp32 logits of
    student and teacher, their log-softmaxes, the teacher's probabilities, and in backward the
    recomputed chunk with its gradients: about nine [chunk, vocab] fp32 tensors."""
    return 36 * min(chunk, tokens) * vocab


def plan_memory(dims: Dims, zero: ZeroSettings, world_size: int, micro_batch: int, seq_len: int,
                checkpointed_layers: int, gates: MaskGates = MaskGates(), eval_micro_batch: int | None = None,
                teacher: Dims | None = None, distill_chunk: int = 1024) -> MemoryPlan:
    """The per-GPU plan of one rank. Without ZeRO-3 (stage < 3) nothing is partitioned. `teacher`:
    a frozen teacher on its own ZeRO-3 engine (distillation): its weight shards, its gathered
    parameters and its final hidden states, and the chunked loss in place of the full logits."""
    tensors = dims.tensors()
    n = sum(tensors) + gates.mask_parameters(dims)
    w = world_size if zero.stage == 3 else 1
    pb = zero.param_bytes
    persistent = sum(x for x in tensors if x <= zero.persistence_threshold) if zero.stage == 3 else 0
    shard = math.ceil((n - persistent) / w) + persistent
    terms: dict[str, int] = {}
    host = 0
    terms["weights"] = 0 if zero.offload_param else pb * shard
    state = (4 + 8) * math.ceil(n / w)  # fp32 master + Adam's m and v
    grads = zero.grad_accum_bytes * math.ceil(n / w)
    if zero.offload_optimizer:
        host += state + grads
        terms["master_and_adam"] = 0
        terms["gradient_partitions"] = 0
    else:
        terms["master_and_adam"] = state
        terms["gradient_partitions"] = grads
    if zero.offload_param:
        host += pb * shard
    largest = max(tensors)
    bucket = min(zero.reduce_bucket, n)
    terms["gradient_buckets"] = (2 * pb + (zero.comm_bytes if zero.comm_bytes != pb else 0)) * bucket + pb * largest
    terms["live_parameters"] = (pb * min(n - persistent, zero.max_live + zero.prefetch_bucket)
                                if zero.stage == 3 else 0)
    act = activations(dims, micro_batch, seq_len, pb, gates, checkpointed_layers)
    ev = eval_activations(dims, eval_micro_batch or micro_batch, seq_len, pb)
    if teacher is not None:
        t_tensors = teacher.tensors()
        n_t = sum(t_tensors)
        t_persistent = sum(x for x in t_tensors if x <= zero.persistence_threshold) if zero.stage == 3 else 0
        w_t = world_size if zero.stage == 3 else 1
        terms["teacher_weights"] = 0 if zero.offload_param else pb * (math.ceil((n_t - t_persistent) / w_t)
                                                                      + t_persistent)
        terms["teacher_live_parameters"] = (pb * min(n_t - t_persistent, zero.max_live + zero.prefetch_bucket)
                                            if zero.stage == 3 else 0)
        tokens = micro_batch * seq_len
        act["outside"] += pb * tokens * teacher.hidden  # the teacher's final hidden states, kept for the loss
        act["logits_saved"], act["logits_peak"] = 0, distill_logits(distill_chunk, dims.vocab, tokens)
        act["retained"] = act["layers"] + act["outside"]
        # an evaluation runs the teacher, then the student, then the chunked loss: the larger transient
        ev = (max(eval_activations(teacher, eval_micro_batch or micro_batch, seq_len, pb), ev)
              + distill_logits(distill_chunk, dims.vocab, (eval_micro_batch or micro_batch) * seq_len))
    train = act["layers"] + act["outside"] + act["logits_saved"] + max(act["logits_peak"],
                                                                       act["recompute"] + act["backward"])
    terms["activations"] = act["layers"] + act["outside"]
    terms["logits"] = act["logits_saved"] + act["logits_peak"]
    terms["recompute_and_backward"] = act["recompute"] + act["backward"]
    peak_phase = "train"
    if ev > train:  # an evaluation's forward holds more than a training step: report its terms
        terms["activations"], terms["logits"], terms["recompute_and_backward"] = 0, ev, 0
        peak_phase = "eval"
    else:  # the logits' and the recompute's peaks do not coincide: the smaller is not counted
        if act["logits_peak"] >= act["recompute"] + act["backward"]:
            terms["recompute_and_backward"] = 0
        else:
            terms["logits"] = act["logits_saved"]
    # the masks' per-forward tensors: probabilities, draws and gates (fp32), a few copies each
    terms["masks"] = 16 * gates.mask_parameters(dims) if gates.any else 0
    allocated = sum(terms.values())
    terms["runtime_reserve"] = RUNTIME_RESERVE
    terms["fragmentation"] = int(FRAGMENTATION * allocated)
    return MemoryPlan(world_size=world_size, micro_batch=micro_batch, seq_len=seq_len,
                      checkpointed_layers=min(checkpointed_layers, dims.layers), layers=dims.layers, parameters=n,
                      optimizer=zero.optimizer, terms=terms, peak_phase=peak_phase, host_bytes_per_rank=host,
                      activations=act)


def choose(dims: Dims, zero: ZeroSettings, world_size: int, per_rank: int, seq_len: int, gates: MaskGates,
           budget: int, micro_batch: int | None, checkpointed: int | None, eval_micro_batch: int | None = None,
           teacher: Dims | None = None, distill_chunk: int = 1024) -> MemoryPlan | None:
    """`train.micro_batch: auto` and `model.activation_checkpointing: auto`: the largest
    micro-batch that fits `budget` bytes (a divisor of the rank's share of the global batch,
    so no sample is dropped), then the fewest checkpointed layers that let it fit.
    `micro_batch` / `checkpointed` (layers) given, not None, are kept as they are. None when
    nothing fits. Where checkpointing is allowed, `auto` stops at AUTO_MAX_TOKENS tokens, and
    it plans for `budget` less AUTO_HEADROOM."""
    budget = int(budget * (1 - AUTO_HEADROOM))
    sizes = [micro_batch] if micro_batch else sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0),
                                                     reverse=True)
    options = [checkpointed] if checkpointed is not None else list(range(dims.layers + 1))
    for mb in sizes:
        if micro_batch is None and options[-1] > 0 and mb * seq_len > AUTO_MAX_TOKENS and mb > 1:
            continue
        for k in options:
            plan = plan_memory(dims, zero, world_size, mb, seq_len, k, gates, eval_micro_batch, teacher,
                               distill_chunk)
            if plan.total <= budget:
                return plan
    return None


def build_requirements(zero: ZeroSettings) -> str | None:
    """What the DeepSpeed optimizer op in the config needs on the node, or None (torch's)."""
    if zero.optimizer == "fused":
        return ("DeepSpeed FusedAdam is JIT-compiled at the first start: the node needs nvcc (a CUDA toolkit matching "
                "torch's CUDA) and ninja, or a DeepSpeed built with DS_BUILD_FUSED_ADAM=1; "
                "\"torch_adam\": true in the optimizer params uses torch's fused AdamW and needs no compiler")
    if zero.optimizer == "cpu":
        return ("DeepSpeed CPUAdam (offload_optimizer) is JIT-compiled at the first start: the node needs a C++ "
                "compiler and ninja, or a DeepSpeed built with DS_BUILD_CPU_ADAM=1; \"torch_adam\": true uses "
                "torch's AdamW on the host instead (no compiler; slower steps)")
    return None
