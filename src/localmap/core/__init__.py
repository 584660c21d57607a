"""The region core: what every path (eager DTensor calls, compiled calls, traced regions) computes the same way
for one call -- its gradient placements, its refusals, its plan. Each rule is defined here once and the paths
call it."""
