"""The state store (SQLite): the connection and schema migrations, and every query on jobs,
requests and flags.
"""
