"""Reusable helpers for tests and benchmarks that need a real OpenSSH server.

Nothing in this package imports pytest: a benchmark script can use
:mod:`tests.support.sshd` directly (put the repository root on ``sys.path``).
"""
