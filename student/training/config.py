"""What a distill run is: DistillConfig (every option, validated once) over the recipe table (recipes.py), and the
student's size derived from a config and a cache (the budget: budget.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tcache.device import PRECISIONS
from tcache.errors import TcacheError
from tcache.fields import opt
from tcache.student.models.match_loss import MATCH_LOSSES
from tcache.student.training.losses import KD_TAILS
from tcache.student.models.xlstm import MLSTM_KERNELS, SLSTM_BACKENDS, StudentConfig
from tcache.student.training.recipes import RECIPES, Recipe, Stage
from tcache.student.models.mixer import MIXES, MLSTM_HEADS
from tcache.student.training.runtime import COMPILE_MODES
from tcache.student.training.schedules import Anneal, parse_anneal
from tcache.student.training.shard import fsdp_conflicts
from tcache.units import parse_bytes, parse_count


TRAIN_CHOICES = ("all", "mixer", "new", "lora")
SHARDS = ("auto", "none", "fsdp")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Fields that may differ between a run and its resumption.
RESUMABLE_DIFFS = {"resume", "overwrite", "export", "workers", "ckpt_every", "keep_ckpts", "device", "cache", "out",
                   "compile", "max_gpu_memory", "checkpointing", "activation_budget", "shard", "plan"}


def parse_blocks(text: str | list[int] | None, flag: str) -> list[int] | None:
    """'0,2' -> [0, 2]; 'none' or '' -> []; None -> None (the recipe's)."""
    if text is None or isinstance(text, list):
        return text
    if text.strip() in ("", "none"):
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise TcacheError(f"{flag} {text!r} is not a comma-separated list of block indices, e.g. 0,2") from None


@dataclass
class DistillConfig:
    cache: str = opt(argument=True)
    """Cache directory made by `tcache build`."""
    out: str = opt()
    """Run directory: student, checkpoints, metrics."""
    recipe: str = opt("v1", choices=RECIPES)
    """v1: floor(L/2) alternating sLSTM/mLSTM blocks, CE+KD+align. v2: L mLSTM blocks, CE+align. hybrid: the
    teacher with attention replaced by sliding-window attention + mLSTM, stage I then stage II."""
    stage: str = opt("all", choices=("all", "1", "2"))
    """Hybrid recipe: run stage I (hidden-state matching), stage II (KD from the cache), or both."""
    window: int = 32
    """Hybrid recipe: tokens of the sliding attention window."""
    sinks: int = 4
    """Hybrid recipe: first tokens every position also attends to."""
    full_attention_layers: list[int] | None = opt(None, text=True)
    """Hybrid recipe: comma-separated teacher layers that keep full attention (default: none)."""
    stage1_tokens: int | None = opt(None, text=True)
    """Hybrid recipe: stage I's token budget (default: half of stage II's); --tokens/--steps/--epochs set
    stage II's."""
    stage1_lr: float = 1e-2
    """Hybrid recipe: stage I's peak learning rate (cosine)."""
    branches: str = opt("both", choices=("both", "mlstm", "window"))
    """Hybrid recipe: the mixer's branches: both, or one alone (ablations: mlstm has no window, window no mLSTM
    and nothing for stage I to train)."""
    igate_bias: float | None = None
    """Hybrid recipe: the mLSTM input gate's bias at init; default ln(d sqrt(2d) / 2) for head dim d, which
    keeps the mLSTM normaliser's floor inactive (docs/hybrid.md)."""
    feature_dim: int | None = None
    """Hybrid recipe: Hedgehog features per head for the mLSTM's q and k (its state is F x d per head); default 2x
    the head dim. A multiple of 16 (mlstm_kernels' Triton kernel)."""
    mlstm_heads: str = opt("query", choices=MLSTM_HEADS)
    """Hybrid recipe: the mLSTM's heads: query (one state per query head) or kv (one per key / value head, shared
    by its group of query heads: a decode state H / Hkv times smaller)."""
    mix: str = opt("gate", choices=MIXES)
    """Hybrid recipe: how the window and the mLSTM combine: gate (a per-head output gate, the default) or joint
    (LoLCATs: one softmax denominator over the window's scores and the mLSTM's linear scores outside the window;
    quadratic in T like LoLCATs' training form; it decodes from a recurrent state like the gate)."""
    window_dropout: float = 0.0
    """Hybrid recipe (--mix gate): the probability, per layer and micro-batch of stages I and II, that a layer
    trains on its mLSTM branch alone, its window dropped, so the mLSTM must carry the context itself (SWAX-style
    window dropout); generation and eval always use the window."""
    window_dropout_final: float | None = None
    """Hybrid recipe, with --window-dropout: the probability at the run's last micro-batch, reached linearly from
    --window-dropout at the first (scheduled window dropout: the mLSTM learns to stand alone early, the layers then
    train as they will run); unset: --window-dropout throughout."""
    mlstm_rope: bool = False
    """Hybrid recipe: give the mLSTM branch RoPE-rotated q and k (the paper's reading) instead of unrotated."""
    qk_merge: bool = False
    """Hybrid recipe: step 3 of the paper between stage I and stage II: fold each layer's feature maps into the
    mLSTM's own query / key projections (exact), which stage II then trains apart from the window's; off by default
    until measured (docs/hybrid.md)."""
    init: str | None = None
    """Hybrid recipe, --stage 2: start from this finished hybrid student (a distill or `tcache merge` output) instead
    of the converted teacher; its teacher and recipe shape must be this run's."""
    match_loss: str = opt("output", choices=MATCH_LOSSES)
    """Hybrid recipe: stage I's objective per layer: output (MSE of the attention output against the teacher's),
    weights (Hedgehog's cross-entropy of the teacher's softmax attention weights against the mLSTM feature maps'
    linear attention weights; O(T^2) compute per layer, in chunks of queries), or both (their sum)."""
    from_scratch: bool = False
    """xLSTM recipes: random embedding and head, trained with the blocks (the papers' xLSTM baseline)."""
    train: str = opt("all", choices=TRAIN_CHOICES)
    """Hybrid recipe: what stage II trains: every parameter, the mixers (new + attention projections), only
    the new parameters (feature maps and gates, end to end), or lora: the new parameters and LoRA adapters on
    the teacher's frozen projections (--lora-targets), merged into them when the student is saved."""
    lora_rank: int = 16
    """--train lora: the adapters' rank r (each adapted d_in x d_out projection trains r (d_in + d_out))."""
    lora_alpha: float | None = None
    """--train lora: the adapters' scale alpha (the update is alpha / r * B A); default 2x --lora-rank."""
    lora_dropout: float = 0.0
    """--train lora: dropout on the adapters' input, in [0, 1)."""
    lora_targets: list[str] | str = opt(",".join(LORA_TARGETS), text=True)
    """--train lora: comma-separated names of the decoder layers' linear projections that get adapters
    (Llama / Qwen2: attention q/k/v/o, MLP gate/up/down)."""
    blocks: int | None = None
    """Override the recipe's number of blocks."""
    heads: int | None = None
    """Override the recipe's heads, roundup(H_t, 4)."""
    slstm_at: list[int] | None = opt(None, text=True)
    """Override which blocks are sLSTM: comma-separated indices, 'none' for all mLSTM."""
    tokens: int | None = opt(None, text=True)
    """Token budget (e.g. 50M); exclusive with --steps and --epochs."""
    steps: int | None = None
    """Optimizer-step budget."""
    epochs: float | None = None
    """Passes over the cache; the default budget is 1 epoch."""
    batch_size: int = 8
    """Rows per micro-batch."""
    grad_accum: int = 4
    """Micro-batches per optimizer step."""
    lr: float | None = None
    """Peak learning rate (linear warmup, then the stage's schedule); default: the recipe's (v1, v2: 2e-4;
    hybrid stage II: 1e-5)."""
    warmup: float = 0.1
    """Warmup fraction of the steps."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of --lr."""
    weight_decay: float | None = None
    """AdamW weight decay (matrices only); default: the recipe's (v1, v2: 0.01; hybrid: 0.1)."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    alpha: Anneal | None = opt(None, text=True, metavar="VALUE|START:FINAL")
    """KD weight, VALUE or START:FINAL; default: the recipe's."""
    beta: Anneal | None = opt(None, text=True, metavar="VALUE|START:FINAL")
    """Alignment weight, VALUE or START:FINAL; default: the recipe's."""
    temperature: Anneal | None = opt(None, text=True, metavar="VALUE|START:FINAL")
    """KD temperature, VALUE or START:FINAL; default: the recipe's."""
    delta: float = 0.05
    """Per-epoch Delta of START:FINAL schedules given on the command line."""
    kd_tail: str = opt("bucket", choices=KD_TAILS)
    """Teacher mass outside the top-k: a tail bucket, or renormalise over the top-k."""
    precision: str = opt("auto", choices=PRECISIONS)
    """auto (bf16 GPU, fp16 GPU without bf16 such as a T4, fp32 CPU), fp32, fp16, bf16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    seed: int = 0
    """Seed of the model's initialisation and of the data order."""
    workers: int = -1
    """DataLoader worker processes reading the cache; -1: min(4, cores/2) on a GPU, 0 on CPU."""
    loss_chunk: int = -1
    """Positions per chunk of the fused CE+KD over the vocabulary (no (B, T, V) logits kept); 0: full
    logits; -1: 1024."""
    compile: str = opt("auto", choices=COMPILE_MODES)
    """torch.compile each xLSTM block (the hybrid: its whole step as one graph); cudagraphs also replays it as CUDA
    graphs (the step is bound by Python's kernel launches otherwise); auto: cudagraphs on GPUs of compute
    capability >= 8.0 (the hybrid: >= 7.5, a T4 too, and `on` under checkpointing), else off."""
    max_gpu_memory: str | None = None
    """Cap GPU memory, e.g. 16GB, to test a smaller card's budget (a T4's) on a larger GPU."""
    checkpointing: str = opt("auto", choices=("auto", "on", "off"))
    """Recompute each block's (hybrid: decoder layer's) activations in the backward instead of keeping them:
    one more forward per step; auto: hybrid on a GPU with under 24 GiB (--max-gpu-memory, else the card's),
    xLSTM recipes on CPU."""
    activation_budget: float | None = None
    """The hybrid's compiled step keeps this share (0-1) of its activations for the backward and torch.compile's
    partitioner recomputes the rest, in place of per-layer checkpointing, so it can run as CUDA graphs too."""
    shard: str = opt("auto", choices=SHARDS)
    """Under torchrun: none (every rank holds the whole student and its optimizer), fsdp (FSDP2: each decoder layer
    or block, and the rest, split over the ranks; checkpoints sharded) or auto: fsdp when the student with its
    optimizer state does not fit one GPU, none on CPU and in one process."""
    plan: bool = False
    """Train nothing: print the bytes per GPU rank the run needs (weights, gradients, AdamW state, activations
    estimated) unsharded and with --shard fsdp, and the fewest GPUs of --max-gpu-memory (else this machine's GPU,
    else 80 GB) that fit it."""
    ckpt_every: int = 0
    """Checkpoint every N optimizer steps; 0: only the final student."""
    keep_ckpts: int = 2
    """Checkpoints kept (the newest ones)."""
    resume: bool = False
    """Continue from the newest checkpoint in --out that loads (same options and cache)."""
    overwrite: bool = False
    """Replace the run at --out: the new student is trained beside it and swapped in when complete."""
    export: str | None = None
    """Also write the trained student as a transformers model directory here (what `tcache export` writes)."""
    mlstm_kernel: str = opt("auto", choices=MLSTM_KERNELS)
    """mLSTM kernel; auto: parallel up to 1024 tokens of context, chunkwise--triton_xl_chunk beyond on CUDA."""
    slstm_backend: str = opt("auto", choices=SLSTM_BACKENDS)
    """sLSTM backend; auto: cuda on compute capability >= 8.0 with nvcc, vanilla otherwise."""
    online_teacher: str | None = None
    """Comparison runs only: a HF teacher on the device computes every batch's targets instead of the cache
    (same rows, top-k and layer groups)."""

    def __post_init__(self) -> None:
        def positive(flag: str, v) -> None:
            if v is not None and not v > 0:
                raise TcacheError(f"{flag} must be positive, got {v}")

        if self.recipe not in RECIPES:
            raise TcacheError(f"--recipe {self.recipe!r} is unknown; use one of {', '.join(RECIPES)}")
        self.tokens = parse_count(self.tokens, "--tokens") if self.tokens is not None else None
        self.slstm_at = parse_blocks(self.slstm_at, "--slstm-at")
        budgets = [n for n, v in (("--tokens", self.tokens), ("--steps", self.steps), ("--epochs", self.epochs))
                   if v is not None]
        if len(budgets) > 1:
            raise TcacheError(f"{' and '.join(budgets)} both set; give one budget")
        for flag, v in (("--steps", self.steps), ("--epochs", self.epochs)):
            positive(flag, v)
        for flag, v in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                        ("--keep-ckpts", self.keep_ckpts)):
            if v < 1:
                raise TcacheError(f"{flag} must be at least 1, got {v}")
        for flag, v, lo in (("--workers", self.workers, "-1 (automatic), 0 or more"),
                            ("--loss-chunk", self.loss_chunk, "-1 (automatic), 0 (full logits) or more")):
            if v < -1:
                raise TcacheError(f"{flag} must be {lo}, got {v}")
        recipe = RECIPES[self.recipe]
        self.lr = recipe.lr if self.lr is None else self.lr
        self.weight_decay = recipe.weight_decay if self.weight_decay is None else self.weight_decay
        for flag, v in (("--ckpt-every", self.ckpt_every), ("--weight-decay", self.weight_decay),
                        ("--grad-clip", self.grad_clip), ("--delta", self.delta), ("--sinks", self.sinks)):
            if v < 0:
                raise TcacheError(f"{flag} must be 0 or more, got {v}")
        if not 0 <= self.warmup < 1:
            raise TcacheError(f"--warmup is a fraction of the run in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TcacheError(f"--min-lr-ratio is a fraction of --lr in [0, 1], got {self.min_lr_ratio}")
        for flag, choices, v in (("--kd-tail", KD_TAILS, self.kd_tail), ("--compile", COMPILE_MODES, self.compile),
                                 ("--precision", PRECISIONS, self.precision), ("--train", TRAIN_CHOICES, self.train),
                                 ("--match-loss", MATCH_LOSSES, self.match_loss),
                                 ("--mlstm-heads", MLSTM_HEADS, self.mlstm_heads), ("--mix", MIXES, self.mix),
                                 ("--shard", SHARDS, self.shard)):
            if v not in choices:
                raise TcacheError(f"{flag} {v!r} is unknown; use one of {', '.join(choices)}")
        if self.match_loss != "output" and not any(s.loss == "match" for s in recipe.stages):
            raise TcacheError(f"--match-loss {self.match_loss} sets the hybrid recipe's stage I objective; the "
                              f"{self.recipe} recipe has no stage I: use --recipe hybrid or drop --match-loss")
        if self.match_loss != "output" and self.branches == "window":
            raise TcacheError(f"--match-loss {self.match_loss} trains the mLSTM's feature maps; --branches window has "
                              "none: use --branches both or mlstm, or drop --match-loss")
        if self.mix != "gate" and (recipe.model != "hybrid" or self.branches != "both"):
            raise TcacheError(f"--mix {self.mix} combines the hybrid recipe's two branches; use it with --recipe "
                              "hybrid and --branches both, or drop --mix")
        if self.window_dropout and (recipe.model != "hybrid" or self.mix != "gate" or self.branches != "both"
                                    or not 0 < self.window_dropout < 1):
            raise TcacheError(f"--window-dropout {self.window_dropout} drops the hybrid's window branch with that "
                              "probability in [0, 1); use it with --recipe hybrid, --mix gate and --branches both")
        if self.window_dropout_final is not None and not (self.window_dropout and 0 <= self.window_dropout_final < 1):
            raise TcacheError(f"--window-dropout-final {self.window_dropout_final} ends --window-dropout's schedule; "
                              "give --window-dropout too, and a final probability in [0, 1)")
        if self.mlstm_heads != "query" and recipe.model != "hybrid":
            raise TcacheError(f"--mlstm-heads sets the hybrid recipe's mLSTM heads; the {self.recipe} recipe has its "
                              "own blocks: use --recipe hybrid or drop --mlstm-heads")
        if self.feature_dim is not None:
            if recipe.model != "hybrid":
                raise TcacheError(f"--feature-dim sets the hybrid recipe's mLSTM features; the {self.recipe} recipe "
                                  "has none: use --recipe hybrid or drop --feature-dim")
            if self.feature_dim < 16 or self.feature_dim % 16:
                raise TcacheError(f"--feature-dim must be a positive multiple of 16 (mlstm_kernels' Triton kernel "
                                  f"tiles), got {self.feature_dim}; e.g. 32, 64 or 128")
        if self.qk_merge and (recipe.model != "hybrid" or self.mlstm_rope or self.branches == "window"
                              or self.train == "lora" or self.stage == "1"):
            raise TcacheError("--qk-merge folds the hybrid's feature maps into the mLSTM's q / k projections before "
                              "stage II: use it with --recipe hybrid and a stage II, without --mlstm-rope, --branches "
                              "window or --train lora")
        if self.shard == "fsdp":
            fsdp_conflicts(self, "--shard fsdp")
        if self.init is not None and (recipe.model != "hybrid" or self.stage != "2"):
            raise TcacheError(f"--init {self.init} starts the hybrid recipe's stage II from a finished student; pass "
                              "--recipe hybrid --stage 2")
        if self.max_gpu_memory is not None:
            parse_bytes(self.max_gpu_memory)
        self.stage1_tokens = parse_count(self.stage1_tokens, "--stage1-tokens") if self.stage1_tokens else None
        self.full_attention_layers = parse_blocks(self.full_attention_layers, "--full-attention-layers") or []
        for flag, v in (("--lr", self.lr), ("--stage1-lr", self.stage1_lr), ("--window", self.window)):
            positive(flag, v)
        self._check_lora(recipe)
        if self.stage != "all" and len(recipe.stages) == 1:
            raise TcacheError(f"--stage {self.stage}: the {self.recipe} recipe has one stage; drop --stage")
        self.alpha = parse_anneal(self.alpha, "--alpha", self.delta) or recipe.alpha
        self.beta = parse_anneal(self.beta, "--beta", self.delta) or recipe.beta
        self.temperature = parse_anneal(self.temperature, "--temperature", self.delta) or recipe.temperature
        for flag, a in (("--alpha", self.alpha), ("--beta", self.beta)):
            if not (0 <= a.final <= 1 and 0 <= a.start <= 1):
                raise TcacheError(f"{flag} values must lie in [0, 1], got {a.start}:{a.final}")
        if self.alpha.start + self.beta.start > 1 or self.alpha.final + self.beta.final > 1:
            raise TcacheError("--alpha + --beta exceed 1, which would give CE a negative weight; lower one of them")
        if min(self.temperature.start, self.temperature.final) <= 0:
            raise TcacheError("--temperature must be positive")

    def _check_lora(self, recipe: Recipe) -> None:
        if self.train == "lora" and recipe.model != "hybrid":
            raise TcacheError(f"--train lora adapts the hybrid recipe's converted teacher; the {self.recipe} recipe "
                              "trains its xLSTM blocks in full: use --recipe hybrid or drop --train")
        if self.lora_rank < 1:
            raise TcacheError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        self.lora_alpha = 2.0 * self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)
        if not self.lora_alpha > 0:
            raise TcacheError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise TcacheError(f"--lora-dropout is a probability in [0, 1), got {self.lora_dropout}")
        names = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else list(self.lora_targets)
        names = list(dict.fromkeys(str(n).strip() for n in names))  # de-duplicated, in order
        bad = [n for n in names if not n.isidentifier()]
        if not names or bad:
            raise TcacheError(f"--lora-targets {self.lora_targets!r} is not a comma-separated list of module names, "
                              f"e.g. {','.join(LORA_TARGETS)}")
        self.lora_targets = names

    @property
    def uses_alignment(self) -> bool:
        return self.beta.start > 0 or self.beta.final > 0

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The recipe's stages that this run trains (--stage)."""
        stages = RECIPES[self.recipe].stages
        return stages if self.stage == "all" else tuple(s for s in stages if s.name == self.stage)

    def to_dict(self) -> dict:
        return asdict(self)


def student_config(cfg: DistillConfig, manifest) -> StudentConfig:
    """The student's sizes: the recipe's, from the teacher's layers and heads, then the overrides."""
    t = manifest.teacher
    blocks, heads, slstm_at = RECIPES[cfg.recipe].sizes(manifest.num_layers, int(t.get("num_attention_heads") or 0))
    if cfg.blocks is not None and cfg.slstm_at is None and cfg.recipe == "v1":
        slstm_at = list(range(0, cfg.blocks, 2))  # keep v1's alternation at the new depth
    blocks = cfg.blocks if cfg.blocks is not None else blocks
    slstm_at = cfg.slstm_at if cfg.slstm_at is not None else slstm_at
    eps = (t.get("config") or {}).get("rms_norm_eps", 1e-5)
    return StudentConfig(
        vocab_size=manifest.vocab_size, hidden_size=manifest.hidden_size, num_blocks=blocks,
        num_heads=cfg.heads if cfg.heads is not None else heads, slstm_at=slstm_at,
        context_length=manifest.seq_len, norm_eps=float(eps), recipe=cfg.recipe,
        mlstm_kernel=cfg.mlstm_kernel, slstm_backend=cfg.slstm_backend,
    )
