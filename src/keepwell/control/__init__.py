"""The control plane: when, how much and who.

It turns `keepwell.yaml` (`config`) into job definitions (`jobs.JobSpec`, plain values that any
executor can run), runs them on schedules (`schedule`) inside concurrency and bandwidth budgets
(`limits`), with retries, circuit breakers and timeouts (`daemon`), records every run (`history`),
exposes metrics (`metrics`), proves backups restorable (`drills`) and raises alerts (`alerts`,
`notify`). The CLI renders what these modules return; nothing here prints.
"""
