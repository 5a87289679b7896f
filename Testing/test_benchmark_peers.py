"""The peers benchmark (BrainUNet vs nnU-Net v2 vs MONAI SegResNet) runs end to end in its smoke mode."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# the bench extra (make setup installs it): missing, these must fail, not skip
import monai  # noqa: E402,F401
import nnunetv2  # noqa: E402,F401
import psutil  # noqa: E402,F401

pytestmark = pytest.mark.bench
CONTENDERS = ("brainunet", "nnunet_1fold", "monai_whole", "monai_windows")


def test_peers_smoke_reports_every_contender(tmp_path):
    env = dict(os.environ)
    env.pop("BRAINUNET_MODEL", None)  # conftest picks the baseline for the CLI tests; benchmark the bundled model
    # Its own nnU-Net cache: the test plans from scratch, as on a fresh machine, and leaves ~/.cache alone.
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--smoke", "--output", str(tmp_path),
                        "--nnunet-cache", str(tmp_path / "nnunet")],
                       capture_output=True, text=True, encoding="utf-8", env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    report = json.loads((tmp_path / "peers.json").read_text())
    contenders = report["contenders"]
    for key in CONTENDERS:
        assert key in contenders, f"no row for {key}"
        assert contenders[key]["wall_s"] > 0 and contenders[key]["peak_rss_gb"] > 0
        assert len(contenders[key]["runs"]) == 1  # smoke: every contender once
    assert contenders["nnunet_5folds"]["extrapolated_from"]  # 5 folds are only extrapolated in smoke mode
    assert "nnunet_1fold_mirroring" not in contenders
    assert report["nnunet_model"]["parameters"] > 0 and len(report["nnunet_model"]["patch_size"]) == 3
    assert round(contenders["monai_whole"]["parameters"] / 1e6, 1) == 4.7  # the MONAI BraTS bundle's SegResNet
    table = (tmp_path / "peers.md").read_text()
    assert "ratio to BrainUNet" in table and "nnU-Net v2" in table and "MONAI SegResNet" in table
