"""Expand/contract database migrations tied to deployments.

A migration set is a directory of ``NNNN_name.expand.sql`` and ``NNNN_name.contract.sql`` files
applied in the order of NNNN. *Expand* files must keep the old version working (lint refuses
anything that breaks an N-1 client); *contract* files may break it, and run only once nothing can
roll back to a version that needs the old schema.
"""
