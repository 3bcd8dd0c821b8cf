"""The plugin system: discovery and SPLADECTL_PLUGINS, registration errors, argument subsets, `train` and
`train_step` wrappers around real trainings (their order, what they see when training ends, fails or is interrupted),
failing plugins (named, run stopped, last checkpoint intact), `plugins list`, profiles from plugins, the built-in
schedulers, regularizers and distillation in real short trainings, and every example of docs/plugins.md.

Plugins are registered on a fresh manager (`make_plugin_manager`) or, for CLI tests that use the process-wide one,
through the `global_pm` fixture, which unregisters whatever a test added.
"""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
import types
from pathlib import Path

import pluggy
import pytest
import torch
import typer
from typer.testing import CliRunner

from spladectl import losses, plugin_errors, plugin_loading, plugins
from spladectl.config import TrainConfig
from spladectl.engine import Trainer
from spladectl.errors import PluginError, SpladectlError
from spladectl.hookspecs import hookimpl
from spladectl.runs.lifecycle import ActiveRun
from spladectl.runs.record import RunRecord
from tiny import TOPICS, config, examples, metrics_rows, write_eval_beir

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "plugins.md"

SHORT_RUN = ["--profile", "cpu", "--precision", "32-true", "--batch-size", "4", "--grad-accum", "1",
             "--max-query-length", "16", "--max-doc-length", "32", "--no-progress"]
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # keep error panels on one line


def flat(text: str) -> str:
    """Output with rich's panel borders and line wrapping removed."""
    return " ".join(text.replace("│", " ").split())


@pytest.fixture
def manager():
    """A fresh manager with the built-ins only (installed packages are tested on their own)."""
    return plugin_loading.make_plugin_manager(installed=False)


@pytest.fixture
def global_pm():
    """The process-wide manager the in-process CLI uses; every plugin a test adds is unregistered afterwards."""
    pm = plugin_loading.load_plugins()
    before = {name for name, _ in pm.list_name_plugin()}
    yield pm
    for name, plugin in list(pm.list_name_plugin()):
        if plugin is not None and name not in before:
            pm.unregister(plugin)
            pm.sources.pop(name, None)


def fake_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str],
                      modules: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees one: a .dist-info directory with entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[spladectl]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, code in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path for fake installed distributions; their modules are forgotten afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    for module in list(sys.modules):
        if (getattr(sys.modules[module], "__file__", None) or "").startswith(str(path)):
            del sys.modules[module]


PLUGIN_MODULE = """
    from spladectl.hookspecs import hookimpl

    @hookimpl(wrapper=True)
    def train_step(state):
        metrics = yield
        metrics["{key}"] = state.step
        return metrics
"""


# ------------------------------------------------------------------------------------------------ discovery

def test_builtins_register_like_any_plugin(manager):
    rows = plugin_loading.describe_plugins(include_builtin=True, manager=manager)
    assert [r["name"] for r in rows] == sorted(plugins.DEFAULT_PLUGINS)
    assert all(r["builtin"] and r["source"] == "builtin" and r["distribution"] == "spladectl" for r in rows)
    hooks = {r["name"].rsplit(".", 1)[1]: r["hooks"] for r in rows}
    assert hooks["memory"] == ["train", "train_step"]
    assert hooks["flops"] == ["loss_terms", "train", "train_step"]
    assert hooks["optim"] == ["make_lr_scheduler", "make_optimizer"]
    assert hooks["track_mlflow"] == ["on_evaluate", "train", "train_step"]
    assert plugin_loading.describe_plugins(manager=manager) == []  # without --all: installed ones only


def test_reset_refills_the_same_global_manager(global_pm):
    from spladectl.plugin_loading import pm  # what engine-era code imports; it must stay the live manager

    assert pm is global_pm
    plugin_loading.reset()
    assert pm.get_plugins() == set() and pm.sources == {}
    assert plugin_loading.load_plugins() is pm
    assert set(plugins.DEFAULT_PLUGINS) <= set(pm.sources)


def test_spladectl_plugins_selects_installed_plugins(site):
    fake_distribution(site, "spladectl-fakeone", "1.2", {"fakeone": "fakeone_plugin"},
                      {"fakeone_plugin": PLUGIN_MODULE.format(key="fakeone")})
    fake_distribution(site, "other-fake", "0.3", {"fakeother": "fakeother_plugin:Plugin"},
                      {"fakeother_plugin": "from spladectl.hookspecs import hookimpl\n\nclass Plugin:\n"
                                           "    @hookimpl\n    def on_evaluate(self, state):\n        pass\n"})

    def loaded(value):
        env = {} if value is None else {plugin_loading.ENV_VAR: value}
        return {n for n in plugin_loading.make_plugin_manager(env=env).sources if not plugins.is_builtin(n)}

    assert {"fakeone", "fakeother"} <= loaded(None)  # unset: every installed plugin
    assert loaded("") == set() and loaded(" , ") == set()  # empty: none
    assert loaded("fakeone") == {"fakeone"}  # by entry-point name
    assert loaded("Spladectl_FakeOne") == {"fakeone"}  # by distribution name, compared as pip compares them
    assert loaded("fakeone, other-fake") == {"fakeone", "fakeother"}

    manager = plugin_loading.make_plugin_manager(env={plugin_loading.ENV_VAR: "fakeother,not-installed"})
    assert manager.unmatched_selection == ["not-installed"]
    (row,) = plugin_loading.describe_plugins(manager=manager)
    assert row == {"name": "fakeother", "builtin": False, "source": "entry point", "distribution": "other-fake",
                   "version": "0.3", "hooks": ["on_evaluate"]}
    assert isinstance(manager.get_plugin("fakeother"), sys.modules["fakeother_plugin"].Plugin)  # module:object


def test_a_broken_package_names_itself_and_can_be_switched_off(site):
    fake_distribution(site, "spladectl-broken", "0.1", {"broken": "broken_plugin"},
                      {"broken_plugin": "raise ImportError('needs libfoo')\n"})
    with pytest.raises(PluginError) as err:
        plugin_loading.make_plugin_manager(env={})
    assert "plugin 'broken'" in err.value.message and "spladectl-broken" in err.value.message
    assert "ImportError: needs libfoo" in err.value.message and plugin_loading.ENV_VAR in err.value.hint
    assert "broken" not in plugin_loading.make_plugin_manager(env={plugin_loading.ENV_VAR: ""}).sources


def test_hooks_that_do_not_match_the_specs_are_refused(manager):
    class WrongArgument:
        @hookimpl
        def on_evaluate(self, state, metrics, nonsense):
            pass

    class Typo:
        @hookimpl(wrapper=True)
        def train_setp(self, state):
            return (yield)

    class NotAGenerator:
        @hookimpl(wrapper=True)
        def train(self, state):
            return {}

    class Plain:
        @hookimpl  # would never run: the engine's own step comes first and always has a result
        def train_step(self, state):
            return {"step": 0}

        @hookimpl(tryfirst=True)  # would run instead of the training
        def train(self, state):
            return {}

    class DeliberateExtra:
        @hookimpl(optionalhook=True)
        def some_other_tools_hook(self):
            pass

    class OldStyleWrapper:
        @hookimpl(hookwrapper=True)
        def train_step(self):
            yield

    with pytest.raises(PluginError, match="plugin 'wrong' does not match the hook specifications.*nonsense"):
        plugins.register(manager, WrongArgument(), "wrong", source="test")
    with pytest.raises(PluginError) as err:
        plugins.register(manager, Typo(), "typo", source="test")
    assert err.value.message == "plugin 'typo' implements unknown hook(s) train_setp"
    with pytest.raises(PluginError, match="plugin 'not-a-generator' does not match.*not a generator"):
        plugins.register(manager, NotAGenerator(), "not-a-generator", source="test")
    with pytest.raises(PluginError, match="plugin 'plain' implements train and train_step without wrapper=True") as err:
        plugins.register(manager, Plain(), "plain", source="test")
    assert "@hookimpl(wrapper=True)" in err.value.hint
    assert not any(manager.has_plugin(name) for name in ("wrong", "typo", "not-a-generator", "plain"))
    assert all(impl.wrapper for hook in (manager.hook.train, manager.hook.train_step) for impl in hook.get_hookimpls())
    plugins.register(manager, DeliberateExtra(), "extra", source="test")
    plugins.register(manager, OldStyleWrapper(), "old-style", source="test")  # pluggy's older wrappers work too
    assert manager.has_plugin("extra") and manager.has_plugin("old-style")


def test_add_plugin_imports_module_object_and_instantiates_classes(manager, site):
    (site / "addme_plugin.py").write_text(textwrap.dedent("""
        from spladectl.hookspecs import hookimpl

        class Counter:
            def __init__(self):
                self.calls = 0

            @hookimpl(wrapper=True)
            def train_step(self, state):
                self.calls += 1
                return (yield)

        @hookimpl
        def on_evaluate(state):
            pass
    """))
    assert plugin_loading.add_plugin("addme_plugin:Counter", manager) == "addme_plugin:Counter"
    assert type(manager.get_plugin("addme_plugin:Counter")).__name__ == "Counter"
    plugin_loading.add_plugin("addme_plugin", manager)
    assert manager.get_plugin("addme_plugin") is sys.modules["addme_plugin"]
    assert plugin_loading.add_plugin("addme_plugin:Counter", manager) == "addme_plugin:Counter"  # twice: registered once
    with pytest.raises(PluginError, match="--plugin no_such_module:X: cannot import it"):
        plugin_loading.add_plugin("no_such_module:X", manager)
    with pytest.raises(PluginError, match="--plugin addme_plugin:Nope: cannot import it"):
        plugin_loading.add_plugin("addme_plugin:Nope", manager)


# ------------------------------------------------------------------------------------------------ calling conventions

class Recorder:
    """Wraps train_step, writing 'enter NAME' / 'exit NAME' (and the exception `yield` raised, if any) to a shared log
    and appending NAME to the metrics' `wrapped_by`; `seen` holds the metric keys it got from `yield`."""

    def __init__(self, name, log, **opts):
        self.name, self.log, self.seen = name, log, []

        def train_step(state):
            log.append(f"enter {name}")
            try:
                metrics = yield
            except BaseException as exc:
                log.append(f"{name} saw {type(exc).__name__}")
                raise
            finally:
                log.append(f"exit {name}")
            self.seen.append(set(metrics))
            metrics.setdefault("wrapped_by", []).append(name)
            return metrics

        self.train_step = hookimpl(wrapper=True, **opts)(train_step)


def run_step(manager, log, step=None):
    """Call train_step as the engine does (`call_extra` with the engine's own step innermost), with that step
    replaced by one that logs 'engine' (or by `step`)."""
    state = types.SimpleNamespace(config=TrainConfig(), step=0, total_steps=10)
    step = step or (lambda state: log.append("engine") or {"step": 1})
    return manager.hook.train_step.call_extra([step], {"state": state})


def test_implementations_may_declare_fewer_arguments_and_wrap_real_steps(tmp_path, manager):
    finals = []

    class Few:
        @hookimpl
        def loss_terms(self, inputs):  # the spec offers (inputs, state)
            return {"tiny": 1e-3 * inputs.query.mean()}

        @hookimpl
        def on_evaluate(self, final):  # the spec offers (state, metrics, final)
            finals.append(final)

        @hookimpl
        def make_lr_scheduler(self, optimizer):  # the spec offers (optimizer, total_steps, state)
            return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=1)

    log = []
    plugins.register(manager, Few(), "few", source="test")
    a, b = Recorder("A", log, tryfirst=True), Recorder("B", log)
    plugins.register(manager, a, "A", source="test")
    plugins.register(manager, b, "B", source="test")
    trainer = Trainer(config(tmp_path, eval_every=1, lr=1e-4), examples(), pm=manager, progress=False,
                      eval_fn=lambda encoder: {"nDCG@10": 0.5})
    trainer.fit()
    rows = metrics_rows(tmp_path)
    assert all("tiny" in r for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([0.5e-4, 1e-4])
    assert finals == [False, False, True]
    # two wrappers around the real engine step: tryfirst A outermost, and their keys reach metrics.jsonl
    assert log == ["enter A", "enter B", "exit B", "exit A"] * 2
    assert [r["wrapped_by"] for r in rows] == [["B", "A"]] * 2
    # the built-ins' wrappers (registered first) run inside B; A, outermost, also sees what B added
    assert all({"loss", "lambda_q", "memory_gb"} <= keys and "wrapped_by" not in keys for keys in b.seen)
    assert all("wrapped_by" in keys for keys in a.seen) and len(a.seen) == 2


def test_an_argument_added_to_a_hook_later_does_not_break_old_plugins():
    """pluggy calls an implementation with the arguments it names, so a spec can grow without breaking it."""
    spec = pluggy.HookspecMarker("spladectl")

    class NewerSpecs:
        @spec
        def on_evaluate(self, state, metrics, final, some_new_argument):
            """on_evaluate as a future spladectl might define it."""

    class OldPlugin:
        @hookimpl
        def on_evaluate(self, state, metrics):
            metrics["old"] = state

    newer = pluggy.PluginManager("spladectl")
    newer.add_hookspecs(NewerSpecs)
    newer.register(OldPlugin())
    metrics = {}
    newer.hook.on_evaluate(state=3, metrics=metrics, final=False, some_new_argument="x")
    assert metrics == {"old": 3}


@pytest.mark.parametrize("opts_a, opts_b, expected", [
    ({}, {}, ["enter B", "enter A", "engine", "exit A", "exit B"]),  # registered last = outermost
    ({"tryfirst": True}, {}, ["enter A", "enter B", "engine", "exit B", "exit A"]),
    ({}, {"trylast": True}, ["enter A", "enter B", "engine", "exit B", "exit A"]),
])
def test_wrapper_order(manager, opts_a, opts_b, expected):
    log = []
    plugins.register(manager, Recorder("A", log, **opts_a), "A", source="test")
    plugins.register(manager, Recorder("B", log, **opts_b), "B", source="test")
    metrics = run_step(manager, log)
    assert log == expected
    assert metrics["wrapped_by"] == [e.split()[1] for e in expected if e.startswith("exit")]


def test_wrappers_see_the_step_fail(manager):
    log = []
    plugins.register(manager, Recorder("A", log), "A", source="test")
    plugins.register(manager, Recorder("B", log), "B", source="test")
    with pytest.raises(ZeroDivisionError):
        run_step(manager, log, step=lambda state: 1 / 0)
    assert log == ["enter B", "enter A", "A saw ZeroDivisionError", "exit A", "B saw ZeroDivisionError", "exit B"]


class TrainRecorder:
    """A `train` wrapper that logs the training's start and end (with the result or the exception) and adds a row to
    the summary; with `fail_at`, a train_step wrapper that raises `fail_at[1]` after step `fail_at[0]`."""

    def __init__(self, log, fail_at=None):
        self.log, self.fail_at = log, fail_at

    @hookimpl(wrapper=True)
    def train(self, state):
        self.log.append(f"start at step {state.step}")
        try:
            result = yield
        except KeyboardInterrupt:
            self.log.append(f"interrupted at step {state.step}")
            raise
        except Exception as exc:
            self.log.append(f"failed at step {state.step}: {exc!r}")
            raise
        self.log.append(f"{result['status']} at step {state.step}")
        result["summary"].append(("recorded", "yes"))
        return result

    @hookimpl(wrapper=True)
    def train_step(self, state):
        metrics = yield
        if self.fail_at and state.step == self.fail_at[0]:
            raise self.fail_at[1]
        return metrics

    @hookimpl
    def on_evaluate(self, state, final):
        self.log.append(f"evaluated at step {state.step}" + (" (final)" if final else ""))


def test_a_train_wrapper_runs_around_the_whole_training(tmp_path, manager):
    log = []
    plugins.register(manager, TrainRecorder(log), "recorder", source="test")
    trainer = Trainer(config(tmp_path, save_every=1), examples(), pm=manager, progress=False,
                      eval_fn=lambda encoder: {"nDCG@10": 0.5, "avg_doc_dims": 12.0})
    result = trainer.fit()
    # the evaluation of the final model happens inside: the wrapper's result has it
    assert log == ["start at step 0", "evaluated at step 2 (final)", "finished at step 2"]
    assert result["evaluation"] == {"model": "final", "metrics": {"nDCG@10": 0.5, "avg_doc_dims": 12.0}}
    assert result["final_metrics"]["nDCG@10"] == 0.5 and result["final_metrics"]["avg_doc_dims"] == 12.0
    assert result["final_metrics"]["loss"] == metrics_rows(tmp_path)[-1]["loss"]
    assert result["summary"] == [("recorded", "yes")]  # no --memory-tracking: the memory plugin adds none
    assert Path(result["final"]).is_dir()  # written before the wrappers' end

    # after a resume, the code before `yield` sees the checkpoint's step
    log.clear()
    resumed = Trainer(config(tmp_path, max_steps=3), examples(), pm=manager, progress=False)
    resumed.resume(tmp_path / "out" / "checkpoints" / "step-2")
    assert resumed.fit()["steps"] == 3
    assert log == ["start at step 2", "finished at step 3"]  # no eval_fn: no final evaluation


@pytest.mark.parametrize("error, seen", [
    (RuntimeError("disk on fire"), "failed at step 2: RuntimeError('disk on fire')"),
    (KeyboardInterrupt(), "interrupted at step 2"),
])
def test_a_train_wrapper_sees_the_training_fail_or_be_interrupted(tmp_path, manager, error, seen):
    log = []
    plugins.register(manager, TrainRecorder(log, fail_at=(2, error)), "recorder", source="test")
    trainer = Trainer(config(tmp_path, save_every=1, max_steps=3), examples(), pm=manager, progress=False,
                      eval_fn=lambda encoder: {"nDCG@10": 0.5})
    with pytest.raises(type(error)):
        trainer.fit()
    assert log == ["start at step 0", seen]  # no final evaluation
    assert not (tmp_path / "out" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-1"]


# ------------------------------------------------------------------------------------------------ failing plugins

def culprit_of(manager, run) -> PluginError | None:
    with pytest.raises(Exception) as err:
        run()
    return plugin_errors.hook_error(err.value, manager)


def test_failing_plugins_are_named_whatever_their_kind(tmp_path, manager, site):
    # an entry-point plugin (a module), through the real importlib.metadata path
    fake_distribution(site, "spladectl-raiser", "1.0", {"raiser": "raiser_plugin"}, {"raiser_plugin": """
        from spladectl.hookspecs import hookimpl

        def _check(value):
            raise ValueError(f"bad value {value}")

        @hookimpl(wrapper=True)
        def train_step(state):
            metrics = yield
            _check(metrics["step"])  # raises in a helper: the hook's frame is still in the traceback
            return metrics
    """})
    entry = plugin_loading.make_plugin_manager(env={plugin_loading.ENV_VAR: "raiser"})
    trainer = Trainer(config(tmp_path / "a"), examples(), pm=entry, progress=False)
    error = culprit_of(entry, trainer.fit)
    assert error.message == "plugin 'raiser' raised ValueError: bad value 1"
    assert plugin_loading.ENV_VAR in error.hint  # an installed package: say how to switch it off

    # a class instance registered without a name: named by its class
    class Exploding:
        @hookimpl
        def loss_terms(self, inputs, state):
            raise RuntimeError("kaboom")

    manager.register(Exploding())
    trainer = Trainer(config(tmp_path / "b"), examples(), pm=manager, progress=False)
    error = culprit_of(manager, trainer.fit)
    assert re.fullmatch(r"plugin '.*Exploding' raised RuntimeError: kaboom", error.message)


def test_code_a_plugin_hands_over_is_still_its_own(tmp_path, manager):
    class BadSchedule:
        @hookimpl
        def make_lr_scheduler(self, optimizer):
            def factor(step):
                if step >= 1:
                    raise ArithmeticError("schedule broke")
                return 1.0

            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    plugins.register(manager, BadSchedule(), "bad-schedule", source="test")
    trainer = Trainer(config(tmp_path), examples(), pm=manager, progress=False)
    # raised in torch's scheduler.step(), inside the engine's step: still the plugin's lambda
    error = culprit_of(manager, trainer.fit)
    assert error.message == "plugin 'bad-schedule' raised ArithmeticError: schedule broke"


def test_spladectl_errors_and_bugs_are_not_blamed_on_plugins(tmp_path, manager):
    # A wrapper that an error of the engine's only passed through is not guilty, even as the innermost one (trylast:
    # inside the built-ins' wrappers, whose frames would otherwise hide it).
    log = []
    plugins.register(manager, Recorder("inner", log, trylast=True), "inner", source="test")
    assert culprit_of(manager, lambda: run_step(manager, log, step=lambda state: {}["missing"])) is None
    assert log == ["enter inner", "inner saw KeyError", "exit inner"]

    class Around:
        @hookimpl(wrapper=True, trylast=True)
        def train(self, state):
            return (yield)

    plugins.register(manager, Around(), "around", source="test")
    trainer = Trainer(config(tmp_path / "a"), examples(), pm=manager, progress=False,
                      eval_fn=lambda encoder: {}["missing"])  # fails inside the train wrappers, after the steps
    log.clear()
    assert culprit_of(manager, trainer.fit) is None
    assert log == ["enter inner", "exit inner"] * 2  # the two steps went through the wrapper

    trainer = Trainer(config(tmp_path, regularizer="l2"), examples(), pm=manager, progress=False)
    with pytest.raises(SpladectlError, match="--regularizer 'l2': expected one of flops, l1") as err:
        trainer.fit()  # checked by the built-in at train start, before any step
    assert plugin_errors.hook_error(err.value, manager) is None

    class Strict:
        @hookimpl(wrapper=True)
        def train(self, state):
            if state.config.lr >= 1e-5:
                raise SpladectlError("needs --lr below 1e-5", hint="lower it")
            return (yield)

    plugins.register(manager, Strict(), "strict", source="test")
    error = culprit_of(manager, Trainer(config(tmp_path), examples(), pm=manager, progress=False).fit)
    assert (error.message, error.hint) == ("plugin 'strict': needs --lr below 1e-5", "lower it")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before the first step


def test_naming_plugin_errors_while_the_trainer_is_built(tmp_path, manager):
    class NoOptimizer:
        @hookimpl
        def make_optimizer(self, model):
            raise TypeError("unsupported model")

    with pytest.raises(SpladectlError, match="--scheduler 'step'"), plugin_errors.naming_plugin_errors(manager):
        Trainer(config(tmp_path, scheduler="step"), examples(), pm=manager, progress=False)  # built-in: unchanged
    plugins.register(manager, NoOptimizer(), "no-optimizer", source="test")
    with pytest.raises(PluginError) as err, plugin_errors.naming_plugin_errors(manager):
        Trainer(config(tmp_path), examples(), pm=manager, progress=False)
    assert err.value.message == "plugin 'no-optimizer' raised TypeError: unsupported model"
    assert isinstance(err.value.__cause__, TypeError)


FAILS_AT_STEP_2 = """
    from spladectl.hookspecs import hookimpl

    class Boom:
        @hookimpl(wrapper=True)
        def train_step(self, state):
            metrics = yield
            if state.step == 2:
                raise RuntimeError(f"boom at step {state.step}")
            return metrics
"""


def test_train_stops_on_a_failing_plugin_and_keeps_the_last_checkpoint(tmp_path, cli, global_pm, monkeypatch):
    from transformers import AutoModelForMaskedLM

    from spladectl.checkpoint import find_checkpoint, load_training_state, step_dirs

    (tmp_path / "boom_plugin.py").write_text(textwrap.dedent(FAILS_AT_STEP_2))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive_document": p, "negative_documents": [n]}) + "\n"
                            for q, p, n in TOPICS))
    out = tmp_path / "run"
    result = cli("train", "--data", str(data), "--output-dir", str(out), "--max-steps", "3", "--save-every", "1",
                 "--plugin", "boom_plugin:Boom", *SHORT_RUN, env=WIDE)
    assert result.exit_code == 1, result.output
    assert "plugin 'boom_plugin:Boom' raised RuntimeError: boom at step 2" in flat(result.output)
    assert "Traceback" not in result.output
    assert [step for step, _ in step_dirs(out / "checkpoints")] == [1]
    assert not (out / "final").exists()
    good = find_checkpoint("latest", out)
    assert load_training_state(good)["step"] == 1
    assert AutoModelForMaskedLM.from_pretrained(good).config.vocab_size == 30522
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed"
    assert "plugin 'boom_plugin:Boom' raised RuntimeError: boom at step 2" in record["error"]


def test_plugin_errors_in_register_hooks_are_named(manager):
    class BadCommands:
        @hookimpl
        def register_commands(self, cli):
            cli.no_such_method()

    plugins.register(manager, BadCommands(), "bad-commands", source="test")
    with pytest.raises(PluginError, match="plugin 'bad-commands' raised AttributeError.* in register_commands"):
        plugin_errors.call_register_commands(typer.Typer(), manager)


# ------------------------------------------------------------------------------------------------ the CLI

class Listed:
    @hookimpl(wrapper=True)
    def train_step(self, state):
        return (yield)

    @hookimpl
    def on_evaluate(self, state, metrics):
        pass


def test_plugins_list(cli, global_pm):
    global_pm.register(Listed(), name="listed-plugin")
    rows = json.loads(cli("plugins", "list", "--json").stdout)
    listed = [r for r in rows if r["name"] == "listed-plugin"]
    assert listed == [{"name": "listed-plugin", "builtin": False, "source": "registered", "distribution": "",
                       "version": "", "hooks": ["on_evaluate", "train_step"]}]
    assert not any(r["builtin"] for r in rows)
    everything = json.loads(cli("plugins", "list", "--all", "--json").stdout)
    assert {r["name"] for r in everything if r["builtin"]} == set(plugins.DEFAULT_PLUGINS)
    assert all(isinstance(r["builtin"], bool) for r in everything)

    human = cli("plugins")  # alone: the same as `plugins list`
    assert human.exit_code == 0, human.output
    assert human.stdout == cli("plugins", "list").stdout
    assert "listed-plugin  (-, registered)\n    hooks: on_evaluate, train_step" in human.stdout
    assert "spladectl.builtin_plugins.memory" not in human.stdout
    assert "spladectl.builtin_plugins.memory  (spladectl" in cli("plugins", "list", "--all").stdout


def test_a_plugin_adds_profiles_from_a_table_and_a_file(cli, global_pm, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    toml = tmp_path / "pkg" / "tpu-ish.toml"
    toml.parent.mkdir()
    toml.write_text('description = "from a plugin file"\ndevice = "cpu"\nprecision = "bf16"\nbatch_size = 3\n')

    class Profiles:
        @hookimpl
        def register_profiles(self, register):
            register({"name": "l4-ish", "description": "from a plugin table", "device": "cuda",
                      "precision": "bf16-mixed", "batch_size": 16}, origin="spladectl-l4")
            register(toml, origin="spladectl-l4")

    global_pm.register(Profiles(), name="profiles-plugin")
    rows = {r["name"]: r for r in json.loads(cli("profile", "list", "--json").stdout)}
    assert rows["l4-ish"]["origin"] == "spladectl-l4" and rows["l4-ish"]["path"] is None
    assert rows["tpu-ish"]["origin"] == "spladectl-l4" and rows["tpu-ish"]["path"] == str(toml)
    assert (rows["tpu-ish"]["precision"], rows["tpu-ish"]["batch_size"]) == ("bf16-mixed", 3)
    assert rows["cpu"]["origin"] == "builtin"
    human = cli("profile", "list", env=WIDE).stdout
    assert re.search(r"l4-ish\s+│?\s*spladectl-l4", human)


def test_profile_origin_defaults_to_the_plugin(manager):
    from spladectl.profiles import ProfileRegistry

    class NoOrigin:
        @hookimpl
        def register_profiles(self, register):
            register({"name": "anon", "description": "x", "device": "cpu", "precision": "fp32", "batch_size": 1})

    plugins.register(manager, NoOrigin(), "no-origin", source="test")
    registry = ProfileRegistry()
    plugin_errors.call_register_profiles(registry.register, manager)
    assert registry.origin("anon") == "no-origin"


# ------------------------------------------------------------------------------------------------ built-in behaviour

@pytest.mark.parametrize("schedule, factors", [
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]),
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedules(schedule, factors):
    from spladectl.builtin_plugins.optim import lr_factor

    # 2 warm-up steps of 6 total, then the schedule's decay over the other 4
    assert [lr_factor(schedule, s, 6, 2) for s in range(7)] == pytest.approx(factors)


def test_unknown_schedule_is_a_clear_error(tmp_path, manager):
    with pytest.raises(SpladectlError, match="--scheduler 'step': expected one of linear, cosine, constant"):
        Trainer(config(tmp_path, scheduler="step"), examples(), pm=manager, progress=False)


@pytest.mark.parametrize("schedule, expected", [("quadratic", [0, 1 / 9, 4 / 9, 1, 1]),
                                                ("linear", [0, 1 / 3, 2 / 3, 1, 1]), ("constant", [1] * 5)])
@pytest.mark.parametrize("warmup, total_steps", [(3, 100), (None, 9)])  # unset: a third of the run
def test_flops_lambda_schedules(schedule, expected, warmup, total_steps):
    from spladectl.builtin_plugins.flops import current_lambdas

    c = TrainConfig(flops_schedule=schedule, flops_warmup_steps=warmup, lambda_q=2.0, lambda_d=4.0)
    got = [current_lambdas(types.SimpleNamespace(config=c, step=s, total_steps=total_steps)) for s in range(5)]
    assert [q for q, _ in got] == pytest.approx([2.0 * e for e in expected])
    assert [d for _, d in got] == pytest.approx([4.0 * e for e in expected])


def test_l1_regularizer_cosine_schedule_and_linear_lambda_in_a_real_run(tmp_path, manager):
    seen = []

    class Probe:  # records the L1 of the same representations the built-in term sees
        @hookimpl
        def loss_terms(self, inputs):
            seen.append((losses.l1(inputs.query).item(), losses.l1(inputs.documents).item()))

    plugins.register(manager, Probe(), "probe", source="test")
    c = config(tmp_path, max_steps=3, regularizer="l1", flops_schedule="linear", flops_warmup_steps=2,
               lambda_q=1e-3, lambda_d=2e-3, scheduler="cosine", lr=1e-4)
    Trainer(c, examples(), pm=manager, progress=False).fit()
    rows = metrics_rows(tmp_path)
    assert not any(key.startswith(("flops_", "mem_")) for row in rows for key in row)  # no --memory-tracking
    assert all("memory_gb" in row for row in rows)
    assert [r["lambda_q"] for r in rows] == pytest.approx([0.0, 0.5e-3, 1e-3])  # linear ramp over 2 steps
    assert "l1_q" not in rows[0]  # λ = 0: no term
    for row, (l1_q, l1_d) in list(zip(rows, seen))[1:]:
        assert row["l1_q"] == pytest.approx(row["lambda_q"] * l1_q, rel=1e-5)
        assert row["l1_d"] == pytest.approx(row["lambda_d"] * l1_d, rel=1e-5)
    assert [r["lr"] for r in rows] == pytest.approx([1e-4 * (1 + math.cos(math.pi * s / 3)) / 2 for s in range(3)])


def write_teacher_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({
        "query": q, "positive_document": p, "positive_score": 9.0 - i % 3,
        "negative_documents": [{"document": n, "score": 2.0 + i % 2}]}) + "\n" for i, (q, p, n) in enumerate(TOPICS)))
    return path


@pytest.mark.parametrize("kind, weight, reference", [("margin-mse", 2.0, losses.margin_mse),
                                                      ("kl", 0.5, losses.kl_distillation)])
def test_distillation_from_teacher_scores_in_the_data(tmp_path, manager, kind, weight, reference):
    from spladectl.data import load_training_data

    data = load_training_data(str(write_teacher_jsonl(tmp_path / "teacher.jsonl")))
    assert data[0].teacher_scores == [9.0, 2.0]
    expected = []

    class Reference:
        @hookimpl
        def loss_terms(self, inputs):
            expected.append(weight * reference(inputs).item())

    plugins.register(manager, Reference(), "reference", source="test")
    c = config(tmp_path, distillation=kind, distillation_weight=weight, max_steps=1)
    Trainer(c, data, pm=manager, progress=False).fit()
    rows = metrics_rows(tmp_path)
    other = {"margin-mse": "kl", "kl": "margin-mse"}[kind]
    assert [r[kind] for r in rows] == pytest.approx(expected, rel=1e-5) and all(other not in r for r in rows)
    assert rows[0]["loss"] == pytest.approx(sum(v for k, v in rows[0].items()
                                                if k in ("ranking", kind, "flops_q", "flops_d")), rel=1e-5)


def test_distillation_is_off_without_teacher_scores_or_weight(manager):
    from spladectl.builtin_plugins import distillation

    q, d = torch.rand(2, 5), torch.rand(2, 2, 5)
    with_teacher = losses.LossInputs.build(q, d, torch.tensor([[3.0, 1.0], [2.0, 0.0]]))
    state = types.SimpleNamespace(config=TrainConfig())
    assert distillation.loss_terms(losses.LossInputs.build(q, d), state) is None
    assert set(distillation.loss_terms(with_teacher, state)) == {"margin-mse"}
    state.config.distillation_weight = 0.0
    assert distillation.loss_terms(with_teacher, state) is None
    state.config.distillation = "cosine"
    with pytest.raises(SpladectlError, match="--distillation 'cosine'"):
        next(distillation.train(state))  # its train wrapper checks before the first step


# ------------------------------------------------------------------------------------------------ docs/plugins.md

def doc_examples() -> dict[str, list[str]]:
    """The python code blocks under each `### \\`hook\\`` heading of docs/plugins.md."""
    sections: dict[str, list[str]] = {}
    current = None
    for block in re.split(r"^(#{2,3} .*)$", DOCS.read_text(), flags=re.M):
        heading = re.fullmatch(r"### `(\w+)`", block.strip())
        if heading:
            current = heading.group(1)
            sections[current] = []
        elif block.startswith("## "):
            current = None
        elif current:
            sections[current] += re.findall(r"```python\n(.*?)```", block, flags=re.S)
    return sections


def section_examples(title: str) -> list[str]:
    """The python code blocks of the `## title` section of docs/plugins.md."""
    section = DOCS.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def load_example(hook: str, code: str) -> types.ModuleType:
    module = types.ModuleType(f"docs_plugins_{hook}")
    module.__file__ = str(DOCS)
    exec(compile(code, f"{DOCS} ({hook})", "exec"), module.__dict__)
    return module


def test_every_hook_has_a_documented_example():
    from spladectl import hookspecs

    specs = {name for name, value in vars(hookspecs).items() if hasattr(value, "spladectl_spec")}
    sections = doc_examples()
    assert set(sections) == specs and len(specs) == 8
    assert all(len(blocks) == 1 for blocks in sections.values()), sections


def test_the_documented_examples_run(tmp_path, manager, capsys):
    from safetensors.torch import load_file

    from spladectl.data.beir import load_beir
    from spladectl.evaluate import evaluate_encoder

    modules = {hook: load_example(hook, code) for hook, (code,) in doc_examples().items()}
    for hook, module in modules.items():
        plugins.register(manager, module, f"docs:{hook}", source="test")
        assert {c.name for c in manager.get_hookcallers(module)} == {hook}  # each example implements its own hook
    modules["train_step"].ARCHIVE_EVERY = 2
    (code,) = section_examples("Distributed runs")
    plugins.register(manager, load_example("distributed", code), "docs:distributed", source="test")

    # register_commands and register_profiles run outside training
    app = typer.Typer()
    app.callback()(lambda: None)
    plugin_errors.call_register_commands(app, manager)
    assert CliRunner().invoke(app, ["hello", "--name", "docs"]).output == "hello docs\n"
    from spladectl.profiles import ProfileRegistry

    registry = ProfileRegistry()
    manager.hook.register_profiles(register=registry.register)
    registry.validate()
    assert (registry.get("l4").batch_size, registry.origin("l4")) == (16, "spladectl-l4")

    # the training hooks in one real run of `spladectl train`'s shape, with an evaluation after each step
    dataset = load_beir(write_eval_beir(tmp_path / "beir"), "test")
    c = config(tmp_path, save_every=1, eval_every=1)
    trainer = Trainer(c, examples(), pm=manager, progress=False, eval_fn=lambda encoder: evaluate_encoder(
        encoder, dataset, max_query_length=16, max_doc_length=32, show_progress=False))
    with ActiveRun(RunRecord(id="docs-run", dir=str(tmp_path / "out"))) as run:
        run.attach_trainer(trainer)
        result = trainer.fit()
    state, rows, out = trainer.state, metrics_rows(tmp_path), tmp_path / "out"
    evaluations = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]

    assert isinstance(state.optimizer, torch.optim.SGD) and state.optimizer.defaults["momentum"] == 0.9
    assert isinstance(state.scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert all(r["l2_pos"] > 0 for r in rows)  # loss_terms
    # train_step: timed around the engine's step; the model of step 2 archived (and not that of step 1)
    assert all(r["wall_ms"] >= 1000 * r["step_seconds"] for r in rows)
    assert [p.name for p in (out / "archive").iterdir()] == ["step-2"]
    archived, final = load_file(out / "archive" / "step-2" / "model.safetensors"), load_file(
        out / "final" / "model.safetensors")
    assert archived.keys() == final.keys() and all(torch.equal(archived[k], final[k]) for k in final)
    assert [r["step_seconds_by_rank"] for r in rows] == [[r["step_seconds"]] for r in rows]  # Distributed runs
    # on_evaluate: each evaluation during training, then the final model's (step 2's metrics, not measured again)
    history = [line.split("\t") for line in (out / "eval-history.tsv").read_text().splitlines()]
    ndcg = [f"{e['nDCG@10']:.4f}" for e in evaluations]
    assert history == [["1", ndcg[0]], ["2", ndcg[1]], ["final", ndcg[1]]]
    # train: the message at the end, naming the run, and a row in the summary
    said = capsys.readouterr().out
    assert re.search(rf"^docs-run: finished 2 steps in \d+\.\d min: loss {rows[-1]['loss']:.4f}, nDCG@10 "
                     rf"{ndcg[1]}$", said, flags=re.M), said
    assert ("examples seen", "8") in result["summary"]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("error, said", [(RuntimeError("disk on fire"), "failed at step 1: RuntimeError: disk on fire"),
                                         (KeyboardInterrupt(), "interrupted at step 1")])
def test_the_documented_train_wrapper_reports_a_failure_or_an_interruption(tmp_path, manager, capsys, error, said):
    (code,) = doc_examples()["train"]
    plugins.register(manager, load_example("train", code), "docs:train", source="test")
    plugins.register(manager, TrainRecorder([], fail_at=(1, error)), "failing", source="test")
    trainer = Trainer(config(tmp_path), examples(), pm=manager, progress=False)
    with pytest.raises(type(error)):
        trainer.fit()
    out = capsys.readouterr().out
    assert f"{tmp_path / 'out'}: {said}\n" in out and "finished" not in out


def test_the_package_walkthrough_quotes_the_real_package():
    """The code of "Writing a plugin package" is the csvlog package's own (its tests run it)."""
    package = REPO / "plugins" / "spladectl-csvlog"
    sources = [(package / "spladectl_csvlog" / "__init__.py").read_text(),
               (package / "tests" / "test_csvlog.py").read_text(), (package / "pyproject.toml").read_text()]
    walkthrough = DOCS.read_text().split("## Writing a plugin package", 1)[1]
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", walkthrough, flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        assert any(_in_order(lines, [line.strip() for line in source.splitlines()]) for source in sources), block


def _in_order(needles: list[str], haystack: list[str]) -> bool:
    position = 0
    for needle in needles:
        try:
            position = haystack.index(needle, position) + 1
        except ValueError:
            return False
    return True
