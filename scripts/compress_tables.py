"""Rewrite the cross-model result tables of docs/compress.md §4 from the committed
compression-bench results (docs/compress/<model>/summary.json, written by `moelab compress-bench`).

    .venv/bin/python scripts/compress_tables.py

The tables sit between the `<!-- results:begin -->` and `<!-- results:end -->` markers: one row per
method, one column per bench, each cell the perplexity increase overall / on the worst domain,
rows ordered by the first bench's overall increase.
"""

from __future__ import annotations

from compress_claims import DOCS, load

PAGE = DOCS.parent / "compress.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def table(benches: dict[str, dict], ratio: int) -> list[str]:
    """Markdown lines of the table for `ratio` % removed (the plain and `+fit` cells)."""
    methods = {
        name.rsplit("-", 1)[0]
        for bench in benches.values()
        for name in bench["cells"]
        if name.endswith(f"-{ratio}") and "@" not in name  # domain cells: each report has their table
    }
    first = next(iter(benches.values()))

    def order(method: str) -> tuple[float, str]:
        cell = first["cells"].get(f"{method}-{ratio}")
        return (cell["derived"]["change"] if cell else float("inf"), method)

    lines = [
        f"**{ratio} % removed** (perplexity increase overall / on the worst domain; · not run)",
        "",
        "| method | " + " | ".join(benches) + " |",
        "|---|" + "---|" * len(benches),
    ]
    for method in sorted(methods, key=order):
        cells = []
        for bench in benches.values():
            cell = bench["cells"].get(f"{method}-{ratio}")
            derived = cell and cell["derived"]
            cells.append("·" if not cell else f"{derived['change']:+.1%} / {derived['worst_change']:+.1%}")
        name = f"**{method}**" if method.startswith("moelab") else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    benches = load()
    order = ["ref-8e-top2", "ref-32e-top4-shared", "ref-8e-top2-mixtral", "ref-32e-top4-shared-qwen2_moe"]
    benches = {name: benches[name] for name in order if name in benches} | benches
    lines = [BEGIN, ""]
    for ratio in (25, 50):
        lines += [*table(benches, ratio), ""]
    lines.append(END)
    page = PAGE.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE} has no {BEGIN} ... {END} markers to write the tables between")
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    PAGE.write_text(head + "\n".join(lines) + tail)
    print(f"wrote the tables of {PAGE}")


if __name__ == "__main__":
    main()
