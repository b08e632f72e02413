"""An ``ort-arm`` package served by the same runtime on aarch64 ONNX Runtime, under qemu
(``make arm-env`` builds the emulated Python; CI runs it): plan, run, re-tier, self-test,
outputs equal to the x86 runtime's within 1e-5 relative. Under emulation the plan is checked,
not RSS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgestack.package import Package
from edgestack.runtime import Runtime, plan_memory
from edgestack.targets.emulate import AArch64Emulator

from runtime_helpers import small_model  # noqa: F401 - fixture

SRC = Path(__file__).resolve().parents[2] / "src"

# what the emulated interpreter runs: the runtime at a budget (every layer decoded on the fly,
# documented constants: no calibration probes under emulation), a re-tier down to tier 0 and
# back up to the top tier, the self-test, the outputs of both tiers
SCRIPT = r"""
import json, platform, sys
import numpy as np
from edgestack.runtime import Runtime
pkg, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rt = Runtime(pkg, budget, calibrate=False, materialize=0)
x = rt.package.golden()[0]
plan = rt.plan.to_dict()
rt.infer(x)
rt.retier(2**30, tier=0)                                   # shrink
low = rt.infer(x)
res = rt.retier(2**30, tier=len(rt.package.tiers) - 1)     # grow: reads the new blocks
top = rt.infer(x)
test = rt.self_test()
rt.close()
from edgestack.cli.verify import verify_package   # what `edgestack verify PKG` runs
verified = verify_package(pkg)
np.savez(out, **{f"low.{k}": v for k, v in low.items()}, **{f"top.{k}": v for k, v in top.items()})
print(json.dumps({"machine": platform.machine(), "tier": plan["tier"], "total": plan["total"],
                  "new_tier": res.new_tier, "self_test": test["passed"],
                  "verified": verified["ok"] and verified["hashes"] == "ok",
                  "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules}))
"""


@pytest.fixture(scope="module")
def arm_pkg(tmp_path_factory, small_model):  # noqa: F811 - the fixture above
    from edgestack.packer.pack import pack

    out = tmp_path_factory.mktemp("arm_pkg") / "mlp.pkg"
    pack(small_model[0], out, target="ort-arm")
    return out


def test_ort_arm_package_plans_runs_retiers_under_qemu(arm_pkg, tmp_path):
    emu = AArch64Emulator.find()
    pkg = Package.open(arm_pkg)
    assert pkg.manifest.target == "ort-arm"
    top = len(pkg.tiers) - 1
    # the budget of tier 0's on-the-fly plan + 1 MiB, planned with the documented constants
    low_plan = plan_memory(pkg, None, tier=0, materialize=0)
    budget = low_plan.total + 2**20
    expected = plan_memory(pkg, budget, materialize=0)
    out = tmp_path / "arm.npz"
    proc = emu.run_python(SCRIPT, [str(arm_pkg), str(budget), str(out)], timeout=600,
                          check=True, env={"PYTHONPATH": f"{emu.site_packages}:{SRC}"})
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["machine"] == "aarch64" and not got["torch"] and not got["onnx"]
    # the same plan as on x86: the planner is pure Python over the manifest
    assert (got["tier"], got["total"]) == (expected.tier, expected.total)
    assert got["new_tier"] == top and got["self_test"] is True and got["verified"]
    # the same outputs as the x86 runtime at both tiers (and the tiers differ)
    with np.load(out) as npz:
        arm = {k: npz[k] for k in npz.files}
    assert any(not np.allclose(arm[f"low.{n}"], arm[f"top.{n}"]) for n in pkg.golden()[1])
    x = pkg.golden()[0]
    with Runtime(arm_pkg, budget, calibrate=False, materialize=0) as rt:
        assert rt.tier == expected.tier
        rt.retier(2**30, tier=0)
        ref = {f"low.{k}": v for k, v in rt.infer(x).items()}
        rt.retier(2**30, tier=top)
        ref.update({f"top.{k}": v for k, v in rt.infer(x).items()})
    assert set(arm) == set(ref)
    for name, value in ref.items():
        peak = float(np.abs(value).max())
        assert float(np.abs(arm[name] - value).max()) <= 1e-5 * peak, name
