"""The shipped model card: in the sections of Mitchell et al. (2019), short,
and exactly what scripts/ship_weights.py writes from model_card.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from support.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "bridge" / "weights" / "MODEL_CARD.md"
RECORD = ROOT / "bridge" / "weights" / "model_card.json"
SECTIONS = [
    "Model details",
    "Intended use",
    "Factors",
    "Training data",
    "Evaluation data and metrics",
    "Where it fails: accuracy by nucleus area",
    "Ethical considerations",
    "Limitations and recommendations",
]


def test_the_committed_card_is_what_ship_weights_writes_from_the_record():
    ship = load_script("ship_weights")
    record = json.loads(RECORD.read_text())
    from bridge.model.weights import default_weights_path, load_model

    arch = load_model(default_weights_path())[1].arch
    card = {k: v for k, v in record.items() if v is not None}
    text = ship.render_card(card, arch, ship._n_train(record["train_split"]), ship.CANDIDATES.read_text())
    assert CARD.read_text() == text, "run: python scripts/ship_weights.py --card-only"


def test_the_card_has_the_standard_sections_and_the_recorded_numbers():
    text = CARD.read_text()
    assert len(text.splitlines()) <= 150
    record = json.loads(RECORD.read_text())
    # the measured result of adapting, when the record holds one, goes between the failures and the ethics
    adapting = ["Adapting it to a lab's outlines"] if record.get("adapting") else []
    assert re.findall(r"(?m)^## (.+)$", text) == SECTIONS[:6] + adapting + SECTIONS[6:]
    for row in (record.get("adapting") or {}).get("rows", []):
        assert (
            f"| {row['dataset']} {row['split']} | {row['shipped']['aji']:.4f} | {row['adapted']['aji']:.4f} |" in text
        )
    assert f"version `{record['version']}`" in text.splitlines()[0]
    for name, m in record["validation_jitter5_seed0"].items():
        assert f"| {name} | {m['images']} | {m['nuclei']} | {m['aji']:.4f} |" in text
    for name, bins in record["validation_by_nucleus_area"].items():
        assert sum(f"| {name} | {b['lo']:.0f}-" in text for b in bins if b["count"]) == sum(
            b["count"] > 0 for b in bins
        )
    assert "non-commercial use only" in text and "`nuclick-bridge adapt`" in text
    for link in re.findall(r"\]\((\.\./\.\./docs/[^)#]+)", text):
        assert (CARD.parent / link).resolve().is_file(), link
