"""The loops: creating jobs from requests, the sync pass, the run pass, a job's worker and driver,
the executor (prepare, execute, finalize, cleanup), writing into the workspaces, and what a pass
supervises (processes, outages, stats, cleanup debts, the database maintenance check).
"""
