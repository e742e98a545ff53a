"""The deployment workflow.

- ``spec``: the deployment request (strategy, smoke, analysis, hooks, migrations), parsed and
  validated.
- ``transitions``: the state machine as pure functions (deploy, shift, bake, drain, standby,
  decommission, and the commands that steer it).
- ``operations``: service operations (register, weights, switch, rollback) inside store
  transactions.
- ``driver``: the async driver: timers, smoke tests, analysis, hooks, migrations.
- ``smoke``: smoke checks through the proxies' preview entry, commands and webhooks.
"""
