"""Parses an OpenMetrics text exposition (stdin) with the official Prometheus Python client and
prints its samples as JSON lines: [name, labels, value]. Fails on anything the parser refuses."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps([sample.name, sample.labels, sample.value]))
