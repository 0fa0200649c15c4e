"""Identity and knob response of the two real checkpoints after NV conversion.

Regenerates the "Identity of converted pretrained models" section of docs/RESULTS.md (tables via
docs/results/identity*.csv) and the plot docs/figures/identity_knobs.png:

    .venv/bin/python experiments/identity.py            # about 2 minutes on 2 CPU cores

Data and measurements: the docstring of ``nvformer_studies.identity``.
"""

from __future__ import annotations

from pathlib import Path

from nvformer_studies.common.docs import write_section
from nvformer_studies.common.scripts import script_parser
from nvformer_studies.identity import measure_checkpoints, plot, section

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, ROOT).parse_args(argv)
    results = Path(args.results)
    rows = measure_checkpoints()
    fig = plot(rows, ROOT / "docs" / "figures" / "identity_knobs.png")
    write_section(section(rows, str(fig.relative_to(ROOT)), results.parent / "results"), "identity", results)
    print(f"wrote {args.results} and {fig}")


if __name__ == "__main__":
    main()
