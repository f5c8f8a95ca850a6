"""Fleet mode: the control plane's jobs run by workers on many machines, scheduled by Temporal.

Words: the *cluster* is a Temporal service (``fleet.address``, ``fleet.namespace`` in
keepwell.yaml); a *site* is a group of machines whose workers poll one *task queue*
(`keepwell.fleet.target.task_queue`); a *run* is one workflow (`keepwell.fleet.workflows`) whose
steps are activities (`keepwell.fleet.activities`): the backup job, its retention, its replica
copy, then the drill that follows it, if any. An activity runs the same job execution the
single-machine daemon runs (`keepwell.control.runner.run_job`, `keepwell.control.backups`) and
records it in the same job history. A source's circuit breaker and the fleet's budgets are
long-running workflows (`keepwell.fleet.breakers`, `keepwell.fleet.budgets`). keepwell's
schedules become Temporal Schedules (`keepwell.fleet.schedules`). This package is the optional
``fleet`` extra: nothing outside it imports ``temporalio``.
"""
