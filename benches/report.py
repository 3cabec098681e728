#!/usr/bin/env python3
"""Turns `confab load --json` reports into the Markdown tables of
docs/benchmarks.md and, if matplotlib is installed, a plot.

    python3 benches/report.py docs/benchmarks/fanout.json ...      # tables
    python3 benches/report.py --plot docs/benchmarks/forwarding.png \\
        docs/benchmarks/fanout.json docs/benchmarks/fanout-6mbps-sampled.json

Only the standard library is needed for the tables.
"""

import json
import sys


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:  # NaN
        return "-"
    return f"{x:.{digits}f}"


def spread(s, digits=1):
    """median (min-max)"""
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def table(report):
    lines = []
    sampled = report.get("decrypt_every", 1) > 1
    head = (
        "| members | streams | delivered pkt/s | Mbit/s | loss % | reorder % "
        "| delay p50 / p99 / p99.9 ms | server µs/pkt (min–max) | pkt/s per core "
        "| % of ceiling | server CPU % | generator CPU % | join p50 / max ms "
        "| RSS MiB | RSS/member KiB | knee ok |"
    )
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    for s in report["steps"]:
        lines.append(
            "| {m} | {st} | {dp} | {mb} | {loss} | {ro} | {p50} / {p99} / {p999} | {us} | {pps} | {ceil} | {scpu} | {gcpu} | {j50} / {jmax} | {rss} | {rpm} | {ok} |".format(
                m=s["participants"],
                st=s["streams"],
                dp=fmt(s["delivered_pps"]["median"], 0),
                mb=fmt(s["delivered_mbps"]["median"], 1),
                loss=fmt(s["loss_pct"]["median"], 3),
                ro=fmt(s["reorder_pct"]["median"], 3),
                p50=fmt(s["p50_ms"]["median"], 2),
                p99=fmt(s["p99_ms"]["median"], 2),
                p999=fmt(s["p999_ms"]["median"], 2),
                us=spread(s["server_us_per_packet"], 2),
                pps=fmt(s["forwarded_pps_per_core"]["median"], 0),
                ceil=fmt(s.get("ceiling_pct"), 0),
                scpu=fmt(s["server_cpu_pct"]["median"], 0),
                gcpu=fmt(s["generator_cpu_pct"]["median"], 0),
                j50=fmt(s["join_ms_p50"], 0),
                jmax=fmt(s["join_ms_max"], 0),
                rss=fmt(s["server_rss_mib"], 0),
                rpm=fmt(s["rss_per_participant_kib"], 0),
                ok="yes" if s["ok"] else "no",
            )
        )
    knee = report.get("knee")
    if report["scenario"] == "audio":
        media = "{} audio-only speakers".format(report["steps"][0]["publishers"] if report["steps"] else "?")
    else:
        media = "video {} kbit/s{}".format(report["bitrate_kbps"], " + audio" if report["audio"] else "")
    title = "{} — {}, SRTP {}, {} s windows × {}{}".format(
        report["scenario"],
        media,
        report["srtp"],
        report["duration_secs"],
        len(report["steps"][0]["windows"]) if report["steps"] else 0,
        f", receivers decrypt every {report['decrypt_every']}th packet" if sampled else "",
    )
    return title, "\n".join(lines), knee


def plot(path, reports):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ceiling = None
    for name, r in reports:
        x = [sum(w["server_forwarded_pps"] for w in s["windows"]) / len(s["windows"])
             for s in r["steps"]]
        med = [s["forwarded_pps_per_core"]["median"] / 1000 for s in r["steps"]]
        low = [m - 1e3 / s["server_us_per_packet"]["max"] for m, s in zip(med, r["steps"])]
        high = [1e3 / s["server_us_per_packet"]["min"] - m for m, s in zip(med, r["steps"])]
        y = med
        err = [[max(v, 0) for v in low], [max(v, 0) for v in high]]
        style = "--" if name.startswith("janus") else "-"
        ax.errorbar([v / 1000 for v in x], y, yerr=err, marker="o", capsize=3, label=name,
                    linestyle=style)
        ceiling = ceiling or r.get("ceiling")
    if ceiling:
        c = 1e6 / (1e6 / ceiling["sendto_pps"] + ceiling["srtp_gcm_us"]) / 1000
        ax.axhline(c, linestyle="--", color="grey", label=f"ceiling: sendto + GCM ({c:.0f}k)")
    ax.axhline(100, linestyle=":", color="red", label="targets 100k, 200k")
    ax.axhline(200, linestyle=":", color="red")
    ax.set_xlabel("forwarded packets/s (thousands): Confab's counter; for Janus, received")
    ax.set_ylabel("forwarded packets/s per core (thousands)")
    ax.set_title("Forwarded packets/s per core of server CPU (2 vCPU, loopback; dashed: Janus)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    plot_path = None
    if len(argv) > 1 and argv[0] == "--plot":
        plot_path, argv = argv[1], argv[2:]
    reports = []
    for path in argv:
        with open(path) as f:
            r = json.load(f)
        reports.append((path.rsplit("/", 1)[-1].removesuffix(".json"), r))
    if plot_path:
        plot(plot_path, reports)
        return
    for name, r in reports:
        title, body, knee = table(r)
        print(f"#### {name}: {title}\n")
        print(body)
        print(f"\nKnee: {knee} members.\n" if knee else "\nKnee: none.\n")


if __name__ == "__main__":
    main(sys.argv[1:])
