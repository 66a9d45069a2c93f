"""The tasks of the paper's kind (a byte-level transformer on source text, a residual CNN on
augmented digits) and the simulator on a device, in chunks of workers."""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from adasum.lab.cli import main
from adasum.lab.config import ConfigError, RunConfig
from adasum.lab.device import activation_bytes, resolve_device
from adasum.lab.records import evaluate
from adasum.lab.simulate import simulate_run
from adasum.lab.task import TaskError
from adasum.lab.tasks import load_task

# ------------------------------------------------------------------------------------- text


def write_corpus(root, names):
    """One file per name, each with text no other file contains."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# this is {name}\n" + "x = 1\n" * 20)


def sides(task, root, names) -> dict[str, bool]:
    """Which of the files went to training (True) or validation (False)."""
    stream = bytes(task.stream.tolist())
    return {n: (root / n).read_bytes() + b"\0" in stream for n in names}


def test_text_split_is_by_file_and_stable(tmp_path):
    """Every file lies whole on one side; adding files moves none of the others; hidden files
    and files with NUL bytes (not text) are left out."""
    names = [f"pkg{i % 3}/mod{i}.py" for i in range(40)]
    write_corpus(tmp_path / "a", names)
    (tmp_path / "a" / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "a" / ".hidden").write_text("# hidden\n" * 50)
    task = load_task("stdlib-transformer", str(tmp_path / "a"))
    before = sides(task, tmp_path / "a", names)
    assert task.files == (sum(before.values()), 40 - sum(before.values()))
    assert 0 < task.files[1] < 10  # about one in 16 validates
    assert len(task.stream) == sum(len((tmp_path / "a" / n).read_bytes()) + 1 for n in names if before[n])
    write_corpus(tmp_path / "a", [f"more/extra{i}.txt" for i in range(30)])
    write_corpus(tmp_path / "b", names + [f"more/extra{i}.txt" for i in range(30)])
    assert sides(load_task("stdlib-transformer", str(tmp_path / "b")), tmp_path / "b", names) == before


def test_text_windows_are_next_byte_pairs(tmp_path):
    write_corpus(tmp_path, [f"m{i}.py" for i in range(40)])
    task = load_task("stdlib-transformer", str(tmp_path), samples=10)
    assert task.train_size == 10
    x, y = task.examples(torch.tensor([[0, 9], [3, 3]]))
    assert x.shape == y.shape == (2, 2, 64) and x.dtype == torch.int64
    assert torch.equal(x[..., 1:], y[..., :-1])
    start = task.starts[9].item()
    assert torch.equal(x[0, 1], task.stream[start:start + 64].long())


def test_text_task_refusals(tmp_path):
    with pytest.raises(TaskError, match="must be a directory"):
        load_task("stdlib-transformer", str(tmp_path / "missing"))
    (tmp_path / "one.txt").write_text("short")
    with pytest.raises(TaskError, match="too short"):
        load_task("stdlib-transformer", str(tmp_path))


def test_stdlib_corpus_and_bits_per_byte():
    """The default corpus is the standard library; an untrained model is near 8 bits per byte."""
    task = load_task("stdlib-transformer", samples=16)
    assert task.files[0] > 100 and task.files[1] > 5
    model = task.build_model(0)
    row = evaluate(task, model)
    assert row["bits_per_byte"] == pytest.approx(row["test_loss"] / math.log(2))
    assert 7 < row["bits_per_byte"] < 9.5 and 0 <= row["score"] < 0.1


# ----------------------------------------------------------------------------------- images

def test_augmented_digits_are_fixed_and_varied():
    task = load_task("augdigits-resnet", samples=3000)
    again = load_task("augdigits-resnet", samples=500)
    index = torch.tensor([0, 1, 1438, 2876])
    x, y = task.examples(index)
    assert x.shape == (4, 1, 16, 16) and torch.equal(x[:2], again.examples(index[:2])[0])
    # Examples 0, 1438 and 2876 are one digit under three maps.
    assert y[0] == y[2] == y[3] == task.labels[0] and not torch.equal(x[0], x[2])
    assert torch.equal(task.x_test, again.x_test) and len(task.x_test) == 4 * 359
    assert 0 < x.min() + 1 and x.max() <= 1.0001


def test_data_option_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(TaskError, match="only for task 'file'"):
        load_task("augdigits-resnet", str(tmp_path))


# ------------------------------------------------------------------ devices, chunks of workers

def test_device_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no CUDA device \(torch.cuda.is_available\(\) is False\)"):
        resolve_device("cuda:0")


def test_cuda_without_cuda_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["simulate", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "adasum: error: --device 'cuda': this machine has no CUDA device (torch.cuda.is_available() is False)"]


#: Tiny runs of both new tasks, delta mode (each worker's own LAMB) and gradient mode, with
#: 5 workers so that chunks of 2 leave a remainder.
RUNS = {
    "transformer-lamb": (RunConfig(task="stdlib-transformer", samples=40, optimizer="lamb", lr=0.01,
                                   batch=4, epochs=1, evals_per_epoch=2), 5),
    "resnet-momentum": (RunConfig(task="augdigits-resnet", samples=120, optimizer="momentum", lr=0.05,
                                  batch=12, epochs=1, evals_per_epoch=2), 5),
}


def small(task):
    """The task with a few test examples: the full test sets take seconds to evaluate."""
    if hasattr(task, "validation"):
        return replace(task, validation=task.validation[:8])
    return replace(task, x_test=task.x_test[:64], y_test=task.y_test[:64])


def run(name: str, **options) -> list[dict]:
    config, workers = RUNS[name]
    task = small(load_task(config.task, config.data, config.samples))
    return simulate_run(task, config, workers, **options)[0]


def test_chunks_of_workers_change_nothing_in_the_transformer():
    """On the CPU each worker's part of a chunk is the same arithmetic whatever the chunk
    around it (per-worker matrix products of the batched call), so the histories are equal bit
    for bit."""
    whole = run("transformer-lamb", worker_chunk=5, distances=False)
    assert len(whole) == 2 and all(math.isfinite(r["loss"]) for r in whole)
    for chunk in (1, 2):
        assert run("transformer-lamb", worker_chunk=chunk, distances=False) == whole, chunk


def test_chunks_of_workers_change_the_cnn_within_rounding():
    """Convolutions are not bitwise chunk-proof: under vmap a chunk's weight gradient is one
    grouped convolution whose blocking depends on the chunk size, so the gradients differ in
    the last bits (about 1e-9 relative), which the distances show and the losses may later."""
    whole = run("resnet-momentum", worker_chunk=5)
    for chunk in (1, 2):
        for a, b in zip(whole, run("resnet-momentum", worker_chunk=chunk)):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (chunk, key)


@contextlib.contextmanager
def full_float32():
    """CUDA without TF32 (cuDNN's convolutions use it by default): float32 on both sides."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", RUNS)
def test_cpu_and_cuda_agree(name):
    """The CPU half always runs (its figures are sane); the CUDA half where there is a GPU:
    the same curve to float tolerance (the kernels differ, and the error grows over steps)."""
    cpu = run(name, worker_chunk=2)
    assert all(math.isfinite(r["loss"]) and r["loss"] < 6 for r in cpu)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CPU half ran")
    with full_float32():
        cuda = run(name, worker_chunk=2, device="cuda")
    for a, b in zip(cpu, cuda):
        for key in ("loss", "test_loss", "dist_adasum", "dist_average"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)


def test_automatic_chunk_follows_the_activations():
    """The default chunk is the budget over one worker's saved activations, which grow with the
    worker's batch; tiny workers all fit in one chunk."""
    task = small(load_task("stdlib-transformer", samples=32))
    model = task.build_model(0)
    few, many = (activation_bytes(task, model, *task.examples(torch.arange(b))) for b in (2, 32))
    assert 4 * few < many
    config, workers = RUNS["transformer-lamb"]
    _, summary = simulate_run(task, config, 2, distances=False)
    assert summary["worker_chunk"] == 2 and summary["device"] == "cpu" and summary["seconds_per_step"] > 0


def test_simulate_command_on_a_new_task(tmp_path, capsys):
    """``adasum simulate`` by task name: the summary has bits per byte and seconds per step."""
    assert main(["simulate", "--task", "stdlib-transformer", "--samples", "32", "--workers", "2",
                 "--batches", "4", "--optimizers", "adam", "--reducers", "adasum,average",
                 "--lrs", "0.003", "--epochs", "1", "--evals-per-epoch", "1", "--no-distances",
                 "--worker-chunk", "1", "--out", str(tmp_path)]) == 0
    assert "s/step (cpu, 1 workers per chunk)" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["reducer"] for r in rows] == ["adasum", "average"]
    for r in rows:
        assert float(r["bits_per_byte"]) == pytest.approx(float(r["test_loss"]) / math.log(2))
        assert 2 < float(r["bits_per_byte"]) < 8 and float(r["seconds_per_step"]) > 0


# ------------------------------------------------------------------ streams of fresh examples

def test_stream_examples_are_functions_of_their_index():
    """Example i is the same in any call, any order, any shape and for any ``samples`` that
    includes it; the test set does not depend on ``samples``."""
    from adasum.lab.synthetic import stream_normals

    for name in ("gauss-logistic", "teacher-mlp"):
        big, small_ = load_task(name, samples=1 << 22), load_task(name, samples=100)
        index = torch.tensor([[99, 3], [0, 99]])
        x, y = big.examples(index)
        assert x.shape == (2, 2, big.dim) and y.shape == (2, 2)
        assert torch.equal(x[0, 0], x[1, 1]) and y[0, 0] == y[1, 1] and not torch.equal(x[0, 0], x[0, 1])
        x1, y1 = small_.examples(torch.tensor([3]))
        assert torch.equal(x1[0], x[0, 1]) and y1[0] == y[0, 1]
        assert torch.equal(big.x_test, small_.x_test) and torch.equal(big.y_test, small_.y_test)
    normals, uniform = stream_normals(np.arange(5, dtype=np.int64), 8)
    again, _ = stream_normals(np.array([4, 0], dtype=np.int64), 8)
    assert np.array_equal(again, normals[[4, 0]]) and normals.dtype == np.float32


def test_stream_normals_are_independent_standard_normals():
    """Moments, tails and correlations (between neighbouring features and neighbouring
    examples) of 2^21 normals, and 16 equal bins of the uniforms, within 5 standard errors."""
    from adasum.lab.synthetic import stream_normals

    z, u = stream_normals(np.arange(1 << 15, dtype=np.int64), 64)
    z = z.astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 5 / n**0.5 and abs(z.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs((z**4).mean() - 3) < 5 * (96 / n) ** 0.5
    assert abs((np.abs(z) > 2).mean() - 0.0455) < 5 * (0.0455 / n) ** 0.5
    for a, b in ((z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z[:, :32], z[:, 32:])):
        assert abs((a * b).mean()) < 5 / a.size**0.5
    counts = np.bincount((u * 16).astype(int), minlength=16)
    expected = len(u) / 16
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi-square, 15 dof: p < 1e-4


def test_gauss_logistic_reaches_its_bayes_accuracy():
    """The stated ceiling is the Bayes classifier's: its integral gives Phi(r / sqrt 2) for two
    classes, and the classifier (the nearest mean once the inputs are rescaled to unit
    variance) scores it on the test set and on fresh training examples within 4 binomial
    standard errors. The inputs' scales spread over the stated range; the model is linear."""
    from adasum.lab.synthetic import mixture_bayes_accuracy

    assert mixture_bayes_accuracy(3.0, 2) == pytest.approx(0.5 * (1 + math.erf(3.0 / 2)), abs=1e-9)
    task = load_task("gauss-logistic")
    bayes = task.bayes_accuracy
    assert bayes == pytest.approx(0.9025, abs=1e-4)
    x, y = task.examples(torch.arange(1 << 15))
    for inputs, labels in ((task.x_test, task.y_test), (x, y)):
        accuracy = ((inputs / task.scales @ task.means.T).argmax(-1) == labels).double().mean().item()
        assert abs(accuracy - bayes) < 4 * (bayes * (1 - bayes) / len(labels)) ** 0.5
    assert task.scales.max() / task.scales.min() == pytest.approx(10, rel=1e-5)
    assert isinstance(task.build_model(0), torch.nn.Linear)


def test_teacher_labels_follow_the_teacher():
    """Labels are drawn from the teacher's softmax (each class's frequency matches its mean
    probability), the teacher's argmax scores the stated Bayes accuracy, and the student is an
    MLP wider than the teacher."""
    task = load_task("teacher-mlp")
    x, y = task.examples(torch.arange(1 << 16))
    with torch.no_grad():
        p = task.teacher(x).softmax(-1).double()
    counts = torch.bincount(y, minlength=p.shape[1]).double()
    assert torch.all((counts - p.sum(0)).abs() < 5 * p.sum(0).sqrt() + 1)
    bayes = task.bayes_accuracy
    assert 0.7 < bayes < 0.9
    accuracy = (p.argmax(-1) == y).double().mean().item()
    assert abs(accuracy - p.max(-1).values.mean().item()) < 4 * (bayes * (1 - bayes) / len(y)) ** 0.5
    student = task.build_model(0)
    assert student[0].out_features > task.teacher[0].out_features
    moved = task.to(torch.device("meta"))  # moving a copy leaves this task's teacher where it is
    assert moved.teacher[0].weight.is_meta and moved.x_test.is_meta
    assert not task.teacher[0].weight.is_meta and task.to(torch.device("cpu")) is task


def test_stream_task_refuses_samples_beyond_the_key_space():
    with pytest.raises(TaskError, match="at most"):
        load_task("gauss-logistic", samples=1 << 27)


def test_augmented_digits_default_has_65536_examples():
    task = load_task("augdigits-resnet")
    x, y = task.examples(torch.tensor([65535]))
    assert task.train_size == 65536 and x.shape == (1, 1, 16, 16) and y[0] == task.labels[65535 % 1438]
