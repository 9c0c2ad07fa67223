"""Every generated table in README.md is what its command makes of the committed logs: each
section is regenerated into a copy of the README and must leave it unchanged. A table edited by
hand, or logs committed without regenerating the table, fail here."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# section marker -> the command (without the file arguments) that writes it; README.md names
# these commands beside each table
SECTIONS = {
    "demo": ("report", ["results/demo", "--report.targets=0.5,0.6,0.7,0.8,0.9", "--report.plots=0",
                        "--report.readme_runs=0"]),
    "imagenette": ("report", ["results/imagenette", "--report.targets=70,80,82,90", "--report.plots=0",
                              "--report.readme_runs=0"]),
    "check": ("check", ["--check.render=results/check,results/gpu"]),
    "scale": ("scale", ["--scale.render=results/scale/scale.json,results/scale/memory.json,"
                                          "results/scale/memory-batch32.json"]),
}


def regenerate(section: str, readme: Path, out: Path) -> int:
    command, args = SECTIONS[section]
    if command == "report":
        from ffcv_imagenet import report

        return report.main([*args, f"--report.out={out}", f"--report.readme={readme}",
                            f"--report.section={section}"])
    if command == "scale":
        from ffcv_imagenet import scale

        return scale.main([*args, f"--scale.readme={readme}"])
    from ffcv_imagenet import check

    return check.main([*args, f"--check.readme={readme}"])


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_generated_section_matches_the_committed_logs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name the results by relative paths, as in the README
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert f"<!-- report:{section} start -->" in readme.read_text()
    assert regenerate(section, readme, tmp_path / "out") == 0
    assert readme.read_text() == (ROOT / "README.md").read_text(), (
        f"README.md's {section!r} table differs from what its command makes of the committed logs; "
        f"regenerate it ({SECTIONS[section][0]} {' '.join(SECTIONS[section][1])})")
