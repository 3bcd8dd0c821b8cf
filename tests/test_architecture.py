"""The shape docs/architecture.md promises: a short path from the loop to backward, few hooks that each have a user,
and a train request that carries every option of the train command."""

from __future__ import annotations

import inspect
import traceback
from pathlib import Path

import pytest
import torch
from tiny import config, examples

from spladectl import hookspecs
from spladectl.engine import Trainer
from spladectl.errors import SpladectlError
from spladectl.request import TrainRequest

REPO = Path(__file__).resolve().parent.parent


def test_four_frames_from_the_loop_to_backward(tmp_path, pm, monkeypatch):
    stacks = []
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        stacks.append([frame.name for frame in traceback.extract_stack()[:-1]])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    Trainer(config(tmp_path, max_steps=1), examples(), pm=pm, progress=False).fit()
    stack = stacks[0]
    loop = len(stack) - 1 - stack[::-1].index("_fit")
    between = stack[loop + 1:]
    assert between[-1] == "train_step" and len(between) <= 4, between  # pluggy's three frames, then the step


def test_at_most_eight_hooks_each_implemented_by_a_plugin_we_ship():
    specs = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "spladectl_spec")]
    assert len(specs) <= 8
    shipped = [*sorted((REPO / "spladectl" / "builtin_plugins").glob("*.py")),
               REPO / "plugins" / "spladectl-csvlog" / "spladectl_csvlog" / "__init__.py"]
    text = "\n".join(path.read_text() for path in shipped)
    unused = [name for name in specs if f"def {name}(" not in text]
    assert not unused, f"hooks no shipped plugin implements: {unused}"
    for name in specs:
        assert inspect.getdoc(getattr(hookspecs, name)), name


def request_of(*argv: str) -> TrainRequest:
    from spladectl.cli.train import train_command
    from spladectl.runs import options

    command = train_command()
    with command.make_context("train", list(argv)) as ctx:
        return TrainRequest.from_options(ctx.params, given=options.explicit(ctx))


def test_the_request_carries_every_train_option_but_the_commands_own():
    from spladectl.cli.train import LAUNCH_OPTIONS, train_command

    request = request_of("--data", "x.jsonl", "--tag", "a", "--tag", "b", "--lr", "1e-4")
    parameters = {p.name for p in train_command().params}
    assert set(request.options()) == parameters - LAUNCH_OPTIONS - {"as_json"}
    assert request.tag == ("a", "b") and request.lr == 1e-4 and request.given == {"data", "tag", "lr"}
    assert request.runs_root == Path("runs") and request.batch_size is None  # left to the profile
    with pytest.raises(AttributeError):
        request.lr = 1.0  # frozen: what was asked for does not change on the way down


def test_from_run_takes_only_options_that_leave_the_training_as_it_was():
    assert request_of("--from-run", "r1", "--tag", "again").from_run == "r1"
    with pytest.raises(SpladectlError, match="does not combine with --lr"):
        request_of("--from-run", "r1", "--lr", "1e-4")


def test_one_place_builds_a_train_config():
    import ast

    builders = []
    for path in sorted((REPO / "spladectl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TrainConfig":
                builders.append(path.relative_to(REPO).as_posix())
    assert builders == ["spladectl/request.py"]


def test_train_and_bench_build_their_configs_alike(tmp_path):
    from spladectl.bench.settings import BenchSettings
    from spladectl.bench.step import make_config as bench_config
    from spladectl.request import make_config

    settings = BenchSettings(max_doc_length=96, gradient_checkpointing=True, seed=7)
    measured = bench_config(settings, "bf16-mixed", 4, 3, str(tmp_path))
    # what a bench measures is exactly what it was told, no profile fallback in between
    assert (measured.precision, measured.batch_size, measured.grad_accum, measured.max_steps) == ("bf16-mixed", 4, 1, 3)
    assert measured.max_doc_length == 96 and measured.gradient_checkpointing and measured.seed == 7
    assert measured.n_negatives == 1 and measured.output_dir == str(tmp_path)

    request = TrainRequest(lr=3e-5, n_negatives=None, memory_efficient=True, patience=2)
    trained = make_config(request, {"batch_size": 8}, profile="cpu", defaults={"n_negatives": 2, "lr": 1.0})
    assert trained.lr == 3e-5 and trained.n_negatives == 2  # the request beats the defaults, which fill its gaps
    assert trained.gradient_checkpointing and trained.early_stopping_patience == 2 and trained.batch_size == 8
