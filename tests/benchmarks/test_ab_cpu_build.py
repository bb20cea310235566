"""cpu-build-ab loads another build of the CPU extension beside this one and times both on the same plans."""

import json
import shutil

from benchmarks import ab_cpu_build
from codequant.kernels import cpu as cpu_kernels


def test_a_copy_of_this_build_gives_the_same_outputs(tmp_path):
    baseline = tmp_path / "copy" / "_lut.so"
    baseline.parent.mkdir()
    shutil.copy(cpu_kernels._lut.__file__, baseline)  # its own file: loaded as a second module with its own state
    out = tmp_path / "ab.json"
    isa = cpu_kernels.isa()
    ab_cpu_build.main(["--baseline", str(baseline), "--baseline-rev", "copy", "--isas", isa, "--acts", "w4a16,w4a4-g32",
                       "--shapes", "40x256", "--ms", "1,3", "--modes", "hot", "--rounds", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["baseline_rev"] == "copy"
    assert [(r["act"], r["m"]) for r in result["records"]] == [("w4a16", 1), ("w4a16", 3), ("w4a4-g32", 1), ("w4a4-g32", 3)]
    assert all(r["same_output"] and r["baseline_us"] > 0 and r["this_us"] > 0 for r in result["records"])
    assert cpu_kernels._lut.__name__ == "codequant.kernels.cpu._lut" and cpu_kernels.isa() == isa  # this build restored
