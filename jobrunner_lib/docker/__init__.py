"""The Docker edge: the engine client (names, labels, every call with a timeout and its errors
translated), job volumes, and files in and out of them.
"""
