"""`spladectl export`: each format loaded by its consumer's own library gives spladectl's vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spladectl.model import SpladeEncoder

pytest.importorskip("sentence_transformers")  # the `export` extra, part of `test`

WIDE = {"COLUMNS": "2000"}  # error boxes must not wrap the text the tests look for
LONG = "Proteins fold into three-dimensional structures that decide what they do in the cell. " * 12
TEXTS = [LONG, "short text", "what do proteins fold into and why does the shape matter for their function " * 3]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real two-step training on the demo, with lengths unlike the defaults so that the export must carry them."""
    from typer.testing import CliRunner

    from spladectl.cli.app import build_app

    out = tmp_path_factory.mktemp("run") / "run"
    result = CliRunner().invoke(build_app(), ["train", "-o", str(out), "--max-steps", "2", "--max-query-length", "12",
                                              "--max-doc-length", "40", "--precision", "32-true", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_sentence_transformers_loads_the_export_with_its_lengths_and_card(cli, trained_run, tmp_path):
    from sentence_transformers import SparseEncoder

    out = tmp_path / "st"
    result = cli("export", str(trained_run / "final"), str(out), "--format", "sentence-transformers", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_query_length"] == 12
    ours = SpladeEncoder.from_pretrained(str(trained_run / "final"))
    theirs = SparseEncoder(str(out), device="cpu")
    for kind, length in (("query", 12), ("document", 40)):
        encode = theirs.encode_query if kind == "query" else theirs.encode_document
        got = encode(TEXTS, convert_to_tensor=True).to_dense().float()
        want = ours.encode(TEXTS, max_length=length)
        assert torch.equal(got > 0, want > 0), kind  # the same active terms
        assert torch.allclose(got, want, atol=1e-4), (kind, (got - want).abs().max())
    card = (out / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "| max_steps | 2 |" in card
    assert "| nDCG@10 |" in card  # the demo's held-out quality before and after training


def test_hf_export_reloads_with_the_training_lengths(cli, trained_run, tmp_path):
    out = tmp_path / "hf"
    assert cli("export", str(trained_run / "final"), str(out), "-f", "hf").exit_code == 0
    reloaded = SpladeEncoder.from_pretrained(str(out))
    assert reloaded.lengths() == (12, 40)
    original = SpladeEncoder.from_pretrained(str(trained_run / "final"))
    assert torch.equal(reloaded.encode(TEXTS, max_length=40), original.encode(TEXTS, max_length=40))


def test_onnx_export_gives_the_torch_vectors_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from spladectl.export import export_model

    out = tmp_path / "onnx"
    export_model("splade-tiny", out, "onnx")
    meta = json.loads((out / "splade_config.json").read_text())
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    batch = encoder.tokenize(TEXTS, 64)  # a batch size and length other than the traced ones
    session = onnxruntime.InferenceSession(str(out / meta["onnx"]["file"]), providers=["CPUExecutionProvider"])
    got = session.run([meta["onnx"]["output"]], {k: v.numpy() for k, v in batch.items()})[0]
    want = encoder.encode(TEXTS, max_length=64).numpy()
    assert np.array_equal(got > 0, want > 0)
    assert np.abs(got - want).max() < 1e-4


def test_an_existing_directory_is_replaced_only_when_asked_and_only_whole(cli, tmp_path, monkeypatch):
    from spladectl import export

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = cli("export", "splade-tiny", str(out), "-f", "hf", env=WIDE)
    assert refused.exit_code != 0 and "already exists" in refused.output and "--overwrite" in refused.output

    def broken(encoder, staging, lengths):  # an export that dies half-way, as a full disk would make it
        staging.mkdir()
        (staging / "config.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export.WRITERS, "hf", broken)
    with pytest.raises(OSError):
        export.export_model("splade-tiny", out, "hf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "keep.txt").read_text() == "mine"
    monkeypatch.undo()

    assert cli("export", "splade-tiny", str(out), "-f", "hf", "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or set-aside directory left


def test_bad_input_is_one_clear_error(cli, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    result = cli("export", str(junk), str(tmp_path / "out"), env=WIDE)
    assert result.exit_code == 2 and "cannot load model" in result.output and "Traceback" not in result.output
    result = cli("export", "splade-tiny", str(tmp_path / "out"), "-f", "torchscript", env=WIDE)
    assert result.exit_code == 2 and "not one of sentence-transformers, hf, onnx" in result.output
    assert not (tmp_path / "out").exists()
