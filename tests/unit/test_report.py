from __future__ import annotations

import json

from timmserve.bench.report import write_results


def test_write_results_writes_the_json_only_so_the_report_is_rendered_once(tmp_path):
    path = write_results({"runs": []}, tmp_path / "out")
    assert path == tmp_path / "out" / "results.json" and json.loads(path.read_text()) == {"runs": []}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # `render` writes the rest
