"""The synthetic town: WOMD-format scenarios generated from a seed.

Real ``Scenario`` protos (any WOMD tool reads them unchanged) of a procedurally built town:
multi-lane two-way roads, signalised and stop-controlled intersections, crosswalks, speed
bumps and driveways, with vehicles, cyclists and pedestrians driven by a traffic model.
"""

from closedloop.data.synthetic.generate import (
    TOWNS,
    generate_dataset,
    generate_scenario,
    generate_scenarios,
)

__all__ = ["TOWNS", "generate_dataset", "generate_scenario", "generate_scenarios"]
