#!/usr/bin/env python3
"""Write prometheusrule.yaml: deploy/monitoring/prometheus/alerts.yml as a prometheus-operator
PrometheusRule. Run it after changing the alert rules (tests/deploy fails until they agree):

    .venv/bin/python deploy/kubernetes/monitoring/render-prometheusrule.py [OUT]

OUT defaults to prometheusrule.yaml beside this script.
"""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[1] / "monitoring" / "prometheus" / "alerts.yml"
HEADER = """\
# Generated from deploy/monitoring/prometheus/alerts.yml by render-prometheusrule.py in this
# directory: edit the alert rules there, then run it. prometheus-operator loads the rules of
# every PrometheusRule its Prometheus' ruleSelector matches (kube-prometheus-stack's default
# asks for the label release: <its Helm release>; add it in your overlay if yours does).
"""


def block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def main() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "npuserve",
                     "labels": {"app.kubernetes.io/name": "npuserve"}},
        "spec": {"groups": groups},
    }
    yaml.add_representer(str, block_strings, Dumper=yaml.SafeDumper)
    text = yaml.safe_dump(rule, sort_keys=False, allow_unicode=True, width=100)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "prometheusrule.yaml"
    out.write_text(HEADER + text)


if __name__ == "__main__":
    main()
