"""The git edge: running git (sh, or subprocess where sh cannot import) and the bare repos of
studies and reusable actions.
"""
