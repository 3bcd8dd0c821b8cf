"""The plugin system: discovery and SPLADECTL_PLUGINS, registration errors, wrapper ordering, argument subsets,
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

from spladectl import losses, plugins
from spladectl.config import TrainConfig
from spladectl.engine import Trainer
from spladectl.errors import PluginError, SpladectlError
from spladectl.hookspecs import hookimpl
from spladectl.runs.lifecycle import ActiveRun
from spladectl.runs.record import RunRecord
from tiny import TOPICS, config, examples, metrics_rows

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
    return plugins.make_plugin_manager(installed=False)


@pytest.fixture
def global_pm():
    """The process-wide manager the in-process CLI uses; every plugin a test adds is unregistered afterwards."""
    pm = plugins.load_plugins()
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

    @hookimpl
    def on_step_end(state, metrics):
        metrics["{key}"] = state.step
"""


# ------------------------------------------------------------------------------------------------ discovery

def test_builtins_register_like_any_plugin(manager):
    rows = plugins.describe_plugins(include_builtin=True, manager=manager)
    assert [r["name"] for r in rows] == sorted(plugins.DEFAULT_PLUGINS)
    assert all(r["builtin"] and r["source"] == "builtin" and r["distribution"] == "spladectl" for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert "optimizer_step" in by_name["spladectl.default_plugins.core"]["hooks"]
    assert {"optimizer_step", "summary_rows"} <= set(by_name["spladectl.default_plugins.memory"]["hooks"])
    assert plugins.describe_plugins(manager=manager) == []  # without --all: installed ones only


def test_reset_refills_the_same_global_manager(global_pm):
    from spladectl.plugins import pm  # what engine-era code imports; it must stay the live manager

    assert pm is global_pm
    plugins.reset()
    assert pm.get_plugins() == set() and pm.sources == {}
    assert plugins.load_plugins() is pm
    assert set(plugins.DEFAULT_PLUGINS) <= set(pm.sources)


def test_spladectl_plugins_selects_installed_plugins(site):
    fake_distribution(site, "spladectl-fakeone", "1.2", {"fakeone": "fakeone_plugin"},
                      {"fakeone_plugin": PLUGIN_MODULE.format(key="fakeone")})
    fake_distribution(site, "other-fake", "0.3", {"fakeother": "fakeother_plugin:Plugin"},
                      {"fakeother_plugin": "from spladectl.hookspecs import hookimpl\n\nclass Plugin:\n"
                                           "    @hookimpl\n    def on_train_start(self, state):\n        pass\n"})

    def loaded(value):
        env = {} if value is None else {plugins.ENV_VAR: value}
        return {n for n in plugins.make_plugin_manager(env=env).sources if not plugins.is_builtin(n)}

    assert {"fakeone", "fakeother"} <= loaded(None)  # unset: every installed plugin
    assert loaded("") == set() and loaded(" , ") == set()  # empty: none
    assert loaded("fakeone") == {"fakeone"}  # by entry-point name
    assert loaded("Spladectl_FakeOne") == {"fakeone"}  # by distribution name, compared as pip compares them
    assert loaded("fakeone, other-fake") == {"fakeone", "fakeother"}

    manager = plugins.make_plugin_manager(env={plugins.ENV_VAR: "fakeother,not-installed"})
    assert manager.unmatched_selection == ["not-installed"]
    (row,) = plugins.describe_plugins(manager=manager)
    assert row == {"name": "fakeother", "builtin": False, "source": "entry point", "distribution": "other-fake",
                   "version": "0.3", "hooks": ["on_train_start"]}
    assert isinstance(manager.get_plugin("fakeother"), sys.modules["fakeother_plugin"].Plugin)  # module:object


def test_a_broken_package_names_itself_and_can_be_switched_off(site):
    fake_distribution(site, "spladectl-broken", "0.1", {"broken": "broken_plugin"},
                      {"broken_plugin": "raise ImportError('needs libfoo')\n"})
    with pytest.raises(PluginError) as err:
        plugins.make_plugin_manager(env={})
    assert "plugin 'broken'" in err.value.message and "spladectl-broken" in err.value.message
    assert "ImportError: needs libfoo" in err.value.message and plugins.ENV_VAR in err.value.hint
    assert "broken" not in plugins.make_plugin_manager(env={plugins.ENV_VAR: ""}).sources


def test_hooks_that_do_not_match_the_specs_are_refused(manager):
    class WrongArgument:
        @hookimpl
        def on_step_end(self, state, metrics, nonsense):
            pass

    class Typo:
        @hookimpl
        def on_step_ned(self, state, metrics):
            pass

    class DeliberateExtra:
        @hookimpl(optionalhook=True)
        def some_other_tools_hook(self):
            pass

    with pytest.raises(PluginError, match="plugin 'wrong' does not match the hook specifications.*nonsense"):
        plugins.register(manager, WrongArgument(), "wrong", source="test")
    with pytest.raises(PluginError, match=r"plugin 'typo' implements unknown hook\(s\) on_step_ned"):
        plugins.register(manager, Typo(), "typo", source="test")
    assert not manager.has_plugin("typo")
    plugins.register(manager, DeliberateExtra(), "extra", source="test")
    assert manager.has_plugin("extra")


def test_add_plugin_imports_module_object_and_instantiates_classes(manager, site):
    (site / "addme_plugin.py").write_text(textwrap.dedent("""
        from spladectl.hookspecs import hookimpl

        class Counter:
            def __init__(self):
                self.calls = 0

            @hookimpl
            def on_train_start(self, state):
                self.calls += 1

        @hookimpl
        def on_train_end(state):
            pass
    """))
    assert plugins.add_plugin("addme_plugin:Counter", manager) == "addme_plugin:Counter"
    assert type(manager.get_plugin("addme_plugin:Counter")).__name__ == "Counter"
    plugins.add_plugin("addme_plugin", manager)
    assert manager.get_plugin("addme_plugin") is sys.modules["addme_plugin"]
    assert plugins.add_plugin("addme_plugin:Counter", manager) == "addme_plugin:Counter"  # twice: registered once
    with pytest.raises(PluginError, match="--plugin no_such_module:X: cannot import it"):
        plugins.add_plugin("no_such_module:X", manager)
    with pytest.raises(PluginError, match="--plugin addme_plugin:Nope: cannot import it"):
        plugins.add_plugin("addme_plugin:Nope", manager)


# ------------------------------------------------------------------------------------------------ calling conventions

class Recorder:
    """Wraps optimizer_step and writes 'enter NAME' / 'exit NAME' to a shared log."""

    def __init__(self, name, log, **opts):
        self.name, self.log = name, log

        def optimizer_step(state):
            log.append(f"enter {name}")
            try:
                metrics = yield
            finally:
                log.append(f"exit {name}")
            metrics.setdefault("wrapped_by", []).append(name)
            return metrics

        self.optimizer_step = hookimpl(wrapper=True, **opts)(optimizer_step)


def run_step(manager, log):
    """Call optimizer_step as the engine does, with the engine's step replaced by a recorder."""
    state = types.SimpleNamespace(config=TrainConfig(), run_step=lambda: log.append("core") or {"step": 1})
    return manager.hook.optimizer_step(state=state)


def test_implementations_may_declare_fewer_arguments_and_wrap_real_steps(tmp_path, manager):
    class Few:
        @hookimpl
        def loss_terms(self, inputs):  # the spec offers (inputs, state)
            return {"tiny": 1e-3 * inputs.query.mean()}

        @hookimpl
        def on_step_end(self, metrics):  # the spec offers (state, metrics)
            metrics["seen_by_few"] = True

        @hookimpl
        def flops_weight(self, name):  # the spec offers (name, step, target, warmup_steps, state)
            return 0.25 if name == "document" else None

    log = []
    plugins.register(manager, Few(), "few", source="test")
    plugins.register(manager, Recorder("A", log, tryfirst=True), "A", source="test")
    plugins.register(manager, Recorder("B", log), "B", source="test")
    Trainer(config(tmp_path, lambda_d=3e-4), examples(), pm=manager, progress=False).fit()
    rows = metrics_rows(tmp_path)
    assert all(r["seen_by_few"] and "tiny" in r and r["lambda_d"] == 0.25 for r in rows)
    assert rows[1]["lambda_q"] > 0  # queries still get the built-in schedule: None passed it on
    # two wrappers around the real engine step: tryfirst A outermost, and their keys reach metrics.jsonl
    assert log == ["enter A", "enter B", "exit B", "exit A"] * 2
    assert [r["wrapped_by"] for r in rows] == [["B", "A"]] * 2


def test_an_argument_added_to_a_hook_later_does_not_break_old_plugins():
    """pluggy calls an implementation with the arguments it names, so a spec can grow without breaking it."""
    spec = pluggy.HookspecMarker("spladectl")

    class NewerSpecs:
        @spec
        def on_step_end(self, state, metrics, some_new_argument):
            """on_step_end as a future spladectl might define it."""

    class OldPlugin:
        @hookimpl
        def on_step_end(self, state, metrics):
            metrics["old"] = state

    newer = pluggy.PluginManager("spladectl")
    newer.add_hookspecs(NewerSpecs)
    newer.register(OldPlugin())
    metrics = {}
    newer.hook.on_step_end(state=3, metrics=metrics, some_new_argument="x")
    assert metrics == {"old": 3}


@pytest.mark.parametrize("opts_a, opts_b, expected", [
    ({}, {}, ["enter B", "enter A", "core", "exit A", "exit B"]),  # registered last = outermost
    ({"tryfirst": True}, {}, ["enter A", "enter B", "core", "exit B", "exit A"]),
    ({}, {"trylast": True}, ["enter A", "enter B", "core", "exit B", "exit A"]),
])
def test_wrapper_order(manager, opts_a, opts_b, expected):
    log = []
    plugins.register(manager, Recorder("A", log, **opts_a), "A", source="test")
    plugins.register(manager, Recorder("B", log, **opts_b), "B", source="test")
    metrics = run_step(manager, log)
    assert log == expected
    assert metrics["wrapped_by"] == [e.split()[1] for e in expected if e.startswith("exit")]


def test_wrappers_see_the_step_fail_and_a_plain_implementation_replaces_it(manager):
    log = []
    plugins.register(manager, Recorder("A", log), "A", source="test")
    failing = types.SimpleNamespace(config=TrainConfig(), run_step=lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        manager.hook.optimizer_step(state=failing)
    assert log == ["enter A", "exit A"]

    class Replacement:
        @hookimpl
        def optimizer_step(self, state):
            log.append("replacement")
            return {"step": 99}

    log.clear()
    plugins.register(manager, Replacement(), "replacement", source="test")
    assert run_step(manager, log) == {"step": 99, "wrapped_by": ["A"]}
    assert log == ["enter A", "replacement", "exit A"]  # firstresult: the core step never ran


# ------------------------------------------------------------------------------------------------ failing plugins

def culprit_of(manager, run) -> PluginError | None:
    with pytest.raises(Exception) as err:
        run()
    return plugins.hook_error(err.value, manager)


def test_failing_plugins_are_named_whatever_their_kind(tmp_path, manager, site):
    # an entry-point plugin (a module), through the real importlib.metadata path
    fake_distribution(site, "spladectl-raiser", "1.0", {"raiser": "raiser_plugin"}, {"raiser_plugin": """
        from spladectl.hookspecs import hookimpl

        def _check(value):
            raise ValueError(f"bad value {value}")

        @hookimpl
        def on_step_end(state, metrics):
            _check(metrics["step"])  # raises in a helper: the hook's frame is still in the traceback
    """})
    entry = plugins.make_plugin_manager(env={plugins.ENV_VAR: "raiser"})
    trainer = Trainer(config(tmp_path / "a"), examples(), pm=entry, progress=False)
    error = culprit_of(entry, trainer.fit)
    assert error.message == "plugin 'raiser' raised ValueError: bad value 1"
    assert plugins.ENV_VAR in error.hint  # an installed package: say how to switch it off

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
    # raised in torch's scheduler.step(), inside the built-in core step: still the plugin's lambda
    error = culprit_of(manager, trainer.fit)
    assert error.message == "plugin 'bad-schedule' raised ArithmeticError: schedule broke"


def test_spladectl_errors_and_bugs_are_not_blamed_on_plugins(tmp_path, manager):
    log = []
    plugins.register(manager, Recorder("outer", log), "outer", source="test")
    engine_bug = types.SimpleNamespace(config=TrainConfig(), run_step=lambda: {}["missing"])
    assert culprit_of(manager, lambda: manager.hook.optimizer_step(state=engine_bug)) is None  # wrapped, not guilty

    trainer = Trainer(config(tmp_path, regularizer="l2"), examples(), pm=manager, progress=False)
    with pytest.raises(SpladectlError, match="--regularizer 'l2': expected one of flops, l1") as err:
        trainer.fit()  # checked by the built-in at train start, before any step
    assert plugins.hook_error(err.value, manager) is None

    class Strict:
        @hookimpl
        def on_train_start(self, state):
            raise SpladectlError("needs --lr below 1", hint="lower it")

    plugins.register(manager, Strict(), "strict", source="test")
    error = culprit_of(manager, Trainer(config(tmp_path), examples(), pm=manager, progress=False).fit)
    assert (error.message, error.hint) == ("plugin 'strict': needs --lr below 1", "lower it")


def test_naming_plugin_errors_while_the_trainer_is_built(tmp_path, manager):
    class NoOptimizer:
        @hookimpl
        def make_optimizer(self, model):
            raise TypeError("unsupported model")

    with pytest.raises(SpladectlError, match="--scheduler 'step'"), plugins.naming_plugin_errors(manager):
        Trainer(config(tmp_path, scheduler="step"), examples(), pm=manager, progress=False)  # built-in: unchanged
    plugins.register(manager, NoOptimizer(), "no-optimizer", source="test")
    with pytest.raises(PluginError) as err, plugins.naming_plugin_errors(manager):
        Trainer(config(tmp_path), examples(), pm=manager, progress=False)
    assert err.value.message == "plugin 'no-optimizer' raised TypeError: unsupported model"
    assert isinstance(err.value.__cause__, TypeError)


FAILS_AT_STEP_2 = """
    from spladectl.hookspecs import hookimpl

    class Boom:
        @hookimpl
        def on_step_end(self, state, metrics):
            if state.step == 2:
                raise RuntimeError(f"boom at step {state.step}")
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


def test_plugin_errors_in_register_hooks_are_named(manager):
    class BadCommands:
        @hookimpl
        def register_commands(self, cli):
            cli.no_such_method()

    plugins.register(manager, BadCommands(), "bad-commands", source="test")
    with pytest.raises(PluginError, match="plugin 'bad-commands' raised AttributeError.* in register_commands"):
        plugins.call_register_commands(typer.Typer(), manager)


# ------------------------------------------------------------------------------------------------ the CLI

class Listed:
    @hookimpl
    def on_step_end(self, state, metrics):
        pass

    @hookimpl
    def summary_rows(self, state):
        return None


def test_plugins_list(cli, global_pm):
    global_pm.register(Listed(), name="listed-plugin")
    rows = json.loads(cli("plugins", "list", "--json").stdout)
    listed = [r for r in rows if r["name"] == "listed-plugin"]
    assert listed == [{"name": "listed-plugin", "builtin": False, "source": "registered", "distribution": "",
                       "version": "", "hooks": ["on_step_end", "summary_rows"]}]
    assert not any(r["builtin"] for r in rows)
    everything = json.loads(cli("plugins", "list", "--all", "--json").stdout)
    assert {r["name"] for r in everything if r["builtin"]} == set(plugins.DEFAULT_PLUGINS)
    assert all(isinstance(r["builtin"], bool) for r in everything)

    human = cli("plugins")  # alone: the same as `plugins list`
    assert human.exit_code == 0, human.output
    assert human.stdout == cli("plugins", "list").stdout
    assert "listed-plugin  (-, registered)\n    hooks: on_step_end, summary_rows" in human.stdout
    assert "spladectl.default_plugins.core" not in human.stdout
    assert "spladectl.default_plugins.core  (spladectl" in cli("plugins", "list", "--all").stdout


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
    plugins.call_register_profiles(registry.register, manager)
    assert registry.origin("anon") == "no-origin"


# ------------------------------------------------------------------------------------------------ built-in behaviour

@pytest.mark.parametrize("schedule, factors", [
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]),
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedules(schedule, factors):
    from spladectl.default_plugins.optim import lr_factor

    # 2 warm-up steps of 6 total, then the schedule's decay over the other 4
    assert [lr_factor(schedule, s, 6, 2) for s in range(7)] == pytest.approx(factors)


def test_unknown_schedule_is_a_clear_error(tmp_path, manager):
    with pytest.raises(SpladectlError, match="--scheduler 'step': expected one of linear, cosine, constant"):
        Trainer(config(tmp_path, scheduler="step"), examples(), pm=manager, progress=False)


@pytest.mark.parametrize("schedule, expected", [("quadratic", [0, 1 / 9, 4 / 9, 1, 1]),
                                                ("linear", [0, 1 / 3, 2 / 3, 1, 1]), ("constant", [1] * 5)])
def test_flops_lambda_schedules(manager, schedule, expected):
    state = types.SimpleNamespace(config=TrainConfig(flops_schedule=schedule))
    got = [manager.hook.flops_weight(name="query", step=s, target=2.0, warmup_steps=3, state=state) for s in range(5)]
    assert got == pytest.approx([2.0 * e for e in expected])


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
    from spladectl.default_plugins import distillation

    q, d = torch.rand(2, 5), torch.rand(2, 2, 5)
    with_teacher = losses.LossInputs.build(q, d, torch.tensor([[3.0, 1.0], [2.0, 0.0]]))
    state = types.SimpleNamespace(config=TrainConfig())
    assert distillation.loss_terms(losses.LossInputs.build(q, d), state) is None
    assert set(distillation.loss_terms(with_teacher, state)) == {"margin-mse"}
    state.config.distillation_weight = 0.0
    assert distillation.loss_terms(with_teacher, state) is None
    state.config.distillation = "cosine"
    with pytest.raises(SpladectlError, match="--distillation 'cosine'"):
        distillation.on_train_start(state)


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


def load_example(hook: str, code: str) -> types.ModuleType:
    module = types.ModuleType(f"docs_plugins_{hook}")
    module.__file__ = str(DOCS)
    exec(compile(code, f"{DOCS} ({hook})", "exec"), module.__dict__)
    return module


def test_every_hook_has_a_documented_example():
    from spladectl import hookspecs

    specs = {name for name, value in vars(hookspecs).items() if hasattr(value, "spladectl_spec")}
    sections = doc_examples()
    assert set(sections) == specs
    assert all(len(blocks) == 1 for blocks in sections.values()), sections


def test_the_documented_examples_run(tmp_path, manager, capsys):
    from spladectl.data import write_beir
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import evaluate_encoder
    from spladectl.profiles import ProfileRegistry

    modules = {hook: load_example(hook, code) for hook, (code,) in doc_examples().items()}
    for hook, module in modules.items():
        plugins.register(manager, module, f"docs:{hook}", source="test")
        assert {c.name for c in manager.get_hookcallers(module)} == {hook}  # each example implements its own hook
    modules["on_checkpoint_saved"].ARCHIVE_EVERY = 1

    # register_commands and register_profiles run outside training
    app = typer.Typer()
    app.callback()(lambda: None)
    plugins.call_register_commands(app, manager)
    assert CliRunner().invoke(app, ["hello", "--name", "docs"]).output == "hello docs\n"
    registry = ProfileRegistry()
    manager.hook.register_profiles(register=registry.register)
    registry.validate()
    assert (registry.get("l4").batch_size, registry.origin("l4")) == (16, "spladectl-l4")

    # the training hooks in one real run, with an evaluation after each step
    beir = write_beir(tmp_path / "beir", {f"d{i}": p for i, (_, p, _) in enumerate(TOPICS)},
                      {f"q{i}": q for i, (q, _, _) in enumerate(TOPICS[:4])},
                      {"test": {f"q{i}": {f"d{i}": 1} for i in range(4)}})
    dataset = load_beir(beir, "test")
    c = config(tmp_path, save_every=1, eval_every=1, lambda_d=3e-4)
    trainer = Trainer(c, examples(), pm=manager, progress=False, eval_fn=lambda encoder: evaluate_encoder(
        encoder, dataset, max_query_length=16, max_doc_length=32, show_progress=False))
    with ActiveRun(RunRecord(id="docs-run", dir=str(tmp_path / "out")), pm=manager) as run:  # what train does
        run.attach_trainer(trainer)
        trainer.fit()
    state, rows, out = trainer.state, metrics_rows(tmp_path), tmp_path / "out"

    assert isinstance(state.optimizer, torch.optim.SGD) and state.optimizer.defaults["momentum"] == 0.9
    assert isinstance(state.scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert all(r["l2_pos"] > 0 for r in rows)  # loss_terms
    assert [r["lambda_q"] for r in rows] == [0.0, 0.0] and rows[1]["lambda_d"] == 3e-4  # flops_weight
    assert all("flops_q" not in r for r in rows)
    assert all(r["wall_ms"] > 0 for r in rows)  # optimizer_step
    assert all(r["doc_to_query_dims"] == pytest.approx(r["doc_dims"] / r["query_dims"]) for r in rows)  # on_step_end
    n_params = sum(p.numel() for p in state.model.parameters())
    assert f"training {n_params:,} parameters for 2 steps on cpu" in capsys.readouterr().out  # on_train_start
    assert [line.split("\t")[0] for line in (out / "eval-history.tsv").read_text().splitlines()] == ["1", "2"]
    assert (out / "archive" / "step-1").is_dir() and (out / "archive" / "step-2").is_dir()  # on_checkpoint_saved
    assert (out / "STATUS").read_text() == "finished at step 2\n"  # on_train_end
    assert ("examples seen", "8") in plugins.summary_rows(state, manager)  # summary_rows
    assert (tmp_path / "results.tsv").read_text() == f"docs-run\tfinished\t{rows[-1]['loss']:.4f}\n"  # on_run_end


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
