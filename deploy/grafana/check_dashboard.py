"""Checks the Grafana dashboard against the series the server exports.

Usage: python3 check_dashboard.py confab-dashboard.json

The dashboard must be valid JSON that Grafana can import, every query must go
to the templated Prometheus data source, and every confab_* series a query
names must be one the server exports (METRICS below, with its labels): a
renamed metric or label shows up here rather than as an empty panel. Every
exported series must appear on the dashboard too. Standard library only.
"""

import json
import pathlib
import re
import sys

# The server's series and their labels come from the metrics table of
# docs/configuration.md, which a Rust test (tests/it/process.rs,
# every_metric_is_documented) keeps equal to what the server registers.
# Histograms are used as <name>_bucket/_sum/_count.
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented_metrics():
    metrics, histograms = {}, set()
    for line in DOCS.read_text().splitlines():
        m = re.match(r"\| `((?:confab|process)_[a-z0-9_]+)` \| (\w+) \| ([^|]*)\|", line)
        if not m:
            continue
        name, kind, labels = m.groups()
        # Label names are the backticked words outside parentheses.
        outside = re.sub(r"\([^)]*\)", "", labels)
        metrics[name] = set(re.findall(r"`([a-z_]+)`", outside))
        if kind == "histogram":
            histograms.add(name)
    return metrics, histograms


METRICS, HISTOGRAMS = documented_metrics()
# Labels Prometheus adds when it scrapes (and le of histogram buckets).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint"}
DATASOURCE = "${DS_PROMETHEUS}"

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"  FAIL {what}")


def series(expr):
    """(metric, histogram suffix) for every confab_* and process_* name in a query."""
    out = []
    for name in re.findall(r"\b((?:confab|process)_[a-z0-9_]+)", expr):
        base, suffix = name, ""
        for s in ("_bucket", "_sum", "_count"):
            if name.endswith(s) and name[: -len(s)] in HISTOGRAMS:
                base, suffix = name[: -len(s)], s
        out.append((base, suffix))
    return out


def main(path):
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    check(isinstance(dash.get("title"), str) and dash["title"], "a title")
    check(isinstance(dash.get("uid"), str) and 0 < len(dash["uid"]) <= 40, "a uid of at most 40 characters")
    check(isinstance(dash.get("schemaVersion"), int), "a schemaVersion")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS", {})
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus", "DS_PROMETHEUS is a Prometheus data source variable")

    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    ids = [p["id"] for p in panels]
    check(len(ids) == len(set(ids)), "panel ids are unique")
    used = set()
    queries = 0
    for p in panels:
        where = f"panel {p.get('title')!r}"
        g = p.get("gridPos", {})
        check(all(isinstance(g.get(k), int) for k in "hwxy") and g["x"] + g["w"] <= 24, f"{where}: gridPos {g}")
        if p["type"] == "row":
            continue
        check(p.get("datasource", {}).get("uid") == DATASOURCE, f"{where}: data source {p.get('datasource')}")
        check(bool(p.get("targets")), f"{where}: has queries")
        for t in p.get("targets", []):
            queries += 1
            expr = t["expr"]
            check(t.get("datasource", {}).get("uid") == DATASOURCE, f"{where}: query data source")
            check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: brackets in {expr}")
            found = series(expr)
            check(bool(found), f"{where}: no confab_ or process_ series in {expr}")
            labels = set(TARGET_LABELS)
            for base, suffix in found:
                check(base in METRICS, f"{where}: unknown series {base}{suffix}")
                check(base not in HISTOGRAMS or suffix, f"{where}: histogram {base} used without _bucket/_sum/_count")
                labels |= METRICS.get(base, set())
                if suffix == "_bucket":
                    labels.add("le")
                used.add(base)
            if "histogram_quantile" in expr:
                check(all(s == "_bucket" for _, s in found) and "le" in expr, f"{where}: histogram_quantile over buckets by le")
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
                for label in filter(None, (x.strip() for x in group.split(","))):
                    check(label in labels, f"{where}: label {label!r} is not a label of {[b for b, _ in found]}")
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                check(label in labels, f"{where}: legend label {label!r}")
    # Every confab_ series is on the dashboard; of the standard process_
    # ones, those worth a panel.
    confab = {m for m in METRICS if m.startswith("confab_")}
    missing = sorted(confab - used)
    check(not missing, f"series not on the dashboard: {missing}")
    print(f"dashboard: {len(panels)} panels, {queries} queries, {len(used & confab)} of {len(confab)} confab_ series, "
          f"{len({u for u in used if u.startswith('process_')})} process_ series")
    print(f"{len(failures)} failed" if failures else "all dashboard checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
