"""One way to start, break and audit the stack, shared by the soak, the bench and the tests.

processes (one child process), stack (the services on one vhost and data directory), vhost
(a private vhost through the one management client), audit (the invariants, read through
the services' `--json`), browser (the console and chromium, for its tests and screenshots),
and the soak's and the bench's own modules on top.
"""
