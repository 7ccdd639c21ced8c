"""The one Markdown table writer (megl.tables) and the tables built with it."""
from __future__ import annotations

from megl.tables import markdown_table


def test_markdown_table_rows_rule_and_alignment():
    assert markdown_table(["a", "b"], [[1, None], ["x", 2.5]]) == "| a | b |\n|---|---|\n| 1 | None |\n| x | 2.5 |"
    assert markdown_table(["n", "s"], [], right=(1,)).splitlines()[1] == "|---|---:|"


def test_decoy_mnist_table_keeps_the_chosen_columns_in_order():
    from megl import decoy_mnist as dm

    rows = [{"test": 0.5, "train": 0.9, "val": 0.6, "val_clean": 0.55, "test_clean": 0.52, "miou": 0.25,
             "corner_share": 0.1, "epoch_seconds": 2.0, "held_out_clean": 0.5712}]
    md = dm.table_markdown({"baseline": rows, "rrr": []}, "mlp", 1.0, "T", dm.VAL_ONLY)
    lines = md.splitlines()
    assert lines[0] == "**T**" and lines[2] == "| " + " | ".join(dm.VAL_ONLY) + " |"
    assert lines[3] == "|---|---|---|---|---|---|"
    # the held-out column has two decimals (its digits separate settings a tenth of a point apart)
    assert lines[4] == "| plain (CE) | 90.0 | 60.0 | 55.0 | 57.12 | 2.00× |" and len(lines) == 5  # rrr: no row
    del rows[0]["held_out_clean"]  # the mlp's tables have no held-out digits
    assert "| plain (CE) | 90.0 | 60.0 | 55.0 | n/a | 2.00× |" in dm.table_markdown({"baseline": rows}, "mlp", 1.0,
                                                                                   "T", dm.VAL_ONLY)
