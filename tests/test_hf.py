"""adasum.hf.AdasumTrainer: the Hugging Face Trainer on 2 real Gloo processes.

A tiny BERT classifier built from a config (nothing downloaded) trains one step in each mode,
both in one spawn.
Each rank records the batch the Trainer gave it, the parameters before the step and, in gradient
mode, the gradients the optimizer saw; the parent recomputes every rank's local gradient (and, in
delta mode, its own AdamW step) on a plain copy of the model and checks the Trainer's result
against ``adasum.reduce`` of those, bit-identical on every rank.
"""

from __future__ import annotations

import tempfile

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments  # noqa: E402

import adasum  # noqa: E402
from adasum.hf import AdasumTrainer  # noqa: E402
from adasum.launch import spawn  # noqa: E402
from adasum.optim import DistributedOptimizer  # noqa: E402
from conftest import TIMEOUT, same_bits  # noqa: E402
from stacks import assert_adasum_of_local, local_gradients  # noqa: E402

WORLD = 2
LR = 1e-2
MODES = ("gradient", "delta")


def _model() -> BertForSequenceClassification:
    # No dropout: the parent must be able to recompute each rank's gradient exactly.
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 40, (10,), generator=g), "labels": torch.randint(0, 3, (), generator=g)}
            for _ in range(16)]


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


class _Recorder(TrainerCallback):
    """The parameters before the step and the gradients the optimizer is about to use."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = [p.detach().clone() for p in model.parameters()]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = [p.grad.clone() for p in kwargs["model"].parameters()]


class _RecordingTrainer(AdasumTrainer):
    """Keeps the batch each step trained on."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batch = {k: v.clone() for k, v in inputs.items()}
        return super().compute_loss(model, inputs, *args, **kwargs)


def _train(rank: int, world: int, mode: str) -> dict:
    model = _model()
    recorder = _Recorder()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, use_cpu=True, per_device_train_batch_size=4, max_steps=1,
                                 learning_rate=LR, optim="sgd", max_grad_norm=0.0, report_to="none",
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
        optimizers = (DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)), None) \
            if mode == "delta" else (None, None)
        trainer = _RecordingTrainer(model=model, args=args, train_dataset=_dataset(), callbacks=[recorder],
                                    optimizers=optimizers)
        trainer.train()
    if trainer.adasum_state is not None:
        trainer.adasum_state.close()
    return {"batch": trainer.batch, "before": recorder.before, "grads": recorder.grads,
            "after": [p.detach().clone() for p in model.parameters()], "delta_mode": trainer.delta_mode,
            "wrapped": type(trainer.model_wrapped).__name__}


def _both(rank: int, world: int) -> dict[str, dict]:
    # One group for both modes: most of a spawn's time is importing transformers.
    return {mode: _train(rank, world, mode) for mode in MODES}


@pytest.fixture(scope="module")
def both() -> list[dict[str, dict]]:
    return spawn(_both, WORLD, timeout=TIMEOUT)


def _own_adamw_delta(before: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    model = _model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), before, strict=True):
            p.copy_(value)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    _loss(model, batch).backward()
    opt.step()
    return [p.detach() - s for p, s in zip(model.parameters(), start)]


@pytest.mark.timeout(2 * TIMEOUT)
@pytest.mark.parametrize("mode", MODES)
def test_trainer_steps_with_adasum_of_the_ranks(both, mode):
    results = [r[mode] for r in both]
    assert all(r["wrapped"] == "DistributedDataParallel" for r in results)
    assert all(r["delta_mode"] == (mode == "delta") for r in results)
    assert same_bits(results[0]["before"], results[1]["before"])
    assert not torch.equal(results[0]["batch"]["input_ids"], results[1]["batch"]["input_ids"])  # sharded
    for r in results[1:]:
        assert same_bits(r["after"], results[0]["after"])
    if mode == "gradient":
        local = [local_gradients(_model(), r["before"], lambda m, r=r: _loss(m, r["batch"])) for r in results]
        assert_adasum_of_local([r["grads"] for r in results], local)
        expected = [p - LR * g for p, g in zip(results[0]["before"], results[0]["grads"])]  # plain SGD
    else:
        # The gradients stayed local (no averaging by DDP), and the update is Adasum of the deltas.
        local = [local_gradients(_model(), r["before"], lambda m, r=r: _loss(m, r["batch"])) for r in results]
        for r, grads in zip(results, local):
            for got, ref in zip(r["grads"], grads, strict=True):
                torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-7)
        deltas = adasum.reduce([_own_adamw_delta(r["before"], r["batch"]) for r in results])
        expected = [p + d for p, d in zip(results[0]["before"], deltas)]
    for got, ref in zip(results[0]["after"], expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-7)
