"""Put the latest ``perf_*`` result tables into ``benchmarks/README.md`` (between its markers).

    python benchmarks/perf_tables.py

Reads the markdown files the benchmarks wrote under ``benchmarks/results/`` (GPU first, then CPU;
layer, training step, generation) and replaces the block between ``<!-- perf-tables:start -->``
and ``<!-- perf-tables:end -->``. Profiles are linked, not inlined.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- perf-tables:start -->", "<!-- perf-tables:end -->"
ORDER = ("lora_layer", "train_step", "generate")


def _key(path: Path) -> tuple[int, int, str]:
    device = 0 if "_cuda" in path.stem else 1
    kind = next((i for i, prefix in enumerate(ORDER) if path.stem.startswith(prefix)), len(ORDER))
    return device, kind, path.stem


def tables() -> str:
    parts = []
    for path in sorted(RESULTS.glob("*.md"), key=_key):
        if path.stem.startswith(ORDER):
            body = path.read_text().strip()
            parts.append(body.replace("### ", "#### ", 1) + f"\n\n(raw: `results/{path.stem}.json`)")
    profiles = sorted(RESULTS.glob("profile_*.txt"))
    if profiles:
        parts.append("Profiles (torch.profiler, one step each side): " + ", ".join(f"`results/{p.name}`" for p in profiles))
    return "\n\n".join(parts)


def main() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} lacks the markers {START} / {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n\n{tables()}\n\n{END}{tail}")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
