"""What ``crosscheck bench`` prints and plots: the per-shape table, the breakdown, the latency plot."""

from __future__ import annotations

from crosscheck.porting.outputs import atomic_write


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_table(rows: list[dict], tokens: int) -> None:
    shape_rows = [r for r in rows if r["tokens"] == tokens]
    torch_ok = [r for r in shape_rows if r["framework"] == "torch" and r["median_s"] is not None]
    fastest = min(torch_ok, key=lambda r: r["median_s"]) if torch_ok else None
    by_name = {r["impl"]: r for r in shape_rows}
    head = (
        f"{'impl':<22}{'median':>11}{'vs fastest torch':>18}{'vs sdpa':>9}{'vs book':>9}{'compile':>10}{'memory':>14}"
    )
    print(head)
    for r in shape_rows:
        if r["median_s"] is None:
            print(f"{r['impl']:<22}{r['status']}")
            continue

        def ratio(ref, r=r):
            return f"{ref['median_s'] / r['median_s']:.2f}x" if ref and ref["median_s"] else "-"

        mem = r.get("memory_rss") or r.get("memory") or {}
        mem_bytes = mem.get("max_rss_bytes", mem.get("total_bytes"))
        compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.2f}s"
        print(
            f"{r['impl']:<22}{r['median_s'] * 1e3:>9.1f}ms{ratio(fastest):>18}{ratio(by_name.get('torch-sdpa')):>9}"
            f"{ratio(by_name.get('torch-book')):>9}{compile_s:>10}{_fmt_bytes(mem_bytes):>14}"
        )
    diffs = {r["impl"]: r.get("max_abs_diff_vs_reference") for r in shape_rows}
    print(
        "max |out - torch-book| (or the first impl): "
        + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items() if v is not None)
    )
    if fastest:
        print(f"(ratios = reference median / impl median; fastest torch: {fastest['impl']})")


def print_breakdown(pieces: list[dict], tokens: int) -> None:
    median = {r["impl"]: r["median_s"] for r in pieces if r["tokens"] == tokens}
    print(f"\n-- breakdown at tokens={tokens}: the pieces alone, same inputs, own round-robin --")
    print(f"{'piece':<16}{'jax':>11}{'torch':>11}{'jax speed vs torch':>20}")
    for piece in ("projection", "attention-core"):
        jax_s, torch_s = median[f"jax-{piece}"], median[f"torch-{piece}"]
        print(f"{piece:<16}{jax_s * 1e3:>9.1f}ms{torch_s * 1e3:>9.1f}ms{torch_s / jax_s:>19.2f}x")
    total = {fw: 4 * median[f"{fw}-projection"] + median[f"{fw}-attention-core"] for fw in ("jax", "torch")}
    print(
        f"4 x projection + core: jax {total['jax'] * 1e3:.1f}ms, torch {total['torch'] * 1e3:.1f}ms "
        "(one MHA forward is these plus the head split/merge and out_proj's bias)"
    )


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["tokens"], r["median_s"]) for r in rows if r["impl"] == impl and r["median_s"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("forward latency, median (s)")
    ax.set_title("multi-head causal attention, forward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), what="plot")
    finally:
        plt.close(fig)
