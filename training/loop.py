"""The training loop: one Trainer owns a model, its AdamW optimizer, the step count and the cursor.

Typical use (what a batch-group task does):

    trainer = Trainer(cfg, corpus)           # fresh, seeded model
    trainer.restore(tensors, meta)           # ...or continue from a checkpoint
    trainer.train_until(group_last_step)
    tensors, meta = trainer.capture({"loss": ...})

Everything random is a pure function of the seed: initialisation of (seed), data order of
(seed, epoch), dropout of (seed, step). So training k steps, capturing, restoring into a new
Trainer and training on gives bit-identical tensors to never having stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from training.config import ResolvedTrainConfig
from training.data import Corpus, DataCursor, batches_per_epoch, get_batch, get_eval_batches
from training.device import autocast, configure_determinism, resolve_device
from training.model import GPT
from training.rendezvous import batch_share
from training.rng import INIT_STREAM, STEP_STREAM, derive_rank_seed, derive_seed
from training.schedule import lr_at
from training.state import capture_state, restore_state

if TYPE_CHECKING:
    from training.distributed import RankGroup


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    step: int
    """Optimizer steps completed, this one included."""
    loss: float
    """Training loss of this step's batch (before the update)."""
    lr: float
    """Learning rate used."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Tokens in the batch (batch_size * block_size)."""
    seconds: float
    """Wall time of the step, data loading included."""
    cursor: DataCursor
    """Data cursor after the step (where the next batch comes from)."""


class Trainer:
    """Model + optimizer + position in training, with exact capture and restore."""

    def __init__(self, cfg: ResolvedTrainConfig, corpus: Corpus, device: str | None = None,
                 sync: RankGroup | None = None):
        """Build the model and optimizer for `cfg` on `corpus`, freshly initialised from cfg.seed.

        Args:
            cfg: the run's resolved configuration.
            corpus: training data; its vocab_size sizes the model's embedding.
            device: auto | cpu | cuda[:N]; None means cfg.device.
            sync: this rank's data-parallel group; None trains alone. May be replaced later
                (`trainer.sync = ...`) when the group re-forms with the same world size.

        Raises:
            DataError: the corpus cannot fill one batch.
            ValueError: CUDA requested but absent, or a batch the ranks cannot share equally.
        """
        self.cfg = cfg
        self.sync = sync
        if sync is not None:
            batch_share(cfg.batch_size, sync.world_size)
        self.corpus = corpus
        if cfg.torch_threads is not None:
            # Pinned so a step's speed does not depend on what else the machine runs; set per
            # process, which on a Dask worker is per worker.
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(device or cfg.device)
        configure_determinism(self.device)
        self.batches_per_epoch = batches_per_epoch(
            corpus, cfg.batch_size, cfg.block_size, cfg.epoch_steps
        )

        self.model = GPT(replace(cfg.model, vocab_size=corpus.vocab_size)).to(self.device)
        # Decay 2-D weights (matmuls, embeddings) only; gains and biases are not decayed.
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
            # The plain per-parameter loop: one code path on every machine, for reproducibility.
            foreach=False,
            fused=False,
        )
        self._eval_batches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.step = 0
        self.cursor = DataCursor(0, 0)
        self.init_fresh()

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.cfg.batch_size * self.cfg.block_size

    def init_fresh(self) -> None:
        """Seeded initial weights, empty optimizer state, step 0, start of epoch 0: as new."""
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, INIT_STREAM, 0))
        self.model.init_weights(generator)
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr  # as constructed; train_step sets each step's own
        self.step = 0
        self.cursor = DataCursor(0, 0)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a captured state (see training.state.restore_state for the checks)."""
        step, cursor = restore_state(self.model, self.optimizer, tensors, meta)
        if cursor.position >= self.batches_per_epoch:
            raise ValueError(
                f"checkpoint cursor position {cursor.position} does not fit this data "
                f"({self.batches_per_epoch} batches per epoch): was it made on other data?"
            )
        self.step, self.cursor = step, cursor

    def capture(
        self, extra: dict[str, Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Named tensors + JSON metadata of the full training state.

        CPU tensors alias the live model: write or clone them before the next train_step.
        """
        return capture_state(self.model, self.optimizer, self.step, self.cursor, extra)

    def train_step(self) -> StepResult:
        """One optimizer step: step -> step + 1."""
        cfg = self.cfg
        started = time.perf_counter()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, next_cursor = get_batch(
            self.corpus, self.cursor, cfg.seed, cfg.batch_size, cfg.block_size, cfg.epoch_steps
        )
        sync = self.sync
        if sync is not None and sync.world_size > 1:
            # Every rank draws the same global batch and keeps its fixed share of the rows.
            share = batch_share(cfg.batch_size, sync.world_size)
            rows = slice(sync.rank * share, (sync.rank + 1) * share)
            x, y = x[rows], y[rows]
            step_seed = derive_rank_seed(cfg.seed, STEP_STREAM, self.step, sync.rank)
        else:
            step_seed = derive_seed(cfg.seed, STEP_STREAM, self.step)
        x, y = x.to(self.device), y.to(self.device)

        # Dropout draws from the global generator: reseed it from (seed, step) so a resumed step
        # draws exactly what the uninterrupted one drew, whatever ran in this process before.
        torch.manual_seed(step_seed)
        self.model.train()
        with autocast(self.device):
            _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Averaged over the ranks before clipping, so every rank clips and steps identically.
        # A failed collective raises here, before the optimizer: nothing of this step applies.
        synced_loss = sync.average_gradients(list(self.model.parameters()), loss) \
            if sync is not None and sync.world_size > 1 else None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        self.optimizer.step()

        self.step += 1
        self.cursor = next_cursor
        # Waits for the device, so `seconds` covers the whole step; with ranks, the global mean.
        loss_value = synced_loss if synced_loss is not None else loss.item()
        return StepResult(
            step=self.step,
            loss=loss_value,
            lr=lr,
            grad_norm=float(grad_norm),
            tokens=x.numel(),
            seconds=time.perf_counter() - started,
            cursor=self.cursor,
        )

    def train_until(
        self, last_step: int, on_step: Callable[[StepResult], bool | None] | None = None
    ) -> list[StepResult]:
        """Train until `self.step == last_step`, or earlier when on_step returns True.

        on_step runs after every step; returning True stops after that step (a clean stop at a
        step boundary). Returns the results of the steps taken.

        Raises:
            ValueError: last_step is beyond cfg.steps, where the LR schedule ends.
        """
        if last_step > self.cfg.steps:
            raise ValueError(f"last_step {last_step} is beyond the run's steps ({self.cfg.steps})")
        results = []
        while self.step < last_step:
            result = self.train_step()
            results.append(result)
            if on_step is not None and on_step(result):
                break
        return results

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> float:
        """Mean loss over fixed held-out batches; cfg.eval_batches of them by default.

        Runs in eval mode (no dropout, so no random draws) and touches no training state: the
        next train_step is the same whether or not this ran.
        """
        n = n_batches if n_batches is not None else self.cfg.eval_batches
        if n not in self._eval_batches:
            self._eval_batches[n] = get_eval_batches(
                self.corpus, n, self.cfg.batch_size, self.cfg.block_size
            )
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            for x, y in self._eval_batches[n]:
                # No autograd graph: the same forward, without its bookkeeping and memory.
                with torch.inference_mode(), autocast(self.device):
                    _, loss = self.model(x.to(self.device), y.to(self.device))
                total += loss.item()
        finally:
            self.model.train(was_training)
        return total / n
