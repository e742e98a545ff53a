"""xDS worker processes: several processes serve proxies on one port (docs/workers.md).

``pool.py`` runs in the main process (starts, feeds, restarts and listens to the workers);
``child.py`` is a worker; ``ipc.py`` is the pipe between them; ``serving.py`` the gRPC server
set-up both the single process and the workers use.
"""
