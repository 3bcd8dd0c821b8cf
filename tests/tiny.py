"""Tiny training material shared by the tests: eight hand-written triples and a config for runs of a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

from spladectl.config import TrainConfig
from spladectl.data import Example

TOPICS = [
    ("how do bees make honey", "Bees turn nectar into honey by evaporating water in the hive.",
     "Wasps build paper nests from chewed wood fibre."),
    ("why is the sky blue", "Rayleigh scattering sends short blue wavelengths across the sky.",
     "Sunsets look red because light crosses more atmosphere."),
    ("what makes bread rise", "Yeast ferments sugars and releases carbon dioxide that leavens dough.",
     "Baking soda reacts with acid to produce gas in quick breads."),
    ("how do volcanoes erupt", "Magma pressure from dissolved gases forces molten rock to the surface.",
     "Earthquakes happen when tectonic plates slip along faults."),
    ("how do plants drink water", "Roots absorb water that rises through xylem by transpiration pull.",
     "Leaves capture light energy in chloroplasts during photosynthesis."),
    ("what causes tides", "The moon's gravity pulls ocean water into bulges that cause tides.",
     "Ocean currents are driven by wind and differences in water density."),
    ("how does a compass work", "A magnetised needle aligns with the Earth's magnetic field lines.",
     "Maps use lines of latitude and longitude to locate places."),
    ("why do leaves change colour", "Chlorophyll breaks down in autumn revealing yellow carotenoid pigments.",
     "Evergreen needles keep a waxy coat that limits water loss."),
]


def examples(n: int = 8) -> list[Example]:
    return [Example(query=q, positive=p, negatives=[neg]) for q, p, neg in TOPICS[:n]]


def write_jsonl(path: Path, n: int = 8) -> Path:
    """The same triples as a seed-format JSONL file."""
    path.write_text("".join(json.dumps({"query": q, "positive_document": p, "negative_documents": [neg]}) + "\n"
                            for q, p, neg in TOPICS[:n]))
    return path


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "out"), batch_size=4, grad_accum=1, max_steps=2, precision="32-true",
                  max_query_length=16, max_doc_length=32, lr=1e-4, seed=7, warmup_ratio=0.0)
    values.update(overrides)
    return TrainConfig(**values)


def metrics_rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def write_eval_beir(root: Path) -> Path:
    """A BEIR directory of the same topics (all eight passages, the first four queries) for evaluation during runs."""
    from spladectl.data import write_beir

    return write_beir(root, {f"d{i}": p for i, (_, p, _) in enumerate(TOPICS)},
                      {f"q{i}": q for i, (q, _, _) in enumerate(TOPICS[:4])},
                      {"test": {f"q{i}": {f"d{i}": 1} for i in range(4)}})
