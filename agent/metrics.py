"""Prometheus metrics, read from the state database at scrape time.

The database is the record (CLI and daemon both write it), so the figures survive restarts and
count what a CLI did while the daemon was down. Counters are kept as events are written (not
counted from the events, which are pruned), so a scrape costs the same whatever the history.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.state import COUNTED

if TYPE_CHECKING:
    from agent.host import Host



class StateCollector(Collector):
    def __init__(self, host: Callable[[], Host]) -> None:
        self._host = host

    def collect(self) -> Iterator[Metric]:
        state = self._host().state
        vms = GaugeMetricFamily("hvagent_vms", "VMs by state, image version and track",
                                labels=["state", "image", "version", "track"])
        for (st, image, version, track), n in sorted(Counter(
                (v.state.value, v.image, v.version, v.track) for v in state.vms()).items()):
            vms.add_metric([st, image, version, track], n)
        yield vms

        counts = state.event_counts(COUNTED)
        swaps = CounterMetricFamily("hvagent_swaps", "swaps by outcome", labels=["outcome"])
        swaps.add_metric(["done"], counts["swap.done"])
        swaps.add_metric(["failed"], counts["swap.failed"])
        yield swaps
        rollbacks = CounterMetricFamily("hvagent_rollbacks", "rollbacks by outcome", labels=["outcome"])
        rollbacks.add_metric(["done"], counts["rollback.done"])
        rollbacks.add_metric(["failed"], counts["rollback.failed"])
        yield rollbacks
        repairs = CounterMetricFamily("hvagent_repairs", "reconcile repairs", labels=["kind"])
        repairs.add_metric(["restarted"], counts["vm.restarted"])
        repairs.add_metric(["recreated"], counts["vm.recreated"])
        yield repairs

        bounds, count, total = state.downtime_histogram()
        buckets = [(str(b), n) for b, n in bounds]
        buckets.append(("+Inf", count))
        yield HistogramMetricFamily("hvagent_swap_downtime_seconds", "SSH-unreachable window of each swap",
                                    buckets=buckets, sum_value=total)

        rollouts = GaugeMetricFamily("hvagent_rollouts", "rollouts by family, target and state",
                                     labels=["family", "target", "state"])
        for (fam, target, st), n in sorted(Counter(
                (r.family_ref, r.target, r.state.value) for r in state.rollouts()).items()):
            rollouts.add_metric([fam, target, st], n)
        yield rollouts
