"""Operations on jobs and their objects for the operator tools (kill, retry, reboot, prune):
library functions the tools in cli/ call; no argument parsing or printing here.
"""
