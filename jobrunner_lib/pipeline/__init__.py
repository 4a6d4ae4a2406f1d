"""project.yaml: parsing (with line numbers), the official parser's rules, jr's own rules (names,
cycles), and the commands each action runs. Pure: no I/O.
"""
