"""bench/calibration_scale.py at its smallest: one process and two gloo processes; the bytes it says went
into collectives are exactly the statistics, the factors and the scores, each rank took its share of windows
and kept its share of the statistics."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_calibration_scale_counts_the_bytes_of_the_statistics_and_the_factors(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "python")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "calibration_scale.py"), "--preset", "tiny",
                           "--samples", "4", "--seq-len", "16", "--procs", "1", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = [json.loads(line) for line in out.read_text().splitlines()]
    assert (one["world_size"], two["world_size"]) == (1, 2) and two["backend"] == "gloo"
    assert [r["windows"] for r in one["ranks"]] == [4] and [r["windows"] for r in two["ranks"]] == [2, 2]

    # preset tiny: hidden 64, MLP 160, 2 blocks, 4 heads = 4 KV heads; q k v o: 64 x 64, gate up: 160 x 64, down: 64 x 160
    shapes = [(64, 64)] * 4 + [(160, 64)] * 2 + [(64, 160)]
    covariances = 2 * (3 * 64 * 64 + 160 * 160) * 8  # float64, input groups q/k/v, o, gate/up, down
    gradients = 2 * sum(m * n for m, n in shapes) * 4  # float32
    factors = 2 * sum((m + 1 + n) * min(m, n) for m, n in shapes) * 4  # U, sigma, Z in float32
    whitening = 2 * (3 * 64 * 64 + 160 * 160) * 4  # S per input group, float32
    scores = 2 * sum(2 * min(m, n) for m, n in shapes) * 8  # scores and singular values, float64
    for rank in two["ranks"]:
        stages = rank["stages"]
        # plus float64 scalars: the token count of each of the 8 input groups, and the loss
        assert stages["calibration_pass"]["comm_bytes"] == covariances + gradients + 8 * (8 + 1)
        assert stages["whitening"]["comm_bytes"] == 0
        assert all(s["wall_s"] > 0 and s["cpu_s"] >= 0 for s in stages.values())
        # reduced to the owners: each rank keeps a share, each statistic is kept once
        assert rank["stat_bytes_during_pass"] == covariances + gradients
        assert rank["grad_bytes_during_pass"] == gradients  # batch order: every partial sum until the pass ends
        assert 0 < rank["stat_bytes_kept"] < covariances + gradients
    assert sum(r["stat_bytes_kept"] for r in two["ranks"]) == covariances + gradients
    # Rank 0 packs: it holds every factor and S, and sends none; rank 1 holds and sends its own only.
    first, second = two["ranks"]
    assert (first["factor_bytes_held"], first["whitening_bytes_held"]) == (factors, whitening)
    assert first["stages"]["decomposition"]["comm_bytes"] == 0
    sent = second["stages"]["decomposition"]["comm_bytes"]
    assert sent == second["factor_bytes_held"] + second["whitening_bytes_held"]
    assert 0 < second["factor_bytes_held"] < factors
    assert sum(r["stages"]["scores"]["comm_bytes"] for r in two["ranks"]) == scores  # each owner shares its own
    # The curvature pass sums its terms (float64, one per component) and the loss, no gradient; rank 0 sends
    # every rank the bases U (float32) the pass projects on.
    curvature = 2 * sum(min(m, n) for m, n in shapes) * 8 + 8
    bases = 2 * sum(m * min(m, n) for m, n in shapes) * 4
    assert (first["stages"]["curvature"]["comm_bytes"], second["stages"]["curvature"]["comm_bytes"]) == (
        curvature + bases, curvature)
    assert all(s["comm_bytes"] == 0 for s in one["ranks"][0]["stages"].values())  # nothing to communicate
    assert one["ranks"][0]["stat_bytes_kept"] == covariances + gradients
    assert all(r["peak_rss_bytes"] > 0 for r in one["ranks"] + two["ranks"])
    assert "| 2 |" in proc.stdout and "efficiency, CPU" in proc.stdout and "statistics kept MB" in proc.stdout
