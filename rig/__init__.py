"""The real-parts test rig: Asterisk 22 in a Debian sid chroot, Redis, SIPp.

Stdlib only: it provisions before any virtualenv exists and is shared by the
tests, `make run` and the demo.
"""
