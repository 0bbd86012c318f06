"""Copy a study's results.md (and plots) into BENCHMARKS.md as a section, with how far it has come.

python benchmarks/study_section.py benchmarks/results/smollm2-study study_smollm2 "bash benchmarks/study_smollm2.sh" \
    [benchmarks/study_smollm2_reading.md]

The optional last file is a hand-written reading of the numbers (how the run was done, what they say), placed
under the generated tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, header, write_section  # noqa: E402


def main() -> None:
    from llmdrop.configs import StudyConfig
    from llmdrop.study import report_existing, study_jobs

    folder, name, command = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
    reading = Path(sys.argv[4]).read_text().strip() if len(sys.argv) > 4 else ""
    rows = report_existing(folder)  # results.md and plots from the rows so far, even if the study is still running
    config = json.loads((folder / "study.json").read_text())
    expected = len(study_jobs(StudyConfig.from_dict(config)))
    results = (folder / "results.md").read_text().split("\n", 2)[2]  # drop the title line
    rel = folder.relative_to(ROOT)
    results = results.replace("](similarity.png)", f"]({rel}/similarity.png)").replace("](quality.png)",
                                                                                        f"]({rel}/quality.png)")
    status = "complete" if len(rows) >= expected else f"in progress: {len(rows)} of {expected} rows so far"
    text = header(f"Study: {config.get('model_name', config.get('model'))} ({status})", command)
    text += f"Rows and plots: `{rel}/`.\n\n" + results
    if reading:
        text = text.rstrip() + "\n\n" + reading + "\n"
    write_section(name, text)


if __name__ == "__main__":
    main()
