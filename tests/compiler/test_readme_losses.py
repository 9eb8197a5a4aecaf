"""The README's loss table says, for every loss of dpoc.contract.losses, what it needs and which target runs it."""

from __future__ import annotations

from dpoc.contract import losses
from tests.conftest import REPO


def test_the_readme_table_lists_every_loss_as_the_contract_does():
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6 and cells[1] in ("yes", "no"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(losses.NAMES)
    for loss in losses.LOSSES:
        name, reference, data, params, targets, trl = rows[loss.name]
        assert reference == ("yes" if loss.reference else "no"), name
        assert data == ("unpaired" if loss.unpaired else "paired"), name
        assert all(f"`dpo.{p}`" in params for p in loss.params), name
        assert ("mindspeed-rl" in targets) == loss.mindspeed and trl == loss.trl, name
