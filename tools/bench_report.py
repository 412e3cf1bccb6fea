"""The markdown report of `tools.benchmark`'s results (the JSON it writes holds every figure too)."""

from tools import bench_anchors

ROW_TITLES = {"unet": "UNet", "decode": "VAE decode", "encode": "VAE encode", "text": "text encoder"}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def rows_markdown(results: dict) -> list[str]:
    rows, cuda = results["rows"], results["device"].startswith("cuda")
    head = "| measurement | ours (s/call) | diffusers (s/call) | ours / diffusers | same, CPU time | max rel. diff |"
    out = [head + (" CUDA peak ours | CUDA peak diffusers |" if cuda else ""),
           "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "")]
    for r in rows:
        line = (f"| {r['name']} | {r['ours_s']:.4f} | {r['diffusers_s']:.4f} | **{r['ratio']:.2f}** | "
                f"{r['cpu_ratio']:.2f} | {r.get('max_rel_diff', float('nan')):.1e} |")
        if cuda:
            line += f" {gib(r['ours_peak_bytes'])} | {gib(r['diffusers_peak_bytes'])} |"
        out.append(line)
    out.append("(txt2img: the last column is the largest pixel difference / 255 between the two images."
               + (" CUDA peaks include both engines' resident weights and inputs (`resident_bytes`).)" if cuda else ")"))
    for r in rows:
        if "ours_it_s" in r:
            out.append(f"{r['name']}: it/s ours {r['ours_it_s']:.2f}, diffusers {r['diffusers_it_s']:.2f}")
        if r["key"] == "lcm":
            out.append(f"{r['name']}: first call (ours merges the LoRA then) ours {r['ours_first_s']:.1f} s, "
                       f"diffusers {r['diffusers_first_s']:.1f} s")
    c = results["compile"]
    if c["ours"] or c["diffusers"]:
        out.append(f"compiled (mode {c['mode'] or 'Pipeline.compile default'}): ours {c['ours']}, diffusers "
                   f"{c['diffusers']}; first calls, which compile: " + "; ".join(
                       f"{r['key']} ours {r['ours_first_s']:.1f} s, diffusers {r['diffusers_first_s']:.1f} s"
                       for r in rows if "ours_first_s" in r))
    return out + [""]


def load_markdown(rows: list[dict]) -> list[str]:
    out = ["| load | file | raw read (s) | read to new memory (s) | import sd15.pipeline (s) | sd15.load (s) "
           "| load + touch (s) | / raw read | peak RSS | / file |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['file']} -> {r['dtype']} | {r['file_bytes'] / 2**30:.2f} GiB | {r['raw_read_s']:.2f} | "
                   f"{r['fresh_read_s']:.2f} | {r.get('import_s', float('nan')):.2f} | {r['load_s']:.2f} | "
                   f"{r['load_touched_s']:.2f} | "
                   f"**{r['ratio_to_read']:.2f}** | {r['peak_bytes'] / 2**30:.2f} GiB | **{r['peak_to_file']:.2f}** |")
    return out


def flops_markdown(results: dict) -> list[str]:
    f, n = results["flops"], results["flops"]["matmul_size"]
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in f["peak_matmul"].items())
    peak = max(f["peak_matmul"].values())
    out = [f"matmul peak ({n}² x {n}², {results['dtype']}, GFLOP/s): {peaks}", "",
           "| component | counted GFLOP | ours (s) | ours GFLOP/s | % of best peak | diffusers GFLOP/s |",
           "|---|---:|---:|---:|---:|---:|"]
    for key, flops in f["counted"].items():
        row = next((r for r in results["rows"] if r["key"] == key), None)
        if row is None:
            out.append(f"| {ROW_TITLES[key]} | {flops / 1e9:.1f} | | | | |")
            continue
        ours, ref = flops / row["ours_s"], flops / row["diffusers_s"]
        out.append(f"| {ROW_TITLES[key]} | {flops / 1e9:.1f} | {row['ours_s']:.4f} | {ours / 1e9:.0f} | "
                   f"{100 * ours / peak:.0f}% | {ref / 1e9:.0f} |")
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [f"{m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, {m['gpu'] or 'no GPU'}, "
           f"torch {m['torch']}, {m['threads']} threads, THP_MEM_ALLOC_ENABLE {'on' if m['thp_mem_alloc'] else 'off'}, "
           f"freed memory kept {'on' if m.get('keep_freed_memory') else 'off'}; "
           f"{results['device']} {results['dtype']}, {results['size']}x{results['size']}, "
           f"{results['inner']} call(s) per timed sample"]
    if m.get("load_average"):
        out[0] += "; load average (1/5/15 min) at start " + "/".join(f"{x:.1f}" for x in m["load_average"]) + (
            ", at end " + "/".join(f"{x:.1f}" for x in results["load_average_end"]) if "load_average_end" in results else "")
    out.append("")
    if results["rows"]:
        out += rows_markdown(results)
    out += bench_anchors.markdown(results)
    if "load" in results:
        out += load_markdown(results["load"]) + [""]
    if "flops" in results:
        out += flops_markdown(results)
    return "\n".join(out)
